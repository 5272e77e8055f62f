"""The stages of one retraining run, as functions of small records.

Each DAG task calls exactly one of these; ``python -m pipeline <stage>`` calls the
same function, so any task can be reproduced without Airflow. Inputs and outputs
are small JSON-able dicts holding URIs, digests and verdicts — never data.

Every stage writes its verdict and a one-line summary as tags on the run's
MLflow run (``stage.<name>.verdict`` / ``.summary``), so the run, the summary
and a reviewer all read the same record.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline import registry, storage
from pipeline.errors import CheckpointRejected, DataRejected, PipelineRejection
from pipeline.settings import get_settings
from pipeline.spec import ModelSpec, Policy, PolicyViolation, active, resolve_policy

log = logging.getLogger(__name__)

STAGES = (
    "ingest_batch",
    "validate_batch",
    "detect_drift",
    "decide_retrain",
    "train_model",
    "verify_checkpoint",
    "register_challenger",
    "gate_promotion",
    "promote_champion",
)


@dataclass(frozen=True)
class RunContext:
    dag_id: str = "cli"
    run_id: str = "manual"
    run_after: str | None = None  # when the run was due: the "now" for time checks

    @property
    def run_key(self) -> str:
        return re.sub(r"[^A-Za-z0-9._-]", "_", f"{self.dag_id}__{self.run_id}")

    @property
    def now(self) -> pd.Timestamp:
        ts = pd.Timestamp(self.run_after) if self.run_after else pd.Timestamp.now(tz="UTC")
        return ts if ts.tzinfo else ts.tz_localize("UTC")


def _stage(run_id: str, stage: str, verdict: str, summary: str, record: dict[str, Any]) -> None:
    registry.set_tags(
        run_id, {f"stage.{stage}.verdict": verdict, f"stage.{stage}.summary": summary[:4000]}
    )
    registry.log_record(run_id, stage, record)
    log.info("%s: %s — %s", stage, verdict, summary)


def _base(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: rec[k] for k in ("model", "mlflow_run_id", "mlflow_experiment_id") if k in rec}


def run_policy(requested: dict[str, Any] | None = None, spec: ModelSpec | None = None) -> Policy:
    """The policy this run uses: the active spec's, tightened by the run's Params / flags
    (``spec.resolve_policy``; a loosening the spec does not allow raises PolicyViolation)."""
    return resolve_policy(spec or active(), requested)


def _contract():
    return active().contract_obj()


def _eval_uri(policy: Policy) -> str:
    """The trusted set's URI: the spec's location, or an override the spec allows — which
    must still lie under the storage root's ``trusted/`` folder (never a landing batch, never
    an arbitrary file the worker can read)."""
    uri = get_settings().resolve(policy.eval_uri)
    trusted = storage.join(get_settings().storage_root, "trusted")
    if policy.eval_uri != active().eval_location and not _under(uri, trusted):
        raise PolicyViolation(
            f"evaluation set {uri} is not under the trusted folder {trusted}; "
            "an evaluation set a run names must be one the data owners put there"
        )
    return uri


# -- ingest ---------------------------------------------------------------------------


def quarantine_root(snapshot_sha: str) -> str:
    """``quarantine/<model>/<sha>``: each model's rejections apart (one model's contract may
    accept what another's rejects)."""
    return storage.join(get_settings().storage_root, "quarantine", active().name, snapshot_sha[:24])


def ingest_batch(ctx: RunContext, batch_uri: str, policy: Policy | None = None) -> dict[str, Any]:
    """Snapshot the batch (content-addressed). The source is checked against the model's
    landing prefix and allowed sources first, and ``policy`` (the run's, already resolved:
    a loosening was refused before this) is recorded on the run."""
    from pipeline.ingest import snapshot
    from pipeline.train.model import FactoryError, check_factory

    batch_uri = check_batch_source(batch_uri)
    spec = active()
    try:  # a factory that cannot build the spec's model fails the run before any data is read
        check_factory(spec)
    except FactoryError as exc:
        raise PolicyViolation(str(exc)) from exc
    run_id = registry.get_or_create_run(
        ctx.run_key,
        {
            "airflow.dag_id": ctx.dag_id,
            "airflow.run_id": ctx.run_id,
            "pipeline.model": spec.name,
            "pipeline.spec": str(spec.path),
        },
    )
    if policy is not None and policy.overrides:
        registry.set_tags(
            run_id, {"policy.overrides": json.dumps(list(policy.overrides), default=str)}
        )
    if not storage.exists(batch_uri) and storage.exists(_quarantine_index(batch_uri)):
        where = json.loads(storage.read_text(_quarantine_index(batch_uri)))["quarantine_uri"]
        registry.set_tags(run_id, {"stage.ingest_batch.verdict": "quarantined"})
        raise DataRejected(
            f"batch {batch_uri} was already rejected and moved to {where}; "
            "see reason.txt there, and land a corrected batch under a new name"
        )
    snap, error = snapshot(batch_uri)  # rows from the Parquet footer: no frame is loaded
    registry.set_tags(
        run_id,
        {
            "data.batch_uri": batch_uri,
            "data.snapshot_uri": snap.uri,
            "data.snapshot_sha256": snap.sha256,
            "data.rows": snap.rows,
        },
    )
    rec = {
        "stage": "ingest_batch",
        "verdict": "unreadable" if error else "ok",
        **snap.to_dict(),
        "parse_error": error,
        "model": active().name,
        "mlflow_run_id": run_id,
        "mlflow_experiment_id": registry.experiment_id(),
    }
    _stage(
        run_id,
        "ingest_batch",
        rec["verdict"],
        error or f"{snap.rows} rows, snapshot sha256 {snap.sha256[:12]}",
        rec,
    )
    return rec


# -- validate -------------------------------------------------------------------------


