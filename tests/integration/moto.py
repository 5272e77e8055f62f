"""moto's S3 server as a real process on 127.0.0.1, for the integration tests that need one."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def use_s3(monkeypatch: pytest.MonkeyPatch, endpoint: str, **extra: str) -> None:
    """Point the pipeline's S3 client at ``endpoint`` (test credentials, ``extra`` settings
    besides) and drop the cached settings; monkeypatch undoes the environment."""
    for k, v in {
        "PIPELINE_S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        **extra,
    }.items():
        monkeypatch.setenv(k, v)
    from pipeline.settings import get_settings

    get_settings.cache_clear()


@contextmanager
def moto_server(env: dict[str, str] | None = None) -> Iterator[int]:
    """Start ``moto_server`` on a free port (its own process group), wait until it answers,
    yield the port; stop the group on exit."""
    port = free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.time() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail("moto_server did not start")
            time.sleep(0.2)
    try:
        yield port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
