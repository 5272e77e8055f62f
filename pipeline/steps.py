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
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline import registry, storage
from pipeline.contract import default_contract
from pipeline.errors import CheckpointRejected, DataRejected, PipelineRejection
from pipeline.settings import get_settings

log = logging.getLogger(__name__)

STAGES = (
    "ingest_batch", "validate_batch", "detect_drift", "decide_retrain", "train_model",
    "verify_checkpoint", "register_challenger", "gate_promotion", "promote_champion",
)  # fmt: skip


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
    registry.set_tags(run_id, {f"stage.{stage}.verdict": verdict,
                               f"stage.{stage}.summary": summary[:4000]})  # fmt: skip
    registry.log_record(run_id, stage, record)
    log.info("%s: %s — %s", stage, verdict, summary)


def _base(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: rec[k] for k in ("mlflow_run_id", "mlflow_experiment_id") if k in rec}


# -- ingest ---------------------------------------------------------------------------


def quarantine_root(snapshot_sha: str) -> str:
    return storage.join(get_settings().storage_root, "quarantine", snapshot_sha[:24])


def ingest_batch(ctx: RunContext, batch_uri: str) -> dict[str, Any]:
    from pipeline.ingest import snapshot_batch

    run_id = registry.get_or_create_run(
        ctx.run_key, {"airflow.dag_id": ctx.dag_id, "airflow.run_id": ctx.run_id}
    )
    if not storage.exists(batch_uri) and storage.exists(_quarantine_index(batch_uri)):
        where = json.loads(storage.read_text(_quarantine_index(batch_uri)))["quarantine_uri"]
        registry.set_tags(run_id, {"stage.ingest_batch.verdict": "quarantined"})
        raise DataRejected(f"batch {batch_uri} was already rejected and moved to {where}; "
                           "see reason.txt there, and land a corrected batch under a new name")
    snap, _df, error = snapshot_batch(batch_uri)
    registry.set_tags(run_id, {"data.batch_uri": batch_uri, "data.snapshot_uri": snap.uri,
                               "data.snapshot_sha256": snap.sha256, "data.rows": snap.rows})  # fmt: skip
    rec = {"stage": "ingest_batch", "verdict": "unreadable" if error else "ok",
           **snap.to_dict(), "parse_error": error,
           "mlflow_run_id": run_id, "mlflow_experiment_id": registry.experiment_id()}  # fmt: skip
    _stage(run_id, "ingest_batch", rec["verdict"],
           error or f"{snap.rows} rows, snapshot sha256 {snap.sha256[:12]}", rec)  # fmt: skip
    return rec


# -- validate -------------------------------------------------------------------------


def validate_batch(ctx: RunContext, ingested: dict[str, Any]) -> dict[str, Any]:
    from pipeline import validate
    from pipeline.ingest import read_frame

    contract = default_contract()
    run_id = ingested["mlflow_run_id"]
    try:
        df = read_frame(ingested["uri"])
        report = validate.validate_frame(df, contract, now=ctx.now)
        report_dict, summary, passed = report.to_dict(), report.summary(), report.success
        html = validate.render_html(report, title=f"Validation of {ingested['source_uri']}")
    except (OSError, ValueError) as exc:
        summary = f"batch is not readable as Parquet: {exc}"
        report_dict, passed = {"success": False, "error": summary}, False
        html = f"<html><body><h1>Rejected</h1><p>{summary}</p></body></html>"
    folder = storage.join(ingested["uri"].rsplit("/", 1)[0], "reports", ctx.run_key)
    json_obj = storage.write_text(storage.join(folder, "validation.json"),
                                  json.dumps(report_dict, indent=2, default=str))  # fmt: skip
    html_obj = storage.write_text(storage.join(folder, "validation.html"), html)
    registry.log_text(run_id, html, "validation/report.html")
    registry.log_text(run_id, json.dumps(report_dict, indent=2, default=str), "validation/report.json")
    rec = {"stage": "validate_batch", "verdict": "pass" if passed else "reject",
           "summary": summary, "report_uri": json_obj.uri, "html_uri": html_obj.uri,
           **_base(ingested)}  # fmt: skip
    if not passed:
        rec["quarantine_uri"] = _quarantine(ingested, rec, summary)
    _stage(run_id, "validate_batch", rec["verdict"], summary, rec)
    if not passed:
        registry.end_run(run_id, "FAILED")
        raise DataRejected(
            f"batch {ingested['source_uri']} rejected by the data contract: {summary}. "
            f"Report: {html_obj.uri}. The batch was moved to {rec['quarantine_uri']}; "
            "fix the producer and land a corrected batch under a new name."
        )
    return rec


