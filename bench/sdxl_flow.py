"""Issue 30's SDXL figures through raybooth's own commands, beside the anchors of
bench/sdxl_anchor.py (diffusers' SDXL LoRA script's step and its pipeline), each phase a
separate command so that a device call runs what its time allows; each writes OUT/sdxl-PHASE.json.
MODEL_DIR from bench/sdxl.py (SDXL-sized random weights), 1024 px, 4 photos, batch 1+1, bf16.

    python bench/sdxl_flow.py PHASE MODEL_DIR OUT_DIR
      anchor-step       the script's LoRA step (rank 4, text encoders frozen): ms, peak GiB
      anchor-generate   the script's class images: StableDiffusionXLPipeline, Euler, 50 steps, batch 4
      lora              raybooth train --use_lora (its defaults for SDXL's script: text encoders frozen), 60 steps
      lora-low-memory   the same with --gradient_checkpointing --use_8bit_adam
      full              full fine-tuning of the UNet, fp32 masters, 1+1 (text encoders frozen)
      generate          raybooth generate, 16 images with the model's own sampler, 50 steps, guidance 5
      flow              target 5: raybooth run --use_lora (200 class images, 500 steps, 20 samples), beside
                        the anchor flow reckoned from OUT's anchor phases: its 200 class images and 20
                        samples at the pipeline's images/s, 500 steps at the anchor step's time (its load
                        and save left out, so the anchor's figure is a lower bound)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from flow import photos, run, steady_steps_per_s, timeline

WORK = Path("/tmp/raybooth-sdxl")
CLASS_IMAGES = 8  # the step's figures need few: they are made once, then training runs alone
STEPS = 60


def train(model_dir: str, out: Path, name: str, *flags: str) -> dict:
    subject = WORK / "photos"
    if not subject.is_dir():
        photos(subject)
    output = WORK / name
    result = run(name, [sys.executable, "-m", "raybooth", "train", "--model_dir", model_dir, "--output_dir",
                        str(output), "--overwrite", "--instance_images_dir", str(subject), "--instance_prompt",
                        "a photo of unqtkn dog", "--class_images_dir", str(WORK / "class"), "--class_prompt",
                        "a photo of a dog", "--num_class_images", str(CLASS_IMAGES), "--max_train_steps", str(STEPS),
                        "--num_epochs", "1000", "--no_train_text_encoder", "--report_every_n_steps", "10",
                        *flags], out)
    metrics = output / "metrics.json"
    return {"wall_s": result["wall_s"], "exit": result["exit"], "steps_per_s": steady_steps_per_s(result["log"]),
            "timeline": timeline(result["log"]), "metrics": json.loads(metrics.read_text()) if metrics.is_file() else None}


def flow(model_dir: str, out: Path) -> dict:
    subject = WORK / "photos"
    if not subject.is_dir():
        photos(subject)
    prompts = [f"a photo of unqtkn dog {scene}".strip() for scene in ("", "on the beach", "in the snow", "at night",
                                                                      "in a city")]
    result = run("flow", [sys.executable, "-m", "raybooth", "run", "--model_dir", model_dir, "--work_dir",
                          str(WORK / "flow"), "--overwrite", "--instance_images_dir", str(subject), "--class_noun", "dog",
                          "--use_lora", "--max_train_steps", "500", "--num_epochs", "1000", "--num_class_images", "200",
                          "--num_samples_per_prompt", "4", "--sample_prompts", *prompts], out)
    report = {"wall_s": result["wall_s"], "exit": result["exit"], "timeline": timeline(result["log"])}
    try:
        step = json.loads((out / "sdxl-anchor-step.json").read_text())["rows"][0]["step_ms"] / 1000
        rate = json.loads((out / "sdxl-anchor-generate.json").read_text())["rows"][0]["images_per_s"]
    except (OSError, KeyError, IndexError):
        return report  # the anchor phases not run in OUT: raybooth's time alone
    report["anchor_flow_s"] = round((200 + 20) / rate + 500 * step, 1)
    report["ratio"] = round(report["anchor_flow_s"] / result["wall_s"], 2)
    return report


def main(phase: str, model_dir: str, out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if phase in ("anchor-step", "anchor-generate"):
        result = run(phase, [sys.executable, str(Path(__file__).with_name("sdxl_anchor.py")), phase.split("-")[1],
                             model_dir], out)
        report = {"exit": result["exit"], "rows": [json.loads(line) for line in result["log"].splitlines()
                                                   if line.startswith("{")]}
    elif phase == "lora":
        report = train(model_dir, out, phase, "--use_lora")
    elif phase == "lora-low-memory":
        report = train(model_dir, out, phase, "--use_lora", "--gradient_checkpointing", "--use_8bit_adam")
    elif phase == "full":
        report = train(model_dir, out, phase)
    elif phase == "generate":
        result = run(phase, [sys.executable, "-m", "raybooth", "generate", "--model_dir", model_dir, "--output_dir",
                             str(WORK / "generated"), "--prompts", "a photo of a dog", "--num_samples_per_prompt",
                             "16", "--sampler", "model", "--num_inference_steps", "50", "--guidance_scale", "5"], out)
        report = {"wall_s": result["wall_s"], "exit": result["exit"], "timeline": timeline(result["log"])}
    elif phase == "flow":
        report = flow(model_dir, out)
    else:
        raise SystemExit(f"unknown phase {phase}")
    report["started"] = started
    (out / f"sdxl-{phase}.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "timeline"}, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:4])
