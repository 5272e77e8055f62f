"""The retraining Airflow plugin: URL building, XCom lookup and registration."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

PLUGINS_DIR = Path(__file__).resolve().parents[2] / "plugins"
PLUGIN_FILE = PLUGINS_DIR / "retraining_plugin.py"

RUN_XCOM = {"mlflow_run_id": "0a1b2c3d", "mlflow_experiment_id": "12", "rows": 500}
MODEL_XCOM = {**RUN_XCOM, "model_name": "retrain-model", "model_version": "7"}


@dataclass(frozen=True)
class TIKey:
    dag_id: str = "retrain_model"
    task_id: str = "register_challenger"
    run_id: str = "manual__2026-01-01"
    map_index: int = -1
    try_number: int = 1


@pytest.fixture(scope="module")
def plugin():
    spec = importlib.util.spec_from_file_location("retraining_plugin_under_test", PLUGIN_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _ui_url(monkeypatch):
    monkeypatch.delenv("PIPELINE_MLFLOW_UI_URL", raising=False)


def test_module_imports_no_heavy_libraries():
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('p', {str(PLUGIN_FILE)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print(','.join(x for x in ('mlflow', 'torch', 'pandas') if x in sys.modules))\n"
    )
    import subprocess

    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == ""


def test_run_url_from_xcom(plugin):
    url = plugin.mlflow_run_url(RUN_XCOM, "http://mlflow.example:5000/")
    assert url == "http://mlflow.example:5000/#/experiments/12/runs/0a1b2c3d"


def test_model_version_url_from_xcom(plugin):
    url = plugin.model_version_url(MODEL_XCOM, "http://mlflow.example:5000")
    assert url == "http://mlflow.example:5000/#/models/retrain-model/versions/7"


def test_int_ids_and_url_unsafe_names(plugin):
    xcom = {
        "mlflow_run_id": "r1",
        "mlflow_experiment_id": 3,
        "model_name": "fraud model/v2",
        "model_version": 5,
    }
    assert plugin.mlflow_run_url(xcom, "http://ui") == "http://ui/#/experiments/3/runs/r1"
    assert (
        plugin.model_version_url(xcom, "http://ui")
        == "http://ui/#/models/fraud%20model%2Fv2/versions/5"
    )


@pytest.mark.parametrize(
    "xcom",
    [
        None,
        "not a dict",
        ["mlflow_run_id"],
        {},
        {"mlflow_run_id": "abc"},
        {"mlflow_experiment_id": "1"},
        {"mlflow_run_id": "", "mlflow_experiment_id": "1"},
        {"mlflow_run_id": None, "mlflow_experiment_id": "1"},
        {"mlflow_run_id": {"nested": 1}, "mlflow_experiment_id": "1"},
        {"mlflow_run_id": True, "mlflow_experiment_id": "1"},
    ],
)
def test_run_url_empty_when_keys_missing(plugin, xcom):
    assert plugin.mlflow_run_url(xcom, "http://ui") == ""


@pytest.mark.parametrize(
    "xcom",
    [
        None,
        RUN_XCOM,
        {"model_name": "m"},
        {"model_version": "1"},
        {"model_name": " ", "model_version": "1"},
    ],
)
def test_model_url_empty_when_keys_missing(plugin, xcom):
    assert plugin.model_version_url(xcom, "http://ui") == ""


def test_ui_base_url_read_lazily_from_env(plugin, monkeypatch):
    assert plugin.mlflow_run_url(RUN_XCOM).startswith("http://127.0.0.1:5000/#/")
    monkeypatch.setenv("PIPELINE_MLFLOW_UI_URL", "https://mlflow.internal/")
    assert plugin.mlflow_run_url(RUN_XCOM) == (
        "https://mlflow.internal/#/experiments/12/runs/0a1b2c3d"
    )


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"a": 1}, {"a": 1}),
        (json.dumps({"a": 1}), {"a": 1}),
        (json.dumps({"a": 1}).encode(), {"a": 1}),
        ("{not json", None),
        (None, None),
    ],
)
def test_decode_xcom_value_uses_json_only(plugin, raw, expected):
    assert plugin.decode_xcom_value(raw) == expected


def test_get_link_uses_sdk_xcom_get_value_inside_a_task_runtime(plugin, monkeypatch):
    """Where a supervisor channel exists, links read XCom.get_value(key="return_value")."""
    from airflow.sdk.execution_time import task_runner
    from airflow.sdk.execution_time.xcom import XCom

    calls = []

    def fake_get_value(cls, *, ti_key, key):
        calls.append((ti_key, key))
        return MODEL_XCOM

    monkeypatch.setattr(task_runner, "SUPERVISOR_COMMS", object(), raising=False)
    monkeypatch.setattr(XCom, "get_value", classmethod(fake_get_value))
    monkeypatch.setenv("PIPELINE_MLFLOW_UI_URL", "http://ui")
    key = TIKey()

    assert plugin.MlflowRunLink().get_link(None, ti_key=key) == (
        "http://ui/#/experiments/12/runs/0a1b2c3d"
    )
    assert plugin.ModelVersionLink().get_link(None, ti_key=key) == (
        "http://ui/#/models/retrain-model/versions/7"
    )
    assert calls == [(key, "return_value"), (key, "return_value")]


def test_get_link_reads_metadata_db_in_api_server(plugin, monkeypatch):
    """Without a supervisor channel (the API server), the DB reader is used instead."""
    from airflow.sdk.execution_time import task_runner

    monkeypatch.delattr(task_runner, "SUPERVISOR_COMMS", raising=False)
    seen = []

    def fake_db(ti_key):
        seen.append(ti_key)
        return RUN_XCOM

    monkeypatch.setattr(plugin, "_read_return_value_from_db", fake_db)
    key = TIKey(task_id="train_model")
    assert (
        plugin.MlflowRunLink()
        .get_link(None, ti_key=key)
        .endswith("/#/experiments/12/runs/0a1b2c3d")
    )
    assert plugin.ModelVersionLink().get_link(None, ti_key=key) == ""
    assert seen == [key, key]


def test_get_link_never_raises(plugin, monkeypatch):
    from airflow.sdk.execution_time import task_runner

    monkeypatch.delattr(task_runner, "SUPERVISOR_COMMS", raising=False)

    def broken(ti_key):
        raise RuntimeError("metadata DB unreachable")

    monkeypatch.setattr(plugin, "_read_return_value_from_db", broken)
    assert plugin.MlflowRunLink().get_link(None, ti_key=TIKey()) == ""
    assert plugin.ModelVersionLink().get_link(None, ti_key=TIKey()) == ""


def test_airflow_loads_plugin_with_global_links():
    from airflow._shared.plugins_manager.plugins_manager import (
        _load_plugins_from_plugin_directory,
    )
    from airflow.sdk import BaseOperatorLink

    plugins, errors = _load_plugins_from_plugin_directory(str(PLUGINS_DIR))
    assert errors == {}
    ours = [p for p in plugins if p.name == "retraining"]
    assert len(ours) == 1
    links = ours[0].global_operator_extra_links
    assert {link.name for link in links} == {"MLflow run", "Model version"}
    assert all(isinstance(link, BaseOperatorLink) for link in links)
