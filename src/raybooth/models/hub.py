"""Cache a pretrained pipeline from the Hugging Face Hub into the hub's own cache layout."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from raybooth.errors import RayboothError
from raybooth.models.folders import check_model_dir
from raybooth.terminal.log import log

_WEIGHTS = (".safetensors", ".bin")


_SMALL_FILES = (".json", ".txt", ".model")  # configs, tokenizer vocab and merges, sentencepiece models


def pipeline_files(repo_files: list[str]) -> list[str]:
    """The files a diffusers pipeline needs out of everything a model repository holds.

    Repositories such as CompVis/stable-diffusion-v1-4 also carry single-file checkpoints
    (.ckpt, several GB each), fp16 and EMA variants, and Flax or ONNX copies: none are needed.
    From each component folder we take its small files and one copy of its weights,
    safetensors where present, else PyTorch .bin.
    """
    by_folder: dict[str, list[str]] = defaultdict(list)
    for file in repo_files:
        if file.count("/") == 1:
            folder, name = file.split("/")
            by_folder[folder].append(name)
    chosen = ["model_index.json"]
    for folder, names in sorted(by_folder.items()):
        chosen += [f"{folder}/{n}" for n in sorted(names) if n.endswith(_SMALL_FILES)]
        # Variants carry an extra dotted part: diffusion_pytorch_model.fp16.safetensors.
        weights = [n for n in sorted(names) if n.endswith(_WEIGHTS) and n.count(".") == 1]
        safetensors = [n for n in weights if n.endswith(".safetensors")]
        chosen += [f"{folder}/{n}" for n in (safetensors or weights)]
    return chosen


def cache_model(model_name: str, revision: str, cache_dir: Path) -> Path:
    """Download `model_name` at `revision` into `cache_dir` and return its snapshot folder.

    Without a network, a snapshot cached earlier is used; with neither, one clear error.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()  # its retry warnings would bury the one line that matters
    cache_dir = Path(cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        files = HfApi().list_repo_files(model_name, revision=revision)
        snapshot = snapshot_download(model_name, revision=revision, cache_dir=cache_dir,
                                     allow_patterns=pipeline_files(files))
    except Exception as error:  # the hub raises its own and its HTTP client's exception types
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        reason = f"{type(error).__name__}: {reason}"
        if isinstance(error, HfHubHTTPError) and getattr(error, "response", None) is not None:
            raise RayboothError(f"cannot download {model_name}@{revision}: {reason}") from None
        try:
            snapshot = snapshot_download(model_name, revision=revision, cache_dir=cache_dir,
                                         local_files_only=True)
        except Exception:
            raise RayboothError(f"cannot reach the Hugging Face Hub to download {model_name}@{revision}, "
                                f"and {cache_dir} holds no copy of it ({reason})") from None
        log(f"the Hugging Face Hub is out of reach ({reason}); using the copy cached in {cache_dir}")
    return check_model_dir(Path(snapshot))
