"""The promotion stages: register the challenger, gate it, ask a human if the policy says so,
and move ``champion`` (directly, or through a canary on the scoring service)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from pipeline import decisions, ledger, registry, storage
from pipeline.errors import CheckpointRejected, DataRejected, PipelineRejection
from pipeline.names import RunTag, Task, VersionTag, stage_summary_tag, stage_verdict_tag
from pipeline.settings import get_settings
from pipeline.spec import Policy, active
from pipeline.stages.context import (
    RunContext,
    eval_uri,
    record_stage,
    run_policy,
    short,
    write_stage,
)
from pipeline.stages.records import (
    Approved,
    Gated,
    Ingested,
    Promoted,
    Registered,
    Trained,
    Verified,
)

GATE_REPORT = "gate/report.md"


def register_challenger(
    ctx: RunContext, ingested: Ingested, trained: Trained, verified: Verified
) -> Registered:
    """Log the verified checkpoint as an MLflow model (from code: no pickle) with a
    signature and input example, register it as a version with lineage tags, and point
    alias ``challenger`` at it. A retry finds the version this run already registered.

    The version's reference statistics (what a drift check against it needs; see
    ``pipeline.reference_stats``) are computed here, once, from its training snapshot and
    stored with it; the version's tags name them and their digest."""
    import pandas as pd

    from pipeline import checkpoint

    ingested, trained = Ingested.from_xcom(ingested), Trained.from_xcom(trained)
    verified = Verified.from_xcom(verified)
    run_id = ingested.mlflow_run_id
    run = registry.client().get_run(run_id)
    version = registry.find_version(run_id, ctx.run_key)
    if version is None:
        with tempfile.TemporaryDirectory() as tmp:
            local = checkpoint.fetch(verified.checkpoint_uri, Path(tmp) / "checkpoint")
            v = checkpoint.verify_checkpoint(local)  # this copy is what gets logged: check it
            if not v.intact or v.manifest_sha256 != verified.manifest_sha256:
                raise CheckpointRejected(
                    f"checkpoint {verified.checkpoint_uri} changed since "
                    f"verify_checkpoint: {'; '.join(v.problems) or 'digest'}"
                )
            key_id = json.loads((local / checkpoint.SIGNATURE).read_text()).get("key_id", "")
            example = pd.read_parquet(local / checkpoint.PROBE_ROWS).head(5)
            info = registry.log_serving_model(run_id, local, example)
            tags = version_tags(ctx, ingested, trained, v, key_id, run)
            tags.update(cache_reference_stats(run_id, ingested))
            version = registry.register_version(
                run_id,
                ctx.run_key,
                info.model_uri,
                tags,
                model_id=info.model_id,
                description=f"Trained by {ctx.dag_id} run {ctx.run_id} on snapshot "
                f"{ingested.sha256[:12]}. Gate decision pending.",
            )
    registry.set_alias(registry.CHALLENGER, version)
    rec = Registered(
        verdict="registered",
        model_name=registry.model_name(),
        model_version=version,
        summary=f"registered v{version} (model from code, signature, input example), "
        "alias challenger",
        **ingested.base(),
    )
    record_stage(rec)
    registry.set_tags(run_id, {RunTag.MODEL_VERSION: version})
    return rec


def cache_reference_stats(run_id: str, ingested: Ingested) -> dict[str, str]:
    """The reference statistics of the version's training snapshot, logged on its run; the
    version tags naming them. A snapshot whose statistics cannot be cached (a category value
    JSON cannot hold, an unexpected error) registers without them: drift checks then compute
    them from the snapshot, as they would without a cache. A storage outage propagates (the
    task retries)."""
    import logging

    from pipeline import reference_stats
    from pipeline.stages.context import contract

    try:
        return reference_stats.store_for_run(run_id, ingested.uri, ingested.sha256, contract())
    except Exception as exc:  # noqa: BLE001 - the cache is an optimisation, never a gate
        if storage.is_transient(exc):
            raise
        logging.getLogger(__name__).warning(
            "reference statistics of %s not cached (drift checks will compute them): %s: %s",
            ingested.uri,
            type(exc).__name__,
            exc,
        )
        return {}


