"""Service-level objectives per model, and what is left of each error budget:
``python -m pipeline slo --model NAME``.

The objectives are the spec's (``slo:`` in ``models/<name>/model.yaml``, :class:`pipeline.spec.
SloSpec`); this module measures them over the last ``slo.window_days`` from records the
pipeline already writes — nothing here writes anything:

================================  ==========================================================
``training_success``              MLflow runs of the model's experiment (``retrain_<name>``)
                                  whose retrain decision was ``train``: good = the
                                  ``stage.train_model.verdict`` tag is ``trained``; bad =
                                  ``diverged``, or the run ended without a training verdict
                                  (the task failed); a run still training is not counted.
``decision_latency``              Runs that ingested a batch (``stage.ingest_batch.verdict``):
                                  landing = the MLflow run's start (``ingest_batch`` creates it
                                  when the DAG run takes the batch), decision = the run's end
                                  (``publish_summary`` closes it after the last decision,
                                  quarantine closes it at once) once a final verdict is on it
                                  (quarantined, retrain skipped, diverged, checkpoint or gate
                                  rejected, promoted / not promoted / rolled back). Good =
                                  decided within ``decision_minutes``; bad = decided later, or
                                  still undecided after ``decision_minutes`` (a paused canary,
                                  a waiting approval, a failed task); younger undecided
                                  batches are pending and not counted.
``champion_freshness``            The registry: now minus the ``promoted_at`` tag of the
                                  version behind ``champion``, against
                                  ``champion_max_age_days``.
``serving_error_rate``            The scoring service's ``/metrics`` (``PIPELINE_SERVING_URL``,
``serving_latency_p99``           or every replica: ``pipeline.serving.replicas``), this model's
                                  series summed over versions: 5xx share of
                                  ``scoring_requests_total``, and the share of requests answered
                                  within ``serving_p99_ms`` (``scoring_request_latency_seconds``,
                                  interpolated inside a bucket as Prometheus does) against 99%.
                                  Counters live as long as the service process, so these two
                                  cover the service's lifetime, not the window (Prometheus's
                                  recording rules give the windowed figure).
================================  ==========================================================

**Error budget.** For an event SLO with target ``t`` the budget is the ``1 - t`` share of bad
events the objective allows; ``budget_remaining = 1 - (bad / total) / (1 - t)``: 1 = untouched,
0 = spent, below 0 = overspent (four diverged runs out of five against 99% is ``-79``). For
freshness it is the age still allowed: ``1 - age / max_age``. ``burning`` is
``budget_remaining < 0``: the budget is exhausted — over the window that is the same test as
a burn rate above 1. **No data** (no runs in the window, no champion, a service that does not
answer or is not configured) is a row with ``status="no_data"``, ``actual=None`` and
``budget_remaining=None``, never counted as meeting its objective.

Airflow's REST API is not read: the MLflow runs carry every time these objectives need. What
that leaves out is the scheduler's queue before ``ingest_batch`` starts (landing is when the
DAG run took the batch, not when the file was written).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from pipeline.names import Alias, PromotionVerdict, RunTag, Task, VersionTag, stage_verdict_tag

MAX_RUNS = 5000  # runs read per window: a bound on the cost of one report
PAGE = 1000
P99 = 0.99
SERVING_TIMEOUT_S = 5.0


class SloName(StrEnum):
    """The SLOs, by the names alerts (``slo_budget_burning``'s subject) and the CLI use."""

    TRAINING_SUCCESS = "training_success"
    DECISION_LATENCY = "decision_latency"
    CHAMPION_FRESHNESS = "champion_freshness"
    SERVING_ERROR_RATE = "serving_error_rate"
    SERVING_LATENCY_P99 = "serving_latency_p99"


class SloStatus(StrEnum):
    OK = "ok"
    BURNING = "burning"
    NO_DATA = "no_data"


@dataclass(frozen=True)
class SloRow:
    """One SLO: its objective, what was measured, and what is left of its error budget."""

    name: str
    objective: str  # one line, the spec's numbers in it
    target: float  # share for event SLOs; days for freshness
    unit: str  # "share" | "ms" | "days": of ``actual``
    actual: float | None  # None: no data
    good: float | None = None  # events; None for freshness and with no data
    total: float | None = None
    budget_remaining: float | None = None  # share of the error budget left; < 0: overspent
    source: str = ""  # "mlflow" | "registry" | "serving"
    detail: str = ""  # how it was measured, or why there is no data

    @property
    def burning(self) -> bool:
        """The error budget is exhausted (``budget_remaining < 0``); never on no data."""
        return self.budget_remaining is not None and self.budget_remaining < 0

    @property
    def status(self) -> SloStatus:
        if self.actual is None or self.budget_remaining is None:
            return SloStatus.NO_DATA
        return SloStatus.BURNING if self.burning else SloStatus.OK

    @property
    def events(self) -> str | None:
        """``good/total``, or None where the SLO is not counted in events."""
        if self.good is None or self.total is None:
            return None
        return f"{_count(self.good)}/{_count(self.total)}"

    def actual_text(self) -> str:
        if self.actual is None:
            return "no data"
        if self.unit == "share":
            return f"{self.actual:.2%}"
        if self.unit == "ms":
            return f"{self.actual:.1f} ms"
        return f"{self.actual:.1f} days"

    def budget_text(self) -> str:
        return "—" if self.budget_remaining is None else f"{self.budget_remaining:.0%}"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "objective": self.objective,
            "target": self.target,
            "unit": self.unit,
            "actual": self.actual,
            "events": None
            if self.good is None or self.total is None
            else {"good": self.good, "total": self.total},
            "budget_remaining": self.budget_remaining,
            "burning": self.burning,
            "status": self.status.value,
            "source": self.source,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class SloReport:
    """Every SLO of one model at ``now``, over ``window_days`` back from it."""

    model: str
    window_days: float
    now: datetime
    rows: list[SloRow] = field(default_factory=list)

    @property
    def since(self) -> datetime:
        return self.now - timedelta(days=self.window_days)

    @property
    def burning(self) -> list[SloRow]:
        return [r for r in self.rows if r.burning]

    def row(self, name: str) -> SloRow:
        return next(r for r in self.rows if r.name == name)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "window_days": self.window_days,
            "since": self.since.isoformat(timespec="seconds"),
            "now": self.now.isoformat(timespec="seconds"),
            "burning": [r.name for r in self.burning],
            "rows": [r.to_json() for r in self.rows],
        }

    def table(self) -> str:
        """The report as a fixed-width table, details below it."""
        head = (
            f"SLOs of {self.model} over {self.window_days:g} days "
            f"({self.since:%Y-%m-%d %H:%M} to {self.now:%Y-%m-%d %H:%M} UTC)"
        )
        cols = ("slo", "objective", "actual", "events", "budget left", "status")
        body = [
            (
                r.name,
                r.objective,
                r.actual_text(),
                r.events or "—",
                r.budget_text(),
                r.status.value.upper().replace("_", " "),
            )
            for r in self.rows
        ]
        widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(cols)]
        line = "  ".join(f"{{:<{w}}}" for w in widths)
        out = [head, line.format(*cols), line.format(*("-" * w for w in widths))]
        out += [line.format(*b) for b in body]
        out += [f"  {r.name}: {r.detail}" for r in self.rows if r.detail]
        return "\n".join(out)


