"""Data drift of a batch against a reference: streaming statistics with Evidently's semantics.

Compared columns: the contract's numeric and categorical features (not the id or the
event time) plus the target (label-prior shift). The dataset is drifted when the share
of drifted *feature* columns (target excluded) reaches the contract's ``drift.share``.

Methods and thresholds: Evidently 0.7's defaults, read from its source
(``evidently/legacy/calculations/stattests``), unless a contract column names its own
``drift: {method, threshold}``. NaN and ±Inf are dropped first, as Evidently does.

- reference > 1000 rows: numeric with more than 5 distinct values (reference and current
  together) -> ``wasserstein``: W1(reference, current) / max(std(reference, ddof=0),
  0.001), drift when >= 0.1; categorical, or numeric with <= 5 values ->
  ``jensenshannon``: scipy's JS distance (natural log) of the value frequencies, drift
  when >= 0.1;
- reference <= 1000 rows: numeric with > 5 values -> ``ks`` (two-sample KS p-value,
  drift when p <= 0.05); otherwise ``chisquare`` (p < 0.05) with > 2 values, else ``z``
  (two-proportion z-test, p < 0.05);
- ``psi`` (drift when >= 0.1 by default) as Evidently computes it: value frequencies, or
  for numeric columns with more than 20 reference values a Sturges histogram over both
  samples, zeros replaced as Evidently does.

How it stays fast (exact where cheap, bounded where not)
    Categorical columns and low-cardinality numerics need only value counts, counted in
    one streaming pass over record batches: every statistic on them is exact.

    Numeric Wasserstein distance is the one that needs order statistics. The reference
    column is read (one column at a time) and sorted once; its quantiles (2048) and an
    even grid (2048 points) between its min and max give the bin edges. The current
    batch streams through in record batches: each chunk is sorted (numpy's SIMD sort)
    and counted at every edge, both strictly below and at-or-below it (so mass sitting
    exactly on an edge is known), and the tail integrals below the reference min and
    above its max are summed exactly. Since both CDFs are non-decreasing inside a bin, the
    integral of |F_ref - F_cur| over each bin is bounded below and above from the CDFs at
    its edges; the sum gives an interval [low, high] that provably contains the exact
    normed distance (the report keeps it: ``score_low``/``score_high``). The verdict is
    decided by the interval whenever the threshold lies outside it; only when it falls
    inside (rare: the interval is typically ~1e-3 wide) is the exact distance computed by
    reading the two columns in full, as scipy does. So every verdict equals Evidently's
    on the full data; a score marked ``exact: false`` is the interpolated estimate within
    its stated bounds. KS, Sturges-binned PSI/JS and numeric value counts beyond 20
    values read one column in full (exact) because they are rare choices.

Reference statistics, computed once
    Everything the decision needs from the reference — per numeric column its finite
    count, std, edges and CDF at them, value counts when few; per categorical column and
    the target its value counts; the raw finite values of numeric columns with at most
    ``SMALL_REFERENCE`` of them (the small-reference KS / chi-square path needs them: they
    are kept, not recomputed) — is a :class:`ReferenceStats` (:func:`reference_statistics`).
    ``pipeline.reference_stats`` stores it with each model version at registration, so a
    drift check against the champion reads only the new batch. Only the rare exact
    fallbacks (Wasserstein bounds straddling the threshold, a contract method that needs the
    whole column) read the one reference column they need from the snapshot. Category
    keys are summed in first-seen order, so a score is the same in every process.

Memory: one record batch and a few thousand counters per column; one column at a time
when a column is read in full. Evidently itself is kept for the human HTML report only,
built on seeded samples (``sample_rows`` per side): ``evidently`` is imported there only.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipeline.contract import DataContract
from pipeline.ingest import TableSource, open_source

if TYPE_CHECKING:
    import pyarrow as pa

_VALUE_DRIFT = "evidently:metric_v2:ValueDrift"
DEFAULT_THRESHOLDS = {
    "wasserstein": 0.1,
    "jensenshannon": 0.1,
    "psi": 0.1,
    "ks": 0.05,
    "chisquare": 0.05,
    "z": 0.05,
}
P_VALUE_METHODS = ("ks", "chisquare", "z")
SMALL_REFERENCE = 1000  # Evidently: reference rows above this use distances
FEW_VALUES = 5  # numeric columns with at most this many values are treated by value counts
_TRACK_VALUES = 20  # Evidently bins numerics with more reference values than this
QUANTILE_EDGES = 2048
GRID_EDGES = 2048
SAMPLE_ROWS = 20_000


@dataclass(frozen=True)
class ColumnDrift:
    column: str
    method: str
    score: float
    threshold: float
    drifted: bool
    exact: bool = True  # False: ``score`` is an estimate; the verdict is proven by the bounds
    score_low: float | None = None
    score_high: float | None = None


@dataclass(frozen=True)
class DriftReport:
    dataset_drift: bool
    drift_share: float
    share_threshold: float
    columns: list[ColumnDrift]
    reference_rows: int
    current_rows: int
    reference_positive_rate: float
    current_positive_rate: float
    target: str = ""
    rate_label: str = (
        "positive rate"  # multiclass: "share of class <c>" (the contract's positive label)
    )

    def drifted_columns(self) -> list[str]:
        return [c.column for c in self.columns if c.drifted]

    def feature_columns(self) -> list[ColumnDrift]:
        return [c for c in self.columns if c.column != self.target]

    @property
    def label_drifted(self) -> bool:
        return any(c.drifted for c in self.columns if c.column == self.target)

    def summary(self) -> str:
        features = self.feature_columns()
        drifted = [c.column for c in features if c.drifted]
        verdict = "dataset drift" if self.dataset_drift else "no dataset drift"
        text = (
            f"{verdict}: {len(drifted)} of {len(features)} features drifted "
            f"(share {self.drift_share:.2f}, threshold {self.share_threshold:.2f})"
        )
        if drifted:
            text += f" [{', '.join(drifted)}]"
        target = next((c for c in self.columns if c.column == self.target), None)
        if target is not None:
            state = "drifted" if target.drifted else "stable"
            text += (
                f"; target {target.column} {state}, {self.rate_label} "
                f"{self.reference_positive_rate:.4f} -> {self.current_positive_rate:.4f}"
            )
        return text + f"; {self.reference_rows} reference vs {self.current_rows} current rows"

    def to_dict(self) -> dict[str, Any]:
        d = _finite(asdict(self))
        d["drifted_columns"] = self.drifted_columns()
        d["label_drifted"] = self.label_drifted
        d["summary"] = self.summary()
        return d


def _finite(value: Any) -> Any:
    """NaN / inf as None, so the dict is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def positive_rate(df: pd.DataFrame, contract: DataContract) -> float:
    """Share of labelled rows whose target is the contract's positive label."""
    labels = df[contract.target].dropna()
    if labels.empty:
        return math.nan
    return float((labels == contract.positive_label).mean())


