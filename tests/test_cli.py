import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest
from diffusers import StableDiffusionPipeline

from raybooth.commands.cli import build_parser, config_from_args, main, run_settings
from raybooth.config import GenerateConfig, TrainConfig



def test_the_seed_scripts_commands_run_with_their_own_flags():
    # Ray's example, `python X.py` replaced by `raybooth <step>`, flags as its script writes them.
    args = build_parser().parse_args([
        "generate", "--model_dir=/tmp/model-orig/models--CompVis--stable-diffusion-v1-4/snapshots/249dd2d",
        "--output_dir=/tmp/images-reg", "--prompts=photo of a dog", "--num_samples_per_prompt=200",
        "--use_ray_data"])
    cfg = config_from_args(GenerateConfig, args)
    assert cfg.prompts == ["photo of a dog"] and cfg.num_samples_per_prompt == 200
    assert cfg.model_dir == Path("/tmp/model-orig/models--CompVis--stable-diffusion-v1-4/snapshots/249dd2d")

    args = build_parser().parse_args([
        "train", "--model_dir=/m", "--output_dir=/tmp/model-tuned", "--instance_images_dir=/tmp/images-own",
        "--instance_prompt=photo of unqtkn dog", "--class_images_dir=/tmp/images-reg",
        "--class_prompt=photo of a dog", "--train_batch_size=2", "--lr=5e-6", "--max_train_steps=800",
        "--num_workers", "2"])
    cfg = config_from_args(TrainConfig, args)
    assert (cfg.train_batch_size, cfg.lr, cfg.max_train_steps, cfg.num_workers) == (2, 5e-6, 800, 2)
    assert cfg.train_text_encoder and cfg.mixed_precision == "auto" and cfg.gpus_per_worker == 1

    args = build_parser().parse_args(["cache_model", "--model_dir=/tmp/model-orig",
                                      "--model_name=CompVis/stable-diffusion-v1-4", "--revision=249dd2d"])
    assert (args.command, args.model_name, args.revision) == ("cache-model", "CompVis/stable-diffusion-v1-4", "249dd2d")


def test_dashed_flags_and_negations():
    args = build_parser().parse_args([
        "train", "--model-dir", "m", "--output-dir", "o", "--instance-images-dir", "i", "--instance-prompt", "p",
        "--class-images-dir", "c", "--class-prompt", "q", "--no-train-text-encoder", "--mixed-precision", "bf16",
        "--gpus-per-worker", "2", "--use-gpu"])
    cfg = config_from_args(TrainConfig, args)
    assert cfg.train_text_encoder is False and cfg.mixed_precision == "bf16" and cfg.gpus_per_worker == 2
    assert cfg.use_gpu is True
    assert config_from_args(TrainConfig, build_parser().parse_args(
        ["train", "--model_dir", "m", "--output_dir", "o", "--instance_images_dir", "i", "--instance_prompt", "p",
         "--class_images_dir", "c", "--class_prompt", "q", "--no_use_gpu"])).use_gpu is False
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--model_dir", "m", "--mixed_precision", "fp8"])


def test_run_passes_on_only_the_training_flags_given():
    args = build_parser().parse_args(["run", "--lr", "1e-4", "--no_train_text_encoder", "--class_noun", "dog"])
    run, training = run_settings(args)
    assert training == {"lr": 1e-4, "train_text_encoder": False}
    assert run.class_noun == "dog" and run.uses_world_model and run.work_dir is None


def test_the_console_script_is_installed_and_errors_are_one_line(tmp_path):
    entry_points = importlib.metadata.entry_points(group="console_scripts")
    assert any(ep.name == "raybooth" and ep.value == "raybooth.commands.cli:run" for ep in entry_points)
    done = subprocess.run([sys.executable, "-m", "raybooth", "train", "--model_dir", str(tmp_path / "none"),
                           "--output_dir", str(tmp_path / "out"), "--instance_images_dir", str(tmp_path),
                           "--instance_prompt", "a photo of sks dog", "--class_images_dir", str(tmp_path / "c"),
                           "--class_prompt", "a photo of a dog"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip() == f"raybooth: error: model folder {tmp_path / 'none'} does not exist"


def test_the_command_ends_as_pythons_own_exit_would_begin(tmp_path):
    # `run` skips the interpreter's teardown, not what comes before it: threads that are not
    # daemons finish, the exit hooks run (Ray's shutdown), the output is flushed, the code is kept.
    code = ("import atexit, pathlib, sys, threading, time\n"
            "import raybooth.commands.cli as cli\n"
            f"folder = pathlib.Path({str(tmp_path)!r})\n"
            "def main():\n"
            "    threading.Thread(target=lambda: (time.sleep(0.5), (folder / 'thread').write_text('done'))).start()\n"
            "    atexit.register(lambda: (folder / 'hook').write_text('ran'))\n"
            "    sys.stdout.write('buffered, no newline')\n"
            "    return 3\n"
            "cli.main = main\n"
            "cli.run()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3 and done.stdout == "buffered, no newline"
    assert (tmp_path / "thread").read_text() == "done" and (tmp_path / "hook").read_text() == "ran"


def test_tiny_model_command_writes_a_loadable_pipeline_once(tmp_path, capsys):
    assert main(["tiny-model", "--output_dir", str(tmp_path / "tiny")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "tiny")
    StableDiffusionPipeline.from_pretrained(tmp_path / "tiny")
    assert main(["tiny_model", "--output_dir", str(tmp_path / "tiny")]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["tiny-model", "--output_dir", str(tmp_path / "tiny"), "--overwrite", "--seed", "1"]) == 0
