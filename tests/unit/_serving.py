"""What the serving tests build by hand: request rows, a published checkpoint, and the tags an
accepted version carries."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any


def records(df: Any, columns: list[str]) -> list[dict]:
    """Rows as a client sends them: missing values as JSON null."""
    part = df[columns]
    return part.astype(object).where(part.notna(), None).to_dict(orient="records")


def publish_checkpoint(home: Path, name: str, model, features, probe, **kw: Any) -> str:
    """Save a signed checkpoint under ``home/ckpt/name`` and publish it to the storage
    root's ``checkpoints/name``; its URI."""
    from pipeline import checkpoint, storage
    from pipeline.settings import get_settings

    local = home / "ckpt" / name
    checkpoint.save_checkpoint(
        local,
        model,
        features,
        probe,
        data_snapshot={"uri": "test", "sha256": name},
        training={"stop_reason": "max_steps"},
        **kw,
    )
    uri = storage.join(get_settings().storage_root, "checkpoints", name)
    checkpoint.publish(local, uri)
    return uri


def gated_tags(uri: str, **extra: str) -> dict[str, str]:
    """What register_challenger + gate_promotion record on an accepted version: the
    checkpoint, its manifest's digest, and the gate's verdict."""
    from pipeline import checkpoint, storage

    manifest = storage.read_bytes(storage.join(uri, checkpoint.MANIFEST), verify=False)
    return {
        "checkpoint.uri": uri,
        "checkpoint.manifest_sha256": hashlib.sha256(manifest).hexdigest(),
        "gate.verdict": "promote",
        **extra,
    }


class Servers:
    """Real uvicorn servers on 127.0.0.1, each in a thread of this process: ``start(app)``
    returns its URL once it accepts connections; ``stop()`` ends every one started."""

    def __init__(self) -> None:
        self.running: list[tuple[Any, Any]] = []

    def start(self, app: Any, port: int | None = None, timeout: float = 30) -> str:
        import threading
        import time

        import uvicorn

        from tests.integration.moto import free_port

        port = port or free_port()
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        self.running.append((server, thread))
        deadline = time.monotonic() + timeout
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        for server, _ in self.running:
            server.should_exit = True
        for _, thread in self.running:
            thread.join(10)
