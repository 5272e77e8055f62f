"""Alerts with one voice: one record per (model, kind, subject), deduplicated and suppressed.

Every alert the pipeline raises — from a DAG's failure or decision callbacks
(``dags/alerting.py``), a monitor, the scoring service's rules — goes through
:func:`raise_alert`, which appends it to the embedded sink, a JSON-lines file at
``$PIPELINE_HOME/alerts/alerts.jsonl``, and returns the :class:`Alert` *to send* — or
``None`` when nobody should be told again:

* **Deduplication** — the key is ``<model>/<kind>/<subject>``. The subject names the thing
  that is wrong, not the run that saw it: a batch's content hash for data and training
  alerts, the model version for gate / canary / bake / decay alerts, the DAG id for an
  overdue run, the SLO's name for a burning budget. A retry, a cleared task or a new DAG
  run on the same bytes hits the same key; while that alert is open, a repeat only counts
  (``occurrences``, ``last_seen``).
* **Suppression** — an alert that *resolved* and fires again within the model's
  ``alerts.suppress_minutes`` is recorded with ``suppressed: true`` and not returned: a
  flapping condition pages once. After the window it is a new episode, sent again.
* **Resolve** — :func:`resolve_alert` appends a ``resolved`` line when the same subject
  later succeeds; it is returned to send unless the episode was suppressed (nobody was
  told it opened).

The file is append-only — an ``open`` line, repeats, a ``resolved`` line; the current state
of an alert is the last line with its ``dedup_key``. Writers take an exclusive
``fcntl.flock`` on the sibling ``alerts.jsonl.lock`` (read-check-append is one critical
section, across processes and threads), readers a shared one. A line that does not parse
(hand-edited, truncated by a full disk) is skipped with a warning naming its number; it
never stops the reading. The file is local to the machine whose ``PIPELINE_HOME`` it lives
in (one per worker host under Celery); the sinks (``dags/alerting.py``) are what reach
people.

Airflow-free: the delivery to Airflow Connections (SMTP, Slack-compatible webhooks) is in
``dags/alerting.py``.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import math
import os
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

from pipeline.settings import PROJECT_ROOT, get_settings

log = logging.getLogger(__name__)

DEFAULT_SUPPRESS_MINUTES = 60.0  # AlertsSpec's default, when the model's spec cannot be read


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return _RANK[self]


_RANK = {Severity.INFO: 0, Severity.WARNING: 1, Severity.CRITICAL: 2}


class AlertKind(StrEnum):
    BATCH_QUARANTINED = "batch_quarantined"
    TRAINING_DIVERGED = "training_diverged"
    GRADIENT_ANOMALY = "gradient_anomaly"
    CHECKPOINT_REJECTED = "checkpoint_rejected"
    GATE_REJECTED = "gate_rejected"
    APPROVAL_WAITING = "approval_waiting"
    CANARY_ROLLED_BACK = "canary_rolled_back"
    BAKE_ROLLED_BACK = "bake_rolled_back"
    CHAMPION_DECAYING = "champion_decaying"
    RUN_OVERDUE = "run_overdue"
    SLO_BUDGET_BURNING = "slo_budget_burning"
    TASK_FAILED = "task_failed"


# Default severity per kind: critical = the model in production is (or may be) worse, or the
# pipeline cannot make a model at all; warning = someone should look today; info = a decision
# worth knowing about that needs nobody (a gate doing its job).
DEFAULT_SEVERITY: dict[AlertKind, Severity] = {
    AlertKind.BATCH_QUARANTINED: Severity.WARNING,
    AlertKind.TRAINING_DIVERGED: Severity.CRITICAL,
    AlertKind.GRADIENT_ANOMALY: Severity.WARNING,
    AlertKind.CHECKPOINT_REJECTED: Severity.CRITICAL,
    AlertKind.GATE_REJECTED: Severity.INFO,
    AlertKind.APPROVAL_WAITING: Severity.WARNING,
    AlertKind.CANARY_ROLLED_BACK: Severity.WARNING,
    AlertKind.BAKE_ROLLED_BACK: Severity.CRITICAL,
    AlertKind.CHAMPION_DECAYING: Severity.CRITICAL,
    AlertKind.RUN_OVERDUE: Severity.WARNING,
    AlertKind.SLO_BUDGET_BURNING: Severity.WARNING,
    AlertKind.TASK_FAILED: Severity.CRITICAL,
}

OPEN, RESOLVED = "open", "resolved"


def runbook_path(kind: AlertKind | str) -> str:
    """The runbook of a kind, relative to the repository root."""
    return f"docs/runbooks/{AlertKind(kind).value}.md"


def dedup_key(model: str, kind: AlertKind | str, subject: str) -> str:
    return f"{model}/{AlertKind(kind).value}/{subject}"


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # NaN / inf: JSON has no literal for them
    return v


@dataclass(frozen=True)
class Alert:
    """One alert's state: what, about what, how bad, what to do, where to look."""

    kind: AlertKind
    severity: Severity
    model: str
    subject: str
    dedup_key: str
    summary: str  # one line naming the value and the threshold
    value: Any = None
    threshold: Any = None
    runbook: str = ""
    links: dict[str, str] = field(default_factory=dict)
    state: str = OPEN
    first_seen: str = ""
    last_seen: str = ""
    occurrences: int = 1
    suppressed: bool = False
    details: dict[str, Any] = field(default_factory=dict)
    resolved_at: str | None = None
    deliveries: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["kind"] = self.kind.value
        out["severity"] = self.severity.value
        out["value"] = _jsonable(self.value)
        out["threshold"] = _jsonable(self.threshold)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Alert:
        """Read one line back; raises ``ValueError``/``KeyError``/``TypeError`` on a bad one."""
        if not isinstance(data, Mapping):
            raise TypeError(f"a JSON object was expected, not {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in data.items() if k in names}
        kw["kind"] = AlertKind(data["kind"])
        kw["severity"] = Severity(data["severity"])
        for name in ("model", "subject", "dedup_key", "summary", "state"):
            if not isinstance(data[name], str):
                raise TypeError(f"{name} is not a string")
        if data["state"] not in (OPEN, RESOLVED):
            raise ValueError(f"state {data['state']!r} is neither open nor resolved")
        if not isinstance(kw.get("links", {}), dict) or not isinstance(kw.get("details", {}), dict):
            raise TypeError("links and details must be JSON objects")
        return cls(**kw)

    def line(self) -> str:
        """One human line: severity, kind, model, summary, runbook."""
        return (
            f"[{self.severity.value}] {self.kind.value} {self.model} ({self.subject}): "
            f"{self.summary} — runbook {self.runbook}"
        )


# -- the file --------------------------------------------------------------------------------


def alerts_file() -> Path:
    """``$PIPELINE_HOME/alerts/alerts.jsonl``."""
    return get_settings().home_dir / "alerts" / "alerts.jsonl"


_THREAD_LOCK = threading.Lock()  # flock is per open file: threads of one process also queue


@contextmanager
def _locked(exclusive: bool) -> Iterator[Path]:
    path = alerts_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(path.name + ".lock")
    with _THREAD_LOCK, open(lock_path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield path
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _read_lines(path: Path) -> list[Alert]:
    if not path.exists():
        return []
    out: list[Alert] = []
    with path.open("rb") as fh:
        for n, raw in enumerate(fh, 1):
            text = raw.strip()
            if not text:
                continue
            try:
                out.append(Alert.from_json(json.loads(text)))
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
                log.warning(
                    "alerts file %s line %d is not an alert record (%s: %s); skipped — "
                    "fix or delete that line",
                    path,
                    n,
                    type(exc).__name__,
                    str(exc)[:200],
                )
    return out


def _current(lines: list[Alert]) -> dict[str, Alert]:
    cur: dict[str, Alert] = {}
    for a in lines:
        cur.pop(a.dedup_key, None)  # re-insert: dict order = order of the last line
        cur[a.dedup_key] = a
    return cur


def _append(path: Path, alert: Alert) -> None:
    line = json.dumps(alert.to_json(), sort_keys=True, default=str)
    with path.open("ab") as fh:
        # a file cut short by a crash may end mid-line: start ours on a line of its own
        if fh.tell() > 0:
            with path.open("rb") as rd:
                rd.seek(-1, os.SEEK_END)
                if rd.read(1) != b"\n":
                    fh.write(b"\n")
        fh.write(line.encode() + b"\n")
        fh.flush()
        os.fsync(fh.fileno())


def _suppress_minutes(model: str) -> float:
    try:
        from pipeline.spec import get_spec

        return float(get_spec(model).alerts.suppress_minutes)
    except Exception as exc:  # noqa: BLE001 - a model without a readable spec still alerts
        log.warning(
            "alerts: spec of model %r not readable (%s); suppression window %.0f min",
            model,
            exc,
            DEFAULT_SUPPRESS_MINUTES,
        )
        return DEFAULT_SUPPRESS_MINUTES


# -- the API ---------------------------------------------------------------------------------


def raise_alert(
    *,
    kind: AlertKind | str,
    model: str,
    subject: str,
    summary: str,
    value: Any = None,
    threshold: Any = None,
    links: Mapping[str, str] | None = None,
    severity: Severity | str | None = None,
    details: Mapping[str, Any] | None = None,
    suppress_minutes: float | None = None,
    now: datetime | None = None,
) -> Alert | None:
    """Record an alert; return it to send, or ``None`` when it is a repeat of an open one (a
    retry, a re-run of the same failure) or fires again inside the suppression window."""
    kind = AlertKind(kind)
    subject = str(subject) or "-"
    key = dedup_key(model, kind, subject)
    t = now or _now()
    window = _suppress_minutes(model) if suppress_minutes is None else float(suppress_minutes)
    with _locked(exclusive=True) as path:
        prev = _current(_read_lines(path)).get(key)
        base = Alert(
            kind=kind,
            severity=Severity(severity) if severity else DEFAULT_SEVERITY[kind],
            model=model,
            subject=subject,
            dedup_key=key,
            summary=summary,
            value=value,
            threshold=threshold,
            runbook=runbook_path(kind),
            links={k: str(v) for k, v in (links or {}).items() if v},
            state=OPEN,
            first_seen=_iso(t),
            last_seen=_iso(t),
            occurrences=1,
            suppressed=False,
            details=dict(details or {}),
        )
        if prev is not None and prev.state == OPEN:  # the same condition, seen again
            _append(
                path,
                dataclasses.replace(
                    prev,
                    last_seen=_iso(t),
                    occurrences=prev.occurrences + 1,
                    links={**prev.links, **base.links},
                ),
            )
            return None
        if prev is not None and prev.resolved_at:
            since = t - _parse_iso(prev.resolved_at)
            if since < timedelta(minutes=window):  # flapping: recorded, not sent
                _append(
                    path,
                    dataclasses.replace(
                        base,
                        occurrences=prev.occurrences + 1,
                        suppressed=True,
                        details={
                            **base.details,
                            "suppressed_because": f"resolved {since.total_seconds() / 60:.1f} "
                            f"min ago, inside the {window:g} min suppression window",
                        },
                    ),
                )
                return None
        alert = (
            base if prev is None else dataclasses.replace(base, occurrences=prev.occurrences + 1)
        )
        _append(path, alert)
        return alert


def resolve_alert(
    *,
    kind: AlertKind | str,
    model: str,
    subject: str,
    summary: str = "condition cleared",
    now: datetime | None = None,
) -> Alert | None:
    """Close the open alert of (model, kind, subject), if there is one; return the resolved
    record to send (``None`` when nothing was open, or the episode was never sent)."""
    key = dedup_key(model, kind, str(subject) or "-")
    t = now or _now()
    with _locked(exclusive=True) as path:
        prev = _current(_read_lines(path)).get(key)
        if prev is None or prev.state != OPEN:
            return None
        done = dataclasses.replace(
            prev,
            state=RESOLVED,
            resolved_at=_iso(t),
            last_seen=_iso(t),
            details={**prev.details, "resolution": summary},
        )
        _append(path, done)
        return None if prev.suppressed else done


def record_delivery(alert: Alert, deliveries: list[dict[str, Any]]) -> None:
    """Note on the alert's line where it went (and which sinks failed), same state."""
    with _locked(exclusive=True) as path:
        cur = _current(_read_lines(path)).get(alert.dedup_key) or alert
        if cur.state != alert.state:
            return  # resolved (or re-opened) since: the newer line stands
        _append(path, dataclasses.replace(cur, deliveries=[*cur.deliveries, *deliveries]))


def all_alerts(model: str | None = None) -> list[Alert]:
    """The current state of every alert (last line per dedup key), newest first."""
    with _locked(exclusive=False) as path:
        cur = list(_current(_read_lines(path)).values())
    cur.reverse()
    return [a for a in cur if model is None or a.model == model]


def open_alerts(model: str | None = None) -> list[Alert]:
    """Open alerts (suppressed re-fires of a flapping condition included), newest first."""
    return [a for a in all_alerts(model) if a.state == OPEN]


def runbook_file(kind: AlertKind | str) -> Path:
    return PROJECT_ROOT / runbook_path(kind)


# -- gradient anomalies, from the telemetry already recorded ----------------------------------

SPIKE_FACTOR = 10.0  # a tensor's gradient L2 norm this many times its running median
VANISH_BELOW = 1e-7  # a tensor's gradient L2 norm under this, at the last snapshots
MIN_SNAPSHOTS = 4  # fewer snapshots of a tensor: nothing is judged


@dataclass(frozen=True)
class GradientAnomaly:
    tensor: str
    what: str  # "spike" | "vanishing" | "dead_units"
    step: int
    value: float
    threshold: float


def gradient_anomalies(
    series: Mapping[str, list[tuple[int, float]]] | list[dict[str, Any]],
    *,
    spike_factor: float = SPIKE_FACTOR,
    vanish_below: float = VANISH_BELOW,
    min_snapshots: int = MIN_SNAPSHOTS,
) -> list[GradientAnomaly]:
    """Per-tensor spikes, vanishing gradients and dead units.

    From the events the gradient telemetry recorded over the whole history (a list, as
    ``gradient_series`` reads it from the run: ``pipeline.train.telemetry.detect_events``
    decided them), or — a run from before those events — from the L2-norm metric series
    (``grad/<tensor>/l2``, one point per logged snapshot):

    * spike: a snapshot whose norm exceeds ``spike_factor`` × the median of that tensor's
      earlier snapshots (the first spike per tensor is reported);
    * vanishing: the tensor's last two snapshots are both below ``vanish_below``.
    """
    import statistics

    if isinstance(series, list):
        return [
            GradientAnomaly(
                str(e["tensor"]),
                str(e["kind"]),
                int(e["step"]),
                float(e["value"]),
                float(e["threshold"]),
            )
            for e in series
        ]
    out: list[GradientAnomaly] = []
    for name, points in sorted(series.items()):
        pts = sorted((int(s), float(v)) for s, v in points if math.isfinite(float(v)))
        if len(pts) < min_snapshots:
            continue
        for i in range(min_snapshots - 1, len(pts)):
            med = statistics.median(v for _, v in pts[:i])
            if med > 0 and pts[i][1] > spike_factor * med:
                out.append(GradientAnomaly(name, "spike", pts[i][0], pts[i][1], spike_factor * med))
                break
        if all(v < vanish_below for _, v in pts[-2:]):
            out.append(GradientAnomaly(name, "vanishing", pts[-1][0], pts[-1][1], vanish_below))
    return out


def gradient_series(
    run_id: str, client: Any = None
) -> list[dict[str, Any]] | dict[str, list[tuple[int, float]]]:
    """The gradient events the telemetry recorded on an MLflow run (``events`` of
    ``telemetry/final/summary.json``); for a run without that summary, the
    ``grad/<tensor>/l2`` metric series instead."""
    from pipeline import registry
    from pipeline.train.telemetry import load_summary

    c = client or registry.client()
    summary = load_summary(run_id, c)
    if summary is not None and isinstance(summary.get("events"), list):
        return list(summary["events"])
    run = c.get_run(run_id)
    out: dict[str, list[tuple[int, float]]] = {}
    for key in run.data.metrics:
        if key.startswith("grad/") and key.endswith("/l2"):
            out[key[len("grad/") : -len("/l2")]] = [
                (m.step, m.value) for m in c.get_metric_history(run_id, key)
            ]
    return out


# -- the command: python -m pipeline alerts ---------------------------------------------------


def cmd_alerts(args: Any) -> int:
    """``python -m pipeline alerts [--model NAME] [--all] [--json] [--resolve KEY]``."""
    if getattr(args, "overdue", False):
        if not args.model:
            print("--overdue needs --model NAME", file=sys.stderr)
            return 2
        from pipeline.spec import get_spec

        sent = check_overdue(get_spec(args.model))
        for a in sent:
            print(a.line())
        if not sent:
            print(f"run_overdue of {args.model}: nothing new to send")
        return 0
    if args.resolve:
        parts = str(args.resolve).split("/", 2)
        if len(parts) != 3 or parts[1] not in {k.value for k in AlertKind}:
            print(
                f"--resolve {args.resolve!r}: a dedup key is <model>/<kind>/<subject> "
                "(see `python -m pipeline alerts`)",
                file=sys.stderr,
            )
            return 2
        done = resolve_alert(
            kind=parts[1], model=parts[0], subject=parts[2], summary="resolved by hand (CLI)"
        )
        if done is None and not any(
            a.dedup_key == args.resolve and a.state == RESOLVED for a in all_alerts(parts[0])
        ):
            print(f"no alert {args.resolve!r} in {alerts_file()}", file=sys.stderr)
            return 1
        print(f"resolved {args.resolve}")
        return 0
    found = all_alerts(args.model) if args.all else open_alerts(args.model)
    if args.json:
        print(json.dumps([a.to_json() for a in found], indent=2, default=str))
        return 0
    what = "alerts" if args.all else "open alerts"
    print(f"{len(found)} {what}{f' of {args.model}' if args.model else ''} ({alerts_file()})")
    for a in found:
        flag = " (suppressed)" if a.suppressed else ""
        print(f"  {a.state:<8} {a.severity.value:<8} {a.dedup_key}{flag}  x{a.occurrences}")
        print(f"           {a.summary}")
        print(f"           runbook: {a.runbook}   last seen {a.last_seen}")
    return 0


# -- run overdue without Airflow's deadline alerts: the REST API's running runs -------------


def overdue_runs(
    runs: list[Mapping[str, Any]], minutes: float, now: datetime
) -> list[tuple[str, float]]:
    """(run id, minutes since queued) of each run queued longer ago than ``minutes``."""
    out = []
    for r in runs:
        since = r.get("queued_at") or r.get("start_date")
        if not since:
            continue
        age = (now - _parse_iso(str(since))).total_seconds() / 60
        if age > minutes:
            out.append((str(r.get("dag_run_id") or r.get("run_id")), age))
    return out


def check_overdue(spec: Any, *, now: datetime | None = None) -> list[Alert]:
    """Raise ``run_overdue`` for the model's retrain DAG when a run has been queued or running
    longer than ``slo.decision_minutes`` (Airflow's REST API, ``PIPELINE_AIRFLOW_*``
    credentials); resolve it when none is. Returns the alerts to send."""
    import httpx

    from pipeline import airflow_api as api

    url = get_settings().airflow_api_url.rstrip("/")
    dag_id, minutes = spec.retrain_dag_id, float(spec.slo.decision_minutes)
    with httpx.Client(timeout=api.TIMEOUT_S) as client:
        headers = {"Authorization": f"Bearer {api.token(client, url)}"}
        resp = api.request(
            client,
            "GET",
            f"{url}/api/v2/dags/{dag_id}/dagRuns",
            headers=headers,
            params=[("state", "queued"), ("state", "running"), ("limit", "100")],
        )
        api.check(resp, f"listing the unfinished runs of {dag_id}")
    late = overdue_runs(resp.json().get("dag_runs", []), minutes, now or _now())
    if not late:
        done = resolve_alert(
            kind=AlertKind.RUN_OVERDUE, model=spec.name, subject=dag_id, summary="no run late"
        )
        return [done] if done else []
    run_id, age = max(late, key=lambda x: x[1])
    a = raise_alert(
        kind=AlertKind.RUN_OVERDUE,
        model=spec.name,
        subject=dag_id,
        summary=f"run {run_id} of {dag_id} not finished {age:.0f} min after it was queued "
        f"(slo.decision_minutes = {minutes:g})",
        value=round(age, 1),
        threshold=minutes,
        links={"airflow_run": f"{url}/dags/{dag_id}/runs/{run_id}"},
        details={"late_runs": [r for r, _ in late]},
        suppress_minutes=spec.alerts.suppress_minutes,
        now=now,
    )
    return [a] if a else []
