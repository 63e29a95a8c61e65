"""Issue 10: how raybooth scales over the GPUs of one machine, through its own CLI with Ray, on
SD-1.5-sized random weights at 512 px, batch 1+1 per worker. Writes scaling-PART.json and the
logs to OUT_DIR.

    python bench/scaling.py MODEL_DIR OUT_DIR generate [GPU_COUNTS]  # class images/s through Ray Data
    python bench/scaling.py MODEL_DIR OUT_DIR train [GPU_COUNTS [FLAGS]]  # training images/s, 1..N workers
    python bench/scaling.py MODEL_DIR OUT_DIR layouts  # on 2 GPUs: eager DDP, and one worker with two GPUs
    python bench/scaling.py MODEL_DIR OUT_DIR flow [GPU_COUNTS [FLAGS]]  # the seed's whole flow on 1..N GPUs

GPU_COUNTS is a list such as 1,2,4 (default: 1, 2, 4, 8 up to the machine's); FLAGS go to every
`raybooth train` / `run` of the part.

NVLink multicast stays off (the machines' rule): the variables are set here, and raybooth hands
them to its Ray workers.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import torch
from flow import SAMPLE_PROMPTS, photos, run, timeline

os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
RAYBOOTH = [sys.executable, "-m", "raybooth"]
CLASS_PROMPT = "a photo of a dog"
WORK = Path("/tmp/raybooth-scaling")


def generation_rate(log: str) -> float:
    """images/s from Ray's start to the last image, the actors' model load included: Ray Data hands
    the images over in bursts, so the progress lines give no steady rate of their own."""
    lines = timeline(log)
    started = next(t for t, message in lines if message.startswith("started Ray"))
    done_at, done = [(t, int(m.split()[1].split("/")[0])) for t, m in lines if m.startswith("made ")][-1]
    return round(done / (done_at - started), 2)


def steps_per_s_past_warmup(log: str, past: int = 30) -> float:
    """Steps/s from the first step line at or past step `past` (DDP's eager warm-up and the graph's
    capture are done by then) to the last one. flow.py's median of the logged 10-step rates rests on
    one window where a run has few steps."""
    rows = [(int(m.split()[1].split("/")[0]), t) for t, m in timeline(log) if re.match(r"step \d+/", m)]
    (s0, t0), (s1, t1) = next(row for row in rows if row[0] >= past), rows[-1]
    return round((s1 - s0) / (t1 - t0), 2)


def losses(output_dir: Path) -> list[float]:
    return [row["loss"] for row in json.loads((output_dir / "training_log.json").read_text())["history"]]


def train(name: str, model_dir: str, out: Path, class_dir: Path, workers: int, per_worker: int, steps: int,
          extra: list[str], report: dict) -> None:
    output = WORK / name
    result = run(name, RAYBOOTH + [
        "train", "--model_dir", model_dir, "--output_dir", str(output), "--overwrite",
        "--instance_images_dir", str(photos(WORK / "photos")), "--instance_prompt", "a photo of unqtkn dog",
        "--class_images_dir", str(class_dir), "--class_prompt", CLASS_PROMPT,
        "--num_class_images", "32", "--max_train_steps", str(steps), "--num_epochs", "1000",  # steps decide
        "--num_workers", str(workers), "--gpus_per_worker", str(per_worker), *extra], out)
    rate = steps_per_s_past_warmup(result["log"]) if result["exit"] == 0 else 0.0
    report[name] = {"workers": workers, "gpus_per_worker": per_worker, "steps": steps, "exit": result["exit"],
                    "wall_s": result["wall_s"], "steps_per_s": rate, "images_per_s": round(rate * 2 * workers, 1),
                    "losses": losses(output) if result["exit"] == 0 else []}


def generate_scaling(model_dir: str, out: Path, gpus: list[int], report: dict, save, extra: list[str]) -> None:
    """Class images through Ray Data, one actor a GPU: steady images/s on 1..N GPUs."""
    for n in gpus:
        count = 96 * n
        result = run(f"generate-{n}", RAYBOOTH + [
            "generate", "--model_dir", model_dir, "--output_dir", str(WORK / f"class-{n}"), "--prompts",
            CLASS_PROMPT, "--num_samples_per_prompt", str(count), "--num_workers", str(n)], out)
        report[f"generate_{n}gpu"] = {"images": count, "wall_s": result["wall_s"], "exit": result["exit"],
                                      "images_per_s": generation_rate(result["log"])}
        save()
    for n in gpus[1:]:
        if report["generate_1gpu"]["exit"] == 0 and report[f"generate_{n}gpu"]["exit"] == 0:
            report[f"generate_efficiency_{n}gpu"] = round(
                report[f"generate_{n}gpu"]["images_per_s"] / (n * report["generate_1gpu"]["images_per_s"]), 3)


def train_scaling(model_dir: str, out: Path, gpus: list[int], report: dict, save, extra: list[str]) -> None:
    """Training images/s with 1..N one-GPU workers, `extra` flags added to each run."""
    class_dir = WORK / "class-train"
    for n in gpus:
        train(f"train-{n}x1", model_dir, out, class_dir, n, 1, 200, extra, report)
        save()
    one = report.get("train-1x1", {}).get("images_per_s")  # absent where the baseline runs apart
    for n in (n for n in gpus if n > 1):
        if one and report[f"train-{n}x1"]["images_per_s"]:
            report[f"train_efficiency_{n}gpu"] = round(report[f"train-{n}x1"]["images_per_s"] / (n * one), 3)


def layouts(model_dir: str, out: Path, gpus: list[int], report: dict, save, extra: list[str]) -> None:
    """On 2 GPUs: DDP without the graph, and the seed's layout (UNet on one GPU, text encoder on
    the other) against two one-GPU workers, from the same seed."""
    class_dir = WORK / "class-train"
    for name, workers, per_worker, steps, flags in [("train-2x1", 2, 1, 100, []),
                                                    ("train-2x1-eager", 2, 1, 100, ["--no_cuda_graphs"]),
                                                    ("train-1x2", 1, 2, 100, [])]:
        train(name, model_dir, out, class_dir, workers, per_worker, steps, flags + extra, report)
        save()
    graph, eager = report["train-2x1"]["losses"], report["train-2x1-eager"]["losses"]
    if graph and eager:  # same seed: the graphed DDP step must train as the eager one does
        report["graph_vs_eager_2x1_max_loss_diff"] = max(abs(a - b) for a, b in zip(graph, eager))


def flow_scaling(model_dir: str, out: Path, gpus: list[int], report: dict, save, extra: list[str]) -> None:
    """`raybooth run` as the seed does it (200 class images, 800 pairs of 1+1, 20 samples), the
    same work on n GPUs: 800 / n steps on each of n workers."""
    subject = photos(WORK / "photos")
    for n in sorted(gpus, reverse=True):
        result = run(f"run-{n}gpu", RAYBOOTH + [
            "run", "--model_dir", model_dir, "--instance_images_dir", str(subject), "--class_noun", "dog",
            "--work_dir", str(WORK / f"run-{n}"), "--sample_prompts", *SAMPLE_PROMPTS, "--num_samples_per_prompt", "4",
            "--num_workers", str(n), "--max_train_steps", str(800 // n), *extra], out)
        report[f"run_{n}gpu"] = {"wall_s": result["wall_s"], "exit": result["exit"],
                                 "timeline": timeline(result["log"])}
        save()


def main(model_dir: str, out_dir: str, part: str, gpu_counts: str = "", *extra: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gpus = [int(n) for n in gpu_counts.split(",")] if gpu_counts else [
        n for n in (1, 2, 4, 8) if n <= torch.cuda.device_count()]
    report: dict = {"device": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
                    "torch": torch.__version__}

    def save() -> None:
        (out / f"scaling-{part}.json").write_text(json.dumps(report, indent=1))

    report["extra_flags"] = list(extra)
    parts = {"generate": generate_scaling, "train": train_scaling, "layouts": layouts, "flow": flow_scaling}
    parts[part](model_dir, out, gpus, report, save, list(extra))
    print(json.dumps({k: v for k, v in report.items() if not isinstance(v, dict)} |
                     {k: {kk: vv for kk, vv in v.items() if kk not in ("losses", "timeline")}
                      for k, v in report.items() if isinstance(v, dict)}, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
