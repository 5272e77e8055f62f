"""Ingest: an immutable, content-addressed snapshot of a landing batch."""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd

from pipeline import storage
from pipeline.settings import get_settings


@dataclass(frozen=True)
class Snapshot:
    uri: str
    sha256: str
    rows: int
    source_uri: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_frame(uri: str) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(storage.read_bytes(uri)))


def snapshot_uri_for(sha256: str) -> str:
    return storage.join(get_settings().storage_root, "snapshots", sha256[:24], "data.parquet")


def snapshot_batch(batch_uri: str) -> tuple[Snapshot, pd.DataFrame | None, str | None]:
    """Copy the batch to ``snapshots/<sha256>/`` (idempotent: same bytes, same snapshot).

    Returns the snapshot, the frame (None if unreadable) and the parse error if any.
    The landing file is left where it is; nothing is deleted.
    """
    if not storage.exists(batch_uri):
        raise FileNotFoundError(
            f"no batch at {batch_uri}: check the batch_uri param or the landing folder "
            f"{get_settings().landing_root}"
        )
    data = storage.read_bytes(batch_uri)
    obj = storage.write_bytes(snapshot_uri_for(storage.sha256_bytes(data)), data)
    try:
        df = pd.read_parquet(io.BytesIO(data))
        error = None
    except Exception as exc:  # noqa: BLE001 - any parse failure is a data rejection
        df, error = None, f"not a readable Parquet file: {exc}"
    return Snapshot(obj.uri, obj.sha256, 0 if df is None else len(df), batch_uri), df, error
