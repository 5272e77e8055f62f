"""Contract validation of a batch: an exact streaming pass plus Great Expectations 1.x.

One list of checks is generated from the :class:`~pipeline.contract.DataContract`: row
count, safe and unique column names, each column's existence, type (numbers stored as
strings fail), nulls within the tolerance, range, categories, id uniqueness, label values,
event times not after an explicit ``now``, no constant feature, no feature that predicts
the label on its own (leakage), plus the contract's user ``expectations``.

How it scales (10M rows never become one frame)
    *Exact streaming pass.* The batch is read as Parquet record batches
    (:class:`pipeline.ingest.TableSource`, page checksums verified) and every count is
    computed over every row with pyarrow/numpy: nulls (null or NaN), out-of-range values
    (±Inf included), unknown categories and labels, future event times, types from the
    Arrow schema, distinct values of features. Duplicate ids are exact too: ids are hashed
    to uint64 (integers are their own hash), sorted and compared; colliding hashes are
    re-checked on the id values themselves in a second pass over the id column, so a hash
    collision can cost time but never a wrong count. Memory: one record batch plus 16
    bytes per id (its hash and the sorted copy).

    *Great Expectations on a bounded sample.* The GX suite (the same generated
    expectations, plus the user expectations) runs on a seeded uniform sample of at most
    ``sample_rows`` rows (every row when the batch is smaller, so small batches are checked
    by GX in full). We chose this over validating every row-group with GX and merging:
    merging GX results is not exact for uniqueness across chunks or for ``mostly``
    fractions, and GX on pandas costs seconds per million rows. For a generated
    expectation the exact streaming outcome is the verdict (``source="exact"``; GX's view
    of the sample is kept as ``gx_sample_success``); a user expectation has no exact
    twin, so GX's result on the sample is the verdict (``source="gx"`` when the sample is
    the whole batch, ``"gx-sample"`` otherwise: an aggregate such as a mean is then an
    estimate whose standard error is the column's sd / sqrt(sample rows)).

    *Leakage* is the one other sampled check: the univariate ROC AUC of each feature for
    the label (max(AUC, 1-AUC); categories scored by their positive rate; with more than
    two classes one-vs-rest per class, the worst class named), computed on the same
    sample. By Hoeffding's inequality for this U-statistic the estimate is within
    ``sqrt(ln(2/0.01) / (2 min(n_pos, n_neg)))`` of the batch's AUC with 99% probability;
    the report states the bound. Leakage is *new* predictive power: with a reference (the
    champion's training snapshot, ``reference_uri``; the same AUCs on a bounded sample of
    it) a feature is rejected only when its AUC reaches ``leakage.reference_auc`` and rose
    more than ``leakage.max_rise`` above the reference's, so a feature that was always that
    strong passes. Without a reference only a near-perfect AUC (``leakage.max_auc``) on at
    least ``leakage.min_rows`` rows is rejected; on fewer rows the check is skipped. A
    copied label scores 1.0. Features that pass but came close are named in the report.

Column names are data: they select columns, are escaped in HTML and shortened in text,
and never become paths or MLflow keys. ``great_expectations`` is imported inside the
functions: it takes seconds to import.
"""

from __future__ import annotations

import dataclasses
import html
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import date, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipeline.contract import DataContract
from pipeline.ingest import TableSource, open_source

if TYPE_CHECKING:
    import pyarrow as pa
    from great_expectations.core.expectation_suite import ExpectationSuite

PARTIAL_UNEXPECTED = 10
SAMPLE_ROWS = 20_000
MAX_NAME_CHARS = 256
_SET_PREVIEW = 5
_SUMMARY_FAILURES = 5
_LEAKAGE_CONFIDENCE = 0.99
# A leakage check that passes "came close" (named in the report) when its AUC reaches
# min(_NEAR_AUC, bar - _NEAR_MARGIN).
_NEAR_AUC = 0.9
_NEAR_MARGIN = 0.02
NO_TIME_COLUMN_NOTE = "no time column in the contract: time checks skipped"

# Checks Great Expectations has no expectation for: computed by the streaming pass only.
READABLE = "expect_batch_to_be_readable_parquet"
SAFE_NAMES = "expect_column_names_to_be_safe_and_unique"
NO_LEAKAGE = "expect_column_to_not_predict_target_alone"
_TYPE_CHECK = "expect_column_values_to_be_in_type_list"
# What pyarrow raises on bytes that are not (valid) Parquet: ArrowInvalid is a ValueError,
# a failed page checksum or a short read an OSError.
_READ_ERRORS = (OSError, ValueError, EOFError)

_INTS = [
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "Int8Dtype",
    "Int16Dtype",
    "Int32Dtype",
    "Int64Dtype",
]
_GX_TYPES: dict[str, list[str]] = {
    "int": _INTS,
    "float": ["float16", "float32", "float64", "Float32Dtype", "Float64Dtype", *_INTS],
    "bool": ["bool", "BooleanDtype"],
    "category": ["str"],
    "string": ["str"],
    "timestamp": ["datetime64[ns]", "datetime64[us]", "datetime64[ms]", "datetime64[s]"],
}


@dataclass(frozen=True)
class ExpectationResult:
    expectation: str
    column: str | None
    success: bool
    observed: Any
    expected: dict[str, Any]
    source: str = "gx"  # "exact": streaming pass over every row; "gx" / "gx-sample": GX

    def describe(self) -> str:
        """Short human description: what was expected, what was seen."""
        return f"{_describe_expected(self)} ({_describe_observed(self)})"


@dataclass(frozen=True)
class ValidationReport:
    success: bool
    rows: int
    results: list[ExpectationResult]
    extra_columns: list[str] = field(default_factory=list)  # display-safe names
    sample_rows: int = 0  # rows GX saw
    error: str | None = None  # the batch could not be read
    notes: list[str] = field(default_factory=list)  # for a reviewer: skipped checks, near misses

    def failures(self) -> list[ExpectationResult]:
        return [r for r in self.results if not r.success]

    def summary(self) -> str:
        failed = self.failures()
        total = len(self.results)
        prefix = "empty batch (0 rows); " if self.rows == 0 and self.error is None else ""
        extra = ""
        if self.extra_columns:
            shown = ", ".join(self.extra_columns[:_SET_PREVIEW])
            more = len(self.extra_columns) - _SET_PREVIEW
            extra = f"; extra columns (allowed, not used): {shown}" + (
                f" and {more} more" if more > 0 else ""
            )
        extra += "".join(f"; {note}" for note in self.notes)
        if not failed:
            return f"{prefix}all {total} expectations passed on {self.rows} rows{extra}"
        primary = _primary(failed)
        details = "; ".join(r.describe() for r in primary[:_SUMMARY_FAILURES])
        if len(failed) > min(len(primary), _SUMMARY_FAILURES):
            details += f"; and {len(failed) - min(len(primary), _SUMMARY_FAILURES)} more"
        return (
            f"{prefix}{len(failed)} of {total} expectations failed on {self.rows} rows: "
            f"{details}{extra}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "success": self.success,
            "rows": self.rows,
            "failed": len(self.failures()),
            "evaluated": len(self.results),
            "summary": self.summary(),
            "extra_columns": list(self.extra_columns),
            "sample_rows": self.sample_rows,
            "error": self.error,
            "notes": list(self.notes),
            "results": [_jsonable(asdict(r)) for r in self.results],
        }


