"""Eight runs at once, and the faults that hit runs in flight, on the real Airflow (LocalExecutor
on PostgreSQL), MLflow (basic-auth, PostgreSQL) and S3 (moto).

Eight ``retrain_card_fraud`` runs are triggered at once (``max_active_runs=1``) and, while they run:

* the scheduler is killed mid-task (SIGKILL to its process group: scheduler, LocalExecutor
  workers and the running task, as when its container or node dies) and started again: the
  task is found without a heartbeat, retried once, and its run ends with one MLflow run, one
  model version and one published checkpoint; the stages before it are not run again;
* the MLflow server is killed (SIGKILL) while the next run's ``train_model`` trains and started
  again 20 s later: training goes on (tracking calls that fail are logged and their data kept
  on local disk), every call gives up within the client's budget
  (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``/``_TIMEOUT``, not the ~246 s default); a task that cannot
  finish without MLflow fails and Airflow retries it, finding the same MLflow run by its run
  key; the run ends with one FINISHED MLflow run and one version;
* and still: all eight succeed, one after another, and ``champion``/``challenger`` only ever
  move to newer versions (watched every 2 s throughout).

One burst carries all three (the runs are the slow part: about a minute and a half each on 2
cores). These tests run last, in file order (conftest orders them), after the first run made a
champion.
"""

from __future__ import annotations

import signal
import threading
import time
from datetime import datetime
from typing import Any

import pytest

from tests.stack.conftest import DAG_ID, EXPERIMENT, LANDING, MODEL, group_alive, land

DAG = DAG_ID
RUNS = 8
OUTAGE_S = 20


def _tis(airflow, run_id: str) -> dict[str, dict[str, Any]]:
    status, out = airflow.api("GET", f"dags/{DAG}/dagRuns/{run_id}/taskInstances")
    assert status == 200, out
    return {t["task_id"]: t for t in out["task_instances"]}


def _tries(airflow, run_id: str, task_id: str) -> list[dict[str, Any]]:
    status, out = airflow.api("GET", f"dags/{DAG}/dagRuns/{run_id}/taskInstances/{task_id}/tries")
    assert status == 200, out
    return out["task_instances"]


def _run_states(airflow, run_ids: list[str]) -> dict[str, str]:
    status, out = airflow.api("GET", f"dags/{DAG}/dagRuns?limit=100")
    assert status == 200, out
    return {r["dag_run_id"]: r["state"] for r in out["dag_runs"] if r["dag_run_id"] in run_ids}


def _versions(mlflow_server, airflow_run_id: str | None = None) -> list[dict[str, Any]]:
    status, out = mlflow_server.api(
        "GET", f"model-versions/search?filter=name%3D%27{MODEL}%27&max_results=200"
    )
    assert status == 200, out
    found = out.get("model_versions", [])
    tag = lambda v: {t["key"]: t["value"] for t in v.get("tags", [])}.get("airflow.run_id")  # noqa: E731
    return found if airflow_run_id is None else [v for v in found if tag(v) == airflow_run_id]


def _aliases(mlflow_server) -> dict[str, int]:
    status, out = mlflow_server.api("GET", f"registered-models/get?name={MODEL}")
    assert status == 200, out
    return {a["alias"]: int(a["version"]) for a in out["registered_model"].get("aliases", [])}


def _checkpoints(s3) -> set[str]:
    pages = (
        s3.client()
        .get_paginator("list_objects_v2")
        .paginate(Bucket="pipeline", Prefix="data/checkpoints/")
    )
    return {o["Key"].split("/")[2] for page in pages for o in page.get("Contents", [])}


def _one_finished_run_one_version(mlflow_server, run_id: str) -> dict[str, str]:
    """The DAG run made exactly one model version, from its one MLflow run, now FINISHED."""
    versions = _versions(mlflow_server, run_id)
    assert len(versions) == 1, versions
    _, got = mlflow_server.api("GET", f"runs/get?run_id={versions[0]['run_id']}")
    status, out = mlflow_server.api(
        "POST",
        "runs/search",
        {
            "experiment_ids": [got["run"]["info"]["experiment_id"]],
            "filter": f"tags.`airflow.run_id` = '{run_id}'",
        },
    )
    assert status == 200, out
    assert [r["info"]["status"] for r in out.get("runs", [])] == ["FINISHED"], out
    return {t["key"]: t["value"] for t in versions[0]["tags"]}


