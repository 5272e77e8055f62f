"""The "Retraining" view: for every model spec, its recent runs and who serves, on one page.

A FastAPI app that the Airflow API server mounts at ``/retraining`` (plugin ``fastapi_apps``).
It reads and never writes: the model specs (``pipeline.spec.discover()``: one section per good
spec, the error text of each broken one), DAG runs of each ``retrain_<name>`` DAG from
Airflow's metadata DB (the API server's own session), and verdicts, metrics and aliases from
MLflow through ``pipeline.registry.client()`` — each model's own experiment
(``retrain_<name>``) and registered model. The page is server-side HTML with inline CSS and
inline SVG sparklines: no script, no external asset, so it works offline and behind any proxy.

What a row shows comes from what ``pipeline/stages/`` writes: the ``stage.<stage>.verdict`` /
``.summary`` tags of the run, and the gate's tags on the version (``gate.metric``,
``gate.margin``, ``gate.floor``, ``eval.<metric>``, ``policy.overrides``). The *Promotion*
column is the ``promote_champion`` stage's verdict, which is also where a canary rollout
(``stages.canary_rollout``) records its outcome (promoted, rolled_back,
rolled_back_after_bake, paused, aborted; summary ``canary: …``), qualified by the version's
``canary.*`` tags (status, step, weight reached) that ``pipeline.canary`` writes.

Under "Who serves", each model's **on-call** part (``oncall_state``): its open alerts
(``pipeline.alerts.open_alerts``: severity, summary, runbook, links), its SLOs and error
budgets (``pipeline.slo.compute``; a report is reused for ``SLO_CACHE_SECONDS`` and the
scoring service's ``/metrics`` is given ``SLO_SERVING_TIMEOUT_S``, so a reload costs no
MLflow query and a dead service cannot hold the page), and the last ``LEDGER_SHOWN`` moves
of ``champion`` (``pipeline.ledger.entries``), newest first. Those modules are imported per
request; where one is missing the section says so and the rest is shown. Alert summaries,
ledger reasons and run ids are text from records: every value is HTML-escaped and a link is
an ``href`` only when it is http(s) or a path on this host (``safe_url``).

Access follows Airflow's: the caller's Airflow JWT (``Authorization: Bearer`` or the UI's
``_token`` cookie) is required (without one the browser is sent to Airflow's login page and
comes back here), and a model is shown only to a user who may read runs of its DAG.

Only ``fastapi`` is imported at module level (the API server has it loaded anyway); Airflow
internals, ``pipeline`` and ``mlflow`` are imported inside the request.
"""

from __future__ import annotations

import dataclasses
import html
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import retraining_urls as urls
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from pipeline.names import Alias, RunTag, Task, VersionTag, stage_summary_tag, stage_verdict_tag

log = logging.getLogger(__name__)

URL_PREFIX = "/retraining"
ALIASES = tuple(a.value for a in Alias)  # champion, challenger, canary, previous_champion
DEFAULT_LIMIT = 20
MAX_LIMIT = 100
RUN_COLUMNS = 11

# Verdict words written by pipeline/stages/ and pipeline/canary/, grouped by how a reader
# should feel about them.
GOOD = {
    "pass",
    "ok",
    "no_drift",
    "trained",
    "intact",
    "registered",
    "promote",
    "promoted",
    "success",
    "skip",
    "no_reference",
    "canary_promote",  # promotion-ledger actions (pipeline.ledger)
    "healthy",
}
BAD = {
    "reject",
    "rejected",
    "quarantined",
    "unreadable",
    "diverged",
    "failed",
    "conflict",
    "rolled_back",
    "rolled_back_after_bake",
    "rollback",
    "manual_rollback",
    "unhealthy",
    "upstream_failed",
}
WARN = {
    "drift",
    "train",
    "not_promoted",
    "running",
    "queued",
    "up_for_retry",
    "deferred",
    "paused",
    "aborted",
}


# -- what the page shows -----------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """What the page needs from one spec (``pipeline.spec.ModelSpec``): names and policy."""

    name: str
    model_name: str
    dag_id: str
    rollback_dag_id: str = ""
    experiment_name: str = ""
    task: str = ""
    primary_metric: str = ""
    direction: int = 1
    margin: float | None = None
    improvement: str = "absolute"
    floor: float | None = None
    non_inferiority_margin: float | None = None
    require_approval: bool = False
    canary: bool = False
    allowed_overrides: tuple[str, ...] = ()
    description: str = ""
    owner: str = ""


def model_info(spec: Any) -> ModelInfo:
    g = spec.gate
    return ModelInfo(
        name=spec.name,
        model_name=spec.model_name,
        dag_id=spec.retrain_dag_id,
        rollback_dag_id=spec.rollback_dag_id,
        experiment_name=spec.experiment_name,
        task=spec.task.type,
        primary_metric=spec.primary_metric,
        direction=spec.direction,
        margin=g.margin,
        improvement=g.improvement,
        floor=spec.floors.get(spec.primary_metric),
        non_inferiority_margin=g.non_inferiority_margin,
        require_approval=g.require_approval,
        canary=spec.canary.enabled,
        allowed_overrides=tuple(spec.overrides.allow),
        description=spec.description,
        owner=spec.owner,
    )


@dataclass
class RunView:
    """One row: a DAG run of a model's retrain DAG and what its MLflow run recorded."""

    run_id: str
    state: str = ""
    run_after: str = ""
    run_type: str = ""
    airflow_url: str = ""
    mlflow_url: str = ""
    batch_uri: str = ""
    validation: str = ""
    validation_summary: str = ""
    drift: str = ""
    drift_summary: str = ""
    decision: str = ""
    decision_summary: str = ""
    stop_reason: str = ""
    train_summary: str = ""
    grad_norms: list[float] = field(default_factory=list)
    gate: str = ""
    gate_detail: list[str] = field(default_factory=list)
    gate_summary: str = ""
    overrides: list[str] = field(default_factory=list)
    promotion: str = ""
    promotion_summary: str = ""
    canary: bool = False  # promoted (or not) through a canary rollout
    canary_detail: str = ""
    model_version: str = ""
    model_url: str = ""
    aliases: list[str] = field(default_factory=list)


