"""The loop from a decaying champion back to retraining, on the embedded default.

A real scoring service (``python -m pipeline serve``, a subprocess over HTTP) serves a
champion with a signed checkpoint and the gate's tags (``eval.roc_auc``); requests are
scored through ``/predict`` and their delayed labels posted to ``/feedback`` — labels that
contradict the model's ranking, so its live ROC AUC falls far below the gated value. Then:

1. ``airflow dags test monitor_card_fraud`` (a real DAG run, tasks in-process) judges
   ``decaying``, raises one ``champion_decaying`` alert (the JSON-lines file), and emits the
   model's batch asset with ``extra.batch_uri`` = the most recent validated batch;
2. a second monitor run raises no second alert (the same open alert);
3. the scheduler (``airflow scheduler --num-runs``, with ``retrain_card_fraud`` unpaused and
   serialised by ``airflow dags reserialize``) creates an ``asset_triggered``
   ``retrain_card_fraud`` run that consumed that event, naming that batch.

The retrain run is not run to completion here (tests/integration/test_retrain_dag.py runs
whole retrains): what this test protects is that production decay starts one.
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import torch

from pipeline import registry, storage
from pipeline.data.generate import WorldSpec, generate, to_parquet_bytes
from tests.integration.conftest import AIRFLOW, ROOT
from tests.unit._serving import gated_tags, publish_checkpoint, records

pytestmark = [pytest.mark.integration, pytest.mark.slow]
FEEDBACK_TOKEN = secrets.token_hex(32)

RUNS = """
import json, sys
from airflow.models import DagRun
from airflow.utils.session import create_session
with create_session() as s:
    out = []
    for r in s.query(DagRun).filter(DagRun.dag_id == sys.argv[1]):
        out.append({"run_id": r.run_id, "run_type": str(r.run_type),
                    "extras": [e.extra for e in r.consumed_asset_events]})
