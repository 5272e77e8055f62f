"""The retraining Airflow plugin: URL building, XCom lookup, registration, the Retraining view."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
from _records import gated_record

ROOT = Path(__file__).resolve().parents[2]
PLUGINS_DIR = ROOT / "plugins"
PLUGIN_FILE = PLUGINS_DIR / "retraining_plugin.py"
if str(PLUGINS_DIR) not in sys.path:  # as Airflow does for the plugins folder
    sys.path.append(str(PLUGINS_DIR))

RUN_XCOM = {"mlflow_run_id": "0a1b2c3d", "mlflow_experiment_id": "12", "rows": 500}
MODEL_XCOM = {**RUN_XCOM, "model_name": "card-fraud", "model_version": "7"}


@dataclass(frozen=True)
class TIKey:
    dag_id: str = "retrain_card_fraud"
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
        "print(','.join(sorted(x for x in sys.modules if x.startswith('pipeline'))))\n"
    )
    import subprocess

    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    heavy, ours = out.stdout.split("\n")[:2]
    assert heavy == ""
    # the vocabulary, and the supported-stack check `import pipeline` runs: stdlib (and
    # packaging) only, no I/O beyond reading installed distributions' metadata
    assert ours == "pipeline,pipeline.names,pipeline.versions"


def test_run_url_from_xcom(plugin):
    url = plugin.mlflow_run_url(RUN_XCOM, "http://mlflow.example:5000/")
    assert url == "http://mlflow.example:5000/#/experiments/12/runs/0a1b2c3d"


def test_model_version_url_from_xcom(plugin):
    url = plugin.model_version_url(MODEL_XCOM, "http://mlflow.example:5000")
    assert url == "http://mlflow.example:5000/#/models/card-fraud/versions/7"


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
        "http://ui/#/models/card-fraud/versions/7"
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
        "MLflow run",
        "Model version",
        "Validation report",
        "Drift report",
        "Gradient snapshots",
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
    xcoms.update(
        ingest_batch=RUN_XCOM,
        train_model=RUN_XCOM,
        register_challenger=MODEL_XCOM,
        detect_drift={**RUN_XCOM, "verdict": "drift"},
    )
    assert _links(plugin, "train_model")["Gradient snapshots"].endswith(
        "/runs/0a1b2c3d/artifacts/telemetry"
    )
    assert _links(plugin, "detect_drift")["Drift report"].endswith("/artifacts/drift/report.html")
    gate = _links(plugin, "gate_promotion")  # no XCom of its own yet: falls back for both
    assert gate["Model version"] == "http://ui/#/models/card-fraud/versions/7"
    assert gate["MLflow run"].endswith("/runs/0a1b2c3d")
    assert gate["Validation report"] == gate["Drift report"] == gate["Gradient snapshots"] == ""


def test_no_drift_report_without_a_champion(plugin, xcoms):
    xcoms.update(ingest_batch=RUN_XCOM, detect_drift={**RUN_XCOM, "verdict": "no_reference"})
    assert _links(plugin, "detect_drift")["Drift report"] == ""


def test_nothing_known_means_disabled_links_not_errors(plugin, xcoms):
    assert set(_links(plugin, "ingest_batch").values()) == {""}


def test_sibling_key_of_a_real_task_instance_key(plugin):
    from airflow.models.taskinstancekey import TaskInstanceKey

    key = TaskInstanceKey("retrain_card_fraud", "validate_batch", "r1", 2, 3)
    sib = plugin.sibling_key(key, "ingest_batch")
    assert (sib.dag_id, sib.task_id, sib.run_id, sib.map_index) == (
        "retrain_card_fraud",
        "ingest_batch",
        "r1",
        -1,
    )


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


def test_version_link_names_the_dags_own_model_when_the_record_does_not(plugin, xcoms):
    """promote_champion's record names the version and the spec, not the registered model;
    a rollback's names the version it restored: the DAG's spec says which model."""
    promoted = {**RUN_XCOM, "stage": "promote_champion", "model": "digits", "model_version": "4"}
    xcoms["promote_champion"] = promoted
    link = plugin.ModelVersionLink()
    assert link.get_link(None, ti_key=TIKey("retrain_digits", "promote_champion")) == (
        "http://ui/#/models/digits/versions/4"
    )
    xcoms["promote_champion"] = {k: v for k, v in promoted.items() if k != "model"}
    assert link.get_link(None, ti_key=TIKey("retrain_card_fraud", "promote_champion")) == (
        "http://ui/#/models/card-fraud/versions/4"
    )
    xcoms["rollback_champion"] = {"kind": "rollback", "from_version": "5", "to_version": "3"}
    assert link.get_link(None, ti_key=TIKey("rollback_card_fraud", "rollback_champion")) == (
        "http://ui/#/models/card-fraud/versions/3"
    )
    # an unknown model or a DAG of no model: disabled, not an error
    assert link.get_link(None, ti_key=TIKey("retrain_no_such_model", "rollback_champion")) == ""
    assert link.get_link(None, ti_key=TIKey("some_other_dag", "promote_champion")) == ""
    xcoms["promote_champion"] = {
        **promoted,
        "model": str(ROOT / "models" / "digits" / "model.yaml"),
    }
    assert (
        link.get_link(None, ti_key=TIKey("retrain_digits", "promote_champion")) == ""
    )  # never a path
    assert plugin.model_of_dag("retrain_card_fraud") == "card_fraud"
    assert plugin.model_of_dag("rollback_digits") == "digits"
    assert plugin.model_of_dag("retrain_") is None and plugin.model_of_dag(None) is None


# -- the Retraining view: pure parts ------------------------------------------------------------


@pytest.fixture(scope="module")
def view(plugin):
    import retraining_view

    return retraining_view


@pytest.fixture(scope="module")
def infos(view):
    from pipeline.spec import get_spec

    return {
        name: view.model_info(get_spec(ROOT / "models" / name / "model.yaml"))
        for name in ("card_fraud", "digits")
    }


AIRFLOW_RUNS = [
    {
        "run_id": "manual__2026-03-02T00:00:00+00:00",
        "state": "success",
        "run_after": "2026-03-02T00:00+00:00",
        "run_type": "manual",
    },
    {
        "run_id": "scheduled__2026-03-01",
        "state": "failed",
        "run_after": "2026-03-01T03:00+00:00",
        "run_type": "scheduled",
    },
    {
        "run_id": "manual__never_reached_mlflow",
        "state": "queued",
        "run_after": "",
        "run_type": "manual",
    },
]
FOUND = {
    "manual__2026-03-02T00:00:00+00:00": {
        "mlflow_run_id": "abc",
        "mlflow_experiment_id": "1",
        "grad_norms": [0.6, 0.2, 0.1, 0.09],
        "tags": {
            "stage.validate_batch.verdict": "pass",
            "stage.detect_drift.verdict": "drift",
            "stage.detect_drift.summary": "8 of 9 <features> drifted",
            "stage.decide_retrain.verdict": "train",
            "train.stop_reason": "grad_norm_plateau",
            "stage.gate_promotion.verdict": "promote",
            "model.version": "2",
            "stage.promote_champion.verdict": "promoted",
            "stage.promote_champion.summary": "champion -> v2 (previous_champion v1)",
            "data.batch_uri": "file:///x/landing/batch-002.parquet",
        },
        "version_tags": {
            "gate.verdict": "promote",
            "gate.champion_version": "1",
            "gate.difference": "+0.396675",
            "gate.margin": "0.005",
            "gate.ci": "[+0.358070, +0.433763]",
            "gate.metric": "roc_auc",
            "gate.reason": "improves_on_champion",
            "policy.overrides": "none",
        },
    },
    "scheduled__2026-03-01": {
        "mlflow_run_id": "def",
        "mlflow_experiment_id": "1",
        "grad_norms": [],
        "tags": {"stage.validate_batch.verdict": "reject"},
    },
}
META = {
    "experiment_id": "1",
    "aliases": {
        "champion": {
            "version": "2",
            "tags": {
                "gate.verdict": "promote",
                "gate.metric": "roc_auc",
                "eval.roc_auc": "0.831967",
            },
        },
        "previous_champion": {"version": "1", "tags": {}},
    },
}


def test_build_section_joins_airflow_runs_with_their_mlflow_records(view, infos):
    m = view.build_section(
        infos["card_fraud"], AIRFLOW_RUNS, FOUND, META, airflow_base="/af", mlflow_ui="http://ui/"
    )
    ok, failed, queued = m.runs
    assert (
        ok.airflow_url
        == "/af/dags/retrain_card_fraud/runs/manual__2026-03-02T00%3A00%3A00%2B00%3A00"
    )
    assert ok.mlflow_url == "http://ui/#/experiments/1/runs/abc"
    assert ok.model_url == "http://ui/#/models/card-fraud/versions/2"
    assert (ok.validation, ok.drift, ok.decision, ok.stop_reason) == (
        "pass",
        "drift",
        "train",
        "grad_norm_plateau",
    )
    assert (ok.gate, ok.promotion, ok.canary, ok.aliases) == (
        "promote",
        "promoted",
        False,
        ["champion"],
    )
    assert ok.gate_detail == [
        "roc_auc +0.3967 vs v1 (needs +0.005)",
        "95% CI [+0.3581, +0.4338]",
        "improves_on_champion",
    ]
    assert ok.overrides == []
    assert (failed.validation, failed.gate, failed.model_url, failed.promotion) == (
        "reject",
        "",
        "",
        "",
    )
    assert queued.mlflow_url == "" and queued.validation == ""
    by_alias = {a.alias: a for a in m.aliases}
    assert by_alias["champion"].version == "2" and "roc_auc 0.832" in by_alias["champion"].detail
    assert by_alias["canary"].version == ""
    assert m.experiment_url == "http://ui/#/experiments/1"
    assert (
        m.model_url == "http://ui/#/models/card-fraud"
        and m.airflow_url == "/af/dags/retrain_card_fraud"
    )


def test_gate_detail_without_a_champion(view):
    lines = view.gate_detail(
        {
            "gate.champion_version": "none",
            "gate.metric": "roc_auc",
            "eval.roc_auc": "0.797250",
            "gate.floor": "0.7",
            "gate.reason": "no_champion_floors_met",
        }
    )
    assert lines == [
        "no champion: floors only",
        "roc_auc 0.7973 (floor 0.7)",
        "no_champion_floors_met",
    ]
    # a version tagged before gate.metric existed: the spec's primary metric names it
    assert view.gate_detail(
        {"gate.champion_version": "none", "eval.accuracy": "0.9"}, "accuracy"
    ) == ["no champion: floors only", "accuracy 0.9"]


def test_overrides_text(view):
    from pipeline.spec import get_spec, resolve_policy

    pol = resolve_policy(
        get_spec(ROOT / "models" / "card_fraud" / "model.yaml"),
        {"gate_non_inferiority_margin": 0.02, "gate_margin": 0.01},
    )
    raw = json.dumps(list(pol.overrides), default=str)  # as gate_promotion tags the version
    assert view.overrides_text(raw) == [
        "gate.margin 0.005 → 0.01 (tighter)",
        "gate.non_inferiority_margin None → 0.02 (loosened, the spec allows it)",
    ]
    assert view.overrides_text("none") == view.overrides_text(None) == []
    assert view.overrides_text("{oops") == ["{oops"]


def test_rendered_page_escapes_and_draws_sparklines(view, infos):
    section = view.build_section(
        infos["card_fraud"], AIRFLOW_RUNS, FOUND, META, mlflow_ui="http://ui"
    )
    page = view.PageData(
        models=[section],
        mlflow_ui="http://ui",
        broken=[view.BrokenSpec("/m/x/model.yaml", "field 'task' = '<b>'")],
    )
    page.problems.append("MLflow: <down>")
    html = view.render_page(page)
    assert (
        html.count("<svg") == 1
        and "<polyline" in html
        and "train.grad_norm over 4 epoch(s)" in html
    )
    assert "&lt;features&gt;" in html and "<features>" not in html
    assert "MLflow: &lt;down&gt;" in html and "&#x27;&lt;b&gt;&#x27;" in html
    assert 'data-run-id="scheduled__2026-03-01"' in html and 'data-alias="champion"' in html
    assert "batch-002.parquet" in html
    assert "<script" not in html and "http://" not in html.replace(
        "http://ui", ""
    )  # no external assets


@pytest.mark.parametrize(
    ("verdict", "cls"),
    [
        ("pass", "good"),
        ("promote", "good"),
        ("reject", "bad"),
        ("quarantined", "bad"),
        ("drift", "warn"),
        ("not_promoted", "warn"),
        ("", "none"),
        ("not_run", "none"),
        ("rolled_back", "bad"),
        ("rolled_back_after_bake", "bad"),
        ("paused", "warn"),
        ("aborted", "warn"),
        ("something_new", "info"),
    ],
)
def test_verdict_classes(view, verdict, cls):
    assert view.verdict_class(verdict) == cls


def test_sparkline_handles_empty_flat_and_non_finite(view):
    assert "svg" not in view.sparkline([])
    assert "svg" not in view.sparkline([float("nan")])
    flat = view.sparkline([1.0, 1.0, 1.0])
    assert "<polyline" in flat and "nan" not in flat.lower()
    assert "circle" in view.sparkline([0.5])


def test_page_endpoint_renders_collected_data(view, infos, monkeypatch):
    from fastapi.testclient import TestClient

    async def allow(request):
        return lambda dag_id: dag_id != "retrain_digits"

    seen = {}

    def fake_collect(limit, airflow_base, may_read):
        seen.update(limit=limit, base=airflow_base, digits=may_read("retrain_digits"))
        section = view.build_section(
            infos["card_fraud"],
            AIRFLOW_RUNS,
            FOUND,
            META,
            airflow_base=airflow_base,
            mlflow_ui="http://ui",
        )
        return view.PageData(models=[section], mlflow_ui="http://ui", hidden=["digits"])

    monkeypatch.setattr(view, "authorize", allow)
    monkeypatch.setattr(view, "collect", fake_collect)
    client = TestClient(view.create_app())
    r = client.get("/?limit=500")
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    assert "Who serves" in r.text and seen["limit"] == view.MAX_LIMIT and seen["digits"] is False
    assert "you may not read their runs): digits" in r.text
    assert client.get("/icon.svg").headers["content-type"].startswith("image/svg+xml")


def test_authorize_redirects_to_login_and_checks_each_models_dag(view, monkeypatch):
    import asyncio

    from airflow.api_fastapi import app as api_app
    from airflow.api_fastapi.core_api import security
    from fastapi import HTTPException

    asked = []

    class Manager:
        def get_url_login(self, next_url):
            return f"/auth/login?next={next_url}"

        def is_authorized_dag(self, *, method, access_entity, details, user):
            asked.append((method, details.id, user))
            return details.id == "retrain_digits"

    async def resolve(token):
        if token != "good":
            raise HTTPException(401, "no token")
        return "alice"

    monkeypatch.setattr(api_app, "get_auth_manager", lambda: Manager())
    monkeypatch.setattr(security, "resolve_user_from_token", resolve)

    def request(headers=()):
        from starlette.requests import Request

        return Request(
            {
                "type": "http",
                "headers": [(k.encode(), v.encode()) for k, v in headers],
                "root_path": "/retraining",
                "path": "/",
                "query_string": b"",
            }
        )

    denied = asyncio.run(view.authorize(request()))
    assert (
        denied.status_code == 303 and denied.headers["location"] == "/auth/login?next=/retraining/"
    )
    may_read = asyncio.run(view.authorize(request([("authorization", "Bearer good")])))
    assert may_read("retrain_digits") and not may_read("retrain_card_fraud")
    assert asked == [("GET", "retrain_digits", "alice"), ("GET", "retrain_card_fraud", "alice")]


# -- the Retraining view on a real MLflow store: two models, a broken spec ----------------------


BROKEN_SPEC = "contract: contract.yaml\ntask: <b>trinary</b>\n"
SAME_RUN = "scheduled__2026-03-01T03:00:00+00:00"  # one run id in both models' DAGs


def _stage_tags(spec, airflow_run_id: str, verdicts: dict[str, str]):
    """A DAG run's MLflow run with stage verdicts, as ingest_batch and the stages write them."""
    from pipeline import registry, stages

    ctx = stages.RunContext(spec.retrain_dag_id, airflow_run_id)
    rid = registry.get_or_create_run(
        ctx.run_key,
        {"airflow.dag_id": ctx.dag_id, "airflow.run_id": ctx.run_id, "pipeline.model": spec.name},
    )
    for stage, verdict in verdicts.items():
        stages.context.write_stage(
            rid, stage, verdict, f"{stage}: {verdict}", {"stage": stage, "verdict": verdict}
        )
    return ctx, rid


