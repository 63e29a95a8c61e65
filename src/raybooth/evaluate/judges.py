"""The DreamBooth paper's measures for real models, from transformers' CLIP and DINO models:

- DINO: mean pairwise cosine similarity between the DINO ViT-S/16 CLS embeddings of generated
  and real subject images (subject fidelity; DINO tells apart objects of one class).
- CLIP-I: the same with CLIP image embeddings.
- CLIP-T: mean CLIP cosine similarity between each generated image and its prompt (prompt fidelity).

Models come from a local folder or the Hugging Face cache, never the network. Images are
resized and normalised here with PIL and numpy, as the model's preprocessor_config.json says,
so no torchvision (which transformers' default image processors want) is needed.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from raybooth.errors import RayboothError

# The defaults of CLIP's and ViT's image processors, for a folder without preprocessor_config.json.
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


BATCH_SIZE = 32


@dataclass(frozen=True)
class Preprocessing:
    """How a model wants its pixels: resized (the shorter side to `size`, or to a `size` square),
    centre-cropped to `crop`, scaled to [0, 1] and normalised by `mean` and `std`."""

    size: int
    square: bool
    crop: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resample: int

    @classmethod
    def for_model(cls, folder: Path | None, image_size: int, clip: bool) -> Preprocessing:
        settings = {}
        if folder is not None and (folder / "preprocessor_config.json").is_file():
            settings = json.loads((folder / "preprocessor_config.json").read_text())
        size = settings.get("size", {"shortest_edge": image_size} if clip else image_size)
        if isinstance(size, dict):
            square = "shortest_edge" not in size
            size = size.get("shortest_edge", size.get("height", image_size))
        else:
            square = not clip  # a bare int: ViT resizes to a square, CLIP's shorter side
        crop = settings.get("crop_size", image_size)
        crop = crop.get("height", image_size) if isinstance(crop, dict) else crop
        return cls(size=int(size), square=square,
                   crop=int(crop) if settings.get("do_center_crop", clip) else None,
                   mean=tuple(settings.get("image_mean", CLIP_MEAN if clip else IMAGENET_MEAN)),
                   std=tuple(settings.get("image_std", CLIP_STD if clip else IMAGENET_STD)),
                   resample=int(settings.get("resample", Image.Resampling.BICUBIC if clip else
                                             Image.Resampling.BILINEAR)))

    def __call__(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """NCHW float pixel values for uint8 HWC images."""
        return torch.from_numpy(np.stack([self.one(image) for image in images]))

    def one(self, image: np.ndarray) -> np.ndarray:
        picture = Image.fromarray(image).convert("RGB")
        width, height = picture.size
        if self.square:
            width, height = self.size, self.size
        else:
            scale = self.size / min(width, height)
            width, height = max(self.size, round(width * scale)), max(self.size, round(height * scale))
        picture = picture.resize((width, height), resample=self.resample)
        if self.crop:
            left, top = (width - self.crop) // 2, (height - self.crop) // 2
            picture = picture.crop((left, top, left + self.crop, top + self.crop))
        pixels = np.asarray(picture, dtype=np.float32) / 255.0
        pixels = (pixels - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return pixels.transpose(2, 0, 1).copy()


def resolve_pretrained(location: Path | str, what: str) -> Path | str:
    """A local model folder: `location` itself, the one snapshot in a Hugging Face cache folder, or
    (for a repository name such as openai/clip-vit-base-patch32) the name, for from_pretrained
    to find in the hub's own cache without going online."""
    path = Path(location).expanduser()
    if (path / "config.json").is_file():
        return path
    if path.is_dir():
        snapshots = sorted(p.parent for p in path.glob("models--*/snapshots/*/config.json"))
        if len(snapshots) == 1:
            return snapshots[0]
        raise RayboothError(f"{what} folder {path} holds no config.json" +
                            (f" and several cached models: {', '.join(map(str, snapshots[:3]))}" if snapshots else ""))
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(location)):
        return str(location)
    raise RayboothError(f"{what} {location} is neither a model folder nor a Hugging Face repository name")


def _load(loader, location: Path | str, what: str, **kwargs):
    from raybooth.terminal.log import quiet_model_libraries

    quiet_model_libraries()
    try:
        return loader.from_pretrained(resolve_pretrained(location, what), local_files_only=True, **kwargs)
    except OSError as error:
        raise RayboothError(f"cannot load the {what} from {location} without a network ({error})") from None


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _local_folder(location: Path | str) -> Path | None:
    resolved = resolve_pretrained(location, "model")
    if isinstance(resolved, Path):
        return resolved
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(resolved, local_files_only=True))


