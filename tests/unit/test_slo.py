"""SLOs (pipeline/slo.py): each objective measured from the records the stages write — a real
SQLite MLflow store, runs tagged by the stages' own functions, a real divergence, a champion
moved by the real promotion, and a scoring service's /metrics served over real HTTP."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from _records import gated_record

from pipeline.names import RunTag, Task, stage_verdict_tag


@pytest.fixture
def home(pipeline_home, mlflow_store, monkeypatch):
    """The embedded default with a migrated store, and no scoring service (a closed port)."""
    monkeypatch.setenv("PIPELINE_SERVING_URL", "http://127.0.0.1:9")
    for var in ("PIPELINE_SERVING_METRICS_URLS", "PIPELINE_SERVING_REPLICAS_DNS"):
        monkeypatch.delenv(var, raising=False)
    from pipeline import settings

    settings.get_settings.cache_clear()
    return pipeline_home


@pytest.fixture
def spec(home):
    from pipeline.spec import active

    return active()


def _batch_run(run_id: str, verdicts: dict[Task, str], *, end: bool = True) -> str:
    """A DAG run's MLflow run as ingest_batch creates it, with the stages' verdicts written by
    the stages' own function; ``end``: publish_summary closed it."""
    from pipeline import registry, stages
    from pipeline.spec import active

    ctx = stages.RunContext(active().retrain_dag_id, run_id)
    rid = registry.get_or_create_run(
        ctx.run_key,
        {RunTag.DAG_ID: ctx.dag_id, RunTag.RUN_ID: ctx.run_id, RunTag.MODEL: active().name},
    )
    for stage, verdict in {Task.INGEST_BATCH: "ok", **verdicts}.items():
        stages.context.write_stage(rid, stage, verdict, f"{stage}: {verdict}", {"stage": stage})
        if stage is Task.DECIDE_RETRAIN:
            registry.set_tags(rid, {RunTag.RETRAIN_VERDICT: verdict})
    if end:
        registry.end_run(rid)
    return rid


TRAINED = {Task.VALIDATE_BATCH: "pass", Task.DECIDE_RETRAIN: "train", Task.TRAIN_MODEL: "trained"}


# -- training success ---------------------------------------------------------------------------


def test_a_real_divergence_burns_the_training_budget(spec):
    from pipeline import slo, stages, storage
    from pipeline.data.generate import WorldSpec, generate, to_parquet_bytes
    from pipeline.errors import PipelineRejection
    from pipeline.settings import get_settings

    for i in range(3):
        _batch_run(f"manual__ok{i}", TRAINED)
    _batch_run("manual__training", {Task.DECIDE_RETRAIN: "train"}, end=False)  # still training
    _batch_run("manual__crashed", {Task.DECIDE_RETRAIN: "train"})  # ended, no training verdict
    _batch_run("manual__skip", {Task.DECIDE_RETRAIN: "skip"})  # never trained: not counted

    before = slo.compute(spec).row(slo.SloName.TRAINING_SUCCESS)
    assert (before.good, before.total) == (3, 4)  # the crashed run is a failed training run

    batch = storage.write_bytes(
        f"{get_settings().storage_root}/landing/{spec.name}/diverge.parquet",
        to_parquet_bytes(generate(WorldSpec(rows=3000, seed=7))),
    ).uri
    ctx = stages.RunContext(spec.retrain_dag_id, "manual__diverge")
    ingested = stages.ingest_batch(ctx, batch)
    with pytest.raises(PipelineRejection, match="diverged"):
        stages.train_model(ctx, ingested, learning_rate=100.0, optimizer="sgd", max_epochs=10)

    report = slo.compute(spec)
    row = report.row(slo.SloName.TRAINING_SUCCESS)
    assert (row.good, row.total, row.events) == (3, 5, "3/5")
    assert row.actual == pytest.approx(3 / 5)
    allowed = 1 - spec.slo.training_success
    assert row.budget_remaining == pytest.approx(1 - (2 / 5) / allowed)
    assert row.budget_remaining < before.budget_remaining < 0
    assert row.burning and row.status == slo.SloStatus.BURNING
    assert "manual__diverge" in row.detail and "manual__crashed" in row.detail
    assert "1 still training" in row.detail
    assert report.burning[0] is row and report.to_json()["burning"][0] == "training_success"

    # on call: one slo_budget_burning alert for the exhausted budget, none for a re-check
    from pipeline import alerts

    sent = slo.alerts_for(spec, report)
    assert [a.dedup_key for a in sent] == [f"{spec.name}/slo_budget_burning/training_success"]
    assert "budget left" in sent[0].summary and sent[0].value == row.budget_remaining
    assert slo.alerts_for(spec, slo.compute(spec)) == []
    assert [a.subject for a in alerts.open_alerts(spec.name)] == ["training_success"]
    # the owner loosens the objective in review (3/5 meets 50%): the alert resolves
    looser = spec.model_copy(update={"slo": spec.slo.model_copy(update={"training_success": 0.5})})
    healed = slo.compute(looser)
    assert not healed.row(slo.SloName.TRAINING_SUCCESS).burning
    assert [a.state for a in slo.alerts_for(looser, healed)] == ["resolved"]
    assert alerts.open_alerts(spec.name) == []


