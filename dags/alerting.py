"""The Airflow side of alerting: deliver ``pipeline.alerts`` records to Airflow Connections.

``pipeline/alerts.py`` decides *whether* someone is told (one record per model, kind and
subject; suppression; resolve) and writes every alert to ``$PIPELINE_HOME/alerts/alerts.jsonl``.
This module tells them, and raises the alerts that only Airflow sees:

* :func:`send` — the sinks are Airflow Connections named in the spec's ``alerts.sinks``, else
  the deployment's ``PIPELINE_ALERT_SINKS`` (comma-separated ids); none = the file only.
  ``conn_type`` ``smtp`` (email through ``apache-airflow-providers-smtp``'s ``SmtpHook``;
  recipients in the Connection's extra ``to``, sender in ``from_email``) or ``slackwebhook``
  (``apache-airflow-providers-slack``'s ``SlackWebhookHook``: posts to the URL the
  Connection holds, Slack or any Slack-compatible receiver). Alerts below the spec's
  ``alerts.min_severity`` stay in the file. A sink that is down, refuses, or does not exist is
  logged and noted on the alert's line (``deliveries``); it never fails the task.
* :func:`failure_notifier` — a ``BaseNotifier`` for ``on_failure_callback``: the task's
  exception (``context["exception"]``, followed through ``__cause__``) names the kind.
* :func:`success_notifier` — ``on_success_callback``: a task that succeeds resolves its own
  ``task_failed`` alert.
* decision alerts, called from the task bodies: :func:`after_training`,
  :func:`after_checkpoint`, :func:`after_gate`, :func:`after_promotion`,
  :func:`approval_waiting` (``on_execute_callback`` of the approval task),
  :func:`after_summary`;
* :func:`overdue_deadline` — Airflow's deadline alert on the run (queued + the spec's
  ``slo.decision_minutes``) whose callback, :func:`run_overdue`, raises ``run_overdue``;
  attached only with ``PIPELINE_DEADLINE_ALERTS=true`` (see :func:`deadlines_enabled`).

Everything heavy is imported inside the functions: DAG files import this module at parse time.
"""

from __future__ import annotations

import html
import logging
import os
import re
from typing import Any

from airflow.sdk import BaseNotifier  # light: the DAG files import airflow.sdk anyway

log = logging.getLogger("pipeline.alerting")

SINKS_ENV = "PIPELINE_ALERT_SINKS"


# -- delivery ---------------------------------------------------------------------------------


def sink_ids(spec: Any) -> list[str]:
    """Connection ids: the spec's ``alerts.sinks``, else ``PIPELINE_ALERT_SINKS``."""
    ids = list(getattr(getattr(spec, "alerts", None), "sinks", None) or [])
    if not ids:
        ids = [s.strip() for s in os.environ.get(SINKS_ENV, "").split(",")]
    return [i for i in ids if i]


def _min_severity(spec: Any) -> str:
    return str(getattr(getattr(spec, "alerts", None), "min_severity", "warning"))


def _subject(alert: Any) -> str:
    state = "RESOLVED" if alert.state == "resolved" else alert.severity.value.upper()
    return f"[{state}] {alert.model}: {alert.kind.value} — {alert.summary}"[:240]


def _text(alert: Any) -> str:
    lines = [_subject(alert), ""]
    if alert.value is not None or alert.threshold is not None:
        lines.append(f"value: {alert.value}   threshold: {alert.threshold}")
    lines.append(f"runbook: {alert.runbook}")
    lines += [f"{k}: {v}" for k, v in sorted(alert.links.items())]
    lines.append(f"dedup key: {alert.dedup_key} (seen {alert.occurrences}x)")
    return "\n".join(lines)


