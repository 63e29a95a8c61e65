"""The manifest of `raybooth batch` and `raybooth sweep` (config/batch.py's MANIFEST_HELP says what
it holds): read, its structure checked, each subject's `raybooth run` options gathered. The options'
names and values are checked as `run`'s flags by the command (commands/batch.py), which owns them."""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from raybooth.config import RunConfig, TrainConfig
from raybooth.config.yaml_file import read_yaml
from raybooth.errors import RayboothError

SECTIONS = ("defaults", "subjects", "sweep")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a folder name on every filesystem
PLACED = ("work_dir",)  # the batch places each subject's folder itself


@dataclass
class Subject:
    """One subject's name (its folder) and its `raybooth run` options: the defaults, then its own."""

    name: str
    options: dict[str, Any]


@dataclass
class Manifest:
    subjects: list[Subject]
    sweep: dict[str, Any] | None
    where: str  # how errors name the file


def read_manifest(path: Path) -> Manifest:
    where = f"--manifest {path}"
    return manifest_from(read_yaml(path, where), Path(path).expanduser().absolute().parent, where)


def manifest_from(content: Any, folder: Path, where: str) -> Manifest:
    """The manifest held by `content` (what YAML gave), its relative paths read from `folder`."""
    if not isinstance(content, dict):
        raise RayboothError(f"{where} must hold a mapping with a `subjects` list")
    if unknown := sorted(set(map(str, content)) - set(SECTIONS)):
        raise RayboothError(f"{where}: unknown section {unknown[0]!r}; the sections are {', '.join(SECTIONS)}")
    defaults = mapping(content.get("defaults") or {}, f"{where}: defaults")
    entries = content.get("subjects")
    if not isinstance(entries, list) or not entries:
        raise RayboothError(f"{where} needs a `subjects` list of at least one subject")
    subjects, names = [], set()
    for number, entry in enumerate(entries, 1):
        entry = mapping(entry, f"{where}: subject {number}")
        name = str(entry.pop("name", "")).strip()
        if not NAME.match(name):
            raise RayboothError(f"{where}: subject {number} needs a `name` of letters, digits, '.', '_' or '-' "
                                f"(its folder), got {name!r}")
        if name in names:
            raise RayboothError(f"{where}: two subjects are named {name!r}")
        names.add(name)
        options = defaults | entry
        for key in PLACED:
            if key in options:
                raise RayboothError(f"{where}: subject {name!r}: {key} is set by the batch (OUTPUT_DIR/{name})")
        subjects.append(Subject(name, with_paths_from(options, folder)))
    sweep = content.get("sweep")
    return Manifest(subjects, None if sweep is None else mapping(sweep, f"{where}: sweep"), where)


def mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RayboothError(f"{where} must be a mapping of option names to values, got {value!r}")
    return {str(key).replace("-", "_"): item for key, item in value.items()}


def path_options() -> set[str]:
    """The options that name a file or folder: those typed Path."""
    names = set()
    for config in (RunConfig, TrainConfig):
        hints = typing.get_type_hints(config)
        names |= {f.name for f in fields(config) if Path in (hints[f.name], *typing.get_args(hints[f.name]))}
    return names


def with_paths_from(options: dict[str, Any], folder: Path) -> dict[str, Any]:
    """`options` with relative paths made absolute from the manifest's folder, as a user reads them."""
    paths = path_options()
    return {name: str(folder / Path(value).expanduser()) if name in paths and isinstance(value, str) else value
            for name, value in options.items()}
