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
