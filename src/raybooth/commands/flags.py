"""docs/flags.md, the flags reference, written from the config dataclasses (the same fields the
command line is built from), so it cannot say other than `raybooth COMMAND --help`:

    python -m raybooth.commands.flags > docs/flags.md

tests/test_docs.py fails when the page and the fields drift apart."""

from __future__ import annotations

import sys
import typing

from raybooth.commands.arguments import command_line_fields, field_default, flag_names, has_negation, value_type
from raybooth.commands.cli import COMMANDS, CONFIG_FILE_COMMANDS
from raybooth.config import RUN_DERIVED_TRAIN_FIELDS, TrainConfig
from raybooth.config.yaml_file import CONFIG_FILE_HELP


def table(config: type, skip: tuple[str, ...] = ()) -> list[str]:
    hints = typing.get_type_hints(config)
    rows = ["| flag | default | what it does |", "|---|---|---|"]
    for field in command_line_fields(config, skip):
        if field.metadata.get("hidden"):
            continue
        required, default = field_default(field)
        spelled = " ".join(f"`{name}`" for name in flag_names(field.name))
        if field.metadata.get("choices"):
            spelled += " {" + ", ".join(map(str, field.metadata["choices"])) + "}"
        if has_negation(value_type(hints[field.name])[0], default):
            spelled += " / " + " ".join(f"`{name}`" for name in flag_names(f"no_{field.name}"))
        shown = "required" if required else "" if default is None else f"`{default}`"
        help_text = field.metadata.get("help", "").replace("|", "\\|")
        rows.append(f"| {spelled} | {shown} | {help_text} |")
    return rows


def flags_reference() -> str:
    lines = ["# Flags", "",
             "Generated from the config dataclasses by `python -m raybooth.commands.flags > docs/flags.md`; "
             "edit the fields' help in `src/raybooth/config/`, not this page. Every flag is also spelled with "
             "dashes (`--model-dir`). A boolean whose default is not off has a `--no_` negation.", ""]
    for name, (_, config, summary) in COMMANDS.items():
        lines += [f"## raybooth {name}", "", summary, ""]
        lines += table(config)
        if name in CONFIG_FILE_COMMANDS:
            lines += ["", f"`--config FILE`: {CONFIG_FILE_HELP}"]
        if name == "run":
            lines += ["", "`run` also takes `train`'s flags below, except those it works out itself "
                          f"({', '.join(f'`--{field}`' for field in RUN_DERIVED_TRAIN_FIELDS)})."]
        lines.append("")
    lines += ["## Training flags `run` passes on", ""] + table(TrainConfig, skip=tuple(RUN_DERIVED_TRAIN_FIELDS))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(flags_reference())
