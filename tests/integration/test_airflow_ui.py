"""`make airflow`: standalone on 127.0.0.1 serves the DAG over real HTTP and stops cleanly."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_standalone_serves_dag_and_stops_with_all_children(tmp_path, monkeypatch):
    import airflow_standalone as sa

    monkeypatch.setenv("PIPELINE_HOME", str(tmp_path / "local"))
    monkeypatch.setenv("AIRFLOW__API__PORT", str(_free_port()))
    for var in list(os.environ):
        if var in ("AIRFLOW_HOME", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"):
            monkeypatch.delenv(var)
    e = sa.env()
    Path(e["AIRFLOW_HOME"]).mkdir(parents=True)
    airflow = str(Path(sys.executable).with_name("airflow"))
    subprocess.run([airflow, "db", "migrate"], env=e, check=True, capture_output=True)
    url = f"http://127.0.0.1:{e['AIRFLOW__API__PORT']}"
    proc = subprocess.Popen(
        [airflow, "standalone"],
        env=e,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert sa.wait_healthy(url, proc, timeout=240), "standalone never became healthy"
        user, password = next(
            iter(
                json.loads(
                    (
                        Path(e["AIRFLOW_HOME"]) / "simple_auth_manager_passwords.json.generated"
                    ).read_text()
                ).items()
            )
        )
        req = urllib.request.Request(
            f"{url}/auth/token",
            method="POST",
            data=json.dumps({"username": user, "password": password}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            token = json.load(r)["access_token"]
        dag_ids: list[str] = []
        deadline = time.time() + 120
        while "retrain_card_fraud" not in dag_ids and time.time() < deadline:
            req = urllib.request.Request(
                f"{url}/api/v2/dags", headers={"Authorization": f"Bearer {token}"}
            )
            with urllib.request.urlopen(req, timeout=10) as r:
                dag_ids = [d["dag_id"] for d in json.load(r)["dags"]]
            time.sleep(2)
        assert "retrain_card_fraud" in dag_ids and "retrain_digits" in dag_ids
    finally:
        sa.stop(proc)
    assert not sa._group_alive(proc.pid), "a child of airflow standalone outlived the stop"