def _quarantine(ingested: dict[str, Any], rec: dict[str, Any], summary: str) -> str:
    """Move the landing batch (never delete) beside its report and a reason file."""
    root = quarantine_root(ingested["sha256"])
    storage.write_text(storage.join(root, "reason.txt"), summary + "\n")
    storage.write_text(storage.join(root, "validation.json"), storage.read_text(rec["report_uri"]))
    storage.write_text(storage.join(root, "source.json"),
                       json.dumps({"source_uri": ingested["source_uri"],
                                   "snapshot_uri": ingested["uri"],
                                   "sha256": ingested["sha256"]}, indent=2))  # fmt: skip
    src = ingested["source_uri"]
    storage.write_text(_quarantine_index(src), json.dumps({"quarantine_uri": root}))
    if storage.exists(src):
        storage.move(src, storage.join(root, "batch.parquet"))
    return root


def _quarantine_index(source_uri: str) -> str:
    key = storage.sha256_bytes(source_uri.encode())[:24]
    return storage.join(get_settings().storage_root, "quarantine", "by-source", f"{key}.json")


# -- drift and the retrain decision ----------------------------------------------------


def detect_drift(ctx: RunContext, ingested: dict[str, Any]) -> dict[str, Any]:
    from pipeline import checkpoint, drift
    from pipeline.evaluate import evaluate_model
    from pipeline.ingest import read_frame

    contract = default_contract()
    run_id = ingested["mlflow_run_id"]
    champ = registry.alias_version(registry.CHAMPION)
    rec: dict[str, Any] = {"stage": "detect_drift", **_base(ingested)}
    if champ is None:
        rec.update(verdict="no_reference", has_champion=False,
                   summary="no champion yet: nothing to compare against")  # fmt: skip
        _stage(run_id, "detect_drift", rec["verdict"], rec["summary"], rec)
        return rec
    current = read_frame(ingested["uri"])
    reference = read_frame(champ.tags["data.snapshot_uri"])
    report, html = drift.detect_drift(reference, current, contract)
    html_obj = storage.write_text(
        storage.join(ingested["uri"].rsplit("/", 1)[0], "reports", ctx.run_key, "drift.html"), html
    )
    registry.log_text(run_id, html, "drift/report.html")
    model, spec, _ = checkpoint.load_for_inference(champ.tags["checkpoint.uri"])
    metric = get_settings_metric()
    on_batch = evaluate_model(model, spec, current).get(metric)
    at_promotion = champ.tags.get(f"eval.{metric}")
    age_days = None
    if champ.tags.get("promoted_at"):
        age_days = (ctx.now - pd.Timestamp(champ.tags["promoted_at"])).total_seconds() / 86_400
    rec.update(
        verdict="drift" if report.dataset_drift else "no_drift", has_champion=True,
        champion_version=str(champ.version), report=report.to_dict(), html_uri=html_obj.uri,
        dataset_drift=report.dataset_drift, drift_share=report.drift_share,
        drifted_columns=report.drifted_columns(),
        label_drifted=contract.target in report.drifted_columns(),
        champion_metric=metric, champion_metric_on_batch=on_batch,
        champion_metric_at_promotion=float(at_promotion) if at_promotion else None,
        champion_age_days=age_days,
        summary=report.summary() + (f"; champion v{champ.version} {metric} on this batch "
                                    f"{on_batch:.4f} (at promotion {at_promotion})"
                                    if on_batch is not None else ""),
    )  # fmt: skip
    registry.log_metrics(run_id, {"drift_share": report.drift_share,
                                  f"champion_{metric}_on_batch": on_batch or float("nan")})  # fmt: skip
    _stage(run_id, "detect_drift", rec["verdict"], rec["summary"], rec)
    return rec


def get_settings_metric() -> str:
    return "roc_auc"