def _primary(failed: list[ExpectationResult]) -> list[ExpectationResult]:
    """Failures worth naming first: a missing or mistyped column hides the checks that could
    not run because of it (they stay in the report)."""
    missing = {r.column for r in failed if r.expectation == "expect_column_to_exist"}
    mistyped = {r.column for r in failed if r.expectation == _TYPE_CHECK}
    out = []
    for r in failed:
        if r.column in missing and r.expectation != "expect_column_to_exist":
            continue
        if r.column in mistyped and r.expectation != _TYPE_CHECK and "error" in (r.observed or {}):
            continue
        out.append(r)
    return out


def display_name(name: str, limit: int = 60) -> str:
    """A column name safe to print: as is when harmless, else repr'd and shortened."""
    if _name_problem(name) is None and len(name) <= limit:
        return name
    text = repr(name)
    if len(text) <= limit:
        return text
    suffix = f"…({len(name)} chars)"
    return text[: limit - len(suffix)] + suffix


def _name_problem(name: str) -> str | None:
    if not name:
        return "empty"
    if len(name) > MAX_NAME_CHARS:
        return f"{len(name)} characters (max {MAX_NAME_CHARS})"
    if any(not ch.isprintable() for ch in name):
        return "control characters (e.g. newline)"
    if "/" in name or "\\" in name or name.startswith(".") or ".." in name:
        return "path characters ('/', '\\\\', '..' or a leading '.')"
    return None


# --------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class Check:
    """One expectation of the contract: a GX expectation type (or one of ours) and kwargs."""

    expectation: str
    column: str | None
    kwargs: dict[str, Any]
    gx: bool = True  # part of the GX suite
    exact: bool = True  # computed exactly by the streaming pass


def contract_checks(contract: DataContract, now: pd.Timestamp) -> list[Check]:
    """Every check ``contract`` implies, in report order; ``now`` bounds event times."""
    checks = [
        # never below 1: map expectations pass vacuously on an empty batch
        Check(
            "expect_table_row_count_to_be_between",
            None,
            {"min_value": max(1, contract.min_rows), "max_value": contract.max_rows},
        ),
        Check(SAFE_NAMES, None, {"max_chars": MAX_NAME_CHARS}, gx=False),
    ]
    features = {c.name for c in contract.features}
    for col in contract.columns:
        name = col.name
        checks.append(Check("expect_column_to_exist", name, {}))
        checks.append(
            Check(
                "expect_column_values_to_be_in_type_list", name, {"type_list": _GX_TYPES[col.type]}
            )
        )
        if col.max_null_fraction > 0:
            mostly = round(1.0 - col.max_null_fraction, 10)
            checks.append(Check("expect_column_values_to_not_be_null", name, {"mostly": mostly}))
        elif not col.nullable:
            checks.append(Check("expect_column_values_to_not_be_null", name, {}))
        if col.is_numeric and (col.min is not None or col.max is not None):
            checks.append(
                Check(
                    "expect_column_values_to_be_between",
                    name,
                    {"min_value": col.min, "max_value": col.max},
                )
            )
        if col.is_categorical:
            checks.append(
                Check(
                    "expect_column_values_to_be_in_set", name, {"value_set": list(col.categories)}
                )
            )
        if col.unique:
            checks.append(Check("expect_column_values_to_be_unique", name, {}))
        if name in features:
            checks.append(
                Check("expect_column_unique_value_count_to_be_between", name, {"min_value": 2})
            )
    checks.append(
        Check(
            "expect_column_values_to_be_in_set",
            contract.target,
            {"value_set": list(contract.target_values)},
        )
    )
    if contract.time_column is not None:  # else no time checks (the report says so)
        checks.append(
            Check(
                "expect_column_values_to_be_between",
                contract.time_column,
                {"max_value": pd.Timestamp(now)},
            )
        )
    leakage = {
        "target": contract.target,
        "max_auc": contract.leakage_max_auc,
        "min_rows": contract.leakage_min_rows,
        "reference_auc": contract.leakage_reference_auc,
        "max_rise": contract.leakage_max_rise,
    }
    for col in contract.features:
        if col.is_numeric or col.is_categorical:
            checks.append(Check(NO_LEAKAGE, col.name, dict(leakage), gx=False))
    for i, spec in enumerate(contract.extra_expectations):
        try:
            name, kwargs = spec["type"], dict(spec.get("kwargs", {}))
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"contract expectation #{i} must look like {{type: ..., kwargs: {{...}}}}, "
                f"got {spec!r}"
            ) from None
        checks.append(Check(name, kwargs.get("column"), kwargs, gx=True, exact=False))
    return checks


