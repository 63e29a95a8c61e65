"""The documentation says what the code does: the flags reference is the one the config writes,
every flag the command line takes is in it, and every link in the README and docs/ leads
somewhere."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from raybooth.commands.cli import COMMANDS, build_parser
from raybooth.commands.flags import flags_reference

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md",
         ROOT / "bench" / "RESULTS.md", ROOT / "tests" / "README.md"]


def test_the_flags_page_is_the_one_the_config_writes():
    assert (ROOT / "docs" / "flags.md").read_text() == flags_reference(), \
        "docs/flags.md drifted: python -m raybooth.commands.flags > docs/flags.md"


def documented_flags() -> dict[str, set[str]]:
    """The flags each command's section of docs/flags.md names (run's own, and train's it passes on)."""
    flags: dict[str, set[str]] = {}
    command = None
    for line in (ROOT / "docs" / "flags.md").read_text().splitlines():
        heading = re.match(r"## raybooth ([a-z-]+)$", line)
        if heading or line.startswith("## Training flags `run` passes on"):
            command = flags.setdefault(heading.group(1) if heading else "run", set())
        elif command is not None and line.startswith("| `--"):
            command.update(re.findall(r"`--([a-z0-9_-]+)`", line.split("|")[1]))
    return flags


def test_every_flag_of_every_command_is_in_its_section_of_the_flags_page():
    documented = documented_flags()
    commands = next(action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction))
    for name in COMMANDS:
        flags = {flag[2:] for action in commands.choices[name]._actions if action.help != argparse.SUPPRESS
                 for flag in action.option_strings if flag.startswith("--") and flag not in ("--help", "--config")}
        assert flags == documented[name], f"raybooth {name}: docs/flags.md and the command line differ"


def test_every_relative_link_leads_to_a_file():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_the_readme_is_short_enough_to_start_from():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
