"""Airflow 3 plugin: "MLflow run" and "Model version" buttons on task instances.

Every task of the ``retrain_model`` DAG returns a small dict (XCom ``return_value``) holding
``mlflow_run_id`` / ``mlflow_experiment_id`` once known, and the registry tasks add
``model_name`` / ``model_version``. The two links below turn that dict into MLflow UI URLs.
A task whose return value lacks the keys gets ``""``, which the UI shows as a disabled link.

How links are resolved in Airflow 3 (checked against apache-airflow-core 3.3.2):

* Links registered as ``global_operator_extra_links`` are evaluated by the API server when the
  UI asks for a task instance's links (``SerializedBaseOperator.get_extra_links`` calls
  ``link.get_link(operator, ti_key=ti.key)`` in the API server process).
* ``XCom.get_value`` from the Task SDK only works where a supervisor channel exists (task
  runner, triggerer, DAG processor); in the API server it raises ``ImportError`` because
  ``SUPERVISOR_COMMS`` is unset. So the value is read with ``XCom.get_value`` when that
  channel exists and from the metadata DB (``XComModel``) otherwise, the way core's own
  ``XComOperatorLink`` does. The stored JSON is parsed with ``json.loads`` only; no
  deserializer that could instantiate classes from XCom data is used.
* ``get_link`` never raises: the API server does not catch errors per link, and a global link
  is evaluated for every task, so one failure would break the links of every task page.

Nothing heavy is imported here (no mlflow/torch/pandas): the module is loaded by every
Airflow component. The UI base URL is read lazily from ``PIPELINE_MLFLOW_UI_URL``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from airflow.plugins_manager import AirflowPlugin
from airflow.sdk import BaseOperatorLink

log = logging.getLogger(__name__)

DEFAULT_MLFLOW_UI_URL = "http://127.0.0.1:5000"
UI_URL_ENV = "PIPELINE_MLFLOW_UI_URL"
RETURN_VALUE_KEY = "return_value"


def mlflow_ui_url() -> str:
    """Base URL of the MLflow UI as seen from the user's browser (no trailing slash)."""
    return (os.environ.get(UI_URL_ENV) or DEFAULT_MLFLOW_UI_URL).rstrip("/")


def _field(xcom: Mapping[str, Any], key: str) -> str | None:
    """A non-empty str/int field of the XCom dict as text, else None."""
    value = xcom.get(key)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    text = str(value).strip()
    return text or None


def _segment(value: str) -> str:
    return quote(value, safe="")


def mlflow_run_url(xcom: Any, ui_base: str | None = None) -> str:
    """``{ui}/#/experiments/{exp}/runs/{run}`` from a task's return value, or ``""``."""
    if not isinstance(xcom, Mapping):
        return ""
    experiment_id = _field(xcom, "mlflow_experiment_id")
    run_id = _field(xcom, "mlflow_run_id")
    if experiment_id is None or run_id is None:
        return ""
    base = (mlflow_ui_url() if ui_base is None else ui_base).rstrip("/")
    return f"{base}/#/experiments/{_segment(experiment_id)}/runs/{_segment(run_id)}"


def model_version_url(xcom: Any, ui_base: str | None = None) -> str:
    """``{ui}/#/models/{name}/versions/{version}`` from a task's return value, or ``""``."""
    if not isinstance(xcom, Mapping):
        return ""
    name = _field(xcom, "model_name")
    version = _field(xcom, "model_version")
    if name is None or version is None:
        return ""
    base = (mlflow_ui_url() if ui_base is None else ui_base).rstrip("/")
    return f"{base}/#/models/{_segment(name)}/versions/{_segment(version)}"


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


class MlflowRunLink(BaseOperatorLink):
    """Opens the MLflow run that a task logged to."""

    name = "MLflow run"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        return mlflow_run_url(fetch_return_value(ti_key))


class ModelVersionLink(BaseOperatorLink):
    """Opens the registered model version that a task created or promoted."""

    name = "Model version"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        return model_version_url(fetch_return_value(ti_key))


class RetrainingPlugin(AirflowPlugin):
    """Registers the MLflow links for every operator (global operator extra links)."""

    name = "retraining"
    global_operator_extra_links = [MlflowRunLink(), ModelVersionLink()]