@dataclass
class AliasView:
    alias: str
    version: str = ""
    url: str = ""
    detail: str = ""
    run_id: str = ""


@dataclass
class OnCall:
    """What on-call reads first, per model: the SLOs (``pipeline.slo.compute``, cached), the
    open alerts (``pipeline.alerts.open_alerts``) and the last promotion-ledger entries
    (``pipeline.ledger.entries``), newest first. Each source that cannot be read leaves its
    part empty with a ``*_problem`` line instead."""

    slo: Any = None  # pipeline.slo.SloReport
    slo_problem: str = ""
    alerts: list[dict[str, Any]] = field(default_factory=list)
    alerts_problem: str = ""
    ledger: list[dict[str, Any]] = field(default_factory=list)
    ledger_problem: str = ""


@dataclass
class ModelSection:
    """One model: its spec's names and policy, who serves, its recent runs."""

    info: ModelInfo
    runs: list[RunView]
    aliases: list[AliasView]
    airflow_url: str = ""
    rollback_url: str = ""
    experiment_url: str = ""
    model_url: str = ""
    canary_weight: float | None = None
    problems: list[str] = field(default_factory=list)
    oncall: OnCall | None = None  # SLOs, open alerts, promotion ledger (``oncall_state``)

    @property
    def name(self) -> str:
        return self.info.name


@dataclass
class BrokenSpec:
    path: str
    error: str

    @property
    def name(self) -> str:
        """The model's folder name (what its spec name would default to)."""
        parts = self.path.replace("\\", "/").rstrip("/").split("/")
        return parts[-2] if len(parts) > 1 else self.path


@dataclass
class PageData:
    models: list[ModelSection]
    broken: list[BrokenSpec] = field(default_factory=list)
    mlflow_ui: str = ""
    problems: list[str] = field(default_factory=list)
    hidden: list[str] = field(default_factory=list)  # models whose DAG the user may not read
    seconds: float = 0.0

    def model(self, name: str) -> ModelSection:
        return next(m for m in self.models if m.name == name)


# -- reading specs, Airflow and MLflow -----------------------------------------------------


def discover_models() -> tuple[list[Any], list[BrokenSpec]]:
    """Every good spec, and each broken one's path and error text (``spec.discover``)."""
    from pipeline.spec import discover

    found = discover()
    return list(found.specs), [BrokenSpec(str(path), msg) for path, msg in found.errors]


