"""
### monitor_&lt;model&gt;

One DAG per model spec with `monitor.enabled`, on `monitor.cron` (default every 30 minutes):
watches the champion **after** release, on the scoring service's live metrics
(`PIPELINE_SERVING_URL` + `/metrics`) and the delayed labels it received on `/feedback`.

`watch_champion` calls `pipeline.monitor.watch`: the live ROC AUC over the most recent labels
against the value the gate recorded for this version (`eval.<metric>`), beyond the decay
margin and with at least `monitor.min_labels` labels; and the PSI of the live score
histogram against the version's baseline (the gate's scores on the trusted set, else the
first window the monitor saw; kept in storage under `monitor/<model>/v<version>/`), at or
above `monitor.score_drift_psi`. The decision record is written once per run
(`monitor/<model>/records/<run key>.json`) and replays with
`python -m pipeline decision replay FILE`. A scoring service that does not answer fails
the task (it retries): that is not "healthy".

`alert_on_call` raises `champion_decaying` (subject: the version) on decay, a warning of the
same kind on score drift (subject `<version>:score_drift`), and resolves each when its leg
is judged healthy again. `decay_warrants_retrain` → `request_retrain`: with
`monitor.retrain_on_decay`, a decayed champion emits the model's batch asset with
`extra.batch_uri` = the most recent validated batch, so `retrain_<model>` starts without a
human (retrain → gate → canary). No event when healthy, drifting only, or without data.

`on_call_checks` computes the model's SLOs (`python -m pipeline slo`) and raises
`slo_budget_burning` per exhausted budget, and `run_overdue` for a `retrain_<model>` run
queued or running longer than `slo.decision_minutes` (`python -m pipeline alerts --overdue`);
each resolves when its condition clears.

Without Airflow: `python -m pipeline monitor --model <name> [--json]`.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import CronTriggerTimetable, dag, task

from alerting import failure_notifier
from assets import batch_asset
from specs import good_specs


def _spec(path: str):
    from airflow.sdk.exceptions import AirflowFailException

    from pipeline.spec import SpecError, load_spec

    try:
        return load_spec(path)
    except SpecError as exc:
        raise AirflowFailException(str(exc)) from exc


def build_monitor_dag(spec):
    path = str(spec.path)

    @dag(
        dag_id=spec.monitor_dag_id,
        schedule=CronTriggerTimetable(spec.monitor.cron, timezone="UTC"),
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,
        default_args={
            "retries": 2,
            "retry_delay": timedelta(seconds=30),
            "owner": spec.owner or "ml-platform",
            "on_failure_callback": failure_notifier(spec),  # e.g. the service stayed down
        },
        tags=["retraining", "mlops", "monitor", f"model:{spec.name}"],
        doc_md=__doc__
        + f"\n\n**This DAG's model**: `{spec.name}` (registered as `{spec.model_name}`).",
    )
    def monitor():
        @task
        def watch_champion(dag_run=None):
            from pipeline import monitor
            from pipeline.spec import use_spec

            s = _spec(path)
            with use_spec(s):
                watched = monitor.watch(
                    s,
                    run_key=f"{dag_run.dag_id}__{dag_run.run_id}",
                    context={"airflow_dag_id": dag_run.dag_id, "airflow_run_id": dag_run.run_id},
                )
            print(watched.decision.summary())
            return watched.to_xcom()

        @task
        def alert_on_call(watched, ti=None):
            import alerting
            from pipeline import monitor
            from pipeline.spec import use_spec

            s = _spec(path)
            with use_spec(s):
                for alert in monitor.alerts_for(s, watched, links={"airflow_task": _task_link(ti)}):
                    alerting.send(alert, s)  # never raises: a dead sink is logged

        @task.short_circuit
        def decay_warrants_retrain(watched):
            """Only a decayed champion, and only when the spec says retrain on decay."""
            return bool(_spec(path).monitor.retrain_on_decay) and watched["verdict"] == "decaying"

        @task(outlets=[batch_asset(spec)])
        def request_retrain(watched, outlet_events=None):
            from airflow.sdk.exceptions import AirflowSkipException

            from pipeline import monitor
            from pipeline.spec import use_spec

            s = _spec(path)
            with use_spec(s):
                extra, why = monitor.retrain_request(s, watched)
            if extra is None:  # skipped: no asset event
                raise AirflowSkipException(f"no retrain requested: {why}")
            outlet_events[batch_asset(s)].extra = extra
            print(f"retrain_{s.name} requested on {extra['batch_uri']} ({why})")
            return extra

        @task
        def on_call_checks(ti=None):
            """SLO error budgets (``slo_budget_burning``) and retrain runs queued or running
            past ``slo.decision_minutes`` (``run_overdue``). A check that cannot read its
            source is logged and left to the next tick: it never fails the monitor."""
            import logging

            import alerting
            from pipeline import alerts, slo
            from pipeline.spec import use_spec

            log = logging.getLogger("monitor")
            s = _spec(path)
            links = {"airflow_task": _task_link(ti)}
            with use_spec(s):
                report = slo.compute(s)
                print(report.table())
                for alert in slo.alerts_for(s, report, links=links):
                    alerting.send(alert, s)
                try:
                    overdue = alerts.check_overdue(s)
                except Exception as exc:  # noqa: BLE001 - the API down is not an alert here
                    log.warning("overdue check skipped (Airflow API not answering): %s", exc)
                    overdue = []
                for alert in overdue:
                    alerting.send(alert, s)

        watched = watch_champion()
        alert_on_call(watched)
        on_call_checks()
        decay_warrants_retrain(watched) >> request_retrain(watched)

    return monitor()


def _task_link(ti) -> str:
    """The task instance's log page in the Airflow UI, when the runtime knows it."""
    return (getattr(ti, "log_url", None) or "") if ti is not None else ""


for _spec_obj in good_specs():
    if _spec_obj.monitor.enabled:
        globals()[_spec_obj.monitor_dag_id] = build_monitor_dag(_spec_obj)