def _html(alert: Any) -> str:
    rows = "".join(
        f'<li>{html.escape(k)}: <a href="{html.escape(v)}">{html.escape(v)}</a></li>'
        for k, v in sorted(alert.links.items())
    )
    vt = (
        f"<p>value: <b>{html.escape(str(alert.value))}</b>, threshold: "
        f"<b>{html.escape(str(alert.threshold))}</b></p>"
        if alert.value is not None or alert.threshold is not None
        else ""
    )
    return (
        f"<p><b>{html.escape(_subject(alert))}</b></p>{vt}"
        f"<p>Runbook: <code>{html.escape(alert.runbook)}</code></p><ul>{rows}</ul>"
        f"<p><small>dedup key {html.escape(alert.dedup_key)}, seen {alert.occurrences}x; "
        f"<code>python -m pipeline alerts --model {html.escape(alert.model)}</code></small></p>"
    )


def _deliver(conn_id: str, alert: Any) -> None:
    from airflow.sdk import Connection

    conn = Connection.get(conn_id)
    kind = (conn.conn_type or "").lower()
    if kind == "smtp":
        from airflow.providers.smtp.hooks.smtp import SmtpHook

        to = conn.extra_dejson.get("to")
        if not to:
            raise ValueError(
                f"SMTP Connection {conn_id!r} names no recipients: set its extra "
                '{"to": "oncall@example.com"} (a list or comma-separated)'
            )
        with SmtpHook(smtp_conn_id=conn_id) as hook:
            hook.send_email_smtp(to=to, subject=_subject(alert), html_content=_html(alert))
    elif kind == "slackwebhook":
        from airflow.providers.slack.hooks.slack_webhook import SlackWebhookHook

        SlackWebhookHook(slack_webhook_conn_id=conn_id).send(
            text=_text(alert),
            blocks=[{"type": "section", "text": {"type": "mrkdwn", "text": _text(alert)}}],
        )
    else:
        raise ValueError(
            f"alert sink Connection {conn_id!r} has conn_type {conn.conn_type!r}; "
            "use smtp or slackwebhook"
        )


def send(alert: Any, spec: Any) -> None:
    """Deliver ``alert`` (already in the file) to the sinks; never raises."""
    if alert is None:
        return
    try:
        from pipeline.alerts import Severity, record_delivery

        if alert.severity.rank < Severity(_min_severity(spec)).rank:
            return  # below min_severity: the file only
        results: list[dict[str, Any]] = []
        for conn_id in sink_ids(spec):
            try:
                _deliver(conn_id, alert)
                results.append({"sink": conn_id, "ok": True})
            except Exception as exc:  # noqa: BLE001 - alerting never fails the run
                msg = f"{type(exc).__name__}: {exc}"[:300]
                log.warning(
                    "alert %s not delivered to sink %r (%s); it is in %s",
                    alert.dedup_key,
                    conn_id,
                    msg,
                    "the alerts file",
                )
                results.append({"sink": conn_id, "ok": False, "error": msg})
        if results:
            record_delivery(alert, results)
    except Exception:  # noqa: BLE001
        log.exception("alert %s: delivery failed; it is in the alerts file", alert.dedup_key)


def _raise(spec: Any, **kw: Any) -> Any:
    """``raise_alert`` then ``send``; never raises."""
    try:
        from pipeline import alerts

        a = alerts.raise_alert(model=spec.name, suppress_minutes=spec.alerts.suppress_minutes, **kw)
    except Exception:  # noqa: BLE001
        log.exception("alert %s for %s not recorded", kw.get("kind"), spec.name)
        return None
    send(a, spec)
    return a


def _resolve(spec: Any, kind: Any, subject: str, summary: str) -> None:
    try:
        from pipeline import alerts

        send(
            alerts.resolve_alert(kind=kind, model=spec.name, subject=subject, summary=summary), spec
        )
    except Exception:  # noqa: BLE001
        log.exception("alert %s/%s/%s not resolved", spec.name, kind, subject)


# -- links and subjects from an Airflow context ----------------------------------------------


def _settings() -> Any:
    from pipeline.settings import get_settings

    return get_settings()


def _task_url(dag_id: str, run_id: str, task_id: str) -> str:
    from urllib.parse import quote

    base = _settings().airflow_api_url.rstrip("/")
    return f"{base}/dags/{quote(dag_id)}/runs/{quote(run_id)}/tasks/{quote(task_id)}"