def _challenger(
    spec, airflow_run_id: str, *, value: float, champion: str | None, requested: dict | None = None
) -> dict:
    """A registered, gated challenger: registry calls of register_challenger, and the version
    tags gate_promotion writes (metric named by the spec, overrides from the run's policy)."""
    from pipeline import registry, stages

    ctx, rid = _stage_tags(
        spec,
        airflow_run_id,
        {
            "ingest_batch": "ok",
            "validate_batch": "pass",
            "detect_drift": "drift" if champion else "no_reference",
            "decide_retrain": "train",
            "train_model": "trained",
        },
    )
    version = registry.register_version(
        rid,
        ctx.run_key,
        f"file:///ck/{ctx.run_key}",
        {"airflow.dag_id": ctx.dag_id, "airflow.run_id": ctx.run_id},
        "",
    )
    registry.set_alias(registry.CHALLENGER, version)
    registry.set_tags(rid, {"model.version": version})
    pol = stages.run_policy(requested)
    metric = spec.primary_metric
    registry.tag_version(
        version,
        {
            "gate.verdict": "promote",
            "gate.reason": "improves_on_champion" if champion else "no_champion_floors_met",
            "gate.metric": metric,
            "gate.margin": pol.margin,
            "gate.floor": pol.floor,
            "gate.champion_version": champion or "none",
            f"eval.{metric}": f"{value:.6f}",
            "policy.overrides": json.dumps(list(pol.overrides), default=str)
            if pol.overrides
            else "none",
            **(
                {"gate.difference": "+0.012000", "gate.ci": "[+0.004000, +0.020000]"}
                if champion
                else {}
            ),
        },
    )
    stages.context.write_stage(
        rid, "gate_promotion", "promote", f"v{version} promotes", {"stage": "gate_promotion"}
    )
    gated = gated_record(version, rid, champion_version=champion, model=spec.name)
    return {"ctx": ctx, "rid": rid, "version": version, "gated": gated}