def version_tags(
    ctx: RunContext,
    ingested: Ingested,
    trained: Trained,
    v: Any,
    key_id: str,
    run: Any,
) -> dict[str, Any]:
    """Everything a reviewer needs on the version: lineage, verdicts, checkpoint, training."""
    from pipeline import checkpoint

    rt, m = run.data.tags, v.manifest
    grad = trained.final_grad_norm
    if grad is None:  # a record from before final_grad_norm: the last logged value
        grad = run.data.metrics.get("train.grad_norm")
    artifacts = f"runs:/{run.info.run_id}"
    validation, drift = Task.VALIDATE_BATCH, Task.DETECT_DRIFT
    return {
        VersionTag.SNAPSHOT_URI: ingested.uri,
        VersionTag.SNAPSHOT_SHA256: ingested.sha256,
        "data.batch_uri": ingested.source_uri,
        "data.rows": ingested.rows,
        "validation.verdict": rt.get(stage_verdict_tag(validation), "pass"),
        "validation.summary": short(rt.get(stage_summary_tag(validation), "")),
        "validation.report": f"{artifacts}/validation/report.html",
        "drift.verdict": rt.get(stage_verdict_tag(drift), "not_run"),
        "drift.summary": short(rt.get(stage_summary_tag(drift), "")),
        "drift.report": f"{artifacts}/drift/report.html"
        if rt.get(stage_verdict_tag(drift)) in ("drift", "no_drift")
        else "none (no champion)",
        VersionTag.CHECKPOINT_URI: trained.checkpoint_uri,
        VersionTag.MANIFEST_SHA256: v.manifest_sha256,
        "checkpoint.signature": f"verified {v.signature_alg} key {key_id}",
        "checkpoint.bytes": checkpoint.checkpoint_bytes(m),
        "checkpoint.all_finite": m.get("all_finite"),
        "train.stop_reason": m.get("stop_reason") or trained.stop_reason,
        "train.final_grad_norm": f"{grad:.6g}" if isinstance(grad, int | float) else "n/a",
        "train.epochs": trained.epochs,
        "train.best_epoch": trained.best_epoch,
        "train.device": trained.device,
        RunTag.DAG_ID: ctx.dag_id,
        RunTag.RUN_ID: ctx.run_id,
        "code.version": m.get("code_version", ""),
        RunTag.MODEL: active().name,
        "model.factory": (m.get("model") or {}).get("factory", "pipeline.train.model:mlp"),
        "model.kwargs": short(json.dumps((m.get("model") or {}).get("kwargs", {}), sort_keys=True)),
        "model.code_sha256": (m.get("model") or {}).get("code_sha256") or "built-in",
    }


