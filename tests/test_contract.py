"""The public surface survives refactors: `rankcut.__all__` and the `--help` of every command
are compared with `tests/contract/cli_before.json`, taken with `tests/contract/snapshot_cli.py`
before the package moved to its folder layout. Names, commands and options may be added, never
lost; an option's help may say more."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import rankcut
from rankcut.cli import build_parser

BEFORE = json.loads((Path(__file__).parent / "contract" / "cli_before.json").read_text())
# module paths a help text points to, moved with the package's folder layout: the only
# difference a command's help may have from before
MOVED = {"rankcut.space": "rankcut.study.space"}


def _moved(text: str) -> str:
    for old, new in MOVED.items():
        text = text.replace(f"(see {old})", f"(see {new})")
    return text


def _helps(monkeypatch) -> dict[str, str]:
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps help to the terminal's width
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return {"rankcut": parser.format_help(), **{name: p.format_help() for name, p in sub.choices.items()}}


def test_every_public_name_is_still_there():
    missing = set(BEFORE["public_names"]) - set(rankcut.__all__)
    assert not missing
    for name in rankcut.__all__:
        assert hasattr(rankcut, name), name


@pytest.mark.parametrize("command", sorted(BEFORE["help"]))
def test_every_command_keeps_its_options(command, monkeypatch):
    now = _helps(monkeypatch)[command]
    before = _moved(BEFORE["help"][command])
    assert set(re.findall(r"--[a-z0-9][a-z0-9-]*", before)) <= set(re.findall(r"--[a-z0-9][a-z0-9-]*", now))


def test_every_command_is_still_there(monkeypatch):
    now = _helps(monkeypatch)
    assert set(BEFORE["help"]) <= set(now)