def _start_canary(version: str) -> None:
    """What run_canary_rollout does before the first step: alias canary, weight, status."""
    from pipeline import registry
    from pipeline.serving import traffic

    registry.tag_version(version, {"canary.status": "running", "canary.champion_version": "1"})
    traffic.set_canary_weight(0.25)
    registry.set_alias(traffic.CANARY, version)


@pytest.fixture
def two_models(pipeline_home, mlflow_store, tmp_path, monkeypatch):
    """card_fraud and digits in one MLflow store, beside a broken spec; returns the Airflow runs."""
    from pipeline import canary, registry, settings, stages
    from pipeline.spec import get_spec, use_spec

    models = tmp_path / "models"
    for name in ("card_fraud", "digits"):
        shutil.copytree(
            ROOT / "models" / name, models / name, ignore=shutil.ignore_patterns("__pycache__")
        )
    (models / "broken").mkdir()
    (models / "broken" / "model.yaml").write_text(BROKEN_SPEC)
    monkeypatch.setenv("PIPELINE_MODELS_ROOT", str(models))
    settings.get_settings.cache_clear()

    with use_spec(get_spec("card_fraud")) as card:
        # 1. first champion, promoted directly, with an override the spec allows
        c1 = _challenger(
            card,
            SAME_RUN,
            value=0.83,
            champion=None,
            requested={"gate_non_inferiority_margin": 0.02},
        )
        assert stages.promote_champion(c1["ctx"], c1["gated"]).verdict == "promoted"
        # 2. a canary a reviewer aborted; the task (re)runs canary_rollout: rolled back
        c2 = _challenger(card, "manual__c2", value=0.85, champion="1")
        _start_canary(c2["version"])
        canary.abort_canary(c2["version"], "p95 latency doubled", who="alice")
        assert stages.canary_rollout(c2["ctx"], c2["gated"]).verdict == "rolled_back"
        # 3. a canary rollout in progress: no promote_champion verdict yet
        c3 = _challenger(card, "manual__c3", value=0.86, champion="1")
        _start_canary(c3["version"])
    with use_spec(get_spec("digits")) as digits:
        # the first digits champion, through the canary path: no champion, promoted directly
        d1 = _challenger(digits, SAME_RUN, value=0.9, champion=None)
        out = stages.canary_rollout(d1["ctx"], d1["gated"], service_url="http://127.0.0.1:9")
        assert out.verdict == "promoted" and out.path == "canary"
    runs = {
        "retrain_card_fraud": [
            {
                "run_id": "manual__c3",
                "state": "running",
                "run_after": "2026-03-03T00:00+00:00",
                "run_type": "manual",
            },
            {
                "run_id": "manual__c2",
                "state": "success",
                "run_after": "2026-03-02T00:00+00:00",
                "run_type": "manual",
            },
            {
                "run_id": SAME_RUN,
                "state": "success",
                "run_after": "2026-03-01T03:00+00:00",
                "run_type": "scheduled",
            },
            {"run_id": "manual__queued", "state": "queued", "run_after": "", "run_type": "manual"},
        ],
        "retrain_digits": [
            {
                "run_id": SAME_RUN,
                "state": "success",
                "run_after": "2026-03-01T03:00+00:00",
                "run_type": "scheduled",
            },
        ],
    }
    return {"runs": runs, "c1": c1, "c2": c2, "c3": c3, "d1": d1, "client": registry.client()}


