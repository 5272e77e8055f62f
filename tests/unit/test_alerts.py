"""pipeline.alerts: one alert per (model, kind, subject) across retries and re-runs, a
suppression window for flapping conditions, resolve, a file that survives bad lines, and
writers in two processes that never raise the same alert twice."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
from datetime import UTC, datetime, timedelta

import pytest

from pipeline import alerts
from pipeline.alerts import AlertKind, Severity

T0 = datetime(2026, 3, 8, 12, 0, tzinfo=UTC)


def _raise(subject="abc123", kind=AlertKind.BATCH_QUARANTINED, at=T0, **kw):
    return alerts.raise_alert(
        kind=kind,
        model="card_fraud",
        subject=subject,
        summary=kw.pop("summary", "3 rows broke the contract (threshold 0)"),
        value=3,
        threshold=0,
        links={"airflow_task": "http://af/dags/x/runs/r/tasks/validate_batch"},
        suppress_minutes=kw.pop("suppress_minutes", 60),
        now=at,
        **kw,
    )


def _lines(home):
    return [json.loads(x) for x in (home / "alerts" / "alerts.jsonl").read_text().splitlines()]


def test_first_alert_is_sent_and_written_with_the_contract_fields(pipeline_home):
    a = _raise()
    assert a is not None
    assert a.dedup_key == "card_fraud/batch_quarantined/abc123"
    assert a.severity is Severity.WARNING and a.runbook == "docs/runbooks/batch_quarantined.md"
    (line,) = _lines(pipeline_home)
    for f in ("kind", "severity", "model", "dedup_key", "summary", "runbook", "links", "state"):
        assert f in line
    assert line["state"] == "open" and line["kind"] == "batch_quarantined"
    assert alerts.open_alerts("card_fraud") == [a]


def test_retries_and_reruns_of_the_same_failure_raise_nothing_more(pipeline_home):
    assert _raise(at=T0) is not None
    for i in range(1, 4):  # retries of the task, then new DAG runs on the same bytes
        assert _raise(at=T0 + timedelta(minutes=i)) is None
    (cur,) = alerts.open_alerts()
    assert cur.occurrences == 4 and cur.first_seen.startswith("2026-03-08T12:00")
    assert cur.last_seen.startswith("2026-03-08T12:03")
    # another subject (another batch), kind or model is another alert
    assert _raise(subject="other") is not None
    assert _raise(kind=AlertKind.TRAINING_DIVERGED) is not None
    assert (
        alerts.raise_alert(
            kind=AlertKind.BATCH_QUARANTINED, model="digits", subject="abc123", summary="s"
        )
        is not None
    )
    assert len(alerts.open_alerts()) == 4 and len(alerts.open_alerts("card_fraud")) == 3


def test_resolve_then_refire_inside_the_window_is_recorded_suppressed_not_sent(pipeline_home):
    _raise(at=T0)
    done = alerts.resolve_alert(
        kind=AlertKind.BATCH_QUARANTINED,
        model="card_fraud",
        subject="abc123",
        now=T0 + timedelta(minutes=5),
    )
    assert done is not None and done.state == "resolved" and done.resolved_at
    assert alerts.open_alerts() == []
    # nothing open: a second resolve is nothing to send
    assert (
        alerts.resolve_alert(kind=AlertKind.BATCH_QUARANTINED, model="card_fraud", subject="abc123")
        is None
    )
    assert _raise(at=T0 + timedelta(minutes=30)) is None  # flapping: 25 min after the resolve
    (cur,) = alerts.open_alerts()
    assert cur.suppressed and "suppression window" in cur.details["suppressed_because"]
    # the suppressed episode resolving is not sent either (nobody was told it opened)
    assert (
        alerts.resolve_alert(
            kind=AlertKind.BATCH_QUARANTINED,
            model="card_fraud",
            subject="abc123",
            now=T0 + timedelta(minutes=40),
        )
        is None
    )
    # after the window it is a new episode: sent again
    again = _raise(at=T0 + timedelta(minutes=40 + 61))
    assert again is not None and not again.suppressed and again.occurrences == 3


def test_zero_suppression_window_sends_every_new_episode(pipeline_home):
    _raise(at=T0, suppress_minutes=0)
    alerts.resolve_alert(
        kind=AlertKind.BATCH_QUARANTINED, model="card_fraud", subject="abc123", now=T0
    )
    assert _raise(at=T0 + timedelta(seconds=1), suppress_minutes=0) is not None


def test_window_defaults_to_the_models_spec(pipeline_home):
    from pipeline.spec import get_spec

    window = get_spec("card_fraud").alerts.suppress_minutes
    kw = {"kind": AlertKind.GATE_REJECTED, "model": "card_fraud", "subject": "v3", "summary": "s"}
    assert alerts.raise_alert(**kw, now=T0) is not None
    alerts.resolve_alert(kind=AlertKind.GATE_REJECTED, model="card_fraud", subject="v3", now=T0)
    assert alerts.raise_alert(**kw, now=T0 + timedelta(minutes=window / 2)) is None
    assert alerts.all_alerts()[0].suppressed


def test_bad_lines_are_skipped_with_a_warning_naming_the_line(pipeline_home, caplog):
    _raise(subject="one")
    path = pipeline_home / "alerts" / "alerts.jsonl"
    with path.open("a") as fh:
        fh.write("this is not json\n")
        fh.write(json.dumps({"kind": "no_such_kind", "severity": "info"}) + "\n")
        fh.write('{"kind": "batch_quarantined", "sever')  # truncated, no newline
    with caplog.at_level(logging.WARNING, logger="pipeline.alerts"):
        assert [a.subject for a in alerts.open_alerts()] == ["one"]
        # a writer after a truncated tail starts on a fresh line, and reading goes on
        assert _raise(subject="two") is not None
        assert [a.subject for a in alerts.open_alerts()] == ["two", "one"]
    text = caplog.text
    assert "line 2" in text and "line 3" in text and "line 4" in text


def test_the_command_lists_open_alerts_and_resolves_by_key(pipeline_home, capsys):
    from pipeline.cli import main

    _raise(subject="abc123")
    assert main(["alerts", "--model", "card_fraud"]) == 0
    out = capsys.readouterr().out
    assert "card_fraud/batch_quarantined/abc123" in out
    assert "docs/runbooks/batch_quarantined.md" in out
    assert main(["alerts", "--resolve", "card_fraud/batch_quarantined/abc123"]) == 0
    assert main(["alerts", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1]) == []
    assert main(["alerts", "--all", "--json"]) == 0
    (rec,) = json.loads(capsys.readouterr().out)
    assert rec["state"] == "resolved"
    assert main(["alerts", "--resolve", "card_fraud/nope/x"]) == 2


def _writer(home: str, n: int, barrier, out) -> None:
    import os

    os.environ["PIPELINE_HOME"] = home
    from pipeline import alerts as a
    from pipeline.settings import get_settings

    get_settings.cache_clear()
    barrier.wait()
    sent = 0
    for i in range(n):
        got = a.raise_alert(
            kind="task_failed",
            model="card_fraud",
            subject=f"s{i}",
            summary="x",
            suppress_minutes=60,
        )
        sent += got is not None
    out.put(sent)


def test_two_processes_never_raise_the_same_alert_twice(pipeline_home):
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    n = 40
    procs = [ctx.Process(target=_writer, args=(str(pipeline_home), n, barrier, out)) for _ in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert out.get(timeout=5) + out.get(timeout=5) == n  # each subject sent exactly once
    lines = _lines(pipeline_home)  # every line whole: no interleaved writes
    assert len(lines) == 2 * n
    cur = alerts.open_alerts()
    assert len(cur) == n and all(a.occurrences == 2 for a in cur)


@pytest.mark.parametrize(
    ("series", "expected"),
    [
        ({"fc1.weight": [(s, 1.0) for s in range(8)]}, []),
        (
            {"fc1.weight": [(s, 1.0) for s in range(6)] + [(6, 50.0)]},
            [("fc1.weight", "spike", 6)],
        ),
        (
            {"fc2.bias": [(0, 1.0), (1, 0.1), (2, 1e-9), (3, 1e-10)]},
            [("fc2.bias", "vanishing", 3)],
        ),
        ({"fc1.weight": [(0, 1.0), (1, 100.0)]}, []),  # too few snapshots to judge
    ],
)
def test_gradient_anomalies_per_tensor(series, expected):
    got = [(a.tensor, a.what, a.step) for a in alerts.gradient_anomalies(series)]
    assert got == expected


def _dags_alerting():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "dags"))  # as Airflow does
    import alerting

    return alerting


def _wrapped(inner: BaseException, outer: type[BaseException]) -> BaseException:
    """``raise outer(...) from inner``, as the DAG's ``_run`` and the stages do."""
    try:
        try:
            raise inner
        except BaseException as exc:
            raise outer(str(exc)) from exc
    except BaseException as got:
        return got


