"""Reference statistics cached with a model version: computed once at registration, read
(and verified) by every drift check against that version.

The drift decision (:mod:`pipeline.drift`) needs from the reference only its statistics
(:class:`pipeline.drift.ReferenceStats`). ``register_challenger`` computes them from the
version's training snapshot and logs them as artifacts of the version's MLflow run; the
drift stage then reads only the new batch. The cache is an optimisation, never a
dependency: when it is absent, fails a check or was written by another format, the drift
stage computes the statistics from the snapshot as before and logs why.

Format ``pipeline.reference_stats`` version 1: three files under ``reference_stats/`` on the
run (no pickle anywhere: JSON, an ``.npz`` of plain numeric arrays read with
``allow_pickle=False``, and Parquet):

- ``stats.json``: ``format``, ``format_version``, ``parameters`` (the constants of
  :mod:`pipeline.drift` that shape the statistics: quantile and grid edges, tracked
  values, the small-reference size), ``rows``, ``snapshot_uri`` / ``snapshot_sha256``,
  ``columns`` (one entry per compared column, in the contract's order: ``name``, ``dtype``
  (the contract type), ``kind`` (``numeric`` | ``categorical``); numeric: ``n`` finite
  values, ``std`` (population), ``values`` and ``raw`` (whether the value counts / the raw
  finite values are stored); categorical and the target: ``counts``, a list of
  ``[value, count]`` pairs in first-seen order), ``sample`` (``rows``, ``seed``) and
  ``files``: the SHA-256 of each other file;
- ``numeric.npz``: per numeric column ``i`` (its index in ``columns``) ``i.edges``,
  ``i.le``, ``i.lt`` (float64: the edges and the reference CDF at and just below each),
  ``i.vk`` / ``i.vc`` (value counts when at most 20 values: float64 keys, int64 counts),
  ``i.raw`` (float64 finite values, only for columns with at most 1000 of them: the small
  reference's KS / chi-square tests need the raw values, so they are stored, not recomputed);
- ``sample.parquet``: the seeded reference sample Evidently's HTML page is built on.

The version carries ``reference_stats.uri`` (the ``runs:/`` URI of ``stats.json``) and
``reference_stats.sha256`` (its digest). An artifact store is hostile input: before the
drift stage trusts the cache it checks the digest of ``stats.json`` against the version's
tag and of each file against ``stats.json``, the format and its version, the parameters,
the snapshot digest against the version's, every compared column's presence, kind and
contract type, and every array's type, shape and range (:func:`load_for_version`).
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline import drift
from pipeline.contract import DataContract
from pipeline.names import REFERENCE_STATS_DIR, VersionTag

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

FORMAT = "pipeline.reference_stats"
FORMAT_VERSION = 1
STATS_FILE, ARRAYS_FILE, SAMPLE_FILE = "stats.json", "numeric.npz", "sample.parquet"
_SCALARS = (str, int, float, bool)


class StatsRejected(ValueError):
    """The cached statistics cannot be trusted (or do not fit the contract): recompute."""


def parameters() -> dict[str, int]:
    """The constants of :mod:`pipeline.drift` the statistics depend on."""
    return {
        "quantile_edges": drift.QUANTILE_EDGES,
        "grid_edges": drift.GRID_EDGES,
        "track_values": drift._TRACK_VALUES,
        "small_reference": drift.SMALL_REFERENCE,
    }


# --------------------------------------------------------------------------- encode


def encode(
    stats: drift.ReferenceStats,
    contract: DataContract,
    *,
    snapshot_uri: str,
    snapshot_sha256: str,
    sample_rows: int = drift.SAMPLE_ROWS,
    seed: int = 0,
) -> dict[str, bytes]:
    """The three files of the format, by name. Raises :class:`StatsRejected` when a
    category value is not a JSON scalar (then the version simply has no cache)."""
    import pyarrow.parquet as pq

    from pipeline import storage

    plan = drift._plan(contract)
    arrays: dict[str, np.ndarray] = {}
    columns: list[dict[str, Any]] = []
    for i, name in enumerate(plan.columns):
        entry: dict[str, Any] = {"name": name, "dtype": contract.column(name).type}
        if name in stats.numeric:
            ref = stats.numeric[name]
            entry.update(
                kind="numeric",
                n=int(ref.n),
                std=ref.std if math.isfinite(ref.std) else None,
                values=ref.values is not None,
                raw=name in stats.raw,
            )
            arrays[f"{i}.edges"] = np.asarray(ref.edges, dtype=np.float64)
            arrays[f"{i}.le"] = np.asarray(ref.le, dtype=np.float64)
            arrays[f"{i}.lt"] = np.asarray(ref.lt, dtype=np.float64)
            if ref.values is not None:
                arrays[f"{i}.vk"] = np.array(list(ref.values), dtype=np.float64)
                arrays[f"{i}.vc"] = np.array(list(ref.values.values()), dtype=np.int64)
            if name in stats.raw:
                arrays[f"{i}.raw"] = np.asarray(stats.raw[name], dtype=np.float64)
        else:
            counts = stats.categorical[name]
            bad = [v for v in counts if not isinstance(v, _SCALARS)]
            if bad:
                raise StatsRejected(
                    f"column {name} has values of type {type(bad[0]).__name__}, "
                    "which the JSON format cannot hold"
                )
            entry.update(kind="categorical", counts=[[v, int(k)] for v, k in counts.items()])
        columns.append(entry)
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **arrays)  # type: ignore[arg-type]
    npz = buf.getvalue()
    sample = stats.sample(plan.columns, sample_rows, seed)
    out = io.BytesIO()
    pq.write_table(sample, out)
    parquet = out.getvalue()
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "parameters": parameters(),
        "rows": int(stats.rows),
        "snapshot_uri": snapshot_uri,
        "snapshot_sha256": snapshot_sha256,
        "columns": columns,
        "sample": {"rows": int(sample_rows), "seed": int(seed)},
        "files": {
            ARRAYS_FILE: storage.sha256_bytes(npz),
            SAMPLE_FILE: storage.sha256_bytes(parquet),
        },
    }
    text = json.dumps(doc, allow_nan=False, separators=(",", ":")).encode()
    return {STATS_FILE: text, ARRAYS_FILE: npz, SAMPLE_FILE: parquet}


# --------------------------------------------------------------------------- decode


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise StatsRejected(what)


def _array(arrays: Any, key: str, dtype: Any, what: str) -> np.ndarray:
    _need(key in arrays.files, f"{ARRAYS_FILE} lacks {key} ({what})")
    try:
        a = arrays[key]  # read lazily: an object (pickled) array is refused here
    except Exception as exc:  # noqa: BLE001 - any unreadable member is a rejected cache
        raise StatsRejected(f"{ARRAYS_FILE}:{key} unreadable: {exc}") from None
    _need(a.dtype == dtype and a.ndim == 1, f"{ARRAYS_FILE}:{key} is {a.dtype}{a.shape}")
    return np.asarray(a)


def decode(
    files: dict[str, bytes] | Callable[[str], bytes],
    contract: DataContract,
    *,
    expected_sha256: str,
    snapshot_sha256: str | None = None,
) -> drift.ReferenceStats:
    """Verified :class:`~pipeline.drift.ReferenceStats` from the format's files (a mapping
    or a reader by name; the sample is read only when the HTML page needs it). Raises
    :class:`StatsRejected` naming the first check that failed."""
    from pipeline import storage

    read = files.__getitem__ if isinstance(files, dict) else files
    text = read(STATS_FILE)
    got = storage.sha256_bytes(text)
    _need(
        got == expected_sha256,
        f"{STATS_FILE} has sha256 {got[:12]}…, the version names {expected_sha256[:12]}…",
    )
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise StatsRejected(f"{STATS_FILE} is not JSON: {exc}") from None
    _need(isinstance(doc, dict) and doc.get("format") == FORMAT, f"{STATS_FILE} is not {FORMAT}")
    _need(
        doc.get("format_version") == FORMAT_VERSION,
        f"format version {doc.get('format_version')!r}, this code reads {FORMAT_VERSION}",
    )
    _need(
        doc.get("parameters") == parameters(),
        f"parameters {doc.get('parameters')} differ from this code's {parameters()}",
    )
    rows = doc.get("rows")
    _need(isinstance(rows, int) and not isinstance(rows, bool) and rows > 0, f"rows {rows!r}")
    if snapshot_sha256 is not None:
        _need(
            doc.get("snapshot_sha256") == snapshot_sha256,
            f"built from snapshot {str(doc.get('snapshot_sha256'))[:12]}…, "
            f"the version's is {snapshot_sha256[:12]}…",
        )
    digests = doc.get("files")
    _need(isinstance(digests, dict), f"{STATS_FILE} names no file digests")
    npz = read(ARRAYS_FILE)
    got = storage.sha256_bytes(npz)
    _need(
        got == digests.get(ARRAYS_FILE), f"{ARRAYS_FILE} has sha256 {got[:12]}…, not the one named"
    )
    try:
        arrays = np.load(io.BytesIO(npz), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable archive is a rejected cache
        raise StatsRejected(f"{ARRAYS_FILE} unreadable: {exc}") from None

    entries = doc.get("columns")
    _need(isinstance(entries, list), f"{STATS_FILE} has no column list")
    by_name = {e.get("name"): (i, e) for i, e in enumerate(entries) if isinstance(e, dict)}
    plan = drift._plan(contract)
    numeric: dict[str, drift._NumericReference] = {}
    raw: dict[str, np.ndarray] = {}
    categorical: dict[str, Counter] = {}
    for name in plan.columns:
        _need(name in by_name, f"no statistics for contract column {name}")
        i, e = by_name[name]
        dtype = contract.column(name).type
        _need(
            e.get("dtype") == dtype,
            f"column {name} was {e.get('dtype')!r}, the contract says {dtype!r}",
        )
        kind = "numeric" if name in plan.numeric else "categorical"
        _need(
            e.get("kind") == kind, f"column {name} stored as {e.get('kind')!r}, compared as {kind}"
        )
        if kind == "numeric":
            numeric[name], values = _numeric(name, i, e, arrays, rows)
            if values is not None:
                raw[name] = values
        else:
            categorical[name] = _categorical(name, e, rows)
    sample = doc.get("sample") or {}

    def load_sample() -> tuple[int, int, pa.Table] | None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        data = read(SAMPLE_FILE)
        if storage.sha256_bytes(data) != digests.get(SAMPLE_FILE):
            log.warning("cached reference sample fails its digest: sampling the snapshot")
            return None
        table = pq.read_table(pa.BufferReader(data))
        return int(sample.get("rows", -1)), int(sample.get("seed", -1)), table

    return drift.ReferenceStats(
        rows=rows,
        numeric=numeric,
        categorical=categorical,
        raw=raw,
        source_uri=doc.get("snapshot_uri") if isinstance(doc.get("snapshot_uri"), str) else None,
        dictionary_columns=tuple(contract.categorical_features),
        _sample_loader=load_sample,
    )


def _numeric(
    name: str, i: int, e: dict[str, Any], arrays: Any, rows: int
) -> tuple[drift._NumericReference, np.ndarray | None]:
    n, std = e.get("n"), e.get("std")
    if not (isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= rows):
        raise StatsRejected(f"column {name}: n {n!r}")
    _need(
        std is None or (isinstance(std, float | int) and math.isfinite(std) and std >= 0),
        f"column {name}: std {std!r}",
    )
    edges = _array(arrays, f"{i}.edges", np.float64, name)
    le = _array(arrays, f"{i}.le", np.float64, name)
    lt = _array(arrays, f"{i}.lt", np.float64, name)
    _need(len(le) == len(lt) == len(edges), f"column {name}: edge arrays differ in length")
    _need(
        bool(np.all(np.isfinite(edges))) and bool(np.all(np.diff(edges) > 0)),
        f"column {name}: edges not finite and increasing",
    )
    _need(
        bool(np.all((lt >= 0) & (lt <= le) & (le <= 1))), f"column {name}: CDF values out of range"
    )
    values = None
    if e.get("values"):
        vk = _array(arrays, f"{i}.vk", np.float64, name)
        vc = _array(arrays, f"{i}.vc", np.int64, name)
        _need(len(vk) == len(vc) <= drift._TRACK_VALUES, f"column {name}: value counts malformed")
        _need(int(vc.sum()) == n and bool(np.all(vc > 0)), f"column {name}: value counts != n")
        values = dict(zip(vk.tolist(), vc.tolist(), strict=True))
    raw = None
    if e.get("raw"):
        raw = _array(arrays, f"{i}.raw", np.float64, name)
        _need(len(raw) == n <= drift.SMALL_REFERENCE, f"column {name}: raw values != n")
        _need(bool(np.all(np.isfinite(raw))), f"column {name}: raw values not finite")
    else:
        _need(n > drift.SMALL_REFERENCE, f"column {name}: a small reference without raw values")
    ref = drift._NumericReference(n, math.nan if std is None else float(std), edges, le, lt, values)
    return ref, raw


def _categorical(name: str, e: dict[str, Any], rows: int) -> Counter:
    pairs = e.get("counts")
    if not isinstance(pairs, list):
        raise StatsRejected(f"column {name}: no counts")
    out: Counter = Counter()
    for pair in pairs:
        _need(
            isinstance(pair, list)
            and len(pair) == 2
            and isinstance(pair[0], _SCALARS)
            and isinstance(pair[1], int)
            and not isinstance(pair[1], bool)
            and pair[1] > 0
            and pair[0] not in out,
            f"column {name}: malformed count {str(pair)[:80]}",
        )
        out[pair[0]] = pair[1]
    _need(sum(out.values()) <= rows, f"column {name}: counts exceed the rows")
    return out


# --------------------------------------------------------------------------- MLflow


def store_for_run(
    run_id: str,
    snapshot_uri: str,
    snapshot_sha256: str,
    contract: DataContract,
) -> dict[str, str]:
    """Compute the statistics of the snapshot, log them under ``reference_stats/`` on
    ``run_id``; return the version tags that name them (``reference_stats.uri`` / ``.sha256``).
    Deterministic: a retry logs the same bytes again."""
    from pipeline import registry, storage
    from pipeline.ingest import open_source

    source = open_source(snapshot_uri, contract.categorical_features)
    stats = drift.reference_statistics(source, contract, source_uri=snapshot_uri)
    files = encode(stats, contract, snapshot_uri=snapshot_uri, snapshot_sha256=snapshot_sha256)
    for name in (ARRAYS_FILE, SAMPLE_FILE, STATS_FILE):  # stats.json last: it names the others
        uri = registry.log_bytes(run_id, files[name], f"{REFERENCE_STATS_DIR}/{name}")
    return {
        VersionTag.REFERENCE_STATS_URI: uri,
        VersionTag.REFERENCE_STATS_SHA256: storage.sha256_bytes(files[STATS_FILE]),
    }


def load_for_version(
    version: Any, contract: DataContract
) -> tuple[drift.ReferenceStats | None, str]:
    """The verified cached statistics of a registered version (an MLflow ``ModelVersion``),
    or None; and a line saying which and why. Never raises: a cache that cannot be read or
    trusted is a reason to recompute, not a failed run."""
    tags = version.tags or {}
    uri = tags.get(VersionTag.REFERENCE_STATS_URI)
    digest = tags.get(VersionTag.REFERENCE_STATS_SHA256)
    label = f"v{version.version}"
    if not uri or not digest:
        return (
            None,
            f"{label} has no cached reference statistics (registered before they were kept)",
        )
    base = uri.rsplit("/", 1)[0]
    if not base.startswith("runs:/") or not base.endswith(REFERENCE_STATS_DIR):
        return None, f"{label}'s reference_stats.uri {uri[:200]} is not a run artifact"

    def read(name: str) -> bytes:
        from pipeline import registry

        return registry.read_artifact(f"{base}/{name}")

    try:
        stats = decode(
            read,
            contract,
            expected_sha256=digest,
            snapshot_sha256=tags.get(VersionTag.SNAPSHOT_SHA256),
        )
    except StatsRejected as exc:
        return None, f"{label}'s cached reference statistics rejected: {exc}"
    except Exception as exc:  # noqa: BLE001 - unreadable cache: recompute, say why
        return (
            None,
            f"{label}'s cached reference statistics unreadable: {type(exc).__name__}: {str(exc)[:300]}",
        )
    if tags.get(VersionTag.SNAPSHOT_URI):
        stats.source_uri = tags[VersionTag.SNAPSHOT_URI]
    return stats, f"{label}'s cached reference statistics (sha256 {digest[:12]}…)"


__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "StatsRejected",
    "decode",
    "encode",
    "load_for_version",
    "parameters",
    "store_for_run",
]