class Watch(threading.Thread):
    """Every 2 s: the aliases (when MLflow answers) and how many burst runs are running."""

    def __init__(self, airflow, mlflow_server, run_ids: list[str]) -> None:
        super().__init__(name="alias-watch", daemon=True)
        self.airflow, self.mlflow, self.run_ids = airflow, mlflow_server, run_ids
        self.aliases: list[dict[str, int]] = []
        self.overlaps: list[list[str]] = []
        self.errors = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(2.0):
            try:
                now = _aliases(self.mlflow)
                if not self.aliases or now != self.aliases[-1]:
                    self.aliases.append(now)
                states = _run_states(self.airflow, self.run_ids)
                running = sorted(r for r, s in states.items() if s == "running")
                if len(running) > 1:
                    self.overlaps.append(running)
            except (OSError, AssertionError, KeyError):
                self.errors += 1  # MLflow stopped on purpose, or the API between answers


@pytest.fixture(scope="module")
def burst(first_run, airflow, mlflow_server, s3):
    # run 0 meets the scheduler kill, run 1 the MLflow outage: their larger batches train for a
    # few seconds, so each fault lands while its run trains (tasks start warm, from preloaded
    # workers: a small batch's train_model is over within a second or two)
    faulted = (0, 1)
    batches = [
        land(
            s3,
            f"{LANDING}/stack/burst-{i}.parquet",
            rows=40_000 if i in faulted else 3000,
            seed=40 + i,
        )
        for i in range(RUNS)
    ]
    # the spec's floors, margin and budgets (a run may only tighten them); its
    # overrides.allow lets a run accept a non-inferior challenger, so every run can promote
    conf = {"force_retrain": True, "gate_non_inferiority_margin": 0.05}
    watch = Watch(airflow, mlflow_server, [])
    watch.aliases.append(_aliases(mlflow_server))
    t0 = time.monotonic()
    run_ids = [
        airflow.trigger(
            DAG, {**conf, "batch_uri": b, **({"max_epochs": 10} if i in faulted else {})}
        )
        for i, b in enumerate(batches)
    ]
    watch.run_ids.extend(run_ids)
    watch.start()
    yield {"run_ids": run_ids, "watch": watch, "t0": t0, "faulted": []}
    watch.stop.set()
    watch.join(10)