def _expectation(name: str, meta: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    from great_expectations.expectations.registry import get_expectation_impl

    try:
        cls = get_expectation_impl(name)
    except Exception as exc:  # ExpectationNotFoundError
        raise ValueError(f"unknown Great Expectations expectation {name!r}") from exc
    try:
        return cls(**kwargs, meta=meta)
    except Exception as exc:  # pydantic validation error on bad kwargs
        raise ValueError(f"bad arguments for {name} {kwargs!r}: {exc}") from exc


def _suite(checks: list[Check], name: str) -> ExpectationSuite:
    import great_expectations as gx

    expectations = []
    for i, c in enumerate(checks):
        if not c.gx:
            continue
        kwargs = {k: v for k, v in c.kwargs.items() if v is not None}
        if c.column is not None:
            kwargs["column"] = c.column
        expectations.append(_expectation(c.expectation, meta={"check": i}, **kwargs))
    # Passed to the constructor, not via suite.add_expectation(), which needs an active context.
    return gx.ExpectationSuite(name=name, expectations=expectations)


def build_suite(contract: DataContract, now: pd.Timestamp) -> ExpectationSuite:
    """The GX expectation suite a batch must satisfy under ``contract``.

    ``now`` bounds the time column from above (no events in the future); it is a
    parameter so validation is deterministic. Extra columns in a batch are allowed.
    """
    return _suite(contract_checks(contract, now), f"{contract.name}_contract")


# --------------------------------------------------------------------------- entry points


def validate_frame(
    df: pd.DataFrame,
    contract: DataContract,
    now: pd.Timestamp,
    *,
    sample_rows: int = SAMPLE_ROWS,
    seed: int = 0,
    reference: pd.DataFrame | None = None,
) -> ValidationReport:
    """Validate ``df`` against ``contract``; never raises on bad data, only reports it.

    ``reference``: the champion's training data (same contract), for the leakage check;
    a seeded sample of at most ``sample_rows`` of its rows is used."""
    source, untyped = TableSource.from_frame(df)
    ref = (
        None if reference is None else _reference_from_frame(reference, contract, sample_rows, seed)
    )
    return validate_source(
        source, contract, now, sample_rows=sample_rows, seed=seed, untyped=untyped, reference=ref
    )


def validate_uri(
    uri: str,
    contract: DataContract,
    now: pd.Timestamp,
    *,
    sample_rows: int = SAMPLE_ROWS,
    seed: int = 0,
    reference_uri: str | None = None,
) -> ValidationReport:
    """Validate the Parquet object at ``uri``, streaming; an unreadable file is a report.

    ``reference_uri``: the champion's training snapshot (Parquet, same contract); the
    leakage check compares each feature's AUC with its AUC on a seeded sample of at most
    ``sample_rows`` reference rows. ``None`` (no champion yet), or a reference that cannot
    be read (the report says so): the stricter no-reference rule applies."""
    try:
        source = open_source(uri, dictionary_columns=contract.categorical_features)
    except _READ_ERRORS as exc:
        return _unreadable(exc, contract, now)
    ref = (
        None
        if reference_uri is None
        else _reference_from_uri(reference_uri, contract, sample_rows, seed)
    )
    return validate_source(source, contract, now, sample_rows=sample_rows, seed=seed, reference=ref)


def validate_source(
    source: TableSource,
    contract: DataContract,
    now: pd.Timestamp,
    *,
    sample_rows: int = SAMPLE_ROWS,
    seed: int = 0,
    untyped: dict[str, str] | None = None,
    reference: Reference | None = None,
) -> ValidationReport:
    now = _utc(now)
    checks = contract_checks(contract, now)
    try:
        scan = _Scan(source, contract, now, untyped or {}, sample_rows, seed, reference)
        scan.run()
    except _READ_ERRORS as exc:  # a corrupted page, a truncated row group
        return _unreadable(exc, contract, now, rows=source.num_rows)
    sample = scan.sample_frame()
    exact = scan.results(checks, sample)
    gx_results = _run_gx(checks, sample, now, contract.name)
    full = scan.sample_is_everything
    results: list[ExpectationResult] = []
    for i, check in enumerate(checks):
        gx_res = gx_results.get(i)
        if check.exact:
            r = exact[i]
            if gx_res is not None:
                r = _with(r, observed={**r.observed, "gx_sample_success": gx_res.success})
            results.append(r)
        elif gx_res is not None:
            observed = gx_res.observed if full else {**gx_res.observed, "sample_rows": len(sample)}
            results.append(_with(gx_res, source="gx" if full else "gx-sample", observed=observed))
    order = {c.name: i for i, c in enumerate(contract.columns)}
    results.sort(
        key=lambda r: (
            -1 if r.column is None else order.get(r.column, len(order)),
            r.column or "",
            r.expectation,
            repr(r.expected),
        )
    )
    return ValidationReport(
        success=all(r.success for r in results),
        rows=scan.rows,
        results=results,
        extra_columns=[display_name(n) for n in scan.extra_columns],
        sample_rows=len(sample),
        notes=_notes(contract, results, reference),
    )


def _notes(
    contract: DataContract, results: list[ExpectationResult], reference: Reference | None
) -> list[str]:
    """What a reviewer should know beyond pass/fail: skipped checks and near misses."""
    notes = []
    if contract.time_column is None:
        notes.append(NO_TIME_COLUMN_NOTE)
    leak = [r for r in results if r.expectation == NO_LEAKAGE and isinstance(r.observed, dict)]
    if reference is not None and reference.error is not None:
        notes.append(
            f"leakage reference not used ({reference.error}): features judged on the batch alone"
        )
    skipped = [r for r in leak if r.observed.get("too_few_rows")]
    if skipped:
        notes.append(
            f"leakage check skipped for {len(skipped)} features: {skipped[0].observed['skipped']}"
        )
    near = sorted(
        (r for r in leak if r.observed.get("near")),
        key=lambda r: -(r.observed.get("observed_value") or 0.0),
    )
    if near:
        shown = ", ".join(
            f"{display_name(r.column or '')} {_leak_text(r.observed)}" for r in near[:_SET_PREVIEW]
        )
        more = len(near) - _SET_PREVIEW
        notes.append(
            "strong features, came close to the leakage bar (passed): "
            + shown
            + (f" and {more} more" if more > 0 else "")
        )
    return notes


def _with(r: ExpectationResult, **changes: Any) -> ExpectationResult:
    return ExpectationResult(**{**asdict(r), **changes})


# --------------------------------------------------------------------------- leakage


@dataclass(frozen=True)
class Reference:
    """A bounded sample of the reference data for the leakage check; ``error`` when it
    could not be used (then ``sample`` is None)."""

    sample: pd.DataFrame | None
    rows: int = 0  # rows of the whole reference
    error: str | None = None


def _leakage_columns(contract: DataContract) -> list[str]:
    return [c.name for c in contract.features if c.is_numeric or c.is_categorical]


def _reference_from_uri(uri: str, contract: DataContract, sample_rows: int, seed: int) -> Reference:
    try:
        source = open_source(uri)
        names = Counter(source.column_names)
        if names.get(contract.target) != 1:
            return Reference(None, source.num_rows, f"label column {contract.target} missing")
        columns = [c for c in _leakage_columns(contract) if names.get(c) == 1] + [contract.target]
        table = source.sample(columns, sample_rows, seed)
        sample = table.to_pandas()
    except Exception as exc:  # noqa: BLE001 - a bad reference is reported, never raised
        return Reference(None, 0, f"reference {uri} unreadable: {type(exc).__name__}: {exc}"[:500])
    return Reference(sample, source.num_rows)


def _reference_from_frame(
    df: pd.DataFrame, contract: DataContract, sample_rows: int, seed: int
) -> Reference:
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
) -> tuple[int, dict[Any, tuple[float, int]]]:
    """Rows scored, and per class with both outcomes present: (max(AUC, 1-AUC), positives)."""
    known = labels.notna().to_numpy()
    x, labels = x[known], labels[known]
    out: dict[Any, tuple[float, int]] = {}
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


