"""Issue 33's memory figure (CPU): the peak memory of a short `raybooth train` run, with 4 photos,
with 500, and with one 10,000 px photo among 4, so that it shows whether a run's memory grows with
the photos' pixel count beyond what training needs (each photo is kept at the training resolution).

    python bench/photo_memory.py OUT [STEPS]     # one JSON line per case; the runs' logs in OUT

The peak is the resident memory of the command's whole process tree (its own process, where the
one worker trains in local mode, and Ray's), sampled every 50 ms. Photos are JPEGs of smooth
gradients, 4:3 at 4000 x 3000 px (as phones take them), written once into OUT."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image


def photo(path: Path, width: int, height: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(0, 1, width // 8, dtype=np.float32), np.linspace(0, 1, height // 8, dtype=np.float32))
    small = np.stack([(x * rng.uniform(50, 255)), (y * rng.uniform(50, 255)), ((x + y) * 100)], -1).astype(np.uint8)
    Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR).save(path, quality=90)


def photos(folder: Path, count: int, huge: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        side = (10000, 7500) if huge and index == 0 else (4000, 3000)
        if not (folder / f"{index:04d}.jpg").exists():
            photo(folder / f"{index:04d}.jpg", *side, seed=index)
    return folder


def peak_memory(command: list[str], log: Path) -> tuple[int, float, int]:
    """(return code, seconds, peak resident bytes of the process tree)."""
    started, peak = time.monotonic(), 0
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        root = psutil.Process(process.pid)
        while process.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.05)
    return process.returncode, time.monotonic() - started, peak


def main(out: str, steps: str = "20") -> None:
    out_dir = Path(out)
    model = out_dir / "tiny"
    if not model.exists():
        subprocess.run([sys.executable, "-m", "raybooth", "tiny-model", "--output_dir", str(model)], check=True,
                       capture_output=True)
    cases = {"4 photos": photos(out_dir / "four", 4), "500 photos": photos(out_dir / "five-hundred", 500),
             "one 10,000 px photo among 4": photos(out_dir / "huge", 4, huge=True)}
    for name, folder in cases.items():
        tuned = out_dir / f"tuned-{folder.name}"
        command = [sys.executable, "-m", "raybooth", "train", "--model_dir", str(model), "--output_dir", str(tuned),
                   "--instance_images_dir", str(folder), "--instance_prompt", "a photo of unqtkn toy car",
                   "--class_images_dir", str(out_dir / "class"), "--class_prompt", "a photo of a toy car",
                   "--num_class_images", "4", "--num_inference_steps", "2", "--max_train_steps", steps,
                   "--no_use_gpu", "--overwrite", "--storage_path", str(out_dir / "ray-storage")]
        code, seconds, peak = peak_memory(command, out_dir / f"{folder.name}.log")
        print(json.dumps({"case": name, "returncode": code, "seconds": round(seconds, 1),
                          "peak_gib": round(peak / 2**30, 2)}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
