"""The training stages: train the spec's model, then prove the checkpoint is intact."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from pipeline import decisions, registry, storage
from pipeline.errors import CheckpointRejected, PipelineRejection
from pipeline.settings import get_settings
from pipeline.spec import active
from pipeline.stages.context import RunContext, record_stage, write_stage
from pipeline.stages.records import Ingested, Trained, Verified

log = logging.getLogger("pipeline.stages")


def train_config(
    *,
    max_epochs: int | None = None,
    learning_rate: float | None = None,
    seed: int | None = None,
    batch_size: int | None = None,
    optimizer: str | None = None,
) -> Any:
    """The active spec's training defaults and model factory, with the run's choices (within
    the spec's budget: ``spec.check_training_budget``)."""
    from pipeline.spec import check_training_budget
    from pipeline.train.loop import TrainConfig, no_stopper, val_patience_stopper

    spec = active()
    check_training_budget(spec, max_epochs, learning_rate)
    t = spec.training
    stopper: dict[str, Any] = {
        "gradient_plateau": None,
        "val_patience": val_patience_stopper(),
        "none": no_stopper(),
    }[t.stopper.preset] or {}
    kw: dict[str, Any] = {}
    if stopper or t.stopper.options:
        from pipeline.train.loop import default_stopper

        kw["stopper"] = {**(stopper or default_stopper()), **t.stopper.options}
    return TrainConfig(
        max_epochs=max_epochs or t.max_epochs,
        learning_rate=learning_rate or t.learning_rate,
        seed=t.seed if seed is None else seed,
        batch_size=batch_size or t.batch_size,
        optimizer=optimizer or t.optimizer,
        weight_decay=t.weight_decay,
        val_fraction=t.val_fraction,
        factory=spec.model.factory,
        factory_kwargs=dict(spec.model.kwargs),
        device=get_settings().device,
        **kw,
    )


def train_model(
    ctx: RunContext,
    ingested: Ingested,
    *,
    max_epochs: int | None = None,
    learning_rate: float | None = None,
    seed: int | None = None,
    batch_size: int | None = None,
    optimizer: str | None = None,
    state_every: int | None = None,
) -> Trained:
    """Train the spec's model (resuming from this run's last training-state checkpoint, if
    any), then write and publish the signed checkpoint. Diverged training fails here:
    nothing is saved. Unset knobs take the spec's training defaults."""
    import dataclasses
    import shutil

    from pipeline import checkpoint
    from pipeline.ingest import read_frame
    from pipeline.train import distributed
    from pipeline.train import state as train_state
    from pipeline.train.launch import run_under_torchrun
    from pipeline.train.loop import TrainingDiverged, holdout_mask, train
    from pipeline.train.telemetry import MlflowRunSink

    ingested = Ingested.from_xcom(ingested)
    cfg = train_config(
        max_epochs=max_epochs,
        learning_rate=learning_rate,
        seed=seed,
        batch_size=batch_size,
        optimizer=optimizer,
    )
    procs = get_settings().train_processes
    if procs > 1 and "WORLD_SIZE" not in os.environ:  # launch the ranks; this process waits
        out = run_under_torchrun(
            procs,
            str(active().path),
            ingested.to_xcom(),
            dag_id=ctx.dag_id,
            run_id=ctx.run_id,
            run_after=ctx.run_after,
            options={
                "max_epochs": cfg.max_epochs,
                "learning_rate": cfg.learning_rate,
                "seed": cfg.seed,
                "batch_size": cfg.batch_size,
                "optimizer": cfg.optimizer,
                "state_every": state_every,
            },
        )
        return Trained.from_xcom(out)
    ranks = distributed.ranks()
    spec = active()
    contract = spec.contract_obj()
    code_file = spec.factory_module_file
    run_id = ingested.mlflow_run_id
    df = read_frame(ingested.uri)
    if state_every is not None:
        cfg = dataclasses.replace(cfg, state_every=state_every)
    c = registry.client()
    if ranks.main:
        try:  # one request; if the server is away, training goes on without them
            registry.log_params(
                run_id,
                {f"train.{k}": v for k, v in {**cfg.flat(), "world_size": ranks.world}.items()},
            )
        except Exception as exc:  # noqa: BLE001 - a retry logs the same params again
            log.warning(
                "train_model: training parameters not logged to MLflow (%s); training anyway", exc
            )
    # Training-state checkpoints, keyed by the run key: a local folder under PIPELINE_HOME (the
    # write-ahead copy) mirrored to the storage root, so a retried task resumes where the
    # killed one stopped, on this worker or another (pipeline/train/state.py).
    state_dir = get_settings().home_dir / "train-state" / ctx.run_key
    state_remote = storage.join(get_settings().storage_root, "train-state", ctx.run_key)
    try:
        result = train(
            df,
            contract,
            cfg,
            sink=MlflowRunSink(c, run_id),
            state_dir=state_dir,
            state_remote=state_remote,
            code_file=code_file,
        )
    except TrainingDiverged as exc:
        write_stage(run_id, "train_model", "diverged", str(exc), {"error": str(exc)})
        raise PipelineRejection(str(exc)) from exc
    if not ranks.main:  # rank 0 publishes; the others only trained alongside it
        return Trained(
            verdict="trained",
            rank=ranks.rank,
            world_size=ranks.world,
            steps=result.steps,
            stop_reason=result.stop_reason,
            batch_sha256=ingested.sha256,
            **ingested.base(),
        )
    for record in result.stop_records:  # reduce_lr / stop / diverged, each replayable
        step = record["decision"]["step"]
        path = decisions.record_path("training_stop", f"step{step}")
        registry.log_text(run_id, json.dumps(record, default=str), path)
    for row in result.history:
        registry.log_metrics(
            run_id,
            {k: v for k, v in row.items() if k != "epoch"},
            prefix="train.",
            step=int(row["epoch"]),
        )
    probe = df[holdout_mask(df, contract, cfg.val_fraction)].head(256)
    training = {
        "config": cfg.to_dict(),
        "stop_reason": result.stop_reason,
        "steps": result.steps,
        "best_epoch": result.best_epoch,
        "best_step": result.best_step,
        "validations": result.validations,
        "val_metrics": result.val_metrics,
        "device": result.device,
        "precision": result.precision,
        "resumed_from": result.resumed_from,
    }
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "checkpoint"
        checkpoint.save_checkpoint(
            local,
            result.model,
            result.features,
            probe,
            data_snapshot={"uri": ingested.uri, "sha256": ingested.sha256},
            training=training,
            model_ref=result.model_ref,
            code_file=code_file,
        )
        digest = checkpoint.manifest_digest(local)
        uri = storage.join(get_settings().storage_root, "checkpoints", digest[:24])
        checkpoint.publish(local, uri)
        c.log_artifacts(run_id, str(local), "checkpoint")
    tel = result.telemetry
    kept_local = (
        "decision_trace_file" in tel
        or "spill_log_error" in tel
        or any("local_dir" in a for a in tel.get("artifacts", []))
    )
    if not kept_local:  # the published checkpoint supersedes the training states
        shutil.rmtree(state_dir, ignore_errors=True)
    train_state.clear_remote(state_remote)  # superseded on every worker
    registry.set_tags(
        run_id,
        {
            "train.device": result.device,
            "train.precision": result.precision,
            "train.stop_reason": result.stop_reason,
            "train.steps": result.steps,
            # what the stop cost in validation passes (each over the validation rows), and
            # the step whose weights were kept
            "train.validations": result.validations,
            "train.best_step": result.best_step,
        },
    )
    ranks_note = f" x{result.world_size} processes" if result.world_size > 1 else ""
    summary = (
        f"{len(result.history)} epochs ({result.steps} steps) on {result.device}{ranks_note} "
        f"({result.precision}), stop={result.stop_reason}, best epoch {result.best_epoch} "
        f"(step {result.best_step}, {result.validations} validations), "
        f"val {spec.primary_metric} {result.val_metrics.get(spec.primary_metric, float('nan')):.4f}"
        + (f", resumed from step {result.resumed_from['step']}" if result.resumed_from else "")
    )
    last = result.history[-1] if result.history else {}
    grad = last.get("grad_norm")
    rec = Trained(
        verdict="trained",
        checkpoint_uri=uri,
        manifest_sha256=digest,
        batch_sha256=ingested.sha256,
        stop_reason=result.stop_reason,
        steps=result.steps,
        epochs=len(result.history),
        best_epoch=result.best_epoch,
        val_metrics=dict(result.val_metrics),
        final_grad_norm=float(grad) if isinstance(grad, int | float) else None,
        device=result.device,
        precision=result.precision,
        resumed_from=result.resumed_from,
        world_size=result.world_size,
        telemetry={k: v for k, v in result.telemetry.items() if k != "artifacts"},
        summary=summary,
        **ingested.base(),
    )
    record_stage(rec)
    return rec


def verify_checkpoint(ctx: RunContext, trained: Trained) -> Verified:
    from pipeline import checkpoint

    trained = Trained.from_xcom(trained)
    if trained.checkpoint_uri is None or trained.manifest_sha256 is None:
        raise CheckpointRejected(
            f"train_model record of rank {trained.rank} names no checkpoint: "
            "only rank 0 publishes one"
        )
    with tempfile.TemporaryDirectory() as tmp:
        v = checkpoint.verify_checkpoint(checkpoint.fetch(trained.checkpoint_uri, Path(tmp) / "c"))
    digest_ok = v.manifest_sha256 == trained.manifest_sha256
    problems = v.problems + (
        []
        if digest_ok or not v.manifest_sha256
        else [
            f"manifest digest {v.manifest_sha256[:12]} is not the one trained "
            f"({trained.manifest_sha256[:12]})"
        ]
    )
    summary = (
        "digests, signature, finite tensors, reload parity: ok"
        if not problems
        else "; ".join(problems)
    )
    rec = Verified(
        verdict="intact" if not problems else "rejected",
        problems=problems,
        checkpoint_uri=trained.checkpoint_uri,
        manifest_sha256=v.manifest_sha256,
        batch_sha256=trained.batch_sha256,
        summary=summary,
        **trained.base(),
    )
    record_stage(rec)
    if problems:
        raise CheckpointRejected(f"checkpoint {trained.checkpoint_uri} is not intact: {summary}")
    return rec
