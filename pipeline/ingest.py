"""Ingest: an immutable, content-addressed snapshot of a landing batch, and the readers
every later stage uses on it.

Batches are Parquet. Readers never need the whole frame: :class:`TableSource` hands out
record batches (row-group sized or smaller) of only the columns asked for, one column in
full when a statistic needs it exact, or a seeded row sample. Nor the whole object: a
local file is read by path, an S3 object by ranged GETs (:func:`pipeline.storage.open_read`),
each column chunk through a buffer of :data:`READ_BUFFER_BYTES`. Page checksums are verified
on every read (``page_checksum_verification=True``), so a corrupted data page written with
``write_page_checksum=True`` (as :func:`parquet_bytes` writes) is an error, never silent
garbage. Column names are data: they select columns and are never used as paths.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipeline import storage
from pipeline.settings import get_settings

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq

BATCH_ROWS = 262_144  # rows per record batch when streaming
READ_BUFFER_BYTES = 8 << 20  # per column chunk being read: bounds memory, sizes each S3 GET


@dataclass(frozen=True)
class Snapshot:
    uri: str
    sha256: str
    rows: int
    source_uri: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- writing


def parquet_bytes(data: pd.DataFrame | pa.Table, *, row_group_size: int | None = None) -> bytes:
    """Parquet bytes with page checksums (CRC32 per data page), for readers to verify."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = data if isinstance(data, pa.Table) else pa.Table.from_pandas(data, preserve_index=False)
    buf = io.BytesIO()
    pq.write_table(table, buf, write_page_checksum=True, row_group_size=row_group_size)
    return buf.getvalue()


# --------------------------------------------------------------------------- reading


