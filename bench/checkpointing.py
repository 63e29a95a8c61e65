"""What a checkpoint costs the training it interrupts (issue 7): `raybooth train` on one GPU with a
checkpoint every 100 steps (SD-1.5-sized full fine-tuning: fp32 UNet, text encoder and AdamW
state), reading its log for the time each checkpoint took to write and the steps/s of the report
windows with and without one. Writes checkpointing.json and the log to OUT_DIR.

    python bench/checkpointing.py MODEL_DIR OUT_DIR
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from flow import photos, run

WORK = Path("/tmp/raybooth-checkpointing")


def main(model_dir: str, out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = run("checkpointing", [
        sys.executable, "-m", "raybooth", "train", "--model_dir", model_dir, "--output_dir", str(WORK / "tuned"),
        "--instance_images_dir", str(photos(WORK / "photos")), "--instance_prompt", "a photo of unqtkn dog",
        "--class_images_dir", str(WORK / "class"), "--class_prompt", "a photo of a dog", "--num_class_images", "16",
        "--max_train_steps", "300", "--num_epochs", "100", "--checkpointing_steps", "100", "--storage_path", str(WORK / "storage")], out)
    log = result["log"]
    windows = [(int(step), float(rate)) for step, rate in re.findall(r"step (\d+)/\d+ .* ([0-9.]+) steps/s", log)]
    written = [(int(step), float(s)) for step, s in re.findall(r"checkpoint at step (\d+) written in ([0-9.]+) s", log)]
    after_checkpoint = [rate for step, rate in windows if step - 10 in {s for s, _ in written}]
    steady = [rate for step, rate in windows[3:] if step - 10 not in {s for s, _ in written} and step % 100]
    report = {"exit": result["exit"], "wall_s": result["wall_s"], "checkpoints_written_s": written,
              "steps_per_s_after_a_checkpoint": after_checkpoint,
              "steps_per_s_otherwise_median": sorted(steady)[len(steady) // 2] if steady else None}
    (out / "checkpointing.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:3])
