"""The seed's whole flow through raybooth's own CLI on one GPU, with Ray, timed, beside the anchor
(diffusers-style step and pipeline, ../shared/bench) in the same run. SD-1.5-sized random
weights, 512 px, 4 photos, 200 class images, 800 steps at batch 1+1 with the text encoder, 20
samples; then `raybooth generate` of 200 class images and `raybooth train` of 100 steps alone.
Writes flow.json and the logs to OUT_DIR.

    python bench/flow.py MODEL_DIR ANCHOR_DIR OUT_DIR     # MODEL_DIR from bench/sd15.py
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from raybooth.models.tiny import write_demo_subject

# The anchor's diffusers-style step as its script runs it, then that step's peak GPU memory to the
# byte: the script rounds it to 0.1 GiB, too coarse beside target 3's 15.6 GiB (its run() resets the
# peak before the step, and this is its only row).
ANCHOR_STEP_EXACT_PEAK = ("import json, runpy, sys, torch; sys.argv = [sys.argv[1], 'diffusers-style']; "
                          "runpy.run_path(sys.argv[0], run_name='__main__'); "
                          "print(json.dumps({'exact_peak_gib': torch.cuda.max_memory_allocated() / 2**30}))")
SAMPLE_PROMPTS = [f"a photo of unqtkn dog {scene}".strip() for scene in
                  ("", "on the beach", "in the snow", "at night", "in a city")]  # 4 samples each: the seed's 20


def run(name: str, command: list[str], out: Path, env: dict | None = None) -> dict:
    started = time.perf_counter()
    log = out / f"{name}.log"
    with open(log, "w") as written:  # as it comes: a run cut short by the device's time limit leaves its log
        result = subprocess.run(command, stdout=written, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - started
    print(f"{name}: exit {result.returncode}, {wall:.1f} s", flush=True)
    return {"wall_s": round(wall, 1), "exit": result.returncode, "log": log.read_text()}


def photos(folder: Path) -> Path:
    """Four subject photos of a real photo's size (1200x900 JPEGs)."""
    small = write_demo_subject(folder / "small", count=4)
    folder.mkdir(parents=True, exist_ok=True)
    for path in small:
        Image.open(path).resize((1200, 900), Image.Resampling.BICUBIC).save(folder / path.name, quality=92)
        path.unlink()
    (folder / "small").rmdir()
    return folder


def timeline(log: str) -> list[tuple[float, str]]:
    return [(float(t), message) for t, message in re.findall(r"\[raybooth +([0-9.]+)s\] (.*)", log)]


def phase_times(lines: list[tuple[float, str]], marks: dict[str, str]) -> dict[str, float | None]:
    """Seconds of the first log line holding each mark's text (None where none does)."""
    return {name: next((t for t, message in lines if text in message), None) for name, text in marks.items()}


def steady_steps_per_s(log: str) -> float:
    rates = [float(r) for r in re.findall(r" ([0-9.]+) steps/s", log)]
    return sorted(rates[2:])[len(rates[2:]) // 2] if len(rates) > 3 else rates[-1]  # the median past the start


def main(model_dir: str, anchor_dir: str, out_dir: str) -> None:
    out, work = Path(out_dir), Path("/tmp/raybooth-flow")
    out.mkdir(parents=True, exist_ok=True)
    raybooth = [sys.executable, "-m", "raybooth"]
    subject = photos(work / "photos")
    report: dict = {}

    def save() -> None:  # after each phase, so a run cut short still leaves what it measured
        (out / "flow.json").write_text(json.dumps(report, indent=1))

    anchor_env = dict(os.environ, PYTHONPATH=f"{anchor_dir}:{os.environ.get('PYTHONPATH', '')}")
    for name, command in (("anchor-step", ["-c", ANCHOR_STEP_EXACT_PEAK, f"{anchor_dir}/anchor_step.py"]),
                          ("anchor-generate", [f"{anchor_dir}/anchor_generate.py"])):
        run(name, [sys.executable, *command], out, anchor_env)
        report[name] = [json.loads(line) for line in (out / f"{name}.log").read_text().splitlines()
                        if line.startswith("{")]
        save()
    flow = run("raybooth-run", raybooth + [
        "run", "--model_dir", model_dir, "--instance_images_dir", str(subject), "--class_noun", "dog",
        "--work_dir", str(work / "run"), "--sample_prompts", *SAMPLE_PROMPTS, "--num_samples_per_prompt", "4"], out)
    report["run"] = {"wall_s": flow["wall_s"], "exit": flow["exit"], "timeline": timeline(flow["log"]),
                     "steps_per_s": steady_steps_per_s(flow["log"])}
    save()
    # `generate` alone: 200 class images through Ray Data, from the command's start to each batch.
    generated = run("raybooth-generate", raybooth + [
        "generate", "--model_dir", model_dir, "--output_dir", str(work / "generated"), "--prompts", "a photo of a dog",
        "--num_samples_per_prompt", "200"], out)
    report["generate_200"] = {"wall_s": generated["wall_s"], "exit": generated["exit"],
                              "timeline": timeline(generated["log"])}
    save()
    # `train` alone, the class images now in place: its fixed cost is wall time minus the steps.
    steps = 100
    train = run("raybooth-train", raybooth + [
        "train", "--model_dir", model_dir, "--output_dir", str(work / "tuned-100"), "--instance_images_dir",
        str(subject), "--instance_prompt", "a photo of unqtkn dog", "--class_images_dir", str(work / "run/images-reg"),
        "--class_prompt", "a photo of a dog", "--max_train_steps", str(steps)], out)
    rate = steady_steps_per_s(train["log"])
    metrics = work / "tuned-100" / "metrics.json"  # phases, throughput and peak GPU memory
    report["train_100"] = {"wall_s": train["wall_s"], "exit": train["exit"], "steps_per_s": rate,
                           "fixed_cost_s": round(train["wall_s"] - steps / rate, 1), "timeline": timeline(train["log"]),
                           "metrics": json.loads(metrics.read_text()) if metrics.is_file() else None}
    save()
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "timeline"} if isinstance(v, dict) else v
                      for k, v in report.items()}, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:4])
