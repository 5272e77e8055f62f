"""The same storage code against a real S3 API (moto's server over HTTP on loopback)."""

from __future__ import annotations

import time

import pytest

from pipeline import storage
from tests.integration.moto import moto_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s3_endpoint():
    with moto_server() as port:
        yield f"http://127.0.0.1:{port}"


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
