"""
### retrain_&lt;model&gt;

One DAG per model spec (`models/<name>/model.yaml`): retrains that model on a newly landed batch and promotes it only if it is better and intact.

`ingest_batch` → `validate_batch` (Great Expectations; a bad batch is quarantined and the run
fails, naming the broken expectations) → `detect_drift` (Evidently, against the champion's
training snapshot, plus the champion's performance on the new labels) → `decide_retrain`
→ `retrain_gate` → `train_model` → `verify_checkpoint` (digests, signature, finite tensors,
reload parity) → `register_challenger` (MLflow version, alias `challenger`) →
`gate_promotion` (floors, size and latency budgets, challenger vs champion on a paired
bootstrap CI over the trusted evaluation set, per-slice no-regression) → `approval_required`
→ `approve_promotion` (Airflow human-in-the-loop, only when `require_approval` is set: the
approver reads the gate report and the MLflow link, and picks Approve or Reject; no answer in
`gate.approval_timeout_hours` (default 72) counts as Reject) → `promote_champion` (compare-and-set of alias `champion`; a gate or
human rejection is tagged on the version and champion stays) → `publish_summary`.

**Canary** (param `canary`, default off): `promote_champion` then runs
`stages.canary_rollout` instead — alias `canary` on the new version, traffic weight steps on
the scoring service (`PIPELINE_SERVING_URL`), canary vs champion analysis read from its
`/metrics`, then promotion by compare-and-set plus a bake window, or weight 0 and a
`rolled_back` tag; the champion is untouched on failure (see `pipeline/canary/`).

**Which batch**: the `batch_uri` param; else the triggering asset event's
`extra.batch_uri` (the model's asset `pipeline://models/<name>/batch`, emitted by
`python -m pipeline data land --model <name> --file PATH`); else
`<landing prefix>/date=<run date>/batch.parquet`. Only batches under the model's landing
prefix or a source its spec lists (`landing.allowed_sources`) are read.

**Policy**: every Param's default and bound come from the model's spec; a run may only
tighten it (a higher floor, a larger margin, approval on). A looser value is refused by
the form, and again by the first task (REST and CLI too), unless the spec's
`overrides.allow` names the field; each override used is tagged on the model version
(`policy.overrides`).

**Alerts** (`dags/alerting.py`, `pipeline/alerts.py`): a task's final failure raises one
alert (quarantined batch, diverged training, rejected checkpoint, else `task_failed`), a
rejected gate, a waiting approval, a rolled-back canary or bake and gradient anomalies raise
theirs, a run past `slo.decision_minutes` raises `run_overdue` (Airflow deadline alert); one
per model, kind and subject across retries and re-runs, each with its runbook under
`docs/runbooks/`. `python -m pipeline alerts --model <name>` lists the open ones.

Every stage is also `python -m pipeline <stage>`; every verdict is a tag on the MLflow run.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pendulum
from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, task

import alerting
from assets import batch_asset, champion_asset
from pipeline.names import APPROVE_OPTION, REJECT_OPTION, Task
from pipeline.spec import batch_uri_pattern
from placement import train_task_kwargs
from specs import POLICY_PARAMS, good_specs, policy_request

RETRY = {"retries": 2, "retry_delay": timedelta(seconds=30), "owner": "ml-platform"}
TRAIN_TASK = (
    train_task_kwargs()
)  # pool "gpu"; queue "gpu" only under Celery (a bad mode fails here)


def _ctx():
    """RunContext from the Airflow context (stable across retries: keyed on the run id)."""
    from airflow.sdk import get_current_context

    from pipeline.stages import RunContext

    c = get_current_context()
    dr = c["dag_run"]
    return RunContext(dag_id=dr.dag_id, run_id=dr.run_id, run_after=dr.run_after.isoformat())


def _run(spec_path: str, fn, *args, **kwargs):
    """Call a pipeline stage for this DAG's model; deterministic rejections (bad data, a
    policy the spec does not allow, a broken checkpoint) fail at once, without retries."""
    from airflow.sdk.exceptions import AirflowFailException

    from connections import use_signing_connection
    from pipeline.errors import PipelineRejection
    from pipeline.spec import SpecError, load_spec, use_spec

    use_signing_connection()
    try:
        spec = load_spec(spec_path)
    except SpecError as exc:
        raise AirflowFailException(str(exc)) from exc
    with use_spec(spec):
        try:
            return fn(_ctx(), *args, **kwargs)
        except PipelineRejection as exc:
            raise AirflowFailException(str(exc)) from exc


def _alert(spec_path: str, after: str, record: dict[str, Any]) -> None:
    """A decision alert (``dags/alerting.py``) on a stage's record; never fails the task."""
    from pipeline.spec import load_spec

    try:
        getattr(alerting, after)(load_spec(spec_path), record)
    except Exception:  # noqa: BLE001 - alerting never fails the run
        import logging

        logging.getLogger("pipeline.alerting").exception("decision alert %s not raised", after)


