import json

import numpy as np
from diffusers import StableDiffusionPipeline
from PIL import Image

from raybooth.cli import main
from raybooth.generate import image_name
from raybooth.images import image_files
from raybooth.prompts import sample_prompts


def test_run_without_arguments_is_the_demo_end_to_end(ray_cluster, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run"]) == 0
    work = tmp_path / "raybooth-demo"
    assert capsys.readouterr().out.strip() == str(work)

    assert len(image_files(work / "images-own")) == 5  # the built-in toy car
    assert len(image_files(work / "images-reg")) == 16  # class images, generated
    assert len(image_files(work / "images-new")) == 3 * 4  # samples: 3 prompts x 4
    StableDiffusionPipeline.from_pretrained(work / "model-tuned")
    history = json.loads((work / "model-tuned" / "training_log.json").read_text())["history"]
    first, last = (sum(r["loss"] for r in rows) / len(rows) for rows in (history[:8], history[-8:]))
    assert last < 0.7 * first  # the demo's training visibly learns

    # The training worker sampled the tuned model while it was in memory; `raybooth generate` on
    # the saved model makes the same image for the same prompt and index (up to a rounding step
    # in a rare pixel: two processes' float kernels may differ in the last bit).
    prompt = sample_prompts("unqtkn", "toy car")[1]
    assert main(["generate", "--model_dir", str(work / "model-tuned"), "--output_dir", str(tmp_path / "again"),
                 "--prompts", prompt, "--num_inference_steps", "20"]) == 0
    name = image_name(prompt, 0)
    difference = np.abs(np.asarray(Image.open(work / "images-new" / name), np.int16)
                        - np.asarray(Image.open(tmp_path / "again" / name), np.int16))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.001

    # A second run refuses to replace the tuned model unless told to; with --overwrite it
    # retrains and re-samples, reusing the model and class images it already has.
    assert main(["run", "--num_samples_per_prompt", "1"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    stamps = {p: p.stat().st_mtime_ns for p in image_files(work / "images-reg")}
    assert main(["run", "--overwrite", "--num_samples_per_prompt", "1", "--max_train_steps", "2"]) == 0
    assert {p: p.stat().st_mtime_ns for p in image_files(work / "images-reg")} == stamps
    assert len(image_files(work / "images-new")) == 3  # the first run's samples are gone
    assert len(json.loads((work / "model-tuned" / "training_log.json").read_text())["history"]) == 2


def test_run_with_own_photos_needs_the_class_noun(tmp_path, subject_dir, capsys):
    assert main(["run", "--instance_images_dir", str(subject_dir), "--work_dir", str(tmp_path)]) == 1
    assert "--class_noun is required" in capsys.readouterr().err
