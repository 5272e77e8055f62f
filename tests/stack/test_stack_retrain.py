"""retrain_card_fraud end to end on real servers: triggered through Airflow's REST API (JWT), data
in S3 (moto), MLflow with basic-auth on PostgreSQL; the result read back through MLflow's REST
API with credentials. Then: the scoring service, with ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``, loads that champion
(signed safetensors checkpoint from S3, version from MLflow with credentials) and scores over
HTTP. And: no secret of an Airflow Connection or of the environment reached
MLflow params/tags/artifacts or the task logs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.stack.conftest import DAG_ID, HOST, MODEL, free_port, http, spawn, stop, wait_for


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


def test_scoring_service_serves_the_champion_with_pickle_disabled(
    first_run, airflow, mlflow_server, workdir
):
    from pipeline.contract import default_contract
    from pipeline.data.generate import WorldSpec, generate

    port = free_port()
    env = {k: v for k, v in airflow.env.items() if not k.startswith("AIRFLOW")}
    env.update(
        {"MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false", "PIPELINE_SERVING_POLL_SECONDS": "1"}
    )
    log = workdir / "scoring.log"
    proc = spawn(
        [sys.executable, "-m", "pipeline", "serve", "--host", HOST, "--port", str(port)], env, log
    )
    url = f"http://{HOST}:{port}"
    try:
        wait_for(
            lambda: http("GET", f"{url}/readyz", timeout=3)[0] == 200,
            "scoring service",
            180,
            proc,
            log,
        )
        _, out = mlflow_server.api("GET", f"registered-models/alias?name={MODEL}&alias=champion")
        champion = out["model_version"]["version"]
        features = [c.name for c in default_contract().features]
        rows = json.loads(generate(WorldSpec(rows=5, seed=77))[features].to_json(orient="records"))
        status, body = http("POST", f"{url}/predict", {"rows": rows})
        assert status == 200, body
        assert (body["alias"], body["version"]) == ("champion", champion)
        assert len(body["scores"]) == 5 and all(0.0 <= x <= 1.0 for x in body["scores"])
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
        assert b"MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false" in environ
    finally:
        stop(proc)