# --------------------------------------------------------------------------- exact tests
# Each mirrors the Evidently 0.7 function named in its docstring, on plain arrays/counts.


def _percents(
    ref: dict[Any, int], cur: dict[Any, int], feel_zeroes: bool
) -> tuple[np.ndarray, np.ndarray]:
    """``get_binned_data``'s value-count branch (keys in first-seen order, not a set's: the
    sums, hence the scores, are then the same in every process, whatever its hash seed)."""
    keys = list(dict.fromkeys([*ref, *cur]))
    n_ref, n_cur = sum(ref.values()), sum(cur.values())
    r = np.array([ref.get(k, 0) / n_ref for k in keys], dtype=np.float64)
    c = np.array([cur.get(k, 0) / n_cur for k in keys], dtype=np.float64)
    return (_feel_zeroes(r), _feel_zeroes(c)) if feel_zeroes else (r, c)


def _feel_zeroes(p: np.ndarray) -> np.ndarray:
    p = p.copy()
    low = p[p != 0].min()
    np.place(p, p == 0, low / 10**6 if low <= 0.0001 else 0.0001)
    return p


def _js(r: np.ndarray, c: np.ndarray) -> float:
    from scipy.spatial import distance

    return float(distance.jensenshannon(r, c))


def _psi(r: np.ndarray, c: np.ndarray) -> float:
    return float(np.sum((r - c) * np.log(r / c)))


