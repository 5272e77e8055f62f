"""The data stages: which batch, its snapshot, its validation, its drift, the retrain decision."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from pipeline import decisions, quarantine, registry, storage
from pipeline.errors import DataRejected
from pipeline.names import RunTag, Task, stage_verdict_tag
from pipeline.spec import Policy, PolicyViolation, active
from pipeline.stages.context import RunContext, contract, record_stage, run_policy
from pipeline.stages.records import Drifted, Ingested, RetrainDecided, Validated

EVAL_SAMPLE_ROWS = 200_000  # champion scored on at most this many rows of a batch (seeded)
_log = logging.getLogger(__name__)


def resolve_batch_uri(param: str | None, asset_extras: list[dict[str, Any]], run_after: str) -> str:
    """Which batch this run processes: the param, else the asset event, else the date folder
    under the model's landing prefix — checked against the model's landing prefix and
    allowed sources before anything reads it (``quarantine.check_batch_source``)."""
    import pandas as pd

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
        chosen = storage.join(quarantine.landing_prefix_uri(), f"date={day}", "batch.parquet")
    return quarantine.check_batch_source(chosen)


def ingest_batch(ctx: RunContext, batch_uri: str, policy: Policy | None = None) -> Ingested:
    """Snapshot the batch (content-addressed). The source is checked against the model's
    landing prefix and allowed sources first, and ``policy`` (the run's, already resolved:
    a loosening was refused before this) is recorded on the run."""
    batch_uri = quarantine.check_batch_source(batch_uri)  # first: refused before the imports

    from pipeline.ingest import snapshot
    from pipeline.train.model import FactoryError, check_factory

    spec = active()
    try:  # a factory that cannot build the spec's model fails the run before any data is read
        check_factory(spec)
    except FactoryError as exc:
        raise PolicyViolation(str(exc)) from exc
    run_id = registry.get_or_create_run(
        ctx.run_key,
        {
            RunTag.DAG_ID: ctx.dag_id,
            RunTag.RUN_ID: ctx.run_id,
            RunTag.MODEL: spec.name,
            RunTag.SPEC: str(spec.path),
        },
    )
    if policy is not None and policy.overrides:
        registry.set_tags(
            run_id, {RunTag.POLICY_OVERRIDES: json.dumps(list(policy.overrides), default=str)}
        )
    where = quarantine.rejected_before(batch_uri)
    if where is not None:
        registry.set_tags(run_id, {stage_verdict_tag(Task.INGEST_BATCH): "quarantined"})
        raise DataRejected(
            f"batch {batch_uri} was already rejected and moved to {where}; "
            "see reason.txt there, and land a corrected batch under a new name"
        )
    snap, error = snapshot(batch_uri)  # rows from the Parquet footer: no frame is loaded
    registry.set_tags(
        run_id,
        {
            RunTag.BATCH_URI: batch_uri,
            RunTag.SNAPSHOT_URI: snap.uri,
            RunTag.SNAPSHOT_SHA256: snap.sha256,
            RunTag.ROWS: snap.rows,
        },
    )
    rec = Ingested(
        verdict="unreadable" if error else "ok",
        summary=error or f"{snap.rows} rows, snapshot sha256 {snap.sha256[:12]}",
        uri=snap.uri,
        sha256=snap.sha256,
        rows=snap.rows,
        source_uri=snap.source_uri,
        parse_error=error,
        model=spec.name,
        mlflow_run_id=run_id,
        mlflow_experiment_id=registry.experiment_id(),
    )
    record_stage(rec)
    return rec


def validate_batch(ctx: RunContext, ingested: Ingested) -> Validated:
    """Validate the snapshot (streaming); store the report beside it and on the MLflow run;
    count the batch in the ledger; on rejection quarantine it and stop the run.

    Only the content is judged: a storage failure while reading (timeout, dropped
    connection, 5xx) raises ``storage.TransientStorageError`` before anything is written,
    quarantined or counted, so Airflow retries the task on the same snapshot."""
    from pipeline import validate

    ingested = Ingested.from_xcom(ingested)
    run_id = ingested.mlflow_run_id
    # leakage is judged against the champion's training snapshot: new predictive power only
    champ = registry.alias_version(registry.CHAMPION)
    reference = champ.tags.get(RunTag.SNAPSHOT_URI) if champ is not None else None
    report = validate.validate_uri(
        ingested.uri, contract(), now=ctx.now, reference_uri=reference
    )  # never raises on data
    report_dict, summary, passed = report.to_dict(), report.summary(), report.success
    html = validate.render_html(report, title=f"Validation of {ingested.source_uri}")
    report_text = json.dumps(report_dict, indent=2, default=str)
    folder = storage.join(ingested.uri.rsplit("/", 1)[0], "reports", ctx.run_key)
    json_obj = storage.write_text(storage.join(folder, "validation.json"), report_text)
    html_obj = storage.write_text(storage.join(folder, "validation.html"), html)
    registry.log_text(run_id, html, "validation/report.html")
    registry.log_text(run_id, report_text, "validation/report.json")
    failing = [
        f"{r.expectation} on {validate.display_name(r.column) if r.column else 'the table'}"
        for r in report.failures()
    ]
    verdict = "pass" if passed else "reject"
    where, how = (None, None)
    if not passed:
        where, how = quarantine.quarantine(ingested, report_text, html, summary)
    counts = quarantine.ledger(ctx.run_key, ingested, verdict, summary)
    rec = Validated(
        verdict=verdict,
        summary=summary,
        report_uri=json_obj.uri,
        html_uri=html_obj.uri,
        rows=report.rows,
        failed_expectations=failing,
        extra_columns=list(report.extra_columns),
        quarantine_uri=where,
        quarantined=how,
        ledger=counts,
        **ingested.base(),
    )
    registry.log_metrics(
        run_id,
        {
            "validation.failed_expectations": len(failing),
            "validation.rows": report.rows,
            "batches.accepted_total": counts["accepted"],
            "batches.rejected_total": counts["rejected"],
        },
    )
    record_stage(rec)
    if not passed:
        registry.end_run(run_id, "FAILED")
        shown = ", ".join(failing[:8]) + (
            f" and {len(failing) - 8} more" if len(failing) > 8 else ""
        )
        raise DataRejected(
            f"batch {ingested.source_uri} rejected by the data contract: {summary}. "
            f"Failing expectations: {shown}. Report: {html_obj.uri} (JSON: {json_obj.uri}). "
            f"The batch was {how} to {where}; "
            "fix the producer and land a corrected batch under a new name."
        )
    return rec


def _metric_key(prefix: str, column: str) -> str:
    """An MLflow metric key for a column: only [A-Za-z0-9_.-], short, never a path."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", column)[:60]
    if safe != column:
        safe += "_" + storage.sha256_bytes(column.encode())[:8]
    return f"{prefix}.{safe}"