def _failure_cases():
    from airflow.sdk.exceptions import AirflowFailException

    from pipeline.errors import CheckpointRejected, DataRejected, PipelineRejection
    from pipeline.spec import PolicyViolation
    from pipeline.train.stopping import TrainingDiverged

    diverged = _wrapped(TrainingDiverged("loss nan at step 40"), PipelineRejection)
    return [
        (
            "validate_batch",
            _wrapped(DataRejected("3 rows"), AirflowFailException),
            "batch_quarantined",
        ),
        (
            "ingest_batch",
            _wrapped(DataRejected("moved"), AirflowFailException),
            "batch_quarantined",
        ),
        ("train_model", _wrapped(diverged, AirflowFailException), "training_diverged"),
        (
            "verify_checkpoint",
            _wrapped(CheckpointRejected("bad"), AirflowFailException),
            "checkpoint_rejected",
        ),
        (
            "gate_promotion",
            _wrapped(DataRejected("no eval set"), AirflowFailException),
            "task_failed",
        ),
        ("ingest_batch", _wrapped(PolicyViolation("looser"), AirflowFailException), "task_failed"),
        ("detect_drift", RuntimeError("tracking server away"), "task_failed"),
        ("publish_summary", None, "task_failed"),
    ]


def test_a_task_failure_maps_to_its_kind_through_the_exception_chain():
    alerting = _dags_alerting()
    for task_id, exc, kind in _failure_cases():
        assert alerting.classify_failure(task_id, exc) == kind, (task_id, exc)


