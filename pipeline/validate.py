"""Contract validation of a batch with Great Expectations 1.x.

The expectation suite is generated from the :class:`~pipeline.contract.DataContract`
(columns, bounds, categories, nulls, uniqueness, row count, label values, no
future event times) plus the contract's ``extra_expectations``. Validation runs
in an ephemeral GX context against an in-memory pandas dataframe, and the GX
result is flattened into a small, JSON-safe :class:`ValidationReport`.

``great_expectations`` is imported inside the functions: it takes seconds to import.
"""

from __future__ import annotations

import html
import math
from dataclasses import asdict, dataclass
from datetime import date, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipeline.contract import DataContract

if TYPE_CHECKING:
    from great_expectations.core.expectation_suite import ExpectationSuite

PARTIAL_UNEXPECTED = 10
_SET_PREVIEW = 5
_SUMMARY_FAILURES = 5


@dataclass(frozen=True)
class ExpectationResult:
    expectation: str
    column: str | None
    success: bool
    observed: Any
    expected: dict[str, Any]

    def describe(self) -> str:
        """Short human description: what was expected, what was seen."""
        return f"{_describe_expected(self)} ({_describe_observed(self)})"


@dataclass(frozen=True)
class ValidationReport:
    success: bool
    rows: int
    results: list[ExpectationResult]

    def failures(self) -> list[ExpectationResult]:
        return [r for r in self.results if not r.success]

    def summary(self) -> str:
        failed = self.failures()
        total = len(self.results)
        prefix = "empty batch (0 rows); " if self.rows == 0 else ""
        if not failed:
            return f"{prefix}all {total} expectations passed on {self.rows} rows"
        details = "; ".join(r.describe() for r in failed[:_SUMMARY_FAILURES])
        if len(failed) > _SUMMARY_FAILURES:
            details += f"; and {len(failed) - _SUMMARY_FAILURES} more"
        return (
            f"{prefix}{len(failed)} of {total} expectations failed on {self.rows} rows: {details}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "success": self.success,
            "rows": self.rows,
            "failed": len(self.failures()),
            "evaluated": len(self.results),
            "summary": self.summary(),
            "results": [_jsonable(asdict(r)) for r in self.results],
        }


# --------------------------------------------------------------------------- suite


def _expectation(name: str, **kwargs: Any) -> Any:
    from great_expectations.expectations.registry import get_expectation_impl

    try:
        cls = get_expectation_impl(name)
    except Exception as exc:  # ExpectationNotFoundError
        raise ValueError(f"unknown Great Expectations expectation {name!r}") from exc
    try:
        return cls(**kwargs)
    except Exception as exc:  # pydantic validation error on bad kwargs
        raise ValueError(f"bad arguments for {name} {kwargs!r}: {exc}") from exc


def build_suite(contract: DataContract, now: pd.Timestamp) -> ExpectationSuite:
    """The expectation suite a batch must satisfy under ``contract``.

    ``now`` bounds the time column from above (no events in the future); it is a
    parameter so validation is deterministic. Extra columns in a batch are allowed.
    """
    import great_expectations as gx

    expectations: list[Any] = []
    add = expectations.append

    add(
        _expectation(
            "expect_table_row_count_to_be_between",
            # never below 1: map expectations pass vacuously on an empty batch
            min_value=max(1, contract.min_rows),
            max_value=contract.max_rows,
        )
    )
    for col in contract.columns:
        name = col.name
        add(_expectation("expect_column_to_exist", column=name))
        if col.max_null_fraction > 0:
            mostly = round(1.0 - col.max_null_fraction, 10)
            add(_expectation("expect_column_values_to_not_be_null", column=name, mostly=mostly))
        elif not col.nullable:
            add(_expectation("expect_column_values_to_not_be_null", column=name))
        if col.is_numeric and (col.min is not None or col.max is not None):
            add(
                _expectation(
                    "expect_column_values_to_be_between",
                    column=name,
                    min_value=col.min,
                    max_value=col.max,
                )
            )
        if col.is_categorical:
            add(
                _expectation(
                    "expect_column_values_to_be_in_set",
                    column=name,
                    value_set=list(col.categories),
                )
            )
        if col.unique:
            add(_expectation("expect_column_values_to_be_unique", column=name))
    add(
        _expectation(
            "expect_column_values_to_be_in_set",
            column=contract.target,
            value_set=list(contract.target_values),
        )
    )
    add(
        _expectation(
            "expect_column_values_to_be_between",
            column=contract.time_column,
            max_value=pd.Timestamp(now),
        )
    )
    for i, spec in enumerate(contract.extra_expectations):
        try:
            name, kwargs = spec["type"], dict(spec.get("kwargs", {}))
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"contract expectation #{i} must look like {{type: ..., kwargs: {{...}}}}, "
                f"got {spec!r}"
            ) from None
        add(_expectation(name, **kwargs))
    # Passed to the constructor, not via suite.add_expectation(), which needs an active context.
    return gx.ExpectationSuite(name=f"{contract.name}_contract", expectations=expectations)


