"""`raybooth evaluate`'s settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from raybooth.config.fields import (DTYPES, ORIGINAL_CONFIG_HELP, SAMPLER_HELP, SAMPLERS, STEPS_HELP,
                                    check_prompts_given, finite, given, option, positive)
from raybooth.config.watch import VERBOSE_HELP
from raybooth.errors import RayboothError

METRICS = ("world", "clip")
WORLD_GUIDANCE = 5.0  # what raybooth.world.pretrain samples its grids with


@dataclass
class EvaluateConfig:
    model_dir: Path = option(help="The fine-tuned pipeline to judge (or, with --lora_weights_dir, its base).")
    instance_images_dir: Path = option(help="The subject's real photos, the ones it was fine-tuned on.")
    class_noun: str = option(help='Class of the subject, e.g. "toy car".')
    unique_token: str = option("unqtkn", "The identifier the subject was trained under.")
    num_samples: int = option(8, "Samples per subject prompt.")
    num_class_samples: int | None = option(None, "Samples of the plain class prompt (default: 4x --num_samples).")
    prompts: list[str] | None = option(None, "Subject prompts (default: the subject alone and in each of the small "
                                             "world's contexts, or some of the paper's scenes with --metrics clip).",
                                       nargs="+")
    output_dir: Path = option(Path("raybooth-evaluation"), "Folder for metrics.json, the sample grid and the samples.")
    metrics: str | None = option(None, "world: the small world's classifier judges the samples; clip: the paper's "
                                       "DINO, CLIP-I and CLIP-T (default: clip when --clip_model_dir is given, "
                                       "else world).", choices=METRICS)
    clip_model_dir: Path | None = option(None, "CLIP model for --metrics clip: a local folder, a Hugging Face cache "
                                               "folder or a repository name already in the hub's cache.")
    dino_model_dir: Path | None = option(None, "DINO ViT model (the paper: facebook/dino-vits16) for --metrics clip, "
                                               "found as --clip_model_dir is.")
    classifier: Path | None = option(None, "World classifier weights for --metrics world (default: the shipped one).")
    lora_weights_dir: Path | None = option(None, "A LoRA adapter to apply to --model_dir.")
    original_config_dir: Path | None = option(None, ORIGINAL_CONFIG_HELP)
    sampler: str = option("dpm++", SAMPLER_HELP, choices=SAMPLERS)
    num_inference_steps: int | None = option(None, STEPS_HELP)
    guidance_scale: float | None = option(None, "Classifier-free guidance scale (default: 5 with --metrics world, "
                                                "as the world model was pretrained to sample, else SD's 7.5).")
    seed: int = option(0, "Base seed of the samples.")
    batch_size: int | None = option(None, "Samples per pipeline call (default: 16 on GPU, 4 on CPU).")
    dtype: str = option("auto", "Inference dtype, as for `raybooth generate`.", choices=DTYPES)
    use_gpu: bool | None = option(None, "Sample on GPUs (default: when the Ray cluster has any); the judges use this "
                                          "machine's GPU where it has one.")
    address: str | None = option(None, "Ray cluster to attach to (default: RAY_ADDRESS, else a local Ray).")
    verbose: bool = option(False, VERBOSE_HELP)

    @property
    def chosen_metrics(self) -> str:
        return self.metrics or ("clip" if self.clip_model_dir else "world")

    @property
    def guidance(self) -> float:
        if self.guidance_scale is not None:
            return self.guidance_scale
        return WORLD_GUIDANCE if self.chosen_metrics == "world" else 7.5

    @property
    def class_sample_count(self) -> int:
        return self.num_class_samples or 4 * self.num_samples

    def validate(self) -> None:
        positive(num_samples=self.num_samples,
                 **given(num_class_samples=self.num_class_samples, batch_size=self.batch_size,
                         num_inference_steps=self.num_inference_steps))
        finite(guidance_scale=self.guidance)
        if self.prompts is not None:
            check_prompts_given("--prompts", self.prompts)
        if self.chosen_metrics == "clip" and not (self.clip_model_dir and self.dino_model_dir):
            raise RayboothError("--metrics clip needs --clip_model_dir and --dino_model_dir (local models; "
                                "raybooth evaluate never downloads)")
