"""The documentation says what the code does: the flags reference is the one the config writes,
every flag the command line takes is in it, and every link in the README and docs/ leads
somewhere."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from raybooth.commands.cli import build_parser
from raybooth.commands.flags import flags_reference

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md",
         ROOT / "bench" / "RESULTS.md", ROOT / "tests" / "README.md"]


def test_the_flags_page_is_the_one_the_config_writes():
    assert (ROOT / "docs" / "flags.md").read_text() == flags_reference(), \
        "docs/flags.md drifted: python -m raybooth.commands.flags > docs/flags.md"


def test_every_flag_of_every_command_is_in_the_flags_page():
    page = (ROOT / "docs" / "flags.md").read_text()
    commands = next(action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction))
    missing = [f"{name} {flag}" for name, parser in commands.choices.items() for action in parser._actions
               for flag in action.option_strings
               if flag.startswith("--") and flag not in ("--help", "--config") and action.help != argparse.SUPPRESS
               and f"`{flag}`" not in page]
    assert not missing, missing


def test_every_relative_link_leads_to_a_file():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_the_readme_is_short_enough_to_start_from():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