def validate_batch(ctx: RunContext, ingested: dict[str, Any]) -> dict[str, Any]:
    """Validate the snapshot (streaming); store the report beside it and on the MLflow run;
    count the batch in the ledger; on rejection quarantine it and stop the run."""
    from pipeline import validate

    contract = _contract()
    run_id = ingested["mlflow_run_id"]
    # leakage is judged against the champion's training snapshot: new predictive power only
    champ = registry.alias_version(registry.CHAMPION)
    reference = champ.tags.get("data.snapshot_uri") if champ is not None else None
    report = validate.validate_uri(
        ingested["uri"], contract, now=ctx.now, reference_uri=reference
    )  # never raises on data
    report_dict, summary, passed = report.to_dict(), report.summary(), report.success
    html = validate.render_html(report, title=f"Validation of {ingested['source_uri']}")
    report_text = json.dumps(report_dict, indent=2, default=str)
    folder = storage.join(ingested["uri"].rsplit("/", 1)[0], "reports", ctx.run_key)
    json_obj = storage.write_text(storage.join(folder, "validation.json"), report_text)
    html_obj = storage.write_text(storage.join(folder, "validation.html"), html)
    registry.log_text(run_id, html, "validation/report.html")
    registry.log_text(run_id, report_text, "validation/report.json")
    failing = [
        f"{r.expectation} on {validate.display_name(r.column) if r.column else 'the table'}"
        for r in report.failures()
    ]
    rec = {
        "stage": "validate_batch",
        "verdict": "pass" if passed else "reject",
        "summary": summary,
        "report_uri": json_obj.uri,
        "html_uri": html_obj.uri,
        "rows": report.rows,
        "failed_expectations": failing,
        "extra_columns": report.extra_columns,
        **_base(ingested),
    }
    if not passed:
        rec["quarantine_uri"], rec["quarantined"] = _quarantine(
            ingested, report_text, html, summary
        )
    rec["ledger"] = _ledger(ctx, ingested, rec["verdict"], summary)
    registry.log_metrics(
        run_id,
        {
            "validation.failed_expectations": len(failing),
            "validation.rows": report.rows,
            "batches.accepted_total": rec["ledger"]["accepted"],
            "batches.rejected_total": rec["ledger"]["rejected"],
        },
    )
    _stage(run_id, "validate_batch", rec["verdict"], summary, rec)
    if not passed:
        registry.end_run(run_id, "FAILED")
        shown = ", ".join(failing[:8]) + (
            f" and {len(failing) - 8} more" if len(failing) > 8 else ""
        )
        raise DataRejected(
            f"batch {ingested['source_uri']} rejected by the data contract: {summary}. "
            f"Failing expectations: {shown}. Report: {html_obj.uri} (JSON: {json_obj.uri}). "
            f"The batch was {rec['quarantined']} to {rec['quarantine_uri']}; "
            "fix the producer and land a corrected batch under a new name."
        )
    return rec


def _write_once(uri: str, text: str) -> None:
    """Write unless the object exists: the first record stands, nothing is overwritten."""
    try:
        storage.write_text(uri, text)
    except storage.ObjectExistsError:
        pass


def _quarantine(
    ingested: dict[str, Any], report_text: str, html: str, summary: str
) -> tuple[str, str]:
    """Put the rejected batch beside its report and a reason file; return (folder, how).

    A batch inside the model's landing prefix (the pipeline's own) is *moved* there — never
    deleted — so the next run does not pick it up again. A batch from anywhere else (an
    allowed source: a producer's own bucket or folder) is *copied* and left where it was:
    the pipeline never moves or deletes what it does not own.

    Keyed by the batch's content: a re-run of the same bytes lands in the same folder and
    the first rejection's reason and report stand (written once, never overwritten)."""
    root = quarantine_root(ingested["sha256"])
    _write_once(storage.join(root, "reason.txt"), summary + "\n")
    _write_once(storage.join(root, "validation.json"), report_text)
    _write_once(storage.join(root, "validation.html"), html)
    _write_once(
        storage.join(root, "source.json"),
        json.dumps(
            {
                "source_uri": ingested["source_uri"],
                "snapshot_uri": ingested["uri"],
                "sha256": ingested["sha256"],
            },
            indent=2,
        ),
    )
    src = ingested["source_uri"]
    _write_once(_quarantine_index(src), json.dumps({"quarantine_uri": root}))
    dest = storage.join(root, "batch.parquet")
    # Only the bytes that were validated are moved; a different file re-landed under the
    # same name stays where it is. Never a move onto itself.
    owned = _under(src, landing_prefix_uri()) and storage.norm(src) != storage.norm(dest)
    if owned and storage.exists(src) and storage.digest_of(src) == ingested["sha256"]:
        storage.move(src, dest)
        return root, "moved"
    if owned and not storage.exists(src) and storage.exists(dest):
        return root, "moved"  # a retry of the task that moved it
    if not storage.exists(dest):  # from the immutable snapshot: the validated bytes
        storage.write_bytes(dest, storage.read_bytes(ingested["uri"]))
    return root, "copied"


def landing_prefix_uri(spec: ModelSpec | None = None) -> str:
    return storage.join(get_settings().storage_root, (spec or active()).landing_prefix)


def _under(uri: str, prefix: str) -> bool:
    u, p = storage.norm(uri), storage.norm(prefix).rstrip("/") + "/"
    return u.startswith(p)


def check_batch_source(uri: str, spec: ModelSpec | None = None) -> str:
    """A batch may be read only from the model's landing prefix or a source its spec lists
    (``landing.allowed_sources``); anything else is refused before it is read."""
    spec = spec or active()
    if (
        not isinstance(uri, str)
        or not uri
        or len(uri) > 2048
        or any(ch in uri for ch in "\x00\n\r")
    ):
        raise PolicyViolation(f"batch URI {uri!r} is not a URI")
    norm = storage.norm(uri)
    if "/../" in norm + "/" or "/./" in norm + "/":
        raise PolicyViolation(f"batch URI {uri!r} contains '.' or '..' segments")
    allowed = [landing_prefix_uri(spec)] + [
        get_settings().resolve(a) for a in spec.landing.allowed_sources
    ]
    if not any(_under(norm, a) for a in allowed):
        raise PolicyViolation(
            f"batch {uri} is outside model {spec.name!r}'s landing prefix and allowed sources "
            f"{allowed}; land it with `python -m pipeline data land --model {spec.name} --file PATH`, "
            f"or the model's owner adds its folder to landing.allowed_sources in {spec.path}"
        )
    return norm


