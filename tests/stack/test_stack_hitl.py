"""The human paths on the real stack: an approval answered through Airflow's REST API by a
second user, a rejection, an approval nobody answers, and a rollback triggered over REST.

The model is ``card_fraud_reviewed`` (``tests/stack/specs/``: the reference contract and data,
a small MLP, ``gate.approval_timeout_hours: 0.01``), so its champion can move forward, back
and be held without touching card-fraud's registry, which the other stack tests assert on.
Its ``retrain_card_fraud_reviewed`` (``max_active_runs=1``) runs, in turn:

* ``hitl-baseline`` (no approval asked) makes champion v1; ``hitl-approve``
  (``require_approval``, queued behind it) waits in ``approve_promotion`` until the user
  ``reviewer`` (simple auth manager role ``user``; the runs are triggered by ``admin``) answers
  *Approve* with ``PATCH /api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/approve_promotion/-1/hitlDetails``:
  champion -> v2, the version tagged ``approval.*`` with who answered, the human decision's
  record on the MLflow run replays;
* ``rollback_card_fraud_reviewed``, triggered by ``admin`` with a reason: champion back to v1,
  v2 tagged ``rolled_back`` with the reason and who, v1 ``restored.*``, the rollback record;
* ``hitl-reject``: the reviewer answers *Reject*: champion stays, the version is tagged
  ``rejected`` with who rejected it;
* ``hitl-timeout`` (triggered with the reject run, queued behind it): nobody answers; the
  scheduler's ``awaiting_input`` sweep picks the default, Reject, after 36 s: champion stays,
  the version is recorded as rejected by the timeout, not by a person.

The reviewer answers once the scheduler has processed the executor's event for the process
that parked the task (``_parked``): an answer inside that window is lost on Airflow 3.3.2.

Four training runs in all (1,500 rows, six epochs each): the human paths share them.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from datetime import datetime
from typing import Any

import pytest

from pipeline.spec import load_spec
from tests.stack.conftest import AIRFLOW_USER, REVIEWER, STACK_SPECS, http, land

SPEC = "card_fraud_reviewed"
REVIEWED = load_spec(STACK_SPECS / SPEC / "model.yaml")
DAG = REVIEWED.retrain_dag_id
ROLLBACK_DAG = REVIEWED.rollback_dag_id
MODEL = REVIEWED.model_name  # its registered model
LANDING = f"data/landing/{SPEC}/stack"  # bucket keys under the spec's landing prefix
TRUSTED_EVAL = f"data/trusted/{SPEC}/eval.parquet"
HITL_TASK = "approve_promotion"
TIMEOUT_S = REVIEWED.gate.approval_timeout_hours * 3600  # the HITL task's response_timeout
RUN_TIMEOUT_S = 420  # one run (bounded wait); the stack's first card_fraud run shares the CPUs


# --- reading the stack back ------------------------------------------------------------------


def _q(run_id: str) -> str:
    return urllib.parse.quote(run_id, safe="")


def _wait(what: str, timeout: float, fn, airflow, every: float = 1.0) -> Any:
    """fn() until truthy (bounded); fail naming what was awaited, with the scheduler's tail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = fn()
        if got:
            return got
        for name, proc in airflow.procs.items():
            assert proc.poll() is None, f"airflow {name} exited: {airflow.tail(name)}"
        time.sleep(every)
    raise AssertionError(f"{what} not seen within {timeout:.0f}s\n{airflow.tail('scheduler')}")


def _run_done(airflow, dag_id: str, run_id: str, timeout: float = RUN_TIMEOUT_S) -> dict:
    """Wait for a run to end; it must have succeeded. Returns its task states."""
    state = airflow.wait_run(dag_id, run_id, timeout=timeout)
    states = airflow.task_states(dag_id, run_id)
    assert state == "success", (dag_id, run_id, state, states, airflow.task_logs()[-6000:])
    return states


def _hitl_path(run_id: str) -> str:
    return f"dags/{DAG}/dagRuns/{_q(run_id)}/taskInstances/{HITL_TASK}/-1/hitlDetails"


def _awaiting_answer(airflow, run_id: str, timeout: float = RUN_TIMEOUT_S) -> dict[str, Any]:
    """Wait until the run's approve_promotion task waits for a human; its HITL detail."""

    def waiting() -> dict[str, Any] | None:
        states = airflow.task_states(DAG, run_id)
        state = states.get(HITL_TASK)
        if state in ("success", "failed", "skipped", "upstream_failed"):
            raise AssertionError(f"{HITL_TASK} ended ({state}) without waiting: {states}")
        if state != "awaiting_input":
            return None
        status, detail = airflow.api("GET", _hitl_path(run_id))
        return detail if status == 200 else None

    return _wait(f"{DAG} {run_id}: {HITL_TASK} awaiting input", timeout, waiting, airflow, 0.5)