# -- budget arithmetic ----------------------------------------------------------------------


def event_budget(good: float, total: float, target: float) -> float:
    """Share of the error budget left when ``good`` of ``total`` events met an objective of
    ``target`` (a share): 1 - (bad share) / (allowed bad share)."""
    return 1.0 - ((total - good) / total) / (1.0 - target)


def _count(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.1f}"


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    return now if now.tzinfo else now.replace(tzinfo=UTC)


def _ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


def _parse_time(text: str) -> datetime | None:
    try:
        t = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


# -- MLflow records ---------------------------------------------------------------------------


def window_runs(client: Any, experiment_id: str, since: datetime, now: datetime) -> list[Any]:
    """The experiment's runs started in [since, now], newest first, at most ``MAX_RUNS``."""
    runs: list[Any] = []
    token = None
    flt = f"attributes.start_time >= {_ms(since)} AND attributes.start_time <= {_ms(now)}"
    while len(runs) < MAX_RUNS:
        page = client.search_runs(
            [experiment_id],
            filter_string=flt,
            order_by=["attributes.start_time DESC"],
            max_results=min(PAGE, MAX_RUNS - len(runs)),
            page_token=token,
        )
        runs.extend(page)
        token = getattr(page, "token", None)
        if not token:
            break
    return runs


# A batch is decided once one of these is on its run: the verdict that ends its story.
_FINAL_PROMOTION = {
    PromotionVerdict.PROMOTED,
    PromotionVerdict.NOT_PROMOTED,
    PromotionVerdict.ROLLED_BACK,
    PromotionVerdict.ROLLED_BACK_AFTER_BAKE,
}


