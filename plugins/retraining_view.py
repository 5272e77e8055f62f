"""The "Retraining" view: recent ``retrain_model`` runs and who serves, as one HTML page.

A FastAPI app that the Airflow API server mounts at ``/retraining`` (plugin ``fastapi_apps``).
It reads and never writes: DAG runs from Airflow's metadata DB (the API server's own
session), verdicts, metrics and aliases from MLflow through ``pipeline.registry.client()``.
The page is server-side HTML with inline CSS and inline SVG sparklines: no script, no
external asset, so it works offline and behind any proxy.

Access follows Airflow's: the caller's Airflow JWT (``Authorization: Bearer`` or the UI's
``_token`` cookie) must allow reading ``retrain_model`` runs; without one the browser is sent
to Airflow's login page and comes back here.

Only ``fastapi`` is imported at module level (the API server has it loaded anyway); Airflow
internals, ``pipeline`` and ``mlflow`` are imported inside the request.
"""

from __future__ import annotations

import html
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import retraining_urls as urls
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

log = logging.getLogger(__name__)

URL_PREFIX = "/retraining"
DAG_ID = "retrain_model"
ALIASES = ("champion", "challenger", "canary", "previous_champion")
DEFAULT_LIMIT = 20
MAX_LIMIT = 100

# Verdict words written by pipeline/steps.py, grouped by how a reader should feel about them.
GOOD = {"pass", "ok", "no_drift", "trained", "intact", "registered", "promote", "promoted",
        "success", "skip", "no_reference"}  # fmt: skip
BAD = {"reject", "rejected", "quarantined", "unreadable", "diverged", "failed", "conflict",
       "rolled_back", "rollback", "upstream_failed"}  # fmt: skip
WARN = {"drift", "train", "not_promoted", "running", "queued", "up_for_retry", "deferred"}


# -- what the page shows -----------------------------------------------------------------


@dataclass
class RunView:
    """One row: a DAG run of retrain_model and what its MLflow run recorded."""

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
    canary: str = ""
    canary_summary: str = ""
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
class PageData:
    runs: list[RunView]
    aliases: list[AliasView]
    model_name: str = ""
    mlflow_ui: str = ""
    experiment_url: str = ""
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0


# -- reading Airflow and MLflow ------------------------------------------------------------


