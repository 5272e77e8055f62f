"""The exact streaming pass: every exact statistic in one read of the batch, plus the
bounded sample that GX and the leakage check see.

- :class:`ColumnStats`: what one declared column accumulates, record batch by record batch
  (nulls, range, value counts, future times, distinct values, id hashes);
- :func:`resolve_duplicates`: the exact duplicate count from the id hashes (a second pass
  over the ids whose hashes collide);
- :class:`Scan`: the pass itself, the sample, and the exact results by check (the mapping
  from statistics to results is :mod:`pipeline.validate.exact`, the leakage check
  :mod:`pipeline.validate.leakage`).

pyarrow is imported inside the functions.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipeline.contract import Column, DataContract
from pipeline.validate.arrow import arrow_type_ok, decode, floats, hash_values, pa_types
from pipeline.validate.checks import ContractCheck
from pipeline.validate.exact import exact_outcome
from pipeline.validate.leakage import Reference, leakage_outcome
from pipeline.validate.report import (
    NO_LEAKAGE,
    PARTIAL_UNEXPECTED,
    ExpectationResult,
    jsonable,
    name_problem,
)

if TYPE_CHECKING:
    import pyarrow as pa

    from pipeline.ingest import TableSource


@dataclass
class ColumnStats:
    """The exact statistics of one declared column, accumulated over the record batches."""

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

    def update(
        self, spec: Column, arr: pa.Array, target_values: list[Any] | None, now: pd.Timestamp
    ) -> None:
        """Add one record batch's column ``arr``; ``target_values`` when it is the label."""
        if not self.type_ok:
            self._count_untyped_nulls(arr)
            return
        if not spec.is_categorical:
            arr = decode(arr)
        if spec.is_numeric:
            self._update_numeric(spec, arr)
            if target_values is not None:
                self.count(arr, target_values)
        elif spec.is_categorical:
            self.nulls += arr.null_count
            self.count(arr, list(spec.categories))
        elif spec.type == "timestamp":
            self.nulls += arr.null_count
            self._update_future(arr, now)
        else:
            self.nulls += arr.null_count
            if target_values is not None:
                self.count(arr, target_values)
        if spec.unique:
            self._add_hashes(arr)
        elif spec.type in ("string", "bool", "timestamp") and not self.varies:
            self._update_distinct(arr)

    def _count_untyped_nulls(self, arr: pa.Array) -> None:
        """A mistyped column: only its nulls (null or NaN) are counted."""
        if pa_types().is_floating(arr.type):
            self.nulls += int(np.isnan(floats(arr)).sum())
        else:
            self.nulls += arr.null_count

    def _update_numeric(self, spec: Column, arr: pa.Array) -> None:
        """Nulls (null or NaN), out-of-range values (±Inf included), min and max."""
        vals = floats(arr)
        nan = np.isnan(vals)
        self.nulls += int(nan.sum())
        if spec.min is not None or spec.max is not None:
            self._update_range(spec, arr, vals)
        if not nan.all():
            lo, hi = float(np.nanmin(vals)), float(np.nanmax(vals))
            self.vmin, self.vmax = min(self.vmin, lo), max(self.vmax, hi)
            self.varies = self.varies or self.vmin != self.vmax

    def _update_range(self, spec: Column, arr: pa.Array, vals: np.ndarray) -> None:
        import pyarrow as pa

        bad = np.zeros(len(vals), dtype=bool)
        if spec.min is not None:
            bad |= vals < spec.min
        if spec.max is not None:
            bad |= vals > spec.max
        k = int(bad.sum())
        if k:
            self.out_of_range += k
            need = PARTIAL_UNEXPECTED - len(self.range_examples)
            if need > 0:
                idx = np.flatnonzero(bad)[:need]
                self.range_examples += arr.take(pa.array(idx)).to_pylist()

    def _update_future(self, arr: pa.Array, now: pd.Timestamp) -> None:
        """Event times after ``now`` (NaT is never in the future)."""
        import pyarrow as pa

        unit = arr.type.unit
        limit = np.datetime64(now.tz_convert("UTC").tz_localize(None).to_datetime64(), unit)
        vals = arr.cast(pa.timestamp(unit)).to_numpy(zero_copy_only=False)
        future = vals > limit  # NaT compares False
        k = int(future.sum())
        if k:
            self.future += k
            need = PARTIAL_UNEXPECTED - len(self.future_examples)
            if need > 0:
                self.future_examples += [
                    pd.Timestamp(v, tz="UTC").isoformat() for v in vals[future][:need]
                ]

    def _add_hashes(self, arr: pa.Array) -> None:
        """The hashes of the non-null ids, for :func:`resolve_duplicates`."""
        h = hash_values(arr)
        if arr.null_count:
            h = h[np.asarray(arr.is_valid())]
        self.hashes.append(h)

    def _update_distinct(self, arr: pa.Array) -> None:
        """Whether a non-numeric column holds more than one distinct value (so far)."""
        import pyarrow.compute as pc

        distinct = pc.unique(arr.drop_null())
        if len(distinct) > 1:
            self.varies = True
        elif len(distinct) == 1:
            value = distinct[0].as_py()
            if self.first is None:
                self.first = value
            self.varies = value != self.first

    def count(self, arr: pa.Array, allowed: list[Any]) -> None:
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
            self.counts[v] += k
            unknown = unknown or v not in allowed_set
        if unknown and len(self.unknown_examples) < PARTIAL_UNEXPECTED:
            self._add_unknown_examples(arr, allowed)

    def _add_unknown_examples(self, arr: pa.Array, allowed: list[Any]) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc

        plain = decode(arr)
        mask = pc.and_(
            pc.invert(pc.is_in(plain, value_set=pa.array(allowed, type=plain.type))),
            pc.is_valid(plain),
        )
        bad = plain.filter(mask)
        self.unknown_examples += bad.slice(
            0, PARTIAL_UNEXPECTED - len(self.unknown_examples)
        ).to_pylist()


