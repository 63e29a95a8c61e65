import json

import numpy as np
from diffusers import StableDiffusionPipeline
from PIL import Image

from raybooth.commands.cli import main
from raybooth.jobs.outcome import EVALUATION_FILE, GRID_FILE
from raybooth.files.images import image_files
from raybooth.files.names import image_name
from raybooth.models.prompts import sample_prompts

# The tiny random model, trained hard enough in about a minute of CPU time for the loss to fall
# (the demo on the world model, which learns the subject, is tests/test_demo.py).
TINY_TRAINING = ["--num_class_images", "16", "--num_epochs", "6", "--train_batch_size", "2", "--lr", "1e-3",
                 "--num_inference_steps", "20", "--report_every_n_steps", "8"]


def test_run_on_a_given_model_end_to_end(ray_cluster, tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    given = ["--model_dir", str(tiny_model_dir)]
    assert main(["run", *given, *TINY_TRAINING]) == 0
    work = tmp_path / "raybooth-run"
    assert capsys.readouterr().out.strip() == str(work)

    assert len(image_files(work / "images-own")) == 5  # the built-in checkerboard toy car
    assert len(image_files(work / "images-reg")) == 16  # class images, generated
    assert len(image_files(work / "images-new")) == 3 * 4  # samples: 3 prompts x 4
    StableDiffusionPipeline.from_pretrained(work / "model-tuned")
    history = json.loads((work / "model-tuned" / "training_log.json").read_text())["history"]
    first, last = (sum(r["loss"] for r in rows) / len(rows) for rows in (history[:8], history[-8:]))
    assert last < 0.7 * first  # the training visibly learns
    # Another model than the world's: the before-and-after grid, but no measures (no --clip_model_dir).
    assert (work / GRID_FILE).is_file() and not (work / EVALUATION_FILE).exists()

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
    assert main(["run", *given, "--num_samples_per_prompt", "1"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    stamps = {p: p.stat().st_mtime_ns for p in image_files(work / "images-reg")}
    assert main(["run", *given, *TINY_TRAINING, "--overwrite", "--num_samples_per_prompt", "1",
                 "--max_train_steps", "2"]) == 0
    assert {p: p.stat().st_mtime_ns for p in image_files(work / "images-reg")} == stamps
    assert len(image_files(work / "images-new")) == 3  # the first run's samples are gone
    assert len(json.loads((work / "model-tuned" / "training_log.json").read_text())["history"]) == 2


def test_run_with_own_photos_needs_the_class_noun(tmp_path, subject_dir, capsys):
    assert main(["run", "--instance_images_dir", str(subject_dir), "--work_dir", str(tmp_path)]) == 1
    assert "--class_noun is required" in capsys.readouterr().err