def airflow_runs(dag_id: str, limit: int) -> list[dict[str, Any]]:
    """The newest DAG runs (by run_after), from the API server's metadata DB session."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.scalars(
            select(DagRun).where(DagRun.dag_id == dag_id)
            .order_by(DagRun.run_after.desc()).limit(limit)
        ).all()  # fmt: skip
        return [{"run_id": r.run_id, "state": str(r.state or ""),
                 "run_after": r.run_after.isoformat(timespec="minutes") if r.run_after else "",
                 "run_type": str(r.run_type or "")} for r in rows]  # fmt: skip


def _num(text: Any) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _fmt(text: Any, signed: bool = False) -> str:
    value = _num(text)
    if value is None:
        return str(text or "")
    return f"{value:+.4f}" if signed else f"{value:.4f}".rstrip("0").rstrip(".")


def gate_detail(tags: Mapping[str, str]) -> list[str]:
    """The gate's evidence in a few short lines, from a model version's gate tags:
    ``roc_auc +0.0123 vs v3 (needs +0.005)``, ``95% CI [+0.0040, +0.0200]``, the reason."""
    champion = tags.get("gate.champion_version", "")
    diff, margin = tags.get("gate.difference"), tags.get("gate.margin")
    metric = tags.get("gate.metric", "metric")
    lines = []
    if diff and champion and champion != "none":
        lines.append(f"{metric} {_fmt(diff, signed=True)} vs v{champion}"
                     + (f" (needs +{_fmt(margin)})" if margin else ""))  # fmt: skip
        ci = [_fmt(x.strip(), signed=True) for x in tags.get("gate.ci", "").strip("[]").split(",") if x.strip()]
        if len(ci) == 2:
            lines.append(f"95% CI [{ci[0]}, {ci[1]}]")
    elif champion == "none":
        value = tags.get(f"eval.{metric}")
        lines.append("no champion: floors only")
        if value:
            lines.append(f"{metric} {_fmt(value)}" + (f" (floor {_fmt(tags['gate.floor'])})"
                                                      if tags.get("gate.floor") else ""))  # fmt: skip
    if tags.get("gate.reason"):
        lines.append(tags["gate.reason"])
    return lines


def mlflow_state(airflow_run_ids: Iterable[str]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Per Airflow run id: the MLflow run's tags/ids, its grad-norm history, its version.
    Also the experiment id, model name and the alias -> version table."""
    from mlflow.exceptions import MlflowException

    from pipeline import registry
    from pipeline.settings import get_settings

    s = get_settings()
    c = registry.client()
    wanted = set(airflow_run_ids)
    meta: dict[str, Any] = {"model_name": s.model_name, "experiment_id": None, "aliases": {}}
    exp = c.get_experiment_by_name(s.experiment_name)
    found: dict[str, dict[str, Any]] = {}
    if exp is not None:
        meta["experiment_id"] = exp.experiment_id
        runs = c.search_runs([exp.experiment_id],
                             filter_string=f"tags.`airflow.dag_id` = '{DAG_ID}'",
                             order_by=["attributes.start_time DESC"],
                             max_results=max(len(wanted) * 2, 50))  # fmt: skip
        for r in runs:
            rid = r.data.tags.get("airflow.run_id")
            if rid in wanted and rid not in found:
                found[rid] = {"mlflow_run_id": r.info.run_id,
                              "mlflow_experiment_id": r.info.experiment_id,
                              "tags": dict(r.data.tags), "grad_norms": [],
                              "has_grad_norm": "train.grad_norm" in (r.data.metrics or {})}  # fmt: skip
        for rec in found.values():
            if not rec.pop("has_grad_norm"):
                continue
            history = c.get_metric_history(rec["mlflow_run_id"], "train.grad_norm")
            rec["grad_norms"] = [m.value for m in sorted(history, key=lambda m: (m.step, m.timestamp))]
    versions: dict[str, Any] = {}
    try:
        for mv in c.search_model_versions(f"name = '{s.model_name}'", max_results=1000):
            versions[str(mv.version)] = mv
    except MlflowException:  # no registered model yet
        pass
    for rec in found.values():
        v = rec["tags"].get("model.version")
        if v and v in versions:
            rec["version_tags"] = dict(versions[v].tags)
    for alias in ALIASES:
        try:
            mv = c.get_model_version_by_alias(s.model_name, alias)
        except MlflowException:
            continue
        meta["aliases"][alias] = {"version": str(mv.version), "tags": dict(mv.tags)}
    return found, meta


