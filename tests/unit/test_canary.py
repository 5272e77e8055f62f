"""Canary decision rules as tables: the analysis, the Argo-style run, the plan, the readers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from pipeline.canary import (
    AnalysisPolicy,
    AnalysisRun,
    CanaryAnalysis,
    CanaryDecision,
    CanaryPlan,
    CanaryReason,
    CanaryStep,
    CanaryThresholds,
    RunStatus,
    binned_auc,
    psi,
)
from pipeline.names import CanaryVerdict as Verdict
from pipeline.serving import traffic
from pipeline.serving.metrics import (
    LATENCY_BUCKETS,
    SCORE_BUCKETS,
    Histogram,
    MeasurementError,
    ServiceMetrics,
    VersionStats,
    parse_snapshot,
)


def hist(values, bounds) -> Histogram:
    b = (*bounds, math.inf)
    counts = np.bincount(
        np.searchsorted(np.asarray(bounds), np.asarray(values), side="left"), minlength=len(b)
    )
    return Histogram(b, tuple(float(c) for c in counts))


def scores(n: int, seed: int, shift: float = 0.0) -> np.ndarray:
    return np.clip(np.random.default_rng(seed).beta(1.2, 25, n) + shift, 0, 1)


def stats(
    requests=500,
    errors=0,
    latency_ms=3.0,
    n_scores=2000,
    seed=0,
    shift=0.0,
    labels=0,
    auc_noise=0.0,
    lat_jitter=1.0,
) -> VersionStats:
    rng = np.random.default_rng(seed + 100)
    lat = rng.uniform(latency_ms, latency_ms + lat_jitter, int(requests)) / 1000
    s = scores(n_scores, seed, shift)
    pos = neg = Histogram.empty(SCORE_BUCKETS)
    if labels:
        y = rng.uniform(size=labels) < 0.3
        base = np.where(y, rng.beta(4, 6, labels), rng.beta(1.2, 25, labels))
        noisy = np.where(rng.uniform(size=labels) < auc_noise, rng.uniform(size=labels), base)
        pos, neg = hist(noisy[y], SCORE_BUCKETS), hist(noisy[~y], SCORE_BUCKETS)
    return VersionStats(
        requests, errors, n_scores, hist(lat, LATENCY_BUCKETS), hist(s, SCORE_BUCKETS), pos, neg
    )


BASE = stats(seed=0)
CASES = [
    # (id, canary stats, verdict, reason)
    ("healthy", stats(seed=1), Verdict.PASS, CanaryReason.HEALTHY),
    ("error_rate_regressed", stats(errors=40, seed=1), Verdict.FAIL, CanaryReason.ERROR_RATE),
    (
        "errors_fail_fast_before_min_requests",
        stats(requests=12, errors=6, n_scores=12, seed=1),
        Verdict.FAIL,
        CanaryReason.ERROR_RATE,
    ),
    (
        "one_error_in_little_traffic_is_not_judged",
        stats(requests=20, errors=1, n_scores=20, seed=1),
        Verdict.INCONCLUSIVE,
        CanaryReason.TOO_LITTLE_TRAFFIC,
    ),
    ("errors_within_bound", stats(errors=4, seed=1), Verdict.PASS, CanaryReason.HEALTHY),
    ("latency_regressed", stats(latency_ms=200, seed=1), Verdict.FAIL, CanaryReason.LATENCY),
    ("latency_ratio_within_slack", stats(latency_ms=8, seed=1), Verdict.PASS, CanaryReason.HEALTHY),
    (
        "latency_fail_fast_on_median",
        stats(requests=15, latency_ms=200, n_scores=15, seed=1),
        Verdict.FAIL,
        CanaryReason.LATENCY,
    ),
    ("score_shift", stats(shift=0.3, seed=1), Verdict.FAIL, CanaryReason.SCORE_DISTRIBUTION),
    ("small_shift_within_psi", stats(shift=0.002, seed=1), Verdict.PASS, CanaryReason.HEALTHY),
    (
        "too_few_scores",
        stats(n_scores=50, seed=1),
        Verdict.INCONCLUSIVE,
        CanaryReason.TOO_LITTLE_TRAFFIC,
    ),
    (
        "no_canary_traffic",
        stats(requests=0, n_scores=0, seed=1),
        Verdict.INCONCLUSIVE,
        CanaryReason.TOO_LITTLE_TRAFFIC,
    ),
]


@pytest.mark.parametrize(
    ("canary", "verdict", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_analysis_decision_table(canary, verdict, reason):
    d = CanaryAnalysis().decide(BASE, canary)
    assert (d.verdict, d.reason) == (verdict, reason), d.message
    assert d.evidence["checks"] and d.message
    if verdict is Verdict.FAIL:
        assert reason.value in d.failed_checks


@pytest.mark.parametrize(
    ("base_labels", "canary_labels", "noise", "verdict"),
    [
        (2000, 2000, 0.0, Verdict.PASS),
        (2000, 2000, 0.6, Verdict.FAIL),
        (2000, 30, 0.6, Verdict.PASS),
    ],  # too few canary labels: the metric check waits
    ids=["same_auc", "worse_auc", "labels_not_yet_arrived"],
)
def test_labelled_metric_is_judged_once_labels_arrive(base_labels, canary_labels, noise, verdict):
    base = stats(seed=0, labels=base_labels)
    canary = stats(seed=1, labels=canary_labels, auc_noise=noise)
    d = CanaryAnalysis().decide(base, canary)
    assert d.verdict is verdict, d.message
    check = next(c for c in d.evidence["checks"] if c["name"] == "labelled_roc_auc")
    if verdict is Verdict.FAIL:
        assert d.reason is CanaryReason.LABELLED_METRIC and check["canary"] < check["baseline"]
    if canary_labels < 40:
        assert check["passed"] is None and "labels" in check["detail"]


def test_thresholds_are_configurable():
    canary = stats(latency_ms=8, seed=1)
    strict = CanaryThresholds(max_latency_p95_ratio=1.2, latency_slack_ms=1)
    assert CanaryAnalysis(strict).decide(BASE, canary).reason is CanaryReason.LATENCY
    assert (
        CanaryAnalysis(CanaryThresholds(max_psi=10)).decide(BASE, stats(shift=0.3, seed=1)).verdict
        is Verdict.PASS
    )


def _d(verdict: Verdict) -> CanaryDecision:
    reason = {
        Verdict.PASS: CanaryReason.HEALTHY,
        Verdict.FAIL: CanaryReason.ERROR_RATE,
        Verdict.INCONCLUSIVE: CanaryReason.TOO_LITTLE_TRAFFIC,
    }[verdict]
    return CanaryDecision(verdict, reason, verdict.value)


P, F, INC, E = "P", "F", "I", "E"  # pass, fail, inconclusive, error; suffix * = end of step


@pytest.mark.parametrize(
    ("policy", "sequence", "expected"),
    [
        (AnalysisPolicy(), [P, "P*", F], RunStatus.FAILED),
        (AnalysisPolicy(failure_limit=1), [F, P], RunStatus.RUNNING),
        (AnalysisPolicy(failure_limit=1), [F, P, F], RunStatus.FAILED),
        (AnalysisPolicy(consecutive_error_limit=2), [E, E], RunStatus.RUNNING),
        (AnalysisPolicy(consecutive_error_limit=2), [E, E, E], RunStatus.ERROR),
        (AnalysisPolicy(consecutive_error_limit=2), [E, E, P, E, E], RunStatus.RUNNING),
        (AnalysisPolicy(), [INC, INC, P], RunStatus.RUNNING),  # mid-step: just not enough yet
        (AnalysisPolicy(), [INC, "I*"], RunStatus.PAUSED),  # a whole step inconclusive: pause
        (AnalysisPolicy(inconclusive_limit=1), ["I*", P], RunStatus.RUNNING),
        (AnalysisPolicy(inconclusive_limit=1), ["I*", "I*"], RunStatus.PAUSED),
    ],
)
def test_argo_style_run_semantics(policy, sequence, expected):
    run = AnalysisRun(policy)
    for m in sequence:
        if m == E:
            run.record_error("metrics endpoint down")
        else:
            final = m.endswith("*")
            run.record(
                _d({"P": Verdict.PASS, "F": Verdict.FAIL, "I": Verdict.INCONCLUSIVE}[m[0]]),
                final=final,
            )
    assert run.status is expected


def test_run_state_round_trips_and_resume_clears_the_pause():
    run = AnalysisRun(AnalysisPolicy(failure_limit=2))
    run.record(_d(Verdict.FAIL))
    run.record_error("x")
    run.record(_d(Verdict.INCONCLUSIVE), final=True)
    assert run.status is RunStatus.PAUSED
    again = AnalysisRun()
    again.load_state_dict(run.state_dict())
    assert again.state_dict() == run.state_dict()
    again.resume()
    assert again.status is RunStatus.RUNNING and again.failures == 1 and again.inconclusives == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"steps": ()},
        {"steps": ((0.5, 10), (0.25, 10))},
        {"steps": ((0.5, 10), (1.5, 10))},
        {"steps": ((0.0, 10),)},
        {"steps": ((0.5, 1),), "analysis_interval_s": 2},
        {"analysis_interval_s": 0},
        {"bake_s": -1},
    ],
)
def test_plan_validation(kwargs):
    with pytest.raises(ValueError):
        CanaryPlan(**kwargs)


def test_default_plan_and_round_trip():
    plan = CanaryPlan()
    assert [s.weight for s in plan.steps] == [0.05, 0.25, 0.5, 1.0]
    assert CanaryPlan.from_dict(plan.to_dict()) == plan
    assert CanaryPlan(steps=((0.5, 2.0), CanaryStep(1.0, 2.0)), analysis_interval_s=1).steps[
        0
    ] == CanaryStep(0.5, 2.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_error_rate_increase": 1.5},
        {"max_latency_p95_ratio": 0.5},
        {"max_psi": 0},
        {"min_requests": 0},
        {"min_requests_fail_fast": 100},
        {"latency_slack_ms": -1},
        {"max_metric_drop": -0.1},
        {"alpha": 0},
        {"alpha": 0.7},
    ],
)
def test_threshold_validation(kwargs):
    with pytest.raises(ValueError):
        CanaryThresholds(**kwargs)


# -- readers and helpers -------------------------------------------------------------------------


def h_count_above_ok() -> bool:
    h = hist([0.001, 0.004, 0.2, 0.3], LATENCY_BUCKETS)
    return h.count_above(0.1) == 2 and h.count_above(0.0) == 4 and h.count_above(20) == 0


@pytest.mark.parametrize(
    ("k", "n", "p", "lo", "hi"),
    [
        (0, 10, 0.1, 1, 1),
        (11, 10, 0.1, 0, 0),
        (8, 17, 0.01, 0, 1e-9),
        (1, 20, 0.01, 0.1, 0.3),
        (5, 100, 0.05, 0.5, 0.6),
    ],
)
def test_binomial_tail(k, n, p, lo, hi):
    from pipeline.canary import binomial_sf

    assert lo <= binomial_sf(k, n, p) <= hi


def test_psi_auc_quantile_helpers():
    a, b = hist(scores(5000, 0), SCORE_BUCKETS), hist(scores(5000, 1), SCORE_BUCKETS)
    assert psi(a, b) < 0.02
    assert psi(a, hist(scores(5000, 1, 0.3), SCORE_BUCKETS)) > 1
    assert psi(a, Histogram.empty(SCORE_BUCKETS)) is None
    assert h_count_above_ok()
    assert binned_auc(hist([0.9, 0.8], SCORE_BUCKETS), hist([0.01, 0.02], SCORE_BUCKETS)) == 1.0
    assert binned_auc(hist([0.5], SCORE_BUCKETS), hist([0.5], SCORE_BUCKETS)) == 0.5
    h = hist(np.full(100, 0.0042), LATENCY_BUCKETS)
    assert 0.004 <= h.quantile(0.95) <= 0.005
    assert Histogram.empty(LATENCY_BUCKETS).quantile(0.5) is None


def test_snapshot_parsing_of_the_service_metrics():
    m = ServiceMetrics()
    champ, can = m.slot("card_fraud", "champion", "1"), m.slot("card_fraud", "canary", "2")
    for _ in range(10):
        champ.requests.inc()
        champ.latency.observe(0.003)
        champ.score.observe(0.02)
    can.requests.inc()
    can.errors.inc()
    m.labelled.labels("card_fraud", "canary", "2", "1").observe(0.7)
    m.info.labels("card_fraud", "champion", "1", "ab").set(1)
    m.info.labels("card_fraud", "canary", "2", "cd").set(1)
    m.weight.labels("card_fraud").set(0.25)
    m.refused.labels("card_fraud", "3").set(1)
    m.fault.labels("card_fraud", "2").set(1)
    # another model's versions share the numbers: its series never leak into card_fraud's
    other = m.slot("digits", "champion", "1")
    for _ in range(7):
        other.requests.inc()
        other.errors.inc()
    m.info.labels("digits", "champion", "1", "ef").set(1)
    m.weight.labels("digits").set(0.0)
    m.refused.labels("digits", "2").set(1)
    snap = parse_snapshot(m.render().decode(), "card_fraud")
    assert snap.serving == {"champion": "1", "canary": "2"}
    assert snap.canary_weight == 0.25 and snap.refused == {"3"} and snap.faults == {"2"}
    assert snap.stats("1").requests == 10 and snap.stats("1").errors == 0
    assert snap.stats("1").score.total == 10
    assert snap.stats("2").errors == 1 and snap.stats("2").labelled_pos.total == 1
    assert snap.stats("1").latency.quantile(0.5) == pytest.approx(0.0025, abs=0.0006)
    digits = parse_snapshot(m.render().decode(), "digits")
    assert digits.serving == {"champion": "1"} and digits.canary_weight == 0.0
    assert digits.stats("1").requests == 7 and digits.stats("1").errors == 7
    assert digits.refused == {"2"} and digits.faults == frozenset()
    assert parse_snapshot(m.render().decode(), "nope").versions == {}
    later = parse_snapshot(m.render().decode(), "card_fraud")
    assert later.since(snap, "1").requests == 0
    fresh = parse_snapshot(ServiceMetrics().render().decode(), "card_fraud")
    with pytest.raises(MeasurementError, match="restarted"):
        fresh.since(snap, "1")
    with pytest.raises(MeasurementError):
        parse_snapshot('scoring_requests_total{alias="champion" 1 2 3 garbage')


def test_series_without_a_model_label_count_as_the_model_asked_for():
    """A single-model service (no ``model`` label) still reads as that model."""
    text = (
        'scoring_requests_total{alias="champion",version="4"} 3.0\n'
        'scoring_model_info{alias="champion",version="4",manifest_sha256="x"} 1.0\n'
    )
    snap = parse_snapshot(text, "card_fraud")
    assert snap.stats("4").requests == 3 and snap.serving == {"champion": "4"}


def test_plan_from_spec_takes_the_spec_timings_where_set(tmp_path, monkeypatch):
    from pipeline import settings
    from pipeline.spec import load_spec

    monkeypatch.setenv("PIPELINE_CANARY_STEP_SECONDS", "40")
    monkeypatch.setenv("PIPELINE_CANARY_ANALYSIS_INTERVAL_SECONDS", "10")
    monkeypatch.setenv("PIPELINE_CANARY_BAKE_SECONDS", "90")
    settings.get_settings.cache_clear()
    (tmp_path / "m").mkdir()
    contract = Path(__file__).resolve().parents[2] / "models" / "card_fraud" / "contract.yaml"
    (tmp_path / "m" / "contract.yaml").write_text(contract.read_text())
    base = "contract: contract.yaml\ntask: binary\n"
    (tmp_path / "m" / "model.yaml").write_text(base)
    try:
        plain = CanaryPlan.from_spec(load_spec(tmp_path / "m" / "model.yaml"))
        assert plain == CanaryPlan.from_settings()
        assert plain.analysis_interval_s == 10 and plain.bake_s == 90
        assert {s.seconds for s in plain.steps} == {40}
        (tmp_path / "m" / "model.yaml").write_text(
            base + "canary: {enabled: true, steps: [0.1, 1.0], step_seconds: 20, bake_seconds: 0}\n"
        )
        own = CanaryPlan.from_spec(load_spec(tmp_path / "m" / "model.yaml"), load_timeout_s=5)
        assert own.steps == (CanaryStep(0.1, 20.0), CanaryStep(1.0, 20.0))
        assert own.analysis_interval_s == 10 and own.bake_s == 0 and own.load_timeout_s == 5
    finally:
        settings.get_settings.cache_clear()


def test_sticky_buckets_and_weights():
    assert traffic.bucket("card-1") == traffic.bucket("card-1")
    assert not traffic.goes_to_canary(0.0, "k") and traffic.goes_to_canary(1.0, "k")
    share = np.mean([traffic.goes_to_canary(0.25, f"k{i}") for i in range(4000)])
    assert 0.22 < share < 0.28
    assert traffic.parse_weight("0.05") == 0.05
    assert traffic.parse_weight("7") == 0.0 and traffic.parse_weight("x") == 0.0
    assert traffic.parse_weight(None) == 0.0


# -- the package split, and the shared decision protocol ------------------------------------------


def test_analysis_imports_no_io():
    """``pipeline.canary.analysis`` (and the package itself) import nothing that does I/O."""
    import subprocess
    import sys

    heavy = ["mlflow", "httpx", "requests", "boto3", "torch"]
    for module in ("pipeline.canary.analysis", "pipeline.canary"):
        code = f"import sys, {module}\nprint(','.join(m for m in {heavy!r} if m in sys.modules))"
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        assert out.stdout.strip() == "", f"{module} imported {out.stdout.strip()}"


LABELLED_BASE = stats(seed=0, labels=2000)
REPLAY_CASES = [
    *((c[0], BASE, c[1], {}) for c in CASES),
    ("same_auc", LABELLED_BASE, stats(seed=1, labels=2000), {}),
    ("worse_auc", LABELLED_BASE, stats(seed=1, labels=2000, auc_noise=0.6), {}),
    (
        "labelled_sides_given_apart",
        BASE,
        stats(seed=1),
        {
            "labelled_baseline": LABELLED_BASE,
            "labelled_canary": stats(seed=1, labels=2000, auc_noise=0.6),
            "baseline_kind": "champion since canary start",
        },
    ),
    ("errors_and_latency_both_fail", BASE, stats(errors=40, latency_ms=200, seed=1), {}),
]


def _recorded(baseline, canary, kw, thresholds=None):
    from pipeline.canary import decision_record

    t = thresholds or CanaryThresholds()
    d = CanaryAnalysis(t).decide(baseline, canary, **kw)
    return d, decision_record(d, t, baseline, canary, **kw, context={"window": 0})


@pytest.mark.parametrize(
    ("baseline", "canary", "kw"),
    [c[1:] for c in REPLAY_CASES],
    ids=[c[0] for c in REPLAY_CASES],
)
def test_recorded_analysis_replays_to_the_same_decision(baseline, canary, kw):
    import json

    from pipeline import decisions

    d, rec = _recorded(baseline, canary, kw)
    assert (rec["kind"], rec["record_version"]) == ("canary_analysis", 1)
    assert rec["rule"] == CanaryThresholds().to_dict() and rec["context"] == {"window": 0}
    assert decisions.replay(rec).to_dict() == d.to_dict()
    assert decisions.replays(rec)
    on_disk = json.loads(json.dumps(rec, default=str))
    assert decisions.replay(on_disk).to_dict() == d.to_dict()
    assert decisions.replays(on_disk)


def test_canary_decision_follows_the_protocol():
    from pipeline import decisions
    from pipeline.canary import CanaryCheck  # noqa: F401 - the check type's new name

    d = CanaryAnalysis().decide(BASE, stats(errors=40, latency_ms=200, seed=1))
    assert isinstance(d, decisions.Decision)
    assert (d.KIND, d.RECORD_VERSION) == ("canary_analysis", 1)
    assert d.reasons == [CanaryReason.ERROR_RATE, CanaryReason.LATENCY]
    out = d.to_dict()
    assert {"verdict", "reason", "message", "evidence"} <= set(out)
    assert out["reasons"] == ["error_rate", "latency_p95"] and out["reason"] == "error_rate"
    assert out["verdict"] == "fail" and out["message"] == d.message
    ok = CanaryAnalysis().decide(BASE, stats(seed=1))
    assert ok.reasons == [CanaryReason.HEALTHY] and ok.to_dict()["reason"] == "healthy"
    bare = CanaryDecision(Verdict.INCONCLUSIVE, CanaryReason.ABORTED, "bake not judged")
    assert bare.to_dict()["reasons"] == ["aborted"] and bare.to_dict()["evidence"] == {}


def test_tampered_thresholds_replay_to_a_different_verdict():
    from pipeline import decisions

    d, rec = _recorded(BASE, stats(shift=0.3, seed=1), {})
    assert d.verdict is Verdict.FAIL and decisions.replays(rec)
    rec["rule"]["max_psi"] = 10.0
    again = decisions.replay(rec)
    assert again.verdict is Verdict.PASS and not decisions.replays(rec)


def test_records_of_another_kind_or_version_are_refused():
    from pipeline import decisions
    from pipeline.canary import replay

    _, rec = _recorded(BASE, stats(seed=1), {})
    with pytest.raises(decisions.NotADecisionRecord, match="canary_analysis"):
        replay({**rec, "kind": "promotion_gate_decision"})
    with pytest.raises(decisions.NotADecisionRecord, match="version"):
        replay({**rec, "record_version": 2})
    with pytest.raises(decisions.NotADecisionRecord):
        decisions.replay({**rec, "kind": "canary_rollout"})
    with pytest.raises(decisions.NotADecisionRecord):
        replay({**rec, "inputs": {**rec["inputs"], "canary": None}})


def test_thresholds_and_stats_round_trip_through_json():
    import json

    t = CanaryThresholds(max_psi=0.4, psi_bins=8, min_requests=30)
    assert CanaryThresholds.from_dict(json.loads(json.dumps(t.to_dict()))) == t
    with pytest.raises(ValueError, match="unknown"):
        CanaryThresholds.from_dict({**t.to_dict(), "max_cost": 1})
    for s in (stats(seed=3, labels=500), VersionStats()):
        assert VersionStats.from_dict(json.loads(json.dumps(s.to_dict()))) == s


def _snapshot(champion: VersionStats, canary: VersionStats):
    from pipeline.serving.metrics import Snapshot

    return Snapshot(
        {"1": champion, "2": canary},
        {"champion": "1", "canary": "2"},
        0.5,
        frozenset(),
        frozenset(),
    )


def test_rollout_keeps_each_window_record_and_a_failed_log_is_a_warning(monkeypatch, caplog):
    """The rollout's windows become decision records (replayable, numbered, in context);
    they are logged beside the outcome record, and a store that refuses them only warns."""
    from pipeline import decisions, registry
    from pipeline.canary import rollout

    ro = rollout._Rollout("2", "1", CanaryPlan(), "http://127.0.0.1:9", "t-key", "me")
    try:
        ro.phase_start = start = _snapshot(VersionStats(), VersionStats())
        ro.step_index, ro.weight = 0, 0.05
        mid = _snapshot(BASE, stats(seed=1))
        assert ro._record(ro._decide(mid, start), final=False) is RunStatus.RUNNING
        end = _snapshot(BASE + BASE, stats(seed=1) + stats(errors=40, seed=2))
        with pytest.raises(rollout._Stop) as stop:
            ro._record(ro._decide(end, mid), final=True)
    finally:
        ro.http.close()
    assert stop.value.reason is CanaryReason.ERROR_RATE
    recs = ro.decision_records
    assert [r["context"]["window"] for r in recs] == [0, 1]
    assert [r["context"]["phase"] for r in recs] == ["interval", "step"]
    assert [r["decision"]["verdict"] for r in recs] == ["pass", "fail"]
    assert all(decisions.replays(r) for r in recs)

    logged: dict[str, str] = {}
    monkeypatch.setattr(
        registry, "log_text", lambda run_id, text, path: logged.update({path: text})
    )
    rollout._log_decision_records("2", "run-1", recs)
    assert sorted(logged) == [
        "records/decisions/canary_analysis-step0.json",
        "records/decisions/canary_analysis-step1.json",
    ]
    import json

    assert decisions.replays(json.loads(logged["records/decisions/canary_analysis-step1.json"]))
    rollout._log_decision_records("2", None, recs)  # no run: nothing to log on, nothing raised

    def refuse(run_id, text, path):
        raise OSError("artifact store down")

    monkeypatch.setattr(registry, "log_text", refuse)
    with caplog.at_level("WARNING", logger="pipeline.canary.rollout"):
        rollout._log_decision_records("2", "run-1", recs)  # does not raise
    assert "0 of 2" in caplog.text and "artifact store down" in caplog.text
