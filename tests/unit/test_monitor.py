"""The champion monitor (pipeline/monitor.py): its decision table, and the same table read
from a real scoring service over real HTTP.

The service is the real app (``create_app``) on uvicorn in a thread of this process, as in
test_serving_replicas.py: its routing state is a dict the test sets, its model a seeded,
untrained MLP (what the monitor judges is the labels the test posts to ``/feedback``, not
how good the model is). The champion's gated value is a tag on a real model version in the
embedded MLflow registry. Labels that agree with the model's ranking give a live ROC AUC of
1.0 (healthy); labels that contradict it give 0.0 (decayed).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch

from pipeline import decisions, monitor, registry, storage
from pipeline.data.generate import WorldSpec, generate
from pipeline.monitor import MonitorEvidence, MonitorReason, MonitorRule, MonitorVerdict
from pipeline.serving import traffic
from pipeline.serving.access import AccessPolicy
from pipeline.serving.app import create_app
from pipeline.serving.metrics import SCORE_BUCKETS, Histogram
from pipeline.serving.schema import RowValidator
from pipeline.serving.service import LoadedModel, ScoringService, ServedModel
from pipeline.spec import get_spec, use_spec
from pipeline.train.features import fit_features
from pipeline.train.model import MLP, ModelConfig
from tests.integration.moto import free_port
from tests.unit._serving import Servers, records

FRAUD = "card_fraud"
FEEDBACK_TOKEN = "feedback-" + "d3" * 20
FEEDBACK = {"Authorization": f"Bearer {FEEDBACK_TOKEN}"}
# A small three-class contract (as in test_serving.py): a multiclass model served as "digits"
THREE_CLASSES = """
name: shapes
id_column: shape_id
target: {name: kind, values: [0, 1, 2]}
columns:
  - {name: shape_id, type: string, unique: true}
  - {name: width, type: float, min: 0.0, max: 100.0}
  - {name: corners, type: int, min: 0, max: 12}
  - {name: kind, type: int, min: 0, max: 2}
