"""The signing key from the Airflow Connection ``checkpoint_signing``, handed to the
Airflow-free pipeline as settings by the DAG side (dags/connections.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "dags"))  # as Airflow does

from connections import use_signing_connection  # noqa: E402
from pipeline import checkpoint  # noqa: E402


def test_signing_key_from_airflow_connection_only_inside_a_task(
    pipeline_home, monkeypatch, tmp_path
):
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow"))
    monkeypatch.setenv(
        "AIRFLOW_CONN_CHECKPOINT_SIGNING",
        json.dumps({"conn_type": "generic", "login": "kid-7", "password": "conn-secret"}),
    )
    monkeypatch.setenv("PIPELINE_SIGNING_KEY", "settings-secret")
    monkeypatch.setenv("PIPELINE_SIGNING_KEY_ID", "local")
    from pipeline.settings import get_settings

    get_settings.cache_clear()
    try:
        assert checkpoint.signing_key() == (b"settings-secret", "local")  # not applied: settings
        assert use_signing_connection() is True  # what a task does first
        assert checkpoint.signing_key() == (b"conn-secret", "kid-7")
        signed = checkpoint.sign(b"manifest")
        assert json.loads(signed)["key_id"] == "kid-7"
        monkeypatch.delenv("AIRFLOW_CONN_CHECKPOINT_SIGNING")
        monkeypatch.setenv("PIPELINE_SIGNING_KEY", "settings-secret")
        monkeypatch.setenv("PIPELINE_SIGNING_KEY_ID", "local")
        get_settings.cache_clear()
        assert use_signing_connection() is False  # no connection: settings stand
        assert checkpoint.signing_key() == (b"settings-secret", "local")
        assert "signed with 'kid-7'" in checkpoint.check_signature(b"manifest", signed)
    finally:
        get_settings.cache_clear()