def _run_url(rec: dict[str, Any] | None) -> str:
    if not rec or not rec.get("mlflow_run_id") or not rec.get("mlflow_experiment_id"):
        return ""
    ui = _settings().mlflow_ui_url.rstrip("/")
    return f"{ui}/#/experiments/{rec['mlflow_experiment_id']}/runs/{rec['mlflow_run_id']}"


def _version_url(spec: Any, version: Any) -> str:
    ui = _settings().mlflow_ui_url.rstrip("/")
    return f"{ui}/#/models/{spec.model_name}/versions/{version}" if version else ""


def _xcom(context: Any, task_id: str) -> dict[str, Any] | None:
    try:
        v = context["ti"].xcom_pull(task_ids=task_id)
    except Exception:  # noqa: BLE001 - no XCom (never ran, cleared)
        return None
    return v if isinstance(v, dict) else None


def _links(context: Any, rec: dict[str, Any] | None = None) -> dict[str, str]:
    ti, dr = context.get("ti"), context.get("dag_run")
    out: dict[str, str] = {}
    if ti is not None and dr is not None:
        out["airflow_task"] = _task_url(dr.dag_id, dr.run_id, ti.task_id)
    if rec:
        out["mlflow_run"] = _run_url(rec)
    return {k: v for k, v in out.items() if v}


def batch_subject(sha256: str) -> str:
    """The subject of data and training alerts: the batch's content hash (24 hex digits, as
    its quarantine folder is named), so every re-run of the same bytes is the same alert."""
    return sha256[:24]


_QUARANTINE_RX = re.compile(r"quarantine/[^/\s]+/([0-9a-f]{24})")


def _batch_of(context: Any, spec: Any, exc: BaseException | None) -> tuple[str, dict | None]:
    """(subject, ingest record) of the run's batch: the ingest XCom; else — the batch was
    refused before a snapshot was made, e.g. it was quarantined by an earlier run — the
    quarantine folder it was moved to; else the run id (the batch is unknown)."""
    ing = _xcom(context, "ingest_batch")
    if ing and ing.get("sha256"):
        return batch_subject(str(ing["sha256"])), ing
    try:
        from pipeline import quarantine, stages
        from pipeline.spec import use_spec

        params = context.get("params") or {}
        events = context.get("triggering_asset_events") or {}
        extras = [e.extra for evs in events.values() for e in evs]
        dr = context["dag_run"]
        with use_spec(spec):
            uri = stages.resolve_batch_uri(
                params.get("batch_uri"), extras, dr.run_after.isoformat()
            )
            where = quarantine.rejected_before(uri)
        if where:
            return where.rstrip("/").rsplit("/", 1)[-1], None
    except Exception as err:  # noqa: BLE001
        log.debug("batch of the failed run not resolved: %s", err)
    m = _QUARANTINE_RX.search(str(exc or ""))
    if m:
        return m.group(1), None
    dr = context.get("dag_run")
    return f"run:{getattr(dr, 'run_id', 'unknown')}", None


def _chain(exc: BaseException | None) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def classify_failure(task_id: str, exc: BaseException | None) -> str:
    """The alert kind of a task's final failure, from its exception chain."""
    from pipeline.alerts import AlertKind
    from pipeline.checkpoint import CheckpointError
    from pipeline.errors import CheckpointRejected, DataRejected, PipelineRejection
    from pipeline.names import Task
    from pipeline.train.stopping import TrainingDiverged

    chain = _chain(exc)
    if any(isinstance(e, TrainingDiverged) for e in chain):
        return AlertKind.TRAINING_DIVERGED
    if task_id == Task.TRAIN_MODEL.value and any(type(e) is PipelineRejection for e in chain):
        return AlertKind.TRAINING_DIVERGED  # stages.train_model's wrapper of the divergence
    if any(isinstance(e, CheckpointRejected | CheckpointError) for e in chain):
        return AlertKind.CHECKPOINT_REJECTED
    if task_id in (Task.INGEST_BATCH.value, Task.VALIDATE_BATCH.value) and any(
        isinstance(e, DataRejected) for e in chain
    ):
        return AlertKind.BATCH_QUARANTINED
    return AlertKind.TASK_FAILED