def resolve_duplicates(source: TableSource, col: ColumnStats) -> None:
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
    for batch in source.batches([col.name]):
        arr = decode(batch.column(0))
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


def _column_stats(
    source: TableSource, contract: DataContract, untyped: dict[str, str], seen: Counter
) -> dict[str, ColumnStats]:
    """An empty :class:`ColumnStats` per declared column, typed from the Arrow schema."""
    cols: dict[str, ColumnStats] = {}
    for c in contract.columns:
        col = ColumnStats(c.name, c.type, present=seen.get(c.name, 0))
        if col.present == 1:
            t = source.schema.field(c.name).type
            col.arrow_type = str(t.value_type if pa_types().is_dictionary(t) else t)
            col.type_ok = arrow_type_ok(c.type, t) and c.name not in untyped
            if c.name in untyped:
                col.arrow_type = f"mixed Python types ({untyped[c.name]})"
        cols[c.name] = col
    return cols


class Scan:
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
        self.unsafe = {n: p for n in dict.fromkeys(names) if (p := name_problem(n)) is not None}
        self.duplicated = sorted(n for n, k in seen.items() if k > 1)
        self.extra_columns = [n for n in dict.fromkeys(names) if n not in declared]
        self.cols = _column_stats(source, contract, untyped, seen)
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
        offset = 0
        for batch in self.source.batches(self.readable):
            for i, name in enumerate(batch.schema.names):
                self._update(self.cols[name], batch.column(i))
            self._keep_sample(batch, offset)
            offset += batch.num_rows
        self.rows = offset
        for col in self.cols.values():
            if col.hashes:
                resolve_duplicates(self.source, col)

    def _update(self, col: ColumnStats, arr: pa.Array) -> None:
        target = self.contract.target
        target_values = list(self.contract.target_values) if col.name == target else None
        col.update(self.contract.column(col.name), arr, target_values, self.now)

    def _keep_sample(self, batch: pa.RecordBatch, offset: int) -> None:
        """The sampled rows of ``batch`` (rows ``offset``.. of the batch): all, or the picks."""
        import pyarrow as pa

        if not self.readable:
            return
        if self._picks is None:
            self._sample_parts.append(batch)
            return
        lo, hi = np.searchsorted(self._picks, [offset, offset + batch.num_rows])
        if hi > lo:
            self._sample_parts.append(batch.take(pa.array(self._picks[lo:hi] - offset)))

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

    def results(
        self, checks: list[ContractCheck], sample: pd.DataFrame
    ) -> dict[int, ExpectationResult]:
        """The exact result of each exact check, by check index."""
        out: dict[int, ExpectationResult] = {}
        for i, check in enumerate(checks):
            if not check.exact:
                continue
            if check.expectation == NO_LEAKAGE:
                success, observed = leakage_outcome(
                    check,
                    self.contract,
                    self.cols,
                    sample,
                    self.reference,
                    sampled=not self.sample_is_everything,
                )
            else:
                success, observed = exact_outcome(
                    check, self.rows, self.cols, self.unsafe, self.duplicated
                )
            expected = {k: v for k, v in check.kwargs.items() if v is not None}
            out[i] = ExpectationResult(
                check.expectation,
                check.column,
                success,
                jsonable(observed),
                jsonable(expected),
                "exact",
            )
        return out
