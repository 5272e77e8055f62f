"""Request rows checked against the data contract, before any model sees them.

Only the contract's feature columns are checked (id, time and label columns, and any
other extra field, are ignored). Each problem names its row and field; a request with
any problem is refused whole with 422, so a caller never gets a partial answer.

Two request forms give the rows: ``/predict``'s (one row object, an array of them, or
``{"rows": [...]}``, :func:`rows_of`) and the Open Inference Protocol's (KServe v2)
``/v2/models/{name}/infer`` (:func:`infer_request`): one input tensor per feature column,
``{"inputs": [{"name": "<column>", "datatype": "FP64", "shape": [2], "data": [12.5, 80]},
...]}`` — or, for convenience, ``{"inputs": [row objects]}``.

Bodies are parsed strictly (:func:`parse_json`): ``NaN``, ``Infinity``, a number beyond
float range (``1e400``) and an integer beyond 64 bits (one 400 characters long) are refused as
400 before anything reads them, so no number ever reaches a model, a comparison or a
float conversion it could break.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from pipeline.contract import Column, DataContract

MAX_ERRORS = 50
INT_LIMIT = 1 << 64  # |int| below this: what OIP's INT64 / UINT64 tensors carry


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


def _constant(name: str) -> Any:
    raise BadRequest(f"{name} is not a JSON number: send a finite number or null")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadRequest(f"number {text[:40]} is out of range (beyond a 64-bit float)")
    return value


def _int(text: str) -> int:
    magnitude = text.lstrip("-")
    if len(magnitude) > 20 or abs(int(text)) >= INT_LIMIT:
        shown = text if len(text) <= 40 else f"{text[:20]}...({len(magnitude)} characters)"
        raise BadRequest(f"integer {shown} is out of range (at most 64 bits)")
    return int(text)


# Every digit to "0", exponent letters to "e", signs to "s": a number that could be out of
# range shows as a run of 20 zeros or an exponent of three digits or more in the image.
_NUMBER_IMAGE = bytes.maketrans(b"0123456789Ee+-", b"0000000000eess")
_LONG_RUN = b"0" * 20


def _numbers_in_range(raw: bytes) -> bool:
    """True when no number in ``raw`` can be out of range: with no run of 20 digits an
    integer is below 10**19 < 2**64, and with no exponent of three digits a float is below
    1e19 * 10**99. (False: maybe; the checked parse decides.)"""
    image = raw.translate(_NUMBER_IMAGE)
    return _LONG_RUN not in image and b"e000" not in image and b"es000" not in image


def parse_json(raw: bytes) -> Any:
    """A request body as JSON, strictly: BadRequest (400) for invalid JSON, ``NaN`` /
    ``Infinity``, or a number out of range.

    A body whose numbers are all in range by :func:`_numbers_in_range` (nearly every one)
    is parsed by the C scanner alone; the others with a check per number, which costs a
    Python call for each and doubles the parse time of a numeric body."""
    try:
        if isinstance(raw, bytes | bytearray) and _numbers_in_range(raw):
            return json.loads(raw, parse_constant=_constant)
        return json.loads(raw, parse_constant=_constant, parse_float=_float, parse_int=_int)
    except BadRequest:
        raise
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from None


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
        raise BadRequest(
            'body must be a JSON object (one row), an array of objects, or {"rows": [...]}'
        )
    if not rows:
        raise BadRequest("no rows to score")
    if len(rows) > max_rows:
        raise BadRequest(f"{len(rows)} rows in one request; at most {max_rows}")
    return rows


#: Open Inference Protocol tensor datatypes, and the contract column types each may carry.
OIP_NUMERIC = (
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
)
OIP_FITS: dict[str, tuple[str, ...]] = {
    "float": (*OIP_NUMERIC,),
    "int": (*OIP_NUMERIC,),
    "bool": ("BOOL", *OIP_NUMERIC),
    "category": ("BYTES",),
    "string": ("BYTES",),
    "timestamp": ("BYTES", "INT64"),
}
OIP_DATATYPE = {
    "float": "FP64",
    "int": "INT64",
    "bool": "BOOL",
    "category": "BYTES",
    "string": "BYTES",
    "timestamp": "BYTES",
}


@dataclass(frozen=True)
class InferRequest:
    """An OIP inference request, as rows: its ``id``, ``parameters`` and the names of the
    outputs it asked for (empty: all)."""

    rows: list[Any]
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    outputs: tuple[str, ...] = ()


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    for d in data:
        out.extend(_flatten(d) if isinstance(d, list) else [d])
    return out


def _is_tensor(item: Any) -> bool:
    return isinstance(item, dict) and isinstance(item.get("name"), str) and "data" in item


def infer_request(
    body: Any, max_rows: int, contract_types: dict[str, str] | None = None
) -> InferRequest:
    """The rows of an OIP request: one input per column (each of shape ``[N]`` or
    ``[N, 1]``, the same N), or ``{"inputs": [row objects]}``. BadRequest (400) names the
    input when the tensors are malformed (shape, length, datatype); ``contract_types``
    (column -> contract type) checks that each known column's datatype can carry it.
    Inputs that are not contract features are ignored, as extra fields of a row are."""
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
        raise BadRequest(
            'an inference request is {"inputs": [{"name", "datatype", "shape", '
            '"data"}, ...]} (one input per feature column) or {"inputs": [row '
            "objects]}"
        )
    inputs = body["inputs"]
    if not inputs:
        raise BadRequest("'inputs' is empty: no rows to score")
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequest("'parameters' must be a JSON object")
    wanted = body.get("outputs") or []
    if not isinstance(wanted, list) or not all(
        isinstance(o, dict) and isinstance(o.get("name"), str) for o in wanted
    ):
        raise BadRequest("'outputs' must be an array of {\"name\": ...} objects")
    rid = body.get("id")
    rid = None if rid is None else str(rid)
    outputs = tuple(str(o["name"]) for o in wanted)
    if not all(_is_tensor(i) for i in inputs):
        if any(_is_tensor(i) for i in inputs):
            raise BadRequest(
                "'inputs' mixes tensors ({name, datatype, shape, data}) and row objects"
            )
        if len(inputs) > max_rows:
            raise BadRequest(f"{len(inputs)} rows in one request; at most {max_rows}")
        return InferRequest(inputs, rid, params, outputs)
    columns: dict[str, list[Any]] = {}
    n: int | None = None
    for t in inputs:
        name = t["name"]
        if name in columns:
            raise BadRequest(f"input {name!r} is given twice")
        data = _flatten(t["data"])
        shape = t.get("shape")
        if shape is not None:
            if not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
            ):
                raise BadRequest(f"input {name!r}: shape must be an array of non-negative integers")
            if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
                raise BadRequest(
                    f"input {name!r}: shape {shape}: one input per column has shape [N] or [N, 1]"
                )
            if shape[0] != len(data):
                raise BadRequest(f"input {name!r}: shape {shape} but {len(data)} values in data")
        dtype = t.get("datatype")
        if dtype is not None:
            if dtype not in (*OIP_NUMERIC, "BOOL", "BYTES"):
                raise BadRequest(f"input {name!r}: unknown datatype {dtype!r}")
            ctype = (contract_types or {}).get(name)
            if ctype is not None and dtype not in OIP_FITS.get(ctype, (dtype,)):
                raise BadRequest(
                    f"input {name!r}: datatype {dtype} cannot carry the contract's "
                    f"{ctype} column; use {OIP_DATATYPE[ctype]}"
                )
        if n is None:
            n = len(data)
        elif len(data) != n:
            raise BadRequest(
                f"input {name!r} has {len(data)} values, the others {n}: every "
                "input is one column of the same rows"
            )
        columns[name] = data
    assert n is not None
    if n == 0:
        raise BadRequest("no rows to score")
    if n > max_rows:
        raise BadRequest(f"{n} rows in one request; at most {max_rows}")
    names = list(columns)
    rows = [{c: columns[c][i] for c in names} for i in range(n)]
    return InferRequest(rows, rid, params, outputs)


class RowValidator:
    """Checks raw JSON rows against the contract's feature columns."""

    def __init__(self, contract: DataContract, columns: list[str] | None = None) -> None:
        names = columns or [c.name for c in contract.features]
        self.columns: list[Column] = [contract.column(n) for n in names]
        self._categories = {c.name: frozenset(c.categories) for c in self.columns}

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def types(self) -> dict[str, str]:
        return {c.name: c.type for c in self.columns}

    def check(self, rows: list[Any]) -> None:
        """RowsInvalid naming each problem (row, field) when a row breaks the contract.

        Valid rows — nearly every request — are confirmed column by column, a few C-level
        passes over each column's values (:meth:`plainly_valid`); only a request that
        fails them is walked cell by cell (:meth:`problems`) to name its problems."""
        if self.plainly_valid(rows):
            return
        problems = self.problems(rows)
        if problems:
            raise RowsInvalid(problems)

    def plainly_valid(self, rows: list[Any]) -> bool:
        """True only when :meth:`problems` would find none (False: it decides)."""
        return (
            bool(rows)
            and all(type(r) is dict for r in rows)
            and all(self._column_ok(col, rows) for col in self.columns)
        )

    def problems(self, rows: list[Any]) -> list[RowProblem]:
        """The first MAX_ERRORS problems, walking row by row, cell by cell."""
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
        return problems[:MAX_ERRORS]

    def _column_ok(self, col: Column, rows: list[dict[str, Any]]) -> bool:
        """True only when :meth:`_cell` finds no problem in ``col`` of any row."""
        try:
            values = [r[col.name] for r in rows]
        except KeyError:  # a missing field
            return False
        kinds = set(map(type, values))
        if NONE_TYPE in kinds:
            if not col.nullable:
                return False
            kinds.discard(NONE_TYPE)
            values = [v for v in values if v is not None]
        if not kinds:
            return True
        t = col.type
        if t == "category":
            return kinds == {str} and self._categories[col.name].issuperset(values)
        if t == "string":
            return kinds == {str}
        if t == "bool":
            return kinds == {bool}
        if t in ("float", "int"):
            if not kinds <= {int, float}:
                return False
            if float in kinds:
                floats = [v for v in values if type(v) is float]
                if not all(map(math.isfinite, floats)):
                    return False
                if t == "int" and not all(v.is_integer() for v in floats):
                    return False
            lo, hi = min(values), max(values)
            if t == "int" and (lo < -EXACT_INT or hi > EXACT_INT):
                return False  # beyond 2**53 float(v) != int(v) may hold: _cell decides
            return (col.min is None or lo >= col.min) and (col.max is None or hi <= col.max)
        return True  # timestamp: not a model feature; present is all _cell asks

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


NONE_TYPE = type(None)
EXACT_INT = 2**53  # every int up to this is exactly a float


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: f"the string {v!r}",
        list: "an array",
        dict: "an object",
    }.get(type(v), type(v).__name__)