def _leak_text(obs: dict[str, Any], rows: int | None = None) -> str:
    text = f"AUC {obs.get('observed_value', float('nan')):.4f}"
    if rows is not None:
        text += f" on {rows} rows"
    details = []
    if "class" in obs:
        details.append(f"class {obs['class']} vs rest")
    if obs.get("reference_value") is not None:
        details.append(f"reference {obs['reference_value']:.4f}")
    elif obs.get("reference"):
        details.append(str(obs["reference"]))
    return text + (f" ({', '.join(details)})" if details else "")


def _unreadable(
    exc: BaseException, contract: DataContract, now: pd.Timestamp, rows: int = 0
) -> ValidationReport:
    message = f"batch is not readable as Parquet: {type(exc).__name__}: {exc}"
    result = ExpectationResult(READABLE, None, False, {"error": message}, {}, "exact")
    return ValidationReport(success=False, rows=rows, results=[result], error=message)


def _utc(now: pd.Timestamp) -> pd.Timestamp:
    now = pd.Timestamp(now)
    return now.tz_localize("UTC") if now.tzinfo is None else now.tz_convert("UTC")


# --------------------------------------------------------------------------- exact pass


def pa_types() -> Any:
    import pyarrow as pa

    return pa.types


def _type_ok(contract_type: str, t: pa.DataType) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        t = t.value_type
    if contract_type == "float":
        return pa.types.is_floating(t) or pa.types.is_integer(t)
    if contract_type == "int":
        return pa.types.is_integer(t)
    if contract_type == "bool":
        return pa.types.is_boolean(t)
    if contract_type in ("category", "string"):
        return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)
    if contract_type == "timestamp":
        return pa.types.is_timestamp(t)
    return False


def _decode(arr: pa.Array) -> pa.Array:
    import pyarrow as pa

    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pa.types.is_string_view(arr.type):
        arr = arr.cast(pa.string())
    return arr


def _floats(arr: pa.Array) -> np.ndarray:
    """Numeric values as float64; nulls as NaN."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_boolean(arr.type):
        arr = pc.cast(arr, pa.int8())
    return np.asarray(arr.to_numpy(zero_copy_only=False), dtype=np.float64)


def _mix64(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (wrapping uint64 arithmetic)."""
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def _powers(n: int) -> np.ndarray:
    p = np.full(max(n, 1), 0x100000001B3, dtype=np.uint64)
    p[0] = 1
    return np.multiply.accumulate(p, dtype=np.uint64)


def hash_values(arr: pa.Array) -> np.ndarray:
    """A uint64 per value: integers are their own hash (exact); strings are hashed from
    Arrow's buffers with vectorised numpy (polynomial hash + splitmix64). Nulls hash to 0;
    callers mask them out. Equal values always hash equal."""
    import pyarrow as pa

    arr = _decode(arr)
    t = arr.type
    if pa.types.is_integer(t):
        vals = arr.to_numpy(zero_copy_only=False)
        if vals.dtype.kind == "f":  # nulls made it float; nulls are masked out anyway
            vals = np.nan_to_num(vals).astype(np.int64)
        return np.asarray(vals).astype(np.int64).view(np.uint64)
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        arr = arr.cast(pa.string())
        t = arr.type
    n = len(arr)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    _, off_buf, data_buf = arr.buffers()
    off_type = np.int32 if pa.types.is_string(t) else np.int64
    offsets = np.frombuffer(
        off_buf, dtype=off_type, count=n + 1, offset=arr.offset * np.dtype(off_type).itemsize
    )
    offsets = offsets.astype(np.int64)
    base, end = int(offsets[0]), int(offsets[-1])
    seg = (
        np.frombuffer(data_buf, dtype=np.uint8)[base:end]
        if data_buf is not None
        else np.zeros(0, np.uint8)
    )
    lengths = np.diff(offsets)
    longest = int(lengths.max())
    powers = _powers(longest)
    if longest == 0:
        h = np.zeros(n, dtype=np.uint64)
    elif (lengths == longest).all():  # fixed width: the common case for ids
        h = (seg.reshape(n, longest).astype(np.uint64) * powers[:longest]).sum(
            axis=1, dtype=np.uint64
        )
    else:
        starts = offsets[:-1] - base
        pos = np.arange(len(seg), dtype=np.int64) - np.repeat(starts, lengths)
        contrib = seg.astype(np.uint64) * powers[pos]
        h = np.zeros(n, dtype=np.uint64)
        nonempty = lengths > 0
        h[nonempty] = np.add.reduceat(contrib, starts[nonempty].astype(np.intp))
    h = h ^ (lengths.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    return _mix64(h)


@dataclass
class _Col:
    name: str
    type: str  # contract type
    arrow_type: str = ""
    present: int = 0  # times the name appears in the batch
    type_ok: bool = False
    nulls: int = 0
    out_of_range: int = 0
    range_examples: list[Any] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)  # categorical / target values
    unknown_examples: list[Any] = field(default_factory=list)
    first: Any = None  # first non-null value (constant check for numerics)
    varies: bool = False
    vmin: float = math.inf
    vmax: float = -math.inf
    future: int = 0
    future_examples: list[Any] = field(default_factory=list)
    hashes: list[np.ndarray] = field(default_factory=list)
    duplicates: int = 0
    duplicate_examples: list[Any] = field(default_factory=list)


