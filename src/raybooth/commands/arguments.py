"""The command line's flags, built from the config dataclasses' fields: `--model_dir`, as in Ray's
example scripts, and `--model-dir` alike; booleans take `--flag` / `--no_flag`. `raybooth run`'s
parser is here too: `raybooth batch` reads each subject's settings with it."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Sequence

from raybooth.config import RUN_DERIVED_TRAIN_FIELDS, RunConfig, TrainConfig
from raybooth.config.yaml_file import apply_values


def flag_names(name: str) -> list[str]:
    return [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])


def add_config_arguments(parser: argparse.ArgumentParser, config: type, skip: Sequence[str] = (),
                         only_given: bool = False) -> None:
    """One flag per field of the dataclass `config`. With `only_given`, flags left out stay out
    of the parsed namespace, so a caller can tell a default from a choice."""
    hints = typing.get_type_hints(config)
    for field in command_line_fields(config, skip):
        meta = dict(field.metadata)
        hidden = meta.pop("hidden", False)
        required, default = field_default(field)
        help_text = meta.pop("help", "")
        if not required and default is not None and not isinstance(default, bool):
            help_text += f" (default: {default})"
        kind, is_list = value_type(hints[field.name])
        common = dict(dest=field.name, default=argparse.SUPPRESS if only_given else default)
        if kind is bool:
            shown = argparse.SUPPRESS if hidden else help_text
            negative_help = argparse.SUPPRESS if hidden else f"Negation of --{field.name}."
            parser.add_argument(*flag_names(field.name), action="store_true", help=shown, **common)
            if has_negation(kind, default):
                parser.add_argument(*flag_names(f"no_{field.name}"), action="store_false", help=negative_help,
                                    **common)
            continue
        parser.add_argument(*flag_names(field.name), type=kind, required=required and not only_given,
                            nargs=meta.pop("nargs", "+" if is_list else None),
                            metavar=None if "choices" in meta else field.name.upper(),
                            help=argparse.SUPPRESS if hidden else help_text, **common, **meta)


def command_line_fields(config: type, skip: Sequence[str] = ()) -> list[dataclasses.Field]:
    """The fields of `config` that are flags, in their command-line order: a config's own fields
    first, then those of its keyword-only option groups (base classes)."""
    return [field for field in sorted(dataclasses.fields(config), key=lambda f: f.kw_only) if field.name not in skip]


def field_default(field: dataclasses.Field) -> tuple[bool, Any]:
    """(whether the flag is required, its default: None where required)."""
    required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
    return required, None if required else (field.default if field.default is not dataclasses.MISSING
                                            else field.default_factory())


def has_negation(kind: type, default: Any) -> bool:
    """A boolean flag gets `--no_flag` unless it is off by default: `--no_overwrite` would say
    nothing that leaving it out does not."""
    return kind is bool and default is not False


def value_type(hint: Any) -> tuple[type, bool]:
    """(the type of one value, whether the field is a list) for `int | None`, `list[str]`, ..."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    return hint, False


def config_from_args(config: type, args: argparse.Namespace, skip: Sequence[str] = ()) -> Any:
    return config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config)
                     if f.name not in skip and hasattr(args, f.name)})


def run_settings(args: argparse.Namespace) -> tuple[RunConfig, dict[str, Any]]:
    """`run`'s own settings, and the training settings the user gave (only those)."""
    training = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                if f.name not in RUN_DERIVED_TRAIN_FIELDS and hasattr(args, f.name)}
    return config_from_args(RunConfig, args), training


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """`raybooth run`'s flags: its own, then the training flags it passes on (only those given)."""
    add_config_arguments(parser, RunConfig)
    group = parser.add_argument_group("training (as for `raybooth train`)")
    add_config_arguments(group, TrainConfig, skip=RUN_DERIVED_TRAIN_FIELDS, only_given=True)


def run_settings_from(values: dict[str, Any], where: str) -> tuple[RunConfig, dict[str, Any]]:
    """`raybooth run`'s settings from a mapping of its option names, each checked as its flag is
    (as a --config file's are): a subject of `raybooth batch`."""
    parser = argparse.ArgumentParser(prog="raybooth run", add_help=False)
    add_run_arguments(parser)
    apply_values(parser, values, where, "run")
    return run_settings(parser.parse_args([]))  # every `run` option has a default