def unit(vectors: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(vectors.float(), dim=-1)


def _pooled(output) -> torch.Tensor:
    """transformers 5 returns a model output whose pooler_output is the projected embedding;
    earlier versions return the tensor itself."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipJudge:
    """A CLIP model and its tokenizer: unit-length image and text embeddings."""

    def __init__(self, location: Path | str):
        from transformers import AutoTokenizer, CLIPModel

        self.device = _device()
        self.model = _load(CLIPModel, location, "CLIP model").to(self.device).eval()
        self.tokenizer = _load(AutoTokenizer, location, "CLIP tokenizer")
        self.preprocess = Preprocessing.for_model(_local_folder(location), self.model.config.vision_config.image_size,
                                                  clip=True)

    @torch.no_grad()
    def images(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        return torch.cat([unit(_pooled(self.model.get_image_features(
            pixel_values=self.preprocess(images[start:start + BATCH_SIZE]).to(self.device)))).cpu()
            for start in range(0, len(images), BATCH_SIZE)])

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        limit = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=limit, return_tensors="pt")
        return unit(_pooled(self.model.get_text_features(**tokens.to(self.device)))).cpu()


class DinoJudge:
    """A DINO ViT (ViT-S/16 in the paper): unit-length CLS embeddings of the last layer."""

    def __init__(self, location: Path | str):
        from transformers import AutoModel

        self.device = _device()
        self.model = _load(AutoModel, location, "DINO model").to(self.device).eval()
        self.preprocess = Preprocessing.for_model(_local_folder(location), self.model.config.image_size, clip=False)

    @torch.no_grad()
    def images(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        return torch.cat([unit(self.model(pixel_values=self.preprocess(images[start:start + BATCH_SIZE])
                                          .to(self.device)).last_hidden_state[:, 0]).cpu()
                          for start in range(0, len(images), BATCH_SIZE)])


def mean_pairwise_cosine(first: torch.Tensor, second: torch.Tensor) -> float:
    """The mean cosine similarity over every pair (one of `first`, one of `second`) of unit
    vectors, kept in [-1, 1] against rounding."""
    return float((first @ second.T).mean().clamp(-1, 1))


def paired_cosine(first: torch.Tensor, second: torch.Tensor) -> float:
    """The mean cosine similarity of row i of `first` with row i of `second`."""
    return float((first * second).sum(dim=-1).mean().clamp(-1, 1))


def distinct_pairs_distance(vectors: torch.Tensor) -> float:
    """1 - the mean cosine similarity over every pair of distinct rows (nan for fewer than two)."""
    if len(vectors) < 2:
        return math.nan
    rows, columns = torch.triu_indices(len(vectors), len(vectors), offset=1)
    return float(1 - (vectors[rows] * vectors[columns]).sum(dim=-1).mean().clamp(-1, 1))


def text_for_clip(prompt: str, unique_token: str) -> str:
    """The prompt without the identifier, which means nothing to CLIP: "a unqtkn dog on the beach"
    is judged as "a dog on the beach", the context the sample should show."""
    if not unique_token:
        return prompt
    return re.sub(r"\s+", " ", re.sub(rf"\b{re.escape(unique_token)}\b", "", prompt)).strip()


def paper_metrics(samples: Sequence[np.ndarray], prompts: Sequence[str], real_images: Sequence[np.ndarray],
                  clip: ClipJudge, dino: DinoJudge, unique_token: str = "",
                  class_samples: Sequence[np.ndarray] = ()) -> dict:
    """The paper's measures of generated `samples` (sample i made from `prompts[i]`) against the
    subject's `real_images`: "dino", "clip_i" and "clip_t", each in [-1, 1], higher is better.

    With `class_samples` (of the plain class prompt), also the paper's prior preservation measure
    "pres": their mean pairwise DINO similarity to the real images (lower is better: plain class
    samples should not look like the subject), and "class_dino_diversity": 1 - the mean DINO
    similarity between distinct class samples, a stand-in for the paper's LPIPS diversity.
    `per_prompt` holds dino, clip_i and clip_t by prompt."""
    if len(samples) != len(prompts):
        raise ValueError(f"{len(samples)} samples for {len(prompts)} prompts")
    if not len(samples) or not len(real_images):
        raise RayboothError("the paper's measures need at least one sample and one real image")
    dino_samples, dino_real = dino.images(samples), dino.images(real_images)
    clip_samples, clip_real = clip.images(samples), clip.images(real_images)
    clip_texts = clip.texts([text_for_clip(prompt, unique_token) for prompt in prompts])
    metrics: dict = {"dino": mean_pairwise_cosine(dino_samples, dino_real),
                     "clip_i": mean_pairwise_cosine(clip_samples, clip_real),
                     "clip_t": paired_cosine(clip_samples, clip_texts)}
    if len(class_samples):
        dino_class = dino.images(class_samples)
        metrics["pres"] = mean_pairwise_cosine(dino_class, dino_real)
        metrics["class_dino_diversity"] = distinct_pairs_distance(dino_class)
    metrics["per_prompt"] = {}
    for prompt in dict.fromkeys(prompts):
        rows = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
        metrics["per_prompt"][prompt] = {"dino": mean_pairwise_cosine(dino_samples[rows], dino_real),
                                         "clip_i": mean_pairwise_cosine(clip_samples[rows], clip_real),
                                         "clip_t": paired_cosine(clip_samples[rows], clip_texts[rows]),
                                         "samples": len(rows)}
    return metrics
