"""Issue 5: where the fixed cost of `raybooth train` goes, on one GPU. Times the driver's imports
(`python -X importtime`), then runs `raybooth train --max_train_steps 100` with 200 class images
in place (smooth random pictures: reading and encoding them costs what real ones do), and keeps
its log and Ray's own log (Ray Train's controller and worker-group events, stamped). Writes
startup.json and the logs to OUT_DIR.

    python bench/startup.py MODEL_DIR OUT_DIR [TRAIN_FLAGS...]

TRAIN_FLAGS go to `raybooth train` as they are (`--no_local_mode` for the worker process; a
`--max_train_steps` there replaces the 100 steps, in the fixed cost too).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from flow import phase_times, photos, run, steady_steps_per_s, timeline
from PIL import Image

WORK = Path("/tmp/raybooth-startup")


def class_images(folder: Path, count: int = 200, side: int = 512) -> Path:
    if folder.is_dir() and len(list(folder.iterdir())) == count:  # made by an earlier run on this machine
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    random = np.random.default_rng(0)
    for index in range(count):
        coarse = random.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((side, side), Image.Resampling.BICUBIC).save(folder / f"class-{index:03d}.png")
    return folder


def import_times(out: Path) -> list[str]:
    """The driver's slowest imports, cumulative microseconds."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import raybooth.commands.cli, raybooth.driver.training"],
                          capture_output=True, text=True)
    rows = [line for line in done.stderr.splitlines() if line.startswith("import time:") and "|" in line]
    rows = [row for row in rows if row.split("|")[1].strip().isdigit()]
    (out / "importtime.txt").write_text(done.stderr)
    return sorted(rows, key=lambda row: -int(row.split("|")[1]))[:25]


def main(model_dir: str, out_dir: str, *flags: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"imports": import_times(out)}
    steps = int(flags[flags.index("--max_train_steps") + 1]) if "--max_train_steps" in flags else 100  # the last wins
    result = run("raybooth-train", [
        sys.executable, "-m", "raybooth", "train", "--model_dir", model_dir, "--output_dir", str(WORK / "tuned"),
        "--overwrite", "--instance_images_dir", str(photos(WORK / "photos")), "--instance_prompt",
        "a photo of unqtkn dog", "--class_images_dir", str(class_images(WORK / "class")), "--class_prompt",
        "a photo of a dog", "--num_class_images", "200", "--max_train_steps", "100", *flags], out)
    rate = steady_steps_per_s(result["log"])
    report["train_100"] = {"wall_s": result["wall_s"], "exit": result["exit"], "steps_per_s": rate,
                           "fixed_cost_s": round(result["wall_s"] - steps / rate, 1) if rate else None,
                           "timeline": timeline(result["log"])}
    ray_log = re.search(r"Ray's own output goes to (\S+)", result["log"])
    if ray_log and Path(ray_log.group(1)).is_file():
        shutil.copy(ray_log.group(1), out / "ray.log")
    train_logs = Path("/tmp/ray/session_latest/logs/train")  # Ray Train's controller and workers, stamped
    if train_logs.is_dir():  # one file: the device machine sends back only so many
        with open(out / "train-logs.jsonl", "w") as merged:
            for path in sorted(train_logs.glob("ray-train-sys-*.log")):
                for line in path.read_text().splitlines():
                    merged.write(json.dumps({"file": path.name[:32], **json.loads(line)}) + "\n")
    metrics = WORK / "tuned" / "metrics.json"  # the run's phases, throughput and GPU memory
    report["metrics"] = json.loads(metrics.read_text()) if metrics.is_file() else None
    (out / "startup.json").write_text(json.dumps(report, indent=1))
    marks = {"Ray up": "started Ray", "planned": "fine-tuning", "loop starts": "up; loading", "model loaded":
             "model loaded", "first step": "first step done", "saved": "saved", "last line": "wrote the fine-tuned"}
    times = phase_times(report["train_100"]["timeline"], marks)
    train = report["train_100"]
    print(json.dumps({"run": out.name, "flags": flags, "wall_s": train["wall_s"], "exit": train["exit"],
                      "fixed_cost_s": train["fixed_cost_s"], "steps_per_s": train["steps_per_s"], **times,
                      **{key: value for key, value in (report["metrics"] or {}).items() if "gpu" in key}}))


if __name__ == "__main__":
    main(*sys.argv[1:])
