"""infra/grafana/dashboards/: the serving and training health dashboard, checked against the
basics of Grafana's dashboard schema (uid, title, schemaVersion, panels with unique ids and a
gridPos on the 24-column grid, datasource references to a templated Prometheus datasource)
and against what the scoring service really exports: every PromQL expression names metrics
and labels of the real registry (:mod:`_metrics_names`) or recording rules of
infra/prometheus/rules.yml, so a renamed metric fails here instead of showing an empty panel.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from _metrics_names import ROOT, exported_series, metric_names, recorded_series, unknown_names

DASHBOARDS = sorted((ROOT / "infra" / "grafana" / "dashboards").glob("*.json"))
PROMETHEUS_DS = {"type": "prometheus", "uid": "${datasource}"}
GRID_COLUMNS = 24
# panel types that query nothing
NO_QUERY = {"row", "text"}


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def _query_panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in _panels(dash) if p["type"] not in NO_QUERY]


def _variables(dash: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dash.get("templating", {}).get("list", [])}


@pytest.fixture(params=DASHBOARDS, ids=lambda p: p.name)
def dash(request) -> dict[str, Any]:
    return _load(request.param)


def test_there_is_a_dashboard():
    assert [p.name for p in DASHBOARDS] == ["retraining.json"]


def test_top_level_schema_basics(dash):
    assert isinstance(dash["uid"], str) and re.fullmatch(r"[A-Za-z0-9_-]{1,40}", dash["uid"])
    assert isinstance(dash["title"], str) and dash["title"].strip()
    assert isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 36
    assert isinstance(dash["panels"], list) and dash["panels"]
    assert "id" not in dash or dash["id"] is None, "an imported dashboard must not carry an id"


def test_panel_ids_are_unique_and_every_panel_has_type_and_title(dash):
    ids = [p["id"] for p in _panels(dash)]
    assert all(isinstance(i, int) for i in ids)
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"
    for p in _panels(dash):
        assert p["type"] and p.get("title"), p["id"]


def test_panels_sit_on_the_grid_without_overlapping(dash):
    cells: dict[tuple[int, int], int] = {}
    for p in dash["panels"]:
        g = p["gridPos"]
        assert set(g) >= {"h", "w", "x", "y"}, p["id"]
        assert all(isinstance(g[k], int) for k in "hwxy"), p["id"]
        assert g["h"] > 0 and g["w"] > 0 and g["x"] >= 0 and g["y"] >= 0, p["id"]
        assert g["x"] + g["w"] <= GRID_COLUMNS, f"panel {p['id']} is wider than the grid"
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panels {cells[(x, y)]} and {p['id']} overlap"
                cells[(x, y)] = p["id"]


def test_datasource_is_a_templated_prometheus(dash):
    variables = _variables(dash)
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    for p in _query_panels(dash):
        assert p["datasource"] == PROMETHEUS_DS, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == PROMETHEUS_DS, p["title"]
            assert t.get("refId"), p["title"]
        ref_ids = [t["refId"] for t in p["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), p["title"]
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"] == PROMETHEUS_DS, v["name"]


def test_every_expression_names_what_the_service_exports(dash):
    allowed = exported_series() | recorded_series()
    problems = {}
    for p in _query_panels(dash):
        for t in p["targets"]:
            assert metric_names(t["expr"]), f"{p['title']}: the query names no metric"
            if bad := unknown_names(t["expr"], allowed):
                problems[f"{p['title']} ({t['refId']})"] = bad
    assert problems == {}, "the dashboard queries series pipeline/serving/metrics.py lacks"


def test_variables_query_real_series_and_every_used_variable_exists(dash):
    variables = _variables(dash)
    allowed = exported_series()
    for v in variables.values():
        if v["type"] != "query":
            continue
        query = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
        assert m, f"{v['name']}: {query}"
        selector, label = m.groups()
        assert unknown_names(selector, allowed) == [], v["name"]
        assert label in frozenset().union(*(allowed[n] for n in metric_names(selector)))
    used = set()
    for p in _panels(dash):
        text = " ".join([json.dumps(p.get("targets", [])), p.get("title", "")])
        used |= set(re.findall(r"\$\{?(\w+)", text)) | ({p["repeat"]} if p.get("repeat") else set())
    used -= {"__rate_interval", "__interval", "__range"}
    assert used <= set(variables), f"undefined variables: {sorted(used - set(variables))}"


def test_the_dashboard_covers_serving_health(dash):
    """Requests, errors, latency, scores per alias, canary weight, readiness."""
    names = set()
    for p in _query_panels(dash):
        for t in p["targets"]:
            names |= metric_names(t["expr"])
    assert {
        "scoring_requests_total",
        "scoring_errors_total",
        "scoring_request_latency_seconds_bucket",
        "scoring_predicted_score_bucket",
        "scoring_canary_weight",
        "scoring_model_info",
        "up",
    } <= names


def test_threshold_lines_are_the_spec_defaults(dash):
    from pipeline.spec import MonitorSpec, SloSpec

    def red(title: str) -> float:
        (panel,) = [p for p in _query_panels(dash) if p["title"] == title]
        steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
        return next(s["value"] for s in steps if s["color"] == "red")

    assert red("5xx ratio") == SloSpec().serving_error_rate
    assert red("p99 latency") == SloSpec().serving_p99_ms / 1000
    assert red("Score drift (PSI, last hour vs the day before)") == MonitorSpec().score_drift_psi