def test_view_shows_every_model_from_one_store_and_a_broken_spec(view, two_models, monkeypatch):
    monkeypatch.setattr(
        view, "airflow_runs", lambda dag_id, limit: two_models["runs"].get(dag_id, [])[:limit]
    )
    monkeypatch.setenv("PIPELINE_MLFLOW_UI_URL", "http://ui")
    page = view.collect(20, "/af")
    assert page.problems == [] and page.hidden == []
    assert [m.name for m in page.models] == ["card_fraud", "digits"]
    (broken,) = page.broken
    assert (
        broken.path.endswith("broken/model.yaml")
        and "trinary" in broken.error
        and "task" in broken.error
    )
    assert broken.name == "broken"

    card, digits = page.model("card_fraud"), page.model("digits")
    assert (card.info.model_name, card.info.primary_metric, card.info.margin) == (
        "card-fraud",
        "roc_auc",
        0.005,
    )
    assert (digits.info.model_name, digits.info.primary_metric, digits.info.margin) == (
        "digits",
        "accuracy",
        0.01,
    )
    assert (
        card.experiment_url != digits.experiment_url
        and card.experiment_url
        and digits.experiment_url
    )
    assert (
        card.model_url == "http://ui/#/models/card-fraud"
        and digits.model_url == "http://ui/#/models/digits"
    )

    # the same Airflow run id in both DAGs: each section has its own model's run and version
    c1 = next(r for r in card.runs if r.run_id == SAME_RUN)
    d1 = next(r for r in digits.runs if r.run_id == SAME_RUN)
    assert c1.mlflow_url.endswith(f"/runs/{two_models['c1']['rid']}")
    assert d1.mlflow_url.endswith(f"/runs/{two_models['d1']['rid']}")
    assert c1.model_url == "http://ui/#/models/card-fraud/versions/1"
    assert d1.model_url == "http://ui/#/models/digits/versions/1"
    assert c1.airflow_url == "/af/dags/retrain_card_fraud/runs/" + quote(SAME_RUN, safe="")
    assert d1.airflow_url == "/af/dags/retrain_digits/runs/" + quote(SAME_RUN, safe="")
    # the gate's evidence names each spec's primary metric
    assert c1.gate_detail[:2] == ["no champion: floors only", "roc_auc 0.83 (floor 0.7)"]
    assert d1.gate_detail[:2] == ["no champion: floors only", "accuracy 0.9 (floor 0.5)"]
    assert c1.overrides == [
        "gate.non_inferiority_margin None → 0.02 (loosened, the spec allows it)"
    ]
    assert d1.overrides == []

    # promotion: what promote_champion / canary_rollout wrote
    rows = {r.run_id: r for r in card.runs}
    assert (c1.promotion, c1.canary, c1.aliases) == ("promoted", False, ["champion"])
    c2, c3, queued = rows["manual__c2"], rows["manual__c3"], rows["manual__queued"]
    assert (c2.promotion, c2.canary) == ("rolled_back", True)
    assert (
        "aborted by alice: p95 latency doubled" in c2.promotion_summary
        and "aborted" in c2.canary_detail
    )
    assert c2.gate_detail[0] == "roc_auc +0.0120 vs v1 (needs +0.005)"
    assert (c3.promotion, c3.canary, c3.aliases) == ("running", True, ["canary", "challenger"])
    # a decided canary (here: promoted, no champion to compare against) is no longer a challenger
    assert (d1.promotion, d1.canary, d1.aliases) == ("promoted", True, ["champion"])
    assert (
        "no champion to compare against" in d1.promotion_summary
        and "no_champion" in d1.canary_detail
    )
    assert queued.promotion == queued.mlflow_url == ""
    # ...which is the promote_champion stage's tag: no stage of the pipeline is called canary_rollout
    tags = two_models["client"].get_run(two_models["c2"]["rid"]).data.tags
    assert tags["stage.promote_champion.verdict"] == "rolled_back"
    assert not any(k.startswith("stage.canary_rollout") for k in tags)

    # who serves, per model
    card_aliases = {a.alias: a for a in card.aliases}
    digits_aliases = {a.alias: a for a in digits.aliases}
    assert (
        card_aliases["champion"].version == "1"
        and "roc_auc 0.83" in card_aliases["champion"].detail
    )
    assert "1 override(s)" in card_aliases["champion"].detail
    assert card_aliases["canary"].version == two_models["c3"]["version"] == "3"
    assert "canary running" in card_aliases["canary"].detail and card.canary_weight == 0.25
    assert card_aliases["previous_champion"].version == ""
    assert (
        digits_aliases["champion"].version == "1"
        and "accuracy 0.9" in digits_aliases["champion"].detail
    )
    assert digits_aliases["champion"].url == "http://ui/#/models/digits/versions/1"
    assert digits_aliases["canary"].version == digits_aliases["previous_champion"].version == ""

    html = view.render_page(page, airflow_base="/af")
    assert html.count('<section class="model"') == 2
    assert 'data-model="card_fraud"' in html and 'data-model="digits"' in html
    assert "Broken model spec" in html and 'data-broken-spec="broken"' in html
    assert "&lt;b&gt;trinary&lt;/b&gt;" in html and "<b>trinary" not in html
    assert (
        "primary metric <code>roc_auc</code>" in html
        and "primary metric <code>accuracy</code>" in html
    )
    assert (
        "Gate (accuracy)" in html
        and "gate margin 0.01 (absolute)" in html
        and "ROC AUC" not in html
    )
    assert "traffic to canary 25%" in html
    assert html.count('data-run-id="' + SAME_RUN + '"') == 2


