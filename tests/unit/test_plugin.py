"""The retraining Airflow plugin: URL building, XCom lookup, registration, the Retraining view."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

PLUGINS_DIR = Path(__file__).resolve().parents[2] / "plugins"
PLUGIN_FILE = PLUGINS_DIR / "retraining_plugin.py"
if str(PLUGINS_DIR) not in sys.path:  # as Airflow does for the plugins folder
    sys.path.append(str(PLUGINS_DIR))

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
        "print(','.join(x for x in ('mlflow', 'torch', 'pandas', 'pipeline') if x in sys.modules))\n"
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
    assert seen == [key]
    # no version in its own record: the run's register_challenger record is asked next
    assert plugin.ModelVersionLink().get_link(None, ti_key=key) == ""
    assert [k.task_id for k in seen[1:]] == ["train_model", "register_challenger"]


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
    assert {link.name for link in links} == {
        "MLflow run", "Model version", "Validation report", "Drift report", "Gradient snapshots"
    }
    assert all(isinstance(link, BaseOperatorLink) for link in links)


# -- fallbacks and artifact links -------------------------------------------------------------


@pytest.fixture
def xcoms(plugin, monkeypatch):
    """A fake metadata DB: task_id -> return value of one DAG run."""
    from airflow.sdk.execution_time import task_runner

    monkeypatch.delattr(task_runner, "SUPERVISOR_COMMS", raising=False)
    monkeypatch.setenv("PIPELINE_MLFLOW_UI_URL", "http://ui")
    store: dict[str, object] = {}
    monkeypatch.setattr(plugin, "_read_return_value_from_db", lambda key: store.get(key.task_id))
    return store


def _links(plugin, task_id):
    ext = plugin.RetrainingPlugin.global_operator_extra_links
    return {link.name: link.get_link(None, ti_key=TIKey(task_id=task_id)) for link in ext}


def test_failed_task_falls_back_to_the_runs_ingest_record(plugin, xcoms):
    """validate_batch raised (bad batch): no XCom of its own, but the report is what matters."""
    xcoms["ingest_batch"] = RUN_XCOM
    links = _links(plugin, "validate_batch")
    assert links["MLflow run"] == "http://ui/#/experiments/12/runs/0a1b2c3d"
    assert links["Validation report"] == (
        "http://ui/#/experiments/12/runs/0a1b2c3d/artifacts/validation/report.html"
    )
    assert links["Model version"] == links["Drift report"] == links["Gradient snapshots"] == ""


def test_artifact_links_only_on_the_task_that_makes_the_artifact(plugin, xcoms):
    xcoms.update(ingest_batch=RUN_XCOM, train_model=RUN_XCOM, register_challenger=MODEL_XCOM,
                 detect_drift={**RUN_XCOM, "verdict": "drift"})  # fmt: skip
    assert _links(plugin, "train_model")["Gradient snapshots"].endswith("/runs/0a1b2c3d/artifacts/telemetry")
    assert _links(plugin, "detect_drift")["Drift report"].endswith("/artifacts/drift/report.html")
    gate = _links(plugin, "gate_promotion")  # no XCom of its own yet: falls back for both
    assert gate["Model version"] == "http://ui/#/models/retrain-model/versions/7"
    assert gate["MLflow run"].endswith("/runs/0a1b2c3d")
    assert gate["Validation report"] == gate["Drift report"] == gate["Gradient snapshots"] == ""


def test_no_drift_report_without_a_champion(plugin, xcoms):
    xcoms.update(ingest_batch=RUN_XCOM, detect_drift={**RUN_XCOM, "verdict": "no_reference"})
    assert _links(plugin, "detect_drift")["Drift report"] == ""


def test_nothing_known_means_disabled_links_not_errors(plugin, xcoms):
    assert set(_links(plugin, "ingest_batch").values()) == {""}


def test_sibling_key_of_a_real_task_instance_key(plugin):
    from airflow.models.taskinstancekey import TaskInstanceKey

    key = TaskInstanceKey("retrain_model", "validate_batch", "r1", 2, 3)
    sib = plugin.sibling_key(key, "ingest_batch")
    assert (sib.dag_id, sib.task_id, sib.run_id, sib.map_index) == ("retrain_model", "ingest_batch", "r1", -1)


def test_artifact_url_quotes_segments_but_keeps_slashes(plugin):
    url = plugin.mlflow_artifact_url(RUN_XCOM, "/drift/report 1.html", "http://ui")
    assert url == "http://ui/#/experiments/12/runs/0a1b2c3d/artifacts/drift/report%201.html"
    assert plugin.mlflow_artifact_url({}, "x", "http://ui") == ""


# -- registration of the view -------------------------------------------------------------


def test_view_is_mounted_and_listed_in_the_navigation(plugin):
    from airflow.api_fastapi.app import RESERVED_URL_PREFIXES
    from airflow.api_fastapi.core_api.datamodels.plugins import (
        ExternalViewResponse,
        FastAPIAppResponse,
    )
    from fastapi import FastAPI

    (app,) = plugin.RetrainingPlugin.fastapi_apps
    assert isinstance(app["app"], FastAPI)
    assert not any(app["url_prefix"].startswith(p) for p in RESERVED_URL_PREFIXES)
    FastAPIAppResponse(**{**app, "app": "x"})
    (view,) = plugin.RetrainingPlugin.external_views
    parsed = ExternalViewResponse(**view)  # the API server's own schema for the UI
    assert parsed.destination == "nav" and parsed.category == "browse"
    assert parsed.url_route is None  # opens in a tab: Airflow's iframe sandbox blocks our links
    assert parsed.href == app["url_prefix"] + "/"


# -- the Retraining view ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def view(plugin):
    import retraining_view

    return retraining_view


AIRFLOW_RUNS = [
    {"run_id": "manual__2026-03-02T00:00:00+00:00", "state": "success",
     "run_after": "2026-03-02T00:00+00:00", "run_type": "manual"},
    {"run_id": "scheduled__2026-03-01", "state": "failed", "run_after": "2026-03-01T03:00+00:00",
     "run_type": "scheduled"},
    {"run_id": "manual__never_reached_mlflow", "state": "queued", "run_after": "", "run_type": "manual"},
]  # fmt: skip
FOUND = {
    "manual__2026-03-02T00:00:00+00:00": {
        "mlflow_run_id": "abc", "mlflow_experiment_id": "1", "grad_norms": [0.6, 0.2, 0.1, 0.09],
        "tags": {"stage.validate_batch.verdict": "pass", "stage.detect_drift.verdict": "drift",
                 "stage.detect_drift.summary": "8 of 9 <features> drifted",
                 "stage.decide_retrain.verdict": "train", "train.stop_reason": "grad_norm_plateau",
                 "stage.gate_promotion.verdict": "promote", "model.version": "2",
                 "stage.canary_rollout.verdict": "promoted",
                 "data.batch_uri": "file:///x/landing/batch-002.parquet"},
        "version_tags": {"gate.verdict": "promote", "gate.champion_version": "1",
                         "gate.difference": "+0.396675", "gate.margin": "0.005",
                         "gate.ci": "[+0.358070, +0.433763]", "gate.metric": "roc_auc",
                         "gate.reason": "improves_on_champion"},
    },
    "scheduled__2026-03-01": {
        "mlflow_run_id": "def", "mlflow_experiment_id": "1", "grad_norms": [],
        "tags": {"stage.validate_batch.verdict": "reject"},
    },
}  # fmt: skip
META = {"model_name": "retrain-model", "experiment_id": "1", "aliases": {
    "champion": {"version": "2", "tags": {"gate.verdict": "promote", "eval.roc_auc": "0.831967"}},
    "previous_champion": {"version": "1", "tags": {}},
}}  # fmt: skip


def test_build_page_joins_airflow_runs_with_their_mlflow_records(view):
    page = view.build_page(AIRFLOW_RUNS, FOUND, META, airflow_base="/af", mlflow_ui="http://ui/")
    ok, failed, queued = page.runs
    assert ok.airflow_url == "/af/dags/retrain_model/runs/manual__2026-03-02T00%3A00%3A00%2B00%3A00"
    assert ok.mlflow_url == "http://ui/#/experiments/1/runs/abc"
    assert ok.model_url == "http://ui/#/models/retrain-model/versions/2"
    assert (ok.validation, ok.drift, ok.decision, ok.stop_reason) == ("pass", "drift", "train", "grad_norm_plateau")
    assert (ok.gate, ok.canary, ok.aliases) == ("promote", "promoted", ["champion"])
    assert ok.gate_detail == ["roc_auc +0.3967 vs v1 (needs +0.005)", "95% CI [+0.3581, +0.4338]",
                              "improves_on_champion"]  # fmt: skip
    assert (failed.validation, failed.gate, failed.model_url) == ("reject", "", "")
    assert queued.mlflow_url == "" and queued.validation == ""
    by_alias = {a.alias: a for a in page.aliases}
    assert by_alias["champion"].version == "2" and "roc_auc 0.832" in by_alias["champion"].detail
    assert by_alias["canary"].version == ""
    assert page.experiment_url == "http://ui/#/experiments/1"


def test_gate_detail_without_a_champion(view):
    lines = view.gate_detail({"gate.champion_version": "none", "gate.metric": "roc_auc",
                              "eval.roc_auc": "0.797250", "gate.floor": "0.7",
                              "gate.reason": "no_champion_floors_met"})  # fmt: skip
    assert lines == ["no champion: floors only", "roc_auc 0.7973 (floor 0.7)", "no_champion_floors_met"]


def test_rendered_page_escapes_and_draws_sparklines(view):
    page = view.build_page(AIRFLOW_RUNS, FOUND, META, mlflow_ui="http://ui")
    page.problems.append("MLflow: <down>")
    html = view.render_page(page)
    assert html.count("<svg") == 1 and "<polyline" in html and "train.grad_norm over 4 epoch(s)" in html
    assert "&lt;features&gt;" in html and "<features>" not in html
    assert "MLflow: &lt;down&gt;" in html
    assert 'data-run-id="scheduled__2026-03-01"' in html and 'data-alias="champion"' in html
    assert "batch-002.parquet" in html
    assert "<script" not in html and "http://" not in html.replace("http://ui", "")  # no external assets


@pytest.mark.parametrize(
    ("verdict", "cls"),
    [("pass", "good"), ("promote", "good"), ("reject", "bad"), ("quarantined", "bad"),
     ("drift", "warn"), ("not_promoted", "warn"), ("", "none"), ("not_run", "none"),
     ("something_new", "info")],
)  # fmt: skip
def test_verdict_classes(view, verdict, cls):
    assert view.verdict_class(verdict) == cls


def test_sparkline_handles_empty_flat_and_non_finite(view):
    assert "svg" not in view.sparkline([])
    assert "svg" not in view.sparkline([float("nan")])
    flat = view.sparkline([1.0, 1.0, 1.0])
    assert "<polyline" in flat and "nan" not in flat.lower()
    assert "circle" in view.sparkline([0.5])


def test_page_endpoint_renders_collected_data(view, monkeypatch):
    from fastapi.testclient import TestClient

    async def allow(request):
        return None

    seen = {}

    def fake_collect(limit, airflow_base):
        seen.update(limit=limit, base=airflow_base)
        return view.build_page(AIRFLOW_RUNS, FOUND, META, airflow_base=airflow_base, mlflow_ui="http://ui")

    monkeypatch.setattr(view, "authorize", allow)
    monkeypatch.setattr(view, "collect", fake_collect)
    client = TestClient(view.create_app())
    r = client.get("/?limit=500")
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    assert "Who serves" in r.text and seen["limit"] == view.MAX_LIMIT
    assert client.get("/icon.svg").headers["content-type"].startswith("image/svg+xml")


def test_collect_turns_a_dead_source_into_a_problem_line(view, monkeypatch):
    def boom(*a, **k):
        raise ConnectionError("refused")

    monkeypatch.setattr(view, "airflow_runs", boom)
    monkeypatch.setattr(view, "mlflow_state", boom)
    page = view.collect(5)
    assert len(page.problems) == 2 and all("refused" in p for p in page.problems)
    assert page.runs == [] and "No runs of retrain_model yet" in view.render_page(page)