# -- callbacks --------------------------------------------------------------------------------


def _load(spec_path: str) -> Any:
    from pipeline.spec import load_spec

    return load_spec(spec_path)


def on_task_failure(spec: Any, context: Any) -> None:
    """What the failure notifier does: one alert for the task's final failure."""
    from pipeline.alerts import AlertKind
    from pipeline.names import Task

    ti, dr = context["ti"], context["dag_run"]
    exc = context.get("exception")
    message = str(exc or "no exception recorded").strip().splitlines()
    first = (message[0] if message else "")[:300]
    if ti.task_id == Task.PUBLISH_SUMMARY.value and first.startswith("run failed at"):
        return  # the summary reports an upstream failure, which alerted already
    kind = AlertKind(classify_failure(ti.task_id, exc if isinstance(exc, BaseException) else None))
    details = {
        "dag_id": dr.dag_id,
        "run_id": dr.run_id,
        "task_id": ti.task_id,
        "try_number": getattr(ti, "try_number", None),
        "error": first,
    }
    value: Any = None
    threshold: Any = None
    if kind == AlertKind.TASK_FAILED:
        subject, rec = f"{dr.dag_id}.{ti.task_id}", _xcom(context, "ingest_batch")
        summary = f"task {ti.task_id} failed after its retries: {first}"
        value, threshold = getattr(ti, "try_number", None), "retries exhausted"
    else:
        subject, rec = _batch_of(context, spec, exc)
        if kind == AlertKind.BATCH_QUARANTINED:
            summary = f"batch {subject} broke the data contract and was quarantined: {first}"
            value, threshold = "contract violated", "0 violations"
        elif kind == AlertKind.CHECKPOINT_REJECTED:
            summary = f"checkpoint of batch {subject} rejected: {first}"
            value, threshold = "not intact", "digests, signature, finite tensors, reload parity"
        else:
            summary = f"training on batch {subject} diverged: {first}"
            value, threshold = "non-finite or exploding loss/gradient", "divergence guard"
    _raise(
        spec,
        kind=kind,
        subject=subject,
        summary=summary,
        value=value,
        threshold=threshold,
        links=_links(context, rec),
        details=details,
    )


class _SpecNotifier(BaseNotifier):
    """A notifier bound to one model spec (by path: the spec is re-read when it fires)."""

    template_fields = ()

    def __init__(self, spec_path: str):
        super().__init__()
        self.spec_path = spec_path

    def notify(self, context: Any) -> None:
        try:
            self.act(_load(self.spec_path), context)
        except Exception:  # noqa: BLE001 - a callback never hides the task's own outcome
            log.exception("%s: alert not raised", type(self).__name__)

    def act(self, spec: Any, context: Any) -> None:
        raise NotImplementedError


class PipelineFailureNotifier(_SpecNotifier):
    """``on_failure_callback``: the alert a task's final failure means."""

    def act(self, spec: Any, context: Any) -> None:
        on_task_failure(spec, context)


class PipelineSuccessNotifier(_SpecNotifier):
    """``on_success_callback``: a task that succeeds resolves its own ``task_failed``."""

    def act(self, spec: Any, context: Any) -> None:
        from pipeline.alerts import AlertKind

        ti, dr = context["ti"], context["dag_run"]
        _resolve(
            spec,
            AlertKind.TASK_FAILED,
            f"{dr.dag_id}.{ti.task_id}",
            f"task {ti.task_id} succeeded in {dr.run_id}",
        )


class ApprovalWaitingNotifier(_SpecNotifier):
    """``on_execute_callback`` of the approval task: someone has to answer."""

    def act(self, spec: Any, context: Any) -> None:
        from pipeline.alerts import AlertKind

        gated = _xcom(context, "gate_promotion") or {}
        version = str(gated.get("model_version") or "?")
        hours = spec.gate.approval_timeout_hours
        _raise(
            spec,
            kind=AlertKind.APPROVAL_WAITING,
            subject=f"v{version}",
            summary=f"v{version} passed the gate and waits for a human answer "
            f"(Approve/Reject); no answer in {hours:g} h counts as Reject",
            value="waiting",
            threshold=f"{hours:g} h",
            links={**_links(context, gated), "mlflow_version": _version_url(spec, version)},
        )


