"""A producer lands a batch for the second model and its DAG, only its, runs on the event.

``python -m pipeline data land --model digits --file PATH`` (a subprocess with a producer's
environment: S3 storage, the Airflow API's URL and the simple auth manager's credentials)
copies the batch into ``digits``' landing prefix on S3 and creates an event on its asset
``pipeline://models/digits/batch`` through Airflow's REST API (``/auth/token``,
``/api/v2/assets``, ``/api/v2/assets/events``). The scheduler then starts one
``retrain_digits`` run of type ``asset_triggered`` whose ``ingest_batch`` reads exactly the
landed object; ``retrain_card_fraud`` (also unpaused, scheduled on its own asset) is not
started by it.

The digits run is stopped once ``ingest_batch`` has succeeded (marked failed, the DAG
paused again): the rest of a digits retrain is not what this test checks, and the suite's
other runs (parallelism 2) should not share the executor with it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.stack.conftest import DAG_ID, ROOT

DIGITS = "digits"
DIGITS_DAG = f"retrain_{DIGITS}"
DIGITS_ASSET = f"pipeline://models/{DIGITS}/batch"


def _runs(airflow, dag_id: str) -> list[dict[str, Any]]:
    status, out = airflow.api("GET", f"dags/{dag_id}/dagRuns?limit=100")
    assert status == 200, (status, out)
    return out["dag_runs"]


def _wait(what: str, timeout: float, fn, airflow) -> Any:
    """fn() until truthy (bounded); fail naming what was awaited, with the scheduler's tail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = fn()
        if got:
            return got
        for name, proc in airflow.procs.items():
            assert proc.poll() is None, f"airflow {name} exited: {airflow.tail(name)}"
        time.sleep(1)
    raise AssertionError(f"{what} not seen within {timeout:.0f}s\n{airflow.tail('scheduler')}")


@pytest.fixture
def digits_dag(airflow):
    if not (ROOT / "models" / DIGITS / "model.yaml").is_file():
        pytest.skip(f"models/{DIGITS}/model.yaml is not there (the second model)")
    _wait(
        f"{DIGITS_DAG} parsed",
        120,
        lambda: airflow.api("GET", f"dags/{DIGITS_DAG}")[0] == 200,
        airflow,
    )
    status, out = airflow.api("PATCH", f"dags/{DIGITS_DAG}", {"is_paused": False})
    assert status == 200, (status, out)
    yield DIGITS_DAG
    airflow.api("PATCH", f"dags/{DIGITS_DAG}", {"is_paused": True})


def _local_batch(tmp_path: Path) -> Path:
    from models.digits.data import split
    from pipeline.ingest import parquet_bytes

    path = tmp_path / "digits-batch-1.parquet"
    path.write_bytes(parquet_bytes(split(0)["batch-1"]))
    return path


def test_landing_a_batch_triggers_only_its_models_dag(digits_dag, airflow, s3, tmp_path):
    t0 = time.monotonic()
    batch = _local_batch(tmp_path)
    card_fraud_before = {r["dag_run_id"] for r in _runs(airflow, DAG_ID)}
    digits_before = {r["dag_run_id"] for r in _runs(airflow, DIGITS_DAG)}

    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "data", "land", "--model", DIGITS, "--file", str(batch)],
        env=airflow.producer_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    rec = json.loads(proc.stdout)
    landed = time.monotonic() - t0
    assert rec["model"] == DIGITS and rec["rows"] == 120
    assert rec["uri"].startswith(f"s3://pipeline/data/landing/{DIGITS}/date="), rec
    key = rec["uri"].removeprefix("s3://pipeline/")
    assert s3.client().get_object(Bucket="pipeline", Key=key)["Body"].read() == batch.read_bytes()
    event = rec["event"]
    assert event and event["id"] and event["asset_id"], rec

    # the asset Airflow has for that id: digits' batch asset, scheduling only retrain_digits
    status, asset = airflow.api("GET", f"assets/{event['asset_id']}")
    assert status == 200 and asset["uri"] == DIGITS_ASSET, (status, asset)
    assert [d["dag_id"] for d in asset["scheduled_dags"]] == [DIGITS_DAG], asset["scheduled_dags"]

    # one asset-triggered retrain_digits run, started by that event. Wait for it to start:
    # Airflow 3.3's event listings (GET assets/events, upstreamAssetEvents) answer 500 while
    # a run the event created is still queued (DagRunAssetReference.start_date is required).
    def new_run() -> dict[str, Any] | None:
        runs = [r for r in _runs(airflow, DIGITS_DAG) if r["dag_run_id"] not in digits_before]
        assert all(r["run_type"] == "asset_triggered" for r in runs), runs
        return runs[0] if runs and runs[0].get("start_date") else None

    run = _wait(f"an asset-triggered {DIGITS_DAG} run", 120, new_run, airflow)
    run_id = run["dag_run_id"]
    started = time.monotonic() - t0
    try:
        status, out = airflow.api("GET", f"dags/{DIGITS_DAG}/dagRuns/{run_id}/upstreamAssetEvents")
        assert status == 200, out
        assert [e["id"] for e in out["asset_events"]] == [event["id"]], out
        extra = out["asset_events"][0]["extra"]  # what the run's first task reads
        assert (extra["batch_uri"], extra["model"], extra["sha256"]) == (
            rec["uri"],
            DIGITS,
            rec["sha256"],
        )

        def ingest_state() -> str | None:
            state = airflow.task_states(DIGITS_DAG, run_id).get("ingest_batch")
            return state if state in ("success", "failed", "upstream_failed") else None

        state = _wait(f"{DIGITS_DAG} ingest_batch done", 300, ingest_state, airflow)
        assert state == "success", (state, airflow.task_logs()[-6000:])
        status, xcom = airflow.api(
            "GET",
            f"dags/{DIGITS_DAG}/dagRuns/{run_id}/taskInstances/ingest_batch/xcomEntries/return_value",
        )
        assert status == 200, xcom
        ingested = json.loads(xcom["value"]) if isinstance(xcom["value"], str) else xcom["value"]
        assert ingested["source_uri"] == rec["uri"], ingested
        assert ingested["model"] == DIGITS and ingested["sha256"] == rec["sha256"], ingested
        assert ingested["rows"] == 120
    finally:  # the rest of the digits retrain is not this test's: stop it, free the executor
        airflow.api("PATCH", f"dags/{DIGITS_DAG}/dagRuns/{run_id}", {"state": "failed"})

    # and the reference model's DAG was not started by it
    new = [r for r in _runs(airflow, DAG_ID) if r["dag_run_id"] not in card_fraud_before]
    assert [r for r in new if r["run_type"] == "asset_triggered"] == [], new
    print(
        f"\nlanded + event in {landed:.1f}s; {DIGITS_DAG} run {run_id} created after {started:.1f}s, "
        f"ingest_batch succeeded after {time.monotonic() - t0:.1f}s"
    )