def build_page(runs: Sequence[Mapping[str, Any]], found: Mapping[str, Mapping[str, Any]],
               meta: Mapping[str, Any], *, airflow_base: str = "", mlflow_ui: str | None = None,
               problems: Sequence[str] = ()) -> PageData:  # fmt: skip
    """Join Airflow runs with their MLflow records into what the template shows. Pure."""
    ui = urls.mlflow_ui_url() if mlflow_ui is None else mlflow_ui.rstrip("/")
    model_name = str(meta.get("model_name") or "")
    alias_by_version: dict[str, list[str]] = {}
    for alias, a in (meta.get("aliases") or {}).items():
        alias_by_version.setdefault(str(a.get("version")), []).append(alias)
    views = []
    for r in runs:
        rec = found.get(r["run_id"]) or {}
        tags: Mapping[str, str] = rec.get("tags") or {}
        vtags: Mapping[str, str] = rec.get("version_tags") or {}
        version = tags.get("model.version", "")
        ref = {"mlflow_run_id": rec.get("mlflow_run_id"),
               "mlflow_experiment_id": rec.get("mlflow_experiment_id"),
               "model_name": model_name, "model_version": version}  # fmt: skip
        views.append(RunView(
            run_id=r["run_id"], state=r.get("state", ""), run_after=r.get("run_after", ""),
            run_type=r.get("run_type", ""),
            airflow_url=urls.airflow_run_path(DAG_ID, r["run_id"], airflow_base),
            mlflow_url=urls.mlflow_run_url(ref, ui), batch_uri=tags.get("data.batch_uri", ""),
            validation=tags.get("stage.validate_batch.verdict", "")
            or ("quarantined" if tags.get("stage.ingest_batch.verdict") == "quarantined" else ""),
            validation_summary=tags.get("stage.validate_batch.summary", ""),
            drift=tags.get("stage.detect_drift.verdict", ""),
            drift_summary=tags.get("stage.detect_drift.summary", ""),
            decision=tags.get("stage.decide_retrain.verdict", ""),
            decision_summary=tags.get("stage.decide_retrain.summary", ""),
            stop_reason=tags.get("train.stop_reason", "")
            or ("diverged" if tags.get("stage.train_model.verdict") == "diverged" else ""),
            train_summary=tags.get("stage.train_model.summary", ""),
            grad_norms=[float(v) for v in rec.get("grad_norms") or []],
            gate=vtags.get("gate.verdict") or tags.get("stage.gate_promotion.verdict", ""),
            gate_detail=gate_detail(vtags) if vtags else [],
            gate_summary=tags.get("stage.gate_promotion.summary", ""),
            canary=tags.get("stage.canary_rollout.verdict", ""),
            canary_summary=tags.get("stage.canary_rollout.summary", ""),
            model_version=version, model_url=urls.model_version_url(ref, ui) if version else "",
            aliases=sorted(alias_by_version.get(version, [])) if version else [],
        ))  # fmt: skip
    alias_views = []
    for alias in ALIASES:
        a = (meta.get("aliases") or {}).get(alias)
        if not a:
            alias_views.append(AliasView(alias))
            continue
        t = a.get("tags") or {}
        detail = " · ".join(x for x in (
            f"gate {t['gate.verdict']}" if t.get("gate.verdict") else "",
            f"roc_auc {_fmt(t['eval.roc_auc'])}" if t.get("eval.roc_auc") else "",
        ) if x)  # fmt: skip
        alias_views.append(AliasView(alias, a["version"], urls.model_version_url(
            {"model_name": model_name, "model_version": a["version"]}, ui), detail,
            run_id=t.get("airflow.run_id", "")))  # fmt: skip
    exp = meta.get("experiment_id")
    return PageData(runs=views, aliases=alias_views, model_name=model_name, mlflow_ui=ui,
                    experiment_url=f"{ui}/#/experiments/{quote(str(exp), safe='')}" if exp else "",
                    problems=list(problems))  # fmt: skip


def collect(limit: int, airflow_base: str = "") -> PageData:
    """Read everything the page needs. A failing source becomes a problem line, not a 500."""
    t0 = time.perf_counter()
    problems: list[str] = []
    runs: list[dict[str, Any]] = []
    found: dict[str, dict[str, Any]] = {}
    meta: dict[str, Any] = {}
    try:
        runs = airflow_runs(DAG_ID, limit)
    except Exception as exc:  # noqa: BLE001 - show it on the page
        log.warning("Retraining view: Airflow runs unavailable", exc_info=True)
        problems.append(f"Airflow metadata DB: {type(exc).__name__}: {exc}")
    try:
        found, meta = mlflow_state(r["run_id"] for r in runs)
    except Exception as exc:  # noqa: BLE001
        log.warning("Retraining view: MLflow unavailable", exc_info=True)
        problems.append(f"MLflow ({urls.mlflow_ui_url()}): {type(exc).__name__}: {exc}")
    page = build_page(runs, found, meta, airflow_base=airflow_base, problems=problems)
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