def _next_training(airflow, burst, cond=lambda tis: True, timeout: float = 600) -> str:
    """Wait for a burst run not yet faulted whose train_model is running (and ``cond``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = _run_states(airflow, burst["run_ids"])
        for rid in burst["run_ids"]:
            if rid in burst["faulted"] or states.get(rid) != "running":
                continue
            tis = _tis(airflow, rid)
            if tis.get("train_model", {}).get("state") == "running" and cond(tis):
                burst["faulted"].append(rid)
                return rid
        time.sleep(0.5)
    raise AssertionError(f"no burst run reached train_model within {timeout:.0f}s: {states}")


def _training_started(mlflow_server):
    """A ``_next_training`` condition: the run's training parameters reached its MLflow run
    (so train_model is past its imports and setup, and training)."""
    _, exp = mlflow_server.api("GET", f"experiments/get-by-name?experiment_name={EXPERIMENT}")
    exp_id = exp["experiment"]["experiment_id"]

    def started(tis) -> bool:
        rid = tis["train_model"]["dag_run_id"]
        _, out = mlflow_server.api(
            "POST",
            "runs/search",
            {"experiment_ids": [exp_id], "filter": f"tags.`airflow.run_id` = '{rid}'"},
        )
        return any(
            p["key"].startswith("train.")
            for r in out.get("runs", [])
            for p in r["data"].get("params", [])
        )

    return started


def _wait_done(airflow, run_id: str, timeout: float = 600) -> str:
    state = airflow.wait_run(DAG, run_id, timeout=timeout)
    tis = _tis(airflow, run_id)
    assert state == "success", (
        state,
        {k: v["state"] for k, v in tis.items()},
        airflow.tail("scheduler"),
    )
    return state


def test_scheduler_killed_mid_task_is_retried_once_with_the_same_outputs(
    burst, airflow, mlflow_server, s3
):
    run_id = burst["run_ids"][0]
    deadline = time.monotonic() + 600
    while _run_states(airflow, [run_id]).get(run_id) != "running":  # the previous run has ended
        assert time.monotonic() < deadline
        time.sleep(0.5)
    before = _checkpoints(s3)  # before this run's train_model publishes anything
    # runs start in the order triggered; killed as soon as it trains: mid-task
    assert _next_training(airflow, burst, _training_started(mlflow_server)) == run_id
    scheduler = airflow.procs["scheduler"]
    airflow.stop("scheduler", signal.SIGKILL)
    killed_at = time.monotonic()
    # its workers hold the preloaded pipeline: tearing them down can outlast stop()'s grace
    while group_alive(scheduler.pid) and time.monotonic() - killed_at < 20:
        time.sleep(0.2)
    gone = not group_alive(scheduler.pid)
    seen = _tis(airflow, run_id)["train_model"]["state"]
    airflow.start("scheduler")  # first: the tests after this one need a scheduler either way
    assert gone, "a process of the killed scheduler is still running 20 s after SIGKILL"
    assert seen == "running", seen  # as the database last saw it: killed mid-task
    _wait_done(airflow, run_id)
    print(
        f"\nscheduler killed mid-train_model: run succeeded {time.monotonic() - killed_at:.0f}s after the kill"
    )

    tis = _tis(airflow, run_id)
    assert tis["train_model"]["try_number"] == 2, tis["train_model"]  # retried exactly once
    for upstream in ("ingest_batch", "validate_batch", "detect_drift", "decide_retrain"):
        assert tis[upstream]["try_number"] == 1, tis[upstream]  # not run again
    tags = _one_finished_run_one_version(mlflow_server, run_id)
    new = _checkpoints(s3) - before  # the run's one checkpoint, the one its version points at
    assert len(new) == 1, new
    assert tags["checkpoint.uri"] == f"s3://pipeline/data/checkpoints/{new.pop()}"


def test_mlflow_stopped_mid_training_the_run_recovers(burst, airflow, mlflow_server):
    started = _training_started(mlflow_server)
    assert _next_training(airflow, burst, started) == (run_id := burst["run_ids"][1])
    mlflow_server.stop(signal.SIGKILL)  # gone at once, mid-training
    stopped = datetime.now().astimezone()
    time.sleep(OUTAGE_S)
    mlflow_server.start()
    _wait_done(airflow, run_id)

    tries = [t for task in _tis(airflow, run_id) for t in _tries(airflow, run_id, task)]
    failed = [t for t in tries if t["state"] == "failed"]
    for t in failed:  # a try that could not go on without MLflow gave up within the budget
        waited = datetime.fromisoformat(t["end_date"]) - max(
            stopped, datetime.fromisoformat(t["start_date"])
        )
        assert waited.total_seconds() < 60, (t["task_id"], t["try_number"], waited)
    train = [t for t in tries if t["task_id"] == "train_model"]
    assert datetime.fromisoformat(train[0]["start_date"]) < stopped  # it was training already
    assert train[-1]["state"] == "success" and len(train) <= 2, train
    # the first try met the outage (its tracking calls were refused) and trained on regardless
    log = (
        airflow.home
        / "logs"
        / f"dag_id={DAG}"
        / f"run_id={run_id}"
        / "task_id=train_model"
        / "attempt=1.log"
    )
    text = log.read_text(errors="replace")
    assert "Failed to establish a new connection" in text and "epoch 1/" in text
    refused = text.count("Failed to establish a new connection")
    print(
        f"\nMLflow killed for {OUTAGE_S}s mid-training: train_model try 1 met {refused} refused "
        f"connections and {'failed, retried' if len(train) == 2 else 'trained on'}; failed tries "
        f"{[(t['task_id'], t['try_number'], round(t['duration'] or 0)) for t in failed]}; run succeeded"
    )
    _one_finished_run_one_version(mlflow_server, run_id)


def test_eight_runs_at_once_run_in_turn_and_aliases_only_move_forward(
    burst, airflow, mlflow_server
):
    run_ids, watch = burst["run_ids"], burst["watch"]
    for rid in run_ids:
        _wait_done(airflow, rid, timeout=900)
    time.sleep(2)  # one more look by the watcher
    seconds = time.monotonic() - burst["t0"]
    print(
        f"\n{RUNS} runs at once: all succeeded in {seconds:.0f}s (two of them under faults); "
        f"aliases seen: {watch.aliases}"
    )
    assert not watch.overlaps, f"max_active_runs=1, yet running at once: {watch.overlaps[:3]}"

    # in turn: each run started after the previous one ended (the database's clock)
    status, out = airflow.api("GET", f"dags/{DAG}/dagRuns?limit=100&order_by=start_date")
    spans = [
        (r["start_date"], r["end_date"]) for r in out["dag_runs"] if r["dag_run_id"] in run_ids
    ]
    assert len(spans) == RUNS and all(
        a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)
    ), spans
    for rid in run_ids:
        _one_finished_run_one_version(mlflow_server, rid)
    for alias in ("champion", "challenger"):
        trail = [s[alias] for s in watch.aliases if alias in s]
        assert trail == sorted(trail), f"{alias} moved backwards: {trail}"
    final = _aliases(mlflow_server)
    assert final["champion"] > watch.aliases[0]["champion"], (watch.aliases[0], final)
    assert final["champion"] <= max(int(v["version"]) for v in _versions(mlflow_server))
