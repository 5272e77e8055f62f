"""What every stage shares: the run's context, the run's policy, and how a verdict is written."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline import names, registry
from pipeline.spec import ModelSpec, Policy, active, resolve_policy

if TYPE_CHECKING:
    import pandas as pd

    from pipeline.contract import DataContract
    from pipeline.stages.records import StageRecord

log = logging.getLogger("pipeline.stages")


@dataclass(frozen=True)
class RunContext:
    dag_id: str = "cli"
    run_id: str = "manual"
    run_after: str | None = None  # when the run was due: the "now" for time checks

    @property
    def run_key(self) -> str:
        return names.run_key(self.dag_id, self.run_id)

    @property
    def now(self) -> pd.Timestamp:
        """The run's "now": when it was due (Airflow's ``run_after``), else the wall clock.
        Every timestamp a run writes (``promoted_at`` …) is this one, on every path."""
        import pandas as pd

        ts = pd.Timestamp(self.run_after) if self.run_after else pd.Timestamp.now(tz="UTC")
        return ts if ts.tzinfo else ts.tz_localize("UTC")


def record_stage(rec: StageRecord) -> None:
    """The stage's verdict and one-line summary as tags on the run's MLflow run
    (``stage.<task id>.verdict`` / ``.summary``), the record as ``records/<task id>.json``."""
    write_stage(rec.mlflow_run_id, rec.stage, rec.verdict, rec.summary, rec.to_xcom())


def write_stage(
    run_id: str, stage: str, verdict: str, summary: str, record: dict[str, Any]
) -> None:
    registry.set_tags(
        run_id,
        {names.stage_verdict_tag(stage): verdict, names.stage_summary_tag(stage): summary[:4000]},
    )
    registry.log_record(run_id, stage, record)
    log.info("%s: %s — %s", stage, verdict, summary)


def run_policy(requested: dict[str, Any] | None = None, spec: ModelSpec | None = None) -> Policy:
    """The policy this run uses: the active spec's, tightened by the run's Params / flags
    (``spec.resolve_policy``; a loosening the spec does not allow raises PolicyViolation)."""
    return resolve_policy(spec or active(), requested)


def contract() -> DataContract:
    return active().contract_obj()


def eval_uri(policy: Policy) -> str:
    """The trusted set's URI, canonical: the spec's own ``evaluation.uri``, or a set the run
    names (when the spec allows it) under the spec's trusted prefix — never a landing batch,
    never an arbitrary file the worker can read (``pipeline.uris.eval_source``)."""
    from pipeline.uris import eval_source

    return eval_source(policy.eval_uri)


def short(text: str, limit: int = 160) -> str:
    """Tag values stay one glance long in the MLflow UI; the full text is in the run."""
    return text if len(text) <= limit else text[: limit - 1] + "…"
