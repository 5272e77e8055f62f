"""The retrain decision end to end through the stages, against a real (quickly trained)
champion: a clean batch skips, a covariate-shifted batch retrains for drift, and a
concept-drifted batch (same features, new labelling) retrains for performance decay."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import registry, spec, stages, storage
from pipeline.data.generate import WorldSpec, generate, to_parquet_bytes

NOW = "2026-01-05T00:00:00Z"
ROWS = 6000


def land(home: Path, name: str, spec: WorldSpec) -> str:
    uri = (home / "storage" / "landing" / "card_fraud" / f"{name}.parquet").as_uri()
    return storage.write_bytes(uri, to_parquet_bytes(generate(spec))).uri


def decide(home: Path, name: str, spec: WorldSpec) -> tuple[dict, dict]:
    ctx = stages.RunContext(dag_id="test", run_id=name, run_after=NOW)
    ingested = stages.ingest_batch(ctx, land(home, name, spec))
    stages.validate_batch(ctx, ingested)
    drifted = stages.detect_drift(ctx, ingested)
    return drifted, stages.decide_retrain(ctx, drifted)


@pytest.fixture
def champion(pipeline_home: Path) -> Path:
    """A first batch becomes the champion through the stages (few epochs, small data)."""
    ctx = stages.RunContext(dag_id="test", run_id="first", run_after=NOW)
    storage.write_bytes(
        (pipeline_home / "storage" / "trusted" / "card_fraud" / "eval.parquet").as_uri(),
        to_parquet_bytes(generate(WorldSpec(rows=ROWS, seed=100))),
    )  # the spec's set
    ingested = stages.ingest_batch(ctx, land(pipeline_home, "first", WorldSpec(rows=ROWS, seed=1)))
    stages.validate_batch(ctx, ingested)
    first = stages.decide_retrain(ctx, stages.detect_drift(ctx, ingested))
    assert first.verdict == "train" and first.reasons == ["no_champion"]
    trained = stages.train_model(ctx, ingested, max_epochs=3, learning_rate=1e-2)
    verified = stages.verify_checkpoint(ctx, trained)
    registered = stages.register_challenger(ctx, ingested, trained, verified)
    card = spec.get_spec("card_fraud")  # 3 epochs on small data may not clear the real floor
    loose = card.model_copy(update={"overrides": spec.OverridesSpec(allow=["gate.floors"])})
    policy = stages.run_policy({"gate_floor": 0.6}, spec=loose)
    gated = stages.gate_promotion(ctx, registered, policy=policy, resamples=200)
    stages.promote_champion(ctx, gated)
    assert registry.alias_version(registry.CHAMPION) is not None, gated.summary
    # every decision the run made is under one path on its MLflow run, and replays from there
    from pipeline import decisions

    rid = ingested.mlflow_run_id
    logged = {a.path for a in registry.client().list_artifacts(rid, "records/decisions")}
    assert {"records/decisions/retrain.json", "records/decisions/promotion_gate_decision.json"} <= (
        logged
    )
    for path in sorted(p for p in logged if p.endswith(".json")):
        record = json.loads(registry.read_artifact(f"runs:/{rid}/{path}"))
        assert decisions.replays(record, load=registry.read_artifact), path
    return pipeline_home


def test_clean_skips_drift_and_concept_drift_retrain(champion: Path) -> None:
    # 1. same world: nothing moved — a skip, with its reasons
    drifted, decision = decide(champion, "clean", WorldSpec(rows=ROWS, seed=2))
    assert decision.verdict == "skip", decision.summary
    assert decision.reasons == ["nothing_changed"]
    assert "no dataset drift" in decision.message and "margin" in decision.message
    assert not drifted.dataset_drift and not drifted.label_drifted
    run = registry.client().get_run(decision.mlflow_run_id)
    assert run.data.tags["stage.decide_retrain.verdict"] == "skip"
    assert run.data.tags["retrain.reasons"] == "nothing_changed"
    # the decision replays from the record the stage logged (python -m pipeline decision replay)
    from pipeline import decisions
    from pipeline.cli import main

    record = json.loads(registry.read_artifact(decision.record_uri))
    assert record["inputs"]["evidence"]["drift_share"] == drifted.drift_share
    assert decisions.replays(record)
    assert main(["decision", "replay", decision.record_uri]) == 0
    record["rule"]["decay_margin"] = 0.0  # a looser record would have decided otherwise
    assert not decisions.replays(record)

    # 1b. the same clean world, in a run the monitor started because the served champion
    # decayed on live labels: it retrains, and says why; an event for another model, or a run
    # given its own batch, is not the monitor's
    ctx = stages.RunContext(dag_id="test", run_id="decayed", run_after=NOW)
    event = {"trigger": "champion_decaying", "model": "card_fraud", "champion_version": "1",
             "summary": "live roc_auc 0.61 vs 0.90 at the gate"}  # fmt: skip
    why = stages.production_decay([{"trigger": "champion_decaying", "model": "x"}, event], None)
    assert why == "v1: live roc_auc 0.61 vs 0.90 at the gate"
    assert stages.production_decay([event], "file:///explicit.parquet") is None
    assert stages.production_decay([{**event, "model": "digits"}, "junk"], None) is None
    redo = stages.decide_retrain(ctx, drifted, production_decay=why)
    assert redo.verdict == "train" and redo.reasons == ["production_decay"], redo.summary
    assert "decayed" in redo.message and "0.61" in redo.message
    assert decisions.replays(json.loads(registry.read_artifact(redo.record_uri)))

    # 2. covariate shift: the features moved — retrain for drift
    drifted, decision = decide(
        champion, "shifted", WorldSpec(rows=ROWS, seed=3, covariate_shift=1.0)
    )
    assert decision.verdict == "train"
    assert "dataset_drift" in decision.reasons, decision.summary
    assert "amount" in drifted.drifted_columns
    run = registry.client().get_run(decision.mlflow_run_id)
    assert run.data.metrics["retrain.decision"] == 1.0
    assert run.data.metrics["drift.drifted.amount"] == 1.0

    # 3. concept drift: same features, new labelling — only the champion's score reveals it
    drifted, decision = decide(
        champion, "concept", WorldSpec(rows=ROWS, seed=4, concept_drift=1.0, covariate_shift=0.0)
    )
    assert not drifted.dataset_drift, drifted.summary
    assert decision.verdict == "train"
    assert decision.reasons == ["performance_decay"], decision.summary
    assert drifted.champion_metric_on_batch < drifted.champion_metric_at_promotion - 0.03