print(json.dumps(out))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _airflow(env, *args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [AIRFLOW, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_a_decaying_champion_alerts_once_and_starts_a_retrain(airflow_home, monkeypatch, contract):
    from pipeline.train.features import fit_features
    from pipeline.train.model import MLP, ModelConfig

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = airflow_home.env
    env.update(
        {
            "PIPELINE_SERVING_URL": url,
            "PIPELINE_SERVING_FEEDBACK_TOKEN": FEEDBACK_TOKEN,
            "PIPELINE_SERVING_POLL_SECONDS": "0.2",
        }
    )
    airflow_home.use(monkeypatch)
    home = airflow_home.home
    # the champion: a signed checkpoint, registered with what an accepting gate records
    df = generate(WorldSpec(rows=3000, seed=21))
    features = fit_features(df, contract)
    torch.manual_seed(3)
    model = MLP(ModelConfig(features.width, len(features.classes))).eval()
    uri = publish_checkpoint(home, "champ", model, features, df.head(64))
    run_id = registry.get_or_create_run("test-monitor-loop")
    version = registry.register_version(
        run_id, "k1", uri, gated_tags(uri, **{"eval.roc_auc": "0.910000"}), "champion"
    )
    registry.set_alias(registry.CHAMPION, version)
    # the most recent validated batch (what ingest_batch + validate_batch tag on their run)
    root = (home / "storage").as_uri()
    batch = storage.write_bytes(
        f"{root}/landing/card_fraud/date=2026-01-02/recent.parquet",
        to_parquet_bytes(generate(WorldSpec(rows=500, seed=22))),
    ).uri
    validated = registry.get_or_create_run("retrain_card_fraud__earlier")
    registry.set_tags(
        validated,
        {
            "pipeline.model": "card_fraud",
            "data.batch_uri": batch,
            "stage.validate_batch.verdict": "pass",
        },
    )

    log = (home / "serve.log").open("w")
    serve = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    # meanwhile: the DAGs into the metadata DB (the scheduler reads them from there), and
    # the retrain DAG unpaused so the asset event queues a run of it
    ser = _airflow(env, "dags", "reserialize")
    assert ser.returncode == 0, ser.stderr[-3000:]
    up = _airflow(env, "dags", "unpause", "retrain_card_fraud")
    assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
    try:
        http = httpx.Client(base_url=url, timeout=10)
        deadline = time.monotonic() + 120
        while True:
            try:
                if http.get("/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert serve.poll() is None, (home / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (home / "serve.log").read_text()[-3000:]
            time.sleep(0.2)
        rows = records(generate(WorldSpec(rows=600, seed=23)), features.input_columns)
        scored = []
        for i in range(0, len(rows), 50):
            r = http.post("/predict", json=rows[i : i + 50])
            assert r.status_code == 200, r.text
            scored.append((r.json()["request_id"], r.json()["scores"]))
        cut = float(np.median([s for _, ss in scored for s in ss]))
        wrong = [{"request_id": rid, "labels": [int(s <= cut) for s in ss]} for rid, ss in scored]
        r = http.post(
            "/feedback",
            json={"feedback": wrong},
            headers={"Authorization": f"Bearer {FEEDBACK_TOKEN}"},
        )
        assert r.status_code == 200, r.text

        # 1. the monitor run: decaying, one alert, the asset event naming the batch
        m1 = airflow_home.dags_test("monitor_card_fraud", {})
        out = m1.stdout + m1.stderr
        assert m1.returncode == 0, out[-5000:]
        assert "decaying: performance_decay" in out, out[-5000:]
        assert f"retrain_card_fraud requested on {batch}" in out, out[-5000:]
        alerts_file = home / "alerts" / "alerts.jsonl"
        lines = [json.loads(x) for x in alerts_file.read_text().splitlines() if x.strip()]
        decay = [a for a in lines if a["kind"] == "champion_decaying"]
        assert len(decay) == 1, decay
        assert decay[0]["state"] == "open" and decay[0]["model"] == "card_fraud"
        assert decay[0]["dedup_key"] == f"card_fraud/champion_decaying/{version}"
        assert decay[0]["runbook"] == "docs/runbooks/champion_decaying.md"
        assert "0.9100" in decay[0]["summary"]

        # 2. the next check sees the same decay: no second alert
        m2 = airflow_home.dags_test("monitor_card_fraud", {})
        assert m2.returncode == 0, (m2.stdout + m2.stderr)[-5000:]
        lines = [json.loads(x) for x in alerts_file.read_text().splitlines() if x.strip()]
        sent = [
            a
            for a in lines
            if a["kind"] == "champion_decaying" and a["state"] == "open" and not a["suppressed"]
        ]
        assert len({a["first_seen"] for a in sent}) == 1, sent
        assert all(a["dedup_key"] == decay[0]["dedup_key"] for a in sent)
        assert "a retrain was already requested" in m2.stdout + m2.stderr
    finally:
        serve.terminate()
        try:
            serve.wait(15)
        except subprocess.TimeoutExpired:
            serve.kill()
        log.close()

    # 3. the scheduler turns the queued asset event into a retrain_card_fraud run
    sched_env = {**env, "AIRFLOW__CORE__PARALLELISM": "1"}
    found: list[dict] = []
    for _ in range(3):
        sch = _airflow(sched_env, "scheduler", "--num-runs", "2", timeout=180)
        runs = subprocess.run(
            [sys.executable, "-c", RUNS, "retrain_card_fraud"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert runs.returncode == 0, runs.stderr[-3000:]
        every = json.loads(runs.stdout.strip().splitlines()[-1])
        # (a cron run may appear too: card_fraud's retrain is on its asset or its cron)
        found = [r for r in every if "asset_triggered" in r["run_type"]]
        if found:
            break
    assert found, sch.stdout[-3000:] + sch.stderr[-3000:]
    assert len(found) == 1, found
    run = found[0]
    extras = run["extras"]
    assert len(extras) == 1 and extras[0]["batch_uri"] == batch, extras  # one per version
    assert extras[0]["trigger"] == "champion_decaying"
    assert extras[0]["champion_version"] == version
