"""Every alert kind has a runbook with the five sections, and every `python -m pipeline …`
command a runbook quotes exists: its subcommand's `--help` succeeds and each option it names
is one the subcommand takes (``pipeline.cli.build_parser``)."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from pipeline.alerts import AlertKind, runbook_file

ROOT = Path(__file__).resolve().parents[2]
RUNBOOKS = ROOT / "docs" / "runbooks"
HEADINGS = ("## Symptom", "## Diagnose", "## Remediation", "## Roll back", "## Escalate")
COMMAND_RX = re.compile(r"`(python -m pipeline[^`]*)`")


def quoted_commands(text: str) -> list[str]:
    """Every `python -m pipeline …` inside backticks (inline code)."""
    return [m.group(1).strip() for m in COMMAND_RX.finditer(text)]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # noqa: SLF001 - argparse keeps its tree here
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            return dict(action.choices)
    return {}


def check_command(command: str) -> str | None:
    """None when the quoted command exists with the options it names; else what is wrong."""
    from pipeline.cli import build_parser

    words = shlex.split(command.replace("<", "'<").replace(">", ">'"))[3:]  # after -m pipeline
    parser, path = build_parser(), []
    while words and not words[0].startswith("-"):
        subs = _subparsers(parser)
        if not subs or words[0].startswith("<"):
            break  # a positional argument of the command itself, or a <placeholder>
        if words[0] not in subs:
            return f"{command!r}: no command {' '.join([*path, words[0]])!r}"
        path.append(words.pop(0))
        parser = subs[path[-1]]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            build_parser().parse_args([*path, "--help"])
    except SystemExit as exc:
        if exc.code != 0:
            return f"{command!r}: `{' '.join(path)} --help` exited {exc.code}: {out.getvalue()}"
    else:
        return f"{command!r}: --help did not exit"
    known = {s for a in parser._actions for s in a.option_strings}  # noqa: SLF001
    unknown = [
        w.split("=")[0] for w in words if w.startswith("--") and w.split("=")[0] not in known
    ]
    if unknown:
        return f"{command!r}: {' '.join(path)} has no option(s) {unknown}"
    return None


@pytest.mark.parametrize("kind", list(AlertKind), ids=str)
def test_every_kind_has_a_runbook_with_the_five_sections(kind):
    path = runbook_file(kind)
    assert path.exists(), f"alert kind {kind.value} has no runbook at {path}"
    text = path.read_text()
    missing = [h for h in HEADINGS if h not in text]
    assert not missing, f"{path.name} lacks {missing}"
    assert quoted_commands(text), f"{path.name} quotes no `python -m pipeline …` command"
    assert path.name in (RUNBOOKS / "README.md").read_text(), f"{path.name} not in the index"


def test_every_quoted_command_exists():
    problems, seen = [], set()
    for path in sorted(RUNBOOKS.glob("*.md")):
        for command in quoted_commands(path.read_text()):
            if command not in seen:
                seen.add(command)
                if (err := check_command(command)) is not None:
                    problems.append(f"{path.name}: {err}")
    assert len(seen) > 20
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "command",
    [
        "python -m pipeline nosuch --model card_fraud",
        "python -m pipeline checkpoint explode <uri>",
        "python -m pipeline rollback --model card_fraud --no-such-flag x",
    ],
)
def test_the_check_fails_on_a_command_that_does_not_exist(command):
    assert check_command(command) is not None


def test_the_check_passes_real_commands_with_placeholders():
    for command in (
        "python -m pipeline alerts --model <model>",
        "python -m pipeline checkpoint verify <checkpoint uri>",
        'python -m pipeline rollback --model <model> --reason "bad data"',
    ):
        assert check_command(command) is None, command