def _open(uri: str, dictionary_columns: Sequence[str] = ()) -> pq.ParquetFile:
    """A verifying ParquetFile that never holds the object: a local file is read by path
    (no mmap), an S3 object through ranged GETs (:func:`pipeline.storage.open_read`). No
    pre-buffering of whole row groups, and column chunks are read through a buffer of
    :data:`READ_BUFFER_BYTES`, so memory stays near one record batch plus one buffer per
    column, whatever row groups the producer wrote. A transient storage failure raises
    :class:`~pipeline.storage.TransientStorageError` (never a Parquet error)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if uri.startswith("file://") or "://" not in uri:
        source: Any = str(storage.local_path(uri))
    else:
        source = storage.open_read(uri)
    options: dict[str, Any] = {
        "page_checksum_verification": True,
        "pre_buffer": False,
        "buffer_size": READ_BUFFER_BYTES,
    }
    pf = pq.ParquetFile(source, **options)
    if not dictionary_columns:
        return pf
    # Low-cardinality string columns decode to Arrow dictionaries: counting them is then a
    # bincount of small integers instead of hashing every string.
    schema = pf.schema_arrow
    wanted = [
        c
        for c in dictionary_columns
        if schema.get_field_index(c) >= 0 and pa.types.is_string(schema.field(c).type)
    ]
    if not wanted:
        return pf
    return pq.ParquetFile(source, metadata=pf.metadata, read_dictionary=wanted, **options)


class TableSource:
    """A Parquet object (or an in-memory table) read in record batches.

    ``batches`` may be called more than once (a second pass reads again); ``column``
    reads one column in full; ``sample`` takes seeded rows without holding the rest.
    """

    def __init__(self, *, parquet: pq.ParquetFile | None = None, table: pa.Table | None = None):
        if (parquet is None) == (table is None):
            raise ValueError("give exactly one of parquet= or table=")
        self._pf, self._table = parquet, table
        self.schema: pa.Schema = parquet.schema_arrow if parquet is not None else table.schema  # type: ignore[union-attr]
        self.num_rows: int = parquet.metadata.num_rows if parquet is not None else table.num_rows  # type: ignore[union-attr]

    @classmethod
    def from_uri(cls, uri: str, dictionary_columns: Sequence[str] = ()) -> TableSource:
        return cls(parquet=_open(uri, dictionary_columns))

    @classmethod
    def from_frame(cls, df: pd.DataFrame) -> tuple[TableSource, dict[str, str]]:
        """The frame as a source, and the columns Arrow could not type (object columns of
        mixed Python types), which are carried as strings and reported, never dropped."""
        import pyarrow as pa

        arrays, names, untyped = [], [], {}
        for i, name in enumerate(df.columns):
            col = df.iloc[:, i]
            try:
                arr = pa.array(col, from_pandas=True)
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
                untyped[str(name)] = str(exc).splitlines()[0][:200]
                arr = pa.array(col.map(lambda v: None if v is None else str(v)), type=pa.string())
            arrays.append(arr)
            names.append(str(name))
        if names:
            table = pa.Table.from_arrays(arrays, names=names)
        else:
            table = pa.Table.from_batches([_empty_batch(len(df))])
        return cls(table=table), untyped

    @property
    def column_names(self) -> list[str]:
        return list(self.schema.names)

    def batches(
        self, columns: Sequence[str], batch_size: int = BATCH_ROWS
    ) -> Iterator[pa.RecordBatch]:
        """Record batches of ``columns`` (names present exactly once in the schema)."""
        columns = list(columns)
        if self._pf is not None:
            if not columns:
                for rg in range(self._pf.num_row_groups):  # row counts only
                    yield _empty_batch(self._pf.metadata.row_group(rg).num_rows)
                return
            yield from self._pf.iter_batches(
                batch_size=batch_size, columns=columns, use_threads=True
            )
        else:
            t = self._table
            if not columns:
                for start in range(0, t.num_rows, batch_size):  # type: ignore[union-attr]
                    yield _empty_batch(min(batch_size, t.num_rows - start))  # type: ignore[union-attr]
                return
            yield from t.select(columns).to_batches(max_chunksize=batch_size)  # type: ignore[union-attr]

    def column(self, name: str) -> pa.ChunkedArray:
        if self._pf is not None:
            return self._pf.read(columns=[name], use_threads=True).column(0)
        return self._table.column(name)  # type: ignore[union-attr]

    def sample(self, columns: Sequence[str], rows: int, seed: int = 0) -> pa.Table:
        """``rows`` rows drawn uniformly without replacement (all rows when fewer), in
        file order; deterministic for a given seed and row count."""
        import pyarrow as pa

        n = self.num_rows
        if n <= rows:
            picks = None
        else:
            picks = np.sort(np.random.default_rng(seed).choice(n, rows, replace=False))
        parts, offset = [], 0
        for batch in self.batches(columns):
            size = batch.num_rows
            if picks is None:
                parts.append(batch)
            else:
                lo, hi = np.searchsorted(picks, [offset, offset + size])
                if hi > lo:
                    parts.append(batch.take(pa.array(picks[lo:hi] - offset)))
            offset += size
        if not parts:
            return pa.Table.from_batches(
                [], schema=pa.schema([self.schema.field(c) for c in columns])
            )
        return pa.Table.from_batches(parts)


def _empty_batch(rows: int) -> pa.RecordBatch:
    import pyarrow as pa

    return pa.RecordBatch.from_arrays([pa.nulls(rows)], names=["__rows__"]).select([])


def open_source(uri: str, dictionary_columns: Sequence[str] = ()) -> TableSource:
    """A streaming source over the Parquet object at ``uri`` (page checksums verified;
    the object's SHA-256 was verified when it was snapshotted)."""
    return TableSource.from_uri(uri, dictionary_columns)


def read_frame(uri: str, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """The whole object as a frame (training and evaluation): the object's SHA-256 and its
    page checksums are verified."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(pa.BufferReader(storage.read_bytes(uri)), page_checksum_verification=True)
    return pf.read(columns=list(columns) if columns is not None else None).to_pandas()


def read_sample(
    uri: str, rows: int, seed: int = 0, columns: Sequence[str] | None = None
) -> pd.DataFrame:
    """At most ``rows`` seeded rows of the object as a frame (all rows when fewer)."""
    src = open_source(uri)
    names = list(columns) if columns is not None else src.column_names
    return src.sample(names, rows, seed).to_pandas()


# --------------------------------------------------------------------------- snapshot


def snapshot_uri_for(sha256: str) -> str:
    return storage.join(get_settings().storage_root, "snapshots", sha256[:24], "data.parquet")


def snapshot(batch_uri: str) -> tuple[Snapshot, str | None]:
    """Copy the batch to ``snapshots/<sha256>/`` (idempotent: same bytes, same snapshot).

    Returns the snapshot and the parse error if the footer is unreadable (the rows are
    read from the footer; pages are checked by validation, which reads them all). The
    landing file is left where it is; nothing is deleted. A storage service that does not
    answer raises :class:`~pipeline.storage.TransientStorageError` (nothing written: retry),
    a full disk :class:`~pipeline.storage.StorageFullError` (nothing left half-written).
    """
    import pyarrow.parquet as pq

    if not storage.exists(batch_uri):
        raise FileNotFoundError(
            f"no batch at {batch_uri}: check the batch_uri param or the model's landing folder"
        )
    data = storage.read_bytes(batch_uri)
    obj = storage.write_bytes(snapshot_uri_for(storage.sha256_bytes(data)), data)
    try:
        rows, error = pq.ParquetFile(io.BytesIO(data)).metadata.num_rows, None
    except Exception as exc:  # noqa: BLE001 - any parse failure is a data rejection
        rows, error = 0, f"not a readable Parquet file: {exc}"
    return Snapshot(obj.uri, obj.sha256, rows, batch_uri), error


def snapshot_batch(batch_uri: str) -> tuple[Snapshot, pd.DataFrame | None, str | None]:
    """:func:`snapshot`, plus the batch as a frame (None if unreadable). Loads the batch:
    prefer :func:`snapshot` and :class:`TableSource` for large batches."""
    snap, error = snapshot(batch_uri)
    df = None
    if error is None:
        try:
            df = read_frame(snap.uri)
        except Exception as exc:  # noqa: BLE001
            error = f"not a readable Parquet file: {exc}"
    return snap, df, error
