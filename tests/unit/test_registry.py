"""Registry on a real MLflow SQLite store: idempotent registration, compare-and-set champion
under a storage lock, models from code (no pickle), the gate record, human rejection."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from _records import gated_record

from pipeline import locks, registry, storage

pytestmark = pytest.mark.usefixtures("mlflow_store")  # each test its own migrated store


@pytest.fixture
def run_id(pipeline_home):
    return registry.get_or_create_run("dag__run1", {"airflow.dag_id": "dag"})


def _versions(n: int) -> list[str]:
    out = []
    for i in range(n):
        rid = registry.get_or_create_run(f"dag__v{i}")
        out.append(registry.register_version(rid, f"dag__v{i}", f"file:///ck/{i}", {}, ""))
    return out


def _aliases() -> tuple[str | None, str | None]:
    c, p = registry.alias_version(registry.CHAMPION), registry.alias_version(registry.PREVIOUS)
    return (str(c.version) if c else None, str(p.version) if p else None)


def test_run_is_found_again_by_run_key(run_id):
    assert registry.get_or_create_run("dag__run1") == run_id
    assert registry.get_or_create_run("dag__run2") != run_id


def test_register_is_idempotent_per_run_key(run_id):
    v1 = registry.register_version(run_id, "dag__run1", "file:///ck/a", {"x": 1}, "d")
    v2 = registry.register_version(run_id, "dag__run1", "file:///ck/a", {"x": 1}, "d")
    assert v1 == v2 == "1"
    assert registry.find_version(run_id, "dag__run1") == "1"
    assert registry.find_version(run_id, "dag__other") is None


def test_promote_compare_and_set(pipeline_home):
    v1, v2, v3 = _versions(3)
    assert registry.promote_champion(v1, expected_champion=None) is None
    assert _aliases() == ("1", None)
    # a decision that saw no champion must not move it now that v1 serves
    with pytest.raises(registry.RegistryConflict, match="champion is v1, .* against no champion"):
        registry.promote_champion(v2, expected_champion=None)
    assert _aliases() == ("1", None)  # nothing changed
    assert registry.promote_champion(v2, expected_champion=v1) == v1
    assert _aliases() == ("2", "1")
    # retrying the same promotion is a no-op
    assert registry.promote_champion(v2, expected_champion=v1) == v1
    assert _aliases() == ("2", "1")
    # a stale decision (compared against v1) loses cleanly
    with pytest.raises(registry.RegistryConflict, match="champion is v2"):
        registry.promote_champion(v3, expected_champion=v1)
    assert _aliases() == ("2", "1")
    assert registry.promote_champion(v3, expected_champion=v2) == v2
    assert _aliases() == ("3", "2")  # previous_champion always names the replaced version
    assert not storage.exists(registry.champion_lock_uri())  # the lock was released


def test_conflict_is_a_rejection_that_fails_without_retries():
    from pipeline.errors import PipelineRejection

    assert issubclass(registry.RegistryConflict, PipelineRejection)


def test_promotion_waits_for_a_held_lock_and_never_writes_without_it(pipeline_home):
    (v1,) = _versions(1)
    uri = registry.champion_lock_uri()
    with locks.storage_lock(uri, purpose="someone else"):
        t0 = time.monotonic()
        with pytest.raises(locks.LockTimeout, match="someone else"):
            registry.promote_champion(v1, None, lock_timeout=0.3)
        assert time.monotonic() - t0 >= 0.3
        assert _aliases() == (None, None)
    assert registry.promote_champion(v1, None) is None  # released: goes through


def test_a_stale_lock_is_broken(pipeline_home):
    (v1,) = _versions(1)
    dead = {
        "owner": "dead",
        "host": "h",
        "pid": 1,
        "purpose": "crashed",
        "acquired_at": time.time() - 3600,
        "stale_after_s": 120,
    }
    storage.write_bytes(registry.champion_lock_uri(), json.dumps(dead).encode())
    assert registry.promote_champion(v1, None, lock_timeout=5) is None
    assert _aliases() == ("1", None)


def test_reject_version_drops_challenger_alias_only_from_itself(pipeline_home):
    v1, v2 = _versions(2)
    registry.set_alias(registry.CHALLENGER, v2)
    registry.reject_version(v1, ["not better"])
    assert str(registry.alias_version(registry.CHALLENGER).version) == v2
    registry.reject_version(v2, ["below floor"], {"gate.verdict": "reject"})
    assert registry.alias_version(registry.CHALLENGER) is None
    tags = registry.client().get_model_version(_name(), v2).tags
    assert tags["rejected"] == "true" and tags["rejection_reason"] == "below floor"
    assert tags["gate.verdict"] == "reject"


def _name() -> str:
    return registry.model_name()


def _policy(**requested):
    """A run's policy for these tests: the card_fraud spec, with the floor and the
    evaluation set opened to overrides (untrained models cannot clear the real floor)."""
    from pipeline import spec as specs
    from pipeline import stages

    card = specs.get_spec("card_fraud")
    loose = card.model_copy(
        update={"overrides": specs.OverridesSpec(allow=["gate.floors", "evaluation.uri"])}
    )
    return stages.run_policy(requested, spec=loose)


# -- models from code, the gate record, human approval -----------------------------------------


@pytest.fixture
def world(pipeline_home, contract, tmp_path):
    """Two small checkpoints in storage and a trusted evaluation set (untrained models:
    the registry does not care how good they are)."""
    import torch

    from pipeline import checkpoint
    from pipeline.data.generate import WorldSpec, generate, to_parquet_bytes
    from pipeline.settings import get_settings
    from pipeline.train.features import fit_features
    from pipeline.train.model import MLP, ModelConfig

    root = get_settings().storage_root
    df = generate(WorldSpec(rows=2000, seed=5))
    eval_uri = storage.write_bytes(f"{root}/trusted/eval.parquet", to_parquet_bytes(df)).uri
    spec = fit_features(df, contract)
    ckpts = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        local = tmp_path / f"ck{seed}"
        checkpoint.save_checkpoint(
            local,
            MLP(ModelConfig(spec.width, 2)),
            spec,
            df.head(32),
            data_snapshot={"uri": eval_uri, "sha256": "x"},
            training={"stop_reason": "max_epochs"},
        )
        digest = checkpoint.manifest_digest(local)
        uri = storage.join(root, "checkpoints", digest[:24])
        checkpoint.publish(local, uri)
        ckpts.append(
            {
                "verdict": "trained",
                "steps": 1,
                "checkpoint_uri": uri,
                "manifest_sha256": digest,
                "stop_reason": "max_epochs",
                "epochs": 1,
                "best_epoch": 1,
                "device": "cpu",
                "final_grad_norm": 0.25,
            }
        )
    return {"eval_uri": eval_uri, "df": df, "trained": ckpts}


def _register(world, i: int):
    from pipeline import stages

    ctx = stages.RunContext(dag_id="retrain_model", run_id=f"manual__{i}")
    rid = registry.get_or_create_run(ctx.run_key)
    ingested = {
        "verdict": "ok",
        "mlflow_run_id": rid,
        "uri": world["eval_uri"],
        "sha256": "f" * 64,
        "source_uri": world["eval_uri"],
        "rows": 2000,
    }
    tr = world["trained"][i]
    return ctx, stages.register_challenger(
        ctx,
        ingested,
        tr,
        {
            "verdict": "intact",
            "checkpoint_uri": tr["checkpoint_uri"],
            "manifest_sha256": tr["manifest_sha256"],
        },
    )


def test_registered_version_is_a_model_from_code_without_pickle(world):
    import mlflow

    from pipeline.evaluate import predict_frame
    from pipeline.train.features import FeatureSpec

    ctx, reg = _register(world, 0)
    v = reg.model_version
    mv = registry.client().get_model_version(_name(), v)
    assert mv.source.startswith("models:/m-")
    assert "challenger" in mv.aliases
    tags = mv.tags
    assert tags["checkpoint.manifest_sha256"] == world["trained"][0]["manifest_sha256"]
    assert tags["checkpoint.signature"].startswith("verified Ed25519 key local-")
    assert tags["train.stop_reason"] == "max_epochs" and tags["train.final_grad_norm"] == "0.25"
    assert tags["airflow.dag_id"] == "retrain_model" and tags["airflow.run_id"] == "manual__0"
    for key in (
        "data.snapshot_uri",
        "data.snapshot_sha256",
        "validation.verdict",
        "drift.verdict",
        "code.version",
        "checkpoint.bytes",
    ):
        assert tags[key], key

    local = Path(mlflow.artifacts.download_artifacts(mv.source))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".pth", ".cloudpickle"))]
    assert {
        "serving_model.py",
        "input_example.json",
        "artifacts/checkpoint/model.safetensors",
        "artifacts/checkpoint/manifest.sig",
    } <= files
    flavor = mlflow.models.Model.load(local / "MLmodel").flavors["python_function"]
    assert flavor["model_code_path"].endswith("serving_model.py") and "python_model" not in flavor

    model = mlflow.pyfunc.load_model(f"models:/{_name()}/{v}")
    sig = model.metadata.signature
    assert [c.name for c in sig.inputs.inputs][:3] == ["amount", "card_age_days", "hour"]
    assert [c.name for c in sig.outputs.inputs] == ["proba_0", "proba_1"]
    rows = world["df"].head(20)
    from pipeline import checkpoint

    m, spec, _ = checkpoint.load_for_inference(world["trained"][0]["checkpoint_uri"])
    assert isinstance(spec, FeatureSpec)
    got = model.predict(rows[spec.input_columns])
    want = predict_frame(m, spec, rows[spec.input_columns])
    assert got.columns.tolist() == want.columns.tolist()
    assert abs(got.to_numpy() - want.to_numpy()).max() < 1e-6
    # a retry registers nothing new
    assert _register(world, 0)[1].model_version == v


def test_gate_record_in_mlflow_replays_and_rejection_is_tagged(world):
    import mlflow

    from pipeline import gates, stages

    ctx0, reg0 = _register(world, 0)
    g0 = stages.gate_promotion(
        ctx0, reg0, policy=_policy(gate_floor=0.0, eval_uri=world["eval_uri"]), resamples=200
    )
    assert g0.verdict == "promote" and g0.reason == "no_champion_floors_met"
    # every override the run used is on the version, with the spec's value and the run's
    used = json.loads(
        registry.client().get_model_version(_name(), reg0.model_version).tags["policy.overrides"]
    )
    assert {(o["param"], o["kind"]) for o in used} == {
        ("gate_floor", "loosen_allowed"),
        ("eval_uri", "loosen_allowed"),
    }
    assert next(o for o in used if o["param"] == "gate_floor")["spec"] == 0.7
    tags0 = registry.client().get_model_version(_name(), reg0.model_version).tags
    assert tags0["approval.required"] == "false"  # what serving reads before serving it
    assert stages.promote_champion(ctx0, g0).verdict == "promoted"

    ctx1, reg1 = _register(world, 1)
    g1 = stages.gate_promotion(
        ctx1,
        reg1,
        policy=_policy(gate_floor=0.0, gate_margin=0.05, eval_uri=world["eval_uri"]),
        resamples=200,
    )
    assert g1.champion_version == reg0.model_version
    assert g1.verdict == "reject"  # two untrained models: no 0.05 gain
    assert len(json.dumps(g1.to_xcom(), default=str)) < 20_000  # XCom stays small
    mv = registry.client().get_model_version(_name(), reg1.model_version)
    assert mv.tags["rejected"] == "true" and "champion v1 stays" in mv.tags["rejection_reason"]
    assert mv.tags["gate.champion_version"] == "1" and mv.tags["gate.ci"].startswith("[")
    assert "challenger" not in mv.aliases and "champion" not in mv.aliases
    assert (
        "| metric | champion v1 | challenger | difference | 95% CI | threshold | result |"
        in mv.description
    )
    record = json.loads(Path(mlflow.artifacts.download_artifacts(g1.record_uri)).read_text())
    assert record["champion_version"] == "1"
    assert record["context"]["eval_sha256"] == storage.digest_of(world["eval_uri"])
    # the per-row inputs are a side file named by its digest, not inline
    assert set(record["inputs"]["rows"]) == {"uri", "sha256", "count"}
    assert record["inputs"]["rows"]["count"] == len(world["df"])
    assert len(json.dumps(record)) < 20_000
    with pytest.raises(ValueError, match="per-row inputs"):
        gates.replay(record)  # it says how to read them
    again = gates.replay(record, load=registry.read_artifact)
    assert again.verdict.value == g1.verdict and [r.value for r in again.reasons] == g1.reasons
    assert again.to_dict() == record["decision"]
    from pipeline import decisions

    assert decisions.replays(record, load=registry.read_artifact)
    swapped = lambda uri: registry.read_artifact(uri)[:-1] + b"x"  # noqa: E731
    with pytest.raises(ValueError, match="not the file the gate recorded"):
        gates.replay(record, load=swapped)
    assert stages.promote_champion(ctx1, g1).verdict == "not_promoted"
    assert _aliases()[0] == "1"


@pytest.mark.parametrize(("choice", "promoted"), [("Approve", True), ("Reject", False)])
def test_human_approval(pipeline_home, choice, promoted):
    from pipeline import stages

    (v1,) = _versions(1)
    rid = registry.get_or_create_run("retrain_model__manual__9")
    registry.set_alias(registry.CHALLENGER, v1)
    gated = gated_record(v1, rid)
    approval = {
        "chosen_options": [choice],
        "params_input": {},
        "responded_by_user": {"id": "7", "name": "alice"},
        "responded_at": "2026-01-02T03:04:05+00:00",
    }
    ctx = stages.RunContext(dag_id="retrain_model", run_id="manual__9")
    rec = stages.promote_champion(ctx, gated, approval=approval)
    tags = registry.client().get_model_version(_name(), v1).tags
    assert tags["approval.by"] == "alice"
    if promoted:
        assert rec.verdict == "promoted" and _aliases() == ("1", None)
        assert tags["approval.verdict"] == "approved"
    else:
        assert rec.verdict == "not_promoted" and _aliases() == (None, None)
        assert tags["rejected"] == "true" and tags["approval.verdict"] == "rejected"
        assert tags["rejection_reason"] == "human_rejected: rejected by alice in human review"
        assert registry.alias_version(registry.CHALLENGER) is None
        import mlflow

        rec = json.loads(
            Path(
                mlflow.artifacts.download_artifacts(
                    f"runs:/{rid}/records/decisions/human_approval.json"
                )
            ).read_text()
        )
        assert rec["decision"]["reason"] == "human_rejected"
        assert rec["decision"]["evidence"]["responded_by"] == "alice"
        from pipeline import decisions

        assert decisions.replays(rec)  # the human decision replays from its record


def test_skipped_approval_promotes(pipeline_home):
    from pipeline import stages

    (v1,) = _versions(1)
    rid = registry.get_or_create_run("retrain_model__manual__8")
    gated = gated_record(v1, rid)
    rec = stages.promote_champion(
        stages.RunContext(), gated, approval=None
    )  # approval step skipped
    assert rec.verdict == "promoted" and _aliases() == ("1", None)