def _quarantine_index(source_uri: str) -> str:
    key = storage.sha256_bytes(source_uri.encode())[:24]
    return storage.join(
        get_settings().storage_root, "quarantine", active().name, "by-source", f"{key}.json"
    )


def _ledger(
    ctx: RunContext, ingested: dict[str, Any], verdict: str, summary: str
) -> dict[str, int]:
    """Count the batch once per content (``ledger/accepted|rejected/<sha256>.json``, written
    once) and return the totals."""
    root = storage.join(get_settings().storage_root, "ledger", active().name)
    folder = "accepted" if verdict == "pass" else "rejected"
    entry = {
        "sha256": ingested["sha256"],
        "source_uri": ingested["source_uri"],
        "snapshot_uri": ingested["uri"],
        "verdict": verdict,
        "first_run_key": ctx.run_key,
        "summary": summary[:2000],
    }
    _write_once(
        storage.join(root, folder, f"{ingested['sha256']}.json"),
        json.dumps(entry, indent=2, sort_keys=True),
    )
    return {k: len(storage.list_uris(storage.join(root, k))) for k in ("accepted", "rejected")}


# -- drift and the retrain decision ----------------------------------------------------


EVAL_SAMPLE_ROWS = 200_000  # champion scored on at most this many rows of a batch (seeded)


