"""The `raybooth` command: its subcommands, each with the flags of its config dataclass
(arguments.py), and how it ends: an error in one line, Ctrl-C and stop signals, a quick exit."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import signal
import sys
import threading
from pathlib import Path
from typing import NoReturn, Sequence

from raybooth import __version__
from raybooth.commands.arguments import add_config_arguments, add_run_arguments, config_from_args, run_settings
from raybooth.commands.batch import BATCH, SWEEP
from raybooth.commands.single_files import EXPORT, with_model_folder
from raybooth.config import (CacheConfig, GenerateConfig, MergeLoraConfig, RunConfig,
                             TinyModelConfig, TrainConfig)
from raybooth.config.evaluate import EvaluateConfig
from raybooth.config.yaml_file import CONFIG_FILE_HELP, apply_config_file
from raybooth.errors import RayboothError
from raybooth.terminal.raylog import restore_ray_output


def cache_model_command(args: argparse.Namespace) -> None:
    from raybooth.models.hub import cache_model

    cfg = config_from_args(CacheConfig, args)
    print(cache_model(cfg.model_name, cfg.revision, cfg.model_dir))


def tiny_model_command(args: argparse.Namespace) -> None:
    from raybooth.models.tiny import write_tiny_model

    cfg = config_from_args(TinyModelConfig, args)
    print(write_tiny_model(cfg.output_dir, cfg.seed, cfg.overwrite, cfg.family))


def generate_command(args: argparse.Namespace) -> None:
    from raybooth.driver.generation import generate

    cfg = config_from_args(GenerateConfig, args)
    generate(cfg)
    print(Path(cfg.output_dir).absolute())


def train_command(args: argparse.Namespace) -> None:
    from raybooth.driver.training import train

    print(train(config_from_args(TrainConfig, args)))


def merge_lora_command(args: argparse.Namespace) -> None:
    from raybooth.models.lora import merge_lora

    cfg = config_from_args(MergeLoraConfig, args)
    cfg.validate()
    print(merge_lora(cfg.model_dir, cfg.lora_weights_dir, cfg.output_dir, cfg.lora_scale, cfg.overwrite))


def run_command(args: argparse.Namespace) -> None:
    from raybooth.jobs.run import run

    print(run(*run_settings(args)))


def evaluate_command(args: argparse.Namespace) -> None:
    from raybooth.evaluate.measure import evaluate, report

    cfg = config_from_args(EvaluateConfig, args)
    print(report(evaluate(cfg)))
    print(Path(cfg.output_dir).absolute())


COMMANDS = {
    "cache-model": (cache_model_command, CacheConfig,
                    "Download a pretrained pipeline into a Hugging Face cache folder; print its snapshot path."),
    "tiny-model": (tiny_model_command, TinyModelConfig,
                   "Write a tiny Stable-Diffusion-architecture pipeline, built offline, for tests and demos."),
    "generate": (generate_command, GenerateConfig,
                 "Generate images for prompts with Ray Data; images already made are kept."),
    "train": (train_command, TrainConfig,
              "Fine-tune UNet and text encoder with DreamBooth's prior-preserving loss on Ray Train."),
    "run": (run_command, RunConfig,
            "Cache a model, generate class images, fine-tune and sample, in one go. "
            "Without arguments: the demo, on CPU, in a few minutes."),
    "merge-lora": (merge_lora_command, MergeLoraConfig,
                   "Fuse a LoRA adapter (from `train --use_lora`) into its base model; write a full pipeline."),
    "evaluate": (evaluate_command, EvaluateConfig,
                 "Sample a fine-tuned model and measure subject fidelity, prompt fidelity and prior preservation "
                 "(the small world's classifier, or the paper's DINO, CLIP-I and CLIP-T)."),
    "export": EXPORT,
    "batch": BATCH,
    "sweep": SWEEP,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raybooth", description="DreamBooth for Stable Diffusion on Ray.")
    parser.add_argument("--version", action="version", version=f"raybooth {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, config, summary) in COMMANDS.items():
        aliases = [name.replace("-", "_")] if "-" in name else []
        command = commands.add_parser(name, aliases=aliases, help=summary, description=summary)
        command.set_defaults(command=name)
        if name == "run":
            add_run_arguments(command)
        else:
            add_config_arguments(command, config)
        if name in CONFIG_FILE_COMMANDS:
            command.add_argument("--config", type=Path, metavar="FILE", help=CONFIG_FILE_HELP)
    return parser


CONFIG_FILE_COMMANDS = ("train", "run")


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, over the options of its --config file where `train` or `run` has one."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    config_file = argparse.ArgumentParser(add_help=False)
    config_file.add_argument("--config", type=Path)
    path = config_file.parse_known_args(argv)[0].config
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    name = next((arg for arg in argv if arg in commands), None)
    if path is not None and name in CONFIG_FILE_COMMANDS:
        apply_config_file(commands[name], path, name)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_arguments(argv)
    except RayboothError as error:  # a --config file that does not fit
        print(f"raybooth: error: {error}", file=sys.stderr)
        return 1
    from raybooth.driver.launch import stop_as_by_ctrl_c

    stops = stop_as_by_ctrl_c()
    try:
        COMMANDS[args.command][0](with_model_folder(args))
    except RayboothError as error:
        print(f"raybooth: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if stops["signal"] is None:
            print("raybooth: interrupted", file=sys.stderr)
            return 130
        with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone
            print(f"raybooth: stopped by {signal.Signals(stops['signal']).name}", file=sys.stderr)
        return 128 + stops["signal"]
    finally:
        for number, handler in stops["before"].items():
            signal.signal(number, handler)
        restore_ray_output()  # in a process that goes on (tests), the next command routes its own
    return 0


def run() -> NoReturn:
    """The `raybooth` command: `main()`, then a quick exit. Python's own exit would then take each
    module apart (torch, diffusers, Ray's core): 1.1 s on the 2-core CPU machine after the work is
    done and written (bench/RESULTS.md). What that exit does first is done here too: other threads
    finish, raybooth's writer threads too (daemons), the exit hooks run (Ray's shutdown among
    them), the output is flushed."""
    from raybooth.driver.launch import finish_writes

    code = main()
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    finish_writes()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