def _log_size(airflow) -> int:
    """Where the scheduler's log ends now: ``_parked`` reads what it writes from here on."""
    log = airflow.home / "scheduler.log"
    return log.stat().st_size if log.exists() else 0


def _parked(airflow, run_id: str, since: int, timeout: float = 60) -> None:
    """Wait until the scheduler has processed its executor's event for the process that
    parked approve_promotion (it exits with "success" once the task waits for input).

    An answer before that is lost (Airflow 3.3.2, seen here): the answer re-queues the task;
    the stale "success" event then meets a *queued* task (the scheduler's resume-after-park
    guard covers only *scheduled*), is taken for a task changed externally, and the try is
    failed; its retry asks again, and the answer is gone (here: it then timed out). A person
    answers seconds later; the test answers when that window has closed. Only the
    scheduler's log says so (the event changes nothing in the database): read from
    ``since``, a size taken before the run was triggered."""
    states = airflow.task_states(DAG, run_id)
    assert states.get(HITL_TASK) == "awaiting_input", states
    key = f"task_id='{HITL_TASK}', run_id='{run_id}', try_number={_hitl_try(airflow, run_id)},"
    event = "Received executor event with state success for task instance"

    def seen() -> bool:
        with (airflow.home / "scheduler.log").open("rb") as fh:
            fh.seek(since)
            text = fh.read().decode(errors="replace")
        return any(event in line and key in line for line in text.splitlines())

    _wait(
        f"the scheduler's executor event for {run_id} {HITL_TASK} (its park)",
        timeout,
        seen,
        airflow,
        0.5,
    )


def _answer(airflow, run_id: str, option: str) -> dict[str, Any]:
    """The reviewer answers the approval through the REST API (their own token)."""
    status, out = airflow.api_as(
        REVIEWER, "PATCH", _hitl_path(run_id), {"chosen_options": [option], "params_input": {}}
    )
    assert status == 200, (status, out)
    return out


def _hitl_output(airflow, run_id: str) -> dict[str, Any]:
    """What approve_promotion handed to promote_champion (its XCom): the answer as recorded."""
    path = f"dags/{DAG}/dagRuns/{_q(run_id)}/taskInstances/{HITL_TASK}/xcomEntries/return_value"
    status, out = airflow.api("GET", path)
    assert status == 200, (status, out)
    value = out["value"]
    return json.loads(value) if isinstance(value, str) else value


def _hitl_try(airflow, run_id: str) -> int:
    status, ti = airflow.api("GET", f"dags/{DAG}/dagRuns/{_q(run_id)}/taskInstances/{HITL_TASK}")
    assert status == 200, ti
    return int(ti["try_number"])


def _aliases(mlflow_server) -> dict[str, str]:
    status, out = mlflow_server.api("GET", f"registered-models/get?name={MODEL}")
    assert status == 200, out
    return {a["alias"]: str(a["version"]) for a in out["registered_model"].get("aliases", [])}


def _version_of(mlflow_server, airflow_run_id: str) -> dict[str, Any]:
    """The one model version a DAG run registered: number, MLflow run id, tags."""
    status, out = mlflow_server.api(
        "GET", f"model-versions/search?filter=name%3D%27{MODEL}%27&max_results=200"
    )
    assert status == 200, out
    found = []
    for v in out.get("model_versions", []):
        tags = {t["key"]: t["value"] for t in v.get("tags", [])}
        if tags.get("airflow.run_id") == airflow_run_id:
            found.append({"version": str(v["version"]), "run_id": v["run_id"], "tags": tags})
    assert len(found) == 1, (airflow_run_id, found)
    return found[0]


def _tags(mlflow_server, version: str) -> dict[str, str]:
    status, out = mlflow_server.api("GET", f"model-versions/get?name={MODEL}&version={version}")
    assert status == 200, out
    return {t["key"]: t["value"] for t in out["model_version"].get("tags", [])}


def _artifact_json(mlflow_server, run_id: str, path: str) -> dict[str, Any]:
    status, body = http(
        "GET",
        f"{mlflow_server.url}/get-artifact?run_id={run_id}&path={path}",
        auth=mlflow_server.admin,
        timeout=30,
    )
    assert status == 200, (run_id, path, status, body)
    return body if isinstance(body, dict) else json.loads(body)


