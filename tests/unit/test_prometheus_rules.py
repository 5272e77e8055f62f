"""infra/prometheus/: the scoring service's alerting and recording rules.

``promtool check rules`` / ``check config`` and ``promtool test rules`` (the unit tests in
rules_test.yml: each alert firing on a realistic failure and silent where it must) run the
real promtool (Debian package ``prometheus``; ``.ci/run`` installs it). Without promtool the
promtool tests skip on a workstation and fail under CI (``CI`` set).

The rules may only name series the service really exports (read from its own registry,
:mod:`_metrics_names`), and their thresholds are the model spec's SLO defaults.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from _metrics_names import ROOT, exported_series, recorded_series, rules, unknown_names

PROM = ROOT / "infra" / "prometheus"
RUNBOOK_KINDS = {
    "serving_error_rate",
    "serving_latency",
    "serving_score_drift",
    "serving_not_ready",
}
# share of the error budget each window pair may spend (Google SRE workbook, multiwindow,
# multi-burn-rate alerts): (long window, short window) -> share
BUDGET_SHARES = {("1h", "5m"): 0.02, ("6h", "30m"): 0.05, ("1d", "2h"): 0.10, ("3d", "6h"): 0.10}
_HOURS = {"m": 1 / 60, "h": 1.0, "d": 24.0}


def _hours(window: str) -> float:
    return float(window[:-1]) * _HOURS[window[-1]]


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        msg = (
            "promtool is not installed: `apt-get install -y prometheus` (Debian's package "
            "ships promtool; .ci/run installs it)"
        )
        if os.environ.get("CI"):
            pytest.fail(msg + " - under CI the rule tests must run")
        pytest.skip(msg)
    return path


def _run(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *args], cwd=PROM, capture_output=True, text=True, timeout=300, check=False
    )


def alerts() -> list[dict]:
    return [r for r in rules() if "alert" in r]


# --- promtool ----------------------------------------------------------------------------------


def test_promtool_checks_the_rules(promtool):
    res = _run(promtool, "check", "rules", "rules.yml")
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(rules())} rules found" in res.stdout


def test_promtool_checks_the_scrape_config(promtool):
    res = _run(promtool, "check", "config", "prometheus.yml")
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_unit_tests_pass(promtool):
    res = _run(promtool, "test", "rules", "rules_test.yml")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_every_alert_has_a_unit_test_that_fires_and_one_that_does_not():
    doc = yaml.safe_load((PROM / "rules_test.yml").read_text())
    fired, silent = set(), set()
    for case in doc["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {a["alert"] for a in alerts()}
    assert names - fired == set(), "alerts never shown firing"
    assert names - silent == set(), "alerts never shown staying silent"


# --- the rules name what the service exports -----------------------------------------------


def test_rules_name_only_series_the_service_exports():
    allowed = exported_series() | recorded_series()
    problems = {
        r.get("record") or r["alert"]: unknown_names(r["expr"], allowed)
        for r in rules()
        if unknown_names(r["expr"], allowed)
    }
    assert problems == {}, "rules.yml names series or labels that pipeline/serving/metrics.py lacks"


def test_the_name_check_catches_a_renamed_metric_or_label():
    """The check itself: a metric or label the registry does not have is reported."""
    allowed = exported_series()
    assert unknown_names("rate(scoring_requests_total[5m])", allowed) == []
    assert unknown_names("rate(scoring_request_total[5m])", allowed) == [
        "metric 'scoring_request_total'"
    ]
    assert unknown_names('sum by (slot) (scoring_model_info{alias="champion"})', allowed) == [
        "label 'slot'"
    ]


def test_the_scrape_job_is_the_one_the_rules_select():
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    assert config["rule_files"] == ["rules.yml"]
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert jobs["scoring"]["static_configs"][0]["targets"] == ["scoring:8000"]
    for rule in rules():
        for job in re.findall(r'job="([^"]*)"', rule["expr"]):
            assert job in jobs, f"{rule.get('alert') or rule['record']}: job {job!r} not scraped"


# --- every alert is actionable -----------------------------------------------------------------


@pytest.mark.parametrize("rule", alerts(), ids=lambda r: f"{r['alert']}-{r['labels']['severity']}")
def test_every_alert_has_severity_summary_and_runbook(rule):
    from pipeline.alerts import Severity

    assert rule["labels"]["severity"] in {s.value for s in Severity}
    summary = rule["annotations"]["summary"]
    # names the value (or what was expected, where the value is an absence) and the threshold
    assert "$value" in summary or "expected" in summary, summary
    assert re.search(r"\d", summary), f"no threshold in {summary!r}"
    runbook = rule["annotations"]["runbook_url"]
    m = re.fullmatch(r"docs/runbooks/(\w+)\.md", runbook)
    assert m and m.group(1) in RUNBOOK_KINDS, runbook
    assert (ROOT / runbook).is_file(), f"{runbook} is missing"


def test_every_serving_runbook_is_used_by_an_alert():
    used = {Path(a["annotations"]["runbook_url"]).stem for a in alerts()}
    assert used == RUNBOOK_KINDS


# --- thresholds are the spec's defaults ------------------------------------------------------


def test_error_budget_alerts_follow_the_slo_defaults():
    from pipeline.spec import SloSpec

    slo = SloSpec()
    burn = [a for a in alerts() if a["labels"].get("slo") == "serving_error_rate"]
    seen = set()
    for a in burn:
        long, short = a["labels"]["long_window"], a["labels"]["short_window"]
        seen.add((long, short))
        assert _hours(long) / _hours(short) == 12, (long, short)
        expected = round(BUDGET_SHARES[(long, short)] * slo.window_days * 24 / _hours(long), 3)
        assert float(a["labels"]["burn_rate"]) == expected, a["alert"]
        threshold = f"({a['labels']['burn_rate']} * {slo.serving_error_rate})"
        for window in (long, short):
            assert f"model_alias:scoring_error_ratio:rate{window} > {threshold}" in a["expr"]
        assert a["labels"]["severity"] == ("critical" if _hours(long) <= 6 else "warning")
    assert seen == set(BUDGET_SHARES)


def test_latency_and_drift_alerts_follow_the_spec_defaults():
    from pipeline.spec import MonitorSpec, SloSpec

    p99_s = SloSpec().serving_p99_ms / 1000
    latency = [a for a in alerts() if a["alert"] == "ScoringLatencyP99High"]
    assert {a["labels"]["severity"] for a in latency} == {"warning", "critical"}
    for a in latency:
        assert a["expr"].strip().endswith(f"> {p99_s}")
        assert f"{SloSpec().serving_p99_ms:g}ms" in a["annotations"]["summary"]
    (drift,) = [a for a in alerts() if a["alert"] == "ScoringScoreDrift"]
    assert f"> {MonitorSpec().score_drift_psi}" in drift["expr"]


def test_shipped_model_specs_use_the_thresholds_the_rules_encode():
    """The rules hold the defaults; a spec that changes them needs its own rules."""
    from pipeline.spec import MonitorSpec, SloSpec, load_all

    slo, mon = SloSpec(), MonitorSpec()
    for spec in load_all(ROOT / "models"):
        assert spec.slo.serving_error_rate == slo.serving_error_rate, spec.name
        assert spec.slo.serving_p99_ms == slo.serving_p99_ms, spec.name
        assert spec.slo.window_days == slo.window_days, spec.name
        assert spec.monitor.score_drift_psi == mon.score_drift_psi, spec.name
