"""retrain_card_fraud end to end on real servers: triggered through Airflow's REST API (JWT), data
in S3 (moto), MLflow with basic-auth on PostgreSQL; the result read back through MLflow's REST
API with credentials. And: no secret of an Airflow Connection or of the environment reached
MLflow params/tags/artifacts or the task logs. The scoring service serving that champion (with
``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``) is started from the shipped configs'
environment, not this one: ``test_stack_shipped_config.py``.
"""

from __future__ import annotations

from tests.stack.conftest import DAG_ID, MODEL, http


def test_trigger_retrain_run(retrain_triggered):
    """Runs first (conftest orders it): the DAG run proceeds while the other stack tests run."""
    assert retrain_triggered["run_id"].startswith("manual__")


def test_triggered_run_registers_a_champion_with_lineage(first_run, mlflow_server, s3):
    print(f"\n{DAG_ID} run {first_run['run_id']}: {first_run['seconds']:.0f}s")
    assert first_run["states"]["train_model"] == "success"
    assert first_run["states"]["promote_champion"] == "success"
    status, out = mlflow_server.api("GET", f"registered-models/alias?name={MODEL}&alias=champion")
    assert status == 200, out
    mv = out["model_version"]
    tags = {t["key"]: t["value"] for t in mv.get("tags", [])}
    assert tags["data.batch_uri"] == first_run["batch"]
    assert tags["data.snapshot_uri"].startswith("s3://pipeline/data/snapshots/")
    assert len(tags["data.snapshot_sha256"]) == 64
    assert tags["airflow.dag_id"] == DAG_ID
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
        status, body = http(
            "GET",
            f"{mlflow_server.url}/get-artifact?run_id={run_id}&path={path}",
            auth=mlflow_server.admin,
            timeout=30,
        )
        assert status == 200, (path, status)
        texts.append(body if isinstance(body, str) else str(body))
    return texts


def test_no_secret_reaches_mlflow_or_task_logs(first_run, airflow, mlflow_server):
    secrets = {  # (conftest's values are per-process random: read them from the fixtures)
        "aws_default connection password / AWS_SECRET_ACCESS_KEY": airflow.env[
            "AWS_SECRET_ACCESS_KEY"
        ],
        "MLFLOW_TRACKING_PASSWORD": mlflow_server.admin[1],
        # the private key's base64 body (the PEM's middle line)
        "PIPELINE_SIGNING_KEY": airflow.env["PIPELINE_SIGNING_KEY"].splitlines()[1],
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


def test_tasks_are_forked_from_workers_that_preloaded_the_pipeline(first_run, airflow):
    """The scheduler runs plugins/pipeline_executor.PreloadingLocalExecutor: each worker
    imported the pipeline once (its log line), nothing failed to preload, and the run's tasks
    succeeded on those workers."""
    log = airflow.tail("scheduler", n=2_000_000)
    assert "preloaded the pipeline in" in log, log[-3000:]
    assert "could not preload" not in log, log[-3000:]
    assert first_run["states"]["validate_batch"] == "success"