def _from_counts(method: str, ref: dict[Any, int], cur: dict[Any, int]) -> float:
    """Score of a value-count method (``jensenshannon``, ``psi``, ``chisquare``, ``z``)."""
    from scipy.stats import chisquare, norm

    if method == "jensenshannon":
        return _js(*_percents(ref, cur, feel_zeroes=False))
    if method == "psi":
        return _psi(*_percents(ref, cur, feel_zeroes=True))
    if method == "chisquare":  # _chi_stat_test
        keys = list(dict.fromkeys([*ref, *cur]))
        n_ref, n_cur = sum(ref.values()), sum(cur.values())
        k_norm = n_cur / n_ref
        f_exp = [ref.get(k, 0) * k_norm for k in keys]
        f_obs = [cur.get(k, 0) for k in keys]
        return float(chisquare(f_obs, f_exp)[1])
    if method == "z":  # _z_stat_test
        if len(ref) == 1 and len(cur) == 1 and set(ref) == set(cur):
            return 1.0
        first = sorted(set(ref) | set(cur))[0]
        n1, n2 = sum(ref.values()), sum(cur.values())
        p1 = (n1 - ref.get(first, 0)) / n1
        p2 = (n2 - cur.get(first, 0)) / n2
        pooled = (p1 * n1 + p2 * n2) / (n1 + n2)
        z = (p1 - p2) / np.sqrt(pooled * (1 - pooled) * (1.0 / n1 + 1.0 / n2))
        return float(2 * (1 - norm.cdf(np.abs(z))))
    raise ValueError(f"{method} is not a value-count method")


def _from_arrays(method: str, ref: np.ndarray, cur: np.ndarray) -> float:
    """Score of any method on two finite numeric arrays (Evidently's numeric path)."""
    from scipy import stats

    if method == "wasserstein":  # _wasserstein_distance_norm
        norm = max(float(np.std(ref)), 0.001)
        return float(stats.wasserstein_distance(ref, cur) / norm)
    if method == "ks":  # _ks_stat_test
        return float(stats.ks_2samp(ref, cur)[1])
    if method in ("jensenshannon", "psi") and len(np.unique(ref)) > _TRACK_VALUES:
        bins = np.histogram_bin_edges(np.concatenate([ref, cur]), bins="sturges")
        r = np.histogram(ref, bins)[0] / len(ref)
        c = np.histogram(cur, bins)[0] / len(cur)
        if method == "psi":
            return _psi(_feel_zeroes(r), _feel_zeroes(c))
        return _js(r, c)
    return _from_counts(method, _value_counts(ref), _value_counts(cur))


def _value_counts(x: np.ndarray) -> dict[Any, int]:
    values, counts = np.unique(x, return_counts=True)
    return dict(zip(values.tolist(), counts.tolist(), strict=True))


def _is_drift(method: str, score: float, threshold: float) -> bool:
    if method == "ks":
        return bool(score <= threshold)
    if method in P_VALUE_METHODS:
        return bool(score < threshold)
    return bool(score >= threshold)


# --------------------------------------------------------------------------- profiles


def _finite_values(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pa.types.is_boolean(arr.type):
        arr = pc.cast(arr, pa.int8())
    if not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type)):
        raise ValueError(f"numeric column has type {arr.type}")
    x = np.asarray(arr.to_numpy(zero_copy_only=False), dtype=np.float64)
    return x[np.isfinite(x)]


