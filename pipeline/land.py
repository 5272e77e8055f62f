"""Land a batch for one model, and tell Airflow: ``python -m pipeline data land``.

1. The file (a local path, ``file://`` or ``s3://`` URI) must be Parquet (its footer is read
   with pyarrow); it is copied into ``<storage root>/<landing prefix>/<name>`` with
   :func:`pipeline.storage.write_bytes`: atomic and never overwriting. The default name,
   ``date=<UTC date>/<sha256[:12]>-<file name>``, makes landing the same file again a no-op
   and keeps different bytes apart.
2. Unless ``emit=False``, an event on the model's asset (``pipeline://models/<name>/batch``)
   is created through Airflow's REST API v2, ``extra={"batch_uri", "model", "sha256"}``;
   the model's ``retrain_<name>`` DAG runs once per event:

   * ``POST {url}/auth/token`` ``{"username", "password"}`` -> ``access_token`` (simple auth
     manager and FAB), unless ``PIPELINE_AIRFLOW_TOKEN`` is set;
   * ``GET {url}/api/v2/assets?uri_pattern=<uri>`` -> the asset whose uri is exactly it;
   * ``POST {url}/api/v2/assets/events`` ``{"asset_id", "extra"}``.

   Each call has a 10 s timeout and up to 3 tries with backoff on connection errors and 5xx;
   a 4xx is not retried and is reported with what it means (:mod:`pipeline.airflow_api`).
"""

from __future__ import annotations

import io
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

from pipeline import storage
from pipeline.airflow_api import TIMEOUT_S, AirflowAPIError, check, request, token
from pipeline.errors import PipelineRejection
from pipeline.settings import get_settings
from pipeline.spec import ModelSpec

log = logging.getLogger(__name__)


class LandingRejected(PipelineRejection):
    """The file was not landed (not Parquet, an unsafe name, another object at its key)."""


def _source_uri(file: str | Path) -> str:
    text = str(file)
    if "://" in text:
        return text
    return storage.file_uri(Path(text).expanduser().resolve())


def _parquet_rows(data: bytes, where: str) -> int:
    import pyarrow.parquet as pq

    try:
        return int(pq.ParquetFile(io.BytesIO(data)).metadata.num_rows)
    except Exception as exc:  # noqa: BLE001 - any footer error means "not Parquet"
        raise LandingRejected(
            f"{where} is not a readable Parquet file ({exc}); nothing was landed"
        ) from None


def _read_parquet(file: str | Path) -> tuple[str, bytes, int]:
    """(source URI, bytes, rows) of a readable Parquet file; LandingRejected otherwise."""
    src = _source_uri(file)
    try:
        data = storage.read_bytes(src)
    except storage.TransientStorageError:
        raise  # the store failed, not the file: retry, never reject
    except (storage.StorageError, OSError) as exc:
        raise LandingRejected(f"cannot read {file}: {exc}") from None
    return src, data, _parquet_rows(data, str(file))