def _when(iso: str) -> datetime:
    return datetime.fromisoformat(iso.replace("Z", "+00:00"))


def _dag_run(airflow, dag_id: str, run_id: str) -> dict[str, Any]:
    status, out = airflow.api("GET", f"dags/{dag_id}/dagRuns/{_q(run_id)}")
    assert status == 200, out
    return out


def _replayed(record: dict[str, Any]) -> str:
    """The human decision replayed from its record (pipeline.approval): its verdict."""
    from pipeline import approval

    return approval.replay(record).verdict.value


def _batch(s3, name: str, seed: int) -> str:
    return land(s3, f"{LANDING}/{name}.parquet", rows=1500, seed=seed)


def _conf(batch: str, approval: bool) -> dict[str, Any]:
    return {"batch_uri": batch, "force_retrain": True, "require_approval": approval}


# --- the shared runs -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reviewed(airflow, s3):
    """The reviewed model's two DAGs, parsed and unpaused; its trusted evaluation set."""
    for dag_id in (DAG, ROLLBACK_DAG):
        _wait(
            f"{dag_id} parsed",
            180,
            lambda d=dag_id: airflow.api("GET", f"dags/{d}")[0] == 200,
            airflow,
        )
        status, out = airflow.api("PATCH", f"dags/{dag_id}", {"is_paused": False})
        assert status == 200, (status, out)
    land(s3, TRUSTED_EVAL, rows=2000, seed=131)
    yield
    for dag_id in (DAG, ROLLBACK_DAG):
        airflow.api("PATCH", f"dags/{dag_id}", {"is_paused": True})


@pytest.fixture(scope="module")
def approved(reviewed, airflow, mlflow_server, s3) -> dict[str, Any]:
    """A baseline champion, then a challenger that the reviewer approves."""
    t0, since = time.monotonic(), _log_size(airflow)
    base = airflow.trigger(DAG, _conf(_batch(s3, "baseline", 21), False), run_id="hitl-baseline")
    # queued behind the baseline (max_active_runs=1): its gate compares against that champion
    run = airflow.trigger(DAG, _conf(_batch(s3, "approve", 22), True), run_id="hitl-approve")
    base_states = _run_done(airflow, DAG, base)
    assert base_states[HITL_TASK] == "skipped", base_states  # no approval asked: none waited
    baseline = _version_of(mlflow_server, base)["version"]
    assert _aliases(mlflow_server).get("champion") == baseline
    waiting = _awaiting_answer(airflow, run)
    before = _aliases(mlflow_server)
    _parked(airflow, run, since)
    answer = _answer(airflow, run, "Approve")
    states = _run_done(airflow, DAG, run)
    return {
        "output": _hitl_output(airflow, run),
        "tries": _hitl_try(airflow, run),
        "run_id": run,
        "baseline": baseline,
        "waiting": waiting,
        "before": before,
        "answer": answer,
        "states": states,
        "seconds": time.monotonic() - t0,
    }


@pytest.fixture(scope="module")
def rolled_back(approved, airflow, mlflow_server) -> dict[str, Any]:
    version = _version_of(mlflow_server, approved["run_id"])["version"]
    assert _aliases(mlflow_server)["champion"] == version  # the approved version serves
    reason = f"v{version} scores drifted in production (stack test)"
    t0 = time.monotonic()
    run = airflow.trigger(ROLLBACK_DAG, {"reason": reason}, run_id="hitl-rollback")
    states = _run_done(airflow, ROLLBACK_DAG, run, timeout=180)
    return {
        "run_id": run,
        "reason": reason,
        "from": version,
        "states": states,
        "seconds": time.monotonic() - t0,
    }


@pytest.fixture(scope="module")
def rejected(approved, airflow, mlflow_server, s3) -> dict[str, Any]:
    """A challenger the reviewer rejects; the timeout's run is queued behind it meanwhile
    (nobody answers that one, so it may wait while this one is checked)."""
    t0, since = time.monotonic(), _log_size(airflow)
    run = airflow.trigger(DAG, _conf(_batch(s3, "reject", 23), True), run_id="hitl-reject")
    timeout_run = airflow.trigger(
        DAG, _conf(_batch(s3, "timeout", 24), True), run_id="hitl-timeout"
    )
    waiting = _awaiting_answer(airflow, run)
    before = _aliases(mlflow_server)
    _parked(airflow, run, since)
    answer = _answer(airflow, run, "Reject")
    states = _run_done(airflow, DAG, run)
    return {
        "output": _hitl_output(airflow, run),
        "tries": _hitl_try(airflow, run),
        "run_id": run,
        "timeout_run": timeout_run,
        "waiting": waiting,
        "before": before,
        "answer": answer,
        "states": states,
        "seconds": time.monotonic() - t0,
    }