def airflow_runs(dag_id: str, limit: int) -> list[dict[str, Any]]:
    """The newest DAG runs (by run_after), from the API server's metadata DB session."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.scalars(
            select(DagRun)
            .where(DagRun.dag_id == dag_id)
            .order_by(DagRun.run_after.desc())
            .limit(limit)
        ).all()
        return [
            {
                "run_id": r.run_id,
                "state": str(r.state or ""),
                "run_after": r.run_after.isoformat(timespec="minutes") if r.run_after else "",
                "run_type": str(r.run_type or ""),
            }
            for r in rows
        ]


def _num(text: Any) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _fmt(text: Any, signed: bool = False) -> str:
    value = _num(text)
    if value is None:
        return str(text if text is not None else "")
    return f"{value:+.4f}" if signed else f"{value:.4f}".rstrip("0").rstrip(".")


def gate_detail(tags: Mapping[str, str], metric: str = "metric") -> list[str]:
    """The gate's evidence in a few short lines, from a model version's gate tags:
    ``roc_auc +0.0123 vs v3 (needs +0.005)``, ``95% CI [+0.0040, +0.0200]``, the reason.
    The metric is the one the gate judged on (``gate.metric``), else ``metric``."""
    champion = tags.get("gate.champion_version", "")
    diff, margin = tags.get("gate.difference"), tags.get(VersionTag.GATE_MARGIN)
    metric = tags.get("gate.metric") or metric
    lines = []
    if diff and champion and champion != "none":
        lines.append(
            f"{metric} {_fmt(diff, signed=True)} vs v{champion}"
            + (f" (needs +{_fmt(margin)})" if margin else "")
        )
        ci = [
            _fmt(x.strip(), signed=True)
            for x in tags.get("gate.ci", "").strip("[]").split(",")
            if x.strip()
        ]
        if len(ci) == 2:
            lines.append(f"95% CI [{ci[0]}, {ci[1]}]")
    elif champion == "none":
        value = tags.get(f"eval.{metric}")
        lines.append("no champion: floors only")
        if value:
            lines.append(
                f"{metric} {_fmt(value)}"
                + (f" (floor {_fmt(tags['gate.floor'])})" if tags.get("gate.floor") else "")
            )
    if tags.get(VersionTag.GATE_REASON):
        lines.append(tags["gate.reason"])
    return lines


def overrides_text(raw: str | None) -> list[str]:
    """``policy.overrides`` (a JSON list of ``{field, spec, run, kind}``, or ``none``) as short
    lines: ``gate.margin 0.005 → 0.01 (tighter)``."""
    if not raw or raw.strip() in ("none", "[]"):
        return []
    try:
        items = json.loads(raw)
    except ValueError:
        return [raw[:200]]
    if not isinstance(items, list):
        return [str(items)[:200]]
    out = []
    for o in items:
        if not isinstance(o, Mapping):
            out.append(str(o)[:200])
            continue
        kind = {"tighten": "tighter", "loosen_allowed": "loosened, the spec allows it"}.get(
            str(o.get("kind", "")), str(o.get("kind", ""))
        )
        what = o.get("field") or o.get("param") or "?"
        out.append(f"{what} {o.get('spec')} → {o.get('run')}" + (f" ({kind})" if kind else ""))
    return out


def promotion_view(tags: Mapping[str, str], vtags: Mapping[str, str]) -> tuple[str, str, bool, str]:
    """(verdict, summary, via canary, canary detail) of a run's promotion.

    ``promote_champion`` writes its verdict on the run; on the canary path
    (``stages.canary_rollout``) that verdict is the rollout's outcome and the summary starts
    with ``canary:``. The version's ``canary.*`` tags (``pipeline.canary``) say how far it got,
    and are fresher when the rollout went on outside the DAG run (``pipeline canary --resume``
    / ``--abort`` after a pause) or is still running."""
    verdict = tags.get(stage_verdict_tag(Task.PROMOTE_CHAMPION), "")
    summary = tags.get(stage_summary_tag(Task.PROMOTE_CHAMPION), "")
    status = vtags.get("canary.status", "")
    canary = summary.startswith("canary:") or bool(status)
    notes = []
    if status and status != verdict and verdict in ("", "paused", "running"):
        if verdict == "paused":
            notes.append("was paused")
        verdict = status
        summary = vtags.get("canary.summary") or summary
    if canary:
        step, weight = _num(vtags.get("canary.step")), _num(vtags.get("canary.weight_reached"))
        if weight is not None and weight > 0:
            notes.insert(
                0,
                f"reached {weight:.0%}" + (f" (step {int(step) + 1})" if step is not None else ""),
            )
        if vtags.get("canary.reason"):
            notes.append(vtags["canary.reason"])
        if vtags.get("bake.verdict"):
            notes.append(f"bake {vtags['bake.verdict']}")
    return verdict, summary, canary, " · ".join(notes)


def mlflow_state(
    info: ModelInfo, airflow_run_ids: Iterable[str]
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """For one model: per Airflow run id, the MLflow run's tags/ids, its grad-norm history and
    its version's tags; also the experiment id, the alias -> version table and canary weight."""
    from mlflow.exceptions import MlflowException

    from pipeline import registry

    c = registry.client()
    wanted = set(airflow_run_ids)
    meta: dict[str, Any] = {"experiment_id": None, "aliases": {}, "canary_weight": None}
    exp = c.get_experiment_by_name(info.experiment_name)
    found: dict[str, dict[str, Any]] = {}
    if exp is not None and wanted:
        meta["experiment_id"] = exp.experiment_id
        runs = c.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.`airflow.dag_id` = '{info.dag_id}'",
            order_by=["attributes.start_time DESC"],
            max_results=max(len(wanted) * 2, 50),
        )
        for r in runs:
            rid = r.data.tags.get(RunTag.RUN_ID)
            if rid in wanted and rid not in found:
                found[rid] = {
                    "mlflow_run_id": r.info.run_id,
                    "mlflow_experiment_id": r.info.experiment_id,
                    "tags": dict(r.data.tags),
                    "grad_norms": [],
                    # the gradient telemetry's history (train/grad_norm: up to 64 snapshots
                    # over the run's steps); runs from before it: the per-epoch mean
                    "grad_norm_key": next(
                        (k for k in GRAD_NORM_KEYS if k in (r.data.metrics or {})), None
                    ),
                }
        for rec in found.values():
            key = rec.pop("grad_norm_key")
            if key is None:
                continue
            history = c.get_metric_history(rec["mlflow_run_id"], key)
            rec["grad_norms"] = [
                m.value for m in sorted(history, key=lambda m: (m.step, m.timestamp))
            ]
    elif exp is not None:
        meta["experiment_id"] = exp.experiment_id
    try:
        rm = c.get_registered_model(info.model_name)
    except MlflowException:  # no registered model yet
        return found, meta
    meta["canary_weight"] = _num(rm.tags.get(VersionTag.CANARY_WEIGHT)) if rm.tags else None
    versions: dict[str, Any] = {}
    for mv in c.search_model_versions(f"name = '{info.model_name}'", max_results=1000):
        versions[str(mv.version)] = mv
    for rec in found.values():
        v = rec["tags"].get(RunTag.MODEL_VERSION)
        if v and v in versions:
            rec["version_tags"] = dict(versions[v].tags)
    for alias, v in (rm.aliases or {}).items():
        if alias not in ALIASES:
            continue
        mv = versions.get(str(v)) or c.get_model_version(info.model_name, str(v))
        meta["aliases"][alias] = {"version": str(v), "tags": dict(mv.tags)}
    return found, meta


# -- on call: SLOs, open alerts, the promotion ledger -----------------------------------------

SLO_CACHE_SECONDS = 60.0  # a report is reused this long: the page stays fast under reloads
SLO_SERVING_TIMEOUT_S = 2.0  # per /metrics scrape from the view (a hung service costs this)
LEDGER_SHOWN = 10
_slo_cache: dict[tuple[str, str, str], tuple[float, Any]] = {}
_slo_lock = threading.Lock()


def cached_slo(
    spec: Any, *, ttl: float = SLO_CACHE_SECONDS, clock: Callable[[], float] = time.monotonic
) -> Any:
    """``pipeline.slo.compute(spec)``, reused for ``ttl`` seconds per (model, spec file,
    MLflow store): one window of runs, one registry read and one scrape of the scoring service
    (at most ``SLO_SERVING_TIMEOUT_S``) per model per minute, however often the page is read."""
    from pipeline import slo
    from pipeline.settings import get_settings

    key = (spec.name, str(getattr(spec, "path", "")), get_settings().tracking_uri)
    now = clock()
    with _slo_lock:
        hit = _slo_cache.get(key)
    if hit is not None and now - hit[0] < ttl:
        return hit[1]
    report = slo.compute(spec, timeout=SLO_SERVING_TIMEOUT_S)
    with _slo_lock:
        _slo_cache[key] = (now, report)
    return report


def _as_dict(obj: Any) -> dict[str, Any]:
    """An alert or ledger entry as a dict: its ``to_json()``, a dataclass's fields, a mapping."""
    if hasattr(obj, "to_json"):
        return dict(obj.to_json())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    return dict(obj)


