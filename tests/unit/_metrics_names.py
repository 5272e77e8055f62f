"""What the scoring service really exports, read from its own registry, and the metric and
label names a PromQL expression uses: the Prometheus rules (test_prometheus_rules.py) and the
Grafana dashboard (test_dashboards.py) may only name series that exist, so renaming a metric
or a label in pipeline/serving/metrics.py fails those tests instead of leaving a silent
alert or an empty panel.

The registry is the real one (:class:`pipeline.serving.metrics.ServiceMetrics`, the object the
service renders at ``/metrics``); its families give the names and types (counter ->
``_total``/``_created``, histogram -> ``_bucket``/``_count``/``_sum``/``_created``) and its
metric objects the label names.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES_FILE = ROOT / "infra" / "prometheus" / "rules.yml"

# the sample names each family type exposes (prometheus_client's text format)
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gauge": ("",),
}
# added by Prometheus itself when it scrapes a target
TARGET_LABELS = frozenset({"job", "instance"})
SCRAPE_SERIES = {"up": TARGET_LABELS}

_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "offset",
        "bool",
        "atan2",
        "inf",
        "nan",
        "Inf",
        "NaN",
    }
)
_GROUPING = re.compile(
    r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", re.IGNORECASE
)
_NAME = re.compile(r"(?<![\w.:$])[A-Za-z_:][\w:]*")


@cache
def exported_series() -> dict[str, frozenset[str]]:
    """Sample name -> the label names its series carry once scraped (target labels included)."""
    from prometheus_client.metrics import MetricWrapperBase

    from pipeline.serving.metrics import ServiceMetrics

    metrics = ServiceMetrics()
    # each metric object's label names (prometheus_client keeps them on the parent metric)
    labels = {
        w._name: frozenset(w._labelnames)
        for w in vars(metrics).values()
        if isinstance(w, MetricWrapperBase)
    }
    out: dict[str, frozenset[str]] = dict(SCRAPE_SERIES)
    for family in metrics.registry.collect():
        assert family.type in _SUFFIXES, f"{family.name}: type {family.type} not handled here"
        for suffix in _SUFFIXES[family.type]:
            extra = frozenset({"le"}) if suffix == "_bucket" else frozenset()
            out[family.name + suffix] = labels[family.name] | extra | TARGET_LABELS
    return out


def _strip(expr: str) -> str:
    """The expression without string literals, Grafana variables and range selectors."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    s = re.sub(r"\$\{[^}]*\}|\$\w+", "", s)
    return re.sub(r"\[[^\]]*\]", "", s)


def metric_names(expr: str) -> set[str]:
    """The metric names (incl. recording rules) a PromQL expression selects."""
    s = _GROUPING.sub(" ", re.sub(r"\{[^}]*\}", " ", _strip(expr)))
    names = set()
    for m in _NAME.finditer(s):
        token = m.group(0)
        if token in _KEYWORDS or s[m.end() :].lstrip().startswith("("):
            continue  # operator or function
        names.add(token)
    return names


def label_names(expr: str) -> set[str]:
    """Label names used in matchers and in by/without/on/ignoring/group_* clauses."""
    s = _strip(expr)
    out: set[str] = set()
    for body in re.findall(r"\{([^}]*)\}", s):
        out |= set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", body))
    for _, inner in _GROUPING.findall(s):
        out |= {x.strip() for x in inner.split(",") if x.strip()}
    return out


def rules() -> list[dict[str, Any]]:
    """Every rule of infra/prometheus/rules.yml, in file order."""
    doc = yaml.safe_load(RULES_FILE.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def recorded_series() -> dict[str, frozenset[str]]:
    """Recording rules of rules.yml -> the label names their series may carry: those of the
    series they are computed from, plus the labels the rule sets."""
    known = exported_series()
    out: dict[str, frozenset[str]] = {}
    for rule in rules():
        if "record" not in rule:
            continue
        used = metric_names(rule["expr"])
        inherited = frozenset().union(*((known | out).get(n, frozenset()) for n in used))
        out[rule["record"]] = (
            out.get(rule["record"], frozenset()) | inherited | frozenset(rule.get("labels") or {})
        )
    return out


def unknown_names(expr: str, allowed: dict[str, frozenset[str]]) -> list[str]:
    """What in ``expr`` does not exist in ``allowed`` (name -> labels): metric names, then
    label names that none of the expression's series carries; empty when all exist."""
    names = metric_names(expr)
    problems = [f"metric {n!r}" for n in sorted(names - set(allowed))]
    have = frozenset().union(*(allowed.get(n, frozenset()) for n in names))
    problems += [f"label {lb!r}" for lb in sorted(label_names(expr) - have)]
    return problems
