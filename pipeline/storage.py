"""Object storage over ``file://`` and ``s3://`` with atomic, never-overwriting writes.

Every object written gets a SHA-256: on S3 as the object's ``sha256`` metadata (and
S3's own SHA-256 checksum), on a local folder as a ``<name>.sha256`` sidecar. Reads
verify it. A write to an existing key succeeds only if the bytes are identical
(idempotent retries); different bytes raise ``ObjectExistsError`` — data is never
overwritten.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from pipeline.settings import get_settings

SIDECAR = ".sha256"


class StorageError(RuntimeError):
    pass


class ObjectExistsError(StorageError):
    pass


class IntegrityError(StorageError):
    pass


@dataclass(frozen=True)
class StoredObject:
    uri: str
    sha256: str
    size: int


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class UnsafePathError(StorageError, ValueError):
    """A key part that could leave the base it is joined to; refused before any request."""


def _check_part(part: str) -> None:
    if not isinstance(part, str) or not part.strip("/"):
        raise UnsafePathError(f"empty storage path part {part!r}")
    if "\x00" in part:
        raise UnsafePathError(f"storage path part {part!r} contains a NUL byte")
    if part.startswith(("/", "\\", "~")) or "://" in part or (len(part) > 1 and part[1] == ":"):
        raise UnsafePathError(f"storage path part {part!r} is absolute; give a relative key")
    if any(seg in ("..", ".") for seg in part.replace("\\", "/").split("/")):
        raise UnsafePathError(f"storage path part {part!r} has a '.' or '..' segment")


def join(base: str, *parts: str) -> str:
    """``base/part/...``; refuses parts that are empty, absolute, hold NUL, '.' or '..'."""
    if "\x00" in base:
        raise UnsafePathError(f"storage base {base!r} contains a NUL byte")
    out = base.rstrip("/")
    for p in parts:
        _check_part(p)
        out += "/" + p.strip("/")
    return out


def file_uri(path: Path) -> str:
    """``file://`` + the absolute path, as this module reads it back (no percent-encoding:
    ``Path.as_uri`` would turn ``date=2026-03-05`` into ``date%3D2026-03-05``)."""
    return "file://" + str(path)


def norm(uri: str) -> str:
    """One spelling per object, for comparing locations: a local path or ``file:`` URI
    becomes ``file:///abs/path`` with symlinks resolved (a link out of a folder is not inside
    it), ``s3://`` is kept as is. Raises UnsafePathError for relative paths and NUL bytes."""
    if "\x00" in uri:
        raise UnsafePathError(f"location {uri!r} contains a NUL byte")
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        return uri
    if parsed.scheme not in ("file", ""):
        raise StorageError(
            f"unsupported storage scheme {parsed.scheme!r} in {uri}; use file:// or s3://"
        )
    path = parsed.path if parsed.scheme else uri
    if not path.startswith("/"):
        raise UnsafePathError(f"location {uri!r} is not absolute")
    return file_uri(Path(path).resolve())


class _Backend(Protocol):
    def put(self, uri: str, data: bytes, digest: str) -> bool: ...
    def get(self, uri: str) -> tuple[bytes, str | None]: ...
    def digest(self, uri: str) -> str | None: ...
    def exists(self, uri: str) -> bool: ...
    def list(self, prefix: str) -> list[str]: ...
    def delete(self, uri: str) -> None: ...


def _local_path(uri: str) -> Path:
    parsed = urlparse(uri)
    if parsed.scheme not in ("file", ""):
        raise StorageError(f"not a local URI: {uri}")
    return Path(parsed.path if parsed.scheme else uri)


class _FileBackend:
    def put(self, uri: str, data: bytes, digest: str) -> bool:
        """Create ``uri`` atomically; False if it already exists."""
        path = _local_path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)  # atomic create-if-absent
            except FileExistsError:
                return False
            # The digest sidecar follows the data; an object caught without one (a crash in
            # between) has its digest computed from content instead.
            _atomic_text(path.with_name(path.name + SIDECAR), digest)
            fsync_path(path.parent)
            return True
        finally:
            os.unlink(tmp)

    def get(self, uri: str) -> tuple[bytes, str | None]:
        path = _local_path(uri)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise StorageError(f"no object at {uri}") from None
        return data, self.digest(uri)

    def digest(self, uri: str) -> str | None:
        side = _local_path(uri)
        side = side.with_name(side.name + SIDECAR)
        return side.read_text().strip() if side.exists() else None

    def exists(self, uri: str) -> bool:
        return _local_path(uri).is_file()

    def list(self, prefix: str) -> list[str]:
        root = _local_path(prefix)
        if root.is_file():
            return [file_uri(root)]
        if not root.is_dir():
            return []
        return sorted(
            file_uri(p)
            for p in root.rglob("*")
            if p.is_file() and not p.name.endswith(SIDECAR) and not p.name.startswith(".")
        )

    def delete(self, uri: str) -> None:
        path = _local_path(uri)
        path.unlink(missing_ok=True)
        path.with_name(path.name + SIDECAR).unlink(missing_ok=True)


