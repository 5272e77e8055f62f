"""Drift detection (Evidently) on generated batches."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from pipeline.contract import DataContract, load_contract
from pipeline.data.generate import WorldSpec, generate
from pipeline.drift import DriftReport, detect_drift

CONTRACT_PATH = Path(__file__).resolve().parents[2] / "contracts" / "transactions.yaml"
ROWS = 4000


@pytest.fixture(scope="module")
def contract() -> DataContract:
    return load_contract(CONTRACT_PATH)


@pytest.fixture(scope="module")
def reference() -> pd.DataFrame:
    return generate(WorldSpec(rows=ROWS, seed=1))


def run(reference: pd.DataFrame, contract: DataContract, **world: Any) -> tuple[DriftReport, str]:
    current = generate(WorldSpec(rows=ROWS, seed=2, **world))
    return detect_drift(reference, current, contract)


@pytest.fixture(scope="module")
def same_world(reference: pd.DataFrame, contract: DataContract) -> tuple[DriftReport, str]:
    return run(reference, contract)


def test_same_world_has_no_drift(
    same_world: tuple[DriftReport, str], contract: DataContract
) -> None:
    report, _ = same_world
    assert not report.dataset_drift, report.summary()
    assert report.drifted_columns() == []
    assert report.drift_share < report.share_threshold == 0.3
    compared = [c.column for c in report.columns]
    assert compared == [*contract.numeric_features, *contract.categorical_features, "is_fraud"]
    assert "transaction_id" not in compared and "event_time" not in compared
    for c in report.columns:  # Evidently's default methods on samples > 1000 rows: distances
        assert c.method and c.threshold > 0 and 0 <= c.score < c.threshold
    assert report.reference_rows == report.current_rows == ROWS


def test_covariate_shift_is_dataset_drift(reference: pd.DataFrame, contract: DataContract) -> None:
    report, _ = run(reference, contract, covariate_shift=1.0)
    assert report.dataset_drift, report.summary()
    assert "amount" in report.drifted_columns()
    assert report.drift_share >= 0.3
    assert "is_fraud" not in report.drifted_columns()  # the label prior did not move
    amount = next(c for c in report.columns if c.column == "amount")
    assert amount.drifted and amount.score > amount.threshold
    assert report.summary().startswith("dataset drift")


def test_label_prior_shift_drifts_the_target_only(
    reference: pd.DataFrame, contract: DataContract
) -> None:
    report, _ = run(reference, contract, label_prior=4.0)
    assert "is_fraud" in report.drifted_columns(), report.summary()
    assert not report.dataset_drift  # the target does not count towards the feature share
    assert 0.02 < report.reference_positive_rate < 0.07
    assert report.current_positive_rate > 2.5 * report.reference_positive_rate
    assert "positive rate" in report.summary()


def test_share_threshold_controls_the_verdict(
    reference: pd.DataFrame, contract: DataContract
) -> None:
    current = generate(WorldSpec(rows=ROWS, seed=2, covariate_shift=1.0))
    report, _ = detect_drift(reference, current, contract, share_threshold=1.01)
    assert report.drift_share > 0.5 and not report.dataset_drift


def test_sampling_is_seeded_and_rows_are_reported(
    reference: pd.DataFrame, contract: DataContract
) -> None:
    current = generate(WorldSpec(rows=ROWS, seed=2))
    a, _ = detect_drift(reference, current, contract, sample_rows=1500, seed=3)
    b, _ = detect_drift(reference, current, contract, sample_rows=1500, seed=3)
    assert [c.score for c in a.columns] == [c.score for c in b.columns]
    assert a.reference_rows == a.current_rows == ROWS  # the frames, not the samples


def test_report_is_json_and_html_is_a_page(same_world: tuple[DriftReport, str]) -> None:
    report, page = same_world
    payload = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert payload["dataset_drift"] is False
    assert len(payload["columns"]) == len(report.columns)
    assert {"column", "method", "score", "threshold", "drifted"} <= set(payload["columns"][0])
    assert page and "<html" in page
    assert "amount" in page


def test_missing_column_is_a_clear_error(reference: pd.DataFrame, contract: DataContract) -> None:
    current = generate(WorldSpec(rows=ROWS, seed=2, schema_fault="missing_column"))
    with pytest.raises(ValueError, match="merchant_risk_score"):
        detect_drift(reference, current, contract)
    with pytest.raises(ValueError, match="empty"):
        detect_drift(reference, current.iloc[:0], contract)
