"""Object storage over ``file://`` and ``s3://`` with atomic, never-overwriting writes.

Every object written gets a SHA-256: on S3 as the object's ``sha256`` metadata (and
S3's own SHA-256 checksum), on a local folder as a ``<name>.sha256`` sidecar. Reads
verify it. A write to an existing key succeeds only if the bytes are identical
(idempotent retries); different bytes raise ``ObjectExistsError`` — data is never
overwritten.

Failures say which kind they are, because the caller's next step differs:

* :class:`TransientStorageError` — the S3 service could not be reached or did not answer
  in time (connect or read timeout, a connection dropped mid-body, HTTP 5xx, 429 or a
  throttling code) *after* botocore's own bounded retries (standard mode; total attempts
  ``AWS_MAX_ATTEMPTS``, default 3). Nothing is known about the object's content: callers
  must not judge the data on it (no quarantine, no ledger entry). Not a
  :class:`~pipeline.errors.PipelineRejection`, so the Airflow task is retried.
* :class:`StorageFullError` — a local write ran out of space (ENOSPC, EDQUOT) or over the
  file-size limit (EFBIG). Nothing was left at the target and no temporary file remains.
* :class:`StorageError` — anything else (no such object, an unsupported scheme).

S3 reads of large objects need not hold them: :func:`open_read` gives a seekable reader
whose every ``read`` is one ranged GET, pinned to the object's ETag (a Parquet reader
fetches the footer and then only the column chunks it decodes). :func:`download` copies an
object into a local file without holding it, reading no more than the caller's bound (remote
files that are untrusted input: ``pipeline.train.state``); :func:`delete` frees a key.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol, cast
from urllib.parse import urlparse

from pipeline.settings import get_settings

SIDECAR = ".sha256"


class StorageError(RuntimeError):
    pass


class ObjectExistsError(StorageError):
    pass


class IntegrityError(StorageError):
    pass


class TransientStorageError(StorageError):
    """The storage service failed to answer (timeout, dropped connection, 5xx, throttling)
    after botocore's retries: says nothing about the object's content; retry later."""


class StorageFullError(StorageError):
    """A local write ran out of space or over the file-size limit; nothing was left behind."""

    def __init__(self, message: str, errno_: int) -> None:
        super().__init__(message)
        self.errno = errno_


# S3 client: botocore's standard retry mode (bounded: AWS_MAX_ATTEMPTS total attempts,
# default 3) and the settings' timeouts (PIPELINE_S3_CONNECT_TIMEOUT_S / _READ_TIMEOUT_S).
# Error codes S3 (and MinIO) answer when the service, not the request, is at fault.
_TRANSIENT_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "RequestTimeout",
        "RequestTimeoutException",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "RequestThrottled",
        "BandwidthLimitExceeded",
        "TooManyRequestsException",
    }
)
# A local write that failed for want of room (not for a bad path or permissions).
_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG} | ({errno.EDQUOT} if hasattr(errno, "EDQUOT") else set())


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
        """Create ``uri`` atomically; False if it already exists.

        Everything that needs space is written first, as temporary files beside the target
        (the data, then its digest sidecar), each fsynced; only then is the data linked into
        place (create-if-absent) and the sidecar renamed beside it. A full disk therefore
        fails before anything appears at ``uri``, and every temporary file is removed.
        """
        path = _local_path(uri)
        with _local_write(uri, path, len(data)):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = _write_temp(path, data)
            side_tmp: Path | None = None
            try:
                side_tmp = _write_temp(path.with_name(path.name + SIDECAR), digest.encode())
                try:
                    os.link(tmp, path)  # atomic create-if-absent
                except FileExistsError:
                    return False
                # A crash between the link and this rename leaves an object without its
                # sidecar: its digest is then computed from its content.
                os.replace(side_tmp, path.with_name(path.name + SIDECAR))
                side_tmp = None
                fsync_path(path.parent)
                return True
            finally:
                os.unlink(tmp)
                if side_tmp is not None:
                    side_tmp.unlink(missing_ok=True)

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


def _write_temp(path: Path, data: bytes) -> Path:
    """``data`` in a new fsynced temporary file beside ``path`` (hidden: listings skip it);
    on any failure the temporary file is removed before the error propagates."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