def detect_drift(ctx: RunContext, ingested: Ingested) -> Drifted:
    import pandas as pd

    from pipeline import checkpoint, drift, reference_stats
    from pipeline.evaluate import evaluate_model
    from pipeline.ingest import read_sample

    ingested = Ingested.from_xcom(ingested)
    c = contract()
    run_id = ingested.mlflow_run_id
    champ = registry.alias_version(registry.CHAMPION)
    if champ is None:
        rec = Drifted(
            verdict="no_reference",
            has_champion=False,
            summary="no champion yet: nothing to compare against",
            **ingested.base(),
        )
        record_stage(rec)
        return rec
    # The champion's reference statistics, cached at its registration and verified
    # (pipeline.reference_stats); absent or untrusted: computed from its training snapshot.
    # Then one streaming pass over the batch; Evidently's page on samples for people.
    stats, how = reference_stats.load_for_version(champ, c)
    if stats is None:
        _log.warning(
            "detect_drift: %s; computing them from %s", how, champ.tags[RunTag.SNAPSHOT_URI]
        )
    report, html = drift.detect_drift_uris(
        stats if stats is not None else champ.tags[RunTag.SNAPSHOT_URI],
        ingested.uri,
        c,
        share_threshold=active().retrain.drift_share,
    )
    if stats is not None:
        if stats.reads:
            how += f"; read from the snapshot for exact scores: {', '.join(stats.reads)}"
        _log.info("detect_drift: %s", how)
    registry.set_tags(
        run_id,
        {
            RunTag.DRIFT_REFERENCE: ("cached: " if stats is not None else "recomputed: ")
            + how[:4000]
        },
    )
    html_obj = storage.write_text(
        storage.join(ingested.uri.rsplit("/", 1)[0], "reports", ctx.run_key, "drift.html"), html
    )
    registry.log_text(run_id, html, "drift/report.html")
    registry.log_text(run_id, json.dumps(report.to_dict(), indent=2), "drift/report.json")
    model, spec, _ = checkpoint.load_for_inference(champ.tags["checkpoint.uri"])
    metric = active().primary_metric
    labelled = read_sample(ingested.uri, EVAL_SAMPLE_ROWS, columns=c.column_names)
    on_batch = evaluate_model(model, spec, labelled).get(metric)
    at_promotion = champ.tags.get(f"eval.{metric}")
    age_days = None
    if champ.tags.get("promoted_at"):
        age_days = (ctx.now - pd.Timestamp(champ.tags["promoted_at"])).total_seconds() / 86_400
    rec = Drifted(
        verdict="drift" if report.dataset_drift else "no_drift",
        has_champion=True,
        champion_version=str(champ.version),
        report=report.to_dict(),
        html_uri=html_obj.uri,
        dataset_drift=report.dataset_drift,
        drift_share=report.drift_share,
        share_threshold=report.share_threshold,
        drifted_columns=list(report.drifted_columns()),
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
        **ingested.base(),
    )
    metrics = {
        "drift_share": report.drift_share,
        "drift.label_drifted": float(report.label_drifted),
        f"champion_{metric}_on_batch": on_batch or float("nan"),
    }
    for col in report.columns:
        metrics[_metric_key("drift.score", col.column)] = col.score
        metrics[_metric_key("drift.drifted", col.column)] = float(col.drifted)
    registry.log_metrics(run_id, metrics)
    record_stage(rec)
    return rec