def _metric_key(prefix: str, column: str) -> str:
    """An MLflow metric key for a column: only [A-Za-z0-9_.-], short, never a path."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", column)[:60]
    if safe != column:
        safe += "_" + storage.sha256_bytes(column.encode())[:8]
    return f"{prefix}.{safe}"


def detect_drift(ctx: RunContext, ingested: dict[str, Any]) -> dict[str, Any]:
    from pipeline import checkpoint, drift
    from pipeline.evaluate import evaluate_model
    from pipeline.ingest import read_sample

    contract = _contract()
    run_id = ingested["mlflow_run_id"]
    champ = registry.alias_version(registry.CHAMPION)
    rec: dict[str, Any] = {"stage": "detect_drift", **_base(ingested)}
    if champ is None:
        rec.update(
            verdict="no_reference",
            has_champion=False,
            summary="no champion yet: nothing to compare against",
        )
        _stage(run_id, "detect_drift", rec["verdict"], rec["summary"], rec)
        return rec
    # Streaming statistics over both snapshots; Evidently's page on samples for people.
    report, html = drift.detect_drift_uris(
        champ.tags["data.snapshot_uri"],
        ingested["uri"],
        contract,
        share_threshold=active().retrain.drift_share,
    )
    html_obj = storage.write_text(
        storage.join(ingested["uri"].rsplit("/", 1)[0], "reports", ctx.run_key, "drift.html"), html
    )
    registry.log_text(run_id, html, "drift/report.html")
    registry.log_text(run_id, json.dumps(report.to_dict(), indent=2), "drift/report.json")
    model, spec, _ = checkpoint.load_for_inference(champ.tags["checkpoint.uri"])
    metric = active().primary_metric
    labelled = read_sample(ingested["uri"], EVAL_SAMPLE_ROWS, columns=contract.column_names)
    on_batch = evaluate_model(model, spec, labelled).get(metric)
    at_promotion = champ.tags.get(f"eval.{metric}")
    age_days = None
    if champ.tags.get("promoted_at"):
        age_days = (ctx.now - pd.Timestamp(champ.tags["promoted_at"])).total_seconds() / 86_400
    rec.update(
        verdict="drift" if report.dataset_drift else "no_drift",
        has_champion=True,
        champion_version=str(champ.version),
        report=report.to_dict(),
        html_uri=html_obj.uri,
        dataset_drift=report.dataset_drift,
        drift_share=report.drift_share,
        share_threshold=report.share_threshold,
        drifted_columns=report.drifted_columns(),
        label_drifted=report.label_drifted,
        reference_positive_rate=report.reference_positive_rate,
        current_positive_rate=report.current_positive_rate,
        champion_metric=metric,
        champion_metric_on_batch=on_batch,
        champion_metric_at_promotion=float(at_promotion) if at_promotion else None,
        champion_metric_rows=len(labelled),
        champion_age_days=age_days,
        summary=report.summary()
        + (
            f"; champion v{champ.version} {metric} on this batch "
            f"{on_batch:.4f} (at promotion {at_promotion})"
            if on_batch is not None
            else ""
        ),
    )
    metrics = {
        "drift_share": report.drift_share,
        "drift.label_drifted": float(report.label_drifted),
        f"champion_{metric}_on_batch": on_batch or float("nan"),
    }
    for c in report.columns:
        metrics[_metric_key("drift.score", c.column)] = c.score
        metrics[_metric_key("drift.drifted", c.column)] = float(c.drifted)
    registry.log_metrics(run_id, metrics)
    _stage(run_id, "detect_drift", rec["verdict"], rec["summary"], rec)
    return rec


def decide_retrain(
    ctx: RunContext,
    drifted: dict[str, Any],
    force: bool = False,
    policy: Policy | None = None,
) -> dict[str, Any]:
    from pipeline.decide import RetrainEvidence, RetrainPolicy

    run = policy or run_policy()
    policy_obj = RetrainPolicy(
        decay_margin=run.decay_margin, max_model_age_days=run.max_model_age_days
    )
    evidence = RetrainEvidence(
        has_champion=bool(drifted.get("has_champion")),
        dataset_drift=drifted.get("dataset_drift"),
        drift_share=drifted.get("drift_share"),
        label_drifted=drifted.get("label_drifted"),
        champion_metric_at_promotion=drifted.get("champion_metric_at_promotion"),
        champion_metric_on_batch=drifted.get("champion_metric_on_batch"),
        champion_age_days=drifted.get("champion_age_days"),
        forced=force,
        direction=active().direction,
        metric=drifted.get("champion_metric") or active().primary_metric,
        drift_share_threshold=drifted.get("share_threshold"),
        drifted_columns=tuple(drifted.get("drifted_columns") or ()),
    )
    decision = policy_obj.decide(evidence)
    rec = {
        "stage": "decide_retrain",
        **decision.to_dict(),
        "summary": decision.summary(),
        **_base(drifted),
    }
    run_id = drifted["mlflow_run_id"]
    registry.set_tags(
        run_id,
        {
            "retrain.verdict": decision.verdict,
            "retrain.reasons": ",".join(r.value for r in decision.reasons),
        },
    )
    registry.log_metrics(run_id, {"retrain.decision": float(decision.retrain)})
    _stage(run_id, "decide_retrain", decision.verdict, decision.summary(), rec)
    return rec


# -- training and the checkpoint ------------------------------------------------------


def _train_under_torchrun(
    ctx: RunContext,
    ingested: dict[str, Any],
    procs: int,
    *,
    max_epochs: int,
    learning_rate: float,
    seed: int,
    batch_size: int,
    optimizer: str,
    state_every: int | None,
) -> dict[str, Any]:
    """``train_model`` in ``procs`` processes: ``torchrun --standalone`` runs this same stage
    (``python -m pipeline train``) once per rank, in this host or pod; rank 0 publishes and
    writes its record, which is returned here. Its output streams into this task's log."""
    import subprocess
    import sys

    with tempfile.TemporaryDirectory(prefix="torchrun-") as tmp:
        inp, out = Path(tmp) / "ingested.json", Path(tmp) / "trained.json"
        inp.write_text(json.dumps(ingested, default=str))
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={procs}",
            "-m",
            "pipeline",
            "train",
            "--spec",
            str(active().path),
            "--in",
            str(inp),
            "--record-out",
            str(out),
            "--dag-id",
            ctx.dag_id,
            "--run-id",
            ctx.run_id,
            "--max-epochs",
            str(max_epochs),
            "--learning-rate",
            str(learning_rate),
            "--seed",
            str(seed),
            "--batch-size",
            str(batch_size),
            "--optimizer",
            optimizer,
            *(["--run-after", ctx.run_after] if ctx.run_after else []),
            *(["--state-every", str(state_every)] if state_every is not None else []),
        ]
        log.info("train_model: %d processes: %s", procs, " ".join(cmd))
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        rc = subprocess.run(cmd, env=env, check=False).returncode
        rec = json.loads(out.read_text()) if out.exists() else None
        if rec is not None and "rejected" in rec:  # diverged: deterministic, not retried
            raise PipelineRejection(rec["rejected"])
        if rc != 0 or rec is None:
            raise RuntimeError(
                f"train_model under torchrun ({procs} processes) failed with exit code {rc}; "
                "see the ranks' output above"
            )
        return dict(rec)


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
    ingested: dict[str, Any],
    *,
    max_epochs: int | None = None,
    learning_rate: float | None = None,
    seed: int | None = None,
    batch_size: int | None = None,
    optimizer: str | None = None,
    state_every: int | None = None,
) -> dict[str, Any]:
    """Train the spec's model (resuming from this run's last training-state checkpoint, if
    any), then write and publish the signed checkpoint. Diverged training fails here:
    nothing is saved. Unset knobs take the spec's training defaults."""
    import dataclasses
    import shutil

    from pipeline import checkpoint
    from pipeline.ingest import read_frame
    from pipeline.train import distributed
    from pipeline.train.loop import TrainingDiverged, holdout_mask, train
    from pipeline.train.telemetry import MlflowRunSink

    cfg = train_config(
        max_epochs=max_epochs,
        learning_rate=learning_rate,
        seed=seed,
        batch_size=batch_size,
        optimizer=optimizer,
    )
    procs = get_settings().train_processes
    if procs > 1 and "WORLD_SIZE" not in os.environ:  # launch the ranks; this process waits
        return _train_under_torchrun(
            ctx,
            ingested,
            procs,
            max_epochs=cfg.max_epochs,
            learning_rate=cfg.learning_rate,
            seed=cfg.seed,
            batch_size=cfg.batch_size,
            optimizer=cfg.optimizer,
            state_every=state_every,
        )
    ranks = distributed.ranks()
    spec = active()
    contract = spec.contract_obj()
    code_file = spec.factory_module_file
    run_id = ingested["mlflow_run_id"]
    df = read_frame(ingested["uri"])
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
    # Training-state checkpoints: a local folder under PIPELINE_HOME keyed by the run key, so a
    # retried task on the same worker resumes where the killed one stopped.
    state_dir = get_settings().home_dir / "train-state" / ctx.run_key
    try:
        result = train(
            df,
            contract,
            cfg,
            sink=MlflowRunSink(c, run_id),
            state_dir=state_dir,
            code_file=code_file,
        )
    except TrainingDiverged as exc:
        _stage(run_id, "train_model", "diverged", str(exc), {"error": str(exc)})
        raise PipelineRejection(str(exc)) from exc
    if not ranks.main:  # rank 0 publishes; the others only trained alongside it
        return {
            "stage": "train_model",
            "verdict": "trained",
            "rank": ranks.rank,
            "world_size": ranks.world,
            "steps": result.steps,
            "stop_reason": result.stop_reason,
        }
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
            data_snapshot={"uri": ingested["uri"], "sha256": ingested["sha256"]},
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
    registry.set_tags(
        run_id,
        {
            "train.device": result.device,
            "train.precision": result.precision,
            "train.stop_reason": result.stop_reason,
            "train.steps": result.steps,
        },
    )
    ranks_note = f" x{result.world_size} processes" if result.world_size > 1 else ""
    summary = (
        f"{len(result.history)} epochs ({result.steps} steps) on {result.device}{ranks_note} "
        f"({result.precision}), stop={result.stop_reason}, best epoch {result.best_epoch}, "
        f"val {spec.primary_metric} {result.val_metrics.get(spec.primary_metric, float('nan')):.4f}"
        + (f", resumed from step {result.resumed_from['step']}" if result.resumed_from else "")
    )
    rec = {
        "stage": "train_model",
        "verdict": "trained",
        "checkpoint_uri": uri,
        "manifest_sha256": digest,
        "stop_reason": result.stop_reason,
        "steps": result.steps,
        "epochs": len(result.history),
        "best_epoch": result.best_epoch,
        "val_metrics": result.val_metrics,
        "device": result.device,
        "precision": result.precision,
        "resumed_from": result.resumed_from,
        "world_size": result.world_size,
        "telemetry": {k: v for k, v in result.telemetry.items() if k != "artifacts"},
        "summary": summary,
        **_base(ingested),
    }
    _stage(run_id, "train_model", "trained", summary, rec)
    return rec