@contextmanager
def _local_write(uri: str, path: Path, size: int) -> Iterator[None]:
    """A full disk, a quota or a file-size limit while writing ``uri``: a StorageFullError
    that says what, where and what to do (the caller has already cleaned up)."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _FULL_ERRNOS:
            raise
        raise StorageFullError(
            f"cannot write {uri} ({size} bytes): {exc.strerror} "
            f"[{errno.errorcode[exc.errno]}] in {path.parent}. Nothing was written there and "
            "no temporary file was left; objects already stored are untouched. Free space on "
            "that file system (or raise the quota, or the process's file-size limit "
            "`ulimit -f`) and retry the task.",
            exc.errno,
        ) from exc


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


def _s3_client() -> Any:
    """A boto3 S3 client on the configured endpoint: botocore's standard retry mode (total
    attempts from ``AWS_MAX_ATTEMPTS``, default 3) and bounded connect and read timeouts."""
    import boto3
    from botocore.config import Config

    settings = get_settings()
    config = Config(
        retries={"mode": "standard"},
        connect_timeout=settings.s3_connect_timeout_s,
        read_timeout=settings.s3_read_timeout_s,
    )
    return boto3.client("s3", endpoint_url=settings.s3_endpoint_url, config=config)


def _status(exc: Any) -> tuple[str, int]:
    """(error code, HTTP status) of a botocore ClientError."""
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    return code, status


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (raised by botocore or the HTTP stack beneath it) is the service or
    the network failing — a timeout, a refused or dropped connection, a 5xx, a 429 or a
    throttling code — rather than something about the request or the object."""
    from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(exc, TransientStorageError):
        return True
    if isinstance(exc, ClientError):
        code, status = _status(exc)
        return status >= 500 or status == 429 or code in _TRANSIENT_CODES
    return isinstance(
        exc,
        (HTTPClientError, BotoConnectionError, IncompleteReadError, ConnectionError, TimeoutError),
    )


@contextmanager
def _s3_call(action: str, uri: str) -> Iterator[None]:
    """Turn a transient failure of the S3 call inside into a TransientStorageError."""
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:
        if not is_transient(exc):
            raise
        where = get_settings().s3_endpoint_url or "the S3 endpoint"
        raise TransientStorageError(
            f"{action} {uri} failed: the storage service at {where} did not answer in time, "
            f"dropped the connection or was unavailable ({type(exc).__name__}: {exc}). This "
            "says nothing about the object's content: nothing was moved, quarantined or "
            "counted. The task is retried; if it keeps failing, check that the endpoint is "
            "up and reachable, then clear the task."
        ) from exc


class _S3Backend:
    def __init__(self) -> None:
        self.client = _s3_client()

    @staticmethod
    def _split(uri: str) -> tuple[str, str]:
        parsed = urlparse(uri)
        return parsed.netloc, parsed.path.lstrip("/")

    def put(self, uri: str, data: bytes, digest: str) -> bool:
        from botocore.exceptions import ClientError

        bucket, key = self._split(uri)
        try:
            with _s3_call("writing", uri):
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
            with _s3_call("reading", uri):
                resp = self.client.get_object(Bucket=bucket, Key=key)
                data = resp["Body"].read()
        except ClientError as exc:
            raise StorageError(f"no object at {uri}: {exc}") from None
        return data, resp.get("Metadata", {}).get("sha256")

    def head(self, uri: str) -> dict[str, Any]:
        """The object's HEAD response; StorageError if there is none."""
        from botocore.exceptions import ClientError

        bucket, key = self._split(uri)
        try:
            with _s3_call("reading", uri):
                head: dict[str, Any] = self.client.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            raise StorageError(f"no object at {uri}: {exc}") from None
        return head

    def digest(self, uri: str) -> str | None:
        return self.head(uri).get("Metadata", {}).get("sha256")

    def exists(self, uri: str) -> bool:
        from botocore.exceptions import ClientError

        bucket, key = self._split(uri)
        try:
            with _s3_call("looking up", uri):
                self.client.head_object(Bucket=bucket, Key=key)
        except ClientError:
            return False  # 404, or 403 where the caller may not list the bucket
        return True

    def list(self, prefix: str) -> list[str]:
        bucket, key = self._split(prefix)
        out: list[str] = []
        with _s3_call("listing", prefix):
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=bucket, Prefix=key):
                out += [f"s3://{bucket}/{o['Key']}" for o in page.get("Contents", [])]
        return sorted(out)

    def delete(self, uri: str) -> None:
        bucket, key = self._split(uri)
        with _s3_call("deleting", uri):
            self.client.delete_object(Bucket=bucket, Key=key)