def batch_decision(tags: Mapping[str, str]) -> str | None:
    """What was decided about the run's batch, from its stage verdicts; None while undecided
    (still running, a paused or aborted canary, a conflict to re-gate, a failed task)."""

    def v(task: Task) -> str:
        return tags.get(stage_verdict_tag(task), "")

    if v(Task.INGEST_BATCH) == "quarantined" or v(Task.VALIDATE_BATCH) == "reject":
        return "quarantined"
    if v(Task.DECIDE_RETRAIN) == "skip" or tags.get(RunTag.RETRAIN_VERDICT) == "skip":
        return "retrain_skipped"
    if v(Task.TRAIN_MODEL) == "diverged":
        return "diverged"
    if v(Task.VERIFY_CHECKPOINT) == "rejected":
        return "checkpoint_rejected"
    if v(Task.PROMOTE_CHAMPION) in _FINAL_PROMOTION:
        return v(Task.PROMOTE_CHAMPION)
    if v(Task.GATE_PROMOTION) == "reject":
        return "gate_rejected"
    return None


def _run_label(run: Any) -> str:
    return run.data.tags.get(RunTag.RUN_ID) or run.info.run_id


def training_success(runs: Iterable[Any], target: float) -> SloRow:
    objective = f">= {target:.2%} of training runs finish without divergence"
    good = bad = running = 0
    diverged: list[str] = []
    failed: list[str] = []
    for r in runs:
        tags = r.data.tags
        verdict = tags.get(stage_verdict_tag(Task.TRAIN_MODEL), "")
        trains = verdict or tags.get(RunTag.RETRAIN_VERDICT) == "train"
        if not trains:
            continue
        if verdict == "trained":
            good += 1
        elif verdict == "diverged":
            bad += 1
            diverged.append(_run_label(r))
        elif r.info.end_time:  # told to train, ended, no training verdict: the task failed
            bad += 1
            failed.append(_run_label(r))
        else:
            running += 1
    total = good + bad
    row = SloRow(SloName.TRAINING_SUCCESS, objective, target, "share", None, source="mlflow")
    if not total:
        return _replace(
            row,
            detail="no data: no training run finished in the window"
            + (f" ({running} still training)" if running else ""),
        )
    parts = [f"{good} trained", f"{len(diverged)} diverged", f"{len(failed)} failed"]
    if diverged:
        parts.append("diverged: " + ", ".join(diverged[:3]) + (" …" if len(diverged) > 3 else ""))
    if failed:
        parts.append("failed: " + ", ".join(failed[:3]) + (" …" if len(failed) > 3 else ""))
    if running:
        parts.append(f"{running} still training (not counted)")
    return _replace(
        row,
        actual=good / total,
        good=good,
        total=total,
        budget_remaining=event_budget(good, total, target),
        detail="; ".join(parts),
    )


def decision_latency(runs: Iterable[Any], minutes: float, target: float, now: datetime) -> SloRow:
    objective = f">= {target:.0%} of batches decided within {minutes:g} min of landing"
    limit_ms = minutes * 60_000
    now_ms = _ms(now)
    good = bad = pending = 0
    took: list[float] = []
    late: list[tuple[float, str]] = []
    for r in runs:
        tags = r.data.tags
        if stage_verdict_tag(Task.INGEST_BATCH) not in tags:
            continue  # not a batch's run (a rollback's, say)
        start, end = r.info.start_time, r.info.end_time
        decided = batch_decision(tags) is not None and end
        if decided:
            took.append((end - start) / 60_000)
            if end - start <= limit_ms:
                good += 1
            else:
                bad += 1
                late.append(((end - start) / 60_000, _run_label(r)))
        elif now_ms - start > limit_ms:
            bad += 1
            late.append(((now_ms - start) / 60_000, f"{_run_label(r)} (undecided)"))
        else:
            pending += 1
    total = good + bad
    row = SloRow(SloName.DECISION_LATENCY, objective, target, "share", None, source="mlflow")
    if not total:
        return _replace(
            row,
            detail="no data: no batch landed in the window"
            + (f" ({pending} pending, younger than {minutes:g} min)" if pending else ""),
        )
    parts = []
    if took:
        parts.append(f"median {statistics.median(took):.1f} min, slowest {max(took):.1f} min")
    if late:
        late.sort(reverse=True)
        parts.append(
            "late: "
            + ", ".join(f"{label} {m:.0f} min" for m, label in late[:3])
            + (" …" if len(late) > 3 else "")
        )
    if pending:
        parts.append(f"{pending} pending (not counted)")
    return _replace(
        row,
        actual=good / total,
        good=good,
        total=total,
        budget_remaining=event_budget(good, total, target),
        detail="; ".join(parts),
    )