def test_training_within_budget_is_ok(spec, monkeypatch):
    from pipeline import slo

    for i in range(4):
        _batch_run(f"manual__ok{i}", TRAINED)
    row = slo.compute(spec).row(slo.SloName.TRAINING_SUCCESS)
    assert (row.actual, row.budget_remaining, row.burning) == (1.0, 1.0, False)
    assert row.status == slo.SloStatus.OK


# -- no data ------------------------------------------------------------------------------------


def test_nothing_recorded_is_no_data_on_every_row_never_met(spec):
    from pipeline import slo

    report = slo.compute(spec)
    assert [r.name for r in report.rows] == list(slo.SloName)
    for r in report.rows:
        assert r.status == slo.SloStatus.NO_DATA and r.actual is None
        assert r.budget_remaining is None and not r.burning and r.events is None
        assert r.detail.startswith("no data: ")
    assert "no MLflow experiment 'retrain_card_fraud'" in report.row("training_success").detail
    assert "no champion" in report.row("champion_freshness").detail
    assert "127.0.0.1:9" in report.row("serving_error_rate").detail  # down: no data, no error
    rows = report.to_json()["rows"]
    assert {r["status"] for r in rows} == {"no_data"} and report.to_json()["burning"] == []
    assert "NO DATA" in report.table() and "OK" not in report.table().split()


def test_runs_outside_the_window_are_no_data(spec):
    from pipeline import slo

    _batch_run("manual__old", TRAINED)
    later = datetime.now(UTC) + timedelta(days=spec.slo.window_days + 1)
    report = slo.compute(spec, now=later)
    for name in ("training_success", "decision_latency"):
        assert report.row(name).status == slo.SloStatus.NO_DATA
    assert report.row("training_success").detail == (
        "no data: no training run finished in the window"
    )


def test_an_unset_scoring_service_is_no_data(spec, monkeypatch):
    from pipeline import settings, slo

    monkeypatch.setenv("PIPELINE_SERVING_URL", "")
    settings.get_settings.cache_clear()
    row = slo.compute(spec).row(slo.SloName.SERVING_LATENCY_P99)
    assert row.status == slo.SloStatus.NO_DATA and "not configured" in row.detail


# -- decision latency ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("verdicts", "decided"),
    [
        ({Task.VALIDATE_BATCH: "reject"}, "quarantined"),
        ({Task.INGEST_BATCH: "quarantined"}, "quarantined"),
        ({Task.DECIDE_RETRAIN: "skip"}, "retrain_skipped"),
        ({Task.TRAIN_MODEL: "diverged"}, "diverged"),
        ({Task.VERIFY_CHECKPOINT: "rejected"}, "checkpoint_rejected"),
        ({Task.GATE_PROMOTION: "reject"}, "gate_rejected"),
        ({Task.GATE_PROMOTION: "reject", Task.PROMOTE_CHAMPION: "not_promoted"}, "not_promoted"),
        ({Task.PROMOTE_CHAMPION: "promoted"}, "promoted"),
        ({Task.PROMOTE_CHAMPION: "rolled_back"}, "rolled_back"),
        ({Task.PROMOTE_CHAMPION: "rolled_back_after_bake"}, "rolled_back_after_bake"),
        ({Task.PROMOTE_CHAMPION: "paused"}, None),  # a human holds it: not decided
        ({Task.PROMOTE_CHAMPION: "aborted"}, None),
        ({Task.PROMOTE_CHAMPION: "conflict"}, None),  # to be re-gated
        ({Task.DECIDE_RETRAIN: "train", Task.TRAIN_MODEL: "trained"}, None),  # still going
    ],
)
def test_batch_decision(verdicts, decided):
    from pipeline import slo

    tags = {stage_verdict_tag(t): v for t, v in verdicts.items()}
    assert slo.batch_decision(tags) == decided


