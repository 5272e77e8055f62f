"""
### retrain_model

Retrains the model on a newly landed batch and promotes it only if it is better and intact.

`ingest_batch` → `validate_batch` (Great Expectations; a bad batch is quarantined and the run
fails, naming the broken expectations) → `detect_drift` (Evidently, against the champion's
training snapshot, plus the champion's performance on the new labels) → `decide_retrain`
→ `retrain_gate` → `train_model` → `verify_checkpoint` (digests, signature, finite tensors,
reload parity) → `register_challenger` (MLflow version, alias `challenger`) →
`gate_promotion` (floors, size and latency budgets, challenger vs champion on a paired
bootstrap CI over the trusted evaluation set, per-slice no-regression) → `approval_required`
→ `approve_promotion` (Airflow human-in-the-loop, only when `require_approval` is set: the
approver reads the gate report and the MLflow link, and picks Approve or Reject; no answer in
3 days counts as Reject) → `promote_champion` (compare-and-set of alias `champion`; a gate or
human rejection is tagged on the version and champion stays) → `publish_summary`.

**Canary** (param `canary`, default off): `promote_champion` then runs
`steps.canary_rollout` instead — alias `canary` on the new version, traffic weight steps on
the scoring service (`PIPELINE_SERVING_URL`), canary vs champion analysis read from its
`/metrics`, then promotion by compare-and-set plus a bake window, or weight 0 and a
`rolled_back` tag; the champion is untouched on failure (see `pipeline/canary.py`).

**Which batch**: the `batch_uri` param; else the triggering `batch_landed` asset event's
`extra.batch_uri`; else `landing/date=<run date>/batch.parquet` under the storage root.

Every stage is also `python -m pipeline <stage>`; every verdict is a tag on the MLflow run.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, task

from assets import batch_landed, champion_model
from placement import train_task_kwargs

RETRY = {"retries": 2, "retry_delay": timedelta(seconds=30), "owner": "ml-platform"}


def _ctx():
    """RunContext from the Airflow context (stable across retries: keyed on the run id)."""
    from airflow.sdk import get_current_context

    from pipeline.steps import RunContext

    c = get_current_context()
    dr = c["dag_run"]
    return RunContext(dag_id=dr.dag_id, run_id=dr.run_id, run_after=dr.run_after.isoformat())


def _run(fn, *args, **kwargs):
    """Call a pipeline stage; deterministic rejections fail at once, without retries."""
    from airflow.sdk.exceptions import AirflowFailException

    from connections import use_signing_connection
    from pipeline.errors import PipelineRejection

    use_signing_connection()
    try:
        return fn(_ctx(), *args, **kwargs)
    except PipelineRejection as exc:
        raise AirflowFailException(str(exc)) from exc


@dag(
    dag_id="retrain_model",
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable("0 3 * * *", timezone="UTC"), assets=batch_landed
    ),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # promotions are serialised: champion moves by compare-and-set
    default_args=RETRY,
    tags=["retraining", "mlops"],
    doc_md=__doc__,
    params={
        "batch_uri": Param(None, type=["null", "string"], title="Batch URI", maxLength=2048,
                           pattern=r"^(|file://\S+|s3://\S+|/\S+)$",
                           description="file:// or s3:// URI (or absolute path) of the landed Parquet "
                           "batch. Empty: the triggering asset event, else the run date's landing "
                           "folder."),
        "force_retrain": Param(False, type="boolean", title="Force retrain",
                               description="Train even if there is no drift or decay."),
        "max_epochs": Param(30, type="integer", minimum=1, maximum=500, title="Max epochs",
                            description="Upper bound on training epochs (1-500); training usually "
                            "stops earlier, when the gradient norm or validation loss plateaus."),
        "learning_rate": Param(0.003, type="number", exclusiveMinimum=0, maximum=0.5,
                               title="Learning rate", description="AdamW learning rate."),
        "gate_margin": Param(0.005, type="number", minimum=0, maximum=0.5, title="Gate margin",
                             description="ROC AUC the challenger must gain over the champion."),
        "gate_floor": Param(0.7, type="number", minimum=0.5, maximum=1, title="Gate floor",
                            description="Minimum ROC AUC for any promotion (no champion too)."),
        "decay_margin": Param(0.03, type="number", minimum=0, maximum=0.5, title="Decay margin",
                              description="Champion ROC AUC drop on new labels that retrains."),
        "eval_uri": Param(None, type=["null", "string"], title="Evaluation set URI", maxLength=2048,
                          pattern=r"^(|file://\S+|s3://\S+|/\S+)$",
                          description="Trusted labelled Parquet set for the gate (file://, s3:// or "
                          "absolute path). Empty: PIPELINE_EVAL_URI / settings."),
        "gate_non_inferiority_margin": Param(
            None, type=["null", "number"], minimum=0, maximum=0.2, title="Non-inferiority margin",
            description="Empty: the challenger must improve. Set: also promote a challenger whose "
            "95% CI lower bound of the ROC AUC difference is above -margin."),
        "gate_slices": Param(["channel"], type="array", title="Gate slices", maxItems=10,
                             uniqueItems=True,
                             items={"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
                             description="Categorical columns whose every value must not regress, "
                             "one column name per line."),
        "gate_max_checkpoint_mb": Param(50, type="number", exclusiveMinimum=0, maximum=10_000,
                                        title="Checkpoint size budget (MB)",
                                        description="A challenger whose checkpoint is larger is "
                                        "rejected (0 < MB <= 10000)."),
        "gate_max_latency_p95_ms": Param(250, type="number", exclusiveMinimum=0, maximum=60_000,
                                         title="Latency budget (p95 ms per 256-row batch)",
                                         description="A challenger slower than this at p95, "
                                         "scoring 256-row batches on the gate host, is rejected."),
        "require_approval": Param(False, type="boolean", title="Require approval",
                                  description="Wait for a human to approve a promotion the gate "
                                  "passed (Airflow human-in-the-loop)."),
        "canary": Param(False, type="boolean", title="Canary rollout",
                        description="Promote through a canary: traffic steps on the scoring "
                        "service (PIPELINE_SERVING_URL) with analysis, then promote or roll back. "
                        "Off: promote directly."),
    },
)  # fmt: skip
def retrain_model():
    @task
    def ingest_batch(params=None, triggering_asset_events=None, dag_run=None):
        from pipeline import steps

        extras = [e.extra for evs in (triggering_asset_events or {}).values() for e in evs]
        uri = steps.resolve_batch_uri(params["batch_uri"], extras, dag_run.run_after.isoformat())
        return _run(steps.ingest_batch, uri)

    @task
    def validate_batch(ingested):
        from pipeline import steps

        return _run(steps.validate_batch, ingested)

    @task
    def detect_drift(ingested, validated):
        from pipeline import steps

        return _run(steps.detect_drift, ingested)

    @task
    def decide_retrain(drifted, params=None):
        from pipeline import steps

        return _run(steps.decide_retrain, drifted, force=params["force_retrain"],
                    decay_margin=params["decay_margin"])  # fmt: skip

    @task.short_circuit(ignore_downstream_trigger_rules=False)  # a skip still publishes its summary
    def retrain_gate(decision):
        return decision["verdict"] == "train"

    @task(**train_task_kwargs())  # pool "gpu"; queue "gpu" only under the Celery executor
    def train_model(ingested, params=None):
        from pipeline import steps

        return _run(steps.train_model, ingested, max_epochs=params["max_epochs"],
                    learning_rate=params["learning_rate"])  # fmt: skip

    @task
    def verify_checkpoint(trained):
        from pipeline import steps

        return _run(steps.verify_checkpoint, trained)

    @task
    def register_challenger(ingested, trained, verified):
        from pipeline import steps

        return _run(steps.register_challenger, ingested, trained, verified)

    @task
    def gate_promotion(registered, params=None):
        from pipeline import steps

        return _run(steps.gate_promotion, registered, margin=params["gate_margin"],
                    floor=params["gate_floor"], eval_uri=params["eval_uri"],
                    non_inferiority_margin=params["gate_non_inferiority_margin"],
                    slices=params["gate_slices"], max_checkpoint_mb=params["gate_max_checkpoint_mb"],
                    max_latency_p95_ms=params["gate_max_latency_p95_ms"])  # fmt: skip

    @task.short_circuit(ignore_downstream_trigger_rules=False)
    def approval_required(gated, params=None):
        """Ask a human only when asked to, and only about a version the gate passed."""
        return bool(params["require_approval"]) and gated["verdict"] == "promote"

    # HITLOperator with Approve/Reject rather than ApprovalOperator: ApprovalOperator skips
    # promote_champion on Reject, and then nothing would record the human rejection.
    approve_promotion = HITLOperator(
        task_id="approve_promotion",
        subject="Promote {{ ti.xcom_pull(task_ids='gate_promotion')['model_name'] }} "
        "v{{ ti.xcom_pull(task_ids='gate_promotion')['model_version'] }} to champion?",
        body="{{ ti.xcom_pull(task_ids='gate_promotion')['report_markdown'] }}\n\n"
        "[Open the version in MLflow]({{ ti.xcom_pull(task_ids='gate_promotion')['model_url'] }})",
        options=["Approve", "Reject"],
        defaults=["Reject"],  # no answer within the timeout: not promoted, recorded as rejected
        response_timeout=timedelta(days=3),
    )

    @task(outlets=[champion_model], trigger_rule="none_failed")
    def promote_champion(gated, approval, params=None):
        from airflow.sdk.exceptions import AirflowSkipException

        from pipeline import steps

        if gated is None:  # none_failed also runs when everything upstream was skipped
            raise AirflowSkipException("no challenger in this run: retraining was skipped")
        if params["canary"]:  # steps.canary_rollout: weights, analysis, promote or roll back
            return _run(steps.canary_rollout, gated, approval=approval)
        return _run(steps.promote_champion, gated, approval=approval)

    @task(trigger_rule="all_done")
    def publish_summary():
        from airflow.sdk import get_current_context
        from airflow.sdk.exceptions import AirflowFailException

        from pipeline import steps

        summary = steps.publish_summary(_ctx())
        print(steps.format_summary(summary))
        c = get_current_context()
        states = c["ti"].get_task_states(dag_id=c["dag_run"].dag_id, run_ids=[c["dag_run"].run_id])
        states = states.get(c["dag_run"].run_id, states)
        failed = sorted(t for t, s in states.items() if s == "failed")
        if failed:  # the summary is written; the run still ends failed
            raise AirflowFailException(f"run failed at {failed}; see the summary above")
        return summary

    ingested = ingest_batch()
    validated = validate_batch(ingested)
    decision = decide_retrain(detect_drift(ingested, validated))
    trained = train_model(ingested)
    retrain_gate(decision) >> trained
    verified = verify_checkpoint(trained)
    gated = gate_promotion(register_challenger(ingested, trained, verified))
    approval_required(gated) >> approve_promotion
    promote_champion(gated, approve_promotion.output) >> publish_summary()


retrain_model()
