"""Issue 10: how raybooth scales over the GPUs of one machine, through its own CLI with Ray, on
SD-1.5-sized random weights at 512 px, batch 1+1 per worker. Writes scaling-PART.json and the
logs to OUT_DIR.

    python bench/scaling.py MODEL_DIR OUT_DIR train   # generation and training images/s on 1..N GPUs,
                                                      # and one worker with two GPUs
    python bench/scaling.py MODEL_DIR OUT_DIR flow    # the seed's whole flow on 1..N GPUs

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

from flow import SAMPLE_PROMPTS, photos, run, steady_steps_per_s, timeline

os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
RAYBOOTH = [sys.executable, "-m", "raybooth"]
CLASS_PROMPT = "a photo of a dog"
WORK = Path("/tmp/raybooth-scaling")


def steady_generation_rate(log: str) -> float:
    """images/s between the first and the last progress line: past loading, before teardown."""
    rows = [(float(t), int(done)) for t, done in re.findall(r"\[raybooth +([0-9.]+)s\] generated (\d+)/", log)]
    (t0, n0), (t1, n1) = rows[0], rows[-1]
    return round((n1 - n0) / (t1 - t0), 2)


def losses(output_dir: Path) -> list[float]:
    return [row["loss"] for row in json.loads((output_dir / "training_log.json").read_text())["history"]]


def train(name: str, model_dir: str, out: Path, class_dir: Path, workers: int, per_worker: int, steps: int,
          extra: list[str], report: dict) -> None:
    output = WORK / name
    result = run(name, RAYBOOTH + [
        "train", "--model_dir", model_dir, "--output_dir", str(output), "--overwrite",
        "--instance_images_dir", str(photos(WORK / "photos")), "--instance_prompt", "a photo of unqtkn dog",
        "--class_images_dir", str(class_dir), "--class_prompt", CLASS_PROMPT,
        "--num_class_images", "96", "--max_train_steps", str(steps), "--num_workers", str(workers),
        "--gpus_per_worker", str(per_worker), *extra], out)
    rate = steady_steps_per_s(result["log"]) if result["exit"] == 0 else 0.0
    report[name] = {"workers": workers, "gpus_per_worker": per_worker, "steps": steps, "exit": result["exit"],
                    "wall_s": result["wall_s"], "steps_per_s": rate, "images_per_s": round(rate * 2 * workers, 1),
                    "losses": losses(output) if result["exit"] == 0 else []}


def train_scaling(model_dir: str, out: Path, gpus: list[int], report: dict, save) -> None:
    for n in gpus:  # class images through Ray Data, n actors
        count = 96 * n
        result = run(f"generate-{n}", RAYBOOTH + [
            "generate", "--model_dir", model_dir, "--output_dir", str(WORK / f"class-{n}"), "--prompts",
            CLASS_PROMPT, "--num_samples_per_prompt", str(count), "--num_workers", str(n)], out)
        report[f"generate_{n}gpu"] = {"images": count, "wall_s": result["wall_s"], "exit": result["exit"],
                                      "images_per_s": steady_generation_rate(result["log"])}
        save()
    runs = [(f"train-{n}x1", n, 1, 200, []) for n in gpus]
    if 2 in gpus:  # DDP without the graph, and the seed's layout: UNet on one GPU, text encoder on the other
        runs += [("train-2x1-eager", 2, 1, 100, ["--no_cuda_graphs"]), ("train-1x2", 1, 2, 100, [])]
    for name, workers, per_worker, steps, extra in runs:
        train(name, model_dir, out, WORK / f"class-{gpus[0]}", workers, per_worker, steps, extra, report)
        save()
    one = report.get("train-1x1", {}).get("images_per_s")
    for n in gpus[1:]:
        if one and report.get(f"train-{n}x1", {}).get("images_per_s"):
            report[f"train_efficiency_{n}gpu"] = round(report[f"train-{n}x1"]["images_per_s"] / (n * one), 3)
        if report.get("generate_1gpu") and report.get(f"generate_{n}gpu"):
            report[f"generate_efficiency_{n}gpu"] = round(
                report[f"generate_{n}gpu"]["images_per_s"] / (n * report["generate_1gpu"]["images_per_s"]), 3)
    graph, eager = report.get("train-2x1", {}).get("losses"), report.get("train-2x1-eager", {}).get("losses")
    if graph and eager:  # same seed: the graphed DDP step must train as the eager one does
        report["graph_vs_eager_2x1_max_loss_diff"] = max(abs(a - b) for a, b in zip(graph, eager))


def flow_scaling(model_dir: str, out: Path, gpus: list[int], report: dict, save) -> None:
    """`raybooth run` as the seed does it (200 class images, 800 pairs of 1+1, 20 samples), the
    same work on n GPUs: 800 / n steps on each of n workers."""
    subject = photos(WORK / "photos")
    for n in sorted(gpus, reverse=True):
        result = run(f"run-{n}gpu", RAYBOOTH + [
            "run", "--model_dir", model_dir, "--instance_images_dir", str(subject), "--class_noun", "dog",
            "--work_dir", str(WORK / f"run-{n}"), "--sample_prompts", *SAMPLE_PROMPTS, "--num_samples_per_prompt", "4",
            "--num_workers", str(n),
            "--max_train_steps", str(800 // n)], out)
        report[f"run_{n}gpu"] = {"wall_s": result["wall_s"], "exit": result["exit"],
                                 "timeline": timeline(result["log"])}
        save()
    if 2 in gpus:  # the seed's layout, one worker with the text encoder on a second GPU, beside two workers
        train("train-1x2", model_dir, out, WORK / "run-2/images-reg", 1, 2, 100, [], report)
        save()


def main(model_dir: str, out_dir: str, part: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gpus = [n for n in (1, 2, 4, 8) if n <= torch.cuda.device_count()]
    report: dict = {"device": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
                    "torch": torch.__version__}

    def save() -> None:
        (out / f"scaling-{part}.json").write_text(json.dumps(report, indent=1))

    {"train": train_scaling, "flow": flow_scaling}[part](model_dir, out, gpus, report, save)
    print(json.dumps({k: v for k, v in report.items() if not isinstance(v, dict)} |
                     {k: {kk: vv for kk, vv in v.items() if kk not in ("losses", "timeline")}
                      for k, v in report.items() if isinstance(v, dict)}, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:4])