def champion_freshness(champion: Any, max_age_days: float, now: datetime) -> SloRow:
    """``champion``: the model version behind the alias, or None."""
    objective = f"champion promoted <= {max_age_days:g} days ago"
    row = SloRow(
        SloName.CHAMPION_FRESHNESS, objective, max_age_days, "days", None, source="registry"
    )
    if champion is None:
        return _replace(row, detail="no data: no champion")
    version = str(champion.version)
    raw = (champion.tags or {}).get(VersionTag.PROMOTED_AT, "")
    at = _parse_time(raw) if raw else None
    if at is None:
        return _replace(
            row,
            detail=f"no data: champion v{version} has no readable {VersionTag.PROMOTED_AT} tag "
            f"({raw!r}; moved by hand?)",
        )
    age = (now - at).total_seconds() / 86_400
    return _replace(
        row,
        actual=age,
        budget_remaining=1.0 - age / max_age_days,
        detail=f"champion v{version} promoted {at.isoformat(timespec='seconds')}",
    )


# -- the scoring service ---------------------------------------------------------------------


def _serving_rows(
    stats: Any, error_target: float, p99_ms: float, where: str
) -> tuple[SloRow, SloRow]:
    err_obj = f"<= {error_target:.2%} of scoring requests fail (5xx)"
    lat_obj = f"p99 scoring latency <= {p99_ms:g} ms"
    err = SloRow(SloName.SERVING_ERROR_RATE, err_obj, error_target, "share", None, source="serving")
    lat = SloRow(SloName.SERVING_LATENCY_P99, lat_obj, P99, "ms", None, source="serving")
    if isinstance(stats, str):
        return _replace(err, detail=stats), _replace(lat, detail=stats)
    note = f"since the service started ({where})"
    if stats.requests <= 0:
        err = _replace(err, detail=f"no data: no scoring requests for this model yet ({where})")
    else:
        errors = min(stats.errors, stats.requests)
        err = _replace(
            err,
            actual=errors / stats.requests,
            good=stats.requests - errors,
            total=stats.requests,
            budget_remaining=1.0 - (errors / stats.requests) / error_target,
            detail=f"{_count(errors)} of {_count(stats.requests)} requests failed, {note}",
        )
    h = stats.latency
    if h.total <= 0:
        lat = _replace(lat, detail=f"no data: no latency observed for this model yet ({where})")
    else:
        fast = within(h, p99_ms / 1000.0)
        p = h.quantile(P99)
        lat = _replace(
            lat,
            actual=None if p is None else p * 1000.0,
            good=fast,
            total=h.total,
            budget_remaining=event_budget(fast, h.total, P99),
            detail=f"{_count(h.total - fast)} of {_count(h.total)} requests slower than "
            f"{p99_ms:g} ms, {note}",
        )
    return err, lat


def within(h: Any, bound: float) -> float:
    """Observations at or below ``bound`` in histogram ``h`` (``serving.metrics.Histogram``),
    linear inside the bucket that holds it, as Prometheus's ``histogram_quantile`` reads one."""
    seen, lower = 0.0, 0.0
    for upper, c in zip(h.bounds, h.counts, strict=True):
        if bound >= upper:
            seen += c
        elif bound > lower and not math.isinf(upper):
            return seen + c * (bound - lower) / (upper - lower)
        else:
            return seen
        lower = upper
    return seen


def serving_stats(model: str, service_url: str | None, timeout: float) -> tuple[Any, str]:
    """(this model's stats summed over versions, where they came from), or (why there are
    none, where): a service that is down or not configured is no data, not an error."""
    from pipeline.serving.metrics import MeasurementError, VersionStats
    from pipeline.serving.replicas import ReplicaConfigError, ReplicaSet

    try:
        replicas = ReplicaSet.for_analysis(service_url)
    except ReplicaConfigError as exc:
        return f"no data: scoring service not configured ({exc})", "not configured"
    where = replicas.describe()
    try:
        snap = replicas.scrape(model=model, timeout=timeout)
    except MeasurementError as exc:
        return f"no data: scoring service not answering ({exc})", where
    total = VersionStats()
    for st in snap.versions.values():
        total = total + st
    return total, where


# -- the report --------------------------------------------------------------------------------


def _replace(row: SloRow, **kw: Any) -> SloRow:
    import dataclasses

    return dataclasses.replace(row, **kw)


def _no_data(row: SloRow, why: str) -> SloRow:
    return _replace(row, detail=f"no data: {why}")