def verify_checkpoint(ctx: RunContext, trained: dict[str, Any]) -> dict[str, Any]:
    from pipeline import checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        v = checkpoint.verify_checkpoint(
            checkpoint.fetch(trained["checkpoint_uri"], Path(tmp) / "c")
        )
    digest_ok = v.manifest_sha256 == trained["manifest_sha256"]
    problems = v.problems + (
        []
        if digest_ok or not v.manifest_sha256
        else [
            f"manifest digest {v.manifest_sha256[:12]} is not the one trained "
            f"({trained['manifest_sha256'][:12]})"
        ]
    )
    verdict = "intact" if not problems else "rejected"
    summary = (
        "digests, signature, finite tensors, reload parity: ok"
        if not problems
        else "; ".join(problems)
    )
    rec = {
        "stage": "verify_checkpoint",
        "verdict": verdict,
        "problems": problems,
        "checkpoint_uri": trained["checkpoint_uri"],
        "manifest_sha256": v.manifest_sha256,
        "summary": summary,
        **_base(trained),
    }
    _stage(trained["mlflow_run_id"], "verify_checkpoint", verdict, summary, rec)
    if problems:
        raise CheckpointRejected(f"checkpoint {trained['checkpoint_uri']} is not intact: {summary}")
    return rec


# -- registry, gate, promotion --------------------------------------------------------


def register_challenger(
    ctx: RunContext, ingested: dict[str, Any], trained: dict[str, Any], verified: dict[str, Any]
) -> dict[str, Any]:
    """Log the verified checkpoint as an MLflow model (from code: no pickle) with a
    signature and input example, register it as a version with lineage tags, and point
    alias ``challenger`` at it. A retry finds the version this run already registered."""
    from pipeline import checkpoint

    run_id = ingested["mlflow_run_id"]
    c = registry.client()
    run = c.get_run(run_id)
    version = registry.find_version(run_id, ctx.run_key)
    if version is None:
        with tempfile.TemporaryDirectory() as tmp:
            local = checkpoint.fetch(trained["checkpoint_uri"], Path(tmp) / "checkpoint")
            v = checkpoint.verify_checkpoint(local)  # this copy is what gets logged: check it
            if not v.intact or v.manifest_sha256 != verified["manifest_sha256"]:
                raise CheckpointRejected(
                    f"checkpoint {trained['checkpoint_uri']} changed since "
                    f"verify_checkpoint: {'; '.join(v.problems) or 'digest'}"
                )
            key_id = json.loads((local / checkpoint.SIGNATURE).read_text()).get("key_id", "")
            example = pd.read_parquet(local / checkpoint.PROBE_ROWS).head(5)
            info = registry.log_serving_model(run_id, local, example)
            tags = _version_tags(ctx, ingested, trained, v, key_id, run)
            version = registry.register_version(
                run_id,
                ctx.run_key,
                info.model_uri,
                tags,
                model_id=info.model_id,
                description=f"Trained by {ctx.dag_id} run {ctx.run_id} on snapshot "
                f"{ingested['sha256'][:12]}. Gate decision pending.",
            )
    registry.set_alias(registry.CHALLENGER, version)
    rec = {
        "stage": "register_challenger",
        "verdict": "registered",
        "model_name": registry.model_name(),
        "model_version": version,
        "summary": f"registered v{version} (model from code, signature, input example), "
        "alias challenger",
        **_base(ingested),
    }
    _stage(run_id, "register_challenger", "registered", rec["summary"], rec)
    registry.set_tags(run_id, {"model.version": version})
    return rec


def _version_tags(
    ctx: RunContext,
    ingested: dict[str, Any],
    trained: dict[str, Any],
    v: Any,
    key_id: str,
    run: Any,
) -> dict[str, Any]:
    """Everything a reviewer needs on the version: lineage, verdicts, checkpoint, training."""
    from pipeline import checkpoint

    rt, m = run.data.tags, v.manifest
    grad = trained.get("final_grad_norm", run.data.metrics.get("train.grad_norm"))
    artifacts = f"runs:/{run.info.run_id}"
    return {
        "data.snapshot_uri": ingested["uri"],
        "data.snapshot_sha256": ingested["sha256"],
        "data.batch_uri": ingested["source_uri"],
        "data.rows": ingested.get("rows", ""),
        "validation.verdict": rt.get("stage.validate_batch.verdict", "pass"),
        "validation.summary": _short(rt.get("stage.validate_batch.summary", "")),
        "validation.report": f"{artifacts}/validation/report.html",
        "drift.verdict": rt.get("stage.detect_drift.verdict", "not_run"),
        "drift.summary": _short(rt.get("stage.detect_drift.summary", "")),
        "drift.report": f"{artifacts}/drift/report.html"
        if rt.get("stage.detect_drift.verdict") in ("drift", "no_drift")
        else "none (no champion)",
        "checkpoint.uri": trained["checkpoint_uri"],
        "checkpoint.manifest_sha256": v.manifest_sha256,
        "checkpoint.signature": f"verified HMAC-SHA256 key {key_id}",
        "checkpoint.bytes": checkpoint.checkpoint_bytes(m),
        "checkpoint.all_finite": m.get("all_finite"),
        "train.stop_reason": m.get("stop_reason") or trained.get("stop_reason"),
        "train.final_grad_norm": f"{grad:.6g}" if isinstance(grad, int | float) else "n/a",
        "train.epochs": trained.get("epochs", ""),
        "train.best_epoch": trained.get("best_epoch", ""),
        "train.device": trained.get("device", ""),
        "airflow.dag_id": ctx.dag_id,
        "airflow.run_id": ctx.run_id,
        "code.version": m.get("code_version", ""),
        "pipeline.model": active().name,
        "model.factory": (m.get("model") or {}).get("factory", "pipeline.train.model:mlp"),
        "model.kwargs": _short(
            json.dumps((m.get("model") or {}).get("kwargs", {}), sort_keys=True)
        ),
        "model.code_sha256": (m.get("model") or {}).get("code_sha256") or "built-in",
    }