# --- the tests -------------------------------------------------------------------------------


def test_approval_answered_by_a_second_user_promotes_and_is_recorded(
    approved, airflow, mlflow_server
):
    run_id, waiting, answer = approved["run_id"], approved["waiting"], approved["answer"]
    print(f"\nbaseline + approved run: {approved['seconds']:.0f}s")
    # the run was triggered by one user and answered by another
    assert _dag_run(airflow, DAG, run_id)["triggering_user_name"] == AIRFLOW_USER
    assert AIRFLOW_USER != REVIEWER
    assert answer["responded_by"]["name"] == REVIEWER and answer["chosen_options"] == ["Approve"]
    output = approved["output"]  # the answer as the HITL task handed it on
    assert output["chosen_options"] == ["Approve"], output
    assert output["responded_by_user"]["name"] == REVIEWER, output
    # what the reviewer was asked: the gated version, Approve or Reject, Reject by default
    new = _version_of(mlflow_server, run_id)
    version = new["version"]
    assert waiting["response_received"] is False, waiting
    assert waiting["options"] == ["Approve", "Reject"] and waiting["defaults"] == ["Reject"]
    assert f"v{version}" in waiting["subject"], waiting["subject"]
    assert approved["before"]["champion"] == approved["baseline"] != version  # still waiting

    # champion moved to the approved version; the baseline is its previous champion
    assert approved["states"][HITL_TASK] == "success"
    assert approved["states"]["promote_champion"] == "success"
    assert approved["tries"] == 1  # the try that asked took the answer
    aliases = _aliases(mlflow_server)
    assert aliases["champion"] == version, aliases
    assert aliases.get("previous_champion") == approved["baseline"], aliases
    assert aliases.get("challenger") != version, aliases  # it serves: no longer a candidate

    # the version says who approved it, and when (the moment the answer was written)
    tags = _tags(mlflow_server, version)
    assert tags["approval.required"] == "true"
    assert tags["approval.verdict"] == "approved"
    assert tags["approval.by"] == REVIEWER
    assert _when(tags["approval.at"]) == _when(answer["responded_at"])
    assert tags.get("rejected") != "true"
    assert tags["promoted_by"].endswith("hitl-approve") and tags["promoted_at"]

    # the human decision's record on the run: the reviewer's answer, and it replays
    record = _artifact_json(mlflow_server, new["run_id"], "records/decisions/human_approval.json")
    assert record["inputs"]["evidence"]["responded_by"] == REVIEWER, record
    assert record["inputs"]["evidence"]["chosen_options"] == ["Approve"], record
    assert record["decision"]["verdict"] == "approve" and _replayed(record) == "approve"


def test_rollback_triggered_over_rest_moves_champion_back_with_its_reason(
    rolled_back, approved, airflow, mlflow_server
):
    print(f"\nrollback run: {rolled_back['seconds']:.0f}s")
    back_from, reason = rolled_back["from"], rolled_back["reason"]
    restored = approved["baseline"]
    assert rolled_back["states"]["rollback_champion"] == "success"
    assert _dag_run(airflow, ROLLBACK_DAG, rolled_back["run_id"])["triggering_user_name"] == (
        AIRFLOW_USER
    )
    aliases = _aliases(mlflow_server)
    assert aliases["champion"] == restored, aliases
    assert aliases.get("previous_champion") != back_from, aliases  # never back onto it

    gone = _tags(mlflow_server, back_from)
    assert gone["rolled_back"] == "true"
    assert gone["rollback.reason"] == reason and gone["rollback_reason"] == reason
    assert gone["rollback.by"] == AIRFLOW_USER  # the user who triggered the rollback
    assert gone["rollback.to"] == restored
    back = _tags(mlflow_server, restored)
    assert back["restored.from"] == back_from and back["restored.reason"] == reason
    assert back["restored.by"] == AIRFLOW_USER

    # the rollback's own MLflow run (keyed on the DAG run) holds its record
    status, exp = mlflow_server.api("GET", f"experiments/get-by-name?experiment_name={DAG}")
    assert status == 200, exp
    key = f"{ROLLBACK_DAG}__{rolled_back['run_id']}"
    status, out = mlflow_server.api(
        "POST",
        "runs/search",
        {
            "experiment_ids": [exp["experiment"]["experiment_id"]],
            "filter": f"tags.`pipeline.run_key` = '{key}'",
        },
    )
    assert status == 200 and len(out.get("runs", [])) == 1, out
    record = _artifact_json(
        mlflow_server, out["runs"][0]["info"]["run_id"], "records/rollback.json"
    )
    assert (record["from_version"], record["to_version"]) == (back_from, restored), record
    assert record["reason"] == reason and record["who"] == AIRFLOW_USER, record
    assert record["verdict"] == "rolled_back", record


