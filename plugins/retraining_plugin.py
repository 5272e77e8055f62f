"""Airflow 3 plugin: MLflow buttons on task instances, and the "Retraining" view.

There is one ``retrain_<name>`` DAG (and one ``rollback_<name>``) per model spec
(``models/<name>/model.yaml``). Every task of a retrain DAG returns a small dict (XCom
``return_value``) holding ``mlflow_run_id`` / ``mlflow_experiment_id`` once known, and the
registry tasks add ``model_name`` / ``model_version``. The links below turn that dict into
MLflow UI URLs:

* **MLflow run** and **Model version** on every task. A task with no return value of its
  own (it failed, or was skipped) falls back to the run's ``ingest_batch`` (run) or
  ``register_challenger`` (version) record: all tasks of a DAG run share one MLflow run.
* The registered model is the record's own ``model_name``. A record that names a version but
  not the model (``promote_champion``'s; a rollback's ``to_version``) gets it from its spec:
  the record's ``model`` (the spec name) or the DAG id (``retrain_<name>`` /
  ``rollback_<name>``), through ``pipeline.spec`` (the spec's ``registered_model``); never
  from a process-wide default, which would point one model's links at another's versions.
* **Validation report** on ``validate_batch``, **Drift report** on ``detect_drift`` (not
  when there was no champion to compare against) and **Gradient snapshots** on
  ``train_model``: the run's artifact page at ``validation/report.html``,
  ``drift/report.html`` and ``telemetry/``.

A link with nothing to point at is ``""``: the API returns it as null and the UI hides it
(extra links are listed in a task instance's **Details** tab).

The **Retraining** view (``retraining_view.py``) is a FastAPI app mounted by the API server
at ``/retraining`` and listed in the UI navigation (``external_views``); it opens in a new
tab rather than in Airflow's iframe because the iframe is sandboxed without
``allow-popups`` / ``allow-top-navigation`` and MLflow refuses to be framed
(``X-Frame-Options``), so its links could not be followed from inside it.

How links are resolved in Airflow 3 (checked against apache-airflow-core 3.3.2):

* Links registered as ``global_operator_extra_links`` are evaluated by the API server when the
  UI asks for a task instance's links (``SerializedBaseOperator.get_extra_links`` calls
  ``link.get_link(operator, ti_key=ti.key)`` in the API server process).
* ``XCom.get_value`` from the Task SDK only works where a supervisor connection exists (task
  runner, triggerer, DAG processor); in the API server it raises ``ImportError`` because
  ``SUPERVISOR_COMMS`` is unset. So the value is read with ``XCom.get_value`` when that
  connection exists and from the metadata DB (``XComModel``) otherwise, the way core's own
  ``XComOperatorLink`` does. The stored JSON is parsed with ``json.loads`` only; no
  deserializer that could instantiate classes from XCom data is used.
* ``get_link`` never raises: the API server does not catch errors per link, and a global link
  is evaluated for every task, so one failure would break the links of every task page.

Nothing heavy is imported here (no mlflow/torch/pandas, nor ``pipeline``: a spec is read only
when a link needs a model's name): the module is loaded by every Airflow component. The UI
base URL is read lazily from ``PIPELINE_MLFLOW_UI_URL``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import sys
from collections.abc import Mapping
from typing import Any, NamedTuple

from airflow.plugins_manager import AirflowPlugin
from airflow.sdk import BaseOperatorLink

from pipeline.names import RETRAIN_DAG_PREFIX, ROLLBACK_DAG_PREFIX, Task

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # Airflow puts the plugins folder on sys.path; loading by path may not
    sys.path.append(_HERE)

import retraining_view  # noqa: E402  (fastapi only; mlflow is imported per request)
from retraining_urls import (  # noqa: E402
    DRIFT_REPORT,
    GRADIENT_SNAPSHOTS,
    VALIDATION_REPORT,
    field,
    mlflow_artifact_url,
    mlflow_run_url,
    mlflow_ui_url,
    model_version_url,
)

log = logging.getLogger(__name__)

__all__ = [
    "RetrainingPlugin",
    "mlflow_artifact_url",
    "mlflow_run_url",
    "mlflow_ui_url",
    "model_version_url",
]

RETURN_VALUE_KEY = "return_value"
RUN_SOURCE_TASK = Task.INGEST_BATCH.value  # creates the DAG run's MLflow run; later tasks share it
VERSION_SOURCE_TASK = Task.REGISTER_CHALLENGER.value  # creates the model version
DAG_PREFIXES = (RETRAIN_DAG_PREFIX, ROLLBACK_DAG_PREFIX)  # one DAG of each per spec: <prefix><name>
SPEC_NAME = re.compile(r"^[a-z][a-z0-9_]{0,47}$")  # pipeline.spec.NAME_PATTERN


class _Key(NamedTuple):
    dag_id: str
    task_id: str
    run_id: str
    map_index: int = -1
    try_number: int = 1


def decode_xcom_value(raw: Any) -> Any:
    """Turn a raw ``xcom.value`` column value into Python data using JSON only.

    Values pushed through the Task Execution API are already decoded by SQLAlchemy's JSON
    type; values serialized by ``BaseXCom.serialize_value`` come back as a JSON string.
    """
    if isinstance(raw, (bytes, bytearray)):
        raw = raw.decode("utf-8", errors="replace")
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except ValueError:
            return None
    return raw


def _read_return_value_from_db(ti_key: Any) -> Any:
    """Read the task's ``return_value`` XCom from the metadata DB (API server context)."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.execute(
            XComModel.get_many(
                key=RETURN_VALUE_KEY,
                run_id=ti_key.run_id,
                dag_ids=ti_key.dag_id,
                task_ids=ti_key.task_id,
                map_indexes=ti_key.map_index,
            ).with_only_columns(XComModel.value)
        ).first()
    return None if row is None else decode_xcom_value(row.value)


