import json
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from helpers import CLASS_PROMPT, INSTANCE_PROMPT, differs, train_args, weights, write_solid_images
from PIL import Image

from raybooth.commands.cli import main
from raybooth.config import TrainConfig
from raybooth.driver.plan import plan_class_images
from raybooth.files.names import image_name, image_seed


def test_train_on_two_workers_writes_a_pipeline_that_diffusers_loads(ray_cluster, tiny_model_dir, subject_dir, tmp_path,
                                                                    capsys):
    output, class_dir = tmp_path / "tuned", tmp_path / "class"
    # Two CPU workers (DDP over gloo) wherever the suite runs: a one-GPU machine has no second GPU.
    assert main(train_args(tiny_model_dir, output, subject_dir, class_dir, "--num_workers", "2", "--no_use_gpu",
                           "--train_batch_size", "2", "--num_epochs", "3", "--lr", "1e-4")) == 0
    assert "2 worker(s) on CPU\n" in capsys.readouterr().err  # in worker processes, not this one (local mode)

    # The workers topped the class folder up, two images each, with the model they then trained...
    assert sorted(p.name for p in class_dir.iterdir()) == [image_name(CLASS_PROMPT, i) for i in range(4)]
    # ... and made them as `raybooth generate` does: the same seed gives the same image.
    assert main(["generate", "--model_dir", str(tiny_model_dir), "--output_dir", str(tmp_path / "again"),
                 "--prompts", CLASS_PROMPT, "--num_samples_per_prompt", "2", "--num_inference_steps", "2",
                 "--no_use_gpu"]) == 0
    for index in range(2):
        name = image_name(CLASS_PROMPT, index)
        np.testing.assert_array_equal(np.asarray(Image.open(class_dir / name)), np.asarray(Image.open(tmp_path / "again" / name)))
    # 5 photos and 4 class images over 2 workers: 3 pairs each (the photos shared out), so two
    # batches of 2 per epoch (the second topped up), 3 epochs.
    log = json.loads((output / "training_log.json").read_text())
    assert [row["step"] for row in log["history"]] == [1, 2, 3, 4, 5, 6]
    assert log["world_size"] == 2 and log["config"]["instance_prompt"] == INSTANCE_PROMPT
    assert all(np.isfinite(row["loss"]) for row in log["history"])

    # UNet and text encoder were trained; the VAE is the base model's.
    for part in ("unet", "text_encoder"):
        assert differs(weights(output, part), weights(tiny_model_dir, part))
    assert not differs(weights(output, "vae"), weights(tiny_model_dir, "vae"))

    pipeline = StableDiffusionPipeline.from_pretrained(output)
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline(INSTANCE_PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    assert main(["generate", "--model_dir", str(output), "--output_dir", str(tmp_path / "samples"), "--prompts",
                 INSTANCE_PROMPT, "--num_samples_per_prompt", "2", "--num_inference_steps", "2"]) == 0
    assert len(list((tmp_path / "samples").glob("*.png"))) == 2


def test_output_with_a_model_is_kept_unless_overwrite(ray_cluster, tiny_model_dir, subject_dir, tmp_path, capsys):
    output, class_dir = tmp_path / "tuned", tmp_path / "class"
    shutil.copytree(tiny_model_dir, output)
    write_solid_images(class_dir, (0, 0, 200), 4)  # user-provided class images: nothing to generate
    args = train_args(tiny_model_dir, output, subject_dir, class_dir, "--max_train_steps", "2",
                      "--no_train_text_encoder")
    assert main(args) == 1
    assert "already holds a model; pass --overwrite" in capsys.readouterr().err
    assert not differs(weights(output, "unet"), weights(tiny_model_dir, "unet"))

    assert main(args + ["--overwrite"]) == 0
    assert differs(weights(output, "unet"), weights(tiny_model_dir, "unet"))
    assert not differs(weights(output, "text_encoder"), weights(tiny_model_dir, "text_encoder"))  # not trained
    assert sorted(p.name for p in class_dir.iterdir()) == [f"{i:03d}.png" for i in range(4)]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial folders
    assert not [p for p in (tmp_path / "ray-storage").rglob("*") if p.is_file()]  # nothing left in Ray's storage


def test_a_worker_that_cannot_see_the_output_hands_its_weights_over_as_a_checkpoint(
        ray_cluster, tiny_model_dir, subject_dir, tmp_path, monkeypatch, capsys):
    # Rank 0 writes straight into the output's partial folder only where it finds the driver's
    # token there (same node, or shared storage). A token of another name stands in for a worker
    # on another node: the weights then travel through Ray Train's storage.
    monkeypatch.setattr("raybooth.driver.training.OUTPUT_TOKEN", ".elsewhere")  # the driver's, not the workers'
    output, class_dir = tmp_path / "tuned", tmp_path / "class"
    write_solid_images(class_dir, (0, 0, 200), 4)
    assert main(train_args(tiny_model_dir, output, subject_dir, class_dir, "--max_train_steps", "3",
                           "--no_local_mode")) == 0  # a worker process: in local mode it is the driver
    log = capsys.readouterr().err
    assert "taking the weights from its Ray Train checkpoint" in log
    assert re.search(r"1 worker\(s\) on [CG]PU\n", log)  # not "in this process": local mode would be the default
    assert len(json.loads((output / "training_log.json").read_text())["history"]) == 3
    assert differs(weights(output, "unet"), weights(tiny_model_dir, "unet"))
    StableDiffusionPipeline.from_pretrained(output)
    assert sorted(p.name for p in output.iterdir() if p.name.startswith(".")) == []  # no token left behind
    assert not [p for p in (tmp_path / "ray-storage").rglob("*") if p.is_file()]  # the checkpoint was cleared


def test_an_output_that_cannot_be_written_is_found_before_ray(tiny_model_dir, subject_dir, tmp_path, capsys,
                                                             monkeypatch):
    monkeypatch.setattr("raybooth.driver.training.connect", lambda *_: pytest.fail("Ray was started"))
    (tmp_path / "a-file").write_text("")
    output = tmp_path / "a-file" / "tuned"
    assert main(train_args(tiny_model_dir, output, subject_dir, tmp_path / "class")) == 1
    assert re.search("--output_dir .*a-file/tuned cannot be written", capsys.readouterr().err)


def test_the_driver_checks_its_input_before_importing_torch(tiny_model_dir, subject_dir, tmp_path):
    # torch and Ray Train take the driver 3 s to import (more on a small machine): the checks and
    # plans before Ray starts do without them, so that bad input fails at once.
    args = train_args(tiny_model_dir, tmp_path / "out", subject_dir, tmp_path / "class")
    # (A good run's first heavy step: the models start loading, then Ray starts.)
    code = ("import os, sys\n"
            "import raybooth.driver.training\n"
            "def preload(*_):\n"
            "    os._exit(3 if 'torch' in sys.modules else 0)\n"
            "raybooth.driver.training.preload = preload\n"
            "from raybooth.commands.cli import main\n"
            f"main({args!r})\n"
            "os._exit(4)\n")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_a_loss_that_turns_non_finite_stops_training_and_writes_nothing(ray_cluster, tiny_model_dir, subject_dir,
                                                                         tmp_path, capsys):
    class_dir = write_solid_images(tmp_path / "class", (0, 0, 200), 4)[0].parent
    args = train_args(tiny_model_dir, tmp_path / "tuned", subject_dir, class_dir, "--lr", "1e30",
                      "--max_train_steps", "8")  # weights of 1e30 overflow at once
    assert main(args) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.match(r"raybooth: error: the loss became (nan|inf) at step [1-8]: training stopped and nothing was "
                    "written", error), error
    assert not (tmp_path / "tuned").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_ctrl_c_during_training_says_so_exits_130_and_leaves_nothing(tiny_model_dir, subject_dir, tmp_path):
    class_dir = write_solid_images(tmp_path / "class", (0, 0, 200), 4)[0].parent
    args = train_args(tiny_model_dir, tmp_path / "tuned", subject_dir, class_dir, "--max_train_steps", "100000",
                      "--num_epochs", "100000", "--no_use_gpu")
    # SIGINT as a terminal's Ctrl-C: a shell that started the suite in the background ignores it.
    run = subprocess.Popen([sys.executable, "-m", "raybooth", *args], stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    for line in run.stderr:  # wait until training is under way
        lines.append(line)
        if "first step done" in line:
            break
    run.send_signal(signal.SIGINT)
    after = run.stderr.readlines()  # Ray's forwarded worker lines may still trail ours
    assert run.wait(timeout=120) == 130, "".join(lines + after)
    assert "raybooth: interrupted\n" in after and not any("Traceback" in line for line in after), "".join(after)
    assert not (tmp_path / "tuned").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial output


def test_two_runs_at_once_each_start_their_own_ray_and_finish_cleanly(tiny_model_dir, subject_dir, tmp_path):
    runs = []
    for k in range(2):
        class_dir = write_solid_images(tmp_path / f"class{k}", (0, 0, 200), 4)[0].parent
        args = train_args(tiny_model_dir, tmp_path / f"tuned{k}", subject_dir, class_dir, "--max_train_steps", "4",
                          "--no_use_gpu")  # the same --storage_path for both
        runs.append(subprocess.Popen([sys.executable, "-m", "raybooth", *args], stderr=subprocess.PIPE, text=True))
    for k, run in enumerate(runs):
        output = run.communicate(timeout=300)[1]
        assert run.returncode == 0, output
        assert "Traceback" not in output and "multiple active Ray instances" not in output, output
        assert len(json.loads((tmp_path / f"tuned{k}" / "training_log.json").read_text())["history"]) == 4


def break_model(model_dir):
    shutil.rmtree(model_dir / "unet")


def corrupt_instance_image(instance_dir):
    (instance_dir / "003.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")


def add_text_file(folder):
    (folder / "readme.txt").write_text("not an image")


@pytest.mark.parametrize("damage, extra, message", [
    (lambda m, i, c: None, ["--instance_prompt", "a photo of unqtkn"], "does not name the class noun"),
    (lambda m, i, c: break_model(m), [], "missing its unet/ folder"),
    (lambda m, i, c: corrupt_instance_image(i), [], "003.png is not a readable image"),
    (lambda m, i, c: add_text_file(i), [], "holds files that are not images: readme.txt"),
    (lambda m, i, c: [p.unlink() for p in i.iterdir()], [], "instance images folder .* holds no images"),
    (lambda m, i, c: add_text_file(c), [], "class images folder .* not images: readme.txt"),
    (lambda m, i, c: None, ["--resolution", "60"], "must be a multiple of 8"),
    (lambda m, i, c: None, ["--gpus_per_worker", "2", "--no_use_gpu"], "needs GPUs"),
    (lambda m, i, c: None, ["--local_mode", "--max_failures", "1"], "does not go with --max_failures"),
    (lambda m, i, c: None, ["--num_class_images", "0"], "--num_class_images must be at least 1"),
    # Numbers that parse but would train a model of NaN weights, or crash in a worker.
    (lambda m, i, c: None, ["--lr", "inf"], "--lr must be a finite number, got inf"),
    (lambda m, i, c: None, ["--max_grad_norm", "nan"], "--max_grad_norm must be a finite number, got nan"),
    (lambda m, i, c: None, ["--resolution", "-64"], "--resolution must be at least 1, got -64"),
    (lambda m, i, c: None, ["--resolution", "0"], "--resolution must be at least 1, got 0"),
    (lambda m, i, c: None, ["--sample_prompts", "a dog", ""], "--sample_prompts: prompt 2 of 2 is empty"),
])
def test_bad_input_fails_with_one_line_before_ray_starts(model_copy, tmp_path, capsys, monkeypatch, damage, extra,
                                                         message):
    instance_dir, class_dir = tmp_path / "instance", tmp_path / "class"
    write_solid_images(instance_dir, (200, 0, 0), 4)
    class_dir.mkdir()
    damage(model_copy, instance_dir, class_dir)

    def no_ray(*_):
        raise AssertionError("Ray was started before the input was checked")

    monkeypatch.setattr("raybooth.driver.training.connect", no_ray)
    assert main(train_args(model_copy, tmp_path / "out", instance_dir, class_dir, *extra)) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("raybooth: error: ")
    assert re.search(message, error[0]), error[0]
    assert not (tmp_path / "out").exists()


def test_class_images_are_the_users_own_first_then_generated_for_this_prompt(tmp_path):
    folder = tmp_path / "class"
    own = write_solid_images(folder, (0, 0, 200), 2)
    for prompt, count in (("a photo of a toy car", 3), ("a photo of a toy truck", 1)):
        for index in range(count):
            write_solid_images(tmp_path / "tmp", (9, 9, 9), 1)[0].rename(folder / image_name(prompt, index))
    cfg = TrainConfig(model_dir=tmp_path, output_dir=tmp_path / "out", instance_images_dir=tmp_path,
                      instance_prompt="a photo of sks toy truck", class_images_dir=folder,
                      class_prompt="a photo of a toy truck", num_class_images=4)
    entries = plan_class_images(cfg)
    # The toy car images, made for an earlier class prompt, are not toy trucks: the one truck
    # image is kept, the other is to be made, with the seed `raybooth generate` would give it.
    truck = "a photo of a toy truck"
    assert entries == [{"path": str(path)} for path in own + [folder / image_name(truck, 0)]] + [
        {"prompt": truck, "seed": image_seed(0, truck, 1), "file": image_name(truck, 1)}]
    assert plan_class_images(replace(cfg, num_class_images=1)) == [{"path": str(own[0])}]