def _counts(arr: pa.Array, into: Counter) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_dictionary(arr.type) and not pa.types.is_floating(arr.type.value_type):
        codes = arr.indices.to_numpy(zero_copy_only=False)
        if arr.null_count:
            codes = codes[np.asarray(arr.is_valid())]
        counts = np.bincount(codes.astype(np.int64), minlength=len(arr.dictionary))
        for v, k in zip(arr.dictionary.to_pylist(), counts.tolist(), strict=True):
            if v is not None and k:
                into[v] += k
        return
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pa.types.is_floating(arr.type):  # NaN / inf dropped, as Evidently does
        arr = arr.filter(pc.is_finite(arr))
    vc = pc.value_counts(arr)
    for v, k in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist(), strict=True):
        if v is not None:
            into[v] += k


@dataclass
class _NumericReference:
    n: int
    std: float
    edges: np.ndarray
    le: np.ndarray  # F_ref(edge), counts of reference <= edge / n
    lt: np.ndarray  # F_ref(edge-), counts of reference < edge / n
    values: dict[float, int] | None  # value counts when at most _TRACK_VALUES values

    @classmethod
    def build(cls, x: np.ndarray) -> _NumericReference:
        r = np.sort(x)
        n = len(r)
        std = float(np.std(x))
        distinct = 1 + int(np.count_nonzero(r[1:] != r[:-1])) if n else 0
        values = _value_counts(r) if distinct <= _TRACK_VALUES else None
        if n == 0:
            edges = np.zeros(0)
        else:
            q = r[np.linspace(0, n - 1, QUANTILE_EDGES + 1).round().astype(np.int64)]
            grid = np.linspace(r[0], r[-1], GRID_EDGES + 1)
            edges = np.unique(np.concatenate([q, grid, r[:1], r[-1:]]))
        le = np.searchsorted(r, edges, side="right") / max(n, 1)
        lt = np.searchsorted(r, edges, side="left") / max(n, 1)
        return cls(n, std, edges, le, lt, values)


@dataclass
class _NumericCurrent:
    edges: np.ndarray
    m: int = 0
    below: float = 0.0  # sum of (edge_0 - x) over x below the reference min
    above: float = 0.0  # sum of (x - edge_last) over x above the reference max
    lt: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # x < edge
    le: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # x <= edge
    values: Counter | None = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.lt = np.zeros(len(self.edges), dtype=np.int64)
        self.le = np.zeros(len(self.edges), dtype=np.int64)

    def update(self, x: np.ndarray) -> None:
        """Fold in a chunk: sort it (SIMD sort: ~10x faster than binary-searching every
        value into the edges), then count it at each edge with one search per edge."""
        if not len(x):
            return
        self.m += len(x)
        if self.values is not None:
            probe = np.unique(x[:2048])
            if (
                len(probe) > _TRACK_VALUES
                or len(self.values.keys() | set(probe.tolist())) > _TRACK_VALUES
            ):
                self.values = None
            else:
                self.values.update(_value_counts(x))
                if len(self.values) > _TRACK_VALUES:
                    self.values = None
        e = self.edges
        if not len(e):
            return
        s = np.sort(x)
        lt = np.searchsorted(s, e, side="left")
        le = np.searchsorted(s, e, side="right")
        self.lt += lt
        self.le += le
        k = int(lt[0])
        if k:
            self.below += float(e[0] * k - s[:k].sum())
        k = len(s) - int(le[-1])
        if k:
            self.above += float(s[len(s) - k :].sum() - e[-1] * k)

    def wasserstein_bounds(self, ref: _NumericReference) -> tuple[float, float, float]:
        """(low, estimate, high) of the normed W1 distance; low <= exact <= high."""
        m, e = self.m, self.edges
        lt, le = self.lt / m, self.le / m  # F_cur(edge-), F_cur(edge)
        h = np.diff(e)
        a, b = ref.le[:-1], ref.lt[1:]  # F_ref inside bin i lies in [a, b]
        c, d = le[:-1], lt[1:]  # F_cur inside bin i lies in [c, d]
        hi = h * np.maximum(b - c, d - a)
        lo = h * np.maximum(0.0, np.maximum(c - b, a - d))
        f0, f1 = a - c, b - d
        same = f0 * f1 >= 0
        denom = np.where(same, 1.0, np.abs(f0) + np.abs(f1))
        est = np.where(same, h * np.abs(f0 + f1) / 2, h * (f0**2 + f1**2) / (2 * denom))
        tails = (self.below + self.above) / m
        norm = max(ref.std, 0.001)
        low, mid, high = (
            (tails + lo.sum()) / norm,
            (tails + est.sum()) / norm,
            (tails + hi.sum()) / norm,
        )
        return low, min(max(mid, low), high), high