def _has_supervisor_comms() -> bool:
    task_runner = sys.modules.get("airflow.sdk.execution_time.task_runner")
    return hasattr(task_runner, "SUPERVISOR_COMMS")


def fetch_return_value(ti_key: Any) -> Any:
    """The task instance's ``return_value`` XCom, or None when it cannot be read."""
    try:
        if _has_supervisor_comms():
            from airflow.sdk.execution_time.xcom import XCom

            return XCom.get_value(ti_key=ti_key, key=RETURN_VALUE_KEY)
        return _read_return_value_from_db(ti_key)
    except Exception:  # never break the task page over a link
        log.warning("Could not read return_value XCom for %s", ti_key, exc_info=True)
        return None


def sibling_key(ti_key: Any, task_id: str) -> Any:
    """The key of another (unmapped) task of the same DAG run."""
    if hasattr(ti_key, "_replace"):  # TaskInstanceKey is a NamedTuple
        return ti_key._replace(task_id=task_id, map_index=-1)
    if dataclasses.is_dataclass(ti_key) and not isinstance(ti_key, type):
        return dataclasses.replace(ti_key, task_id=task_id, map_index=-1)
    return _Key(ti_key.dag_id, task_id, ti_key.run_id)


def _record_with(ti_key: Any, keys: tuple[str, ...], source_task: str) -> Any:
    """This task's return value if it has ``keys``, else that of ``source_task`` in the run."""
    own = fetch_return_value(ti_key)
    if all(field(own, k) for k in keys) or getattr(ti_key, "task_id", None) == source_task:
        return own
    return fetch_return_value(sibling_key(ti_key, source_task))


def run_record(ti_key: Any) -> Any:
    """A record naming the DAG run's MLflow run (own return value, else ingest_batch's)."""
    return _record_with(ti_key, ("mlflow_run_id", "mlflow_experiment_id"), RUN_SOURCE_TASK)


def model_of_dag(dag_id: Any) -> str | None:
    """The spec name of a per-model DAG: ``retrain_card_fraud`` -> ``card_fraud``."""
    if not isinstance(dag_id, str):
        return None
    for prefix in DAG_PREFIXES:
        if dag_id.startswith(prefix) and len(dag_id) > len(prefix):
            return dag_id[len(prefix) :]
    return None


def registered_model_name(dag_id: Any, model: str | None = None) -> str | None:
    """The registered model of spec ``model`` (else of the DAG's spec), or None."""
    name = model or model_of_dag(dag_id)
    if not name or not SPEC_NAME.match(name):  # a spec name, never a path read from a record
        return None
    try:
        from pipeline.spec import get_spec

        return get_spec(name).model_name
    except Exception:  # noqa: BLE001 - a link without a model beats a broken task page
        log.warning("no model spec %r for DAG %s", name, dag_id, exc_info=True)
        return None


def _named_version(record: Any, dag_id: Any) -> Any:
    """``record`` with ``model_name`` filled in from its spec when it names a version only."""
    if not isinstance(record, Mapping):
        return record
    if not field(record, "model_version") and field(record, "to_version"):
        record = {**record, "model_version": record["to_version"]}  # a rollback: now serving
    if field(record, "model_version") and not field(record, "model_name"):
        name = registered_model_name(dag_id, field(record, "model"))
        if name:
            record = {**record, "model_name": name}
    return record