def test_the_deadline_callback_raises_run_overdue_once(pipeline_home):
    from pipeline.settings import PROJECT_ROOT

    alerting = _dags_alerting()
    spec_path = str(PROJECT_ROOT / "models" / "card_fraud" / "model.yaml")
    deadline = alerting.overdue_deadline(alerting._load(spec_path))
    assert deadline.callback.path == "alerting.run_overdue"  # importable from the DAG bundle
    context = {  # what the scheduler hands the callback (models/deadline.py: handle_miss)
        "dag_run": {"dag_id": "retrain_card_fraud", "dag_run_id": "scheduled__2026-03-08"},
        "deadline": {"id": "d1", "deadline_time": "2026-03-08T14:00:00Z"},
    }
    for _ in range(2):  # a second miss of the same DAG while open: deduplicated
        alerting.run_overdue(**deadline.callback.kwargs, context=context)
    (a,) = alerts.open_alerts("card_fraud")
    assert a.kind is AlertKind.RUN_OVERDUE and a.subject == "retrain_card_fraud"
    assert a.occurrences == 2 and "scheduled__2026-03-08" in a.summary
    alerting.after_summary(alerting._load(spec_path), {"dag_id": "retrain_card_fraud"})
    assert alerts.open_alerts() == []


def test_overdue_runs_are_those_queued_longer_than_the_slo():
    runs = [
        {"dag_run_id": "late", "queued_at": "2026-03-08T09:00:00Z"},
        {"dag_run_id": "fresh", "queued_at": "2026-03-08T11:30:00Z"},
        {"dag_run_id": "started", "queued_at": None, "start_date": "2026-03-08T08:00:00Z"},
    ]
    got = alerts.overdue_runs(runs, 120, T0)
    assert [(r, round(m)) for r, m in got] == [("late", 180), ("started", 240)]


def test_a_rejected_checkpoint_alert_resolves_when_the_batchs_next_checkpoint_verifies(
    pipeline_home,
):
    """The records carry their batch's hash (the alert's subject), so the DAG passes the
    stage's own record: no special case merging the ingest record in."""
    from pipeline.settings import PROJECT_ROOT
    from pipeline.stages.records import Trained, Verified

    alerting = _dags_alerting()
    spec = alerting._load(str(PROJECT_ROOT / "models" / "card_fraud" / "model.yaml"))
    sha = "ab" * 32
    alerts.raise_alert(
        kind=AlertKind.CHECKPOINT_REJECTED,
        model="card_fraud",
        subject=alerting.batch_subject(sha),
        summary="reload parity failed",
    )
    trained = Trained(verdict="trained", steps=3, stop_reason="budget", batch_sha256=sha)
    verified = Verified(
        verdict="intact",
        checkpoint_uri="file:///c",
        manifest_sha256="cd" * 32,
        batch_sha256=Trained.from_xcom(trained.to_xcom()).batch_sha256,
    )
    alerting.after_checkpoint(spec, {**verified.to_xcom(), "batch_sha256": ""})  # no subject
    assert [a.kind for a in alerts.open_alerts("card_fraud")] == [AlertKind.CHECKPOINT_REJECTED]
    alerting.after_checkpoint(spec, verified.to_xcom())
    assert alerts.open_alerts("card_fraud") == []