# --------------------------------------------------------------------------- detection


@dataclass(frozen=True)
class _Plan:
    numeric: list[str]
    categorical: list[str]  # includes the target
    target: str

    @property
    def columns(self) -> list[str]:
        return [*self.numeric, *[c for c in self.categorical if c != self.target], self.target]


def _plan(contract: DataContract) -> _Plan:
    target = contract.target
    numeric = [c for c in contract.numeric_features if c != target]
    return _Plan(numeric, [*contract.categorical_features, target], target)


def _check_source(name: str, src: TableSource, columns: list[str]) -> None:
    if src.num_rows == 0:
        raise ValueError(f"{name} batch is empty; cannot compute drift")
    missing = [c for c in columns if c not in src.column_names]
    if missing:
        raise ValueError(f"{name} batch lacks contract columns {missing}")


@dataclass
class ReferenceStats:
    """What the drift decision needs from the reference, computed in one pass over it.

    ``numeric``: per numeric column its :class:`_NumericReference` (finite count, std,
    quantile + grid edges with the reference CDF at each, value counts when at most
    ``_TRACK_VALUES`` values); ``categorical``: value counts of each categorical column and
    the target (insertion order kept: the scores sum over it); ``raw``: the finite values of
    each numeric column with at most ``SMALL_REFERENCE`` of them (what KS and chi-square on
    raw values need on a small reference). Everything else — an exact Wasserstein distance
    when the bounds straddle the threshold (rare), a contract method that needs the whole
    column — is read from ``source`` (or the snapshot at ``source_uri``, opened only then),
    one column at a time. ``pipeline.reference_stats`` stores these with a model version.
    """

    rows: int
    numeric: dict[str, _NumericReference]
    categorical: dict[str, Counter]
    raw: dict[str, np.ndarray] = field(default_factory=dict)
    source: TableSource | None = None
    source_uri: str | None = None
    dictionary_columns: tuple[str, ...] = ()
    reads: list[str] = field(default_factory=list)  # columns read in full from the source
    _sample: Any = None  # (rows, seed, pa.Table) of the HTML sample, when known
    _sample_loader: Any = None  # callable () -> (rows, seed, pa.Table), when stored elsewhere

    def _open(self) -> TableSource:
        if self.source is None:
            if self.source_uri is None:
                raise ValueError("these reference statistics have no source to read from")
            self.source = open_source(self.source_uri, self.dictionary_columns)
        return self.source

    def values(self, col: str) -> np.ndarray:
        """The finite values of numeric column ``col`` in full (stored, or read)."""
        if col in self.raw:
            return self.raw[col]
        self.reads.append(col)
        return _finite_values(self._open().column(col))

    def sample(self, columns: list[str], rows: int, seed: int) -> pa.Table:
        """The seeded sample the HTML page is built on (stored, or drawn from the source)."""
        if self._sample is None and self._sample_loader is not None:
            loader, self._sample_loader = self._sample_loader, None
            self._sample = loader()
        if self._sample is not None:
            n, s, table = self._sample
            if n == rows and s == seed and set(columns) <= set(table.column_names):
                return table.select(columns)
        return self._open().sample(columns, rows, seed)