def oncall_state(spec: Any) -> OnCall:
    """One model's SLOs, open alerts and last ledger entries; each one that cannot be read
    (an unreadable alert file, a damaged ledger, the tracking server away) is a problem line
    on the page, never a failed page."""
    from pipeline import alerts, ledger

    out = OnCall()
    try:
        out.slo = cached_slo(spec)
    except Exception as exc:  # noqa: BLE001 - a problem line, never a 500
        log.warning("Retraining view: SLOs of %s unavailable", spec.name, exc_info=True)
        out.slo_problem = f"SLOs: {type(exc).__name__}: {exc}"
    try:
        out.alerts = [_as_dict(a) for a in alerts.open_alerts(spec.name)]
    except Exception as exc:  # noqa: BLE001
        log.warning("Retraining view: alerts of %s unreadable", spec.name, exc_info=True)
        out.alerts_problem = f"Alerts: {type(exc).__name__}: {exc}"
    try:
        out.ledger = [_as_dict(e) for e in ledger.entries(spec.name)][-LEDGER_SHOWN:][::-1]
    except Exception as exc:  # noqa: BLE001
        log.warning("Retraining view: ledger of %s unreadable", spec.name, exc_info=True)
        out.ledger_problem = f"Promotion ledger: {type(exc).__name__}: {exc}"
    return out


def build_section(
    info: ModelInfo,
    runs: Sequence[Mapping[str, Any]],
    found: Mapping[str, Mapping[str, Any]],
    meta: Mapping[str, Any],
    *,
    airflow_base: str = "",
    mlflow_ui: str | None = None,
    problems: Sequence[str] = (),
) -> ModelSection:
    """Join one model's Airflow runs with their MLflow records into what the page shows. Pure."""
    ui = urls.mlflow_ui_url() if mlflow_ui is None else mlflow_ui.rstrip("/")
    metric = info.primary_metric or "metric"
    alias_by_version: dict[str, list[str]] = {}
    for alias, a in (meta.get("aliases") or {}).items():
        alias_by_version.setdefault(str(a.get("version")), []).append(alias)
    views = []
    for r in runs:
        rec = found.get(r["run_id"]) or {}
        tags: Mapping[str, str] = rec.get("tags") or {}
        vtags: Mapping[str, str] = rec.get("version_tags") or {}
        version = tags.get(RunTag.MODEL_VERSION, "")
        ref = {
            "mlflow_run_id": rec.get("mlflow_run_id"),
            "mlflow_experiment_id": rec.get("mlflow_experiment_id"),
            "model_name": info.model_name,
            "model_version": version,
        }
        promotion, promotion_summary, canary, canary_detail = promotion_view(tags, vtags)
        views.append(
            RunView(
                run_id=r["run_id"],
                state=r.get("state", ""),
                run_after=r.get("run_after", ""),
                run_type=r.get("run_type", ""),
                airflow_url=urls.airflow_run_path(info.dag_id, r["run_id"], airflow_base),
                mlflow_url=urls.mlflow_run_url(ref, ui),
                batch_uri=tags.get("data.batch_uri", ""),
                validation=tags.get(stage_verdict_tag(Task.VALIDATE_BATCH), "")
                or (
                    "quarantined"
                    if tags.get(stage_verdict_tag(Task.INGEST_BATCH)) == "quarantined"
                    else ""
                ),
                validation_summary=tags.get(stage_summary_tag(Task.VALIDATE_BATCH), ""),
                drift=tags.get(stage_verdict_tag(Task.DETECT_DRIFT), ""),
                drift_summary=tags.get(stage_summary_tag(Task.DETECT_DRIFT), ""),
                decision=tags.get(stage_verdict_tag(Task.DECIDE_RETRAIN), ""),
                decision_summary=tags.get(stage_summary_tag(Task.DECIDE_RETRAIN), ""),
                stop_reason=tags.get("train.stop_reason", "")
                or (
                    "diverged"
                    if tags.get(stage_verdict_tag(Task.TRAIN_MODEL)) == "diverged"
                    else ""
                ),
                train_summary=tags.get(stage_summary_tag(Task.TRAIN_MODEL), ""),
                grad_norms=[float(v) for v in rec.get("grad_norms") or []],
                gate=vtags.get(VersionTag.GATE_VERDICT)
                or tags.get(stage_verdict_tag(Task.GATE_PROMOTION), ""),
                gate_detail=gate_detail(vtags, metric) if vtags else [],
                gate_summary=tags.get(stage_summary_tag(Task.GATE_PROMOTION), ""),
                overrides=overrides_text(
                    vtags.get("policy.overrides") or tags.get("policy.overrides")
                ),
                promotion=promotion,
                promotion_summary=promotion_summary,
                canary=canary,
                canary_detail=canary_detail,
                model_version=version,
                model_url=urls.model_version_url(ref, ui) if version else "",
                aliases=sorted(alias_by_version.get(version, [])) if version else [],
            )
        )
    alias_views = []
    for alias in ALIASES:
        a = (meta.get("aliases") or {}).get(alias)
        if not a:
            alias_views.append(AliasView(alias))
            continue
        t = a.get("tags") or {}
        m = t.get("gate.metric") or metric
        over = overrides_text(t.get("policy.overrides"))
        detail = " · ".join(
            x
            for x in (
                f"gate {t['gate.verdict']}" if t.get(VersionTag.GATE_VERDICT) else "",
                f"{m} {_fmt(t[f'eval.{m}'])}" if t.get(f"eval.{m}") else "",
                f"canary {t['canary.status']}"
                if alias == "canary" and t.get("canary.status")
                else "",
                f"{len(over)} override(s)" if over else "",
            )
            if x
        )
        alias_views.append(
            AliasView(
                alias,
                a["version"],
                urls.model_version_url(
                    {"model_name": info.model_name, "model_version": a["version"]}, ui
                ),
                detail,
                run_id=t.get(RunTag.RUN_ID, ""),
            )
        )
    exp = meta.get("experiment_id")
    return ModelSection(
        info=info,
        runs=views,
        aliases=alias_views,
        airflow_url=f"{airflow_base}/dags/{quote(info.dag_id, safe='')}",
        rollback_url=f"{airflow_base}/dags/{quote(info.rollback_dag_id, safe='')}"
        if info.rollback_dag_id
        else "",
        experiment_url=f"{ui}/#/experiments/{quote(str(exp), safe='')}" if exp else "",
        model_url=f"{ui}/#/models/{quote(info.model_name, safe='')}" if info.model_name else "",
        canary_weight=meta.get("canary_weight"),
        problems=list(problems),
    )


