"""One shape for every benchmark's verdict: its targets, each met or missed, on its last line.

Each benchmark ends with ``print(finish(result, targets))``: one JSON line carrying the
benchmark's figures, a ``targets`` object ``{name: {"value", "target", "met"}}`` and ``met``
(all of them). ``make bench`` collects those lines and prints one table
(:mod:`benchmarks.table`). A missed target is a result, reported in the table; a benchmark
exits non-zero only when it could not measure at all.

    targets = [target("ratio", result["ratio"], "<=", 1.03)]
"""

from __future__ import annotations

import json
import math
import operator
from typing import Any

_OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt, "==": operator.eq}


def target(name: str, value: Any, op: str, bound: Any) -> dict[str, Any]:
    """One target: ``value op bound``. A missing or NaN value is a miss (nothing measured)."""
    if op not in _OPS:
        raise ValueError(f"target {name}: operator {op!r} is not one of {sorted(_OPS)}")
    absent = value is None or (isinstance(value, float) and math.isnan(value))
    met = False if absent else bool(_OPS[op](value, bound))
    return {"name": name, "value": value, "target": f"{op} {bound}", "met": met}


def finish(result: dict[str, Any], targets: list[dict[str, Any]]) -> str:
    """The benchmark's last line: ``result`` plus its targets and whether all were met."""
    out = dict(result)
    out["targets"] = {t["name"]: {k: t[k] for k in ("value", "target", "met")} for t in targets}
    out["met"] = all(t["met"] for t in targets)
    return json.dumps(out, default=_plain, allow_nan=False)


def _plain(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON")