def gate_promotion(
    ctx: RunContext,
    registered: dict[str, Any],
    *,
    policy: Policy | None = None,
    resamples: int | None = None,
) -> dict[str, Any]:
    """Challenger vs champion on the spec's trusted evaluation set (``pipeline.gates``),
    under the run's policy (the spec's, tightened by the run; ``run_policy``).

    The full decision record (thresholds, per-row inputs, verdict) is an MLflow artifact
    ``gate/decision_record.json`` that ``gates.replay`` recomputes; the version gets the
    verdict as tags — and every policy override the run used — and the report as its
    description. XCom gets a small record."""
    from pipeline import checkpoint, gates
    from pipeline.evaluate import measure_latency, score_model
    from pipeline.ingest import read_frame
    from pipeline.train.features import labels

    model_spec = active()
    pol = policy or run_policy()
    margin, floor, slices = pol.margin, pol.floor, list(pol.slices)
    non_inferiority_margin, improvement = pol.non_inferiority_margin, pol.improvement
    max_checkpoint_mb, max_latency_p95_ms = pol.max_checkpoint_mb, pol.max_latency_p95_ms
    resamples = resamples or pol.resamples
    run_id, version = registered["mlflow_run_id"], registered["model_version"]
    eval_uri = _eval_uri(pol)
    if not storage.exists(eval_uri):  # deterministic: a retry cannot make the set appear
        raise DataRejected(
            f"model {model_spec.name!r} has no trusted evaluation set at {eval_uri}: the gate never "
            "judges on a landing batch. Put one there: python -m pipeline data land --model "
            f"{model_spec.name} --file eval.parquet --as-eval (evaluation.uri in {model_spec.path})"
        )
    eval_df = read_frame(eval_uri)
    missing = [col for col in slices if col not in eval_df]
    if missing:  # the spec said slice on these: judging without them would be a silent pass
        raise DataRejected(
            f"gate slice column(s) {missing} of model {model_spec.name!r} are not in the "
            f"trusted evaluation set {eval_uri}; add them to the set or remove them "
            f"from gate.slices in {model_spec.path}"
        )
    c = registry.client()
    mv = c.get_model_version(registry.model_name(), version)
    model, spec, verification = checkpoint.load_for_inference(mv.tags["checkpoint.uri"])
    latency = measure_latency(model, spec, eval_df)
    champ = registry.alias_version(registry.CHAMPION)
    champ_proba = champ_version = None
    if champ is not None and str(champ.version) != version:
        cm, cs, _ = checkpoint.load_for_inference(champ.tags["checkpoint.uri"])
        if cs.classes != spec.classes:
            raise PipelineRejection(
                f"champion v{champ.version} predicts classes {cs.classes}, "
                f"the challenger {spec.classes}: not comparable"
            )
        champ_proba, champ_version = score_model(cm, cs, eval_df), str(champ.version)
    metric = model_spec.primary_metric
    gate = gates.PromotionGate(
        metric=metric,
        floors=dict(pol.floors),
        min_improvement=margin,
        improvement=improvement,  # type: ignore[arg-type]
        non_inferiority_margin=non_inferiority_margin,
        slices=tuple(slices),
        max_checkpoint_bytes=int(max_checkpoint_mb * 1_000_000) if max_checkpoint_mb else None,
        max_latency_p95_ms=max_latency_p95_ms,
        resamples=resamples,
    )
    inputs = gates.GateInputs(
        labels=labels(eval_df, spec),
        challenger_proba=score_model(model, spec, eval_df),
        champion_proba=champ_proba,
        champion_version=champ_version,
        slices={col: eval_df[col].astype(str).to_numpy() for col in slices if col in eval_df},
        checkpoint_bytes=checkpoint.checkpoint_bytes(verification.manifest),
        latency_p95_ms=latency.p95_ms,
    )
    decision = gate.decide(inputs)
    eval_sha = storage.digest_of(eval_uri)
    record_path = "gate/decision_record.json"
    record = gates.decision_record(
        gate,
        inputs,
        decision,
        context={
            "model_name": registered["model_name"],
            "model_version": version,
            "eval_uri": eval_uri,
            "eval_sha256": eval_sha,
            "latency": latency.to_dict(),
            "checkpoint_manifest_sha256": verification.manifest_sha256,
            "airflow_dag_id": ctx.dag_id,
            "airflow_run_id": ctx.run_id,
            "model": model_spec.name,
            "spec": str(model_spec.path),
            "policy": pol.to_dict(),
        },
    )
    registry.log_text(run_id, json.dumps(record, default=str), record_path)
    vs = next((ch for ch in decision.checks if ch.kind == "champion"), None)
    rec = {
        "stage": "gate_promotion",
        **decision.to_dict(),
        "model_name": registered["model_name"],
        "model_version": version,
        "eval_uri": eval_uri,
        "eval_sha256": eval_sha,
        "latency_p95_ms": latency.p95_ms,
        "record_uri": f"runs:/{run_id}/{record_path}",
        "model_url": _model_version_url(version),
        "report_table": gates.report_table(decision),
        "summary": decision.message,
        **_base(registered),
    }
    rec["report_markdown"] = _gate_markdown(ctx, registered, rec)
    registry.log_text(run_id, rec["report_markdown"], "gate/report.md")
    registry.log_metrics(run_id, decision.challenger_metrics, prefix="eval.challenger.")
    registry.log_metrics(run_id, {"latency_p95_ms": latency.p95_ms}, prefix="eval.challenger.")
    if decision.champion_metrics:
        registry.log_metrics(run_id, decision.champion_metrics, prefix="eval.champion.")
    tags = {
        "gate.verdict": decision.verdict,
        "gate.reason": decision.reason.value,
        "gate.reasons": ",".join(r.value for r in decision.reasons),
        "gate.metric": metric,
        "gate.margin": margin,
        "gate.floor": floor,
        "gate.improvement": improvement,
        "gate.non_inferiority_margin": non_inferiority_margin
        if non_inferiority_margin is not None
        else "off",
        "gate.champion_version": champ_version or "none",
        "gate.record": rec["record_uri"],
        f"eval.{metric}": f"{decision.challenger if decision.challenger is not None else float('nan'):.6f}",
        "eval.set_uri": eval_uri,
        "eval.set_sha256": eval_sha,
        "eval.latency_p95_ms": f"{latency.p95_ms:.3f}",
        "policy.overrides": json.dumps(list(pol.overrides), default=str)
        if pol.overrides
        else "none",
        "policy.spec": f"{model_spec.name} ({model_spec.path.name})",
        **(
            {
                "gate.difference": f"{vs.difference:+.6f}",
                "gate.ci": f"[{vs.ci_low:+.6f}, {vs.ci_high:+.6f}]",
            }
            if vs and vs.ci_low is not None
            else {}
        ),
    }
    if decision.promote:
        registry.tag_version(version, tags)
    else:
        registry.reject_version(version, [decision.message], tags)
    registry.describe_version(version, rec["report_markdown"])
    _stage(run_id, "gate_promotion", decision.verdict, decision.message, rec)
    return rec


