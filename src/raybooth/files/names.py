"""The names and seeds of generated images. Each image's file name and seed follow from its prompt
and index alone, so a re-run finds what is already there and makes only what is missing, with the
same result, and a seed gives the same image whether `raybooth generate` or a training worker
makes it."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

_GENERATED_NAME = re.compile(r"-([0-9a-f]{8})-\d{4,}\.png$")


def prompt_digest(prompt: str) -> str:
    return hashlib.sha1(prompt.encode()).hexdigest()[:8]


def image_name(prompt: str, index: int) -> str:
    """`a-photo-of-a-toy-car-1b2c3d4e-0007.png`: readable, and unique per prompt and index."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60] or "prompt"
    return f"{slug}-{prompt_digest(prompt)}-{index:04d}.png"


def generated_for(name: str) -> str | None:
    """The prompt digest in the name of an image we generated; None for anyone else's image."""
    match = _GENERATED_NAME.search(name)
    return match.group(1) if match else None


def image_seed(base_seed: int, prompt: str, index: int) -> int:
    digest = hashlib.sha256(f"{base_seed}\0{prompt}\0{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # torch seeds are signed 64-bit


def missing_images(prompts: list[str], num_samples_per_prompt: int, output_dir: Path,
                   base_seed: int) -> list[dict]:
    return [{"prompt": prompt, "index": index, "seed": image_seed(base_seed, prompt, index),
             "file": image_name(prompt, index)}
            for prompt in prompts for index in range(num_samples_per_prompt)
            if not (output_dir / image_name(prompt, index)).exists()]
