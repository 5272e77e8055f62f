"""Training: learns the signal, reproducible, resumable, multi-class, fails loudly on divergence."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.contract import Column, DataContract
from pipeline.data.generate import WorldSpec, generate
from pipeline.evaluate import evaluate_model
from pipeline.metrics import classification_metrics
from pipeline.train.features import FeatureSpec, fit_features, labels, transform
from pipeline.train.loop import (
    TrainConfig,
    TrainingDiverged,
    no_stopper,
    split_by_id,
    train,
)
from pipeline.train.model import predict_proba
from pipeline.train.schedule import LRSchedule
from pipeline.train.stopping import StopReason

STOP_REASONS = {r.value for r in StopReason} | {"max_epochs"}
FAST = {"telemetry": False, "state_every": 0}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A small MLP gains nothing from intra-op threads, and on a shared 2-core runner they
    make timings swing tenfold; results do not depend on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    return generate(WorldSpec(rows=8000, seed=21)), generate(WorldSpec(rows=4000, seed=22))


def val_loss_of(result, df, contract, cfg) -> float:
    val = df[split_by_id(df[contract.id_column], cfg.val_fraction)]
    x = torch.from_numpy(transform(val, result.features))
    return classification_metrics(
        labels(val, result.features), predict_proba(result.model, x).numpy()
    )["log_loss"]


def test_learns_the_signal_and_restores_the_best_weights(contract, data):
    train_df, holdout = data
    cfg = TrainConfig(max_epochs=15, seed=0, **FAST)
    r = train(train_df, contract, cfg)
    assert r.stop_reason in STOP_REASONS
    assert 1 <= r.best_epoch <= len(r.history) and r.device == "cpu" and r.precision == "fp32"
    assert evaluate_model(r.model, r.features, holdout)["roc_auc"] > 0.72
    assert {"val_log_loss", "val_roc_auc", "val_pr_auc", "train_loss", "grad_norm", "lr"} <= set(
        r.history[0]
    )
    best = min(h["val_log_loss"] for h in r.history)
    assert val_loss_of(r, train_df, contract, cfg) == pytest.approx(best, abs=1e-6)
    assert r.decision_trace and r.steps == r.history[-1]["step"]


def test_same_seed_same_weights(contract, data):
    a = train(data[0], contract, TrainConfig(max_epochs=2, seed=5, **FAST))
    b = train(data[0], contract, TrainConfig(max_epochs=2, seed=5, **FAST))
    c = train(data[0], contract, TrainConfig(max_epochs=2, seed=6, **FAST))
    for k, v in a.model.state_dict().items():
        assert np.array_equal(v.numpy(), b.model.state_dict()[k].numpy())
    assert any(not torch.equal(v, c.model.state_dict()[k]) for k, v in a.model.state_dict().items())


@pytest.mark.parametrize(
    ("optimizer", "schedule", "extra"),
    [
        ("sgd", "step", {"momentum": 0.9, "lr_step_every": 20, "warmup_steps": 0}),
        ("sgd", "cosine", {"nesterov": True}),
        ("adamw", "constant", {"grad_clip": None}),
    ],
)
def test_optimizers_and_schedules_train(contract, data, optimizer, schedule, extra):
    lr = 0.05 if optimizer == "sgd" else 3e-3
    r = train(
        data[0],
        contract,
        TrainConfig(
            max_epochs=4,
            optimizer=optimizer,
            lr_schedule=schedule,
            learning_rate=lr,
            stopper=no_stopper(),
            **FAST,
            **extra,
        ),
    )
    assert r.stop_reason == "max_epochs" and len(r.history) == 4
    assert r.val_metrics["roc_auc"] > 0.65
    if schedule == "step":
        assert r.history[-1]["lr"] < lr  # decayed


@pytest.mark.parametrize(
    ("kind", "step", "expected"),
    [
        ("cosine", 5, 0.5),
        ("cosine", 10, 1.0),
        ("cosine", 110, 0.1),
        ("cosine", 60, 0.55),
        ("step", 30, 1.0),
        ("step", 31, 0.5),
        ("step", 51, 0.25),
        ("constant", 99, 1.0),
    ],
)
def test_lr_schedule_warmup_then_decay(kind, step, expected):
    s = LRSchedule(
        1.0, total_steps=110, warmup_steps=10, kind=kind, min_lr_ratio=0.1, step_every=20, gamma=0.5
    )
    assert s.lr(step) == pytest.approx(expected)
    s.scale = 0.5
    assert s.lr(step) == pytest.approx(expected * 0.5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"learning_rate": 0}, "learning_rate"),
        ({"optimizer": "adam"}, "optimizer"),
        ({"lr_schedule": "linear"}, "lr_schedule"),
        ({"precision": "fp8"}, "precision"),
        ({"grad_clip": 0}, "grad_clip"),
        ({"batch_size": 1}, "batch_size"),
        ({"stopper": {"val_mode": "sometimes"}}, "val_mode"),
        ({"check_every": 0}, "check_every"),
        ({"eb_every": 0}, "eb_every"),
    ],
)
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


# -- multi-class from the contract ---------------------------------------------------------


def three_class_world(rows: int, seed: int) -> tuple[pd.DataFrame, DataContract]:
    rng = np.random.default_rng(seed)
    x1, x2 = rng.normal(size=rows), rng.normal(size=rows)
    shape = rng.choice(["round", "square", "flat"], rows)
    score = np.stack([x1 + (shape == "round"), x2 + (shape == "square"), -x1 - x2], axis=1)
    y = (score + rng.gumbel(size=score.shape)).argmax(axis=1) + 1  # classes 1, 2, 3
    df = pd.DataFrame(
        {
            "id": [f"r{i}" for i in range(rows)],
            "ts": pd.Timestamp("2026-01-01", tz="UTC") + pd.to_timedelta(np.arange(rows), "s"),
            "x1": x1,
            "x2": x2,
            "shape": shape,
            "label": y,
        }
    )
    contract = DataContract(
        name="three_class",
        id_column="id",
        time_column="ts",
        target="label",
        target_values=(1, 2, 3),
        positive_label=3,
        columns=(
            Column("id", "string", unique=True),
            Column("ts", "timestamp"),
            Column("x1", "float"),
            Column("x2", "float"),
            Column("shape", "category", categories=("round", "square", "flat")),
            Column("label", "int", min=1, max=3),
        ),
    )
    return df, contract


def test_multi_class_from_the_contract():
    df, contract = three_class_world(6000, seed=3)
    r = train(df, contract, TrainConfig(max_epochs=8, seed=1, **FAST))
    assert r.model(torch.zeros(1, r.features.width)).shape[1] == 3 and r.features.classes == [
        1,
        2,
        3,
    ]
    assert r.val_metrics["roc_auc"] > 0.75  # one-vs-rest macro
    assert "pr_auc" not in r.val_metrics  # PR AUC is reported for binary targets only
    holdout, _ = three_class_world(2000, seed=4)
    proba = predict_proba(r.model, torch.from_numpy(transform(holdout, r.features))).numpy()
    assert proba.shape == (2000, 3) and np.allclose(proba.sum(1), 1, atol=1e-5)
    assert (proba.argmax(1) == labels(holdout, r.features)).mean() > 0.5


# -- features ------------------------------------------------------------------------------


def test_feature_spec_json_round_trip_keeps_layout(contract, data):
    """JSON with sorted keys once reordered categorical blocks; the layout must survive."""
    spec = fit_features(data[0], contract)
    again = FeatureSpec.from_dict(json.loads(json.dumps(spec.to_dict(), sort_keys=True)))
    assert again == spec
    assert np.array_equal(transform(data[1], again), transform(data[1], spec))


def test_unknown_category_and_missing_values_do_not_crash(contract, data):
    spec = fit_features(data[0], contract)
    df = data[1].head(10).copy()
    df.loc[df.index[0], "channel"] = "never-seen"
    df.loc[df.index[1], "amount"] = np.nan
    x = transform(df, spec)
    assert np.isfinite(x).all()
    assert x.shape == (10, spec.width)


# -- resume, tracking, divergence -------------------------------------------------------------


def test_resume_from_a_mid_epoch_state_gives_the_same_weights(contract, data, tmp_path):
    cfg = TrainConfig(
        max_epochs=4, seed=3, state_every=7, check_every=5, snapshot_every=6, batch_size=256
    )
    full = train(data[0], contract, cfg, state_dir=tmp_path / "a")
    states = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert states[-1].endswith("-final") and len(states) == 2  # keeps the last two
    mid = tmp_path / "a" / states[0]
    step = int(states[0].split("-")[1])
    assert step % 25 != 0  # 25 steps per epoch: a mid-epoch state
    shutil.copytree(mid, tmp_path / "b" / mid.name)
    again = train(data[0], contract, cfg, state_dir=tmp_path / "b")
    assert again.resumed_from["step"] == step and again.resumed_from["position_in_epoch"] > 0
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k]), k
    assert again.stop_reason == full.stop_reason and again.steps == full.steps
    assert [d["reason"] for d in again.decision_trace] == [d["reason"] for d in full.decision_trace]
    # a finished state is returned as is, without training again
    done = train(data[0], contract, cfg, state_dir=tmp_path / "a")
    assert done.resumed_from["step"] == full.steps
    # another configuration does not resume a foreign state
    other = train(
        data[0],
        contract,
        TrainConfig(**{**cfg.to_dict(), "factory_kwargs": {"hidden": [16]}, "max_epochs": 1}),
        state_dir=tmp_path / "b",
    )
    assert other.resumed_from is None


class FakeSink:
    def __init__(self, down: bool = False) -> None:
        self.down = down
        self.tags: dict[str, str] = {}
        self.texts: dict[str, str] = {}
        self.artifacts: list[str] = []
        self.metrics: list[tuple[int, dict[str, float]]] = []

    def _maybe_fail(self) -> None:
        if self.down:
            raise ConnectionError("tracking server unreachable")

    def log_metrics(self, metrics, step):
        self._maybe_fail()
        self.metrics.append((step, metrics))

    def log_artifacts(self, local_dir, artifact_path):
        self._maybe_fail()
        self.artifacts.append(artifact_path)

    def log_text(self, text, artifact_file):
        self._maybe_fail()
        self.texts[artifact_file] = text

    def set_tags(self, tags):
        self._maybe_fail()
        self.tags.update(tags)


@pytest.mark.parametrize("down", [False, True], ids=["tracking-up", "tracking-down"])
def test_tracking_gets_tags_trace_and_telemetry_and_its_outage_is_not_fatal(
    contract, data, down, tmp_path
):
    sink = FakeSink(down=down)
    r = train(
        data[0],
        contract,
        TrainConfig(max_epochs=3, snapshot_every=10, state_every=0),
        sink=sink,
        state_dir=None,
    )
    assert r.telemetry["snapshots"] >= 3
    if not down:
        assert sink.tags["train.device"] == "cpu" and sink.tags["train.precision"] == "fp32"
        trace = json.loads(sink.texts["training/decision_trace.json"])
        assert trace["decisions"] == r.decision_trace and trace["config"]["eb"] is True
        assert "telemetry/final" in sink.artifacts
        assert r.telemetry["sent"] == len(
            [m for m in sink.metrics if "grad/net.0.weight/l2" in m[1]]
        )
    else:
        accounted = r.telemetry["sent"] + r.telemetry["spilled"] + r.telemetry["in_flight_at_close"]
        assert r.telemetry["sent"] == 0 and accounted >= r.telemetry["snapshots"]
        assert json.loads(open(r.telemetry["decision_trace_file"]).read())["decisions"]
        assert r.telemetry["artifacts"][-1]["local_dir"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"grad_clip": 5.0},
            r"gradient norm .* exceeded 1000 x the lowest norm seen, .* at step \d+",
        ),
        ({"grad_clip": None}, r".*(non-finite|exceeded).* at step \d+"),
    ],
)
def test_exploding_learning_rate_raises_with_the_step(contract, data, kwargs, match):
    cfg = TrainConfig(max_epochs=10, learning_rate=100.0, optimizer="sgd", **FAST, **kwargs)
    with pytest.raises(TrainingDiverged, match="training diverged: " + match) as err:
        train(data[0], contract, cfg)
    assert "lower the learning rate" in str(err.value) and "no checkpoint was written" in str(
        err.value
    )


def test_diverging_train_model_fails_the_task_and_registers_nothing(pipeline_home):
    from pipeline import registry, stages, storage
    from pipeline.data.generate import to_parquet_bytes
    from pipeline.errors import PipelineRejection
    from pipeline.settings import get_settings

    root = get_settings().storage_root
    batch = storage.write_bytes(
        f"{root}/landing/card_fraud/b.parquet",
        to_parquet_bytes(generate(WorldSpec(rows=5000, seed=7))),
    ).uri
    ctx = stages.RunContext(dag_id="t", run_id="diverge")
    ingested = stages.ingest_batch(ctx, batch)
    with pytest.raises(PipelineRejection, match=r"training diverged: gradient norm .* at step \d+"):
        stages.train_model(ctx, ingested, learning_rate=100.0, optimizer="sgd", max_epochs=10)
    assert storage.list_uris(f"{root}/checkpoints/") == []
    c = registry.client()
    assert c.search_model_versions(f"name = '{registry.model_name()}'") == []
    run = c.get_run(ingested.mlflow_run_id)
    assert run.data.tags["stage.train_model.verdict"] == "diverged"
    assert "diverged" in run.data.tags["stage.train_model.summary"]
    arts = {a.path for a in c.list_artifacts(run.info.run_id, "telemetry")}
    assert any(p.startswith("telemetry/diverged-step-") for p in arts)


def test_nonfinite_history_never_reaches_best_weights(contract, data):
    r = train(data[0], contract, TrainConfig(max_epochs=2, **FAST))
    assert all(math.isfinite(h["val_log_loss"]) for h in r.history)
    assert all(torch.isfinite(v).all() for v in r.model.state_dict().values())


def test_accelerator_bookkeeping_path_matches_the_host_path(contract, data, monkeypatch):
    """On CUDA/MPS loss and norm are accumulated on the device and read once per check; run
    that code path on the CPU and compare with the per-step host path."""
    from pipeline.train import loop

    cfg = TrainConfig(max_epochs=3, seed=4, check_every=8, eb_every=16, **FAST)
    host = train(data[0], contract, cfg)

    class DeviceMode(loop._Accumulator):
        def __init__(self, device):
            self.host, self.device = False, device
            self.reset_check()
            self.reset_epoch()

    monkeypatch.setattr(loop, "_Accumulator", DeviceMode)
    dev = train(data[0], contract, cfg)
    for k, v in host.model.state_dict().items():
        assert torch.equal(v, dev.model.state_dict()[k]), k
    assert [d["reason"] for d in dev.decision_trace] == [d["reason"] for d in host.decision_trace]
    for a, b in zip(host.decision_trace, dev.decision_trace, strict=True):
        for key in ("grad_norm", "max_grad_norm", "eb_smoothed"):
            if a["evidence"].get(key) is not None:
                assert b["evidence"][key] == pytest.approx(a["evidence"][key], rel=1e-5), key
    with pytest.raises(TrainingDiverged, match="non-finite|exceeded"):
        train(
            data[0],
            contract,
            TrainConfig(
                max_epochs=10,
                learning_rate=100.0,
                optimizer="sgd",
                grad_clip=None,
                check_every=4,
                **FAST,
            ),
        )


def test_bf16_autocast_path_trains(contract, data):
    r = train(
        data[0],
        contract,
        TrainConfig(
            max_epochs=2,
            precision="bf16",
            check_every=4,
            eb_every=4,
            stopper={"warmup_steps": 0},
            **FAST,
        ),
    )
    assert r.precision == "bf16" and math.isfinite(r.val_metrics["log_loss"])
    assert any(d["evidence"].get("eb_fresh") for d in r.decision_trace)


# -- the validation cadence: validations within epochs ---------------------------------------


@pytest.mark.parametrize(
    ("check_every", "validate_every", "steps_per_epoch", "expected"),
    [
        (32, 0, 31, 31),  # the pipeline's check cadence on a 31-batch epoch: once an epoch
        (2, 0, 11, 3),  # small data: the check cadence, but at most 4 times an epoch
        (3, 0, 15, 4),
        (2, 0, 4, 2),  # the check cadence itself
        (7, 0, 200, 50),  # long epochs: at most 4 times an epoch
        (2, -1, 11, 11),  # -1: once an epoch, the classic
        (2, 5, 3, 3),  # an explicit cadence, at most an epoch
    ],
)
def test_the_validation_cadence_follows_the_checks_within_bounds(
    check_every, validate_every, steps_per_epoch, expected
):
    from pipeline.train.loop import validation_cadence

    cfg = TrainConfig(check_every=check_every, validate_every=validate_every)
    assert validation_cadence(cfg, steps_per_epoch) == expected


def _validation_steps(result) -> list[int]:
    return [d["step"] for d in result.decision_trace if d["evidence"].get("kind") == "validation"]


def test_validations_within_epochs_keep_the_best_weights_and_feed_the_stopper(contract, data):
    cfg = TrainConfig(max_epochs=2, validate_every=5, stopper=no_stopper(), seed=4, **FAST)
    r = train(data[0], contract, cfg)
    spe = int(r.history[0]["step"])  # batches in an epoch
    assert spe > 10
    expected = [5, 10, spe, spe + 5, spe + 10, 2 * spe]
    assert _validation_steps(r) == expected and r.validations == 6
    losses = {
        d["step"]: d["evidence"]["val_loss"]
        for d in r.decision_trace
        if d["evidence"].get("kind") == "validation"
    }
    best = min(losses, key=losses.get)
    assert r.best_step == best
    assert val_loss_of(r, data[0], contract, cfg) == pytest.approx(losses[best], rel=1e-5)
    # once an epoch, the classic: one validation per epoch end
    once = train(data[0], contract, TrainConfig(**{**cfg.to_dict(), "validate_every": -1}))
    assert _validation_steps(once) == [spe, 2 * spe] and once.validations == 2


def test_a_stop_at_a_validation_within_an_epoch_is_not_validated_twice(contract, data):
    """Patience 1 epoch of 3 validations, and nothing counts as a gain: the stop comes at the
    4th validation, mid-epoch 2; the partial epoch's history row reuses that validation."""
    from pipeline.train.loop import val_patience_stopper

    cfg = TrainConfig(
        max_epochs=3,
        validate_every=5,
        stopper=val_patience_stopper(patience=1, min_delta=10.0),
        **FAST,
    )
    r = train(data[0], contract, cfg)
    spe = int(r.history[0]["step"])
    assert r.stop_reason == "val_loss_plateau" and r.steps == spe + 5
    assert r.validations == 4 and len(r.history) == 2 and r.history[-1]["partial"] == 1.0
    assert r.decision_trace[-1]["evidence"]["patience_validations"] == 3


def test_resume_with_validations_within_epochs_gives_the_same_run(contract, data, tmp_path):
    cfg = TrainConfig(max_epochs=2, seed=5, validate_every=4, state_every=9, batch_size=512)
    full = train(data[0], contract, cfg, state_dir=tmp_path / "a")
    mid = sorted((tmp_path / "a").iterdir())[0]
    shutil.copytree(mid, tmp_path / "b" / mid.name)
    again = train(data[0], contract, cfg, state_dir=tmp_path / "b")
    assert again.resumed_from["position_in_epoch"] > 0
    assert (again.validations, again.best_step) == (full.validations, full.best_step)
    assert _validation_steps(again) == _validation_steps(full)
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k]), k


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"validate_every": -2}, "validate_every must be a number of batches"),
        ({"stopper": {"val_per_epoch": 2}}, "set TrainConfig.validate_every instead"),
    ],
)
def test_a_bad_validation_cadence_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)
