"""The same train_model in one process or many: ``PIPELINE_TRAIN_PROCESSES=2`` makes the stage
launch ``torchrun --standalone`` (two ranks, DistributedDataParallel over gloo on this CPU),
rank 0 publishes, and the result matches a one-process run of the same data and config."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline import checkpoint, registry, settings, stages, storage
from pipeline.data.generate import WorldSpec, generate, to_parquet_bytes
from pipeline.train import distributed

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ARGS = {"max_epochs": 4, "batch_size": 256, "seed": 5, "learning_rate": 3e-3}


def _weights(uri: str, tmp) -> dict[str, torch.Tensor]:
    local = checkpoint.fetch(uri, tmp)
    assert checkpoint.verify_checkpoint(local).intact
    from safetensors.torch import load_file

    return load_file(str(local / "model.safetensors"))


def test_two_processes_train_like_one_and_rank_0_alone_publishes(
    pipeline_home, tmp_path, monkeypatch
):
    root = settings.get_settings().storage_root
    batch = storage.write_bytes(
        f"{root}/landing/card_fraud/ddp.parquet",
        to_parquet_bytes(generate(WorldSpec(rows=6000, seed=21))),
    ).uri
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    one_ctx = stages.RunContext(dag_id="ddp", run_id="one")
    one = stages.train_model(one_ctx, stages.ingest_batch(one_ctx, batch), **ARGS)

    monkeypatch.setenv("PIPELINE_TRAIN_PROCESSES", "2")
    settings.get_settings.cache_clear()
    two_ctx = stages.RunContext(dag_id="ddp", run_id="two")
    ingested = stages.ingest_batch(two_ctx, batch)
    two = stages.train_model(two_ctx, ingested, **ARGS)

    assert (one.world_size, two.world_size) == (1, 2)
    assert "x2 processes" in two.summary
    # the same global batches: the same number of steps per epoch, the same stopping point
    assert two.steps == one.steps and two.stop_reason == one.stop_reason, (one, two)
    assert abs(two.val_metrics["roc_auc"] - one.val_metrics["roc_auc"]) < 0.01, (one, two)
    w1, w2 = (
        _weights(one.checkpoint_uri, tmp_path / "one"),
        _weights(two.checkpoint_uri, tmp_path / "two"),
    )
    assert w1.keys() == w2.keys()
    drift = max(float((w1[k].float() - w2[k].float()).abs().max()) for k in w1)
    print(
        f"\nDDP x2 vs one process: {two.steps} steps each, max |weight difference| {drift:.2e}, "
        f"val roc_auc {two.val_metrics['roc_auc']:.4f} vs {one.val_metrics['roc_auc']:.4f}"
    )
    assert drift < 0.2  # dropout masks and summation order differ; the training does not

    # one MLflow run for the DAG run, written by rank 0 only, and it says how it trained
    run = registry.client().get_run(ingested.mlflow_run_id)
    assert run.data.params["train.world_size"] == "2"
    assert run.data.tags["stage.train_model.verdict"] == "trained"
    runs = registry.client().search_runs(
        [registry.experiment_id()],
        filter_string=f"tags.`{registry.RUN_KEY_TAG}` = '{two_ctx.run_key}'",
    )
    assert len(runs) == 1
    published = json.loads(storage.read_text(f"{two.checkpoint_uri}/manifest.json"))
    assert published["training"]["steps"] == two.steps


def test_a_small_last_batch_is_dropped_only_when_a_rank_would_get_nothing():
    one, two, four = distributed.Ranks(), distributed.Ranks(0, 2), distributed.Ranks(3, 4)
    assert distributed.steps_per_epoch(1000, 256, one) == 4  # ceil: the 232-row batch is kept
    assert distributed.steps_per_epoch(1025, 256, two) == 4  # 1 row left: one rank would get none
    assert distributed.steps_per_epoch(1026, 256, two) == 5
    idx = torch.arange(10)
    assert distributed.shard(idx, one).tolist() == list(range(10))
    assert distributed.shard(idx, two).tolist() == [0, 2, 4, 6, 8]
    assert distributed.shard(idx, four).tolist() == [3, 7]
