"""Leakage: no feature predicts the label on its own, or (with a reference, the champion's
training snapshot) no feature gained that power.

The univariate ROC AUC of each feature for the label (max(AUC, 1-AUC); categories scored by
their positive rate; one-vs-rest per class beyond two classes), on the bounded sample. By
Hoeffding's inequality the estimate is within ``sqrt(ln(2/0.01) / (2 min(n_pos, n_neg)))``
of the batch's AUC with 99% probability; the observation states the bound.

Storage (``pipeline.ingest``) and scipy are imported inside the functions that use them.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipeline.contract import DataContract

if TYPE_CHECKING:
    from pipeline.validate.checks import ContractCheck
    from pipeline.validate.scan import ColumnStats

_LEAKAGE_CONFIDENCE = 0.99
# A leakage check that passes "came close" (named in the report) when its AUC reaches
# min(_NEAR_AUC, bar - _NEAR_MARGIN).
_NEAR_AUC = 0.9
_NEAR_MARGIN = 0.02

# Per class with both outcomes present: (max(AUC, 1-AUC), positives).
ClassAucs = dict[Any, tuple[float, int]]


@dataclass(frozen=True)
class Reference:
    """A bounded sample of the reference data for the leakage check; ``error`` when it
    could not be used (then ``sample`` is None)."""

    sample: pd.DataFrame | None
    rows: int = 0  # rows of the whole reference
    error: str | None = None


def _leakage_columns(contract: DataContract) -> list[str]:
    return [c.name for c in contract.features if c.is_numeric or c.is_categorical]


def reference_from_uri(uri: str, contract: DataContract, sample_rows: int, seed: int) -> Reference:
    """A seeded sample of at most ``sample_rows`` rows of the Parquet object at ``uri``
    (leakage columns and label only); a reference that cannot be read says why. A
    transient storage failure propagates (retry): judging the batch without its reference
    would apply the stricter rule because of the network, not the data."""
    from pipeline.ingest import open_source
    from pipeline.storage import TransientStorageError, is_transient

    try:
        source = open_source(uri)
        names = Counter(source.column_names)
        if names.get(contract.target) != 1:
            return Reference(None, source.num_rows, f"label column {contract.target} missing")
        columns = [c for c in _leakage_columns(contract) if names.get(c) == 1] + [contract.target]
        table = source.sample(columns, sample_rows, seed)
        sample = table.to_pandas()
    except TransientStorageError:
        raise
    except Exception as exc:  # noqa: BLE001 - a bad reference is reported, never raised
        if is_transient(exc):
            raise TransientStorageError(
                f"reading the leakage reference {uri} failed on the storage service "
                f"({type(exc).__name__}: {exc}); the task is retried"
            ) from exc
        return Reference(None, 0, f"reference {uri} unreadable: {type(exc).__name__}: {exc}"[:500])
    return Reference(sample, source.num_rows)


def reference_from_frame(
    df: pd.DataFrame, contract: DataContract, sample_rows: int, seed: int
) -> Reference:
    """The same as :func:`reference_from_uri`, from a frame."""
    total = len(df)
    if contract.target not in df.columns:
        return Reference(None, total, f"label column {contract.target} missing")
    if total > sample_rows:
        picks = np.sort(np.random.default_rng(seed).choice(len(df), sample_rows, replace=False))
        df = df.iloc[picks]
    columns = [c for c in _leakage_columns(contract) if c in df.columns] + [contract.target]
    return Reference(df.loc[:, ~df.columns.duplicated()][columns].reset_index(drop=True), total)


def _leak_classes(contract: DataContract) -> list[Any]:
    """The classes scored one-vs-rest: the positive label alone for a binary target (the
    other class gives the same score), every class for more than two."""
    return list(contract.target_values) if contract.num_classes > 2 else [contract.positive_label]


def _class_aucs(
    x: pd.Series, labels: pd.Series, classes: list[Any], categorical: bool
) -> tuple[int, ClassAucs]:
    """Rows scored, and per class with both outcomes present: (max(AUC, 1-AUC), positives)."""
    known = labels.notna().to_numpy()
    x, labels = x[known], labels[known]
    out: ClassAucs = {}
    rows = 0
    for cls in classes:
        y = (labels == cls).to_numpy(dtype=bool)
        xc = x.map(pd.Series(y, index=x.index).groupby(x).mean()) if categorical else x
        xv = pd.to_numeric(xc, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        keep = np.isfinite(xv)
        xv, y = xv[keep], y[keep]
        rows = max(rows, int(len(y)))
        pos = int(y.sum())
        if pos == 0 or pos == len(y):
            continue
        auc = _auc(xv, y)
        out[cls] = (max(auc, 1.0 - auc), pos)
    return rows, out


def _auc(x: np.ndarray, y: np.ndarray) -> float:
    """ROC AUC of score ``x`` for boolean ``y`` (Mann-Whitney U with mid-ranks for ties)."""
    from scipy.stats import rankdata

    ranks = rankdata(x)
    pos = int(y.sum())
    neg = len(y) - pos
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


# --------------------------------------------------------------------------- the check


def leakage_outcome(
    check: ContractCheck,
    contract: DataContract,
    cols: dict[str, ColumnStats],
    sample: pd.DataFrame,
    reference: Reference | None,
    sampled: bool,
) -> tuple[bool, dict[str, Any]]:
    """(success, observed) of the leakage check of ``check.column`` on ``sample``
    (``sampled``: a sample of the batch, not all of it)."""
    col = cols[check.column]  # type: ignore[index]
    target, kw = contract.target, check.kwargs
    if col.present != 1 or not col.type_ok:
        return False, {"error": f"column {col.name} is missing or mistyped: leakage not checked"}
    if not cols[target].type_ok or target not in sample or col.name not in sample:
        return True, {"skipped": "no typed label column to check against"}
    classes = _leak_classes(contract)
    categorical = contract.column(col.name).is_categorical
    rows, aucs = _class_aucs(sample[col.name], sample[target], classes, categorical)
    if not aucs:
        return True, {"skipped": "the sample holds one class only", "rows": rows}
    best = max(aucs, key=lambda c: aucs[c][0])
    ref = None if reference is None else reference.sample
    obs: dict[str, Any] = {"mode": "reference" if ref is not None else "no reference"}
    if ref is not None:
        bar = kw["reference_auc"]
        success, focus = _against_reference(
            col.name, target, ref, classes, categorical, aucs, best, kw, obs
        )
    else:
        bar = kw["max_auc"]
        focus = best
        success = aucs[focus][0] < bar or rows < kw["min_rows"]
        if rows < kw["min_rows"]:
            obs["skipped"] = (
                f"{rows} rows < leakage.min_rows {kw['min_rows']} and no reference to compare with"
            )
            obs["too_few_rows"] = True
    score, pos = aucs[focus]
    bound = math.sqrt(math.log(2 / (1 - _LEAKAGE_CONFIDENCE)) / (2 * min(pos, rows - pos)))
    obs.update(
        {
            "observed_value": round(score, 6),
            "rows": rows,
            "positives": pos,
            "error_bound_99": round(bound, 4),
            "sampled": sampled,
            "bar": bar,
        }
    )
    if len(classes) > 1:
        obs["class"] = focus
    if success and score >= min(_NEAR_AUC, bar - _NEAR_MARGIN):
        obs["near"] = True
    return success, obs


def _against_reference(
    name: str,
    target: str,
    ref: pd.DataFrame,
    classes: list[Any],
    categorical: bool,
    aucs: ClassAucs,
    best: Any,
    kw: dict[str, Any],
    obs: dict[str, Any],
) -> tuple[bool, Any]:
    """(success, the class to report) with a reference: a class leaks when its AUC reaches
    ``reference_auc`` and rose more than ``max_rise`` above the reference's; the
    reference's side of the observation is added to ``obs``."""
    ref_aucs: ClassAucs = {}
    if name in ref:
        _, ref_aucs = _class_aucs(ref[name], ref[target], classes, categorical)
    else:
        obs["reference"] = "column absent from the reference"
    # no power on the reference (absent column, or class missing there): AUC 0.5
    rise = {c: aucs[c][0] - ref_aucs.get(c, (0.5, 0))[0] for c in aucs}
    leaking = [c for c in aucs if aucs[c][0] >= kw["reference_auc"] and rise[c] > kw["max_rise"]]
    focus = max(leaking, key=lambda c: rise[c]) if leaking else best
    obs["reference_value"] = round(ref_aucs[focus][0], 6) if focus in ref_aucs else None
    obs["rise"] = round(rise[focus], 6)
    obs["reference_rows"] = int(len(ref))
    return not leaking, focus
