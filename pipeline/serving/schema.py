"""Request rows checked against the data contract, before any model sees them.

Only the contract's feature columns are checked (id, time and label columns, and any
other extra field, are ignored). Each problem names its row and field; a request with
any problem is refused whole with 422, so a caller never gets a partial answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pipeline.contract import Column, DataContract

MAX_ERRORS = 50


@dataclass(frozen=True)
class RowProblem:
    row: int
    field: str | None
    error: str

    def to_dict(self) -> dict[str, Any]:
        return {"row": self.row, "field": self.field, "error": self.error}

    def __str__(self) -> str:
        where = f"row {self.row}" + (f" field {self.field!r}" if self.field else "")
        return f"{where}: {self.error}"


class BadRequest(ValueError):
    """The body is not one row, a list of rows or ``{"rows": [...]}`` (answered 400)."""


class RowsInvalid(ValueError):
    """Rows break the contract (answered 422); ``problems`` lists each one."""

    def __init__(self, problems: list[RowProblem]) -> None:
        self.problems = problems
        more = "" if len(problems) < MAX_ERRORS else f" (first {MAX_ERRORS} shown)"
        super().__init__(f"{len(problems)} problem(s){more}; first: {problems[0]}")


def rows_of(body: Any, max_rows: int) -> list[Any]:
    """The rows of a request body: an object, a list of objects, or ``{"rows": [...]}``."""
    if isinstance(body, dict) and "rows" in body:
        rows = body["rows"]
        if not isinstance(rows, list):
            raise BadRequest("'rows' must be a JSON array of row objects")
    elif isinstance(body, list):
        rows = body
    elif isinstance(body, dict):
        rows = [body]
    else:
        raise BadRequest("body must be a JSON object (one row), an array of objects, or "
                         '{"rows": [...]}')  # fmt: skip
    if not rows:
        raise BadRequest("no rows to score")
    if len(rows) > max_rows:
        raise BadRequest(f"{len(rows)} rows in one request; at most {max_rows}")
    return rows


class RowValidator:
    """Checks raw JSON rows against the contract's feature columns."""

    def __init__(self, contract: DataContract, columns: list[str] | None = None) -> None:
        names = columns or [c.name for c in contract.features]
        self.columns: list[Column] = [contract.column(n) for n in names]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    def check(self, rows: list[Any]) -> None:
        problems: list[RowProblem] = []
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                problems.append(RowProblem(i, None, f"row must be a JSON object, got {_kind(row)}"))
            else:
                for col in self.columns:
                    p = self._cell(col, row)
                    if p is not None:
                        problems.append(RowProblem(i, col.name, p))
            if len(problems) >= MAX_ERRORS:
                break
        if problems:
            raise RowsInvalid(problems[:MAX_ERRORS])

    @staticmethod
    def _cell(col: Column, row: dict[str, Any]) -> str | None:
        if col.name not in row:
            return "required field is missing"
        v = row[col.name]
        if v is None:
            return None if col.nullable else "null is not allowed (the contract says not nullable)"
        t = col.type
        if t == "category":
            if not isinstance(v, str):
                return f"expected one of the categories (a string), got {_kind(v)}"
            if v not in col.categories:
                return f"unknown category {v!r}; expected one of {list(col.categories)}"
            return None
        if t == "string":
            return None if isinstance(v, str) else f"expected a string, got {_kind(v)}"
        if t == "bool":
            if isinstance(v, bool) or v in (0, 1):
                return None
            return f"expected a boolean, got {_kind(v)}"
        if t in ("float", "int"):
            if isinstance(v, bool) or not isinstance(v, int | float):
                return f"expected a number, got {_kind(v)}"
            if not math.isfinite(v):
                return f"{v} is not a finite number"
            if t == "int" and float(v) != int(v):
                return f"expected an integer, got {v}"
            if col.min is not None and v < col.min:
                return f"{v} is below the minimum {col.min}"
            if col.max is not None and v > col.max:
                return f"{v} is above the maximum {col.max}"
            return None
        return None  # timestamp: not a model feature


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: f"the string {v!r}",
            list: "an array", dict: "an object"}.get(type(v), type(v).__name__)  # fmt: skip
