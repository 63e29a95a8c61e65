"""`--config FILE` for `train` and `run`: a YAML mapping of option names (as the flags spell them,
without the dashes) to values. They become the command's defaults, so a flag on the command line
beats them; each is checked as its flag would be, and a name that is no option is an error."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from raybooth.errors import RayboothError

CONFIG_FILE_HELP = ("YAML file of options for this command (e.g. `lr_scheduler: cosine`); flags given on the "
                    "command line beat it.")


def read_yaml(path: Path, where: str) -> Any:
    """What the YAML file at `path` holds; `where` names it in the one-line errors."""
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text())
    except OSError as error:
        raise RayboothError(f"{where} cannot be read: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        raise RayboothError(f"{where} is not valid YAML ({str(error).splitlines()[0]})") from None


def read_config_file(path: Path) -> dict[str, Any]:
    values = read_yaml(path, f"--config {path}")
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise RayboothError(f"--config {path} must hold a mapping of option names to values")
    return {str(name).replace("-", "_"): value for name, value in values.items()}


def apply_config_file(parser: argparse.ArgumentParser, path: Path, command: str) -> None:
    """Make the file's values `parser`'s defaults; options it supplies are no longer required."""
    apply_values(parser, read_config_file(path), f"--config {path}", command)


def apply_values(parser: argparse.ArgumentParser, values: dict[str, Any], where: str, command: str) -> None:
    """Make `values` (option names to values) `parser`'s defaults, each checked as its flag would be;
    options they supply are no longer required."""
    actions = {action.dest: action for action in parser._actions
               if action.option_strings and action.dest not in ("help", "config")}
    defaults = {}
    for name, value in values.items():
        if name not in actions:
            raise RayboothError(f"{where}: {name!r} is not an option of `raybooth {command}`")
        defaults[name] = _checked(actions[name], value, f"{where}: {name}")
    parser.set_defaults(**defaults)
    for name in defaults:
        actions[name].required = False


def _checked(action: argparse.Action, value: Any, where: str) -> Any:
    """`value` as the flag's parsing would give it; strings go through the flag's type, so that
    `lr: 1e-4` (a string to YAML) is the float it is on the command line."""
    if action.nargs == 0:  # --flag / --no_flag
        if not isinstance(value, bool):
            raise RayboothError(f"{where} must be true or false, got {value!r}")
        return value
    if value is None and action.default is None:
        return None
    if action.nargs in ("+", "*"):
        items = value if isinstance(value, list) else [value]
        return [_scalar(action, item, where) for item in items]
    return _scalar(action, value, where)


def _scalar(action: argparse.Action, value: Any, where: str) -> Any:
    kind = action.type or str
    if isinstance(value, str):
        try:
            value = kind(value)
        except (TypeError, ValueError):
            raise RayboothError(f"{where} must be {_kind_name(kind)}, got {value!r}") from None
    elif isinstance(value, bool) or not (isinstance(value, int) and kind in (int, float)
                                          or isinstance(value, float) and kind is float):
        raise RayboothError(f"{where} must be {_kind_name(kind)}, got {value!r}")
    value = kind(value)
    if action.choices is not None and value not in action.choices:
        raise RayboothError(f"{where} must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    return value


def _kind_name(kind: type) -> str:
    return {int: "a whole number", float: "a number", str: "text"}.get(kind, f"a {kind.__name__}")