def production_decay(extras: list[Any], batch_uri: str | None) -> str | None:
    """The monitor's verdict when this run was started by ``monitor_<model>`` on decay (an
    asset event with ``extra.trigger == "champion_decaying"`` for this model) and runs on that
    event's batch; None otherwise. Such a run retrains even on a batch that shows no drift:
    the decay was seen on live traffic, not on the batch. An event can only ask for a retrain,
    which ``force_retrain`` already allows any trigger user; the gate still judges the result."""
    if batch_uri:  # an explicit batch: the event did not choose this run's data
        return None
    for extra in extras:
        if (
            isinstance(extra, dict)
            and extra.get("trigger") == "champion_decaying"
            and extra.get("model") == active().name
        ):
            version = str(extra.get("champion_version", "?"))[:20]
            return f"v{version}: {str(extra.get('summary', ''))[:300]}"
    return None


def decide_retrain(
    ctx: RunContext,
    drifted: Drifted,
    force: bool = False,
    policy: Policy | None = None,
    production_decay: str | None = None,
) -> RetrainDecided:
    from pipeline.decide import RetrainEvidence, RetrainPolicy

    drifted = Drifted.from_xcom(drifted)
    run = policy or run_policy()
    rule = RetrainPolicy(decay_margin=run.decay_margin, max_model_age_days=run.max_model_age_days)
    evidence = RetrainEvidence(
        has_champion=drifted.has_champion,
        dataset_drift=drifted.dataset_drift,
        drift_share=drifted.drift_share,
        label_drifted=drifted.label_drifted,
        champion_metric_at_promotion=drifted.champion_metric_at_promotion,
        champion_metric_on_batch=drifted.champion_metric_on_batch,
        champion_age_days=drifted.champion_age_days,
        forced=force,
        production_decay=production_decay,
        direction=active().direction,
        metric=drifted.champion_metric or active().primary_metric,
        drift_share_threshold=drifted.share_threshold,
        drifted_columns=tuple(drifted.drifted_columns),
    )
    decision = rule.decide(evidence)
    run_id = drifted.mlflow_run_id
    path = decisions.record_path(decision.KIND)
    registry.log_text(
        run_id,
        json.dumps(rule.record(decision, {"run_key": ctx.run_key}), indent=2, default=str),
        path,
    )
    d = decision.to_dict()
    rec = RetrainDecided(
        verdict=decision.verdict.value,
        summary=decision.summary(),
        reason=d["reason"],
        reasons=d["reasons"],
        message=d["message"],
        evidence=d["evidence"],
        policy=d["policy"],
        record_uri=f"runs:/{run_id}/{path}",
        **drifted.base(),
    )
    registry.set_tags(
        run_id,
        {
            RunTag.RETRAIN_VERDICT: rec.verdict,
            RunTag.RETRAIN_REASONS: ",".join(rec.reasons),
        },
    )
    registry.log_metrics(run_id, {"retrain.decision": float(decision.retrain)})
    record_stage(rec)
    return rec


__all__ = [
    "EVAL_SAMPLE_ROWS",
    "decide_retrain",
    "detect_drift",
    "ingest_batch",
    "resolve_batch_uri",
    "validate_batch",
]
