"""Data drift of a batch against a reference, with Evidently 0.7.

Compared columns: the contract's numeric and categorical features (not the id or
the event time) plus the target (label-prior shift). Evidently picks the method
and threshold of each column by its defaults (e.g. normed Wasserstein distance
for numeric and Jensen-Shannon distance for categorical columns on large samples;
KS / chi-squared / Z tests on small ones). The dataset is declared drifted when
the share of drifted *feature* columns (target excluded) reaches ``share_threshold``.

``evidently`` is imported inside :func:`detect_drift`: it takes seconds to import.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd

from pipeline.contract import DataContract

_VALUE_DRIFT = "evidently:metric_v2:ValueDrift"


@dataclass(frozen=True)
class ColumnDrift:
    column: str
    method: str
    score: float
    threshold: float
    drifted: bool


@dataclass(frozen=True)
class DriftReport:
    dataset_drift: bool
    drift_share: float
    share_threshold: float
    columns: list[ColumnDrift]
    reference_rows: int
    current_rows: int
    reference_positive_rate: float
    current_positive_rate: float
    target: str = ""

    def drifted_columns(self) -> list[str]:
        return [c.column for c in self.columns if c.drifted]

    def feature_columns(self) -> list[ColumnDrift]:
        return [c for c in self.columns if c.column != self.target]

    def summary(self) -> str:
        features = self.feature_columns()
        drifted = [c.column for c in features if c.drifted]
        verdict = "dataset drift" if self.dataset_drift else "no dataset drift"
        text = (
            f"{verdict}: {len(drifted)} of {len(features)} features drifted "
            f"(share {self.drift_share:.2f}, threshold {self.share_threshold:.2f})"
        )
        if drifted:
            text += f" [{', '.join(drifted)}]"
        target = next((c for c in self.columns if c.column == self.target), None)
        if target is not None:
            state = "drifted" if target.drifted else "stable"
            text += (
                f"; target {target.column} {state}, positive rate "
                f"{self.reference_positive_rate:.4f} -> {self.current_positive_rate:.4f}"
            )
        return text + f"; {self.reference_rows} reference vs {self.current_rows} current rows"

    def to_dict(self) -> dict[str, Any]:
        d = _finite(asdict(self))
        d["drifted_columns"] = self.drifted_columns()
        d["summary"] = self.summary()
        return d


def _finite(value: Any) -> Any:
    """NaN / inf as None, so the dict is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def positive_rate(df: pd.DataFrame, contract: DataContract) -> float:
    """Share of labelled rows whose target is the contract's positive label."""
    labels = df[contract.target].dropna()
    if labels.empty:
        return math.nan
    return float((labels == contract.positive_label).mean())


def _sample(df: pd.DataFrame, rows: int, seed: int) -> pd.DataFrame:
    if len(df) <= rows:
        return df.reset_index(drop=True)
    return df.sample(n=rows, random_state=seed).reset_index(drop=True)


def detect_drift(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    contract: DataContract,
    *,
    share_threshold: float = 0.3,
    sample_rows: int = 20_000,
    seed: int = 0,
) -> tuple[DriftReport, str]:
    """Compare ``current`` to ``reference``; return the report and Evidently's HTML.

    The HTML is a standalone page (Evidently's JS bundle and font are inlined; a few
    MB). Raises ``ValueError`` when a frame is empty or lacks a compared column:
    validate the batch against the contract first.
    """
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    numeric = contract.numeric_features
    categorical = contract.categorical_features
    target = contract.target
    columns = [*numeric, *categorical, target]
    for name, frame in (("reference", reference), ("current", current)):
        if frame.empty:
            raise ValueError(f"{name} frame is empty; cannot compute drift")
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise ValueError(f"{name} frame lacks contract columns {missing}")

    ref = _sample(reference[columns], sample_rows, seed)
    cur = _sample(current[columns], sample_rows, seed)
    # class labels are categorical whatever their dtype
    definition = DataDefinition(
        numerical_columns=numeric, categorical_columns=[*categorical, target]
    )
    report = Report(
        [DataDriftPreset(columns=columns, drift_share=share_threshold)],
        include_tests=True,  # the per-column pass/fail (drift detected) lives in the tests
    )
    snapshot = report.run(
        Dataset.from_pandas(cur, data_definition=definition),
        Dataset.from_pandas(ref, data_definition=definition),
    )
    result = snapshot.dict()

    detected: dict[str, bool] = {}
    for test in result["tests"]:
        params = test.get("metric_config", {}).get("params", {})
        if params.get("type") == _VALUE_DRIFT:
            detected[params["column"]] = str(test.get("status")).upper().endswith("FAIL")
    drifts: dict[str, ColumnDrift] = {}
    for metric in result["metrics"]:
        config = metric.get("config", {})
        if config.get("type") != _VALUE_DRIFT:
            continue
        name = config["column"]
        drifts[name] = ColumnDrift(
            column=name,
            method=str(config.get("method")),
            score=float(metric["value"]),
            threshold=float(config.get("threshold")),
            drifted=detected[name],
        )
    missing = [c for c in columns if c not in drifts]
    if missing:
        raise RuntimeError(f"Evidently returned no drift result for {missing}")

    ordered = [drifts[c] for c in columns]
    features = [d for d in ordered if d.column != target]
    share = sum(d.drifted for d in features) / len(features) if features else 0.0
    drift_report = DriftReport(
        dataset_drift=bool(features) and share >= share_threshold,
        drift_share=share,
        share_threshold=share_threshold,
        columns=ordered,
        reference_rows=len(reference),
        current_rows=len(current),
        reference_positive_rate=positive_rate(reference, contract),
        current_positive_rate=positive_rate(current, contract),
        target=target,
    )
    return drift_report, snapshot.get_html_str(as_iframe=False)
