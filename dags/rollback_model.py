"""
### rollback_&lt;model&gt;

One DAG per model spec. Puts that model's **last healthy champion** (from the promotion ledger, else `previous_champion`) back in service (or a version you name), now, and records
who asked and why.

Trigger it from the UI form: `reason` (required, at least 3 characters) and, optionally,
`target_version` (digits; empty means the newest version in the promotion ledger that was champion and is still healthy, else the `previous_champion` alias). One task,
`rollback_champion`, calls `pipeline.rollback.rollback_champion`, which:

* refuses, changing nothing, when there is no champion, no target, or the target was
  rejected by the gate or fails its checkpoint integrity check;
* takes any running canary out of traffic (weight 0, alias `canary` removed);
* moves `champion` by compare-and-set (the same lock as a promotion);
* tags the versions (`rolled_back`, `rollback.by`, `rollback.reason`, `restored.*`) and
  logs a JSON record on an MLflow run keyed on this DAG run (retries finish the same
  rollback; they never roll back one version further).

**Who** is the user that triggered the run (`dag_run.triggering_user_name`), else
`unknown`. The scoring service follows within one poll interval
(`PIPELINE_SERVING_POLL_SECONDS`). Without Airflow:
`python -m pipeline rollback --model <name> --reason …`.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, task

import alerting
from assets import champion_asset
from specs import good_specs


def build_rollback_dag(spec):
    path = str(spec.path)

    @dag(
        dag_id=spec.rollback_dag_id,
        schedule=None,  # only ever triggered by a person (or an alert hook) with a reason
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,
        default_args={
            "retries": 2,
            "retry_delay": timedelta(seconds=15),
            "owner": spec.owner or "ml-platform",
            # a rollback that fails after its retries pages (task_failed, dags/alerting.py)
            "on_failure_callback": alerting.failure_notifier(spec),
            "on_success_callback": alerting.success_notifier(spec),
        },
        tags=["retraining", "mlops", "rollback", f"model:{spec.name}"],
        doc_md=__doc__
        + f"\n\n**This DAG's model**: `{spec.name}` (registered as `{spec.model_name}`).",
        params={
            "reason": Param(
                type="string",
                minLength=3,
                maxLength=2000,
                title="Reason",
                description="Why the champion is rolled back (recorded on the versions).",
            ),
            "target_version": Param(
                None,
                type=["null", "string"],
                pattern="^[0-9]+$",
                maxLength=12,
                title="Target version",
                description="Model version to restore. Empty: the last healthy version in the "
                "promotion ledger (else previous_champion).",
            ),
        },
    )
    def rollback():
        @task(outlets=[champion_asset(spec)])
        def rollback_champion(params=None, dag_run=None):
            from airflow.sdk.exceptions import AirflowFailException

            from connections import use_signing_connection
            from pipeline.errors import PipelineRejection
            from pipeline.rollback import rollback_champion as rollback_to
            from pipeline.spec import SpecError, load_spec, use_spec

            use_signing_connection()  # the rollback target's checkpoint is verified
            who = getattr(dag_run, "triggering_user_name", None) or "unknown"
            try:
                with use_spec(load_spec(path)):
                    return rollback_to(
                        params["reason"],
                        target_version=params.get("target_version") or None,
                        who=who,
                        run_key=f"{dag_run.dag_id}__{dag_run.run_id}",
                    )
            except (
                PipelineRejection,
                SpecError,
            ) as exc:  # refused or conflicting: retrying cannot help
                raise AirflowFailException(str(exc)) from exc

        rollback_champion()

    return rollback()


for _spec in good_specs():
    globals()[_spec.rollback_dag_id] = build_rollback_dag(_spec)
