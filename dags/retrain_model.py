"""
### retrain_model

Retrains the model on a newly landed batch and promotes it only if it is better and intact.

`ingest_batch` → `validate_batch` (Great Expectations; a bad batch is quarantined and the run
fails, naming the broken expectations) → `detect_drift` (Evidently, against the champion's
training snapshot, plus the champion's performance on the new labels) → `decide_retrain`
→ `retrain_gate` → `train_model` → `verify_checkpoint` (digests, signature, finite tensors,
reload parity) → `register_challenger` (MLflow version, alias `challenger`) →
`gate_promotion` (challenger vs champion on the trusted evaluation set, by a margin) →
`promote_champion` (compare-and-set of alias `champion`) → `publish_summary`.

**Which batch**: the `batch_uri` param; else the triggering `batch_landed` asset event's
`extra.batch_uri`; else `landing/date=<run date>/batch.parquet` under the storage root.

Every stage is also `python -m pipeline <stage>`; every verdict is a tag on the MLflow run.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, task

from assets import batch_landed, champion_model

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

    from pipeline.errors import PipelineRejection

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
        "batch_uri": Param("", type="string", title="Batch URI",
                           description="file:// or s3:// URI of the landed Parquet batch. "
                           "Empty: the triggering asset event, else today's landing folder."),
        "force_retrain": Param(False, type="boolean", title="Force retrain",
                               description="Train even if there is no drift or decay."),
        "max_epochs": Param(30, type="integer", minimum=1, maximum=500, title="Max epochs"),
        "learning_rate": Param(0.003, type="number", exclusiveMinimum=0, maximum=0.5,
                               title="Learning rate", description="AdamW learning rate."),
        "gate_margin": Param(0.005, type="number", minimum=0, maximum=0.5, title="Gate margin",
                             description="ROC AUC the challenger must gain over the champion."),
        "gate_floor": Param(0.7, type="number", minimum=0.5, maximum=1, title="Gate floor",
                            description="Minimum ROC AUC for any promotion (no champion too)."),
        "decay_margin": Param(0.03, type="number", minimum=0, maximum=0.5, title="Decay margin",
                              description="Champion ROC AUC drop on new labels that retrains."),
        "eval_uri": Param("", type="string", title="Evaluation set URI",
                          description="Trusted labelled set for the gate. Empty: settings."),
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

    @task.short_circuit
    def retrain_gate(decision):
        return decision["verdict"] == "train"

    @task
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
                    floor=params["gate_floor"], eval_uri=params["eval_uri"])  # fmt: skip

    @task(outlets=[champion_model])
    def promote_champion(gated):
        from pipeline import steps

        return _run(steps.promote_champion, gated)

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
    promote_champion(gated) >> publish_summary()


retrain_model()