def sparkline(values: Sequence[float], width: int = 120, height: int = 28) -> str:
    """Inline SVG of gradient norm per epoch; the last point is marked, extremes in the title."""
    vals = [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]
    if not vals:
        return '<span class="muted">—</span>'
    pad = 3.0
    lo, hi = min(vals), max(vals)
    span = (hi - lo) or 1.0
    step = (width - 2 * pad) / max(len(vals) - 1, 1)
    pts = [(pad + i * step, pad + (height - 2 * pad) * (1 - (v - lo) / span)) for i, v in enumerate(vals)]
    poly = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
    lx, ly = pts[-1]
    title = (f"train.grad_norm over {len(vals)} epoch(s): first {vals[0]:.4g}, last {vals[-1]:.4g}, "
             f"min {lo:.4g}, max {hi:.4g}")  # fmt: skip
    return (f'<svg class="spark" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
            f'role="img" aria-label="{esc(title)}"><title>{esc(title)}</title>'
            f'<polyline fill="none" stroke="#2563eb" stroke-width="1.5" points="{poly}"/>'
            f'<circle cx="{lx:.1f}" cy="{ly:.1f}" r="2.2" fill="#1e3a8a"/></svg>'
            f'<span class="num">{vals[-1]:.3g}</span>')  # fmt: skip


CSS = """
:root { color-scheme: light; --fg:#1f2937; --muted:#6b7280; --line:#e5e7eb; --bg:#ffffff; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       background: var(--bg); margin: 0; padding: 20px 24px; }
header { display: flex; align-items: baseline; gap: 16px; flex-wrap: wrap; margin-bottom: 12px; }
h1 { font-size: 20px; margin: 0; } h2 { font-size: 15px; margin: 22px 0 8px; }
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
.spark { vertical-align: middle; margin-right: 6px; } .num { font-variant-numeric: tabular-nums; }
td.nowrap { white-space: nowrap; } .run { font-weight: 600; }
.detail { font-size: 12px; color: var(--muted); max-width: 320px; }
code { font-size: 12px; background: #f3f4f6; padding: 0 4px; border-radius: 4px; }
"""