def test_view_leaves_out_models_the_user_may_not_read(view, two_models, monkeypatch):
    monkeypatch.setattr(
        view, "airflow_runs", lambda dag_id, limit: two_models["runs"].get(dag_id, [])
    )
    page = view.collect(5, may_read=lambda dag_id: dag_id == "retrain_digits")
    assert [m.name for m in page.models] == ["digits"] and page.hidden == ["card_fraud"]
    assert "you may not read their runs): card_fraud" in view.render_page(page)


def test_collect_turns_a_dead_source_into_a_problem_line(view, two_models, monkeypatch):
    def boom(*a, **k):
        raise ConnectionError("refused")

    monkeypatch.setattr(view, "airflow_runs", boom)
    monkeypatch.setattr(view, "mlflow_state", boom)
    page = view.collect(5)
    assert [m.name for m in page.models] == ["card_fraud", "digits"] and len(page.broken) == 1
    for m in page.models:
        assert len(m.problems) == 2 and all("refused" in p for p in m.problems) and m.runs == []
    html = view.render_page(page)
    assert "No runs of retrain_card_fraud yet" in html and "No runs of retrain_digits yet" in html

    monkeypatch.setattr(view, "discover_models", boom)
    page = view.collect(5)
    assert page.models == [] and page.problems == ["Model specs: ConnectionError: refused"]