"""


def shapes_frame(n: int, seed: int):
    import pandas as pd

    rng = np.random.default_rng(seed)
    kind = rng.integers(0, 3, n)
    return pd.DataFrame(
        {
            "shape_id": [f"s{seed}-{i}" for i in range(n)],
            "width": rng.uniform(1, 99, n),
            "corners": np.choose(kind, [0, 3, 4]) + rng.integers(0, 2, n),
            "kind": kind,
        }
    )


# -- the decision table, on the pure rule ----------------------------------------------------


def hist(values) -> Histogram:
    return monitor.histogram_of(values)


RNG = np.random.default_rng(0)
BASE = hist(RNG.beta(1, 20, 2000))
SAME = hist(np.random.default_rng(1).beta(1, 20, 2000))
SHIFTED = hist(np.random.default_rng(2).beta(4, 4, 2000))
RULE = MonitorRule(min_labels=200, decay_margin=0.03, psi=0.25, min_scores=200)


def ev(**kw) -> MonitorEvidence:
    base = {
        "model": FRAUD,
        "version": "3",
        "live_metric": "scoring_labelled_roc_auc",
        "gated_value": 0.90,
        "live_value": 0.89,
        "labels": 500,
        "baseline": BASE,
        "baseline_source": "gate",
        "live_scores": SAME,
    }
    return MonitorEvidence(**{**base, **kw})


@pytest.mark.parametrize(
    ("evidence", "verdict", "reasons"),
    [
        (ev(), "healthy", ["metric_holds", "scores_stable"]),
        (ev(live_value=0.80), "decaying", ["performance_decay", "scores_stable"]),
        (
            ev(live_value=0.80, live_scores=SHIFTED),
            "decaying",
            ["performance_decay", "score_drift"],
        ),
        (ev(live_scores=SHIFTED), "drifting", ["metric_holds", "score_drift"]),
        (ev(labels=199, live_value=0.5), "healthy", ["too_few_labels", "scores_stable"]),
        (ev(labels=10, live_scores=SHIFTED), "drifting", ["too_few_labels", "score_drift"]),
        (ev(live_metric=None, live_value=None), "healthy", ["no_live_metric", "scores_stable"]),
        (ev(gated_value=None), "healthy", ["no_gated_value", "scores_stable"]),
        (ev(live_value=None), "healthy", ["no_live_metric", "scores_stable"]),
        (
            ev(labels=0, live_scores=hist([0.1] * 50)),
            "no_data",
            ["too_few_labels", "too_few_scores"],
        ),
        (ev(baseline=None, baseline_source=None), "healthy", ["metric_holds", "too_few_scores"]),
        (
            ev(labels=0, baseline_source="first_window", baseline_taken_now=True),
            "no_data",
            ["too_few_labels", "baseline_recorded"],
        ),
        (ev(version=None), "no_data", ["no_champion"]),
        # exactly at the margin is not decay (drop > margin is)
        (ev(gated_value=0.90, live_value=0.875), "healthy", ["metric_holds", "scores_stable"]),
    ],
)
def test_decision_table(evidence, verdict, reasons):
    d = RULE.decide(evidence)
    assert d.verdict.value == verdict
    assert [r.value for r in d.reasons] == reasons
    rec = RULE.record(d, {"model": FRAUD})
    assert rec["kind"] == "champion_monitor"
    assert decisions.replays(json.loads(json.dumps(rec)))  # through a file and back


def test_messages_name_the_values_and_thresholds():
    d = RULE.decide(ev(live_value=0.80, live_scores=SHIFTED))
    assert "0.8000" in d.message and "0.9000" in d.message and "decay margin 0.03" in d.message
    assert f"score PSI {d.psi:.4f} >= 0.25" in d.message and d.psi > 0.25
    lower = MonitorRule(decay_margin=0.03).decide(
        ev(metric="log_loss", direction=-1, gated_value=0.20, live_value=0.30)
    )
    assert lower.verdict is MonitorVerdict.DECAYING  # lower-is-better: a rise is decay


def test_rule_and_evidence_refuse_bad_values():
    with pytest.raises(ValueError, match="min_labels"):
        MonitorRule(min_labels=0)
    with pytest.raises(ValueError, match="psi"):
        MonitorRule(psi=0)
    with pytest.raises(ValueError, match="live_value"):
        ev(live_value=math.nan)


def test_psi_is_zero_on_the_same_distribution_and_the_histogram_matches_the_services():
    assert monitor.psi(BASE, BASE) == pytest.approx(0.0)
    assert monitor.psi(BASE, SAME) < 0.1 < 0.25 < monitor.psi(BASE, SHIFTED)
    h = hist([0.001, 0.0011, 0.5, 1.0])  # Prometheus le buckets: 0.001 falls in le=0.001
    assert h.bounds[:-1] == SCORE_BUCKETS and math.isinf(h.bounds[-1])
    assert h.counts[0] == 1 and h.counts[1] == 1 and h.total == 4


def test_the_spec_sets_the_rule():
    spec = get_spec(FRAUD)
    rule = MonitorRule.from_spec(spec)
    assert rule.min_labels == spec.monitor.min_labels == rule.min_scores
    assert rule.psi == spec.monitor.score_drift_psi
    want = spec.monitor.decay_margin
    assert rule.decay_margin == (want if want is not None else spec.retrain.decay_margin)


def test_unknown_record_versions_are_refused():
    rec = RULE.record(RULE.decide(ev()))
    rec["record_version"] = 99
    with pytest.raises(decisions.NotADecisionRecord, match="99"):
        decisions.replay(rec)


# -- against a real scoring service -----------------------------------------------------------


@pytest.fixture
def service(pipeline_home, contract) -> Iterator[Callable[..., SimpleNamespace]]:
    """``start(model=FRAUD, task="binary", gated=0.9)``: a served champion v1 of that model,
    registered with the gate's tags; the URL and helpers to score and label."""
    servers = Servers()

    def start(
        name: str = FRAUD,
        task: str = "binary",
        gated: float | None = 0.9,
        champion: str | None = "1",
    ):
        c, classes = contract, (0, 1)
        if task == "multiclass":
            from pipeline.contract import load_contract

            path = pipeline_home.parent / "three.yaml"
            path.write_text(THREE_CLASSES)
            c, classes = load_contract(path), (0, 1, 2)
            df = shapes_frame(600, 3)
        else:
            df = generate(WorldSpec(rows=3000, seed=5))
        features = fit_features(df, c)
        torch.manual_seed(1)
        model = MLP(ModelConfig(features.width, len(features.classes))).eval()
        spec = get_spec(name)
        state = {"now": traffic.ServingState(champion, None, 0.0)}
        with use_spec(spec):
            run_id = registry.get_or_create_run(f"test-monitor-{name}")
            tags = {"gate.verdict": "promote", "gate.metric": spec.primary_metric}
            if gated is not None:
                tags[f"eval.{spec.primary_metric}"] = f"{gated:.6f}"
            registry.register_version(run_id, "k1", "file:///ckpt/1", tags, "monitor test")

        def load(v: str) -> LoadedModel:
            return LoadedModel(v, f"file:///ckpt/{v}", "ab" * 32, model, features, len(classes) - 1)

        served = ServedModel(
            name,
            validator=RowValidator(c),
            loader=load,
            read_state=lambda: state["now"],
            task=task,
            classes=classes,
        )
        svc = ScoringService([served], default=name, poll_seconds=60)
        svc.poll_once()
        app = create_app(svc, access=AccessPolicy(feedback_token=FEEDBACK_TOKEN), poll=False)
        url = servers.start(app)
        rows = records(df, features.input_columns)
        http = httpx.Client(base_url=url, timeout=10)

        def score(batch: list[dict], per: int = 50) -> list[tuple[str, list[float]]]:
            out = []
            for i in range(0, len(batch), per):
                r = http.post("/predict", json=batch[i : i + per])
                assert r.status_code == 200, r.text
                out.append((r.json()["request_id"], r.json()["scores"]))
            return out

        def label(scored, agree: bool) -> None:
            """Labels that follow the model's ranking (agree) or contradict it."""
            cut = float(
                np.median([s for _, ss in scored for s in ss if not isinstance(s, list)] or [0])
            )
            items = [
                {
                    "request_id": rid,
                    "labels": [
                        int(np.argmin(s)) if isinstance(s, list) else int((s > cut) == agree)
                        for s in ss
                    ],
                }
                for rid, ss in scored
            ]
            r = http.post("/feedback", json={"feedback": items}, headers=FEEDBACK)
            assert r.status_code == 200, r.text

        return SimpleNamespace(
            url=url, spec=spec, rows=rows, score=score, label=label, state=state, service=svc
        )

    yield start
    servers.stop()


