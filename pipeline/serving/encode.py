"""Feature rows straight from a request's JSON rows, without building a DataFrame.

``pipeline.train.features.transform`` is the reference: it takes a DataFrame and runs
one pandas operation per column (``pd.to_numeric``, ``pd.Categorical``). On a request's
few rows that fixed cost is most of the scoring time: about 1 ms for one row of nine
columns, ten to twenty times the model's forward pass, plus the DataFrame built from
the rows first. :class:`RowEncoder` computes the same matrix from the row dicts with one
list comprehension and the same numpy expressions per column, so a request pays for what
it scores.

It is only used where it agrees with the reference: :meth:`RowEncoder.for_spec` encodes a
set of probe rows both ways (every numeric at zero, negative, large and null; every
category, an unknown one and null) and returns None, logging why, when any value
differs — the service then scores through ``transform`` as before. Rows reach it after
the contract's validator (``schema.RowValidator``), so a numeric cell is an int, a float
(or, in a ``bool`` column, a boolean) or null, and a categorical one a string or null; a
cell it cannot take (a checkpoint column the contract now types otherwise) raises, and
``LoadedModel.proba`` scores that request through ``transform``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class RowEncoder:
    """``transform(pd.DataFrame.from_records(rows, columns=spec.input_columns), spec)``
    for validated JSON rows, without pandas."""

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        log_scaled = set(spec.log_scaled)
        self._numeric = [
            (col, float(m), float(sd), col in log_scaled)
            for col, m, sd in zip(spec.numeric, spec.means, spec.scales, strict=True)
        ]
        self._categorical = [
            (col, {c: i for i, c in enumerate(cats)}, len(cats)) for col, cats in spec.categorical
        ]
        self.width = len(self._numeric) * 2 + sum(k + 1 for _, _, k in self._categorical)

    def encode(self, rows: Sequence[dict[str, Any]]) -> np.ndarray:
        """The feature matrix (rows x width, float32) of ``rows``."""
        n = len(rows)
        out = np.zeros((n, self.width), dtype=np.float64)
        j = 0
        nan = np.nan
        for col, m, sd, log_scaled in self._numeric:
            v = np.array([nan if (x := r.get(col)) is None else x for r in rows], dtype=np.float64)
            if log_scaled:
                v = np.log1p(np.clip(v, 0, None))
            missing = ~np.isfinite(v)
            out[:, j] = np.where(missing, 0.0, (v - m) / sd)
            out[:, j + 1] = missing
            j += 2
        at = np.arange(n)
        for col, index, k in self._categorical:
            codes = [index.get(r.get(col), k) for r in rows]  # null or unknown: slot k
            out[at, j + np.asarray(codes, dtype=np.intp)] = 1.0
            j += k + 1
        return out.astype(np.float32)

    @classmethod
    def for_spec(cls, spec: Any) -> RowEncoder | None:
        """An encoder that agrees with ``transform`` on probe rows for ``spec``, or None."""
        try:
            enc = cls(spec)
            rows = probe_rows(spec)
            mine = enc.encode(rows)
            ref = _reference(spec, rows)
        except Exception as exc:  # noqa: BLE001 - the reference path keeps serving
            log.warning("row encoder unavailable (%s: %s); scoring through pandas", type(exc), exc)
            return None
        if mine.shape != ref.shape or not np.array_equal(mine, ref, equal_nan=True):
            log.warning(
                "row encoder disagrees with features.transform on probe rows "
                "(shape %s vs %s); scoring through pandas",
                mine.shape,
                ref.shape,
            )
            return None
        return enc


def probe_rows(spec: Any) -> list[dict[str, Any]]:
    """Rows covering each numeric column's zero, sign, magnitude and null, and each
    categorical column's every category, an unknown one and null."""
    numbers: list[Any] = [0.0, 1, -3.5, 12.25, 1e6, 123456789, None, True, False]
    rows = []
    width = max([len(numbers)] + [len(cats) + 2 for _, cats in spec.categorical])
    for i in range(width):
        row: dict[str, Any] = {
            c: numbers[(i + k) % len(numbers)] for k, c in enumerate(spec.numeric)
        }
        for k, (c, cats) in enumerate(spec.categorical):
            choices = [*cats, "\x00unknown", None]
            row[c] = choices[(i + k) % len(choices)]
        rows.append(row)
    return rows


def _reference(spec: Any, rows: list[dict[str, Any]]) -> np.ndarray:
    import pandas as pd

    from pipeline.train.features import transform

    return transform(pd.DataFrame.from_records(rows, columns=spec.input_columns), spec)