def decide_retrain(
    ctx: RunContext, drifted: dict[str, Any], force: bool = False, decay_margin: float = 0.03,
    max_model_age_days: float = 30.0,
) -> dict[str, Any]:
    from pipeline.decide import RetrainEvidence, RetrainPolicy

    policy = RetrainPolicy(decay_margin=decay_margin, max_model_age_days=max_model_age_days)
    evidence = RetrainEvidence(
        has_champion=bool(drifted.get("has_champion")),
        dataset_drift=drifted.get("dataset_drift"), drift_share=drifted.get("drift_share"),
        label_drifted=drifted.get("label_drifted"),
        champion_metric_at_promotion=drifted.get("champion_metric_at_promotion"),
        champion_metric_on_batch=drifted.get("champion_metric_on_batch"),
        champion_age_days=drifted.get("champion_age_days"), forced=force,
    )  # fmt: skip
    decision = policy.decide(evidence)
    rec = {"stage": "decide_retrain", **decision.to_dict(), "summary": decision.summary(),
           **_base(drifted)}  # fmt: skip
    _stage(drifted["mlflow_run_id"], "decide_retrain", decision.verdict, decision.summary(), rec)
    return rec


# -- training and the checkpoint ------------------------------------------------------


def train_model(
    ctx: RunContext, ingested: dict[str, Any], *, max_epochs: int = 30,
    learning_rate: float = 3e-3, seed: int = 0, batch_size: int = 512,
) -> dict[str, Any]:
    from pipeline import checkpoint
    from pipeline.ingest import read_frame
    from pipeline.train.loop import TrainConfig, TrainingDiverged, split_by_id, train

    contract = default_contract()
    run_id = ingested["mlflow_run_id"]
    df = read_frame(ingested["uri"])
    cfg = TrainConfig(max_epochs=max_epochs, learning_rate=learning_rate, seed=seed,
                      batch_size=batch_size, device=get_settings().device)  # fmt: skip
    c = registry.client()
    for k, v in cfg.to_dict().items():
        try:
            c.log_param(run_id, f"train.{k}", v)
        except Exception:  # noqa: BLE001 - a retry logs the same params again
            pass
    try:
        result = train(df, contract, cfg)
    except TrainingDiverged as exc:
        _stage(run_id, "train_model", "diverged", str(exc), {"error": str(exc)})
        raise PipelineRejection(str(exc)) from exc
    for row in result.history:
        registry.log_metrics(run_id, {k: v for k, v in row.items() if k != "epoch"},
                             prefix="train.", step=int(row["epoch"]))  # fmt: skip
    probe = df[split_by_id(df[contract.id_column], cfg.val_fraction)].head(256)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "checkpoint"
        checkpoint.save_checkpoint(
            local, result.model, result.features, probe,
            data_snapshot={"uri": ingested["uri"], "sha256": ingested["sha256"]},
            training={"config": cfg.to_dict(), "stop_reason": result.stop_reason,
                      "best_epoch": result.best_epoch, "val_metrics": result.val_metrics,
                      "device": result.device},
        )  # fmt: skip
        digest = checkpoint.manifest_digest(local)
        uri = storage.join(get_settings().storage_root, "checkpoints", digest[:24])
        checkpoint.publish(local, uri)
        c.log_artifacts(run_id, str(local), "checkpoint")
    summary = (f"{len(result.history)} epochs on {result.device}, stop={result.stop_reason}, "
               f"best epoch {result.best_epoch}, val roc_auc "
               f"{result.val_metrics.get('roc_auc', float('nan')):.4f}")  # fmt: skip
    rec = {"stage": "train_model", "verdict": "trained", "checkpoint_uri": uri,
           "manifest_sha256": digest, "stop_reason": result.stop_reason,
           "epochs": len(result.history), "best_epoch": result.best_epoch,
           "val_metrics": result.val_metrics, "device": result.device, "summary": summary,
           **_base(ingested)}  # fmt: skip
    _stage(run_id, "train_model", "trained", summary, rec)
    return rec


def verify_checkpoint(ctx: RunContext, trained: dict[str, Any]) -> dict[str, Any]:
    from pipeline import checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        v = checkpoint.verify_checkpoint(checkpoint.fetch(trained["checkpoint_uri"], Path(tmp) / "c"))
    digest_ok = v.manifest_sha256 == trained["manifest_sha256"]
    problems = v.problems + ([] if digest_ok or not v.manifest_sha256 else
                             [f"manifest digest {v.manifest_sha256[:12]} is not the one trained "
                              f"({trained['manifest_sha256'][:12]})"])  # fmt: skip
    verdict = "intact" if not problems else "rejected"
    summary = "digests, signature, finite tensors, reload parity: ok" if not problems else "; ".join(problems)
    rec = {"stage": "verify_checkpoint", "verdict": verdict, "problems": problems,
           "checkpoint_uri": trained["checkpoint_uri"], "manifest_sha256": v.manifest_sha256,
           "summary": summary, **_base(trained)}  # fmt: skip
    _stage(trained["mlflow_run_id"], "verify_checkpoint", verdict, summary, rec)
    if problems:
        raise CheckpointRejected(f"checkpoint {trained['checkpoint_uri']} is not intact: {summary}")
    return rec