def collect(
    limit: int, airflow_base: str = "", may_read: Callable[[str], bool] | None = None
) -> PageData:
    """Read everything the page needs, model by model. A failing source becomes a problem line
    (of the page, or of one model's section), never a 500; a broken spec is listed with its
    error and the others are still shown. ``may_read(dag_id)``: whether the user may read that
    DAG's runs (a model they may not is left out and named)."""
    t0 = time.perf_counter()
    ui = urls.mlflow_ui_url()
    page = PageData(models=[], mlflow_ui=ui)
    try:
        specs, page.broken = discover_models()
    except Exception as exc:  # noqa: BLE001 - show it on the page
        log.warning("Retraining view: model specs unreadable", exc_info=True)
        specs = []
        page.problems.append(f"Model specs: {type(exc).__name__}: {exc}")
    for spec in specs:
        try:
            info = model_info(spec)
        except Exception as exc:  # noqa: BLE001
            page.broken.append(
                BrokenSpec(str(getattr(spec, "path", "?")), f"{type(exc).__name__}: {exc}")
            )
            continue
        if may_read is not None and not may_read(info.dag_id):
            page.hidden.append(info.name)
            continue
        problems: list[str] = []
        runs: list[dict[str, Any]] = []
        found: dict[str, dict[str, Any]] = {}
        meta: dict[str, Any] = {}
        try:
            runs = airflow_runs(info.dag_id, limit)
        except Exception as exc:  # noqa: BLE001 - show it on the page
            log.warning(
                "Retraining view: Airflow runs of %s unavailable", info.dag_id, exc_info=True
            )
            problems.append(f"Airflow metadata DB: {type(exc).__name__}: {exc}")
        try:
            found, meta = mlflow_state(info, [r["run_id"] for r in runs])
        except Exception as exc:  # noqa: BLE001
            log.warning("Retraining view: MLflow unavailable for %s", info.name, exc_info=True)
            problems.append(f"MLflow ({ui}): {type(exc).__name__}: {exc}")
        section = build_section(
            info, runs, found, meta, airflow_base=airflow_base, mlflow_ui=ui, problems=problems
        )
        section.oncall = oncall_state(spec)
        page.models.append(section)
    page.seconds = time.perf_counter() - t0
    return page


# -- HTML ----------------------------------------------------------------------------------


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def verdict_class(verdict: str) -> str:
    v = verdict.lower()
    if v in GOOD:
        return "good"
    if v in BAD:
        return "bad"
    if v in WARN:
        return "warn"
    return "none" if not v or v in ("not_run", "none", "skipped") else "info"


def badge(verdict: str, title: str = "") -> str:
    if not verdict:
        return '<span class="muted">—</span>'
    t = f' title="{esc(title)}"' if title else ""
    return f'<span class="badge {verdict_class(verdict)}"{t}>{esc(verdict)}</span>'


def link(url: str, text: str, *, new_tab: bool = False, title: str = "") -> str:
    if not url:
        return esc(text)
    extra = ' target="_blank" rel="noopener noreferrer"' if new_tab else ""
    t = f' title="{esc(title)}"' if title else ""
    return f'<a href="{esc(url)}"{extra}{t}>{esc(text)}</a>'


GRAD_NORM_KEYS = ("train/grad_norm", "train.grad_norm")  # telemetry snapshots, per-epoch mean


def sparkline(values: Sequence[float], width: int = 120, height: int = 28) -> str:
    """Inline SVG of the gradient norm over the run (the telemetry's snapshots, in step
    order); the last point is marked, extremes in the title."""
    vals = [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]
    if not vals:
        return '<span class="muted">—</span>'
    pad = 3.0
    lo, hi = min(vals), max(vals)
    span = (hi - lo) or 1.0
    step = (width - 2 * pad) / max(len(vals) - 1, 1)
    pts = [
        (pad + i * step, pad + (height - 2 * pad) * (1 - (v - lo) / span))
        for i, v in enumerate(vals)
    ]
    poly = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
    lx, ly = pts[-1]
    title = (
        f"train.grad_norm over {len(vals)} epoch(s): first {vals[0]:.4g}, last {vals[-1]:.4g}, "
        f"min {lo:.4g}, max {hi:.4g}"
    )
    return (
        f'<svg class="spark" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{esc(title)}"><title>{esc(title)}</title>'
        f'<polyline fill="none" stroke="#2563eb" stroke-width="1.5" points="{poly}"/>'
        f'<circle cx="{lx:.1f}" cy="{ly:.1f}" r="2.2" fill="#1e3a8a"/></svg>'
        f'<span class="num">{vals[-1]:.3g}</span>'
    )