def gate_promotion(
    ctx: RunContext,
    registered: Registered,
    *,
    policy: Policy | None = None,
    resamples: int | None = None,
) -> Gated:
    """Challenger vs champion on the spec's trusted evaluation set (``pipeline.gates``),
    under the run's policy (the spec's, tightened by the run; ``run_policy``).

    The full decision record (thresholds, inputs, verdict) is an MLflow artifact
    ``records/decisions/promotion_gate_decision.json`` — its per-row arrays in the side
    file ``….rows.npz``, named there with its SHA-256 — that ``decisions.replay`` recomputes;
    the version gets the verdict as tags — and every policy override the run used — and the
    report as its description. XCom gets a small record."""
    from pipeline import checkpoint, gates
    from pipeline.evaluate import measure_latency, score_model
    from pipeline.gate_report import gate_markdown, gradient_health_line, report_table
    from pipeline.ingest import read_frame
    from pipeline.train.features import labels
    from pipeline.train.telemetry import load_summary

    registered = Registered.from_xcom(registered)
    model_spec = active()
    pol = policy or run_policy()
    slices = list(pol.slices)
    run_id, version = registered.mlflow_run_id, registered.model_version
    uri = eval_uri(pol)
    if not storage.exists(uri):  # deterministic: a retry cannot make the set appear
        raise DataRejected(
            f"model {model_spec.name!r} has no trusted evaluation set at {uri}: the gate never "
            "judges on a landing batch. Put one there: python -m pipeline data land --model "
            f"{model_spec.name} --file eval.parquet --as-eval (evaluation.uri in {model_spec.path})"
        )
    eval_df = read_frame(uri)
    missing = [col for col in slices if col not in eval_df]
    if missing:  # the spec said slice on these: judging without them would be a silent pass
        raise DataRejected(
            f"gate slice column(s) {missing} of model {model_spec.name!r} are not in the "
            f"trusted evaluation set {uri}; add them to the set or remove them "
            f"from gate.slices in {model_spec.path}"
        )
    mv = registry.client().get_model_version(registry.model_name(), version)
    model, spec, verification = checkpoint.load_for_inference(mv.tags[VersionTag.CHECKPOINT_URI])
    latency = measure_latency(model, spec, eval_df)
    champ = registry.alias_version(registry.CHAMPION)
    champ_proba = champ_version = None
    if champ is not None and str(champ.version) != version:
        cm, cs, _ = checkpoint.load_for_inference(champ.tags[VersionTag.CHECKPOINT_URI])
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
        margin=pol.margin,
        improvement=pol.improvement,  # type: ignore[arg-type]
        non_inferiority_margin=pol.non_inferiority_margin,
        slices=tuple(slices),
        max_checkpoint_bytes=int(pol.max_checkpoint_mb * 1_000_000)
        if pol.max_checkpoint_mb
        else None,
        max_latency_p95_ms=pol.max_latency_p95_ms,
        resamples=resamples or pol.resamples,
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
    eval_sha = storage.digest_of(uri)
    record_path = decisions.record_path(decision.KIND)
    rows_npz = inputs.rows_npz()  # the per-row arrays beside the record, named by digest
    rows_uri = registry.log_bytes(run_id, rows_npz, record_path.replace(".json", ".rows.npz"))
    record = gates.decision_record(
        gate,
        inputs,
        decision,
        rows=(rows_uri, storage.sha256_bytes(rows_npz)),
        context={
            "model_name": registered.model_name,
            "model_version": version,
            "eval_uri": uri,
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
    record_uri = f"runs:/{run_id}/{record_path}"
    table = report_table(decision)
    markdown = gate_markdown(
        verdict=decision.verdict.value,
        reason=decision.reason.value,
        message=decision.message,
        table=table,
        gate=decision.gate,
        model_version=version,
        champion_version=decision.champion_version,
        eval_uri=uri,
        eval_sha256=eval_sha,
        record_uri=record_uri,
        dag_id=ctx.dag_id,
        run_id=ctx.run_id,
        gradient_health=gradient_health_line(load_summary(run_id, registry.client()), run_id),
    )
    rec = Gated(
        verdict=decision.verdict.value,
        promote=decision.promote,
        reason=decision.reason.value,
        reasons=[r.value for r in decision.reasons],
        message=decision.message,
        metric=decision.metric,
        challenger=decision.challenger,
        champion=decision.champion,
        champion_version=decision.champion_version,
        checks=[ch.to_dict() for ch in decision.checks],
        challenger_metrics=dict(decision.challenger_metrics),
        champion_metrics=dict(decision.champion_metrics) if decision.champion_metrics else None,
        gate=dict(decision.gate),
        model_name=registered.model_name,
        model_version=version,
        eval_uri=uri,
        eval_sha256=eval_sha,
        latency_p95_ms=latency.p95_ms,
        record_uri=record_uri,
        model_url=_model_version_url(version),
        report_table=table,
        report_markdown=markdown,
        summary=decision.message,
        **registered.base(),
    )
    registry.log_text(run_id, markdown, GATE_REPORT)
    registry.log_metrics(run_id, decision.challenger_metrics, prefix="eval.challenger.")
    registry.log_metrics(run_id, {"latency_p95_ms": latency.p95_ms}, prefix="eval.challenger.")
    if decision.champion_metrics:
        registry.log_metrics(run_id, decision.champion_metrics, prefix="eval.champion.")
    vs = next((ch for ch in decision.checks if ch.kind == "champion"), None)
    tags = {
        VersionTag.GATE_VERDICT: rec.verdict,
        VersionTag.GATE_REASON: rec.reason,
        "gate.reasons": ",".join(rec.reasons),
        "gate.metric": metric,
        VersionTag.GATE_MARGIN: pol.margin,
        "gate.floor": pol.floor,
        "gate.improvement": pol.improvement,
        "gate.non_inferiority_margin": pol.non_inferiority_margin
        if pol.non_inferiority_margin is not None
        else "off",
        "gate.champion_version": champ_version or "none",
        VersionTag.GATE_RECORD: record_uri,
        # serving refuses a version that needed an approval it never got (aliased by hand)
        VersionTag.APPROVAL_REQUIRED: "true" if pol.require_approval else "false",
        f"eval.{metric}": f"{decision.challenger if decision.challenger is not None else float('nan'):.6f}",
        "eval.set_uri": uri,
        "eval.set_sha256": eval_sha,
        "eval.latency_p95_ms": f"{latency.p95_ms:.3f}",
        RunTag.POLICY_OVERRIDES: json.dumps(list(pol.overrides), default=str)
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
    registry.describe_version(version, markdown)
    record_stage(rec)
    return rec


def _model_version_url(version: str) -> str:
    s = get_settings()
    return f"{s.mlflow_ui_url.rstrip('/')}/#/models/{registry.model_name()}/versions/{version}"


# -- the human approval ---------------------------------------------------------------------


def approve_promotion(
    ctx: RunContext, gated: Gated, response: dict[str, Any] | None = None
) -> Approved:
    """Judge a reviewer's answer (the HITL task's response: ``chosen_options``,
    ``responded_by_user``, ``responded_at``, ``params_input.comment``) with
    ``approval.ApprovalRule``; record it on the run (replayable) and on the version.
    A rejection is recorded like a gate rejection: the version is tagged ``rejected``."""
    from pipeline.approval import ApprovalEvidence, ApprovalRule
    from pipeline.gates import GateReason

    gated = Gated.from_xcom(gated)
    rule = ApprovalRule()
    decision = rule.decide(ApprovalEvidence.from_hitl(response or {}, gated.model_version))
    run_id, version, e = gated.mlflow_run_id, gated.model_version, decision.evidence
    path = decisions.record_path(decision.KIND)
    record = rule.record(
        decision,
        {
            "model_version": version,
            "gate_verdict": gated.verdict,
            "champion_version": gated.champion_version,
            "gate_record_uri": gated.record_uri,
            "run_key": ctx.run_key,
        },
    )
    registry.log_text(run_id, json.dumps(record, indent=2, default=str), path)
    tags: dict[str, Any] = {
        VersionTag.APPROVAL_VERDICT: "approved" if decision.approved else "rejected",
        VersionTag.APPROVAL_BY: e.responded_by or "nobody (timeout)",
        VersionTag.APPROVAL_AT: e.responded_at,
    }
    if decision.approved:
        registry.tag_version(version, tags)
    else:
        tags["promotion.reason"] = GateReason.HUMAN_REJECTED.value
        registry.reject_version(version, [decision.message], tags)
    rec = Approved(
        verdict=decision.verdict.value,
        reason=decision.reason.value,
        reasons=[r.value for r in decision.reasons],
        message=decision.message,
        model_version=version,
        responded_by=e.responded_by,
        responded_at=e.responded_at,
        record_uri=f"runs:/{run_id}/{path}",
        summary=decision.message,
        **gated.base(),
    )
    record_stage(rec)
    return rec


def _approval(ctx: RunContext, gated: Gated, approval: Any) -> Approved | None:
    """The approval record: as given, or judged now from a raw HITL response."""
    if approval is None:
        return None
    if isinstance(approval, Approved):
        return approval
    if isinstance(approval, dict) and approval.get("stage") == Task.APPROVE_PROMOTION.value:
        return Approved.from_xcom(approval)
    return approve_promotion(ctx, gated, approval)


# -- champion ---------------------------------------------------------------------------------


def promote_champion(ctx: RunContext, gated: Gated, approval: Any = None) -> Promoted:
    """Move ``champion`` to the gated version by compare-and-set — unless the gate rejected
    it, or a human reviewer (``approval``: the approval record, or the Airflow HITL
    response, when one was asked for) rejected it."""
    gated = Gated.from_xcom(gated)
    version = gated.model_version
    if gated.verdict != "promote":
        rec = Promoted(
            verdict="not_promoted",
            model_version=version,
            summary=f"v{version} rejected by the gate; champion untouched",
            **gated.base(),
        )
        record_stage(rec)
        return rec
    approved = _approval(ctx, gated, approval)
    if approved is not None and not approved.approved:
        rec = Promoted(
            verdict="not_promoted",
            model_version=version,
            reason=approved.reason,
            summary=f"v{version} passed the gate but was {approved.message}; champion untouched",
            **gated.base(),
        )
        record_stage(rec)
        return rec
    try:
        previous = registry.promote_champion(
            version, gated.champion_version, move=_ledger_move(ctx, gated, approved)
        )
    except registry.RegistryConflict as exc:
        registry.tag_version(
            version, {"promotion.verdict": "conflict", "promotion.conflict": str(exc)}
        )
        record_stage(Promoted(verdict="conflict", summary=str(exc), error=str(exc), **gated.base()))
        raise
    registry.tag_version(
        version, {VersionTag.PROMOTED_AT: ctx.now.isoformat(), VersionTag.PROMOTED_BY: ctx.run_key}
    )
    challenger = registry.alias_version(registry.CHALLENGER)
    if challenger is not None and str(challenger.version) == version:
        registry.delete_alias(registry.CHALLENGER)  # it serves now: no longer a candidate
    summary = f"champion -> v{version}" + (f" (previous_champion v{previous})" if previous else "")
    rec = Promoted(
        verdict="promoted",
        model_version=version,
        previous_champion=previous,
        summary=summary,
        **gated.base(),
    )
    record_stage(rec)
    return rec


def _ledger_move(ctx: RunContext, gated: Gated, approved: Approved | None) -> ledger.Move:
    """What the promotion ledger records of a direct promotion: the run, the gate's decision
    (its verdict and the URI of the full record) and the approval when there was one."""
    decision: dict[str, Any] = {
        "kind": "promotion_gate",
        "verdict": gated.verdict,
        "reason": gated.reason,
        "metric": gated.metric,
        "challenger": gated.challenger,
        "champion": gated.champion,
        "champion_version": gated.champion_version,
        "record_uri": gated.record_uri,
    }
    who = f"{ctx.dag_id}/{ctx.run_id}"
    if approved is not None:
        decision["approval"] = {
            "verdict": approved.verdict,
            "by": approved.responded_by,
            "at": approved.responded_at,
            "record_uri": approved.record_uri,
        }
        who += f" (approved by {approved.responded_by or 'unknown'})"
    return ledger.Move(ledger.Action.PROMOTE, who, gated.message, decision, ctx.run_key)


def canary_rollout(
    ctx: RunContext,
    gated: Gated,
    approval: Any = None,
    *,
    service_url: str | None = None,
    plan: Any = None,
) -> Promoted:
    """Promote through a canary on the scoring service instead of directly.

    A gate or human rejection goes through ``promote_champion`` unchanged (recorded there,
    champion untouched). Otherwise ``canary.run_canary_rollout``: alias ``canary``, the
    plan's weight steps (settings), analysis read from ``<serving_url>/metrics``, then the
    compare-and-set promotion and bake — or weight 0, alias removed, ``rolled_back`` tag.
    The record goes to the run as ``records/canary_rollout.json`` and the stage tags of
    ``promote_champion`` (verdict promoted | rolled_back | rolled_back_after_bake | paused
    | aborted), so the summary shows it."""
    from pipeline import canary

    gated = Gated.from_xcom(gated)
    approved = _approval(ctx, gated, approval) if gated.verdict == "promote" else None
    if gated.verdict != "promote" or (approved is not None and not approved.approved):
        return promote_champion(ctx, gated, approved)
    run_id, version = gated.mlflow_run_id, gated.model_version
    out = canary.run_canary_rollout(
        version,
        gated.champion_version,
        plan=plan,
        service_url=service_url,
        run_key=ctx.run_key,
        actor=f"{ctx.dag_id}/{ctx.run_id}",
        promoted_at=ctx.now.isoformat(),  # the run's "now" on both paths (direct, canary)
    )
    if out["verdict"] == "aborted" and out["reason"] == canary.CanaryReason.MEASUREMENT_ERRORS:
        # the service could not be measured (down, restarting): nothing was judged, the
        # canary is out of traffic — fail this attempt so Airflow retries it later
        write_stage(run_id, "promote_champion", "aborted", f"canary: {out['summary']}", out)
        raise RuntimeError(f"canary of v{version} aborted, retry later: {out['summary']}")
    rec = Promoted(
        path="canary",
        verdict=out["verdict"],
        reason=out["reason"],
        model_version=version,
        previous_champion=out.get("previous_champion"),
        summary=f"canary: {out['summary']}",
        canary={k: out.get(k) for k in ("step_reached", "weight_reached", "seconds", "bake")},
        **gated.base(),
    )
    record_stage(rec)
    return rec
