"""Issue 32's speed targets on one GPU: `raybooth batch` of 8 subjects (4 photos each, 2 classes,
200 class images per class, LoRA rank 4, 500 steps at 1+1, 8 samples each) against `raybooth run
--use_lora` once per subject in sequence, on SD-1.5-sized random weights at 512 px. Each phase fits
one device call (10 minutes) and writes OUT/batch-PHASE.json:

    python bench/batch.py batch MODEL_DIR OUT [SUBJECTS_PER_GPU]  # the whole batch, its per-subject times
    python bench/batch.py runs MODEL_DIR OUT [FIRST COUNT]        # `raybooth run` per subject, in sequence

Target 1 compares the batch's wall time with the sum of the runs' (all 8, or the measured ones
scaled, said so); target 2 reads each subject's seconds beyond the first from batch.json against the
steady step rate in its log.txt."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import yaml
from PIL import Image

from raybooth.world.scenes import write_subject

SUBJECTS = [(f"subject-{i}", "dog" if i % 2 else "toy car") for i in range(8)]
TRAINING = {"use_lora": True, "max_train_steps": 500, "train_batch_size": 1, "num_class_images": 200,
            "num_samples_per_prompt": 2, "num_class_samples": 8, "checkpointing_steps": 10000}
PROMPTS = ["a photo of unqtkn {}", "a photo of unqtkn {} on the beach", "a photo of unqtkn {} in the snow",
           "a photo of unqtkn {} at night"]  # 2 samples each: 8


def photos(folder: Path, seed: int) -> Path:
    """Four 512 px subject photos (the weights are random: what they show does not change the speed)."""
    for path in write_subject(folder, count=4, seed=seed, size=128):
        Image.open(path).resize((512, 512), Image.Resampling.BICUBIC).save(path)
    return folder


def manifest(model: str, out: Path) -> Path:
    subjects = [{"name": name, "instance_images_dir": str(photos(out / "photos" / name, i)), "class_noun": noun,
                 "sample_prompts": [p.format(noun) for p in PROMPTS]} for i, (name, noun) in enumerate(SUBJECTS)]
    path = out / "subjects.yaml"
    path.write_text(yaml.safe_dump({"defaults": {"model_dir": model, **TRAINING}, "subjects": subjects}))
    return path


def timed(command: list[str], log: Path) -> dict:
    started = time.perf_counter()
    with open(log, "w") as written:
        code = subprocess.run(command, stdout=written, stderr=subprocess.STDOUT).returncode
    return {"wall_s": round(time.perf_counter() - started, 1), "exit": code}


def main() -> None:
    phase, model, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    out.mkdir(parents=True, exist_ok=True)
    path = manifest(model, out)
    raybooth = [sys.executable, "-m", "raybooth"]
    if phase == "batch":
        per_gpu = sys.argv[4] if len(sys.argv) > 4 else "1"
        result = timed([*raybooth, "batch", "--manifest", str(path), "--output_dir", str(out / f"batch-{per_gpu}"),
                        "--subjects_per_gpu", per_gpu], out / f"batch-{per_gpu}.log")
        result["subjects"] = json.loads((out / f"batch-{per_gpu}" / "batch.json").read_text())["subjects"]
        result["subjects_per_gpu"] = int(per_gpu)
    else:
        first, count = (int(sys.argv[4]), int(sys.argv[5])) if len(sys.argv) > 5 else (0, len(SUBJECTS))
        result = {"runs": {}}
        for name, noun in SUBJECTS[first:first + count]:
            options = [f"--{k}" if v is True else f"--{k}={v}" for k, v in TRAINING.items()]
            result["runs"][name] = timed([*raybooth, "run", "--model_dir", model, "--work_dir", str(out / "runs" / name),
                                          "--instance_images_dir", str(out / "photos" / name), "--class_noun", noun,
                                          "--sample_prompts", *[p.format(noun) for p in PROMPTS], *options],
                                         out / f"run-{name}.log")
            print(name, result["runs"][name], flush=True)
    (out / f"batch-{phase}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "subjects"}, indent=2))


if __name__ == "__main__":
    main()