CSS = """
:root { color-scheme: light; --fg:#1f2937; --muted:#6b7280; --line:#e5e7eb; --bg:#ffffff; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       background: var(--bg); margin: 0; padding: 20px 24px; }
header { display: flex; align-items: baseline; gap: 16px; flex-wrap: wrap; margin-bottom: 12px; }
h1 { font-size: 20px; margin: 0; } h2 { font-size: 17px; margin: 0; }
h3 { font-size: 15px; margin: 18px 0 8px; }
a { color: #1d4ed8; text-decoration: none; } a:hover { text-decoration: underline; }
.muted { color: var(--muted); } .small { font-size: 12px; }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid var(--line); padding: 6px 8px; text-align: left; vertical-align: top; }
th { font-size: 12px; text-transform: uppercase; letter-spacing: .03em; color: var(--muted);
     background: #f9fafb; position: sticky; top: 0; }
tr:hover td { background: #f9fafb; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px;
         font-weight: 600; white-space: nowrap; border: 1px solid transparent; }
.good { background: #dcfce7; color: #166534; border-color: #bbf7d0; }
.bad { background: #fee2e2; color: #991b1b; border-color: #fecaca; }
.warn { background: #fef3c7; color: #92400e; border-color: #fde68a; }
.info { background: #e0e7ff; color: #3730a3; border-color: #c7d2fe; }
.none { background: #f3f4f6; color: #4b5563; }
.aliases { display: flex; gap: 12px; flex-wrap: wrap; }
.alias { border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; width: 210px; }
.alias .name { font-size: 12px; text-transform: uppercase; color: var(--muted); letter-spacing: .03em; }
.alias .ver { font-size: 22px; font-weight: 700; }
.problem { background: #fef2f2; border: 1px solid #fecaca; color: #991b1b; padding: 8px 12px;
           border-radius: 6px; margin: 8px 0; }
.problem pre { white-space: pre-wrap; margin: 4px 0 0; font-size: 12px; }
.spark { vertical-align: middle; margin-right: 6px; } .num { font-variant-numeric: tabular-nums; }
td.nowrap { white-space: nowrap; } .run { font-weight: 600; }
.detail { font-size: 12px; color: var(--muted); max-width: 320px; }
code { font-size: 12px; background: #f3f4f6; padding: 0 4px; border-radius: 4px; }
section.model { border-top: 2px solid var(--line); padding-top: 16px; margin-top: 22px; }
.model-head { display: flex; align-items: baseline; gap: 14px; flex-wrap: wrap; }
.policy { margin: 6px 0 0; }
nav.models { display: flex; gap: 12px; flex-wrap: wrap; font-size: 13px; }
.oncall table { margin-bottom: 4px; } .oncall td.detail { max-width: 480px; }
"""


def _policy_line(info: ModelInfo) -> str:
    """The spec's gate policy in one line: the primary metric by name, its margin and floor."""
    better = "higher" if info.direction >= 0 else "lower"
    parts = [f"primary metric <code>{esc(info.primary_metric)}</code> ({better} is better)"]
    if info.margin is not None:
        parts.append(f"gate margin {esc(_fmt(info.margin))} ({esc(info.improvement)})")
    if info.floor is not None:
        parts.append(f"{'floor' if info.direction >= 0 else 'ceiling'} {esc(_fmt(info.floor))}")
    if info.non_inferiority_margin is not None:
        parts.append(f"non-inferiority within {esc(_fmt(info.non_inferiority_margin))}")
    parts.append("approval required" if info.require_approval else "no approval step")
    parts.append("canary on" if info.canary else "canary off")
    parts.append(
        "run overrides allowed: "
        + (
            ", ".join(f"<code>{esc(o)}</code>" for o in info.allowed_overrides)
            if info.allowed_overrides
            else "none"
        )
    )
    return " · ".join(parts)


def _run_row(r: RunView) -> str:
    version = ""
    if r.model_version:
        version = link(
            r.model_url, f"v{r.model_version}", new_tab=True, title="MLflow model version"
        )
        if r.aliases:
            version += "<div class='small muted'>" + esc(", ".join(r.aliases)) + "</div>"
    gate = badge(r.gate, r.gate_summary)
    detail = list(r.gate_detail) + [f"override: {o}" for o in r.overrides]
    if detail:
        gate += f'<div class="detail">{"<br>".join(esc(x) for x in detail)}</div>'
    promotion = badge(r.promotion, r.promotion_summary)
    if r.canary:
        promotion += (
            '<div class="detail">canary'
            + (f" · {esc(r.canary_detail)}" if r.canary_detail else "")
            + "</div>"
        )
    when = r.run_after.replace("T", " ").replace("+00:00", " UTC") or r.run_id
    batch = r.batch_uri.rstrip("/").rsplit("/", 1)[-1]
    return (
        f'<tr data-run-id="{esc(r.run_id)}">'
        f'<td><span class="run">{link(r.airflow_url, when, title=f"Airflow DAG run {r.run_id}")}</span>'
        f'<div class="small muted">{esc(" · ".join(x for x in (r.run_type, batch) if x))}</div></td>'
        f"<td>{badge(r.state)}</td>"
        f"<td>{badge(r.validation, r.validation_summary)}</td>"
        f"<td>{badge(r.drift, r.drift_summary)}</td>"
        f"<td>{badge(r.decision, r.decision_summary)}</td>"
        f"<td>{badge(r.stop_reason, r.train_summary) if r.stop_reason else badge('')}</td>"
        f'<td class="nowrap">{sparkline(r.grad_norms)}</td>'
        f'<td data-col="gate">{gate}</td>'
        f'<td data-col="promotion">{promotion}</td>'
        f"<td>{version or badge('')}</td>"
        f"<td>{link(r.mlflow_url, 'MLflow run', new_tab=True) if r.mlflow_url else badge('')}</td>"
        "</tr>"
    )


def safe_url(url: Any) -> str:
    """``url`` if it is http(s) or a path on this host, else "": an alert's links come from
    records, and a ``javascript:`` or ``data:`` link must never become a clickable href."""
    text = str(url or "").strip()
    if text.startswith("/") and not text.startswith("//"):
        return text
    scheme = text.split(":", 1)[0].lower() if ":" in text else ""
    return text if scheme in ("http", "https") and text[len(scheme) :].startswith("://") else ""


SEVERITY_CLASS = {"critical": "bad", "warning": "warn", "info": "info"}
SLO_CLASS = {"ok": "good", "burning": "bad", "no_data": "none"}