# -- registry, gate, promotion --------------------------------------------------------


def register_challenger(
    ctx: RunContext, ingested: dict[str, Any], trained: dict[str, Any], verified: dict[str, Any]
) -> dict[str, Any]:
    run_id = ingested["mlflow_run_id"]
    tags = {
        "data.snapshot_uri": ingested["uri"], "data.snapshot_sha256": ingested["sha256"],
        "data.batch_uri": ingested["source_uri"], "airflow.dag_id": ctx.dag_id,
        "airflow.run_id": ctx.run_id, "checkpoint.uri": trained["checkpoint_uri"],
        "checkpoint.manifest_sha256": verified["manifest_sha256"],
        "checkpoint.signature": "verified", "train.stop_reason": trained["stop_reason"],
        "validation.verdict": "pass",
    }  # fmt: skip
    version = registry.register_version(
        run_id, ctx.run_key, trained["checkpoint_uri"], tags,
        description=f"Trained by {ctx.dag_id} run {ctx.run_id} on snapshot "
        f"{ingested['sha256'][:12]}. Gate decision pending.",
    )
    registry.set_alias(registry.CHALLENGER, version)
    rec = {"stage": "register_challenger", "verdict": "registered",
           "model_name": get_settings().model_name, "model_version": version,
           "summary": f"registered v{version}, alias challenger", **_base(ingested)}  # fmt: skip
    _stage(run_id, "register_challenger", "registered", rec["summary"], rec)
    registry.set_tags(run_id, {"model.version": version})
    return rec


def gate_promotion(
    ctx: RunContext, registered: dict[str, Any], *, margin: float = 0.005, floor: float = 0.7,
    eval_uri: str = "",
) -> dict[str, Any]:
    from pipeline import checkpoint
    from pipeline.evaluate import evaluate_model
    from pipeline.gates import PromotionGate
    from pipeline.ingest import read_frame

    run_id, version = registered["mlflow_run_id"], registered["model_version"]
    eval_uri = eval_uri or get_settings().trusted_eval_uri
    eval_df = read_frame(eval_uri)
    c = registry.client()
    mv = c.get_model_version(get_settings().model_name, version)
    model, spec, _ = checkpoint.load_for_inference(mv.tags["checkpoint.uri"])
    challenger = evaluate_model(model, spec, eval_df)
    champ = registry.alias_version(registry.CHAMPION)
    champion = champ_version = None
    if champ is not None and str(champ.version) != version:
        cm, cs, _ = checkpoint.load_for_inference(champ.tags["checkpoint.uri"])
        champion, champ_version = evaluate_model(cm, cs, eval_df), str(champ.version)
    gate = PromotionGate(metric=get_settings_metric(), margin=margin, floor=floor)
    decision = gate.decide(challenger, champion, champ_version)
    eval_sha = storage.digest_of(eval_uri)
    rec = {"stage": "gate_promotion", **decision.to_dict(), "model_name": registered["model_name"],
           "model_version": version, "eval_uri": eval_uri, "eval_sha256": eval_sha,
           "challenger_metrics": challenger, "champion_metrics": champion,
           "summary": decision.message, **_base(registered)}  # fmt: skip
    registry.log_metrics(run_id, challenger, prefix="eval.challenger.")
    if champion:
        registry.log_metrics(run_id, champion, prefix="eval.champion.")
    registry.tag_version(version, {
        "gate.verdict": decision.verdict, "gate.reason": decision.reason.value,
        "gate.metric": decision.metric, "gate.margin": margin, "gate.floor": floor,
        "gate.champion_version": champ_version or "none",
        f"eval.{decision.metric}": f"{challenger.get(decision.metric, float('nan')):.6f}",
        "eval.set_uri": eval_uri, "eval.set_sha256": eval_sha,
        **({"rejected": "true", "rejection_reason": decision.message} if not decision.promote else {}),
    })  # fmt: skip
    registry.describe_version(version, _gate_markdown(ctx, registered, rec))
    _stage(run_id, "gate_promotion", decision.verdict, decision.message, rec)
    return rec


