"""The same storage code against a real S3 API (moto's server over HTTP on loopback)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import storage

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    port = _free_port()
    server = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(server), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("moto_server did not start")
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=10)


@pytest.fixture
def bucket(s3_endpoint, pipeline_home, monkeypatch):
    import boto3

    monkeypatch.setenv("PIPELINE_S3_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    from pipeline.settings import get_settings

    get_settings.cache_clear()
    name = f"b{time.time_ns()}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


def test_write_read_and_digest(bucket):
    obj = storage.write_bytes(f"{bucket}/p/a.bin", b"hello")
    assert storage.read_bytes(obj.uri) == b"hello"
    assert storage.digest_of(obj.uri) == obj.sha256
    assert storage.exists(obj.uri)


def test_conditional_put_never_overwrites(bucket):
    storage.write_bytes(f"{bucket}/x", b"original")
    assert storage.write_bytes(f"{bucket}/x", b"original").size == 8  # idempotent
    with pytest.raises(storage.ObjectExistsError):
        storage.write_bytes(f"{bucket}/x", b"changed")
    assert storage.read_bytes(f"{bucket}/x") == b"original"


def test_move_and_list(bucket):
    storage.write_bytes(f"{bucket}/landing/b.parquet", b"data")
    storage.move(f"{bucket}/landing/b.parquet", f"{bucket}/quarantine/b.parquet")
    assert storage.list_uris(f"{bucket}/quarantine/") == [f"{bucket}/quarantine/b.parquet"]
    assert not storage.exists(f"{bucket}/landing/b.parquet")


def test_checkpoint_round_trip_through_s3(bucket, contract, tmp_path):
    from pipeline import checkpoint
    from pipeline.data.generate import WorldSpec, generate
    from pipeline.train.loop import TrainConfig, train

    df = generate(WorldSpec(rows=2000, seed=5))
    result = train(df, contract, TrainConfig(max_epochs=1))
    local = tmp_path / "ck"
    checkpoint.save_checkpoint(
        local, result.model, result.features, df.head(16), data_snapshot={}, training={}
    )
    checkpoint.publish(local, f"{bucket}/checkpoints/one")
    _model, spec, v = checkpoint.load_for_inference(f"{bucket}/checkpoints/one")
    assert v.intact and spec == result.features
