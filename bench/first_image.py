"""Issue 5, target 5: how soon `raybooth generate` delivers its first class image, and its rate.
Runs `raybooth generate` of 200 class images at the defaults (as `bench/flow.py` does) into a fresh
folder, and watches that folder from the command's start: the first image is the first PNG file
there, whole (written atomically). One JSON line; the log into OUT_DIR.

    python bench/first_image.py MODEL_DIR OUT_DIR [--cudnn-attention] [GENERATE_FLAGS...]

`--cudnn-attention` keeps PyTorch's own choice of attention (cuDNN's on an H100), which raybooth
turns off for generation, to measure what that choice costs and gives.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from flow import timeline


def main(model_dir: str, out_dir: str, *flags: str) -> None:
    out, images = Path(out_dir), Path("/tmp/raybooth-first-image")
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(images, ignore_errors=True)
    seen: dict[int, float] = {}  # images on disk -> seconds since the start
    started = time.perf_counter()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            count = len(list(images.glob("*.png"))) if images.is_dir() else 0
            for mark in (1, 16, 100, 200):
                if count >= mark and mark not in seen:
                    seen[mark] = round(time.perf_counter() - started, 2)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    patches = {"--cudnn-attention": "import raybooth.models.folders as m; m.use_flash_attention = lambda device: None"}
    chosen = [patches[flag] for flag in flags if flag in patches]
    flags = tuple(flag for flag in flags if flag not in patches)
    command = [sys.executable, "-c", "; ".join(["import sys", *chosen, "from raybooth.commands.cli import run", "run()"])]
    result = subprocess.run(command + ["generate", "--model_dir", model_dir, "--output_dir", str(images), "--prompts",
                                       "a photo of a dog", "--num_samples_per_prompt", "200", *flags],
                            capture_output=True, text=True)
    wall = time.perf_counter() - started
    done.set()
    watcher.join()
    (out / "raybooth-generate.log").write_text(result.stdout + result.stderr)
    marks = {f"image_{mark}_s": seen.get(mark) for mark in (1, 16, 100, 200)}
    rate = round(184 / (seen[200] - seen[16]), 2) if 16 in seen and 200 in seen else None  # past the first batch
    print(json.dumps({"run": out.name, "flags": flags, "exit": result.returncode, "wall_s": round(wall, 1), **marks,
                      "images_per_s_after_first_16": rate,
                      "timeline": [line for line in timeline(result.stderr) if "made" not in line[1]][:6]}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