def test_healthy_champion_then_the_same_champion_decays(service):
    s = service()
    scored = s.score(s.rows[:400])
    s.label(scored, agree=True)
    with use_spec(s.spec):
        first = monitor.watch(s.spec, url=s.url, run_key="monitor_card_fraud__r1")
    d = first.decision
    assert d.verdict is MonitorVerdict.HEALTHY, d.message
    assert [r.value for r in d.reasons] == ["metric_holds", "baseline_recorded"]
    assert d.evidence.labels == 400 and d.evidence.live_value == pytest.approx(1.0)
    assert d.evidence.gated_value == pytest.approx(0.9) and d.evidence.version == "1"
    # the baseline is stored per version, from the first window (no gate record here)
    base = json.loads(storage.read_text(monitor.baseline_uri(s.spec, "1")))
    assert base["source"] == "first_window" and sum(base["histogram"]["counts"]) == 400
    # the record is written once per run and replays from the file alone
    rec = json.loads(storage.read_text(first.uri))
    assert decisions.replays(rec) and rec["decision"]["verdict"] == "healthy"
    again = monitor.watch(s.spec, url=s.url, run_key="monitor_card_fraud__r1")
    assert again.record == rec  # a retry of the run: the same judgement

    # delayed labels that contradict the ranking: the live AUC falls far below the gate's
    s.label(s.score(s.rows[400:2400]), agree=False)
    with use_spec(s.spec):
        second = monitor.watch(s.spec, url=s.url, run_key="monitor_card_fraud__r2")
    d2 = second.decision
    assert d2.verdict is MonitorVerdict.DECAYING, d2.message
    assert d2.reasons[0] is MonitorReason.PERFORMANCE_DECAY
    assert d2.evidence.labels == 2400 and d2.evidence.live_value < 0.5
    assert "at the gate" in d2.message and "decay margin" in d2.message
    # the scores after the baseline are the same population: judged, and stable
    assert d2.drift_reason is MonitorReason.SCORES_STABLE and d2.evidence.scores == 2000
    x = second.to_xcom()
    assert x["verdict"] == "decaying" and x["decay_threshold"] == pytest.approx(0.9 - 0.03)


def test_too_few_labels_is_no_decay_verdict(service):
    s = service()
    s.label(s.score(s.rows[:100]), agree=False)  # AUC 0, but only 100 < min_labels labels
    with use_spec(s.spec):
        d = monitor.watch(s.spec, url=s.url).decision
    assert d.decay_reason is MonitorReason.TOO_FEW_LABELS, d.message
    assert d.drift_reason is MonitorReason.TOO_FEW_SCORES  # 100 scores: no baseline yet
    assert d.verdict is MonitorVerdict.NO_DATA
    assert not storage.exists(monitor.baseline_uri(s.spec, "1"))


