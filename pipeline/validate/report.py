"""The validation report: result types, their text (summary, descriptions) and the HTML page.

Pure: the standard library, numpy and pandas only (no Great Expectations, no Arrow, no
storage), so the report can be built, read and rendered without the validation machinery.
"""

from __future__ import annotations

import html
import math
from dataclasses import asdict, dataclass, field
from datetime import date, datetime
from typing import Any

import numpy as np
import pandas as pd

PARTIAL_UNEXPECTED = 10
MAX_NAME_CHARS = 256
SET_PREVIEW = 5
_SUMMARY_FAILURES = 5
NO_TIME_COLUMN_NOTE = "no time column in the contract: time checks skipped"

# Checks Great Expectations has no expectation for: computed by the streaming pass only.
READABLE = "expect_batch_to_be_readable_parquet"
SAFE_NAMES = "expect_column_names_to_be_safe_and_unique"
NO_LEAKAGE = "expect_column_to_not_predict_target_alone"
TYPE_CHECK = "expect_column_values_to_be_in_type_list"


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
        return f"{describe_expected(self)} ({describe_observed(self)})"


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
            shown = ", ".join(self.extra_columns[:SET_PREVIEW])
            more = len(self.extra_columns) - SET_PREVIEW
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
            "results": [jsonable(asdict(r)) for r in self.results],
        }


def _primary(failed: list[ExpectationResult]) -> list[ExpectationResult]:
    """Failures worth naming first: a missing or mistyped column hides the checks that could
    not run because of it (they stay in the report)."""
    missing = {r.column for r in failed if r.expectation == "expect_column_to_exist"}
    mistyped = {r.column for r in failed if r.expectation == TYPE_CHECK}
    out = []
    for r in failed:
        if r.column in missing and r.expectation != "expect_column_to_exist":
            continue
        if r.column in mistyped and r.expectation != TYPE_CHECK and "error" in (r.observed or {}):
            continue
        out.append(r)
    return out


def with_changes(r: ExpectationResult, **changes: Any) -> ExpectationResult:
    """``r`` with some fields replaced."""
    return ExpectationResult(**{**asdict(r), **changes})


def jsonable(value: Any) -> Any:
    """Plain JSON types only: numpy scalars unboxed, times as ISO strings, NaN as None."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset, np.ndarray)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, (pd.Timestamp, datetime, date)):
        return value.isoformat()
    if value is pd.NaT or value is pd.NA:
        return None
    return str(value)


# --------------------------------------------------------------------------- names


def display_name(name: str, limit: int = 60) -> str:
    """A column name safe to print: as is when harmless, else repr'd and shortened."""
    if name_problem(name) is None and len(name) <= limit:
        return name
    text = repr(name)
    if len(text) <= limit:
        return text
    suffix = f"…({len(name)} chars)"
    return text[: limit - len(suffix)] + suffix


def name_problem(name: str) -> str | None:
    """Why a column name is unsafe (``None`` when it is safe)."""
    if not name:
        return "empty"
    if len(name) > MAX_NAME_CHARS:
        return f"{len(name)} characters (max {MAX_NAME_CHARS})"
    if any(not ch.isprintable() for ch in name):
        return "control characters (e.g. newline)"
    if "/" in name or "\\" in name or name.startswith(".") or ".." in name:
        return "path characters ('/', '\\\\', '..' or a leading '.')"
    return None


# --------------------------------------------------------------------------- text


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def describe_expected(r: ExpectationResult) -> str:
    """What ``r`` expected, in words."""
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
        return _describe_leakage_expected(r)
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
        shown = ", ".join(values[:SET_PREVIEW]) + (", ..." if len(values) > SET_PREVIEW else "")
        return f"{col} in set {{{shown}}}"
    if e == "expect_column_values_to_be_unique":
        return f"{col} unique"
    args = ", ".join(f"{k}={_fmt(v)}" for k, v in kw.items() if k != "column")
    return f"{col}: {e}({args})"


def _describe_leakage_expected(r: ExpectationResult) -> str:
    kw, col = r.expected, r.column or "table"
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


def describe_observed(r: ExpectationResult) -> str:
    """What was seen for ``r``, in words."""
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
        text = leak_text(obs, rows=obs.get("rows"))
        if "skipped" in obs:
            return f"not evaluated: {obs['skipped']}; {text}"
        return text + (", came close" if obs.get("near") else "")
    if r.expectation == "expect_column_unique_value_count_to_be_between":
        value = obs.get("observed_value")
        return f"{value} distinct" + (f", all {_fmt(obs['value'])}" if "value" in obs else "")
    if "unexpected_percent" in obs:
        return _describe_unexpected(r, obs)
    if "observed_value" in obs:
        return f"observed {_fmt(obs['observed_value'])}"
    return "ok" if r.success else "failed"


def _describe_unexpected(r: ExpectationResult, obs: dict[str, Any]) -> str:
    pct = obs.get("unexpected_percent")
    count = obs.get("unexpected_count")
    text = f"{pct:.3g}% unexpected" if isinstance(pct, (int, float)) else "unexpected"
    if isinstance(count, int) and r.expectation != "expect_column_values_to_not_be_null":
        text = f"{count} rows, " + text
    sample = list(dict.fromkeys(map(_short_repr, obs.get("partial_unexpected_list") or [])))
    if sample and r.expectation != "expect_column_values_to_not_be_null":
        text += f", e.g. [{', '.join(sample[:3])}]"
    return text


def leak_text(obs: dict[str, Any], rows: int | None = None) -> str:
    """A leakage observation in words: AUC, rows, class and reference."""
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
            f"<td>{esc(r.expectation)}</td><td>{esc(describe_expected(r))}</td>"
            f"<td>{esc(describe_observed(r))}</td><td>{esc(r.source)}</td></tr>"
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
