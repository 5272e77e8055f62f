"""Wide contracts: Great Expectations' cross-check stays bounded, and drift scores do not
depend on the process (its hash seed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.contract import Column, DataContract
from pipeline.validate import validate_frame
from pipeline.validate.entry import GX_CROSS_CHECKS
from pipeline.validate.report import NO_LEAKAGE

ROOT = Path(__file__).resolve().parents[2]
NOW = pd.Timestamp("2026-06-01T00:00:00Z")


def _wide(features: int) -> DataContract:
    cols = [Column("y", "int", min=0, max=1)]
    cols += [Column(f"x{i}", "float", min=-100, max=100) for i in range(features)]
    cols += [Column(f"k{i}", "category", categories=("a", "b", "c")) for i in range(features // 4)]
    return DataContract(
        name="wide",
        id_column=None,
        time_column=None,
        target="y",
        target_values=(0, 1),
        positive_label=1,
        columns=tuple(cols),
    )


def test_gx_cross_checks_a_bounded_share_of_a_wide_contract_and_every_failure() -> None:
    features = 120
    contract = _wide(features)
    rng = np.random.default_rng(0)
    df = pd.DataFrame({f"x{i}": rng.normal(0, 1, 400) for i in range(features)})
    for i in range(features // 4):
        df[f"k{i}"] = rng.choice(["a", "b", "c"], 400)
    df["y"] = rng.integers(0, 2, 400)
    last = f"x{features - 1}"
    df.loc[:9, last] = 500.0  # out of range: the last column's check is beyond the budget

    report = validate_frame(df, contract, NOW)

    assert not report.success
    failed = [r for r in report.results if not r.success]
    assert [(r.expectation, r.column) for r in failed] == [
        ("expect_column_values_to_be_between", last)
    ]
    assert failed[0].observed["gx_sample_success"] is False  # GX's view of every failure
    crossed = [r for r in report.results if "gx_sample_success" in r.observed]
    assert len(crossed) == GX_CROSS_CHECKS
    kinds = {r.expectation for r in report.results if r.source == "exact" and r.column}
    kinds -= {NO_LEAKAGE}  # ours alone, never a GX expectation
    assert kinds <= {r.expectation for r in crossed}  # every kind is cross-checked somewhere
    generated = sum(r.source == "exact" for r in report.results)
    assert any(
        f"cross-checked {GX_CROSS_CHECKS} of" in n and "the exact counts are the verdicts" in n
        for n in report.notes
    ), report.notes
    assert generated > GX_CROSS_CHECKS


_SCORES = """
import json, sys
import numpy as np, pandas as pd
from pipeline.contract import Column, DataContract
from pipeline.drift import detect_drift
rng = np.random.default_rng(0)
names = [f"v{i}" for i in range(40)]
p = np.linspace(1, 3, 40); q = p[::-1] ** 1.5
def frame(probs, seed):
    r = np.random.default_rng(seed)
    return pd.DataFrame({"k": r.choice(names, 3000, p=probs / probs.sum()),
                         "y": r.integers(0, 2, 3000)})
c = DataContract(name="h", id_column=None, time_column=None, target="y", target_values=(0, 1),
                 positive_label=1, columns=(Column("y", "int"),
                 Column("k", "category", categories=tuple(names))))
report, _ = detect_drift(frame(p, 1), frame(q, 2), c, html=False)
print(json.dumps([c.score for c in report.columns]))
"""


def test_drift_scores_are_the_same_in_every_process() -> None:
    """Category keys are summed in first-seen order, not a set's: a set of strings iterates
    in an order that depends on the process's hash seed, and so did the float sums."""
    scores = []
    for seed in ("1", "2", "3", "4"):
        out = subprocess.run(
            [sys.executable, "-c", _SCORES],
            cwd=ROOT,
            env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            check=True,
        )
        scores.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert all(s == scores[0] for s in scores), scores