def _gate_markdown(ctx: RunContext, registered: dict[str, Any], rec: dict[str, Any]) -> str:
    ch, cp = rec["challenger_metrics"], rec["champion_metrics"] or {}
    rows = "\n".join(
        f"| {k} | {ch.get(k, float('nan')):.4f} | "
        f"{cp[k]:.4f} |" if k in cp else f"| {k} | {ch.get(k, float('nan')):.4f} | — |"
        for k in ("roc_auc", "pr_auc", "log_loss", "accuracy")
    )
    return (
        f"**Gate: {rec['verdict'].upper()}** — {rec['message']}\n\n"
        f"| metric | challenger v{registered['model_version']} | champion "
        f"{'v' + rec['champion_version'] if rec['champion_version'] else '(none)'} |\n"
        f"|---|---|---|\n{rows}\n\n"
        f"Evaluation set: `{rec['eval_uri']}` (sha256 {rec['eval_sha256'][:12]}). "
        f"Margin {rec['margin']}, floor {rec['floor']}. Run: {ctx.dag_id} / {ctx.run_id}."
    )


def promote_champion(ctx: RunContext, gated: dict[str, Any]) -> dict[str, Any]:
    run_id, version = gated["mlflow_run_id"], gated["model_version"]
    if gated["verdict"] != "promote":
        rec = {"stage": "promote_champion", "verdict": "not_promoted",
               "summary": f"v{version} rejected by the gate; champion untouched", **_base(gated)}  # fmt: skip
        _stage(run_id, "promote_champion", "not_promoted", rec["summary"], rec)
        return rec
    previous = registry.promote_champion(version, gated["champion_version"])
    registry.tag_version(version, {"promoted_at": ctx.now.isoformat(), "promoted_by": ctx.run_key})
    summary = f"champion -> v{version}" + (f" (previous_champion v{previous})" if previous else "")
    rec = {"stage": "promote_champion", "verdict": "promoted", "model_version": version,
           "previous_champion": previous, "summary": summary, **_base(gated)}  # fmt: skip
    _stage(run_id, "promote_champion", "promoted", summary, rec)
    return rec


# -- summary ---------------------------------------------------------------------------


def publish_summary(ctx: RunContext) -> dict[str, Any]:
    """Read every stage's verdict back from the MLflow run; store and return the summary."""
    c = registry.client()
    found = c.search_runs([registry.experiment_id()],
                          filter_string=f"tags.`{registry.RUN_KEY_TAG}` = '{ctx.run_key}'")  # fmt: skip
    tags = found[0].data.tags if found else {}
    stages = {s: {"verdict": tags.get(f"stage.{s}.verdict", "not_run"),
                  "summary": tags.get(f"stage.{s}.summary", "")} for s in STAGES}  # fmt: skip
    champ = registry.alias_version(registry.CHAMPION)
    summary = {
        "run_key": ctx.run_key, "dag_id": ctx.dag_id, "run_id": ctx.run_id,
        "batch_uri": tags.get("data.batch_uri"), "model_version": tags.get("model.version"),
        "champion_version": str(champ.version) if champ else None, "stages": stages,
        "mlflow_run_id": found[0].info.run_id if found else None,
    }  # fmt: skip
    text = json.dumps(summary, indent=2, sort_keys=True)
    storage.write_text(  # content-named: a re-run that sees a new state adds, never overwrites
        storage.join(get_settings().storage_root, "runs", ctx.run_key,
                     f"summary-{storage.sha256_bytes(text.encode())[:12]}.json"), text,
    )  # fmt: skip
    if found:
        registry.log_record(found[0].info.run_id, "summary", summary)
        if found[0].info.status == "RUNNING":
            registry.end_run(found[0].info.run_id)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"run {summary['run_id']}  batch={summary.get('batch_uri')}"]
    for stage, s in summary["stages"].items():
        lines.append(f"  {stage:<20} {s['verdict']:<14} {s['summary']}")
    lines.append(f"  model version created: {summary.get('model_version') or '-'}   "
                 f"champion: v{summary.get('champion_version') or '-'}")  # fmt: skip
    return "\n".join(lines)


def resolve_batch_uri(param: str, asset_extras: list[dict[str, Any]], run_after: str) -> str:
    """Which batch this run processes: the param, else the asset event, else the date folder."""
    if param:
        return param
    for extra in asset_extras:
        if extra and extra.get("batch_uri"):
            return str(extra["batch_uri"])
    day = pd.Timestamp(run_after).strftime("%Y-%m-%d")
    return storage.join(get_settings().landing_root, f"date={day}", "batch.parquet")
