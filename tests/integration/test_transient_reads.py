"""Transient is not bad: a storage service that is down, stalls mid-body or answers 5xx
fails the task retryably, and the batch is never judged on it.

The S3 API is moto's server, reached through a small reverse HTTP proxy of this module
that can refuse connections (the server is down), stop forwarding halfway through a GET
body (a stalled read), or answer 503. The pipeline is configured as a user would: the
endpoint in ``PIPELINE_S3_ENDPOINT_URL``, botocore's bounded retries in
``AWS_MAX_ATTEMPTS``, short timeouts in ``PIPELINE_S3_CONNECT_TIMEOUT_S`` /
``PIPELINE_S3_READ_TIMEOUT_S``. Every case checks, straight on moto (not through the
proxy), that the landing object is byte-identical and that nothing was quarantined or
counted in the ledger, then that the same call succeeds once the service is back.
"""

from __future__ import annotations

import http.client
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from pipeline import registry, settings, stages, storage
from pipeline.data.generate import WorldSpec, generate, to_parquet_bytes
from pipeline.errors import DataRejected
from tests.integration.moto import free_port, moto_server

pytestmark = pytest.mark.integration

NOW = "2026-06-01T00:00:00Z"
BUCKET = "transient"
STALL_S = 10.0  # a stalled body goes silent this long (the client's read timeout is 1 s)
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "expect"}
UNAVAILABLE = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>ServiceUnavailable</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