def land_batch(
    spec: ModelSpec,
    file: str | Path,
    *,
    name: str | None = None,
    emit: bool = True,
    airflow_url: str | None = None,
) -> dict[str, Any]:
    """Copy ``file`` into ``spec``'s landing prefix and (``emit``) create its asset event.

    Returns ``{"model", "uri", "sha256", "rows", "event"}``; ``event`` is
    ``{"asset_id", "id", "timestamp"}`` of the created asset event, or None."""
    src, data, rows = _read_parquet(file)
    digest = storage.sha256_bytes(data)
    if name is None:
        base = Path(urlparse(src).path).name or "batch.parquet"
        name = f"date={datetime.now(UTC):%Y-%m-%d}/{digest[:12]}-{base}"
    prefix = storage.join(get_settings().storage_root, spec.landing_prefix)
    try:
        uri = storage.join(prefix, name)
        obj = storage.write_bytes(uri, data)
    except storage.UnsafePathError as exc:
        raise LandingRejected(
            f"--name {name!r}: {exc}; give a relative key under the landing prefix {prefix}"
        ) from None
    except storage.ObjectExistsError as exc:
        raise LandingRejected(f"{exc}; nothing was landed") from None
    event = None
    if emit:
        try:
            event = emit_batch_event(spec, obj.uri, obj.sha256, airflow_url=airflow_url)
        except AirflowAPIError as exc:
            raise AirflowAPIError(
                f"the batch is landed at {obj.uri}, but no asset event was "
                f"created: {exc}. Re-run the same command to send it (landing "
                "the same bytes again is a no-op)"
            ) from exc
    rec = {"model": spec.name, "uri": obj.uri, "sha256": obj.sha256, "rows": rows, "event": event}
    log.info(
        "landed %s (%d rows, sha256 %s) for model %s; asset event %s",
        obj.uri,
        rows,
        obj.sha256[:12],
        spec.name,
        event["id"] if event else "not emitted",
    )
    return rec


def land_eval(spec: ModelSpec, file: str | Path) -> dict[str, Any]:
    """Put ``file`` at the spec's trusted evaluation location (``evaluation.uri``). Storage
    never overwrites: a different set needs a new location, named in the spec (a reviewed
    change), so a run's gate record always names the bytes it judged on."""
    _, data, rows = _read_parquet(file)
    uri = get_settings().resolve(spec.eval_location)
    try:
        obj = storage.write_bytes(uri, data)
    except storage.ObjectExistsError:
        raise LandingRejected(
            f"model {spec.name!r} already has a trusted set at {uri} with other "
            "bytes; it is never overwritten: put the new set under a new name and "
            f"point evaluation.uri at it in {spec.path}"
        ) from None
    log.info(
        "trusted set for model %s at %s (%d rows, sha256 %s)",
        spec.name,
        obj.uri,
        rows,
        obj.sha256[:12],
    )
    return {"model": spec.name, "uri": obj.uri, "sha256": obj.sha256, "rows": rows, "event": None}


def emit_batch_event(
    spec: ModelSpec, batch_uri: str, sha256: str, *, airflow_url: str | None = None
) -> dict[str, Any]:
    """Create the event on ``spec``'s batch asset; return ``{"asset_id", "id", "timestamp"}``."""
    url = (airflow_url or get_settings().airflow_api_url).rstrip("/")
    not_parsed = (
        f"no asset {spec.asset_uri} in Airflow at {url}: is the DAG {spec.retrain_dag_id} "
        f"for model {spec.name!r} parsed (Airflow's DAG list, import errors), and does "
        f"{spec.path} keep schedule.asset on?"
    )
    with httpx.Client(timeout=TIMEOUT_S) as client:
        headers = {"Authorization": f"Bearer {token(client, url)}"}
        resp = request(
            client,
            "GET",
            f"{url}/api/v2/assets",
            headers=headers,
            params={"uri_pattern": spec.asset_uri, "limit": 100},
        )
        check(resp, f"looking up asset {spec.asset_uri}")
        # uri_pattern is a substring match (ILIKE, '_' a wildcard): keep the exact uri only
        ids = [a["id"] for a in resp.json().get("assets", []) if a.get("uri") == spec.asset_uri]
        if not ids:
            raise AirflowAPIError(not_parsed)
        body = {
            "asset_id": ids[0],
            "extra": {"batch_uri": batch_uri, "model": spec.name, "sha256": sha256},
        }
        resp = request(
            client,
            "POST",
            f"{url}/api/v2/assets/events",
            headers=headers,
            json=body,
            retry_timeouts=False,
        )
        check(
            resp,
            f"creating an event on asset {spec.asset_uri}",
            lambda st: not_parsed if st == 404 else None,
        )
        out = resp.json()
    return {
        "asset_id": out.get("asset_id", ids[0]),
        "id": out.get("id"),
        "timestamp": out.get("timestamp"),
    }
