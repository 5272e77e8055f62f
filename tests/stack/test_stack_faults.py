"""Faults against the real servers.

* S3 answering 500 to the first k PutObject requests (a botocore ``before-send`` hook on the
  session our storage code's client is made from): within the retry budget the write succeeds
  once; beyond it the write fails with the S3 error and leaves no object behind.
* MLflow server stopped, then a port that accepts and never answers: the client fails within
  the configured budget (MLFLOW_HTTP_REQUEST_*), not after ~246 s, and says which server; after a restart the retried
  stage finds the same RUNNING run (by its run key), finishes it, and no run is left orphaned.
"""

from __future__ import annotations

import time
import uuid

import pytest

from pipeline import storage
from tests.stack.conftest import MlflowServer, free_port


class _Raw:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def stream(self, **_):
        yield self.body


@pytest.fixture
def s3_env(s3, pipeline_home, monkeypatch):
    import boto3

    for k, v in {
        **s3.env,
        "PIPELINE_S3_ENDPOINT_URL": s3.endpoint,
        "AWS_RETRY_MODE": "standard",
        "AWS_MAX_ATTEMPTS": "3",
    }.items():
        monkeypatch.setenv(k, v)
    from pipeline.settings import get_settings

    get_settings.cache_clear()
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
    boto3.setup_default_session()
    return s3


def _fail_first(k: int) -> list[int]:
    """Make the next k PutObject requests answer 500 InternalError without reaching S3."""
    import boto3
    from botocore.awsrequest import AWSResponse

    seen: list[int] = []

    def hook(request, **_):
        seen.append(len(seen))
        if len(seen) <= k:
            body = b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"
            return AWSResponse(request.url, 500, {"Content-Type": "application/xml"}, _Raw(body))
        return None

    boto3.DEFAULT_SESSION.events.register("before-send.s3.PutObject", hook)
    return seen


def test_s3_500s_within_the_retry_budget_are_absorbed(s3_env):
    uri = f"s3://pipeline/faults/{uuid.uuid4().hex}/a.bin"
    seen = _fail_first(2)
    t0 = time.monotonic()
    obj = storage.write_bytes(uri, b"payload")
    assert time.monotonic() - t0 < 30
    assert len(seen) == 3  # two 500s, then the real request
    assert storage.read_bytes(uri) == b"payload" and storage.digest_of(uri) == obj.sha256


def test_s3_500s_beyond_the_budget_fail_and_leave_no_object(s3_env):
    """Past botocore's retries the failure is transient (the task is retried, the content is
    never judged), and says so; nothing partial is left."""
    from botocore.exceptions import ClientError

    key = f"faults/{uuid.uuid4().hex}/b.bin"
    seen = _fail_first(100)
    t0 = time.monotonic()
    with pytest.raises(storage.TransientStorageError, match="says nothing about the") as exc:
        storage.write_bytes(f"s3://pipeline/{key}", b"payload")
    assert time.monotonic() - t0 < 30
    cause = exc.value.__cause__
    assert isinstance(cause, ClientError) and cause.response["Error"]["Code"] == "InternalError"
    assert len(seen) == 3  # AWS_MAX_ATTEMPTS, then it gives up
    listed = s3_env.client().list_objects_v2(Bucket="pipeline", Prefix=key.rsplit("/", 1)[0])
    assert listed.get("KeyCount", 0) == 0  # nothing partial left behind


def test_mlflow_down_fails_fast_and_the_run_is_resumed_not_orphaned(mlflow_client_env, monkeypatch):
    from mlflow.exceptions import MlflowException

    from pipeline import registry, settings

    base = mlflow_client_env
    port = free_port()
    own = MlflowServer(
        url=f"http://127.0.0.1:{port}",
        port=port,
        env=base.env,
        log=base.log.with_name("mlflow-fault.log"),
    )
    monkeypatch.setenv("PIPELINE_MLFLOW_TRACKING_URI", own.url)
    settings.get_settings.cache_clear()
    registry.client.cache_clear()
    own.start()
    try:
        key = f"fault-{uuid.uuid4().hex[:8]}"
        run_id = registry.get_or_create_run(key)
        assert registry.client().get_run(run_id).info.status == "RUNNING"

        own.stop()
        t0 = time.monotonic()
        with pytest.raises(MlflowException) as exc:
            registry.client().log_metric(run_id, "loss", 1.0)
        elapsed = time.monotonic() - t0
        assert elapsed < 30, f"client took {elapsed:.0f}s with the server down"
        assert f"127.0.0.1:{port}" in str(exc.value)  # says which server it could not reach

        # A server that accepts connections and never answers (hung, not down): bounded by
        # MLFLOW_HTTP_REQUEST_TIMEOUT=5 x (1 + MLFLOW_HTTP_REQUEST_MAX_RETRIES=1) + backoff.
        import socket

        with socket.socket() as hung:
            hung.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            hung.bind(("127.0.0.1", port))
            hung.listen(16)
            t0 = time.monotonic()
            with pytest.raises(MlflowException):
                registry.client().log_metric(run_id, "loss", 1.0)
            hung_elapsed = time.monotonic() - t0
        assert hung_elapsed < 30, f"client took {hung_elapsed:.0f}s against a hung server"
        print(f"\nMLflow hung: client failed in {hung_elapsed:.1f}s")

        own.start()
        assert registry.get_or_create_run(key) == run_id  # the retry finds the same run
        registry.client().log_metric(run_id, "loss", 1.0)
        registry.client().set_terminated(run_id, "FINISHED")
        runs = registry.client().search_runs(
            [registry.experiment_id()], filter_string=f"tags.`{registry.RUN_KEY_TAG}` = '{key}'"
        )
        assert [(r.info.run_id, r.info.status) for r in runs] == [(run_id, "FINISHED")]
        print(f"\nMLflow down: client failed in {elapsed:.1f}s")
    finally:
        own.stop()