def _policy(spec_path: str, params: dict[str, Any]):
    from pipeline import stages

    return _run(spec_path, lambda _ctx, req: stages.run_policy(req), policy_request(params))


def _schedule(spec):
    asset = batch_asset(spec) if spec.schedule.asset else None
    cron = CronTriggerTimetable(spec.schedule.cron, timezone="UTC") if spec.schedule.cron else None
    if asset is not None and cron is not None:
        return AssetOrTimeSchedule(timetable=cron, assets=asset)
    return cron or ([asset] if asset is not None else None)


def build_retrain_dag(spec):
    schema = POLICY_PARAMS(spec)
    path = str(spec.path)
    params = {
        "batch_uri": Param(
            None,
            type=["null", "string"],
            title="Batch URI",
            maxLength=2048,
            pattern=batch_uri_pattern(spec),  # a first line; the task's check is the authority
            description=f"Parquet batch under the landing prefix `{spec.landing_prefix}` "
            "(or a source the spec allows). Empty: the triggering asset event, else "
            "the run date's landing folder.",
        ),
        **{name: Param(**kw) for name, kw in schema.items()},
    }

    @dag(
        dag_id=spec.retrain_dag_id,
        schedule=_schedule(spec),
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,  # promotions are serialised: champion moves by compare-and-set
        default_args={
            **RETRY,
            "owner": spec.owner or RETRY["owner"],
            # alerts (dags/alerting.py): a final failure raises one, a success resolves it
            "on_failure_callback": alerting.failure_notifier(spec),
            "on_success_callback": alerting.success_notifier(spec),
        },
        # run_overdue after slo.decision_minutes: Airflow's deadline alert, on a scheduler only
        # (PIPELINE_DEADLINE_ALERTS=true; Airflow 3.3.2's `airflow dags test` crashes on a
        # DAG with a deadline), else `python -m pipeline alerts --overdue` (dags/alerting.py)
        deadline=alerting.overdue_deadline(spec) if alerting.deadlines_enabled() else None,
        tags=["retraining", "mlops", f"model:{spec.name}"],
        doc_md=__doc__ + f"\n\n**This DAG's model**: `{spec.name}` (registered as "
        f"`{spec.model_name}`), spec `{spec.path.parent.name}/{spec.path.name}`. "
        + (spec.description or ""),
        params=params,
    )
    def retrain():
        # Each task: one call of a pipeline stage (pipeline.stages), records in and out as
        # XCom-ready dicts (stages.records: to_xcom / from_xcom).
        @task
        def ingest_batch(params=None, triggering_asset_events=None, dag_run=None):
            from pipeline import stages

            policy = _policy(path, params)  # a loosening is refused before any data is read
            extras = [e.extra for evs in (triggering_asset_events or {}).values() for e in evs]
            uri = _run(
                path,
                lambda _c: stages.resolve_batch_uri(
                    params["batch_uri"], extras, dag_run.run_after.isoformat()
                ),
            )
            return _run(path, stages.ingest_batch, uri, policy=policy).to_xcom()

        @task
        def validate_batch(ingested):
            from pipeline import stages

            ing = stages.Ingested.from_xcom(ingested)
            return _run(path, stages.validate_batch, ing).to_xcom()

        @task
        def detect_drift(ingested, validated):
            from pipeline import stages

            return _run(path, stages.detect_drift, stages.Ingested.from_xcom(ingested)).to_xcom()

        @task
        def decide_retrain(drifted, params=None, triggering_asset_events=None):
            from pipeline import stages

            extras = [e.extra for evs in (triggering_asset_events or {}).values() for e in evs]
            return _run(
                path,
                stages.decide_retrain,
                stages.Drifted.from_xcom(drifted),
                force=params["force_retrain"],
                policy=_policy(path, params),
                production_decay=stages.production_decay(extras, params["batch_uri"]),
            ).to_xcom()

        @task.short_circuit(
            ignore_downstream_trigger_rules=False
        )  # a skip still publishes its summary
        def retrain_gate(decision):
            from pipeline import stages

            return stages.RetrainDecided.from_xcom(decision).retrain

        @task(**TRAIN_TASK)
        def train_model(ingested, params=None):
            from pipeline import stages

            out = _run(
                path,
                stages.train_model,
                stages.Ingested.from_xcom(ingested),
                max_epochs=params["max_epochs"],
                learning_rate=params["learning_rate"],
            ).to_xcom()
            # gradient anomalies; the batch's divergence alert resolves (subject: its hash)
            _alert(path, "after_training", out)
            return out

        @task
        def verify_checkpoint(trained):
            from pipeline import stages

            out = _run(path, stages.verify_checkpoint, stages.Trained.from_xcom(trained)).to_xcom()
            _alert(path, "after_checkpoint", out)
            return out

        @task
        def register_challenger(ingested, trained, verified):
            from pipeline import stages

            return _run(
                path,
                stages.register_challenger,
                stages.Ingested.from_xcom(ingested),
                stages.Trained.from_xcom(trained),
                stages.Verified.from_xcom(verified),
            ).to_xcom()

        @task
        def gate_promotion(registered, params=None):
            from pipeline import stages

            out = _run(
                path,
                stages.gate_promotion,
                stages.Registered.from_xcom(registered),
                policy=_policy(path, params),
            ).to_xcom()
            _alert(path, "after_gate", out)  # gate_rejected (info)
            return out

        @task.short_circuit(ignore_downstream_trigger_rules=False)
        def approval_required(gated, params=None):
            """Ask a human only when the policy asks, and only about a version the gate passed."""
            from pipeline import stages

            promote = stages.Gated.from_xcom(gated).promote
            return _policy(path, params).require_approval and promote

        # HITLOperator with Approve/Reject rather than ApprovalOperator: ApprovalOperator skips
        # promote_champion on Reject, and then nothing would record the human rejection.
        # Its answer is judged by pipeline.approval in promote_champion (recorded, replayable).
        approve_promotion = HITLOperator(
            task_id=Task.APPROVE_PROMOTION.value,
            subject="Promote {{ ti.xcom_pull(task_ids='gate_promotion')['model_name'] }} "
            "v{{ ti.xcom_pull(task_ids='gate_promotion')['model_version'] }} to champion?",
            body="{{ ti.xcom_pull(task_ids='gate_promotion')['report_markdown'] }}\n\n"
            "[Open the version in MLflow]({{ ti.xcom_pull(task_ids='gate_promotion')['model_url'] }})",
            options=[APPROVE_OPTION, REJECT_OPTION],
            defaults=[
                REJECT_OPTION
            ],  # no answer within the timeout: not promoted, recorded as rejected
            response_timeout=timedelta(hours=spec.gate.approval_timeout_hours),
            on_execute_callback=alerting.approval_waiting(spec),  # approval_waiting alert
        )

        @task(outlets=[champion_asset(spec)], trigger_rule="none_failed")
        def promote_champion(gated, approval, params=None):
            from airflow.sdk.exceptions import AirflowSkipException

            from pipeline import stages

            if gated is None:  # none_failed also runs when everything upstream was skipped
                raise AirflowSkipException("no challenger in this run: retraining was skipped")
            rec = stages.Gated.from_xcom(gated)
            if _policy(path, params).canary:  # weights, analysis, promote or roll back
                out = _run(path, stages.canary_rollout, rec, approval=approval).to_xcom()
            else:
                out = _run(path, stages.promote_champion, rec, approval=approval).to_xcom()
            _alert(path, "after_promotion", out)  # canary / bake rolled back
            return out

        @task(trigger_rule="all_done")
        def publish_summary():
            from airflow.sdk import get_current_context
            from airflow.sdk.exceptions import AirflowFailException

            from pipeline import stages

            summary = _run(path, stages.publish_summary)
            print(stages.format_summary(summary))
            c = get_current_context()
            states = c["ti"].get_task_states(
                dag_id=c["dag_run"].dag_id, run_ids=[c["dag_run"].run_id]
            )
            states = states.get(c["dag_run"].run_id, states)
            failed = sorted(t for t, s in states.items() if s == "failed")
            if failed:  # the summary is written; the run still ends failed
                raise AirflowFailException(f"run failed at {failed}; see the summary above")
            _alert(path, "after_summary", {"dag_id": c["dag_run"].dag_id})  # not overdue now
            return summary.to_xcom()

        ingested = ingest_batch()
        validated = validate_batch(ingested)
        decision = decide_retrain(detect_drift(ingested, validated))
        trained = train_model(ingested)
        retrain_gate(decision) >> trained
        verified = verify_checkpoint(trained)
        gated = gate_promotion(register_challenger(ingested, trained, verified))
        approval_required(gated) >> approve_promotion
        promote_champion(gated, approve_promotion.output) >> publish_summary()

    return retrain()


for _spec in good_specs():
    globals()[_spec.retrain_dag_id] = build_retrain_dag(_spec)
