"""The pure helpers of benchmarks/serving_vs_mlflow.py: bodies, percentiles, the verdict."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.serving_vs_mlflow import agree, mlflow_body, ours_body, percentile, verdict


def test_bodies_carry_the_same_rows_in_each_servers_format():
    rows = [{"a": 1.5, "b": "x"}, {"a": None, "b": "y"}]
    assert json.loads(ours_body(rows)) == rows
    assert json.loads(ours_body(rows[:1])) == rows[0]  # one row: a JSON object
    split = json.loads(mlflow_body(rows, ["a", "b"], "split"))["dataframe_split"]
    assert split == {"columns": ["a", "b"], "data": [[1.5, "x"], [None, "y"]]}
    assert json.loads(mlflow_body(rows, ["a", "b"], "records")) == {"dataframe_records": rows}


@pytest.mark.parametrize("q", [0, 1, 50, 99, 100])
def test_percentile_is_numpys_linear_percentile(q):
    xs = np.random.default_rng(q).exponential(size=999).tolist()
    assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def test_agree_needs_the_same_count_and_values_within_tolerance():
    assert agree([0.1, 0.2], [0.1, 0.2 + 5e-6])
    assert not agree([0.1, 0.2], [0.1, 0.21])
    assert not agree([0.1], [0.1, 0.2])


def test_the_worst_mix_decides_and_each_mix_has_its_targets():
    mixes = {
        "single": {"rps_ratio": 5.0, "p99_ratio": 0.2},
        "batch256": {"rps_ratio": 2.5, "p99_ratio": 0.6},
    }
    rps, p99, targets = verdict(mixes)
    assert (rps, p99) == (2.5, 0.6)
    met = {t["name"]: t["met"] for t in targets}
    assert met == {
        "rps_ratio_single": True,
        "p99_ratio_single": True,
        "rps_ratio_batch256": True,
        "p99_ratio_batch256": False,
    }
    mixes["batch256"]["p99_ratio"] = 0.5
    assert all(t["met"] for t in verdict(mixes)[2])
