"""``python -m pipeline`` logging: the run key on every line, progress lines only on a TTY."""

from __future__ import annotations

import io
import json
import logging

import pytest

from pipeline.cli import build_parser, setup_logging


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def restore_root():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _emit(stream, argv):
    args = build_parser().parse_args(argv)
    setup_logging(args, stream)
    log = logging.getLogger("pipeline.train.loop")
    log.info("epoch 1/3 rows/s=100 eta=2s", extra={"progress": True})
    log.info("epoch 2/3 rows/s=100 eta=1s", extra={"progress": True})
    logging.getLogger("pipeline.stages").info("train_model: trained")
    return stream.getvalue()


def test_every_line_names_the_run_and_progress_is_plain_off_a_tty(restore_root):
    out = _emit(
        io.StringIO(),
        ["train", "--dag-id", "retrain_model", "--run-id", "manual__2026-01-01T00:00:00+00:00"],
    )
    lines = out.splitlines()
    assert len(lines) == 3 and "\r" not in out
    assert all("run=retrain_model__manual__2026-01-01T00_00_00_00_00 " in line for line in lines)


def test_progress_rewrites_one_line_on_a_tty(restore_root):
    out = _emit(Tty(), ["train", "--run-id", "r1"])
    status, last, end = out.split("\n")  # the status line is closed once, before the plain line
    assert status.count("\r\x1b[K") == 2 and status.rsplit("\r\x1b[K", 1)[1].endswith("eta=1s")
    assert last.endswith("pipeline.stages: train_model: trained") and end == ""


def test_json_lines_when_asked(restore_root, monkeypatch):
    monkeypatch.setenv("PIPELINE_LOG_FORMAT", "json")
    out = _emit(io.StringIO(), ["ingest", "--batch", "x", "--run-id", "r2"])
    recs = [json.loads(line) for line in out.splitlines()]
    assert {r["run_key"] for r in recs} == {"cli__r2"}
    assert recs[-1]["logger"] == "pipeline.stages" and recs[-1]["level"] == "INFO"


def test_commands_outside_a_run_say_so(restore_root):
    out = _emit(io.StringIO(), ["checkpoint", "verify", "/nowhere"])
    assert all(" run=- " in line for line in out.splitlines())