def test_shifted_traffic_is_prediction_drift(service):
    s = service()
    s.score(s.rows[:600])
    with use_spec(s.spec):
        first = monitor.watch(s.spec, url=s.url).decision
    assert MonitorReason.BASELINE_RECORDED in first.reasons
    # the same population scored from now on, but with amounts far outside what it saw
    shifted = [dict(r, amount=90_000.0, card_age_days=19_000) for r in s.rows[600:1400]]
    s.score(shifted)
    with use_spec(s.spec):
        d = monitor.watch(s.spec, url=s.url).decision
    assert d.verdict is MonitorVerdict.DRIFTING, d.message
    assert d.reasons == [MonitorReason.TOO_FEW_LABELS, MonitorReason.SCORE_DRIFT]
    assert d.psi >= 0.25 and d.evidence.scores == 800  # only the window after the baseline


def test_a_multiclass_model_without_a_live_metric_has_no_decay_leg(service):
    """The service exports ROC AUC on labels for binary models only (multiclass: micro-
    averaged, the gate's is macro; digits' primary metric is accuracy): the decay leg says
    so, and nothing crashes. The served model's features do not matter here: the monitor
    reads the spec's task and metric and the service's series for the model's name."""
    s = service(name="digits", task="multiclass", gated=0.95)
    scored = s.score(s.rows[:300])
    s.label(scored, agree=False)
    with use_spec(s.spec):
        d = monitor.watch(s.spec, url=s.url).decision
    assert d.decay_reason is MonitorReason.NO_LIVE_METRIC, d.message
    assert "exports no live accuracy for a multiclass model" in d.message
    assert d.verdict is MonitorVerdict.NO_DATA  # and the first window became the baseline
    assert d.drift_reason is MonitorReason.BASELINE_RECORDED


def test_no_champion_served_is_no_data(service):
    s = service(champion=None)  # a version is registered, but nothing is aliased champion
    with use_spec(s.spec):
        d = monitor.watch(s.spec, url=s.url).decision
    assert d.verdict is MonitorVerdict.NO_DATA and d.reasons == [MonitorReason.NO_CHAMPION]


def test_serving_down_is_a_transient_error_not_healthy(pipeline_home):
    spec = get_spec(FRAUD)
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with use_spec(spec), pytest.raises(monitor.ServingUnreachable, match="did not answer") as exc:
        monitor.watch(spec, url=url, run_key="monitor_card_fraud__down")
    assert isinstance(exc.value, storage.TransientStorageError)
    assert not storage.exists(monitor.record_uri(spec, "monitor_card_fraud__down"))


def test_the_command_prints_a_record_that_replays(service, tmp_path, capsys):
    from pipeline.cli import main

    s = service()
    s.label(s.score(s.rows[:400]), agree=False)
    assert main(["monitor", "--model", FRAUD, "--url", s.url, "--json"]) == 3  # decaying
    out = capsys.readouterr().out
    path = tmp_path / "rec.json"
    path.write_text(out)
    assert main(["decision", "replay", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["replayed"] == "decaying"
    assert main(["monitor", "--model", FRAUD, "--url", "http://127.0.0.1:9"]) == 4


def test_a_decay_requests_one_retrain_on_the_newest_validated_batch(pipeline_home):
    spec = get_spec(FRAUD)
    watched = {"verdict": "decaying", "version": "4", "record_uri": "r", "message": "m"}
    with use_spec(spec):
        assert monitor.retrain_request(spec, watched)[0] is None  # nothing validated yet
        root = storage.join(monitor.get_settings().storage_root, "landing", FRAUD)
        for name in ("old", "new"):
            uri = storage.write_text(storage.join(root, f"{name}.parquet"), name).uri
            run = registry.get_or_create_run(f"retrain_{FRAUD}__{name}")
            registry.set_tags(
                run,
                {
                    "pipeline.model": FRAUD,
                    "data.batch_uri": uri,
                    "stage.validate_batch.verdict": "pass",
                },
            )
            time.sleep(0.01)  # distinct start times
        extra, why = monitor.retrain_request(spec, watched)
        assert extra is not None and extra["batch_uri"].endswith("/new.parquet"), why
        assert extra["trigger"] == "champion_decaying" and extra["champion_version"] == "4"
        again, why = monitor.retrain_request(spec, watched)  # the next check, same decay
        assert again is None and "already requested for v4" in why
        assert monitor.retrain_request(spec, {**watched, "verdict": "healthy"})[0] is None