def reference_statistics(
    reference: TableSource, contract: DataContract, *, source_uri: str | None = None
) -> ReferenceStats:
    """The reference side of :func:`detect_drift_sources`: numeric columns one at a time
    (each sorted once), categorical columns and the target in one streaming pass."""
    plan = _plan(contract)
    _check_source("reference", reference, plan.columns)
    ref_num: dict[str, _NumericReference] = {}
    raw: dict[str, np.ndarray] = {}
    for col in plan.numeric:
        try:
            x = _finite_values(reference.column(col))
        except ValueError as exc:
            raise ValueError(f"reference column {col}: {exc}; validate the batch first") from None
        ref_num[col] = _NumericReference.build(x)
        if len(x) <= SMALL_REFERENCE:
            raw[col] = x
    ref_cat: dict[str, Counter] = {c: Counter() for c in plan.categorical}
    for batch in reference.batches(plan.categorical):
        for i, col in enumerate(batch.schema.names):
            _counts(batch.column(i), ref_cat[col])
    return ReferenceStats(
        rows=reference.num_rows,
        numeric=ref_num,
        categorical=ref_cat,
        raw=raw,
        source=reference,
        source_uri=source_uri,
        dictionary_columns=tuple(contract.categorical_features),
    )


def detect_drift_sources(
    reference: TableSource | ReferenceStats,
    current: TableSource,
    contract: DataContract,
    *,
    share_threshold: float | None = None,
    sample_rows: int = SAMPLE_ROWS,
    seed: int = 0,
    html: bool = True,
) -> tuple[DriftReport, str]:
    """Compare ``current`` to ``reference`` in streaming passes; return the report and
    (when ``html``) Evidently's HTML page built on seeded samples, else ``""``.

    ``reference`` is a source (its statistics are computed here) or statistics computed
    before (:func:`reference_statistics`; cached with the model version by
    ``pipeline.reference_stats``): then only ``current`` is read, except the rare exact
    fallbacks :class:`ReferenceStats` describes. Either way the report is the same."""
    plan = _plan(contract)
    share = contract.drift_share if share_threshold is None else share_threshold
    if not isinstance(reference, ReferenceStats):
        _check_source("reference", reference, plan.columns)
    _check_source("current", current, plan.columns)
    ref = (
        reference
        if isinstance(reference, ReferenceStats)
        else reference_statistics(reference, contract)
    )
    if ref.rows == 0:
        raise ValueError("reference batch is empty; cannot compute drift")
    lacking = [c for c in plan.numeric if c not in ref.numeric] + [
        c for c in plan.categorical if c not in ref.categorical
    ]
    if lacking:
        raise ValueError(f"reference statistics lack contract columns {lacking}")

    # Current: one pass over every compared column.
    cur_num = {c: _NumericCurrent(ref.numeric[c].edges) for c in plan.numeric}
    cur_cat: dict[str, Counter] = {c: Counter() for c in plan.categorical}
    for batch in current.batches(plan.columns):
        for i, col in enumerate(batch.schema.names):
            arr = batch.column(i)
            if col in cur_num:
                try:
                    cur_num[col].update(_finite_values(arr))
                except ValueError as exc:
                    raise ValueError(
                        f"current column {col}: {exc}; validate the batch first"
                    ) from None
            else:
                _counts(arr, cur_cat[col])

    results: dict[str, ColumnDrift] = {}
    for col in plan.numeric:
        results[col] = _numeric_drift(col, contract, ref, cur_num[col], current)
    for col in plan.categorical:
        results[col] = _categorical_drift(col, contract, ref.categorical[col], cur_cat[col])

    ordered = [results[c] for c in plan.columns]
    features = [d for d in ordered if d.column != plan.target]
    drift_share = sum(d.drifted for d in features) / len(features) if features else 0.0
    report = DriftReport(
        dataset_drift=bool(features) and drift_share >= share,
        drift_share=drift_share,
        share_threshold=share,
        columns=ordered,
        reference_rows=ref.rows,
        current_rows=current.num_rows,
        reference_positive_rate=_rate(ref.categorical[plan.target], contract.positive_label),
        current_positive_rate=_rate(cur_cat[plan.target], contract.positive_label),
        target=plan.target,
        rate_label="positive rate"
        if contract.num_classes == 2
        else f"share of class {contract.positive_label}",
    )
    page = ""
    if html:
        columns = plan.columns
        page = evidently_html(
            ref.sample(columns, sample_rows, seed).to_pandas(),
            current.sample(columns, sample_rows, seed + 1).to_pandas(),
            contract,
            share_threshold=share,
        )
    return report, page


