"""The last stage: every stage's verdict read back from the run, stored and printed."""

from __future__ import annotations

import json

from pipeline import registry, storage
from pipeline.names import STAGES, RunTag, stage_summary_tag, stage_verdict_tag
from pipeline.settings import get_settings
from pipeline.spec import active
from pipeline.stages.context import RunContext
from pipeline.stages.records import StageSummary


def publish_summary(ctx: RunContext) -> StageSummary:
    """Read every stage's verdict back from the MLflow run; store and return the summary."""
    c = registry.client()
    found = c.search_runs(
        [registry.experiment_id()], filter_string=f"tags.`{registry.RUN_KEY_TAG}` = '{ctx.run_key}'"
    )
    tags = found[0].data.tags if found else {}
    stages = {
        s.value: {
            "verdict": tags.get(stage_verdict_tag(s), "not_run"),
            "summary": tags.get(stage_summary_tag(s), ""),
        }
        for s in STAGES
    }
    champ = registry.alias_version(registry.CHAMPION)
    run_id = found[0].info.run_id if found else ""
    summary = StageSummary(
        verdict="published",
        run_key=ctx.run_key,
        dag_id=ctx.dag_id,
        run_id=ctx.run_id,
        batch_uri=tags.get(RunTag.BATCH_URI),
        model_version=tags.get(RunTag.MODEL_VERSION),
        champion_version=str(champ.version) if champ else None,
        stages=stages,
        model=active().name,
        mlflow_run_id=run_id,
        mlflow_experiment_id=registry.experiment_id(),
    )
    text = json.dumps(summary.to_xcom(), indent=2, sort_keys=True)
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
        registry.log_record(run_id, "summary", summary.to_xcom())
        if found[0].info.status == "RUNNING":
            registry.end_run(run_id)
    return summary


def format_summary(summary: StageSummary) -> str:
    lines = [f"run {summary.run_id}  batch={summary.batch_uri}"]
    for stage, s in summary.stages.items():
        lines.append(f"  {stage:<20} {s['verdict']:<14} {s['summary']}")
    lines.append(
        f"  model version created: {summary.model_version or '-'}   "
        f"champion: v{summary.champion_version or '-'}"
    )
    return "\n".join(lines)