def _slo_table(report: Any) -> str:
    rows = []
    for r in report.rows:
        status = r.status.value
        rows.append(
            f'<tr data-slo="{esc(r.name)}" data-status="{esc(status)}">'
            f"<td><code>{esc(r.name)}</code></td><td>{esc(r.objective)}</td>"
            f'<td class="num">{esc(r.actual_text())}</td>'
            f'<td class="num">{esc(r.events or "—")}</td>'
            f'<td class="num">{esc(r.budget_text())}</td>'
            f'<td><span class="badge {SLO_CLASS.get(status, "info")}">'
            f"{esc(status.replace('_', ' '))}</span></td>"
            f'<td class="detail">{esc(r.detail)}</td></tr>'
        )
    return (
        f'<table class="slo"><thead><tr><th>SLO</th><th>Objective</th><th>Actual</th>'
        f'<th>Good / total</th><th title="share of the error budget left; below 0: exhausted">'
        f"Budget left</th><th>Status</th><th>How measured</th></tr></thead><tbody>"
        f"{''.join(rows)}</tbody></table>"
        f'<div class="small muted">over {esc(f"{report.window_days:g}")} days to '
        f"{esc(report.now.isoformat(timespec='minutes'))}; serving figures since the service "
        "started; <code>python -m pipeline slo --model "
        f"{esc(report.model)}</code></div>"
    )


def _alert_row(a: Mapping[str, Any]) -> str:
    raw = a.get("links")
    links: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
    shown = " · ".join(
        link(safe_url(url), str(name), new_tab=True) if safe_url(url) else esc(f"{name}: {url}")
        for name, url in sorted(links.items())
    )
    severity = str(a.get("severity", ""))
    count = a.get("occurrences")
    return (
        f'<tr data-alert="{esc(a.get("dedup_key", ""))}">'
        f'<td><span class="badge {SEVERITY_CLASS.get(severity, "info")}">{esc(severity)}</span></td>'
        f"<td><code>{esc(a.get('kind', ''))}</code>"
        f'<div class="small muted">{esc(a.get("subject", ""))}</div></td>'
        f"<td>{esc(a.get('summary', ''))}</td>"
        f'<td class="small nowrap">{esc(a.get("first_seen", ""))}'
        + (
            f"<div class='muted'>×{esc(count)}, last {esc(a.get('last_seen', ''))}</div>"
            if count and count != 1
            else ""
        )
        + f'</td><td class="small"><code>{esc(a.get("runbook", ""))}</code></td>'
        f'<td class="small">{shown or badge("")}</td></tr>'
    )


def _ledger_row(e: Mapping[str, Any]) -> str:
    healthy = e.get("healthy")
    return (
        f'<tr data-seq="{esc(e.get("seq", ""))}"><td class="num">{esc(e.get("seq", ""))}</td>'
        f'<td class="small nowrap">{esc(e.get("at", ""))}</td>'
        f"<td>{badge(str(e.get('action', '')))}</td>"
        f'<td class="nowrap">v{esc(e.get("from_version") or "—")} → v{esc(e.get("to_version", ""))}</td>'
        f'<td>{esc(e.get("who", ""))}</td><td class="detail">{esc(e.get("why", ""))}</td>'
        f"<td>{badge('healthy' if healthy else 'unhealthy') if healthy is not None else badge('')}</td></tr>"
    )


def render_oncall(o: OnCall, model: str = "") -> str:
    """The on-call part of a model's section: open alerts, SLOs, promotion ledger. Every value
    is escaped: alert summaries and ledger reasons carry text from MLflow tags and people."""
    problems = "".join(
        f'<div class="problem">{esc(p)}</div>'
        for p in (o.alerts_problem, o.slo_problem, o.ledger_problem)
        if p
    )
    if o.alerts:
        alerts = (
            '<table class="alerts"><thead><tr><th>Severity</th><th>Alert</th><th>Summary</th>'
            "<th>Since</th><th>Runbook</th><th>Links</th></tr></thead><tbody>"
            + "".join(_alert_row(a) for a in o.alerts)
            + "</tbody></table>"
        )
    else:
        alerts = "" if o.alerts_problem else '<p class="small muted">No open alerts.</p>'
    slos = _slo_table(o.slo) if o.slo is not None else ""
    if o.ledger:
        ledger = (
            '<table class="ledger"><thead><tr><th>#</th><th>When</th><th>Action</th>'
            "<th>Champion</th><th>Who</th><th>Why</th><th>Model</th></tr></thead><tbody>"
            + "".join(_ledger_row(e) for e in o.ledger)
            + "</tbody></table>"
        )
    else:
        ledger = (
            "" if o.ledger_problem else '<p class="small muted">No champion moves recorded.</p>'
        )
    return (
        f'<div class="oncall" data-oncall="{esc(model)}">{problems}'
        f'<h3>Open alerts <span class="small muted">{len(o.alerts)}</span></h3>{alerts}'
        f"<h3>SLOs</h3>{slos}"
        f'<h3>Promotion ledger <span class="small muted">last {LEDGER_SHOWN}, newest first</span></h3>'
        f"{ledger}</div>"
    )