def test_decision_latency_counts_late_and_undecided_batches(spec):
    from pipeline import registry, slo

    c = registry.client()
    fast = _batch_run("manual__fast", {Task.VALIDATE_BATCH: "reject"})
    slow = _batch_run("manual__slow", {**TRAINED, Task.PROMOTE_CHAMPION: "promoted"}, end=False)
    start = c.get_run(slow).info.start_time
    late_ms = int((spec.slo.decision_minutes + 60) * 60_000)
    c.set_terminated(slow, end_time=start + late_ms)  # the canary and bake took long
    waiting = _batch_run("manual__waiting", {**TRAINED, Task.PROMOTE_CHAMPION: "paused"}, end=False)
    assert c.get_run(fast).info.end_time and not c.get_run(waiting).info.end_time

    soon = datetime.fromtimestamp(start / 1000, UTC) + timedelta(minutes=5)
    row = slo.compute(spec, now=soon).row(slo.SloName.DECISION_LATENCY)
    # the paused one is young: pending, not counted
    assert (row.good, row.total) == (1, 2) and "1 pending" in row.detail
    assert row.budget_remaining == pytest.approx(1 - 0.5 / (1 - spec.slo.decision_target))
    assert row.burning and "manual__slow" in row.detail

    later = soon + timedelta(minutes=spec.slo.decision_minutes)
    row = slo.compute(spec, now=later).row(slo.SloName.DECISION_LATENCY)
    assert (row.good, row.total) == (1, 3) and "manual__waiting (undecided)" in row.detail


def test_decision_latency_ok_when_batches_are_decided_quickly(spec):
    from pipeline import slo

    _batch_run("manual__a", {Task.VALIDATE_BATCH: "pass", Task.DECIDE_RETRAIN: "skip"})
    _batch_run("manual__b", {Task.VALIDATE_BATCH: "reject"})
    row = slo.compute(spec).row(slo.SloName.DECISION_LATENCY)
    assert (row.good, row.total, row.budget_remaining, row.burning) == (2, 2, 1.0, False)


# -- champion freshness -------------------------------------------------------------------------


def test_champion_freshness_from_the_promotions_promoted_at(spec):
    from pipeline import registry, slo, stages

    promoted = datetime(2026, 3, 1, tzinfo=UTC)
    ctx = stages.RunContext(spec.retrain_dag_id, "manual__p", promoted.isoformat())
    rid = _batch_run(ctx.run_id, TRAINED)
    version = registry.register_version(rid, ctx.run_key, "file:///ck/p", {}, "")
    out = stages.promote_champion(ctx, gated_record(version, rid))
    assert out.verdict == "promoted"

    max_age = spec.slo.champion_max_age_days
    row = slo.compute(spec, now=promoted + timedelta(days=10)).row("champion_freshness")
    assert row.actual == pytest.approx(10.0)
    assert row.budget_remaining == pytest.approx(1 - 10 / max_age) and not row.burning
    assert f"champion v{version}" in row.detail and row.events is None

    row = slo.compute(spec, now=promoted + timedelta(days=max_age + 5)).row("champion_freshness")
    assert row.burning and row.budget_remaining == pytest.approx(-5 / max_age)


def test_a_champion_set_by_hand_without_promoted_at_is_no_data(spec):
    from pipeline import registry, slo

    rid = _batch_run("manual__hand", TRAINED)
    version = registry.register_version(rid, "k", "file:///ck/h", {}, "")
    registry.set_alias(registry.CHAMPION, version)
    row = slo.compute(spec).row(slo.SloName.CHAMPION_FRESHNESS)
    assert row.status == slo.SloStatus.NO_DATA and "promoted_at" in row.detail


# -- serving: a real /metrics over HTTP ----------------------------------------------------------


