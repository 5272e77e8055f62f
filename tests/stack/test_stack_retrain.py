"""retrain_model end to end on real servers: triggered through Airflow's REST API (JWT), data
in S3 (moto), MLflow with basic-auth on PostgreSQL; the result read back through MLflow's REST
API with credentials. Then: no secret of an Airflow Connection or of the environment reached
MLflow params/tags/artifacts or the task logs.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.stack.conftest import http

MODEL = "retrain-model"


def land(s3, key: str, **spec: Any) -> str:
    from pipeline.data.generate import WorldSpec, generate, to_parquet_bytes

    s3.client().put_object(Bucket="pipeline", Key=key, Body=to_parquet_bytes(generate(WorldSpec(**spec))))
    return f"s3://pipeline/{key}"


@pytest.fixture(scope="session")
def retrain_triggered(airflow, s3, mlflow_server) -> dict[str, Any]:
    batch = land(s3, "landing/stack/batch.parquet", rows=3000, seed=1)
    eval_uri = land(s3, "trusted/stack/eval.parquet", rows=2000, seed=101)
    conf = {"batch_uri": batch, "eval_uri": eval_uri, "force_retrain": True, "max_epochs": 3,
            "gate_floor": 0.5, "gate_max_latency_p95_ms": 10_000}  # fmt: skip
    t0 = time.monotonic()
    return {"run_id": airflow.trigger("retrain_model", conf), "t0": t0, "batch": batch,
            "eval": eval_uri}  # fmt: skip


def test_trigger_retrain_run(retrain_triggered):
    """Runs first (conftest orders it): the DAG run proceeds while the other stack tests run."""
    assert retrain_triggered["run_id"].startswith("manual__")


@pytest.fixture(scope="module")
def first_run(retrain_triggered, airflow) -> dict[str, Any]:
    run_id, t0 = retrain_triggered["run_id"], retrain_triggered["t0"]
    batch, eval_uri = retrain_triggered["batch"], retrain_triggered["eval"]
    state = airflow.wait_run("retrain_model", run_id, timeout=480)
    states = airflow.task_states("retrain_model", run_id)
    assert state == "success", (state, states, airflow.tail("scheduler"), airflow.task_logs()[-6000:])
    return {"run_id": run_id, "batch": batch, "eval": eval_uri, "seconds": time.monotonic() - t0,
            "states": states}  # fmt: skip


def test_triggered_run_registers_a_champion_with_lineage(first_run, mlflow_server, s3):
    print(f"\nretrain_model run {first_run['run_id']}: {first_run['seconds']:.0f}s")
    assert first_run["states"]["train_model"] == "success"
    assert first_run["states"]["promote_champion"] == "success"
    status, out = mlflow_server.api("GET", f"registered-models/alias?name={MODEL}&alias=champion")
    assert status == 200, out
    mv = out["model_version"]
    tags = {t["key"]: t["value"] for t in mv.get("tags", [])}
    assert tags["data.batch_uri"] == first_run["batch"]
    assert tags["data.snapshot_uri"].startswith("s3://pipeline/data/snapshots/")
    assert len(tags["data.snapshot_sha256"]) == 64
    assert tags["airflow.dag_id"] == "retrain_model"
    assert tags["airflow.run_id"] == first_run["run_id"]
    assert tags["checkpoint.uri"].startswith("s3://pipeline/data/checkpoints/")
    assert len(tags["checkpoint.manifest_sha256"]) == 64
    assert tags["gate.verdict"] == "promote"
    # the checkpoint and the model's artifacts really are in S3 (the proxied MLflow bucket)
    key = tags["checkpoint.uri"].removeprefix("s3://pipeline/")
    assert s3.client().list_objects_v2(Bucket="pipeline", Prefix=key)["KeyCount"] > 0
    assert s3.client().list_objects_v2(Bucket="mlflow", Prefix="artifacts/")["KeyCount"] > 0
    # one version for one run
    status, out = mlflow_server.api("GET", f"model-versions/search?filter=name%3D%27{MODEL}%27")
    assert status == 200 and len(out["model_versions"]) == 1, out


def _run_texts(mlflow_server, run_id: str) -> list[str]:
    """Params, tags and every artifact's bytes of one MLflow run, as text."""
    _, out = mlflow_server.api("GET", f"runs/get?run_id={run_id}")
    data = out["run"]["data"]
    texts = [f"{p['key']}={p['value']}" for p in data.get("params", [])]
    texts += [f"{t['key']}={t['value']}" for t in data.get("tags", [])]
    todo, files = [""], []
    while todo:  # bounded by the run's artifact tree
        path = todo.pop()
        q = f"artifacts/list?run_id={run_id}" + (f"&path={path}" if path else "")
        _, listing = mlflow_server.api("GET", q)
        for f in listing.get("files", []):
            (todo if f["is_dir"] else files).append(f["path"])
    assert files, "the run logged no artifacts"
    for path in files:
        status, body = http("GET", f"{mlflow_server.url}/get-artifact?run_id={run_id}&path={path}",
                            auth=mlflow_server.admin, timeout=30)  # fmt: skip
        assert status == 200, (path, status)
        texts.append(body if isinstance(body, str) else str(body))
    return texts


def test_no_secret_reaches_mlflow_or_task_logs(first_run, airflow, mlflow_server):
    secrets = {  # (conftest's values are per-process random: read them from the fixtures)
        "aws_default connection password / AWS_SECRET_ACCESS_KEY": airflow.env["AWS_SECRET_ACCESS_KEY"],
        "MLFLOW_TRACKING_PASSWORD": mlflow_server.admin[1],
        "PIPELINE_SIGNING_KEY": airflow.env["PIPELINE_SIGNING_KEY"],
        "AIRFLOW__API_AUTH__JWT_SECRET": airflow.env["AIRFLOW__API_AUTH__JWT_SECRET"],
    }
    _, out = mlflow_server.api("GET", f"registered-models/alias?name={MODEL}&alias=champion")
    texts = _run_texts(mlflow_server, out["model_version"]["run_id"])
    texts += [f"{t['key']}={t['value']}" for t in out["model_version"].get("tags", [])]
    logs = airflow.task_logs()
    assert "train_model" in logs or logs, "no task logs found"
    for name, value in secrets.items():
        assert not any(value in t for t in texts), f"{name} found in MLflow params/tags/artifacts"
        assert value not in logs, f"{name} appears unmasked in the Airflow task logs"
