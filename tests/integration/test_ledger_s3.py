"""The promotion ledger on a real S3 API (moto's server over HTTP on loopback): entries are
created with a conditional put, so concurrent writers never overwrite one another, and an
entry changed in the bucket is refused."""

from __future__ import annotations

import json
import time

import pytest

from pipeline import ledger, storage
from tests.integration.moto import moto_server, use_s3
from tests.unit._ledger import write_concurrently

pytestmark = pytest.mark.integration

MODEL = "card_fraud"


@pytest.fixture
def s3_root(pipeline_home, monkeypatch):
    import boto3

    with moto_server() as port:
        endpoint = f"http://127.0.0.1:{port}"
        bucket = f"ledger{time.time_ns()}"
        use_s3(monkeypatch, endpoint, PIPELINE_STORAGE_URI=f"s3://{bucket}/pipeline")
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        from pipeline.settings import get_settings

        yield boto3.client("s3", endpoint_url=endpoint), bucket
        get_settings.cache_clear()


def test_ledger_on_s3_write_once_under_concurrent_writers_and_tamper_evident(s3_root):
    s3, bucket = s3_root
    write_concurrently(MODEL, writers=4, moves=3, timeout=120)
    got = ledger.entries(MODEL)
    assert [e.seq for e in got] == list(range(1, 13))
    assert len({e.run_key for e in got}) == 12
    uri = ledger.entry_uri(MODEL, 5)
    assert uri.startswith(f"s3://{bucket}/pipeline/ledger/{MODEL}/entries/")
    with pytest.raises(storage.ObjectExistsError):  # the conditional put refuses a rewrite
        storage.write_bytes(uri, b"{}")
    # someone with bucket write access replaces entry 5, with matching S3 metadata
    key = uri.removeprefix(f"s3://{bucket}/")
    env = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    env["entry"]["why"] = "nothing to see"
    body = json.dumps(env).encode()
    s3.put_object(
        Bucket=bucket, Key=key, Body=body, Metadata={"sha256": storage.sha256_bytes(body)}
    )
    with pytest.raises(ledger.LedgerError, match=f"{uri}: its content has sha256"):
        ledger.entries(MODEL)
