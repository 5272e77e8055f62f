"""URLs into the MLflow and Airflow UIs, built from small records. Pure functions, no I/O.

Shared by the operator extra links (``retraining_plugin.py``) and the Retraining view
(``retraining_view.py``). Every builder returns ``""`` when the record lacks what it needs,
which Airflow hides (the API returns null); none of them raises on odd input.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

DEFAULT_MLFLOW_UI_URL = "http://127.0.0.1:5000"
UI_URL_ENV = "PIPELINE_MLFLOW_UI_URL"

# Run artifacts a reviewer opens from Airflow: written by pipeline/stages/ and the trainer.
VALIDATION_REPORT = "validation/report.html"
DRIFT_REPORT = "drift/report.html"
GRADIENT_SNAPSHOTS = "telemetry"


def mlflow_ui_url() -> str:
    """Base URL of the MLflow UI as seen from the user's browser (no trailing slash)."""
    return (os.environ.get(UI_URL_ENV) or DEFAULT_MLFLOW_UI_URL).rstrip("/")


def field(record: Any, key: str) -> str | None:
    """A non-empty str/int field of a dict as text, else None."""
    if not isinstance(record, Mapping):
        return None
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    text = str(value).strip()
    return text or None


def _segment(value: str) -> str:
    return quote(value, safe="")


def _base(ui_base: str | None) -> str:
    return (mlflow_ui_url() if ui_base is None else ui_base).rstrip("/")


def mlflow_run_url(xcom: Any, ui_base: str | None = None) -> str:
    """``{ui}/#/experiments/{exp}/runs/{run}`` from a task's return value, or ``""``."""
    experiment_id = field(xcom, "mlflow_experiment_id")
    run_id = field(xcom, "mlflow_run_id")
    if experiment_id is None or run_id is None:
        return ""
    return f"{_base(ui_base)}/#/experiments/{_segment(experiment_id)}/runs/{_segment(run_id)}"


def mlflow_artifact_url(xcom: Any, path: str, ui_base: str | None = None) -> str:
    """The run page's Artifacts tab opened at ``path`` (a file is previewed, HTML rendered)."""
    run = mlflow_run_url(xcom, ui_base)
    if not run:
        return ""
    clean = "/".join(_segment(p) for p in path.strip("/").split("/") if p)
    return f"{run}/artifacts/{clean}" if clean else f"{run}/artifacts"


def model_version_url(xcom: Any, ui_base: str | None = None) -> str:
    """``{ui}/#/models/{name}/versions/{version}`` from a task's return value, or ``""``."""
    name = field(xcom, "model_name")
    version = field(xcom, "model_version")
    if name is None or version is None:
        return ""
    return f"{_base(ui_base)}/#/models/{_segment(name)}/versions/{_segment(version)}"


def airflow_run_path(dag_id: str, run_id: str, airflow_base: str = "") -> str:
    """Path of a DAG run's page in the Airflow 3 UI (relative to the API server's origin)."""
    return f"{airflow_base.rstrip('/')}/dags/{_segment(dag_id)}/runs/{_segment(run_id)}"