def compute(
    spec: Any,
    *,
    now: datetime | None = None,
    service_url: str | None = None,
    timeout: float = SERVING_TIMEOUT_S,
    client: Any = None,
) -> SloReport:
    """Every SLO of ``spec`` (a :class:`pipeline.spec.ModelSpec`) at ``now`` (default: the
    clock), over ``spec.slo.window_days``. Reads MLflow (``client``, default
    ``registry.client()``) and the scoring service's ``/metrics`` (``service_url``, default:
    the settings' replicas; ``timeout`` per scrape). A source that cannot be read makes its
    rows "no data" with the reason; nothing raises for a missing record."""
    from pipeline import registry

    slo = spec.slo
    at = _utc(now)
    since = at - timedelta(days=slo.window_days)
    c = client or registry.client()
    rows: list[SloRow] = []

    def both_no_data(why: str) -> list[SloRow]:
        return [
            _no_data(training_success((), slo.training_success), why),
            _no_data(decision_latency((), slo.decision_minutes, slo.decision_target, at), why),
        ]

    try:
        exp = c.get_experiment_by_name(spec.experiment_name)
        runs = window_runs(c, exp.experiment_id, since, at) if exp is not None else None
    except Exception as exc:  # noqa: BLE001 - an unreadable store is this report's no data
        rows += both_no_data(f"MLflow could not be read ({type(exc).__name__}: {exc})")
    else:
        if runs is None:
            rows += both_no_data(f"no MLflow experiment {spec.experiment_name!r} yet")
        else:
            rows.append(training_success(runs, slo.training_success))
            rows.append(decision_latency(runs, slo.decision_minutes, slo.decision_target, at))
            if len(runs) >= MAX_RUNS:
                rows[-2:] = [
                    _replace(r, detail=f"{r.detail} (newest {MAX_RUNS} runs of the window)")
                    for r in rows[-2:]
                ]

    try:
        champion = _champion(c, spec.model_name)
    except Exception as exc:  # noqa: BLE001
        why = f"the MLflow registry could not be read ({type(exc).__name__}: {exc})"
        rows.append(_no_data(champion_freshness(None, slo.champion_max_age_days, at), why))
    else:
        rows.append(champion_freshness(champion, slo.champion_max_age_days, at))

    stats, where = serving_stats(spec.name, service_url, timeout)
    rows += list(_serving_rows(stats, slo.serving_error_rate, slo.serving_p99_ms, where))
    return SloReport(model=spec.name, window_days=slo.window_days, now=at, rows=rows)


def _champion(client: Any, model_name: str) -> Any:
    """The version behind ``champion``, or None (no registered model, or no such alias)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, Alias.CHAMPION.value)
    except MlflowException as exc:
        code = getattr(exc, "error_code", "")
        if code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


__all__ = [
    "SloName",
    "SloReport",
    "SloRow",
    "SloStatus",
    "batch_decision",
    "alerts_for",
    "compute",
    "cmd_slo",
    "event_budget",
]


def alerts_for(
    spec: Any, report: SloReport, *, links: Mapping[str, str] | None = None
) -> list[Any]:
    """``slo_budget_burning`` per exhausted SLO (subject: the SLO's name), resolved when that
    SLO is met again; a row with no data changes nothing. Returns the alerts to send."""
    from pipeline import alerts

    out = []
    for row in report.rows:
        if row.status is SloStatus.NO_DATA:
            continue
        if row.burning:
            measured = f"{row.actual:g} {row.unit}" if row.actual is not None else "n/a"
            a = alerts.raise_alert(
                kind=alerts.AlertKind.SLO_BUDGET_BURNING,
                model=spec.name,
                subject=str(row.name),
                summary=f"SLO {row.name} error budget exhausted: {row.objective}; measured "
                f"{measured} ({row.events or row.detail}), budget left "
                f"{row.budget_remaining:.0%} < 0%",
                value=row.budget_remaining,
                threshold=0.0,
                links=dict(links or {}),
                details={"slo": row.name, "actual": row.actual, "target": row.target},
                suppress_minutes=spec.alerts.suppress_minutes,
            )
        else:
            a = alerts.resolve_alert(
                kind=alerts.AlertKind.SLO_BUDGET_BURNING,
                model=spec.name,
                subject=str(row.name),
                summary=f"SLO {row.name} within budget again",
            )
        if a is not None:
            out.append(a)
    return out


def cmd_slo(args: Any) -> int:
    """``python -m pipeline slo --model NAME [--json] [--check] [--url URL]``: the table (or
    the report as JSON). Exit 0; with ``--check``, 3 when any error budget is exhausted (a
    row ``burning``). No data never fails the check, and never passes as met: it is shown."""
    import json

    from pipeline.spec import active

    report = compute(active(), service_url=args.url or None)
    print(json.dumps(report.to_json(), indent=2) if args.json else report.table())
    return 3 if args.check and report.burning else 0
