"""The verdict line every benchmark ends with, and the table `make bench` prints from them."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks._table import render, verdict_line
from benchmarks._targets import finish, target


def test_a_target_is_met_only_by_a_measured_value_on_the_right_side():
    assert target("ratio", 1.02, "<=", 1.03)["met"]
    assert not target("ratio", 1.05, "<=", 1.03)["met"]
    assert not target("ratio", None, "<=", 1.03)["met"]  # nothing measured is a miss
    assert not target("ratio", math.nan, "<=", 1.03)["met"]
    with pytest.raises(ValueError, match="operator"):
        target("ratio", 1.0, "=<", 1.03)


def test_the_last_line_carries_every_target_and_whether_all_were_met():
    line = json.loads(finish({"bench": "x", "ratio": 1.05}, [target("ratio", 1.05, "<=", 1.03)]))
    assert line["targets"] == {"ratio": {"value": 1.05, "target": "<= 1.03", "met": False}}
    assert line["met"] is False
    with pytest.raises(ValueError):  # NaN is not JSON: a figure not measured is None
        finish({"bench": "x", "ratio": math.nan}, [])


def test_the_table_lists_each_target_and_says_which_benchmarks_did_not_run(tmp_path):
    (tmp_path / "fast.out").write_text(
        "warming up\n{not json\n"
        + finish({"bench": "fast"}, [target("p99_ratio", 0.4, "<=", 0.5)])
        + "\n"
    )
    (tmp_path / "fast.rc").write_text("0\n")
    (tmp_path / "slow.out").write_text(
        finish({"bench": "slow"}, [target("ratio", 1.2, "<=", 1.03)]) + "\n"
    )
    (tmp_path / "slow.rc").write_text("0\n")
    (tmp_path / "gpu.out").write_text(json.dumps({"bench": "gpu", "skipped": "no CUDA"}))
    (tmp_path / "gpu.rc").write_text("0")
    (tmp_path / "broken.out").write_text("Traceback ...\n")
    (tmp_path / "broken.rc").write_text("1")
    text, missed, failed = render(tmp_path)
    assert (missed, failed) == (1, 1)
    rows = {line.split()[0]: line.split() for line in text.splitlines()[2:6]}
    assert rows["fast"][1:] == ["p99_ratio", "0.4", "<=", "0.5", "met"]
    assert rows["slow"][-1] == "MISSED"
    assert "gpu: skipped: no CUDA" in text and "broken: exited 1" in text
    assert text.splitlines()[-1].startswith("1 of 2 targets met; 1 missed; 1 benchmark(s)")


def test_the_verdict_is_the_last_json_object_line():
    assert verdict_line('{"a": 1}\nlog\n{"b": 2}\ntrailing text') == {"b": 2}
    assert verdict_line("no json here") is None