# ----------------------------------------------------------------------------- the proxy


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ProxyServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass

    def setup(self) -> None:
        super().setup()
        self.server.proxy.connections.add(self.connection)

    def finish(self) -> None:
        self.server.proxy.connections.discard(self.connection)
        super().finish()

    def _forward(self) -> None:
        proxy = self.server.proxy
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        if proxy.mode == "503":
            self.send_response_only(503, "Service Unavailable")
            self.send_header("Content-Type", "application/xml")
            self.send_header(
                "Content-Length", "0" if self.command == "HEAD" else str(len(UNAVAILABLE))
            )
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(UNAVAILABLE)
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            resp = upstream.getresponse()
            data = resp.read()
        finally:
            upstream.close()
        self.send_response_only(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                self.send_header(k, v)
        if self.command == "HEAD":
            self.send_header("Content-Length", resp.getheader("Content-Length", "0"))
            self.end_headers()
            return
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        stall = (
            proxy.mode == "stall"
            and self.command == "GET"
            and any(part in self.path.split("?", 1)[0] for part in proxy.stall_paths)
            and len(data) > 1
        )
        if not stall:
            self.wfile.write(data)
            return
        proxy.stalled += 1
        self.wfile.write(data[: len(data) // 2])  # half the body, then silence
        self.wfile.flush()
        proxy.release.wait(STALL_S)
        self.close_connection = True  # then drop it, as a load balancer's idle timeout would

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, proxy: FaultyProxy) -> None:
        self.proxy = proxy
        super().__init__(("127.0.0.1", proxy.port), _Handler)


class FaultyProxy:
    """A reverse proxy in front of moto: ``pass``, ``stall`` (GETs whose path holds one of
    ``stall_paths`` send half their body, go silent for ``STALL_S`` and drop the
    connection), ``503``, or stopped (``stop()``: the port refuses connections until
    ``start()``)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port, self.port = upstream_port, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.mode = "pass"
        self.stall_paths: tuple[str, ...] = ()
        self.stalled = 0
        self.release = threading.Event()
        self.connections: set[socket.socket] = set()
        self._server: _ProxyServer | None = None
        self.start()

    def start(self) -> None:
        self._server = _ProxyServer(self)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        """Refuse connections from now on, and drop the ones open (as a server that died)."""
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()
        self._server = None
        for conn in list(self.connections):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def heal(self) -> None:
        self.mode, self.stall_paths = "pass", ()
        self.release.set()
        self.release = threading.Event()
        if self._server is None:
            self.start()


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def moto_port() -> Iterator[int]:
    with moto_server() as port:
        yield port


@pytest.fixture(scope="module")
def proxy(moto_port: int) -> Iterator[FaultyProxy]:
    p = FaultyProxy(moto_port)
    yield p
    p.heal()
    p.stop()


@pytest.fixture(scope="module")
def direct(moto_port: int) -> Any:
    """A boto3 client straight to moto: what is really stored, whatever the proxy does."""
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{moto_port}",
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=BUCKET)
    return client


@pytest.fixture(scope="module")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated, empty MLflow SQLite store (a fresh one costs seconds of migrations)."""
    home = tmp_path_factory.mktemp("template")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PIPELINE_HOME", str(home))
        mp.delenv("PIPELINE_MLFLOW_TRACKING_URI", raising=False)
        settings.get_settings.cache_clear()
        registry.client.cache_clear()
        registry.client().search_experiments()
    settings.get_settings.cache_clear()
    registry.client.cache_clear()
    return home / "mlflow" / "mlflow.db"


@pytest.fixture
def root(
    pipeline_home: Path,
    mlflow_template: Path,
    proxy: FaultyProxy,
    direct: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[str]:
    """The storage root, on S3 behind the proxy; MLflow stays local."""
    (pipeline_home / "mlflow").mkdir(parents=True)
    shutil.copy(mlflow_template, pipeline_home / "mlflow" / "mlflow.db")
    prefix = f"r{time.time_ns()}"
    for k, v in {
        "PIPELINE_STORAGE_URI": f"s3://{BUCKET}/{prefix}",
        "PIPELINE_S3_ENDPOINT_URL": proxy.url,
        "PIPELINE_S3_CONNECT_TIMEOUT_S": "2",
        "PIPELINE_S3_READ_TIMEOUT_S": "1",
        "AWS_MAX_ATTEMPTS": "2",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(k, v)
    settings.get_settings.cache_clear()
    registry.client.cache_clear()
    yield f"s3://{BUCKET}/{prefix}"
    proxy.heal()


def _land(root: str, data: bytes, name: str = "b") -> str:
    return storage.write_bytes(f"{root}/landing/card_fraud/{name}.parquet", data).uri


def _stored(direct: Any, root: str) -> dict[str, bytes]:
    """Every object under ``root``, read straight from moto."""
    prefix = root.removeprefix(f"s3://{BUCKET}/") + "/"
    keys = [
        o["Key"]
        for page in direct.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        for o in page.get("Contents", [])
    ]
    return {k[len(prefix) :]: direct.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in keys}


def _assert_untouched(direct: Any, root: str, landed: str, data: bytes) -> None:
    objects = _stored(direct, root)
    assert objects[landed.removeprefix(root + "/")] == data  # byte-identical, still there
    judged = [k for k in objects if k.startswith(("quarantine/", "ledger/"))]
    assert judged == [], f"a transient failure judged the batch: {judged}"


def _fault(proxy: FaultyProxy, fault: str, path: str) -> None:
    if fault == "down":
        proxy.stop()
    elif fault == "stall":
        proxy.mode, proxy.stall_paths = "stall", (path,)
    else:
        proxy.mode = "503"


@pytest.fixture(scope="module")
def batch() -> bytes:
    return to_parquet_bytes(generate(WorldSpec(rows=2000, seed=1)))


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("fault", ["down", "stall", "503"])
def test_ingest_fails_retryably_and_succeeds_once_the_service_is_back(
    root: str, proxy: FaultyProxy, direct: Any, batch: bytes, fault: str
) -> None:
    landed = _land(root, batch)
    ctx = stages.RunContext("dag", f"ingest-{fault}", NOW)
    _fault(proxy, fault, "/landing/")
    with pytest.raises(storage.TransientStorageError, match="says nothing about the object"):
        stages.ingest_batch(ctx, landed)
    if fault == "stall":
        assert proxy.stalled
    _assert_untouched(direct, root, landed, batch)
    assert not any(k.startswith("snapshots/") for k in _stored(direct, root))
    proxy.heal()
    rec = stages.ingest_batch(ctx, landed)
    assert rec.verdict == "ok" and rec.sha256 == storage.sha256_bytes(batch)


@pytest.mark.parametrize("fault", ["down", "stall", "503"])
def test_validation_fails_retryably_without_quarantine_or_ledger(
    root: str, proxy: FaultyProxy, direct: Any, batch: bytes, fault: str
) -> None:
    landed = _land(root, batch)
    ctx = stages.RunContext("dag", f"validate-{fault}", NOW)
    ingested = stages.ingest_batch(ctx, landed)
    _fault(proxy, fault, "/snapshots/")
    with pytest.raises(storage.TransientStorageError) as err:
        stages.validate_batch(ctx, ingested)
    assert "not readable as Parquet" not in str(err.value)
    if fault == "stall":
        assert proxy.stalled
    _assert_untouched(direct, root, landed, batch)
    proxy.heal()
    validated = stages.validate_batch(ctx, ingested)  # the Airflow retry
    assert validated.verdict == "pass", validated.summary
    assert validated.ledger == {"accepted": 1, "rejected": 0}
    assert _stored(direct, root)[landed.removeprefix(root + "/")] == batch


def test_drift_reads_fail_retryably(
    root: str, proxy: FaultyProxy, contract: Any, batch: bytes
) -> None:
    from pipeline import drift

    landed = _land(root, batch)
    ingested = stages.ingest_batch(stages.RunContext("dag", "drift", NOW), landed)
    proxy.mode, proxy.stall_paths = "stall", ("/snapshots/",)
    with pytest.raises(storage.TransientStorageError):
        drift.detect_drift_uris(ingested.uri, ingested.uri, contract, html=False)
    proxy.heal()
    report, _ = drift.detect_drift_uris(ingested.uri, ingested.uri, contract, html=False)
    assert not report.dataset_drift


def test_a_batch_that_is_not_parquet_is_still_quarantined(root: str, direct: Any) -> None:
    """Only the content is judged: the streamed S3 read of bytes that are not Parquet is a
    rejection, quarantined and counted, as before."""
    data = b"PAR1 this is not a parquet file PAR1"
    landed = _land(root, data, "garbage")
    ctx = stages.RunContext("dag", "garbage", NOW)
    ingested = stages.ingest_batch(ctx, landed)
    assert ingested.verdict == "unreadable"
    with pytest.raises(DataRejected, match="not readable as Parquet"):
        stages.validate_batch(ctx, ingested)
    objects = _stored(direct, root)
    assert any(
        k.startswith("quarantine/card_fraud/") and k.endswith("batch.parquet") for k in objects
    )
    assert [k for k in objects if k.startswith("ledger/card_fraud/rejected/")]


def test_ranged_reads_see_one_version_of_the_object(root: str, direct: Any, batch: bytes) -> None:
    """The streaming reader pins the ETag it opened: an object replaced behind the
    pipeline's back (objects are never overwritten by it) is an error, not a mix."""
    uri = storage.write_bytes(f"{root}/snapshots/x/data.parquet", batch).uri
    reader = storage.open_read(uri)
    assert reader.read(4) == b"PAR1"
    direct.put_object(Bucket=BUCKET, Key=uri.removeprefix(f"s3://{BUCKET}/"), Body=b"other")
    with pytest.raises(storage.StorageError, match="changed while it was being read"):
        reader.read(16)