@pytest.fixture
def service(home, monkeypatch):
    """The scoring service's own metrics (ServiceMetrics), served by prometheus_client over
    HTTP; PIPELINE_SERVING_URL points at it."""
    from prometheus_client import start_http_server

    from pipeline import settings
    from pipeline.serving.metrics import ServiceMetrics

    sm = ServiceMetrics()
    server, thread = start_http_server(0, addr="127.0.0.1", registry=sm.registry)
    monkeypatch.setenv("PIPELINE_SERVING_URL", f"http://127.0.0.1:{server.server_port}")
    settings.get_settings.cache_clear()
    yield sm
    server.shutdown()
    thread.join(timeout=5)


def _traffic(sm, model: str, version: str, ok_ms: list[float], failed: int = 0) -> None:
    """What the service records per answered request (app.py): the slot's counters, latency."""
    slot = sm.slot(model, "champion", version)
    for ms in ok_ms:
        slot.requests.inc()
        slot.latency.observe(ms / 1000)
    for _ in range(failed):
        slot.requests.inc()
        slot.errors.inc()
        slot.latency.observe(0.002)


def test_serving_slos_from_the_services_metrics(spec, service):
    from pipeline import slo

    _traffic(service, spec.name, "1", [4.0] * 700 + [400.0] * 3, failed=2)
    _traffic(service, spec.name, "2", [8.0] * 295)  # a canary: the model's series are summed
    _traffic(service, "digits", "1", [900.0] * 50, failed=50)  # another model: not ours
    report = slo.compute(spec)
    err, lat = report.row("serving_error_rate"), report.row("serving_latency_p99")
    assert (err.good, err.total) == (998, 1000) and err.actual == pytest.approx(0.002)
    assert err.budget_remaining == pytest.approx(1 - 0.002 / spec.slo.serving_error_rate)
    assert err.burning and "2 of 1000 requests failed" in err.detail
    # 3 of 1000 slower than 250 ms: within the 1% a p99 allows
    assert (lat.good, lat.total) == (997, 1000) and not lat.burning
    assert lat.budget_remaining == pytest.approx(1 - 0.003 / 0.01)
    assert lat.actual is not None and lat.actual < spec.slo.serving_p99_ms


def test_slow_serving_burns_the_latency_budget(spec, service):
    from pipeline import slo

    _traffic(service, spec.name, "1", [4.0] * 90 + [600.0] * 10)
    lat = slo.compute(spec).row(slo.SloName.SERVING_LATENCY_P99)
    assert (
        lat.burning
        and lat.actual > spec.slo.serving_p99_ms
        and (lat.good, lat.total)
        == (
            90,
            100,
        )
    )
    err = slo.compute(spec).row(slo.SloName.SERVING_ERROR_RATE)
    assert (err.actual, err.budget_remaining, err.burning) == (0.0, 1.0, False)


def test_a_service_with_no_requests_yet_is_no_data(spec, service):
    from pipeline import slo

    report = slo.compute(spec)
    err, lat = report.row("serving_error_rate"), report.row("serving_latency_p99")
    assert err.status == lat.status == slo.SloStatus.NO_DATA
    assert "no scoring requests" in err.detail and "no latency" in lat.detail


def test_within_interpolates_inside_a_bucket():
    from pipeline import slo
    from pipeline.serving.metrics import Histogram

    h = Histogram((0.1, 0.2, float("inf")), (10.0, 10.0, 5.0))
    assert slo.within(h, 0.1) == 10 and slo.within(h, 0.15) == pytest.approx(15.0)
    assert slo.within(h, 0.05) == pytest.approx(5.0) and slo.within(h, 5.0) == 20.0


# -- the command --------------------------------------------------------------------------------


def test_cli_prints_the_table_or_json_and_check_exits_3_on_a_burning_budget(spec, service, capsys):
    from pipeline.cli import main

    _traffic(service, spec.name, "1", [4.0] * 90, failed=10)
    assert main(["slo", "--model", spec.name]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"SLOs of {spec.name} over {spec.slo.window_days:g} days")
    assert "serving_error_rate" in out and "BURNING" in out and "NO DATA" in out

    assert main(["slo", "--model", spec.name, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == spec.name and report["burning"] == ["serving_error_rate"]
    assert main(["slo", "--model", spec.name, "--check"]) == 3
    capsys.readouterr()


def test_check_exits_0_when_nothing_burns_even_with_no_data(spec, capsys):
    from pipeline.cli import main

    assert main(["slo", "--model", spec.name, "--check"]) == 0
    assert "NO DATA" in capsys.readouterr().out