def version_record(ti_key: Any) -> Any:
    """A record naming the run's model version (own return value, else register_challenger's);
    the registered model is the record's, else that of the DAG's spec."""
    dag_id = getattr(ti_key, "dag_id", None)
    own = _named_version(fetch_return_value(ti_key), dag_id)
    keys = ("model_name", "model_version")
    if all(field(own, k) for k in keys) or getattr(ti_key, "task_id", None) == VERSION_SOURCE_TASK:
        return own
    return _named_version(fetch_return_value(sibling_key(ti_key, VERSION_SOURCE_TASK)), dag_id)


class _SafeLink(BaseOperatorLink):
    """``get_link`` never raises: the API server evaluates global links for every task and does
    not catch errors per link, so one failure would break the links of every task page."""

    name = ""

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        try:
            return self.url(ti_key) or ""
        except Exception:
            log.warning("link %r failed for %s", self.name, ti_key, exc_info=True)
            return ""

    def url(self, ti_key: Any) -> str:  # pragma: no cover - overridden
        raise NotImplementedError


class MlflowRunLink(_SafeLink):
    """Opens the MLflow run that the DAG run logs to."""

    name = "MLflow run"

    def url(self, ti_key: Any) -> str:
        return mlflow_run_url(run_record(ti_key))


class ModelVersionLink(_SafeLink):
    """Opens the registered model version that the DAG run created."""

    name = "Model version"

    def url(self, ti_key: Any) -> str:
        return model_version_url(version_record(ti_key))


class _ArtifactLink(_SafeLink):
    """The run's artifact page at ``path``, on ``task_id`` only (where the artifact is made)."""

    task_id = ""
    path = ""

    def url(self, ti_key: Any) -> str:
        if getattr(ti_key, "task_id", None) != self.task_id:
            return ""
        return mlflow_artifact_url(run_record(ti_key), self.path)


class ValidationReportLink(_ArtifactLink):
    """The Great Expectations report, also (above all) when the batch was rejected."""

    name = "Validation report"
    task_id, path = "validate_batch", VALIDATION_REPORT


class DriftReportLink(_ArtifactLink):
    """The Evidently report; disabled when there was no champion to compare against."""

    name = "Drift report"
    task_id, path = "detect_drift", DRIFT_REPORT

    def url(self, ti_key: Any) -> str:
        if getattr(ti_key, "task_id", None) != self.task_id:
            return ""
        own = fetch_return_value(ti_key)
        if isinstance(own, dict) and own.get("verdict") == "no_reference":
            return ""
        return mlflow_artifact_url(own if mlflow_run_url(own) else run_record(ti_key), self.path)


class GradientSnapshotsLink(_ArtifactLink):
    """The trainer's gradient telemetry and snapshots (``telemetry/`` of the run)."""

    name = "Gradient snapshots"
    task_id, path = "train_model", GRADIENT_SNAPSHOTS


def _view_href() -> str:
    """Where the Retraining view is served, below the API server's base URL path."""
    try:
        from urllib.parse import urlsplit

        from airflow.configuration import conf

        base = urlsplit(conf.get("api", "base_url", fallback="") or "").path.rstrip("/")
    except Exception:  # noqa: BLE001 - a plain default beats a plugin that fails to load
        base = ""
    return f"{base}{retraining_view.URL_PREFIX}/"


class RetrainingPlugin(AirflowPlugin):
    """MLflow links on every task, and the Retraining view in the navigation."""

    name = "retraining"
    global_operator_extra_links = [
        MlflowRunLink(),
        ModelVersionLink(),
        ValidationReportLink(),
        DriftReportLink(),
        GradientSnapshotsLink(),
    ]
    fastapi_apps = [
        {"app": retraining_view.app, "url_prefix": retraining_view.URL_PREFIX, "name": "Retraining"}
    ]
    # No url_route: the entry opens the page in a new tab instead of Airflow's sandboxed iframe
    # (see the module docstring). Under "Browse", not top level: Airflow 3.3.2 renders a
    # top-level external entry as a <button href> that does not navigate.
    external_views = [
        {
            "name": "Retraining",
            "href": _view_href(),
            "icon": _view_href() + "icon.svg",
            "destination": "nav",
            "category": "browse",
        }
    ]