def render_section(m: ModelSection) -> str:
    info = m.info
    alias_cards = "".join(
        f'<div class="alias" data-alias="{esc(a.alias)}"><div class="name">{esc(a.alias)}</div>'
        f'<div class="ver">{link(a.url, "v" + a.version, new_tab=True) if a.version else "—"}</div>'
        f'<div class="small muted" title="{esc(a.run_id)}">{esc(a.detail) if a.version else "not set"}</div></div>'
        for a in m.aliases
    )
    rows = [_run_row(r) for r in m.runs]
    if not rows:
        rows.append(
            f'<tr><td colspan="{RUN_COLUMNS}" class="muted">No runs of {esc(info.dag_id)} yet: '
            f"trigger it from {link(m.airflow_url, 'the DAG page')}.</td></tr>"
        )
    problems = "".join(f'<div class="problem">{esc(p)}</div>' for p in m.problems)
    weight = f" · traffic to canary {m.canary_weight:.0%}" if m.canary_weight else ""
    links = " · ".join(
        x
        for x in (
            link(m.airflow_url, f"{info.dag_id} in Airflow"),
            link(m.rollback_url, info.rollback_dag_id) if m.rollback_url else "",
            link(m.experiment_url, "MLflow experiment", new_tab=True) if m.experiment_url else "",
            ("registered model " + link(m.model_url, info.model_name, new_tab=True))
            if m.model_url
            else "",
        )
        if x
    )
    about = " · ".join(
        esc(x)
        for x in (info.task, info.description, f"owner {info.owner}" if info.owner else "")
        if x
    )
    return f"""<section class="model" id="model-{esc(info.name)}" data-model="{esc(info.name)}"
 data-registered-model="{esc(info.model_name)}" data-primary-metric="{esc(info.primary_metric)}">
<div class="model-head"><h2>{esc(info.name)}</h2><span>{links}</span></div>
<div class="small muted">{about}</div>
<div class="small policy" data-policy>{_policy_line(info)}</div>
{problems}
<h3>Who serves <span class="small muted">{esc(info.model_name)}{esc(weight)}</span></h3>
<div class="aliases">{alias_cards}</div>
{render_oncall(m.oncall, info.name) if m.oncall is not None else ""}
<h3>Recent runs</h3>
<table>
<thead><tr><th>DAG run</th><th>State</th><th>Validation</th><th>Drift</th><th>Retrain</th>
<th>Stop reason</th><th>Grad norm / epoch</th><th>Gate ({esc(info.primary_metric)})</th>
<th title="promote_champion's verdict; through a canary rollout when the run asked for one">Promotion / canary</th>
<th>Version</th><th>MLflow</th></tr></thead>
<tbody>
{"".join(rows)}
</tbody></table>
</section>"""


def render_page(page: PageData, *, airflow_base: str = "", limit: int = DEFAULT_LIMIT) -> str:
    problems = "".join(f'<div class="problem">{esc(p)}</div>' for p in page.problems)
    broken = "".join(
        f'<div class="problem" data-broken-spec="{esc(b.name)}"><b>Broken model spec</b> '
        f'<code title="{esc(b.path)}">{esc(b.name)}</code>: not shown; its DAGs do not load until '
        f"it is fixed<pre>{esc(b.error)}</pre></div>"
        for b in page.broken
    )
    hidden = (
        f'<div class="small muted">Not shown (you may not read their runs): '
        f"{esc(', '.join(page.hidden))}</div>"
        if page.hidden
        else ""
    )
    nav = " ".join(f'<a href="#model-{esc(m.name)}">{esc(m.name)}</a>' for m in page.models)
    sections = "".join(render_section(m) for m in page.models)
    if not page.models and not page.broken and not page.problems:
        sections = '<p class="muted">No model specs (models/&lt;name&gt;/model.yaml) found.</p>'
    count = f"{len(page.models)} model{'' if len(page.models) == 1 else 's'}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Retraining · Airflow</title><style>{CSS}</style></head>
<body>
<header><h1>Retraining</h1>
<nav class="models">{nav}</nav>
<span>{link(f"{airflow_base}/dags?tags=retraining", "DAGs in Airflow")}</span>
<span class="muted small">{count}; last {limit} runs each, read in {page.seconds:.2f}s; hover a verdict for its summary</span>
</header>
{problems}
{broken}
{hidden}
{sections}
</body></html>
"""


ICON_SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24" fill="none" stroke="#64748b" '
    'stroke-width="2" stroke-linecap="round" stroke-linejoin="round">'
    '<path d="M21 12a9 9 0 1 1-3-6.7"/><polyline points="21 3 21 9 15 9"/>'
    '<polyline points="7 14 10 11 13 13 17 9"/></svg>'
)


# -- the app -------------------------------------------------------------------------------


async def authorize(request: Request) -> Response | Callable[[str], bool]:
    """A redirect to login (no valid token) or an error page; else ``may_read(dag_id)``: whether
    the caller may read that DAG's runs (evaluated per model while the page is collected)."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.base_auth_manager import COOKIE_NAME_JWT_TOKEN
    from airflow.api_fastapi.auth.managers.models.resource_details import (
        DagAccessEntity,
        DagDetails,
    )
    from airflow.api_fastapi.core_api.security import resolve_user_from_token
    from fastapi import HTTPException

    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else None
    token = token or request.cookies.get(COOKIE_NAME_JWT_TOKEN)
    try:
        user = await resolve_user_from_token(token)
    except HTTPException as exc:
        if exc.status_code != 401 and token:
            return HTMLResponse(
                f"<p>Not allowed: {esc(exc.detail)}</p>", status_code=exc.status_code
            )
        base = request.scope.get("root_path", "")
        login = get_auth_manager().get_url_login(next_url=f"{base}/")
        return RedirectResponse(login, status_code=303)
    manager = get_auth_manager()

    def may_read(dag_id: str) -> bool:
        return bool(
            manager.is_authorized_dag(
                method="GET",
                access_entity=DagAccessEntity.RUN,
                details=DagDetails(id=dag_id),
                user=user,
            )
        )

    return may_read


def create_app() -> FastAPI:
    app = FastAPI(title="Retraining", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/", response_class=HTMLResponse)
    async def retraining_page(request: Request, limit: int = DEFAULT_LIMIT) -> Response:
        from starlette.concurrency import run_in_threadpool

        access = await authorize(request)
        if isinstance(access, Response):
            return access
        limit = min(max(limit, 1), MAX_LIMIT)
        airflow_base = request.scope.get("root_path", "").removesuffix(URL_PREFIX)
        page = await run_in_threadpool(collect, limit, airflow_base, access)
        return HTMLResponse(
            render_page(page, airflow_base=airflow_base, limit=limit),
            headers={"Cache-Control": "no-store"},
        )

    @app.get("/icon.svg")
    async def icon() -> Response:
        return Response(
            ICON_SVG, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"}
        )

    return app


app = create_app()
