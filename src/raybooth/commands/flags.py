"""docs/flags.md, the flags reference, written from the config dataclasses (the same fields the
command line is built from), so it cannot say other than `raybooth COMMAND --help`:

    python -m raybooth.commands.flags > docs/flags.md

tests/test_docs.py fails when the page and the fields drift apart."""

from __future__ import annotations

import dataclasses
import sys

from raybooth.commands.cli import COMMANDS, CONFIG_FILE_COMMANDS, flag_names
from raybooth.config import RUN_DERIVED_TRAIN_FIELDS, TrainConfig
from raybooth.config.yaml_file import CONFIG_FILE_HELP


def default_text(field: dataclasses.Field) -> str:
    if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
        return "required"
    value = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    return "" if value is None else f"`{value}`"


def flag_text(field: dataclasses.Field) -> str:
    spelled = " ".join(f"`{name}`" for name in flag_names(field.name))
    if field.metadata.get("choices"):
        spelled += " {" + ", ".join(map(str, field.metadata["choices"])) + "}"
    if field.type in ("bool", "bool | None") and field.default is not False:
        spelled += " / " + " ".join(f"`{name}`" for name in flag_names(f"no_{field.name}"))
    return spelled


def table(config: type, skip: tuple[str, ...] = ()) -> list[str]:
    rows = ["| flag | default | what it does |", "|---|---|---|"]
    for field in sorted(dataclasses.fields(config), key=lambda f: f.kw_only):  # as the command line orders them
        if field.name in skip or field.metadata.get("hidden"):
            continue
        help_text = field.metadata.get("help", "").replace("|", "\\|")
        rows.append(f"| {flag_text(field)} | {default_text(field)} | {help_text} |")
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