def failure_notifier(spec: Any) -> BaseNotifier:
    """The ``on_failure_callback`` of the model's DAG tasks (an Airflow ``BaseNotifier``)."""
    return PipelineFailureNotifier(str(spec.path))


def success_notifier(spec: Any) -> BaseNotifier:
    return PipelineSuccessNotifier(str(spec.path))


def approval_waiting(spec: Any) -> BaseNotifier:
    return ApprovalWaitingNotifier(str(spec.path))


# -- decision alerts (called from the task bodies, after the stage returned) ------------------


def after_training(spec: Any, trained: dict[str, Any]) -> None:
    """A run that trained: its batch's divergence alert resolves; per-tensor spikes or
    vanishing gradients in the telemetry it recorded raise ``gradient_anomaly``."""
    from pipeline import alerts
    from pipeline.alerts import AlertKind

    sha = str(trained.get("batch_sha256") or "")
    if not sha or trained.get("rank", 0):
        return
    subject = batch_subject(sha)
    _resolve(spec, AlertKind.TRAINING_DIVERGED, subject, "training on the batch finished")
    try:
        found = alerts.gradient_anomalies(alerts.gradient_series(trained["mlflow_run_id"]))
    except Exception as exc:  # noqa: BLE001 - the tracking server away: no judgement
        log.warning("gradient telemetry not read for anomalies: %s", exc)
        return
    # Spikes, vanishing gradients and dead units (counted per unit: a constant-zero input
    # column is not one; embedding tables are not judged) page.
    if not found:
        return
    worst = max(found, key=lambda a: a.value / a.threshold if a.what == "spike" else 0.0)
    first = found[0] if worst.what != "spike" else worst
    what = ", ".join(f"{a.tensor} {a.what} at step {a.step}" for a in found[:5])
    _raise(
        spec,
        kind=AlertKind.GRADIENT_ANOMALY,
        subject=subject,
        summary=f"{len(found)} gradient anomal{'y' if len(found) == 1 else 'ies'} ({what}); "
        f"{first.tensor}: L2 norm {first.value:.3g} vs threshold {first.threshold:.3g}",
        value=first.value,
        threshold=first.threshold,
        links={"mlflow_run": _run_url(trained)},
        details={"anomalies": [a.__dict__ for a in found]},
    )


def after_checkpoint(spec: Any, verified: dict[str, Any]) -> None:
    from pipeline.alerts import AlertKind

    if verified.get("batch_sha256"):
        _resolve(
            spec,
            AlertKind.CHECKPOINT_REJECTED,
            batch_subject(str(verified["batch_sha256"])),
            "a checkpoint of the batch verified intact",
        )


def after_gate(spec: Any, gated: dict[str, Any]) -> None:
    """A rejected challenger (info: the gate did its job; the champion stays)."""
    from pipeline.alerts import AlertKind

    if gated.get("promote"):
        return
    version = str(gated.get("model_version"))
    metric = gated.get("metric", "")
    _raise(
        spec,
        kind=AlertKind.GATE_REJECTED,
        subject=f"v{version}",
        summary=f"v{version} rejected by the gate ({gated.get('reason')}): "
        f"{gated.get('message', '')}"[:400],
        value=gated.get("challenger"),
        threshold=f"{metric} of champion v{gated.get('champion_version')} = "
        f"{gated.get('champion')} plus the margin",
        links={"mlflow_run": _run_url(gated), "mlflow_version": _version_url(spec, version)},
        details={"reasons": gated.get("reasons"), "record_uri": gated.get("record_uri")},
    )