def test_the_view_reads_the_tags_a_real_run_wrote(pipeline_home, view):
    """Not a fixture of hand-written tags: the data stages run for real, and every column the
    view fills from them shows what they recorded (a renamed tag key leaves a column empty)."""
    from pipeline import stages, storage
    from pipeline.data.generate import WorldSpec, generate, to_parquet_bytes
    from pipeline.spec import get_spec, use_spec

    root = (pipeline_home / "storage").as_uri()
    batch = storage.write_bytes(
        f"{root}/landing/card_fraud/real.parquet",
        to_parquet_bytes(generate(WorldSpec(rows=2000, seed=3))),
    ).uri
    with use_spec(get_spec("card_fraud")) as spec:
        ctx = stages.RunContext(spec.retrain_dag_id, "manual__real", "2026-03-01T00:00:00Z")
        ingested = stages.ingest_batch(ctx, batch)
        validated = stages.validate_batch(ctx, ingested)
        drifted = stages.detect_drift(ctx, ingested)
        decided = stages.decide_retrain(ctx, drifted)
        info = view.model_info(spec)
        found, meta = view.mlflow_state(info, [ctx.run_id])
    runs = [{"run_id": ctx.run_id, "state": "running", "run_after": "", "run_type": "manual"}]
    (row,) = view.build_section(info, runs, found, meta, mlflow_ui="http://ui").runs
    assert (row.validation, row.validation_summary) == (validated.verdict, validated.summary)
    assert (row.drift, row.drift_summary) == ("no_reference", drifted.summary)
    assert (row.decision, row.decision_summary) == ("train", decided.summary)
    assert (
        row.mlflow_url.endswith(ingested.mlflow_run_id) or ingested.mlflow_run_id in row.mlflow_url
    )