def _rate(counts: Counter, positive: Any) -> float:
    total = sum(counts.values())
    return counts.get(positive, 0) / total if total else math.nan


def _method(
    col: str, contract: DataContract, n_ref: int, n_values: int, numeric: bool
) -> tuple[str, float]:
    spec = contract.column(col)
    if spec.drift_method:
        method = spec.drift_method
    elif n_ref <= SMALL_REFERENCE:
        if numeric and n_values > FEW_VALUES:
            method = "ks"
        else:
            method = "chisquare" if n_values > 2 else "z"
    elif numeric and n_values > FEW_VALUES:
        method = "wasserstein"
    else:
        method = "jensenshannon"
    threshold = (
        spec.drift_threshold if spec.drift_threshold is not None else DEFAULT_THRESHOLDS[method]
    )
    return method, threshold


def _numeric_drift(
    col: str,
    contract: DataContract,
    stats: ReferenceStats,
    cur: _NumericCurrent,
    current: TableSource,
) -> ColumnDrift:
    ref = stats.numeric[col]
    if ref.n == 0 or cur.m == 0:
        side = "reference" if ref.n == 0 else "current"
        raise ValueError(
            f"an empty column '{col}' was provided for drift calculation in the {side} batch"
        )
    counts_known = ref.values is not None and cur.values is not None
    n_values = len(set(ref.values) | set(cur.values)) if counts_known else _TRACK_VALUES + 1  # type: ignore[arg-type]
    method, threshold = _method(col, contract, ref.n, n_values, numeric=True)
    if method == "wasserstein":
        low, estimate, high = cur.wasserstein_bounds(ref)
        if low >= threshold or high < threshold:
            return ColumnDrift(
                col,
                method,
                float(estimate),
                float(threshold),
                bool(low >= threshold),
                bool(low == high),
                float(low),
                float(high),
            )
    elif counts_known and method in ("chisquare", "z", "jensenshannon", "psi"):
        score = _from_counts(method, ref.values, cur.values)  # type: ignore[arg-type]
        return ColumnDrift(
            col, method, score, threshold, _is_drift(method, score, threshold), True, score, score
        )
    # Exact on the full columns, one at a time.
    score = _from_arrays(method, stats.values(col), _finite_values(current.column(col)))
    return ColumnDrift(
        col, method, score, threshold, _is_drift(method, score, threshold), True, score, score
    )


def _categorical_drift(col: str, contract: DataContract, ref: Counter, cur: Counter) -> ColumnDrift:
    n_ref = sum(ref.values())
    if n_ref == 0 or not cur:
        side = "reference" if n_ref == 0 else "current"
        raise ValueError(
            f"an empty column '{col}' was provided for drift calculation in the {side} batch"
        )
    method, threshold = _method(col, contract, n_ref, len(set(ref) | set(cur)), numeric=False)
    if method in ("wasserstein", "ks"):
        raise ValueError(f"drift method {method} needs a numeric column; {col} is categorical")
    score = _from_counts(method, dict(ref), dict(cur))
    return ColumnDrift(
        col, method, score, threshold, _is_drift(method, score, threshold), True, score, score
    )


# --------------------------------------------------------------------------- entry points


def detect_drift(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    contract: DataContract,
    *,
    share_threshold: float | None = None,
    sample_rows: int = SAMPLE_ROWS,
    seed: int = 0,
    html: bool = True,
) -> tuple[DriftReport, str]:
    """Compare ``current`` to ``reference``; return the report and Evidently's HTML.

    Statistics are exact on the full frames (see the module docstring); only the HTML is
    built on samples. The HTML is a standalone page (Evidently's JS bundle and font are
    inlined; a few MB). Raises ``ValueError`` when a frame is empty or lacks a compared
    column: validate the batch against the contract first.
    """
    columns = _plan(contract).columns
    sources = []
    for name, frame in (("reference", reference), ("current", current)):
        if frame.empty:
            raise ValueError(f"{name} frame is empty; cannot compute drift")
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise ValueError(f"{name} frame lacks contract columns {missing}")
        sources.append(TableSource.from_frame(frame[columns])[0])
    return detect_drift_sources(
        sources[0],
        sources[1],
        contract,
        share_threshold=share_threshold,
        sample_rows=sample_rows,
        seed=seed,
        html=html,
    )


