"""Local storage: atomic, never-overwriting writes with a SHA-256 per object."""

from __future__ import annotations

import hashlib

import pytest

from pipeline import storage


@pytest.fixture
def root(tmp_path):
    return (tmp_path / "store").as_uri()


def test_write_records_sha256_and_reads_back(root):
    obj = storage.write_bytes(f"{root}/a/b.bin", b"hello")
    assert obj.sha256 == hashlib.sha256(b"hello").hexdigest()
    assert obj.size == 5
    assert storage.read_bytes(obj.uri) == b"hello"
    assert storage.digest_of(obj.uri) == obj.sha256


def test_same_bytes_again_is_idempotent(root):
    first = storage.write_bytes(f"{root}/x", b"same")
    assert storage.write_bytes(f"{root}/x", b"same") == first


def test_different_bytes_never_overwrite(root):
    storage.write_bytes(f"{root}/x", b"original")
    with pytest.raises(storage.ObjectExistsError, match="never overwritten"):
        storage.write_bytes(f"{root}/x", b"changed")
    assert storage.read_bytes(f"{root}/x") == b"original"


def test_tampered_object_fails_verification(root):
    obj = storage.write_bytes(f"{root}/x", b"original")
    storage.local_path(obj.uri).write_bytes(b"tampered")
    with pytest.raises(storage.IntegrityError, match="does not match"):
        storage.read_bytes(obj.uri)


def test_no_temp_files_left_and_listing_hides_sidecars(root, tmp_path):
    storage.write_bytes(f"{root}/d/one", b"1")
    storage.write_bytes(f"{root}/d/two", b"2")
    assert storage.list_uris(f"{root}/d") == [f"{root}/d/one", f"{root}/d/two"]
    leftovers = [p.name for p in (tmp_path / "store" / "d").iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_move_keeps_data_and_removes_source(root):
    storage.write_bytes(f"{root}/src", b"payload")
    obj = storage.move(f"{root}/src", f"{root}/q/dst")
    assert storage.read_bytes(obj.uri) == b"payload"
    assert not storage.exists(f"{root}/src")


def test_move_refuses_to_overwrite_destination(root):
    storage.write_bytes(f"{root}/src", b"new")
    storage.write_bytes(f"{root}/dst", b"old")
    with pytest.raises(storage.ObjectExistsError):
        storage.move(f"{root}/src", f"{root}/dst")
    assert storage.read_bytes(f"{root}/src") == b"new"  # source kept


def test_unknown_scheme_is_a_clear_error():
    with pytest.raises(storage.StorageError, match="use file:// or s3://"):
        storage.write_bytes("gs://bucket/key", b"x")


def test_local_reader_reads_and_a_missing_object_is_a_storage_error(root):
    obj = storage.write_bytes(f"{root}/r/data.bin", b"0123456789")
    with storage.open_read(obj.uri) as fh:
        fh.seek(4)
        assert fh.read(3) == b"456"
    with pytest.raises(storage.StorageError, match="no object at"):
        storage.open_read(f"{root}/r/missing.bin")


def _client_error(status: int, code: str):
    from botocore.exceptions import ClientError

    return ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "GetObject",
    )


def _botocore(name: str):
    from botocore import exceptions as e

    url = "http://127.0.0.1:9/b/k"
    return {
        "read_timeout": e.ReadTimeoutError(endpoint_url=url),
        "connect_timeout": e.ConnectTimeoutError(endpoint_url=url),
        "refused": e.EndpointConnectionError(endpoint_url=url),
        "closed": e.ConnectionClosedError(endpoint_url=url),
        "cut_short": e.ResponseStreamingError(error="IncompleteRead"),
        "no_credentials": e.NoCredentialsError(),
    }[name]


@pytest.mark.parametrize(
    ("make", "transient"),
    [
        (lambda: _botocore("read_timeout"), True),
        (lambda: _botocore("connect_timeout"), True),
        (lambda: _botocore("refused"), True),
        (lambda: _botocore("closed"), True),
        (lambda: _botocore("cut_short"), True),
        (lambda: _client_error(500, "InternalError"), True),
        (lambda: _client_error(503, "SlowDown"), True),
        (lambda: _client_error(429, "TooManyRequestsException"), True),
        (lambda: _client_error(400, "RequestTimeout"), True),
        (lambda: ConnectionResetError(104, "reset"), True),
        (lambda: _client_error(404, "NoSuchKey"), False),
        (lambda: _client_error(403, "AccessDenied"), False),
        (lambda: _client_error(412, "PreconditionFailed"), False),
        (lambda: _botocore("no_credentials"), False),
        (lambda: OSError("Invalid: Parquet magic bytes not found"), False),
        (lambda: ValueError("not Parquet"), False),
    ],
)
def test_which_failures_are_transient(make, transient):
    """The service or the network failing (after botocore's retries) is transient; the
    request or the object being wrong is not. botocore's timeouts are OSErrors, like
    pyarrow's "not Parquet": only their type tells them apart."""
    assert storage.is_transient(make()) is transient


def test_the_transient_kind_is_not_a_rejection():
    """Airflow retries a task unless it fails with a PipelineRejection (dags/retrain_model.py)."""
    from pipeline.errors import PipelineRejection

    assert not issubclass(storage.TransientStorageError, PipelineRejection)
    assert not issubclass(storage.StorageFullError, PipelineRejection)