class _Scan:
    """The streaming pass: every exact statistic in one read, plus the GX/leakage sample."""

    def __init__(
        self,
        source: TableSource,
        contract: DataContract,
        now: pd.Timestamp,
        untyped: dict[str, str],
        sample_rows: int,
        seed: int,
        reference: Reference | None = None,
    ) -> None:
        self.source, self.contract, self.now, self.untyped = source, contract, now, untyped
        self.reference = reference
        names = source.column_names
        seen = Counter(names)
        declared = set(contract.column_names)
        self.unsafe = {n: p for n in dict.fromkeys(names) if (p := _name_problem(n)) is not None}
        self.duplicated = sorted(n for n, k in seen.items() if k > 1)
        self.extra_columns = [n for n in dict.fromkeys(names) if n not in declared]
        self.cols: dict[str, _Col] = {}
        for c in contract.columns:
            col = _Col(c.name, c.type, present=seen.get(c.name, 0))
            if col.present == 1:
                t = source.schema.field(c.name).type
                col.arrow_type = str(t.value_type if pa_types().is_dictionary(t) else t)
                col.type_ok = _type_ok(c.type, t) and c.name not in untyped
                if c.name in untyped:
                    col.arrow_type = f"mixed Python types ({untyped[c.name]})"
            self.cols[c.name] = col
        self.readable = [n for n, c in self.cols.items() if c.present == 1]
        self.rows = 0
        self.sample_rows = sample_rows
        self.sample_is_everything = source.num_rows <= sample_rows
        self._picks = (
            None
            if self.sample_is_everything
            else np.sort(
                np.random.default_rng(seed).choice(source.num_rows, sample_rows, replace=False)
            )
        )
        self._sample_parts: list[pa.RecordBatch] = []

    # -- the pass

    def run(self) -> None:
        import pyarrow as pa

        offset = 0
        for batch in self.source.batches(self.readable):
            size = batch.num_rows
            for i, name in enumerate(batch.schema.names):
                self._update(self.cols[name], batch.column(i))
            if self.readable:
                if self._picks is None:
                    self._sample_parts.append(batch)
                else:
                    lo, hi = np.searchsorted(self._picks, [offset, offset + size])
                    if hi > lo:
                        self._sample_parts.append(batch.take(pa.array(self._picks[lo:hi] - offset)))
            offset += size
        self.rows = offset
        for col in self.cols.values():
            if col.hashes:
                self._resolve_duplicates(col)

    def _update(self, col: _Col, arr: pa.Array) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc

        spec = self.contract.column(col.name)
        is_target = col.name == self.contract.target
        if not col.type_ok:
            if pa.types.is_floating(arr.type):
                col.nulls += int(np.isnan(_floats(arr)).sum())
            else:
                col.nulls += arr.null_count
            return
        if not spec.is_categorical:
            arr = _decode(arr)
        if spec.is_numeric:
            vals = _floats(arr)
            nan = np.isnan(vals)
            col.nulls += int(nan.sum())
            if spec.min is not None or spec.max is not None:
                bad = np.zeros(len(vals), dtype=bool)
                if spec.min is not None:
                    bad |= vals < spec.min
                if spec.max is not None:
                    bad |= vals > spec.max
                k = int(bad.sum())
                if k:
                    col.out_of_range += k
                    need = PARTIAL_UNEXPECTED - len(col.range_examples)
                    if need > 0:
                        idx = np.flatnonzero(bad)[:need]
                        col.range_examples += arr.take(pa.array(idx)).to_pylist()
            if not nan.all():
                lo, hi = float(np.nanmin(vals)), float(np.nanmax(vals))
                col.vmin, col.vmax = min(col.vmin, lo), max(col.vmax, hi)
                col.varies = col.varies or col.vmin != col.vmax
            if is_target:
                self._count(col, arr, list(self.contract.target_values))
        elif spec.is_categorical:
            col.nulls += arr.null_count
            self._count(col, arr, list(spec.categories))
        elif spec.type == "timestamp":
            col.nulls += arr.null_count
            unit = arr.type.unit
            limit = np.datetime64(
                self.now.tz_convert("UTC").tz_localize(None).to_datetime64(), unit
            )
            vals = arr.cast(pa.timestamp(unit)).to_numpy(zero_copy_only=False)
            future = vals > limit  # NaT compares False
            k = int(future.sum())
            if k:
                col.future += k
                need = PARTIAL_UNEXPECTED - len(col.future_examples)
                if need > 0:
                    col.future_examples += [
                        pd.Timestamp(v, tz="UTC").isoformat() for v in vals[future][:need]
                    ]
        else:
            col.nulls += arr.null_count
            if is_target:
                self._count(col, arr, list(self.contract.target_values))
        if spec.unique:
            h = hash_values(arr)
            if arr.null_count:
                h = h[np.asarray(arr.is_valid())]
            col.hashes.append(h)
        elif spec.type in ("string", "bool", "timestamp") and not col.varies:
            distinct = pc.unique(arr.drop_null())
            if len(distinct) > 1:
                col.varies = True
            elif len(distinct) == 1:
                value = distinct[0].as_py()
                if col.first is None:
                    col.first = value
                col.varies = value != col.first

    def _count(self, col: _Col, arr: pa.Array, allowed: list[Any]) -> None:
        """Value counts (nulls apart), and the first unknown values in row order."""
        import pyarrow as pa
        import pyarrow.compute as pc

        allowed_set = set(allowed)
        if pa.types.is_dictionary(arr.type):  # a bincount of the codes: no string hashing
            values = arr.dictionary.to_pylist()
            codes = arr.indices.to_numpy(zero_copy_only=False)
            if arr.null_count:
                codes = codes[np.asarray(arr.is_valid())]
            counts = np.bincount(codes.astype(np.int64), minlength=len(values)).tolist()
        else:
            vc = pc.value_counts(arr)
            values, counts = vc.field("values").to_pylist(), vc.field("counts").to_pylist()
        unknown = False
        for v, k in zip(values, counts, strict=True):
            if v is None or not k:
                continue
            col.counts[v] += k
            unknown = unknown or v not in allowed_set
        if unknown and len(col.unknown_examples) < PARTIAL_UNEXPECTED:
            plain = _decode(arr)
            mask = pc.and_(
                pc.invert(pc.is_in(plain, value_set=pa.array(allowed, type=plain.type))),
                pc.is_valid(plain),
            )
            bad = plain.filter(mask)
            col.unknown_examples += bad.slice(
                0, PARTIAL_UNEXPECTED - len(col.unknown_examples)
            ).to_pylist()

    def _resolve_duplicates(self, col: _Col) -> None:
        """Exact duplicate count: equal hashes, then equal values (a second pass over the ids
        that share a hash)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        hashes = np.sort(np.concatenate(col.hashes))
        col.hashes = []
        dup = np.unique(hashes[1:][hashes[1:] == hashes[:-1]])
        del hashes
        if dup.size == 0:
            return
        candidates = []
        for batch in self.source.batches([col.name]):
            arr = _decode(batch.column(0))
            mask = np.isin(hash_values(arr), dup)
            if arr.null_count:
                mask &= np.asarray(arr.is_valid())
            if mask.any():
                candidates.append(arr.filter(pa.array(mask)))
        values = pa.concat_arrays(candidates)
        vc = pc.value_counts(values)
        counts = vc.field("counts").to_numpy()
        repeated = vc.field("values").filter(pa.array(counts > 1))
        col.duplicates = int(counts[counts > 1].sum())
        in_dup = values.filter(pc.is_in(values, value_set=repeated))
        col.duplicate_examples = in_dup.slice(0, PARTIAL_UNEXPECTED).to_pylist()

    # -- the sample

    def sample_frame(self) -> pd.DataFrame:
        import pyarrow as pa

        if not self._sample_parts:
            schema = pa.schema([self.source.schema.field(n) for n in self.readable])
            table = pa.Table.from_batches([], schema=schema)
        else:
            table = pa.Table.from_batches(self._sample_parts)
        self._sample_parts = []
        columns = {}
        for i, name in enumerate(table.column_names):
            arr = table.column(i)
            if pa.types.is_dictionary(arr.type):
                arr = arr.cast(arr.type.value_type)
            s = arr.to_pandas()
            if isinstance(s.dtype, pd.DatetimeTZDtype):  # GX types naive datetimes only
                s = s.dt.tz_convert("UTC").dt.tz_localize(None)
            columns[name] = s
        return pd.DataFrame(columns, index=pd.RangeIndex(table.num_rows))

    # -- results

    def results(self, checks: list[Check], sample: pd.DataFrame) -> dict[int, ExpectationResult]:
        out: dict[int, ExpectationResult] = {}
        for i, check in enumerate(checks):
            if not check.exact:
                continue
            if check.expectation == NO_LEAKAGE:
                success, observed = self._leakage(check, sample)
            else:
                success, observed = self._exact(check)
            expected = {k: v for k, v in check.kwargs.items() if v is not None}
            out[i] = ExpectationResult(
                check.expectation,
                check.column,
                success,
                _jsonable(observed),
                _jsonable(expected),
                "exact",
            )
        return out

    def _exact(self, check: Check) -> tuple[bool, dict[str, Any]]:
        e, kw, rows = check.expectation, check.kwargs, self.rows
        if e == "expect_table_row_count_to_be_between":
            lo, hi = kw.get("min_value"), kw.get("max_value")
            ok = (lo is None or rows >= lo) and (hi is None or rows <= hi)
            return ok, {"observed_value": rows}
        if e == SAFE_NAMES:
            bad = [{"column": display_name(n), "problem": p} for n, p in self.unsafe.items()]
            bad += [
                {"column": display_name(n), "problem": "appears more than once"}
                for n in self.duplicated
            ]
            return not bad, {
                "unsafe_columns": bad[:PARTIAL_UNEXPECTED],
                "unexpected_count": len(bad),
            }
        col = self.cols[check.column]  # type: ignore[index]
        if e == "expect_column_to_exist":
            return col.present >= 1, {"exists": col.present >= 1}
        if col.present == 0:
            return False, {"error": f'column "{col.name}" does not exist in the batch'}
        if col.present > 1:
            return False, {"error": f'column "{col.name}" appears {col.present} times in the batch'}
        if e == "expect_column_values_to_not_be_null":
            mostly = kw.get("mostly")
            ok = (
                col.nulls == 0
                if mostly is None
                else rows == 0 or (rows - col.nulls) / rows >= mostly
            )
            return ok, {
                "element_count": rows,
                "unexpected_count": col.nulls,
                "unexpected_percent": _pct(col.nulls, rows),
            }
        if e == "expect_column_values_to_be_in_type_list":
            return col.type_ok, {"observed_value": col.arrow_type, "contract_type": col.type}
        if not col.type_ok:
            return False, {
                "error": f"column {col.name} has type {col.arrow_type}, the contract "
                f"says {col.type}: values not checked"
            }
        nonnull = rows - col.nulls
        if e == "expect_column_values_to_be_between" and col.type == "timestamp":
            return col.future == 0, self._map(nonnull, col.nulls, col.future, col.future_examples)
        if e == "expect_column_values_to_be_between":
            return col.out_of_range == 0, self._map(
                nonnull, col.nulls, col.out_of_range, col.range_examples
            )
        if e == "expect_column_values_to_be_in_set":
            allowed = set(kw["value_set"])
            unknown = sum(k for v, k in col.counts.items() if v not in allowed)
            return unknown == 0, self._map(nonnull, col.nulls, unknown, col.unknown_examples)
        if e == "expect_column_values_to_be_unique":
            return col.duplicates == 0, self._map(
                nonnull, col.nulls, col.duplicates, col.duplicate_examples
            )
        if e == "expect_column_unique_value_count_to_be_between":
            if col.counts:
                distinct: Any = len(col.counts)
            elif nonnull == 0:
                distinct = 0
            else:
                distinct = ">=2" if col.varies else 1
                if col.first is not None and distinct == 1:
                    return False, {"observed_value": 1, "value": col.first}
            ok = distinct == ">=2" or distinct >= kw["min_value"]
            obs: dict[str, Any] = {"observed_value": distinct}
            if distinct == 1:
                obs["value"] = next(iter(col.counts)) if col.counts else col.vmin
            return ok, obs
        raise ValueError(f"no exact implementation for {e}")  # pragma: no cover

    @staticmethod
    def _map(nonnull: int, nulls: int, unexpected: int, examples: list[Any]) -> dict[str, Any]:
        return {
            "element_count": nonnull + nulls,
            "missing_count": nulls,
            "unexpected_count": unexpected,
            "unexpected_percent": _pct(unexpected, nonnull),
            "partial_unexpected_list": examples[:PARTIAL_UNEXPECTED],
        }

    def _leakage(self, check: Check, sample: pd.DataFrame) -> tuple[bool, dict[str, Any]]:
        col = self.cols[check.column]  # type: ignore[index]
        target, kw = self.contract.target, check.kwargs
        if col.present != 1 or not col.type_ok:
            return False, {
                "error": f"column {col.name} is missing or mistyped: leakage not checked"
            }
        if not self.cols[target].type_ok or target not in sample or col.name not in sample:
            return True, {"skipped": "no typed label column to check against"}
        classes = _leak_classes(self.contract)
        categorical = self.contract.column(col.name).is_categorical
        rows, aucs = _class_aucs(sample[col.name], sample[target], classes, categorical)
        if not aucs:
            return True, {"skipped": "the sample holds one class only", "rows": rows}
        best = max(aucs, key=lambda c: aucs[c][0])
        ref = None if self.reference is None else self.reference.sample
        obs: dict[str, Any] = {"mode": "reference" if ref is not None else "no reference"}
        if ref is not None:
            bar = kw["reference_auc"]
            ref_aucs: dict[Any, tuple[float, int]] = {}
            if col.name in ref:
                _, ref_aucs = _class_aucs(ref[col.name], ref[target], classes, categorical)
            else:
                obs["reference"] = "column absent from the reference"
            # no power on the reference (absent column, or class missing there): AUC 0.5
            rise = {c: aucs[c][0] - ref_aucs.get(c, (0.5, 0))[0] for c in aucs}
            leaking = [c for c in aucs if aucs[c][0] >= bar and rise[c] > kw["max_rise"]]
            focus = max(leaking, key=lambda c: rise[c]) if leaking else best
            success = not leaking
            obs["reference_value"] = round(ref_aucs[focus][0], 6) if focus in ref_aucs else None
            obs["rise"] = round(rise[focus], 6)
            obs["reference_rows"] = int(len(ref))
        else:
            bar = kw["max_auc"]
            focus = best
            success = aucs[focus][0] < bar or rows < kw["min_rows"]
            if rows < kw["min_rows"]:
                obs["skipped"] = (
                    f"{rows} rows < leakage.min_rows {kw['min_rows']} and no "
                    "reference to compare with"
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
                "sampled": not self.sample_is_everything,
                "bar": bar,
            }
        )
        if len(classes) > 1:
            obs["class"] = focus
        if success and score >= min(_NEAR_AUC, bar - _NEAR_MARGIN):
            obs["near"] = True
        return success, obs


def _auc(x: np.ndarray, y: np.ndarray) -> float:
    """ROC AUC of score ``x`` for boolean ``y`` (Mann-Whitney U with mid-ranks for ties)."""
    from scipy.stats import rankdata

    ranks = rankdata(x)
    pos = int(y.sum())
    neg = len(y) - pos
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def _pct(k: int, n: int) -> float:
    return 100.0 * k / n if n else 0.0


# --------------------------------------------------------------------------- GX


def _run_gx(
    checks: list[Check], sample: pd.DataFrame, now: pd.Timestamp, name: str
) -> dict[int, ExpectationResult]:
    """GX results on ``sample`` by check index; a GX crash becomes failed checks.

    Generated expectations run with ``BOOLEAN_ONLY`` results (their counts come from the
    exact pass; GX only cross-checks), user expectations with ``SUMMARY``."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    gx_checks = [
        Check(c.expectation, c.column, _gx_kwargs(c, now), c.gx, c.exact) if c.gx else c
        for c in checks
    ]
    out: dict[int, ExpectationResult] = {}
    try:
        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        asset = context.data_sources.add_pandas("contract_batch").add_dataframe_asset("frame")
        batch = asset.add_batch_definition_whole_dataframe("whole").get_batch(
            batch_parameters={"dataframe": sample}
        )
        for exact, result_format in (
            (True, {"result_format": "BOOLEAN_ONLY"}),
            (False, {"result_format": "SUMMARY", "partial_unexpected_count": PARTIAL_UNEXPECTED}),
        ):
            part = [c if c.exact == exact else dataclasses.replace(c, gx=False) for c in gx_checks]
            if not any(c.gx for c in part):
                continue
            gx_result = batch.validate(
                _suite(part, f"{name}_contract"), result_format=result_format
            )
            for r in gx_result.results:
                i = ((r.expectation_config and r.expectation_config.meta) or {}).get("check")
                if i is not None:
                    expected = {k: v for k, v in checks[int(i)].kwargs.items() if v is not None}
                    out[int(i)] = _with(_convert(r), expected=_jsonable(expected))
    except Exception as exc:  # noqa: BLE001 - reported, never raised
        message = f"Great Expectations failed: {type(exc).__name__}: {exc}"
        return {
            i: ExpectationResult(
                c.expectation, c.column, False, {"error": message}, _jsonable(c.kwargs), "gx"
            )
            for i, c in enumerate(checks)
            if c.gx
        }
    return out