def test_reject_answered_by_the_reviewer_keeps_the_champion(rejected, mlflow_server):
    print(f"\nrejected run: {rejected['seconds']:.0f}s")
    answer = rejected["answer"]
    assert answer["responded_by"]["name"] == REVIEWER and answer["chosen_options"] == ["Reject"]
    output = rejected["output"]  # the answer as the HITL task handed it on
    assert output["chosen_options"] == ["Reject"], output
    assert output["responded_by_user"]["name"] == REVIEWER, output
    new = _version_of(mlflow_server, rejected["run_id"])
    version = new["version"]
    champion = rejected["before"]["champion"]
    assert champion != version
    # the run ends well (a human rejection is a verdict, not a failure); nothing was promoted
    assert rejected["states"][HITL_TASK] == "success"
    assert rejected["states"]["promote_champion"] == "success"
    assert rejected["tries"] == 1  # the try that asked took the answer
    aliases = _aliases(mlflow_server)
    assert aliases["champion"] == champion, aliases
    assert aliases.get("challenger") != version, aliases  # a rejected version waits for nobody

    tags = _tags(mlflow_server, version)
    assert tags["gate.verdict"] == "promote"  # the gate passed it: the human said no
    assert tags["rejected"] == "true"
    assert tags["approval.verdict"] == "rejected"
    assert tags["approval.by"] == REVIEWER, tags
    assert tags["promotion.reason"] == "human_rejected"
    assert f"rejected by {REVIEWER} in human review" in tags["rejection_reason"], tags
    assert "promoted_at" not in tags
    record = _artifact_json(mlflow_server, new["run_id"], "records/decisions/human_approval.json")
    assert record["inputs"]["evidence"]["responded_by"] == REVIEWER, record
    assert record["decision"]["verdict"] == "reject" and _replayed(record) == "reject"


def test_approval_nobody_answers_times_out_as_a_rejection(rejected, airflow, mlflow_server):
    run_id = rejected["timeout_run"]
    t0 = time.monotonic()
    waiting = _awaiting_answer(airflow, run_id)
    champion = _aliases(mlflow_server)["champion"]
    states = _run_done(airflow, DAG, run_id)  # nobody answers: the scheduler's sweep does
    print(f"\ntimeout run: waited and ended {time.monotonic() - t0:.0f}s after the reject run")
    assert waiting["response_received"] is False
    status, detail = airflow.api("GET", _hitl_path(run_id))
    assert status == 200, detail
    # the default answer, given by nobody, no sooner than the response timeout
    assert detail["response_received"] is True and detail["chosen_options"] == ["Reject"]
    assert not detail.get("responded_by_user"), detail
    waited = _when(detail["responded_at"]) - _when(detail["created_at"])  # asked -> answered
    assert waited.total_seconds() >= TIMEOUT_S, (waited, detail)
    assert states[HITL_TASK] == "success" and states["promote_champion"] == "success"
    assert _hitl_try(airflow, run_id) == 1  # resolved by the sweep, not by a retry

    new = _version_of(mlflow_server, run_id)
    version = new["version"]
    aliases = _aliases(mlflow_server)
    assert aliases["champion"] == champion != version, aliases
    assert aliases.get("challenger") != version, aliases
    tags = _tags(mlflow_server, version)
    assert tags["rejected"] == "true" and tags["approval.verdict"] == "rejected"
    assert tags["promotion.reason"] == "human_rejected"
    assert tags["approval.by"] == "nobody (timeout)"
    # recorded as the timeout's default, not as a person's rejection
    assert "before the timeout" in tags["rejection_reason"], tags["rejection_reason"]
    record = _artifact_json(mlflow_server, new["run_id"], "records/decisions/human_approval.json")
    assert record["inputs"]["evidence"]["responded_by"] == "", record
    assert record["decision"]["verdict"] == "reject" and _replayed(record) == "reject"
