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

CONTRACT_PATH = Path(__file__).resolve().parents[2] / "models" / "card_fraud" / "contract.yaml"
ROWS = 4000


@pytest.fixture(scope="module")
def contract() -> DataContract:
    return load_contract(CONTRACT_PATH)


@pytest.fixture(scope="module")
def reference() -> pd.DataFrame:
    return generate(WorldSpec(rows=ROWS, seed=1))


def run(
    reference: pd.DataFrame, contract: DataContract, html: bool = False, **world: Any
) -> tuple[DriftReport, str]:
    current = generate(WorldSpec(rows=ROWS, seed=2, **world))
    return detect_drift(reference, current, contract, html=html)


@pytest.fixture(scope="module")
def same_world(reference: pd.DataFrame, contract: DataContract) -> tuple[DriftReport, str]:
    return run(reference, contract, html=True)


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
    report, _ = detect_drift(reference, current, contract, share_threshold=1.01, html=False)
    assert report.drift_share > 0.5 and not report.dataset_drift


def test_scores_are_deterministic_and_rows_are_reported(
    reference: pd.DataFrame, contract: DataContract
) -> None:
    current = generate(WorldSpec(rows=ROWS, seed=2))
    a, _ = detect_drift(reference, current, contract, html=False)
    b, _ = detect_drift(reference, current, contract, html=False)
    assert a.to_dict() == b.to_dict()
    assert a.reference_rows == a.current_rows == ROWS


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


# ----------------------------------------------------------------------------- our statistics


def test_verdicts_and_scores_match_evidently_on_the_full_data(
    reference: pd.DataFrame, contract: DataContract
) -> None:
    from pipeline.drift import evidently_verdicts

    current = generate(WorldSpec(rows=ROWS, seed=2, covariate_shift=0.3))
    ours, _ = detect_drift(reference, current, contract, html=False)
    theirs, _ = evidently_verdicts(reference, current, contract)
    for c in ours.columns:
        e = theirs[c.column]
        assert c.drifted == e.drifted and c.threshold == e.threshold, (c, e)
        assert abs(c.score - e.score) <= max(1e-9, c.score_high - c.score_low), (c, e)
    assert 0 < sum(c.drifted for c in ours.columns) < len(ours.columns)  # a mixed case


def test_wasserstein_bounds_hold_and_ambiguity_falls_back_to_exact(
    reference: pd.DataFrame, contract: DataContract
) -> None:
    import dataclasses

    import numpy as np

    from pipeline.drift import _from_arrays

    current = generate(WorldSpec(rows=ROWS, seed=2, covariate_shift=0.2))
    report, _ = detect_drift(reference, current, contract, html=False)
    exact = {}
    for c in report.columns:
        if c.method != "wasserstein":
            continue
        ref = reference[c.column].to_numpy(dtype=float)
        cur = current[c.column].to_numpy(dtype=float)
        exact[c.column] = _from_arrays("wasserstein", ref[np.isfinite(ref)], cur[np.isfinite(cur)])
        assert c.score_low - 1e-12 <= exact[c.column] <= c.score_high + 1e-12
    # a threshold inside the bounds of a continuous column forces the exact computation
    col = next(c for c in report.columns if c.method == "wasserstein" and not c.exact)
    columns = tuple(
        dataclasses.replace(x, drift_threshold=col.score) if x.name == col.column else x
        for x in contract.columns
    )
    tight, _ = detect_drift(
        reference, current, dataclasses.replace(contract, columns=columns), html=False
    )
    again = next(c for c in tight.columns if c.column == col.column)
    assert again.exact and again.score == pytest.approx(exact[col.column], rel=1e-12)
    assert again.drifted is (exact[col.column] >= col.score)


def test_small_reference_uses_p_value_tests(contract: DataContract) -> None:
    from pipeline.drift import evidently_verdicts

    reference = generate(WorldSpec(rows=800, seed=1))
    current = generate(WorldSpec(rows=1500, seed=2, covariate_shift=0.4))
    ours, _ = detect_drift(reference, current, contract, html=False)
    methods = {c.column: c.method for c in ours.columns}
    assert (
        methods["amount"] == "ks"
        and methods["channel"] == "chisquare"
        and methods["is_fraud"] == "z"
    )
    theirs, _ = evidently_verdicts(reference, current, contract)
    for c in ours.columns:
        assert c.drifted == theirs[c.column].drifted
        assert c.score == pytest.approx(theirs[c.column].score, rel=1e-9, abs=1e-12)


def test_contract_sets_method_threshold_and_share(
    reference: pd.DataFrame, contract: DataContract
) -> None:
    import dataclasses

    columns = tuple(
        dataclasses.replace(c, drift_method="psi", drift_threshold=0.2)
        if c.name in ("amount", "channel")
        else c
        for c in contract.columns
    )
    custom = dataclasses.replace(contract, columns=columns, drift_share=0.9)
    current = generate(WorldSpec(rows=ROWS, seed=2, covariate_shift=1.0))
    report, _ = detect_drift(reference, current, custom, html=False)
    by = {c.column: c for c in report.columns}
    assert by["amount"].method == by["channel"].method == "psi"
    assert by["amount"].threshold == 0.2
    assert report.share_threshold == 0.9 and not report.dataset_drift  # 0.78 < 0.9
    from pipeline.drift import evidently_verdicts

    theirs, _ = evidently_verdicts(reference, current, custom)
    for name in ("amount", "channel"):
        assert by[name].score == pytest.approx(theirs[name].score, rel=1e-9)


def test_streaming_from_parquet_equals_frames(
    reference: pd.DataFrame, contract: DataContract, tmp_path: Path
) -> None:
    from pipeline.drift import detect_drift_uris
    from pipeline.ingest import parquet_bytes

    current = generate(WorldSpec(rows=ROWS, seed=2, covariate_shift=0.2))
    current.loc[current.index[:7], "amount"] = float("inf")  # dropped, as Evidently does
    paths = []
    for name, df in (("ref", reference), ("cur", current)):
        paths.append(tmp_path / f"{name}.parquet")
        paths[-1].write_bytes(parquet_bytes(df, row_group_size=900))
    streamed, page = detect_drift_uris(
        paths[0].as_uri(), paths[1].as_uri(), contract, sample_rows=500
    )
    framed, _ = detect_drift(reference, current, contract, html=False)
    assert streamed.to_dict() == framed.to_dict()
    assert "<html" in page


@pytest.mark.parametrize("time_column", [None, "event_time"])
def test_drift_needs_no_time_column(
    reference: pd.DataFrame, contract: DataContract, time_column: str | None
) -> None:
    import dataclasses

    c = dataclasses.replace(contract, time_column=time_column)
    if time_column is None:  # a dataset without event times at all
        c = dataclasses.replace(c, columns=tuple(x for x in c.columns if x.name != "event_time"))
    current = generate(WorldSpec(rows=ROWS, seed=2))
    drop = [] if time_column else ["event_time"]
    report, _ = detect_drift(reference.drop(columns=drop), current.drop(columns=drop), c)
    assert not report.dataset_drift, report.summary()
    assert [x.column for x in report.columns] == [
        *c.numeric_features,
        *c.categorical_features,
        "is_fraud",
    ]