def after_promotion(spec: Any, promoted: dict[str, Any]) -> None:
    """A canary rolled back, or a champion rolled back in its bake; an answered approval."""
    from pipeline.alerts import AlertKind

    version = str(promoted.get("model_version"))
    _resolve(spec, AlertKind.APPROVAL_WAITING, f"v{version}", "the approval was answered")
    verdict = promoted.get("verdict")
    kind = {
        "rolled_back": AlertKind.CANARY_ROLLED_BACK,
        "rolled_back_after_bake": AlertKind.BAKE_ROLLED_BACK,
    }.get(str(verdict))
    if kind is None:
        return
    canary = promoted.get("canary") or {}
    _raise(
        spec,
        kind=kind,
        subject=f"v{version}",
        summary=f"v{version} {'canary' if kind == AlertKind.CANARY_ROLLED_BACK else 'bake'} "
        f"rolled back ({promoted.get('reason')}) at weight {canary.get('weight_reached')}: "
        f"{promoted.get('summary', '')}"[:400],
        value=promoted.get("reason"),
        threshold="canary analysis vs champion",
        links={"mlflow_run": _run_url(promoted), "mlflow_version": _version_url(spec, version)},
        details={"canary": canary, "champion": promoted.get("previous_champion")},
    )


def after_summary(spec: Any, summary: dict[str, Any]) -> None:
    """A run that finished resolves the DAG's ``run_overdue``."""
    from pipeline.alerts import AlertKind

    _resolve(spec, AlertKind.RUN_OVERDUE, str(summary["dag_id"]), "a run of the DAG finished")


# -- run overdue: Airflow's deadline alerts ---------------------------------------------------


def run_overdue(*, spec_path: str, minutes: float, context: dict | None = None) -> None:
    """The deadline callback (run by the executor, with the DAG bundle on ``sys.path``)."""
    from pipeline.alerts import AlertKind

    sp = _load(spec_path)
    dr = (context or {}).get("dag_run") or {}
    dag_id = str(dr.get("dag_id") or sp.retrain_dag_id)
    run_id = str(dr.get("dag_run_id") or dr.get("run_id") or "")
    base = _settings().airflow_api_url.rstrip("/")
    _raise(
        sp,
        kind=AlertKind.RUN_OVERDUE,
        subject=dag_id,
        summary=f"run {run_id} of {dag_id} still not finished {minutes:g} min after it was "
        f"queued (slo.decision_minutes = {minutes:g})",
        value=f"> {minutes:g} min",
        threshold=f"{minutes:g} min",
        links={"airflow_run": f"{base}/dags/{dag_id}/runs/{run_id}"} if run_id else {},
        details={"deadline": (context or {}).get("deadline")},
    )


DEADLINES_ENV = "PIPELINE_DEADLINE_ALERTS"


def deadlines_enabled() -> bool:
    """Attach the deadline alert? Only where a scheduler runs the DAGs
    (``PIPELINE_DEADLINE_ALERTS=true``): in Airflow 3.3.2 ``airflow dags test`` fails on a DAG
    that has one (``DagRun.update_state`` looks the SDK's ``DeadlineAlert`` objects up as
    database ids), and ``dags test`` is this project's embedded default (``make demo``).
    Without it, ``python -m pipeline alerts --overdue --model NAME`` (``pipeline.alerts.
    check_overdue``, over Airflow's REST API) raises the same alert, e.g. from a cron."""
    return os.environ.get(DEADLINES_ENV, "").strip().lower() in ("1", "true", "yes")


def overdue_deadline(spec: Any) -> Any:
    """``DeadlineAlert``: the run queued + ``slo.decision_minutes``, else ``run_overdue``."""
    from datetime import timedelta

    from airflow.sdk.definitions.callback import SyncCallback
    from airflow.sdk.definitions.deadline import DeadlineAlert, DeadlineReference

    minutes = float(spec.slo.decision_minutes)
    return DeadlineAlert(
        reference=DeadlineReference.DAGRUN_QUEUED_AT,
        interval=timedelta(minutes=minutes),
        callback=SyncCallback(
            f"{__name__}.run_overdue", kwargs={"spec_path": str(spec.path), "minutes": minutes}
        ),
        name="run_overdue",
    )