class _S3RangeReader(io.RawIOBase):
    """A seekable, read-only view of one S3 object: each ``read`` is one ranged GET, pinned
    to the ETag seen when it was opened (``If-Match``), so every byte comes from the same
    object. Memory: only what the caller asks for at a time."""

    def __init__(self, backend: _S3Backend, uri: str) -> None:
        super().__init__()
        self._backend, self._uri = backend, uri
        self._bucket, self._key = backend._split(uri)
        head = backend.head(uri)
        self._size = int(head["ContentLength"])
        self._etag = str(head["ETag"])
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset} in {self._uri}")
        self._pos = base + offset
        return self._pos

    def size(self) -> int:
        return self._size

    def read(self, size: int | None = -1) -> bytes:
        from botocore.exceptions import ClientError

        if size is None or size < 0:
            size = self._size - self._pos
        end = min(self._pos + size, self._size)
        if end <= self._pos:
            return b""
        want = end - self._pos
        try:
            with _s3_call("reading", self._uri):
                resp = self._backend.client.get_object(
                    Bucket=self._bucket,
                    Key=self._key,
                    Range=f"bytes={self._pos}-{end - 1}",
                    IfMatch=self._etag,
                )
                data: bytes = resp["Body"].read()
        except ClientError as exc:
            code, status = _status(exc)
            if status == 412 or code == "PreconditionFailed":
                raise StorageError(
                    f"{self._uri} changed while it was being read (ETag {self._etag} is gone); "
                    "stored objects are never overwritten, so something outside the pipeline "
                    "replaced it: find out what, then retry the task"
                ) from None
            raise StorageError(f"cannot read {self._uri}: {exc}") from None
        if len(data) != want:
            raise TransientStorageError(
                f"reading {self._uri}: asked for {want} bytes at offset {self._pos}, "
                f"got {len(data)}; the connection was cut short. The task is retried."
            )
        self._pos = end
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


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


def open_read(uri: str) -> BinaryIO:
    """A seekable binary reader over the object at ``uri``, for readers that fetch only
    the parts they need (Parquet: the footer, then column chunks). A local file is opened
    as is; on S3 every ``read`` is one ranged GET pinned to the object's ETag (unbuffered:
    give it large reads), and transient failures raise :class:`TransientStorageError`. The object's SHA-256 is not
    re-verified (that needs every byte): snapshots were verified when they were written,
    and Parquet pages carry their own checksums."""
    backend = _backend(uri)
    if isinstance(backend, _S3Backend):
        return cast(BinaryIO, _S3RangeReader(backend, uri))
    try:
        return _local_path(uri).open("rb")
    except FileNotFoundError:
        raise StorageError(f"no object at {uri}") from None


def local_path(uri: str) -> Path:
    """Path of a ``file://`` object (for libraries that want a path)."""
    return _local_path(uri)


def delete(uri: str) -> None:
    """Remove the object at ``uri`` (and its digest sidecar on a local folder); no error if
    there is none. Objects are never overwritten, so a key is reused only after this."""
    _backend(uri).delete(uri)


def download(uri: str, path: Path, *, max_bytes: int) -> StoredObject:
    """Copy the object at ``uri`` into the local file ``path`` (temp + rename: ``path`` holds
    the whole object or nothing), reading at most ``max_bytes``: a larger object raises
    :class:`IntegrityError` before more than that is read, so a hostile or corrupt object
    cannot fill the disk. The object's recorded SHA-256 is verified when it has one.
    Transient S3 failures raise :class:`TransientStorageError` (after botocore's retries)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    h, size = hashlib.sha256(), 0

    def too_big(n: int) -> IntegrityError:
        return IntegrityError(
            f"{uri} is {n}+ bytes, more than the {max_bytes} expected; not read further"
        )

    try:
        with os.fdopen(fd, "wb") as out:
            backend = _backend(uri)
            if isinstance(backend, _S3Backend):
                from botocore.exceptions import ClientError

                bucket, key = backend._split(uri)
                try:
                    with _s3_call("reading", uri):
                        resp = backend.client.get_object(Bucket=bucket, Key=key)
                        if int(resp.get("ContentLength") or 0) > max_bytes:
                            resp["Body"].close()
                            raise too_big(int(resp["ContentLength"]))
                        for chunk in resp["Body"].iter_chunks(1 << 20):
                            size += len(chunk)
                            if size > max_bytes:
                                resp["Body"].close()
                                raise too_big(size)
                            h.update(chunk)
                            out.write(chunk)
                except ClientError as exc:
                    raise StorageError(f"no object at {uri}: {exc}") from None
                recorded = resp.get("Metadata", {}).get("sha256")
            else:
                src = _local_path(uri)
                try:
                    fh = src.open("rb")
                except FileNotFoundError:
                    raise StorageError(f"no object at {uri}") from None
                with fh:
                    if os.fstat(fh.fileno()).st_size > max_bytes:
                        raise too_big(os.fstat(fh.fileno()).st_size)
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        size += len(chunk)
                        if size > max_bytes:
                            raise too_big(size)
                        h.update(chunk)
                        out.write(chunk)
                recorded = backend.digest(uri)
            out.flush()
            os.fsync(out.fileno())
        digest = h.hexdigest()
        if recorded is not None and recorded != digest:
            raise IntegrityError(
                f"{uri}: content sha256 {digest} does not match recorded {recorded}"
            )
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return StoredObject(uri=uri, sha256=digest, size=size)
