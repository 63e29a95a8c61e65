"""Issue 5's five targets in one GPU session, through raybooth's own commands beside the anchors,
and their section of bench/RESULTS.md. Two phases, each within one device call (10 minutes) on
one machine, then the report:

    python bench/targets.py flow MODEL ANCHORS OUT    # targets 1, 2, 3, 5: flow.py and first_image.py
    python bench/targets.py mfu MODEL ANCHORS OUT [--no-crop-encode]
                                                      # crop_encode.py's ways of encoding new crops,
                                                      # then target 4: the step alone, raybooth train
    python bench/targets.py report OUT [RUN.md]       # the section from OUT's phases, printed (and
                                                      # written to RUN.md, e.g. bench/runs/DATE-....md)

Each phase writes OUT/targets-PHASE.json with the machine, the versions and the date, after each of
its parts, so that a phase cut short by the device's time limit keeps what it measured.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

from flow import phase_times

# Name in the table: text of the log line that marks it. The phase timeline of `raybooth train`.
TIMELINE = {"Ray up": "started Ray", "data ready": "read ", "workers up": "up; loading",
            "model loaded": "model loaded", "first step": "first step done", "last step": "training done",
            "saved": "saved"}
BATCH = 32  # pairs for target 4: the largest batch measured that fits an H100 with room (36 fits too)


def machine() -> dict:
    """Without touching CUDA: this process must hold no GPU context while the benches it starts run."""
    import diffusers
    import ray
    import torch

    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                         text=True, check=True).stdout.splitlines()[0]
    return {"gpu": gpu, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "ray": ray.__version__, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def json_lines(command: list[str]) -> list[dict]:
    """The JSON lines a bench script prints (its other output goes to stderr or is skipped)."""
    done = subprocess.run([sys.executable, *command], capture_output=True, text=True)
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def flow_phase(model: str, anchors: str, out: Path, save: Callable[[dict], None]) -> None:
    result: dict = {}
    subprocess.run([sys.executable, "bench/flow.py", model, anchors, str(out / "flow")], check=True)
    result["flow"] = json.loads((out / "flow" / "flow.json").read_text())
    save(result)
    first = json_lines(["bench/first_image.py", model, str(out / "first-image")])
    result["first_image"] = first[-1] if first else None
    save(result)


def mfu_phase(model: str, out: Path, save: Callable[[dict], None], crop_encode: bool = True) -> None:
    """crop_encode.py first (unless told not to: its rows decided a lever once and need no rerun
    for the targets): it is short, and it shows whether the 1+1 step gains from encoding its new
    crops beside the step."""
    result: dict = {"crop_encode": json_lines(["bench/studies/crop_encode.py", model]) if crop_encode else []}
    save(result)
    flags = ["--contiguous", "--bf16-weights", "--compile", "--eager", "--known-latents", "--cudnn-attention",
             "--steps=30"]
    step = json_lines(["bench/mfu.py", model, str(BATCH), *flags])
    result["step"] = step[-1] if step else None
    save(result)
    train = json_lines(["bench/startup.py", model, str(out / "train"), "--train_batch_size", str(BATCH),
                        "--num_epochs", "1000", "--compile"])
    result["train"] = train[-1] if train else None
    save(result)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x"


def target_rows(flow: dict, first_step: float | None, first: dict | None, big_step: dict | None,
                big_train: dict | None) -> list[tuple]:
    """(target, raybooth, anchor, met) per target; a target whose figures are missing (a phase that
    failed, ran out of memory or of time) reads "not measured" and is not met."""
    anchor_step = flow["anchor-step"][0]
    anchor_images = max(row["img_s"] for row in flow["anchor-generate"])
    train = flow["train_100"]

    def flow_time():
        return f"{flow['run']['wall_s']} s", "about 480 s (the issue)", flow["run"]["wall_s"] <= 160

    def fixed_cost():
        return (f"{train['fixed_cost_s']} s, first step at {first_step} s", "about 27 s (the issue)",
                train["fixed_cost_s"] <= 30 and first_step <= 20)

    def small_step():
        step_ms, peak_gib = 1000 / train["steps_per_s"], train["metrics"]["peak_gpu_memory_gib"]
        exact = next((row["exact_peak_gib"] for row in flow["anchor-step"] if "exact_peak_gib" in row), None)
        anchor_peak = f"{anchor_step['peak_gib']} GiB" + (f" ({exact:.3f} exactly)" if exact else "")
        return (f"{step_ms:.1f} ms through `raybooth train`, {peak_gib} GiB",
                f"{anchor_step['step_ms']} ms, {anchor_peak} ({ratio(anchor_step['step_ms'], step_ms)})",
                step_ms <= 100 and anchor_step["step_ms"] >= 2 * step_ms and peak_gib <= (exact or 15.6))

    def mfu():
        cli_mfu = big_train["steps_per_s"] * big_step["tflop_per_step"] / big_step["peak_tflops"]
        return (f"{cli_mfu:.1%} through `raybooth train --compile` ({big_train['steps_per_s']} steps/s); "
                f"{big_step['mfu']:.1%} for the compiled step alone, without a CUDA graph",
                "16% at 4+4 (the issue)", cli_mfu >= 0.40)

    def class_images():
        rate, first_s = first["images_per_s_after_first_16"], first["image_1_s"]
        return (f"{rate} images/s, first at {first_s} s", f"{anchor_images} images/s ({ratio(rate, anchor_images)})",
                rate >= 2 * anchor_images and first_s <= 15)

    rows = []
    for name, figures in (("1. the seed's flow (`raybooth run`) at most 160 s", flow_time),
                          ("2. fixed cost at most 30 s, first step within 20 s", fixed_cost),
                          ("3. step at 1+1 at most 100 ms, 2x the anchor, peak at most the anchor's", small_step),
                          (f"4. MFU at least 40% at {BATCH}+{BATCH}", mfu),
                          ("5. class images 2x the anchor's best, first within 15 s", class_images)):
        try:
            rows.append((name, *figures()))
        except (KeyError, TypeError, ZeroDivisionError):
            rows.append((name, "not measured (see the phase's logs)", "", False))
    return rows


def report(out: Path) -> str:
    flow_run = json.loads((out / "targets-flow.json").read_text())
    mfu_run = json.loads((out / "targets-mfu.json").read_text())
    train = flow_run["flow"]["train_100"]
    marks = phase_times(train["timeline"], TIMELINE)
    rows = target_rows(flow_run["flow"], marks["first step"], flow_run.get("first_image"), mfu_run.get("step"),
                       mfu_run.get("train"))
    peak = (mfu_run.get("step") or {}).get("peak_tflops")
    lines = [f"## Issue 5's targets in one session, {flow_run['machine']['date']} (`bench/targets.py`)", "",
             "Flow phase: {gpu}, torch {torch}, diffusers {diffusers}, Ray {ray}; ".format(**flow_run["machine"])
             + "MFU phase: {gpu}, {date}; ".format(**mfu_run["machine"])
             + (f"the MFU against a bf16 matmul peak of {peak} TFLOP/s measured in that phase." if peak
                else "its step alone was not measured."), "",
             "| target | raybooth | anchor | met? |", "|---|---|---|---|"]
    lines += [f"| {name} | {ours} | {anchor} | {'yes' if met else '**no**'} |" for name, ours, anchor, met in rows]
    lines += ["", "`raybooth train`, 100 steps at 1+1 (seconds from the command's start): "
              + ", ".join(f"{name} {t}" for name, t in marks.items() if t is not None) + ".", ""]
    rows = mfu_run.get("crop_encode") or []
    if rows:
        lines += ["`bench/studies/crop_encode.py` (MFU phase): "
                  + "; ".join(f"{row['what']} {row['ms_per_crop']} ms a crop" for row in rows if "ms_per_crop" in row)
                  + "; the 1+1 step with the new crops encoded "
                  + "; ".join(f"{row['variant']} {row['step_ms']} ms ({row['new_crops']} new, peak {row['peak_gib']} GiB)"
                              for row in rows if "variant" in row) + ".", ""]
    return "\n".join(lines)


def main(phase: str, *args: str) -> None:
    if phase == "report":
        section = report(Path(args[0]))
        if len(args) > 1:  # a dated run's own file (bench/runs/DATE-...md); RESULTS.md's standing links it
            Path(args[1]).write_text(section)
        print(section)
        return
    model, anchors, out, *options = args
    Path(out).mkdir(parents=True, exist_ok=True)
    written, stamp = Path(out) / f"targets-{phase}.json", machine()  # dated at the phase's start

    def save(result: dict) -> None:  # after each part, so that a phase cut short by the device's limit keeps the rest
        written.write_text(json.dumps({"machine": stamp, **result}, indent=1))

    if phase == "flow":
        flow_phase(model, anchors, Path(out), save)
    else:
        mfu_phase(model, Path(out), save, crop_encode="--no-crop-encode" not in options)


if __name__ == "__main__":
    main(*sys.argv[1:])