def _model_version_url(version: str) -> str:
    s = get_settings()
    return f"{s.mlflow_ui_url.rstrip('/')}/#/models/{registry.model_name()}/versions/{version}"


def _short(text: str, limit: int = 160) -> str:
    """Tag values stay one glance long in the MLflow UI; the full text is in the run."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _gate_markdown(ctx: RunContext, registered: dict[str, Any], rec: dict[str, Any]) -> str:
    """The version's description: the gate's verdict and its table, readable in the MLflow UI."""
    cv = rec["champion_version"]
    gate = rec["gate"]
    ni = gate.get("non_inferiority_margin")
    reasons = "\n".join(f"- {part}" for part in str(rec["message"]).split("; ") if part)
    required = f"{gate['improvement']} improvement {gate['min_improvement']}" + (
        f", or non-inferiority within {ni}" if ni is not None else ""
    )
    return (
        f"### Gate: {rec['verdict'].upper()} — `{rec['reason']}`\n\n{reasons}\n\n"
        f"{rec['report_table']}\n\n"
        f"- compared: challenger v{registered['model_version']} vs "
        f"{'champion v' + cv if cv else 'no champion (floors and budgets only)'}\n"
        f"- trusted evaluation set: `{rec['eval_uri']}` (sha256 `{rec['eval_sha256'][:12]}`)\n"
        f"- Paired bootstrap: {gate['resamples']} resamples, seed {gate['seed']}; required {required}\n"
        f"- decision record (replayable): `{rec['record_uri']}`\n"
        f"- Airflow: {ctx.dag_id} / {ctx.run_id}"
    )


def promote_champion(
    ctx: RunContext, gated: dict[str, Any], approval: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Move ``champion`` to the gated version by compare-and-set — unless the gate rejected
    it, or a human reviewer (``approval``: the Airflow HITL response, when one was asked
    for) rejected it; a human rejection is recorded like a gate rejection."""
    from pipeline.gates import GateReason, human_rejection_reason

    run_id, version = gated["mlflow_run_id"], gated["model_version"]
    if gated["verdict"] != "promote":
        rec = {
            "stage": "promote_champion",
            "verdict": "not_promoted",
            "summary": f"v{version} rejected by the gate; champion untouched",
            **_base(gated),
        }
        _stage(run_id, "promote_champion", "not_promoted", rec["summary"], rec)
        return rec
    if approval is not None:
        who = approval.get("responded_by_user") or {}
        who_name = who.get("name") or who.get("id") if isinstance(who, dict) else str(who)
        at = str(approval.get("responded_at", ""))
        chosen = list(approval.get("chosen_options") or [])
        if chosen != ["Approve"]:
            reason = human_rejection_reason(
                who_name, str((approval.get("params_input") or {}).get("comment", ""))
            )
            registry.reject_version(
                version,
                [reason],
                {
                    "approval.verdict": "rejected",
                    "approval.by": who_name or "unknown",
                    "approval.at": at,
                    "promotion.reason": GateReason.HUMAN_REJECTED.value,
                },
            )
            approval_rec = {
                "stage": "approve_promotion",
                "verdict": "reject",
                "reason": GateReason.HUMAN_REJECTED.value,
                "reasons": [reason],
                "chosen_options": chosen,
                "responded_by": who_name,
                "responded_at": at,
                "model_version": version,
                "gate_verdict": gated["verdict"],
                "champion_version": gated["champion_version"],
                "gate_record_uri": gated.get("record_uri"),
            }
            registry.log_record(run_id, "approve_promotion", approval_rec)
            registry.log_text(
                run_id, json.dumps(approval_rec, indent=2), "gate/approval_record.json"
            )
            rec = {
                "stage": "promote_champion",
                "verdict": "not_promoted",
                "summary": f"v{version} passed the gate but was {reason}; champion untouched",
                **_base(gated),
            }
            _stage(run_id, "promote_champion", "not_promoted", rec["summary"], rec)
            return rec
        registry.tag_version(
            version,
            {
                "approval.verdict": "approved",
                "approval.by": who_name or "unknown",
                "approval.at": at,
            },
        )
    try:
        previous = registry.promote_champion(version, gated["champion_version"])
    except registry.RegistryConflict as exc:
        registry.tag_version(
            version, {"promotion.verdict": "conflict", "promotion.conflict": str(exc)}
        )
        _stage(
            run_id,
            "promote_champion",
            "conflict",
            str(exc),
            {"stage": "promote_champion", "verdict": "conflict", "error": str(exc), **_base(gated)},
        )
        raise
    registry.tag_version(version, {"promoted_at": ctx.now.isoformat(), "promoted_by": ctx.run_key})
    challenger = registry.alias_version(registry.CHALLENGER)
    if challenger is not None and str(challenger.version) == version:
        registry.delete_alias(registry.CHALLENGER)  # it serves now: no longer a candidate
    summary = f"champion -> v{version}" + (f" (previous_champion v{previous})" if previous else "")
    rec = {
        "stage": "promote_champion",
        "verdict": "promoted",
        "model_version": version,
        "previous_champion": previous,
        "summary": summary,
        **_base(gated),
    }
    _stage(run_id, "promote_champion", "promoted", summary, rec)
    return rec