def _gx_kwargs(check: Check, now: pd.Timestamp) -> dict[str, Any]:
    """GX sees naive UTC times (it cannot type tz-aware columns), so ``now`` is made naive."""
    kw = dict(check.kwargs)
    for k, v in kw.items():
        if isinstance(v, pd.Timestamp) and v.tzinfo is not None:
            kw[k] = v.tz_convert("UTC").tz_localize(None)
    return kw


def _convert(result: Any) -> ExpectationResult:
    config = result.expectation_config
    kwargs = {k: v for k, v in dict(config.kwargs).items() if k != "batch_id" and v is not None}
    column = kwargs.pop("column", None)
    return ExpectationResult(
        expectation=str(config.type),
        column=column,
        success=bool(result.success),
        observed=_observed(result),
        expected=_jsonable(kwargs),
    )


def _exception_message(info: Any) -> str | None:
    if not isinstance(info, dict):
        return None
    if info.get("raised_exception"):
        return str(info.get("exception_message"))
    for value in info.values():
        if isinstance(value, dict) and value.get("raised_exception"):
            return str(value.get("exception_message"))
    return None


def _observed(result: Any) -> dict[str, Any]:
    error = _exception_message(getattr(result, "exception_info", None))
    if error is not None:
        return {"error": error}
    res = dict(result.result or {})
    out: dict[str, Any] = {}
    if "observed_value" in res:
        out["observed_value"] = res["observed_value"]
    for key in ("element_count", "unexpected_count", "unexpected_percent", "missing_count"):
        if key in res:
            out[key] = res[key]
    if "partial_unexpected_list" in res:
        out["partial_unexpected_list"] = list(res["partial_unexpected_list"])[:PARTIAL_UNEXPECTED]
    if str(result.expectation_config.type) == "expect_column_to_exist":
        out["exists"] = bool(result.success)
    return _jsonable(out)