# --------------------------------------------------------------------------- validation


def _align_now(now: pd.Timestamp, df: pd.DataFrame, time_column: str) -> pd.Timestamp:
    """``now`` in the time zone convention of the batch's time column (aware vs naive)."""
    now = pd.Timestamp(now)
    if time_column not in df.columns:
        return now
    dtype = df[time_column].dtype
    if not pd.api.types.is_datetime64_any_dtype(dtype):
        return now
    column_tz = getattr(dtype, "tz", None)
    if column_tz is not None:
        return now.tz_localize("UTC") if now.tzinfo is None else now.tz_convert(column_tz)
    return now.tz_convert("UTC").tz_localize(None) if now.tzinfo is not None else now


def validate_frame(df: pd.DataFrame, contract: DataContract, now: pd.Timestamp) -> ValidationReport:
    """Validate ``df`` against ``contract``; never raises on bad data, only reports it."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    suite = build_suite(contract, _align_now(now, df, contract.time_column))
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    asset = context.data_sources.add_pandas("contract_batch").add_dataframe_asset("frame")
    batch = asset.add_batch_definition_whole_dataframe("whole").get_batch(
        batch_parameters={"dataframe": df}
    )
    gx_result = batch.validate(
        suite,
        result_format={"result_format": "SUMMARY", "partial_unexpected_count": PARTIAL_UNEXPECTED},
    )

    order = {c.name: i for i, c in enumerate(contract.columns)}
    results = sorted(
        (_convert(r) for r in gx_result.results),
        key=lambda r: (
            -1 if r.column is None else order.get(r.column, len(order)),
            r.column or "",
            r.expectation,
            repr(r.expected),
        ),
    )
    return ValidationReport(
        success=bool(gx_result.success),
        rows=len(df),
        results=results,
    )


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
    args = ", ".join(f"{k}={_fmt(v)}" for k, v in kw.items())
    return f"{col}: {e}({args})"


def _describe_observed(r: ExpectationResult) -> str:
    obs = r.observed if isinstance(r.observed, dict) else {"observed_value": r.observed}
    if "error" in obs:
        return "error: " + str(obs["error"]).removeprefix("Error: ")
    if r.expectation == "expect_column_to_exist":
        return "present" if r.success else "missing"
    if "unexpected_percent" in obs:
        pct = obs.get("unexpected_percent")
        text = f"{pct:.3g}% unexpected" if isinstance(pct, (int, float)) else "unexpected"
        sample = list(dict.fromkeys(map(repr, obs.get("partial_unexpected_list") or [])))
        if sample and r.expectation != "expect_column_values_to_not_be_null":
            text += f", e.g. [{', '.join(sample[:3])}]"
        return text
    if "observed_value" in obs:
        return f"observed {_fmt(obs['observed_value'])}"
    return "ok" if r.success else "failed"


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
            f"<td>{esc(_describe_observed(r))}</td></tr>"
        )
    verdict = "PASSED" if report.success else "FAILED"
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
<table>
<thead><tr><th>Status</th><th>Column</th><th>Expectation</th><th>Expected</th>
<th>Observed</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody>
</table>
</body>
</html>
"""