def detect_drift_uris(
    reference: str | ReferenceStats,
    current_uri: str,
    contract: DataContract,
    *,
    share_threshold: float | None = None,
    sample_rows: int = SAMPLE_ROWS,
    seed: int = 0,
    html: bool = True,
) -> tuple[DriftReport, str]:
    """:func:`detect_drift` on two Parquet objects, streaming (never a whole frame, nor a
    whole S3 object); a storage service that does not answer raises
    :class:`~pipeline.storage.TransientStorageError` (retry), never a verdict.

    ``reference``: the reference's URI, or its statistics computed before (then only
    ``current_uri`` is read; see :class:`ReferenceStats`)."""
    cats = contract.categorical_features
    return detect_drift_sources(
        reference if isinstance(reference, ReferenceStats) else open_source(reference, cats),
        open_source(current_uri, cats),
        contract,
        share_threshold=share_threshold,
        sample_rows=sample_rows,
        seed=seed,
        html=html,
    )


# --------------------------------------------------------------------------- Evidently


def evidently_html(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    contract: DataContract,
    *,
    share_threshold: float | None = None,
) -> str:
    """Evidently's DataDriftPreset page for two (sampled) frames, for people to read."""
    return _evidently(reference, current, contract, share_threshold)[1]


def evidently_verdicts(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    contract: DataContract,
    *,
    share_threshold: float | None = None,
    html: bool = False,
) -> tuple[dict[str, ColumnDrift], str]:
    """Evidently's own per-column results (method, score, threshold, drifted) and HTML."""
    return _evidently(reference, current, contract, share_threshold, html=html)


def _evidently(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    contract: DataContract,
    share_threshold: float | None,
    html: bool = True,
) -> tuple[dict[str, ColumnDrift], str]:
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    plan = _plan(contract)
    columns = plan.columns
    share = contract.drift_share if share_threshold is None else share_threshold
    per_column = {c.name: c.drift_method for c in contract.columns if c.drift_method}
    thresholds = {
        c.name: c.drift_threshold for c in contract.columns if c.drift_threshold is not None
    }
    # class labels are categorical whatever their dtype
    definition = DataDefinition(
        numerical_columns=plan.numeric, categorical_columns=plan.categorical
    )
    report = Report(
        [
            DataDriftPreset(
                columns=columns,
                drift_share=share,
                per_column_method=per_column or None,
                per_column_threshold=thresholds or None,
            )
        ],
        include_tests=True,  # the per-column pass/fail (drift detected) lives in the tests
    )
    snapshot = report.run(
        Dataset.from_pandas(current[columns].reset_index(drop=True), data_definition=definition),
        Dataset.from_pandas(reference[columns].reset_index(drop=True), data_definition=definition),
    )
    result = snapshot.dict()
    detected: dict[str, bool] = {}
    for test in result["tests"]:
        params = test.get("metric_config", {}).get("params", {})
        if params.get("type") == _VALUE_DRIFT:
            detected[params["column"]] = str(test.get("status")).upper().endswith("FAIL")
    drifts: dict[str, ColumnDrift] = {}
    for metric in result["metrics"]:
        config = metric.get("config", {})
        if config.get("type") != _VALUE_DRIFT:
            continue
        name = config["column"]
        drifts[name] = ColumnDrift(
            name,
            str(config.get("method")),
            float(metric["value"]),
            float(config.get("threshold")),
            detected[name],
        )
    return drifts, snapshot.get_html_str(as_iframe=False) if html else ""