def render_page(page: PageData, *, airflow_base: str = "", limit: int = DEFAULT_LIMIT) -> str:
    alias_cards = "".join(
        f'<div class="alias" data-alias="{esc(a.alias)}"><div class="name">{esc(a.alias)}</div>'
        f'<div class="ver">{link(a.url, "v" + a.version, new_tab=True) if a.version else "—"}</div>'
        f'<div class="small muted" title="{esc(a.run_id)}">{esc(a.detail) if a.version else "not set"}</div></div>'
        for a in page.aliases
    )  # fmt: skip
    rows = []
    for r in page.runs:
        version = ""
        if r.model_version:
            version = link(r.model_url, f"v{r.model_version}", new_tab=True, title="MLflow model version")
            if r.aliases:
                version += "<div class='small muted'>" + esc(", ".join(r.aliases)) + "</div>"
        gate = badge(r.gate, r.gate_summary)
        if r.gate_detail:
            gate += f'<div class="detail">{"<br>".join(esc(x) for x in r.gate_detail)}</div>'
        when = r.run_after.replace("T", " ").replace("+00:00", " UTC") or r.run_id
        batch = r.batch_uri.rstrip("/").rsplit("/", 1)[-1]
        rows.append(
            f'<tr data-run-id="{esc(r.run_id)}">'
            f'<td><span class="run">{link(r.airflow_url, when, title=f"Airflow DAG run {r.run_id}")}</span>'
            f'<div class="small muted">{esc(" · ".join(x for x in (r.run_type, batch) if x))}</div></td>'
            f"<td>{badge(r.state)}</td>"
            f"<td>{badge(r.validation, r.validation_summary)}</td>"
            f"<td>{badge(r.drift, r.drift_summary)}</td>"
            f"<td>{badge(r.decision, r.decision_summary)}</td>"
            f'<td>{badge(r.stop_reason, r.train_summary) if r.stop_reason else badge("")}</td>'
            f'<td class="nowrap">{sparkline(r.grad_norms)}</td>'
            f"<td>{gate}</td>"
            f"<td>{badge(r.canary, r.canary_summary)}</td>"
            f'<td>{version or badge("")}</td>'
            f'<td>{link(r.mlflow_url, "MLflow run", new_tab=True) if r.mlflow_url else badge("")}</td>'
            "</tr>"
        )  # fmt: skip
    if not rows:
        rows.append('<tr><td colspan="11" class="muted">No runs of retrain_model yet: trigger it '
                    f'from {link(f"{airflow_base}/dags/{DAG_ID}", "the DAG page")}.</td></tr>')  # fmt: skip
    problems = "".join(f'<div class="problem">{esc(p)}</div>' for p in page.problems)
    model = link(f"{page.mlflow_ui}/#/models/{quote(page.model_name, safe='')}", page.model_name,
                 new_tab=True) if page.model_name else ""  # fmt: skip
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Retraining · Airflow</title><style>{CSS}</style></head>
<body>
<header><h1>Retraining</h1>
<span>{link(f"{airflow_base}/dags/{DAG_ID}", "retrain_model in Airflow")}</span>
<span>{link(page.experiment_url, "MLflow experiment", new_tab=True) if page.experiment_url else ""}</span>
<span>{("Registered model " + model) if model else ""}</span>
<span class="muted small">last {limit} runs, read in {page.seconds:.2f}s; hover a verdict for its summary</span>
</header>
{problems}
<h2>Who serves</h2>
<div class="aliases">{alias_cards}</div>
<h2>Recent runs</h2>
<table>
<thead><tr><th>DAG run</th><th>State</th><th>Validation</th><th>Drift</th><th>Retrain</th>
<th>Stop reason</th><th>Grad norm / epoch</th><th>Gate</th><th>Canary</th><th>Version</th>
<th>MLflow</th></tr></thead>
<tbody>
{"".join(rows)}
</tbody></table>
</body></html>
"""


ICON_SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24" fill="none" stroke="#64748b" '
    'stroke-width="2" stroke-linecap="round" stroke-linejoin="round">'
    '<path d="M21 12a9 9 0 1 1-3-6.7"/><polyline points="21 3 21 9 15 9"/>'
    '<polyline points="7 14 10 11 13 13 17 9"/></svg>'
)


# -- the app -------------------------------------------------------------------------------


async def authorize(request: Request) -> Response | None:
    """None when the caller may read retrain_model runs; else a redirect to login or a 403."""
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
            return HTMLResponse(f"<p>Not allowed: {esc(exc.detail)}</p>", status_code=exc.status_code)
        base = request.scope.get("root_path", "")
        login = get_auth_manager().get_url_login(next_url=f"{base}/")
        return RedirectResponse(login, status_code=303)
    allowed = get_auth_manager().is_authorized_dag(
        method="GET", access_entity=DagAccessEntity.RUN, details=DagDetails(id=DAG_ID), user=user
    )
    if not allowed:
        return HTMLResponse(f"<p>{esc(getattr(user, 'get_name', lambda: 'you')())} may not read "
                            f"runs of {DAG_ID}.</p>", status_code=403)  # fmt: skip
    return None


def create_app() -> FastAPI:
    app = FastAPI(title="Retraining", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/", response_class=HTMLResponse)
    async def retraining_page(request: Request, limit: int = DEFAULT_LIMIT) -> Response:
        from starlette.concurrency import run_in_threadpool

        denied = await authorize(request)
        if denied is not None:
            return denied
        limit = min(max(limit, 1), MAX_LIMIT)
        airflow_base = request.scope.get("root_path", "").removesuffix(URL_PREFIX)
        page = await run_in_threadpool(collect, limit, airflow_base)
        return HTMLResponse(render_page(page, airflow_base=airflow_base, limit=limit),
                            headers={"Cache-Control": "no-store"})  # fmt: skip

    @app.get("/icon.svg")
    async def icon() -> Response:
        return Response(ICON_SVG, media_type="image/svg+xml",
                        headers={"Cache-Control": "max-age=86400"})  # fmt: skip

    return app


app = create_app()
