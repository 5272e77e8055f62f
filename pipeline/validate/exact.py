"""The exact-result mapping: from the statistics of the streaming pass
(:class:`pipeline.validate.scan.ColumnStats`) to each generated check's verdict and
observation (the leakage check apart: :mod:`pipeline.validate.leakage`).

Pure: no Arrow, no GX, no storage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.validate.report import PARTIAL_UNEXPECTED, SAFE_NAMES, TYPE_CHECK, display_name

if TYPE_CHECKING:
    from pipeline.validate.checks import ContractCheck
    from pipeline.validate.scan import ColumnStats

Outcome = tuple[bool, dict[str, Any]]


def exact_outcome(
    check: ContractCheck,
    rows: int,
    cols: dict[str, ColumnStats],
    unsafe: dict[str, str],
    duplicated: list[str],
) -> Outcome:
    """(success, observed) of ``check`` over every row: ``rows`` read, the declared
    columns' statistics, the unsafe column names (with why) and the repeated ones."""
    e, kw = check.expectation, check.kwargs
    if e == "expect_table_row_count_to_be_between":
        lo, hi = kw.get("min_value"), kw.get("max_value")
        ok = (lo is None or rows >= lo) and (hi is None or rows <= hi)
        return ok, {"observed_value": rows}
    if e == SAFE_NAMES:
        bad = [{"column": display_name(n), "problem": p} for n, p in unsafe.items()]
        bad += [
            {"column": display_name(n), "problem": "appears more than once"} for n in duplicated
        ]
        return not bad, {
            "unsafe_columns": bad[:PARTIAL_UNEXPECTED],
            "unexpected_count": len(bad),
        }
    return _column_outcome(check, cols[check.column], rows)  # type: ignore[index]


def _column_outcome(check: ContractCheck, col: ColumnStats, rows: int) -> Outcome:
    """A check of one declared column: existence and type first, then its values."""
    e, kw = check.expectation, check.kwargs
    if e == "expect_column_to_exist":
        return col.present >= 1, {"exists": col.present >= 1}
    if col.present == 0:
        return False, {"error": f'column "{col.name}" does not exist in the batch'}
    if col.present > 1:
        return False, {"error": f'column "{col.name}" appears {col.present} times in the batch'}
    if e == "expect_column_values_to_not_be_null":
        mostly = kw.get("mostly")
        ok = col.nulls == 0 if mostly is None else rows == 0 or (rows - col.nulls) / rows >= mostly
        return ok, {
            "element_count": rows,
            "unexpected_count": col.nulls,
            "unexpected_percent": _pct(col.nulls, rows),
        }
    if e == TYPE_CHECK:
        return col.type_ok, {"observed_value": col.arrow_type, "contract_type": col.type}
    if not col.type_ok:
        return False, {
            "error": f"column {col.name} has type {col.arrow_type}, the contract "
            f"says {col.type}: values not checked"
        }
    return _values_outcome(check, col, rows - col.nulls)


def _values_outcome(check: ContractCheck, col: ColumnStats, nonnull: int) -> Outcome:
    """A check of the values of a present, well-typed column."""
    e, kw = check.expectation, check.kwargs
    if e == "expect_column_values_to_be_between" and col.type == "timestamp":
        return col.future == 0, _map(nonnull, col.nulls, col.future, col.future_examples)
    if e == "expect_column_values_to_be_between":
        return col.out_of_range == 0, _map(nonnull, col.nulls, col.out_of_range, col.range_examples)
    if e == "expect_column_values_to_be_in_set":
        allowed = set(kw["value_set"])
        unknown = sum(k for v, k in col.counts.items() if v not in allowed)
        return unknown == 0, _map(nonnull, col.nulls, unknown, col.unknown_examples)
    if e == "expect_column_values_to_be_unique":
        return col.duplicates == 0, _map(nonnull, col.nulls, col.duplicates, col.duplicate_examples)
    if e == "expect_column_unique_value_count_to_be_between":
        return _distinct_outcome(col, kw, nonnull)
    raise ValueError(f"no exact implementation for {e}")  # pragma: no cover


def _distinct_outcome(col: ColumnStats, kw: dict[str, Any], nonnull: int) -> Outcome:
    """Not constant: distinct values counted exactly for counted columns, else only
    whether the column varies (``">=2"``)."""
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


def _map(nonnull: int, nulls: int, unexpected: int, examples: list[Any]) -> dict[str, Any]:
    return {
        "element_count": nonnull + nulls,
        "missing_count": nulls,
        "unexpected_count": unexpected,
        "unexpected_percent": _pct(unexpected, nonnull),
        "partial_unexpected_list": examples[:PARTIAL_UNEXPECTED],
    }


def _pct(k: int, n: int) -> float:
    return 100.0 * k / n if n else 0.0
