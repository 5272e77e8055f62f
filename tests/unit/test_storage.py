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
