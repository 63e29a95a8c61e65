"""`--config FILE`, and the training options' flags on the command line."""

import argparse

import pytest

from raybooth.commands.cli import build_parser, config_from_args, main, parse_arguments, run_settings
from raybooth.config import TrainConfig
from raybooth.errors import RayboothError

REQUIRED = ["--model_dir", "m", "--output_dir", "o", "--instance_images_dir", "i", "--instance_prompt", "p",
            "--class_images_dir", "c", "--class_prompt", "q"]
NEW_FLAGS = ["lr_scheduler", "lr_warmup_steps", "lr_num_cycles", "lr_power", "scale_lr",
             "gradient_accumulation_steps", "gradient_checkpointing", "use_8bit_adam", "adam_beta1", "adam_beta2",
             "adam_weight_decay", "adam_epsilon", "center_crop", "random_flip", "offset_noise", "snr_gamma",
             "text_encoder_lr", "train_text_encoder_steps", "pre_compute_text_embeddings", "tokenizer_max_length",
             "use_ema", "config"]


def train_config(*argv: str) -> TrainConfig:
    return config_from_args(TrainConfig, parse_arguments(["train", *argv]))


def test_every_training_option_is_a_flag_shown_in_help_and_defaults_keep_the_old_behaviour(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    shown = capsys.readouterr().out
    assert all(f"--{flag}" in shown for flag in NEW_FLAGS)
    cfg = train_config(*REQUIRED)
    assert (cfg.lr_scheduler, cfg.gradient_accumulation_steps, cfg.center_crop, cfg.random_flip) == ("constant", 1,
                                                                                                     False, False)
    cfg = train_config(*REQUIRED, "--lr-scheduler", "cosine", "--lr_warmup_steps", "50", "--scale_lr",
                       "--gradient_accumulation_steps", "4", "--snr_gamma", "5", "--adam_beta2", "0.99", "--use_ema",
                       "--text_encoder_lr", "1e-6", "--train_text_encoder_steps", "200", "--tokenizer_max_length", "40")
    assert (cfg.lr_scheduler, cfg.lr_warmup_steps, cfg.scale_lr, cfg.gradient_accumulation_steps) == ("cosine", 50,
                                                                                                      True, 4)
    assert (cfg.snr_gamma, cfg.adam_beta2, cfg.use_ema, cfg.text_encoder_lr) == (5.0, 0.99, True, 1e-6)
    assert (cfg.train_text_encoder_steps, cfg.tokenizer_max_length) == (200, 40)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", *REQUIRED, "--lr_scheduler", "exponential"])


@pytest.mark.parametrize("flags, message", [
    (["--pre_compute_text_embeddings"], "needs a frozen text encoder"),
    (["--no_train_text_encoder", "--text_encoder_lr", "1e-6"], "need a trained text encoder"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be at least 1"),
    (["--snr_gamma", "0"], "--snr_gamma must be positive"),
    (["--adam_beta1", "1.0"], r"--adam_beta1 and --adam_beta2 must be in \[0, 1\)"),
])
def test_option_combinations_that_cannot_work_are_refused(flags, message):
    with pytest.raises(RayboothError, match=message):
        train_config(*REQUIRED, *flags).validate()


def test_a_yaml_value_is_used_and_a_flag_beats_it(tmp_path):
    path = tmp_path / "options.yaml"
    path.write_text("lr: 1e-4\nlr_scheduler: cosine\nrandom_flip: true\nmodel_dir: /models/sd\n"
                    "sample_prompts: [a unqtkn dog on the beach]\ngradient-accumulation-steps: 2\n")
    cfg = train_config("--config", str(path), *REQUIRED[2:], "--lr_scheduler", "linear")
    assert (cfg.lr, cfg.lr_scheduler, cfg.random_flip, str(cfg.model_dir)) == (1e-4, "linear", True, "/models/sd")
    assert cfg.sample_prompts == ["a unqtkn dog on the beach"] and cfg.gradient_accumulation_steps == 2
    # `raybooth run` takes the file too: its values count as given, as flags do.
    run, training = run_settings(parse_arguments(["run", "--config", str(path), "--lr", "1e-3"]))
    assert training["lr"] == 1e-3 and training["lr_scheduler"] == "cosine" and str(run.model_dir) == "/models/sd"


@pytest.mark.parametrize("text, message", [
    ("lr_schedular: cosine\n", "'lr_schedular' is not an option of `raybooth train`"),
    ("lr_scheduler: exponential\n", "lr_scheduler must be one of constant,"),
    ("num_epochs: 2.5\n", "num_epochs must be a whole number, got 2.5"),
    ("use_ema: 1\n", "use_ema must be true or false"),
    ("- lr\n", "must hold a mapping of option names to values"),
])
def test_a_yaml_key_that_is_no_option_or_a_bad_value_is_one_clear_error(tmp_path, capsys, text, message):
    path = tmp_path / "options.yaml"
    path.write_text(text)
    assert main(["train", "--config", str(path), *REQUIRED]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"raybooth: error: --config {path}") and message in err and err.count("\n") == 1


def test_config_is_offered_by_train_and_run_only():
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {name for name, parser in commands.items()
            if any("--config" in action.option_strings for action in parser._actions)} == {"train", "run"}