def _atomic_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's entry list: renames become durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    """SHA-256 of a local file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _S3Backend:
    def __init__(self) -> None:
        import boto3

        self.client = boto3.client("s3", endpoint_url=get_settings().s3_endpoint_url)

    @staticmethod
    def _split(uri: str) -> tuple[str, str]:
        parsed = urlparse(uri)
        return parsed.netloc, parsed.path.lstrip("/")

    def put(self, uri: str, data: bytes, digest: str) -> bool:
        from botocore.exceptions import ClientError

        bucket, key = self._split(uri)
        try:
            self.client.put_object(
                Bucket=bucket,
                Key=key,
                Body=data,
                IfNoneMatch="*",  # conditional put: never overwrite
                Metadata={"sha256": digest},
                ChecksumAlgorithm="SHA256",
            )
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "412"):
                return False
            raise
        return True

    def get(self, uri: str) -> tuple[bytes, str | None]:
        from botocore.exceptions import ClientError

        bucket, key = self._split(uri)
        try:
            resp = self.client.get_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            raise StorageError(f"no object at {uri}: {exc}") from None
        return resp["Body"].read(), resp.get("Metadata", {}).get("sha256")

    def digest(self, uri: str) -> str | None:
        bucket, key = self._split(uri)
        head = self.client.head_object(Bucket=bucket, Key=key)
        return head.get("Metadata", {}).get("sha256")

    def exists(self, uri: str) -> bool:
        from botocore.exceptions import ClientError

        bucket, key = self._split(uri)
        try:
            self.client.head_object(Bucket=bucket, Key=key)
        except ClientError:
            return False
        return True

    def list(self, prefix: str) -> list[str]:
        bucket, key = self._split(prefix)
        out: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=key):
            out += [f"s3://{bucket}/{o['Key']}" for o in page.get("Contents", [])]
        return sorted(out)

    def delete(self, uri: str) -> None:
        bucket, key = self._split(uri)
        self.client.delete_object(Bucket=bucket, Key=key)


def _backend(uri: str) -> _Backend:
    scheme = urlparse(uri).scheme
    if scheme in ("file", ""):
        return _FileBackend()
    if scheme == "s3":
        return _S3Backend()
    raise StorageError(f"unsupported storage scheme {scheme!r} in {uri}; use file:// or s3://")


def write_bytes(uri: str, data: bytes) -> StoredObject:
    """Write ``data`` at ``uri`` atomically. Same bytes again is a no-op; other bytes raise."""
    digest = sha256_bytes(data)
    backend = _backend(uri)
    if not backend.put(uri, data, digest):
        existing = backend.digest(uri) or sha256_bytes(backend.get(uri)[0])
        if existing != digest:
            raise ObjectExistsError(
                f"{uri} already exists with different content (sha256 {existing}, "
                f"new {digest}); objects are never overwritten — write to a new key"
            )
    return StoredObject(uri=uri, sha256=digest, size=len(data))


def write_text(uri: str, text: str) -> StoredObject:
    return write_bytes(uri, text.encode())


def read_bytes(uri: str, *, verify: bool = True) -> bytes:
    data, digest = _backend(uri).get(uri)
    if verify and digest is not None and sha256_bytes(data) != digest:
        raise IntegrityError(
            f"{uri}: content sha256 {sha256_bytes(data)} does not match recorded {digest}"
        )
    return data


def read_text(uri: str) -> str:
    return read_bytes(uri).decode()


def digest_of(uri: str) -> str:
    """Recorded SHA-256 of an object (computed from content when none was recorded)."""
    recorded = _backend(uri).digest(uri)
    return recorded or sha256_bytes(read_bytes(uri, verify=False))


def exists(uri: str) -> bool:
    return _backend(uri).exists(uri)


def list_uris(prefix: str) -> list[str]:
    return _backend(prefix).list(prefix)


def move(src: str, dst: str) -> StoredObject:
    """Move without loss: write ``dst`` (never overwriting), verify it, then remove ``src``."""
    data = read_bytes(src)
    obj = write_bytes(dst, data)
    if digest_of(dst) != sha256_bytes(data):
        raise IntegrityError(f"copy {src} -> {dst} did not verify; source kept")
    _backend(src).delete(src)
    return obj


def local_path(uri: str) -> Path:
    """Path of a ``file://`` object (for libraries that want a path)."""
    return _local_path(uri)
