"""A mutual-exclusion lock held as an object in storage, for read-check-set sequences.

MLflow has no server-side compare-and-set on aliases, so ``registry.promote_champion``
serialises its read-check-set under this lock. The lock is one object at a fixed key,
created with ``storage.write_bytes`` — create-if-absent on both backends (``os.link``
on a local folder, ``If-None-Match: *`` on S3) and refusing different bytes — holding
a unique owner token. Whoever creates the object holds the lock; everyone else polls.
Release deletes it after checking it still holds our token.

Stale locks: a holder that dies leaves its object behind. An object older than
``stale_after`` seconds (default 120 s; a promotion holds the lock for well under a
second, or a few seconds against a remote server) is broken by exactly one waiter,
the one that wins a create-if-absent "break token" named after the stale object's
digest, and then re-acquired normally.

Limits, stated: (1) a holder stalled for longer than ``stale_after`` (a GC pause, a
suspended VM) can lose the lock while still acting on it — keep the critical section
short and the timeout generous; (2) between a release's or a break's check of the
owner token and its delete there is a tiny window in which a new holder's object
could be deleted (storage offers no delete-if-match); it needs a stale lock or an
over-running holder to matter. The guard is for concurrent DAG runs and operators,
not for adversaries; anything writing the aliases without taking the lock (the
MLflow UI, another tool) is outside it.
"""

from __future__ import annotations

import json
import os
import random
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from pipeline import storage

DEFAULT_STALE_AFTER_S = 120.0
DEFAULT_ACQUIRE_TIMEOUT_S = 150.0


class LockTimeout(RuntimeError):
    """The lock stayed held (and fresh) for longer than we were willing to wait."""


def _delete(uri: str) -> None:
    # storage has no public delete (data objects are never deleted); a lock object is
    # the one thing that must be.
    storage._backend(uri).delete(uri)  # noqa: SLF001


def _read(uri: str) -> tuple[bytes, dict] | None:
    try:
        raw = storage.read_bytes(uri, verify=False)
    except storage.StorageError:
        return None  # released in between
    try:
        return raw, json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return raw, {}


@contextmanager
def storage_lock(
    uri: str,
    *,
    purpose: str = "",
    stale_after: float = DEFAULT_STALE_AFTER_S,
    timeout: float = DEFAULT_ACQUIRE_TIMEOUT_S,
    poll: float = 0.05,
) -> Iterator[dict]:
    """Hold the lock at ``uri`` for the ``with`` body; yields the owner record."""
    owner = {
        "owner": uuid.uuid4().hex,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "purpose": purpose,
        "acquired_at": time.time(),
        "stale_after_s": stale_after,
    }
    token = json.dumps(owner, sort_keys=True).encode()
    deadline = time.monotonic() + timeout
    while True:
        try:
            storage.write_bytes(uri, token)
            break
        except storage.ObjectExistsError:
            pass
        except storage.StorageError:
            pass  # the holder released between our create and our read-back: try again
        held = _read(uri)
        if held is not None:
            raw, rec = held
            age = time.time() - float(rec.get("acquired_at", 0))
            if age > float(rec.get("stale_after_s", stale_after)):
                _break_stale(uri, raw)
                continue
        if time.monotonic() > deadline:
            who = held[1] if held else {}
            raise LockTimeout(
                f"lock {uri} still held after {timeout:.0f}s by "
                f"{who.get('host')}:{who.get('pid')} ({who.get('purpose')})"
            )
        time.sleep(poll * (0.5 + random.random()))
    try:
        yield owner
    finally:
        held = _read(uri)
        if held is not None and held[0] == token:
            _delete(uri)


def _break_stale(uri: str, raw: bytes) -> None:
    """Delete a stale lock object — only the one waiter that wins the break token does."""
    digest = storage.sha256_bytes(raw)
    try:
        storage.write_bytes(
            f"{uri}.broken-{digest[:24]}",
            json.dumps(
                {"broken_by": f"{socket.gethostname()}:{os.getpid()}", "at": time.time()}
            ).encode(),
        )
    except storage.ObjectExistsError:
        return  # another waiter is breaking it
    held = _read(uri)
    if held is not None and held[0] == raw:
        _delete(uri)