def _jsonable(value: Any) -> Any:
    """Plain JSON types only: numpy scalars unboxed, times as ISO strings, NaN as None."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset, np.ndarray)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, (pd.Timestamp, datetime, date)):
        return value.isoformat()
    if value is pd.NaT or value is pd.NA:
        return None
    return str(value)


# --------------------------------------------------------------------------- text


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _describe_expected(r: ExpectationResult) -> str:
    e, kw, col = r.expectation, r.expected, r.column or "table"
    if e == "expect_column_to_exist":
        return f"column {col} exists"
    if e == "expect_table_row_count_to_be_between":
        hi = kw.get("max_value", "inf")
        return f"row count in [{_fmt(kw.get('min_value', 0))}, {_fmt(hi)}]"
    if e == READABLE:
        return "batch is a readable Parquet file"
    if e == SAFE_NAMES:
        return (
            f"column names printable, unique, at most {kw.get('max_chars')} characters, "
            "without path characters"
        )
    if e == NO_LEAKAGE:
        obs = r.observed if isinstance(r.observed, dict) else {}
        if obs.get("mode") == "reference":
            return (
                f"{col} gains no new power to predict {kw.get('target')} alone (univariate AUC "
                f"< {_fmt(kw.get('reference_auc'))}, or at most {_fmt(kw.get('max_rise'))} "
                "above the reference)"
            )
        return (
            f"{col} does not predict {kw.get('target')} alone (univariate AUC < "
            f"{_fmt(kw.get('max_auc'))} on at least {kw.get('min_rows')} rows)"
        )
    if e == "expect_column_values_to_be_in_type_list":
        obs = r.observed if isinstance(r.observed, dict) else {}
        return (
            f"{col} of contract type {obs.get('contract_type', 'in ' + str(kw.get('type_list')))}"
        )
    if e == "expect_column_unique_value_count_to_be_between":
        return f"{col} not constant (at least {_fmt(kw.get('min_value'))} distinct values)"
    if e == "expect_column_values_to_not_be_null":
        mostly = kw.get("mostly")
        return f"{col} not null" + (f" (>= {mostly:.2%})" if mostly is not None else "")
    if e == "expect_column_values_to_be_between":
        lo, hi = kw.get("min_value"), kw.get("max_value")
        if lo is None:
            return f"{col} <= {_fmt(hi)}"
        if hi is None:
            return f"{col} >= {_fmt(lo)}"
        return f"{col} in [{_fmt(lo)}, {_fmt(hi)}]"
    if e == "expect_column_values_to_be_in_set":
        values = [str(v) for v in kw.get("value_set", [])]
        shown = ", ".join(values[:_SET_PREVIEW]) + (", ..." if len(values) > _SET_PREVIEW else "")
        return f"{col} in set {{{shown}}}"
    if e == "expect_column_values_to_be_unique":
        return f"{col} unique"
    args = ", ".join(f"{k}={_fmt(v)}" for k, v in kw.items() if k != "column")
    return f"{col}: {e}({args})"


def _describe_observed(r: ExpectationResult) -> str:
    obs = r.observed if isinstance(r.observed, dict) else {"observed_value": r.observed}
    if "error" in obs:
        return "error: " + str(obs["error"]).removeprefix("Error: ")
    if r.expectation == "expect_column_to_exist":
        return "present" if r.success else "missing"
    if r.expectation == SAFE_NAMES and obs.get("unsafe_columns"):
        listed = ", ".join(f"{u['column']} ({u['problem']})" for u in obs["unsafe_columns"][:3])
        return f"{obs.get('unexpected_count')} bad: {listed}"
    if r.expectation == NO_LEAKAGE:
        if "observed_value" not in obs:
            return f"not evaluated: {obs.get('skipped')}"
        text = _leak_text(obs, rows=obs.get("rows"))
        if "skipped" in obs:
            return f"not evaluated: {obs['skipped']}; {text}"
        return text + (", came close" if obs.get("near") else "")
    if r.expectation == "expect_column_unique_value_count_to_be_between":
        value = obs.get("observed_value")
        return f"{value} distinct" + (f", all {_fmt(obs['value'])}" if "value" in obs else "")
    if "unexpected_percent" in obs:
        pct = obs.get("unexpected_percent")
        count = obs.get("unexpected_count")
        text = f"{pct:.3g}% unexpected" if isinstance(pct, (int, float)) else "unexpected"
        if isinstance(count, int) and r.expectation != "expect_column_values_to_not_be_null":
            text = f"{count} rows, " + text
        sample = list(dict.fromkeys(map(_short_repr, obs.get("partial_unexpected_list") or [])))
        if sample and r.expectation != "expect_column_values_to_not_be_null":
            text += f", e.g. [{', '.join(sample[:3])}]"
        return text
    if "observed_value" in obs:
        return f"observed {_fmt(obs['observed_value'])}"
    return "ok" if r.success else "failed"


def _short_repr(v: Any, limit: int = 40) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------- html


def render_html(report: ValidationReport, title: str) -> str:
    """A self-contained HTML page (no external assets): summary and a results table,
    failures first."""
    esc = html.escape
    rows = []
    ordered = report.failures() + [r for r in report.results if r.success]
    for r in ordered:
        status = "PASS" if r.success else "FAIL"
        rows.append(
            f'<tr class="{status.lower()}"><td>{status}</td><td>{esc(r.column or "(table)")}</td>'
            f"<td>{esc(r.expectation)}</td><td>{esc(_describe_expected(r))}</td>"
            f"<td>{esc(_describe_observed(r))}</td><td>{esc(r.source)}</td></tr>"
        )
    verdict = "PASSED" if report.success else "FAILED"
    extra = ""
    if report.extra_columns:
        extra = (
            "<p>Extra columns (allowed, not used): " + esc(", ".join(report.extra_columns)) + "</p>"
        )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{esc(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; width: 100%; font-size: 14px; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }}
th {{ background: #eee; }}
tr.fail td {{ background: #fde2e2; }}
tr.pass td:first-child {{ color: #1a7f37; }}
tr.fail td:first-child {{ color: #b00020; font-weight: bold; }}
.verdict {{ font-weight: bold; color: {"#1a7f37" if report.success else "#b00020"}; }}
</style>
</head>
<body>
<h1>{esc(title)}</h1>
<p class="verdict">Validation {verdict}: {len(report.failures())} of {len(report.results)}
expectations failed on {report.rows} rows.</p>
<p>{esc(report.summary())}</p>
{extra}
<p>Source "exact": counted over every row in a streaming pass; "gx": Great Expectations on
every row; "gx-sample": Great Expectations on a seeded sample of {report.sample_rows} rows.</p>
<table>
<thead><tr><th>Status</th><th>Column</th><th>Expectation</th><th>Expected</th>
<th>Observed</th><th>Source</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody>
</table>
</body>
</html>
"""