# -- summary ---------------------------------------------------------------------------


def publish_summary(ctx: RunContext) -> dict[str, Any]:
    """Read every stage's verdict back from the MLflow run; store and return the summary."""
    c = registry.client()
    found = c.search_runs(
        [registry.experiment_id()], filter_string=f"tags.`{registry.RUN_KEY_TAG}` = '{ctx.run_key}'"
    )
    tags = found[0].data.tags if found else {}
    stages = {
        s: {
            "verdict": tags.get(f"stage.{s}.verdict", "not_run"),
            "summary": tags.get(f"stage.{s}.summary", ""),
        }
        for s in STAGES
    }
    champ = registry.alias_version(registry.CHAMPION)
    summary = {
        "run_key": ctx.run_key,
        "dag_id": ctx.dag_id,
        "run_id": ctx.run_id,
        "batch_uri": tags.get("data.batch_uri"),
        "model_version": tags.get("model.version"),
        "champion_version": str(champ.version) if champ else None,
        "stages": stages,
        "mlflow_run_id": found[0].info.run_id if found else None,
    }
    text = json.dumps(summary, indent=2, sort_keys=True)
    storage.write_text(  # content-named: a re-run that sees a new state adds, never overwrites
        storage.join(
            get_settings().storage_root,
            "runs",
            ctx.run_key,
            f"summary-{storage.sha256_bytes(text.encode())[:12]}.json",
        ),
        text,
    )
    if found:
        registry.log_record(found[0].info.run_id, "summary", summary)
        if found[0].info.status == "RUNNING":
            registry.end_run(found[0].info.run_id)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"run {summary['run_id']}  batch={summary.get('batch_uri')}"]
    for stage, s in summary["stages"].items():
        lines.append(f"  {stage:<20} {s['verdict']:<14} {s['summary']}")
    lines.append(
        f"  model version created: {summary.get('model_version') or '-'}   "
        f"champion: v{summary.get('champion_version') or '-'}"
    )
    return "\n".join(lines)


def resolve_batch_uri(param: str, asset_extras: list[dict[str, Any]], run_after: str) -> str:
    """Which batch this run processes: the param, else the asset event, else the date folder
    under the model's landing prefix — checked against the model's landing prefix and
    allowed sources before anything reads it (``check_batch_source``)."""
    chosen = None
    if param:
        chosen = param
    else:
        for extra in asset_extras:
            if extra and extra.get("batch_uri"):
                chosen = str(extra["batch_uri"])
                break
    if chosen is None:
        day = pd.Timestamp(run_after).strftime("%Y-%m-%d")
        chosen = storage.join(landing_prefix_uri(), f"date={day}", "batch.parquet")
    return check_batch_source(chosen)


# -- canary rollout (the promote_champion task's path when the DAG param `canary` is set) ----


def canary_rollout(
    ctx: RunContext,
    gated: dict[str, Any],
    approval: dict[str, Any] | None = None,
    *,
    service_url: str | None = None,
    plan: Any = None,
) -> dict[str, Any]:
    """Promote through a canary on the scoring service instead of directly.

    A gate or human rejection goes through ``promote_champion`` unchanged (recorded there,
    champion untouched). Otherwise ``canary.run_canary_rollout``: alias ``canary``, the
    plan's weight steps (settings), analysis read from ``<serving_url>/metrics``, then the
    compare-and-set promotion and bake — or weight 0, alias removed, ``rolled_back`` tag.
    The record goes to the run as ``records/canary_rollout.json`` and the stage tags of
    ``promote_champion`` (verdict promoted | rolled_back | rolled_back_after_bake | paused
    | aborted), so the summary shows it."""
    from pipeline import canary

    chosen = list((approval or {}).get("chosen_options") or [])
    if gated["verdict"] != "promote" or (approval is not None and chosen != ["Approve"]):
        return promote_champion(ctx, gated, approval)
    run_id, version = gated["mlflow_run_id"], gated["model_version"]
    if approval is not None:
        who = approval.get("responded_by_user") or {}
        registry.tag_version(
            version,
            {
                "approval.verdict": "approved",
                "approval.at": str(approval.get("responded_at", "")),
                "approval.by": (
                    who.get("name") or who.get("id") if isinstance(who, dict) else str(who)
                )
                or "unknown",
            },
        )
    out = canary.run_canary_rollout(
        version,
        gated["champion_version"],
        plan=plan,
        service_url=service_url,
        run_key=ctx.run_key,
        actor=f"{ctx.dag_id}/{ctx.run_id}",
    )
    if out["verdict"] == "aborted" and out["reason"] == canary.CanaryReason.MEASUREMENT_ERRORS:
        # the service could not be measured (down, restarting): nothing was judged, the
        # canary is out of traffic — fail this attempt so Airflow retries it later
        _stage(run_id, "promote_champion", "aborted", f"canary: {out['summary']}", out)
        raise RuntimeError(f"canary of v{version} aborted, retry later: {out['summary']}")
    rec = {
        "stage": "promote_champion",
        "path": "canary",
        "verdict": out["verdict"],
        "reason": out["reason"],
        "model_version": version,
        "previous_champion": out.get("previous_champion"),
        "summary": out["summary"],
        "canary": {k: out.get(k) for k in ("step_reached", "weight_reached", "seconds", "bake")},
        **_base(gated),
    }
    _stage(run_id, "promote_champion", out["verdict"], f"canary: {out['summary']}", rec)
    return rec
