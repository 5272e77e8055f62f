"""The signing key from the Airflow Connection ``checkpoint_signing``, handed to the
Airflow-free pipeline as settings by the DAG side (dags/connections.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "dags"))  # as Airflow does

from connections import use_signing_connection  # noqa: E402
from pipeline import checkpoint, signing  # noqa: E402


def _pem() -> tuple[str, bytes]:
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return pem, raw


def test_signing_key_from_airflow_connection_only_inside_a_task(
    pipeline_home, monkeypatch, tmp_path
):
    conn_pem, conn_pub = _pem()
    settings_pem, settings_pub = _pem()
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow"))
    monkeypatch.setenv(
        "AIRFLOW_CONN_CHECKPOINT_SIGNING",
        json.dumps({"conn_type": "generic", "login": "kid-7", "password": conn_pem}),
    )
    monkeypatch.setenv("PIPELINE_SIGNING_KEY", settings_pem)
    monkeypatch.setenv("PIPELINE_SIGNING_KEY_ID", "local")
    from pipeline.settings import get_settings

    def public(signer: signing.Signer) -> bytes:
        return signer.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    get_settings.cache_clear()
    try:
        before = signing.configured_signer()  # not applied yet: the settings' key
        assert (before.key_id, public(before)) == ("local", settings_pub)
        assert use_signing_connection() is True  # what a task does first
        signer = signing.configured_signer()
        assert (signer.key_id, public(signer)) == ("kid-7", conn_pub)
        signed = checkpoint.sign(b"manifest")
        assert json.loads(signed)["key_id"] == "kid-7"
        assert checkpoint.check_signature(b"manifest", signed) is None  # its own key: trusted
        monkeypatch.delenv("AIRFLOW_CONN_CHECKPOINT_SIGNING")
        monkeypatch.setenv("PIPELINE_SIGNING_KEY", settings_pem)
        monkeypatch.setenv("PIPELINE_SIGNING_KEY_ID", "local")
        get_settings.cache_clear()
        assert use_signing_connection() is False  # no connection: settings stand
        after = signing.configured_signer()
        assert (after.key_id, public(after)) == ("local", settings_pub)
        problem = checkpoint.check_signature(b"manifest", signed)  # kid-7 is not trusted here
        assert problem is not None and "kid-7" in problem
    finally:
        get_settings.cache_clear()
