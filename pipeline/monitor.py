"""The champion watched after release: decay on delayed labels, and prediction drift.

``monitor_<name>`` (``dags/monitor_model.py``) and ``python -m pipeline monitor --model NAME``
call :func:`watch`, which reads the scoring service's ``/metrics`` (``PIPELINE_SERVING_URL``),
gathers :class:`MonitorEvidence` for the version serving as ``champion`` there, and lets
:class:`MonitorRule` judge it — the shape of every decision in :mod:`pipeline.decisions`:
typed thresholds, an enum of reasons, a record that replays
(``python -m pipeline decision replay FILE``).

Two legs, each with its own reason:

* **Decay** — the live primary metric over the most recent delayed labels (the service's
  ``scoring_labelled_roc_auc{alias="champion"}``, computed from the labels posted to
  ``/feedback``) against the value the gate measured on the trusted set when this version
  was promoted (the version's tag ``eval.<metric>``): decay when it is worse by more than
  ``decay_margin`` (``spec.monitor.decay_margin``; None: ``spec.retrain.decay_margin``),
  judged only with at least ``min_labels`` labelled rows. The service exports ROC AUC on
  labels for binary models; for multiclass it is micro-averaged, while the gate's is macro,
  so a multiclass model (or any primary metric other than ``roc_auc``) gets the reason
  ``no_live_metric`` — no verdict on this leg, never a guess.
* **Prediction drift** — the population stability index (PSI) of the champion's live score
  histogram (``scoring_predicted_score``, the service's buckets) against a baseline, drift
  when ``PSI >= score_drift_psi``, judged with at least ``min_scores`` scores (the spec's
  ``min_labels``: one minimum sample size for both legs). The baseline is kept per version
  in storage, written once, at ``monitor/<model>/v<version>/baseline.json``:

  1. the gate's scores, when recorded: the challenger's probabilities on the trusted
     evaluation set from the gate's decision record (tag ``gate.record`` and its per-row
     side file) — what the model scored when it was judged;
  2. else the first window the monitor saw: the service's cumulative histogram the first
     time it held ``min_scores`` scores of this version. Later runs compare only the scores
     after it (the cumulative minus the baseline), so the baseline's own rows never dilute
     the live window; after a service restart (counters reset) the whole cumulative is live.

  Delete the file to take a new baseline (e.g. after a known, accepted shift in traffic).

Verdicts: ``decaying`` (decay; the DAG raises ``champion_decaying`` and, with
``spec.monitor.retrain_on_decay``, emits the model's batch asset), ``drifting`` (scores
drifted, labels do not show decay or are too few; an alert of warning severity, no
retrain), ``healthy`` (a leg was judged and nothing is wrong), ``no_data`` (neither leg
could be judged: no champion served, too few labels and scores, no baseline yet). A
service that does not answer is :class:`ServingUnreachable` — a transient error (the task
retries), never "healthy".

One service only: with several replicas, point ``PIPELINE_SERVING_URL`` at one replica (the
labelled AUC is computed per replica and cannot be summed).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar

from pipeline import decisions, storage
from pipeline.serving.metrics import SCORE_BUCKETS, Histogram, MeasurementError
from pipeline.settings import get_settings
from pipeline.spec import ModelSpec

KIND = "champion_monitor"
RECORD_VERSION = 1
CHAMPION_ALIAS = "champion"
#: (task, primary metric) -> the service's series of that metric on delayed labels
LIVE_METRICS: dict[tuple[str, str], str] = {("binary", "roc_auc"): "scoring_labelled_roc_auc"}
PSI_FLOOR = 1e-4  # a bucket's share below this counts as this (an empty bucket has no log)


class ServingUnreachable(storage.TransientStorageError):
    """The scoring service did not answer ``/metrics``: nothing is known about the champion;
    the monitor's task retries. Not a verdict."""


class MonitorVerdict(StrEnum):
    HEALTHY = "healthy"
    DECAYING = "decaying"
    DRIFTING = "drifting"
    NO_DATA = "no_data"


class MonitorReason(StrEnum):
    # decay leg
    PERFORMANCE_DECAY = "performance_decay"
    METRIC_HOLDS = "metric_holds"
    TOO_FEW_LABELS = "too_few_labels"
    NO_LIVE_METRIC = "no_live_metric"
    NO_GATED_VALUE = "no_gated_value"
    # drift leg
    SCORE_DRIFT = "score_drift"
    SCORES_STABLE = "scores_stable"
    TOO_FEW_SCORES = "too_few_scores"
    BASELINE_RECORDED = "baseline_recorded"
    # both
    NO_CHAMPION = "no_champion"


_ORDER = list(MonitorReason)  # the primary reason: the first of this order that applies
_DECAY_LEG = {
    MonitorReason.PERFORMANCE_DECAY,
    MonitorReason.METRIC_HOLDS,
    MonitorReason.TOO_FEW_LABELS,
    MonitorReason.NO_LIVE_METRIC,
    MonitorReason.NO_GATED_VALUE,
}


def psi(baseline: Histogram, live: Histogram, floor: float = PSI_FLOOR) -> float:
    """Population stability index ``sum((q - p) * ln(q / p))`` of the live shares ``q``
    against the baseline's ``p`` over the same buckets (shares floored at ``floor``)."""
    if baseline.bounds != live.bounds:
        raise ValueError("baseline and live histograms have different buckets")
    bt, lt = baseline.total, live.total
    if bt <= 0 or lt <= 0:
        raise ValueError("PSI of an empty histogram")
    out = 0.0
    for b, c in zip(baseline.counts, live.counts, strict=True):
        p, q = max(b / bt, floor), max(c / lt, floor)
        out += (q - p) * math.log(q / p)
    return out


def histogram_of(values: Any, bounds: tuple[float, ...] = SCORE_BUCKETS) -> Histogram:
    """Values counted into Prometheus' ``le`` buckets (``+Inf`` last), as the service does."""
    import numpy as np

    edges = np.asarray([*bounds, math.inf] if bounds[-1] != math.inf else bounds)
    idx = np.searchsorted(edges, np.asarray(values, dtype=float).ravel(), side="left")
    counts = np.bincount(idx, minlength=len(edges))[: len(edges)]
    return Histogram(tuple(float(e) for e in edges), tuple(float(c) for c in counts))


@dataclass(frozen=True)
class MonitorEvidence:
    """What the monitor saw of one model's champion, as served."""

    model: str
    version: str | None  # the version serving as champion; None: none is
    task: str = "binary"
    metric: str = "roc_auc"
    direction: int = 1  # +1: higher is better
    live_metric: str | None = None  # the service's series for it; None: it exports none
    gated_value: float | None = None  # eval.<metric> recorded by the gate
    live_value: float | None = None  # over the most recent labels
    labels: int = 0  # labelled rows of this version as champion
    baseline: Histogram | None = None
    baseline_source: str | None = None  # "gate" | "first_window"
    live_scores: Histogram | None = None  # the window judged
    baseline_taken_now: bool = False  # the first window became the baseline in this run

    def __post_init__(self) -> None:
        for name in ("gated_value", "live_value"):
            v = getattr(self, name)
            if v is not None and not math.isfinite(v):
                raise ValueError(f"{name} must be finite or None, got {v}")
        if self.labels < 0:
            raise ValueError(f"labels must be >= 0, got {self.labels}")
        if self.direction not in (1, -1):
            raise ValueError(f"direction must be +1 or -1, got {self.direction}")

    @property
    def scores(self) -> int:
        return int(self.live_scores.total) if self.live_scores is not None else 0

    @property
    def metric_drop(self) -> float | None:
        if self.gated_value is None or self.live_value is None:
            return None
        return self.direction * (self.gated_value - self.live_value)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("baseline", "live_scores"):
            h = getattr(self, k)
            d[k] = h.to_dict() if h is not None else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MonitorEvidence:
        kw = dict(d)
        for k in ("baseline", "live_scores"):
            kw[k] = Histogram.from_dict(kw[k]) if kw.get(k) else None
        return cls(**kw)


@dataclass(frozen=True)
class MonitorDecision:
    KIND: ClassVar[str] = KIND
    RECORD_VERSION: ClassVar[int] = RECORD_VERSION

    reasons: list[MonitorReason]
    evidence: MonitorEvidence
    rule: dict[str, Any] = field(default_factory=dict)
    psi: float | None = None

    @property
    def verdict(self) -> MonitorVerdict:
        r = set(self.reasons)
        if MonitorReason.PERFORMANCE_DECAY in r:
            return MonitorVerdict.DECAYING
        if MonitorReason.SCORE_DRIFT in r:
            return MonitorVerdict.DRIFTING
        if r & {MonitorReason.METRIC_HOLDS, MonitorReason.SCORES_STABLE}:
            return MonitorVerdict.HEALTHY
        return MonitorVerdict.NO_DATA

    @property
    def reason(self) -> MonitorReason:
        return self.reasons[0]

    @property
    def decayed(self) -> bool:
        return self.verdict is MonitorVerdict.DECAYING

    @property
    def decay_reason(self) -> MonitorReason | None:
        return next((r for r in self.reasons if r in _DECAY_LEG), None)

    @property
    def drift_reason(self) -> MonitorReason | None:
        return next((r for r in self.reasons if r not in _DECAY_LEG), None)

    @property
    def message(self) -> str:
        head = f"{self.evidence.model} v{self.evidence.version}" if self.evidence.version else ""
        parts = [_explain(r, self.evidence, self.rule, self.psi) for r in self.reasons]
        return (head + ": " if head else "") + "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            **decisions.common(self, self.evidence.to_dict()),
            "rule": self.rule,
            "psi": self.psi,
        }

    def summary(self) -> str:
        return (
            f"{self.verdict.value}: "
            + ", ".join(r.value for r in self.reasons)
            + (f" — {self.message}")
        )


def _f(v: float | None) -> str:
    return f"{v:.4f}" if v is not None else "n/a"


def _explain(
    reason: MonitorReason, e: MonitorEvidence, rule: Mapping[str, Any], psi_value: float | None
) -> str:
    m, margin = e.metric, rule.get("decay_margin")
    min_labels, min_scores, limit = rule.get("min_labels"), rule.get("min_scores"), rule.get("psi")
    if reason is MonitorReason.NO_CHAMPION:
        return f"the scoring service serves no champion for model {e.model}: nothing to watch"
    if reason is MonitorReason.PERFORMANCE_DECAY:
        return (
            f"live {m} {_f(e.live_value)} on {e.labels} delayed labels vs {_f(e.gated_value)} "
            f"at the gate: drop {_f(e.metric_drop)} > decay margin {margin}"
        )
    if reason is MonitorReason.METRIC_HOLDS:
        return (
            f"live {m} {_f(e.live_value)} on {e.labels} delayed labels vs {_f(e.gated_value)} "
            f"at the gate: drop {_f(e.metric_drop)} <= decay margin {margin}"
        )
    if reason is MonitorReason.TOO_FEW_LABELS:
        return f"{e.labels} delayed labels < min_labels {min_labels}: decay not judged"
    if reason is MonitorReason.NO_LIVE_METRIC:
        if e.live_metric is None:
            return (
                f"the scoring service exports no live {m} for a {e.task} model (it exports "
                "roc_auc on labels for binary models): decay not judged"
            )
        return f"no live {m} from {e.live_metric} yet (the labels so far are all one class)"
    if reason is MonitorReason.NO_GATED_VALUE:
        return f"v{e.version} has no gated {m} (tag eval.{m}): decay not judged"
    if reason is MonitorReason.SCORE_DRIFT:
        return (
            f"score PSI {_f(psi_value)} >= {limit} over {e.scores} live scores vs the "
            f"{e.baseline_source} baseline"
        )
    if reason is MonitorReason.SCORES_STABLE:
        return (
            f"score PSI {_f(psi_value)} < {limit} over {e.scores} live scores vs the "
            f"{e.baseline_source} baseline"
        )
    if reason is MonitorReason.TOO_FEW_SCORES:
        where = f" since the {e.baseline_source} baseline" if e.baseline_source else ""
        return f"{e.scores} live scores{where} < min_scores {min_scores}: drift not judged"
    return f"baseline recorded from the first {e.scores} live scores: drift judged from now on"


@dataclass(frozen=True)
class MonitorRule:
    """Decay beyond ``decay_margin`` with ``min_labels`` labels; score PSI at or above
    ``psi`` with ``min_scores`` scores."""

    min_labels: int = 200
    decay_margin: float = 0.03
    psi: float = 0.25
    min_scores: int = 200

    def __post_init__(self) -> None:
        if self.min_labels < 1 or self.min_scores < 1:
            raise ValueError(
                f"min_labels and min_scores must be >= 1, got {self.min_labels}, {self.min_scores}"
            )
        if not 0 <= self.decay_margin <= 1:
            raise ValueError(f"decay_margin must be in [0, 1], got {self.decay_margin}")
        if not self.psi > 0:
            raise ValueError(f"psi must be > 0, got {self.psi}")

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> MonitorRule:
        m = spec.monitor
        margin = m.decay_margin if m.decay_margin is not None else spec.retrain.decay_margin
        return cls(
            min_labels=m.min_labels,
            decay_margin=margin,
            psi=m.score_drift_psi,
            min_scores=m.min_labels,
        )

    def decide(self, e: MonitorEvidence) -> MonitorDecision:
        rule = self.to_dict()
        if e.version is None:
            return MonitorDecision([MonitorReason.NO_CHAMPION], e, rule)
        reasons: list[MonitorReason] = []
        drop = e.metric_drop
        if e.live_metric is None:
            reasons.append(MonitorReason.NO_LIVE_METRIC)
        elif e.labels < self.min_labels:
            reasons.append(MonitorReason.TOO_FEW_LABELS)
        elif e.gated_value is None:
            reasons.append(MonitorReason.NO_GATED_VALUE)
        elif drop is None:
            reasons.append(MonitorReason.NO_LIVE_METRIC)
        elif drop > self.decay_margin:
            reasons.append(MonitorReason.PERFORMANCE_DECAY)
        else:
            reasons.append(MonitorReason.METRIC_HOLDS)
        value = None
        if e.baseline_taken_now:
            reasons.append(MonitorReason.BASELINE_RECORDED)
        elif e.baseline is None or e.live_scores is None or e.scores < self.min_scores:
            reasons.append(MonitorReason.TOO_FEW_SCORES)
        else:
            value = psi(e.baseline, e.live_scores)
            reasons.append(
                MonitorReason.SCORE_DRIFT if value >= self.psi else MonitorReason.SCORES_STABLE
            )
        reasons.sort(key=_ORDER.index)
        return MonitorDecision(reasons, e, rule, value)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def record(
        self, decision: MonitorDecision, context: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        return decisions.record(
            decision, self.to_dict(), {"evidence": decision.evidence.to_dict()}, context
        )


def replay(record: Mapping[str, Any]) -> MonitorDecision:
    decisions.check_version(record, KIND, [RECORD_VERSION], "champion monitor")
    rule = MonitorRule(**record["rule"])
    return rule.decide(MonitorEvidence.from_dict(record["inputs"]["evidence"]))


# -- gathering the evidence (impure: HTTP, MLflow, storage) ---------------------------------


@dataclass(frozen=True)
class Live:
    """The champion's series from one scrape of ``/metrics``."""

    version: str | None
    scores: Histogram  # cumulative, every alias this version answered from
    labels: int  # labelled rows while it was champion
    metric: float | None  # the live metric gauge (champion alias), when exported


def read_live(text: str, spec: ModelSpec) -> Live:
    """The champion's version, scores, labelled rows and live metric from the service's
    metrics text (``spec.name``'s series only)."""
    from prometheus_client.parser import text_string_to_metric_families

    from pipeline.serving.metrics import parse_snapshot

    snap = parse_snapshot(text, spec.name)
    version = snap.serving.get(CHAMPION_ALIAS)
    if version is None:
        return Live(None, Histogram.empty(SCORE_BUCKETS), 0, None)
    series = LIVE_METRICS.get((spec.task.type, spec.primary_metric))
    pos = neg = 0.0
    metric: float | None = None
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            lb = s.labels
            if lb.get("model", spec.name) != spec.name or lb.get("version") != version:
                continue
            if lb.get("alias") != CHAMPION_ALIAS:
                continue
            if s.name == "scoring_labelled_score_count":
                if lb.get("label") == "1":
                    pos += float(s.value)
                else:
                    neg += float(s.value)
            elif series is not None and s.name == series and math.isfinite(float(s.value)):
                metric = float(s.value)
    # binary: a (score, label) pair per row; multiclass: one pair per class of each row,
    # exactly one of them the row's own class
    labels = int(pos + neg) if spec.task.type == "binary" else int(pos)
    return Live(version, snap.stats(version).score, labels, metric)


def scrape_text(url: str, timeout: float = 10.0) -> str:
    import httpx

    target = url.rstrip("/") + "/metrics"
    try:
        resp = httpx.get(target, timeout=timeout)
    except httpx.HTTPError as exc:
        raise ServingUnreachable(
            f"the scoring service did not answer GET {target}: {type(exc).__name__}: {exc}. "
            "Is it running (python -m pipeline serve) and is PIPELINE_SERVING_URL right? "
            "The monitor retries; nothing was judged."
        ) from None
    if resp.status_code != 200:
        raise ServingUnreachable(
            f"GET {target} answered {resp.status_code}: nothing was judged; the monitor retries"
        )
    return resp.text


def monitor_root(spec: ModelSpec) -> str:
    return storage.join(get_settings().storage_root, "monitor", spec.name)


def baseline_uri(spec: ModelSpec, version: str) -> str:
    return storage.join(monitor_root(spec), f"v{version}", "baseline.json")


def record_uri(spec: ModelSpec, run_key: str) -> str:
    from pipeline.names import safe_key

    return storage.join(monitor_root(spec), "records", f"{safe_key(run_key)}.json")


def _version_tags(spec: ModelSpec, version: str) -> dict[str, str]:
    from pipeline import registry

    mv = registry.client().get_model_version(spec.model_name, version)
    return {str(k): str(v) for k, v in (mv.tags or {}).items()}


def gated_value(tags: Mapping[str, str], metric: str) -> float | None:
    raw = tags.get(f"eval.{metric}")
    try:
        v = float(raw) if raw is not None else None
    except ValueError:
        return None
    return v if v is not None and math.isfinite(v) else None


def gate_scores(tags: Mapping[str, str]) -> Histogram | None:
    """The scores the gate saw this version give on the trusted set (its decision record's
    per-row side file), as the service's histogram; None when not recorded/readable."""
    from pipeline import gates, registry

    uri = tags.get("gate.record")
    if not uri:
        return None
    try:
        rec = json.loads(registry.read_artifact(uri))
        inputs = gates.GateInputs.from_record(rec["inputs"], registry.read_artifact)
    except Exception:  # noqa: BLE001 - an unreadable record falls back to the first window
        import logging

        logging.getLogger(__name__).warning(
            "the gate record %s could not be read for a score baseline; "
            "the first live window will be the baseline",
            uri,
            exc_info=True,
        )
        return None
    proba = inputs.challenger_proba
    values = proba[:, 1] if proba.shape[1] == 2 else proba  # binary: the positive class
    return histogram_of(values)


def _write_once_json(uri: str, obj: dict[str, Any]) -> dict[str, Any]:
    """Write ``obj`` unless something is there; what is stored afterwards."""
    try:
        storage.write_text(uri, json.dumps(obj, indent=2, sort_keys=True))
        return obj
    except storage.ObjectExistsError:
        return dict(json.loads(storage.read_text(uri)))


def observe(
    spec: ModelSpec, *, url: str | None = None, rule: MonitorRule | None = None
) -> MonitorEvidence:
    """Scrape the service, read the champion's gated value, take or read its baseline."""
    rule = rule or MonitorRule.from_spec(spec)
    live = read_live(scrape_text(url or get_settings().serving_url), spec)
    series = LIVE_METRICS.get((spec.task.type, spec.primary_metric))
    base = MonitorEvidence(
        model=spec.name,
        version=live.version,
        task=spec.task.type,
        metric=spec.primary_metric,
        direction=spec.direction,
        live_metric=series,
    )
    if live.version is None:
        return base
    tags = _version_tags(spec, live.version)
    uri = baseline_uri(spec, live.version)
    stored: dict[str, Any] | None = None
    taken_now = False
    if storage.exists(uri):
        stored = json.loads(storage.read_text(uri))
    else:
        gate_hist = gate_scores(tags)
        now = datetime.now(UTC).isoformat()
        if gate_hist is not None and gate_hist.total > 0:
            stored = _write_once_json(
                uri,
                {
                    "version": live.version,
                    "source": "gate",
                    "histogram": gate_hist.to_dict(),
                    "record": tags.get("gate.record"),
                    "taken_at": now,
                },
            )
        elif live.scores.total >= rule.min_scores:
            stored = _write_once_json(
                uri,
                {
                    "version": live.version,
                    "source": "first_window",
                    "histogram": live.scores.to_dict(),
                    "cumulative": live.scores.to_dict(),
                    "taken_at": now,
                },
            )
            taken_now = stored.get("cumulative") == live.scores.to_dict()
    baseline = Histogram.from_dict(stored["histogram"]) if stored else None
    window = live.scores
    if stored and stored.get("cumulative") and not taken_now:
        try:  # only the scores after the baseline; a restart reset the counters: all of them
            window = live.scores - Histogram.from_dict(stored["cumulative"])
        except MeasurementError:
            window = live.scores
    return MonitorEvidence(
        model=spec.name,
        version=live.version,
        task=spec.task.type,
        metric=spec.primary_metric,
        direction=spec.direction,
        live_metric=series,
        gated_value=gated_value(tags, spec.primary_metric),
        live_value=live.metric,
        labels=live.labels,
        baseline=baseline,
        baseline_source=stored.get("source") if stored else None,
        live_scores=window,
        baseline_taken_now=taken_now,
    )


@dataclass(frozen=True)
class Watched:
    """One check of the champion: the decision, its record, and where the record is."""

    decision: MonitorDecision
    record: dict[str, Any]
    uri: str | None

    def to_xcom(self) -> dict[str, Any]:
        d = self.decision
        ev = d.evidence
        return {
            "model": ev.model,
            "version": ev.version,
            "verdict": d.verdict.value,
            "reason": d.reason.value,
            "reasons": [r.value for r in d.reasons],
            "decay_reason": d.decay_reason.value if d.decay_reason else None,
            "drift_reason": d.drift_reason.value if d.drift_reason else None,
            "message": d.message,
            "metric": ev.metric,
            "live_value": ev.live_value,
            "gated_value": ev.gated_value,
            "decay_threshold": (
                ev.gated_value - ev.direction * d.rule["decay_margin"]
                if ev.gated_value is not None
                else None
            ),
            "labels": ev.labels,
            "psi": d.psi,
            "psi_threshold": d.rule["psi"],
            "record_uri": self.uri,
        }


def watch(
    spec: ModelSpec,
    *,
    run_key: str | None = None,
    url: str | None = None,
    context: Mapping[str, Any] | None = None,
) -> Watched:
    """Judge the champion now. With ``run_key`` (a DAG run) the record is written once at
    :func:`record_uri`; a retry of that run gets back the recorded decision, so its alert
    and asset event are the ones of the first judgement."""
    uri = record_uri(spec, run_key) if run_key else None
    if uri is not None and storage.exists(uri):
        rec = json.loads(storage.read_text(uri))
        return Watched(replay(rec), rec, uri)
    rule = MonitorRule.from_spec(spec)
    evidence = observe(spec, url=url, rule=rule)
    decision = rule.decide(evidence)
    rec = rule.record(
        decision,
        {
            "model": spec.name,
            "spec": str(spec.path),
            "serving_url": url or get_settings().serving_url,
            "run_key": run_key,
            "baseline_uri": baseline_uri(spec, evidence.version) if evidence.version else None,
            "at": datetime.now(UTC).isoformat(),
            **dict(context or {}),
        },
    )
    if uri is not None:
        rec = _write_once_json(uri, rec)
    return Watched(decision, rec, uri)


def retrain_batch(spec: ModelSpec) -> tuple[str | None, str]:
    """The batch a decay retrain runs on, and why: the most recent batch this model's
    pipeline validated (an MLflow run of the model tagged ``stage.validate_batch.verdict =
    pass``, newest first) that is still in storage. The service keeps no feature rows, only
    scores and labels, so it has no labelled batch of its own to offer; the newest validated
    batch is the freshest data known to pass the contract — a batch landed after it starts
    its own ``retrain_<name>`` run through the same asset."""
    from pipeline import registry
    from pipeline.names import RunTag, Task, stage_verdict_tag

    c = registry.client()
    exp = c.get_experiment_by_name(registry.experiment_name())
    if exp is None:
        return None, f"no MLflow experiment {registry.experiment_name()!r}: nothing validated yet"
    runs = c.search_runs(
        [exp.experiment_id],
        filter_string=(
            f"tags.`{RunTag.MODEL.value}` = '{spec.name}' and "
            f"tags.`{stage_verdict_tag(Task.VALIDATE_BATCH.value)}` = 'pass'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=50,
    )
    for run in runs:
        uri = run.data.tags.get(RunTag.BATCH_URI.value)
        if uri and storage.exists(uri):
            return uri, f"the most recent validated batch (MLflow run {run.info.run_id})"
    return None, (
        f"no validated batch of model {spec.name} is still in storage: land one "
        f"(python -m pipeline data land --model {spec.name} --file PATH) — that starts the "
        "retrain itself"
    )


def retrain_request(
    spec: ModelSpec, watched: Mapping[str, Any]
) -> tuple[dict[str, Any] | None, str]:
    """The asset event's ``extra`` for a decayed champion (``retrain_<name>`` reads
    ``batch_uri``; the rest says why it runs), or None and why there is none. Once per
    champion version (``monitor/<model>/v<version>/retrain_requested.json``, written once):
    decay that persists over later checks keeps its one open alert and does not queue
    retrain after retrain; a new champion is watched afresh."""
    if watched.get("verdict") != MonitorVerdict.DECAYING.value:
        return None, f"verdict {watched.get('verdict')}: no retrain"
    if not spec.monitor.retrain_on_decay:
        return None, f"monitor.retrain_on_decay is off in {spec.path}"
    version = str(watched.get("version"))
    marker = storage.join(monitor_root(spec), f"v{version}", "retrain_requested.json")
    if storage.exists(marker):
        first = json.loads(storage.read_text(marker))
        return None, (
            f"a retrain was already requested for v{version} on {first.get('batch_uri')} "
            f"({first.get('monitor_record')}); not again while this version is champion"
        )
    uri, why = retrain_batch(spec)
    if uri is None:
        return None, why
    extra = {
        "batch_uri": uri,
        "model": spec.name,
        "trigger": "champion_decaying",
        "champion_version": version,
        "monitor_record": watched.get("record_uri"),
        "summary": str(watched.get("message", ""))[:500],
    }
    stored = _write_once_json(marker, extra)  # a retry of the same run writes the same
    if stored != extra:
        return (
            None,
            f"a retrain was already requested for v{version} ({stored.get('monitor_record')})",
        )
    return extra, why


def cmd_monitor(args: Any) -> int:
    """``python -m pipeline monitor --model NAME [--json] [--url URL]``: judge the champion
    now (the record is printed, not stored; the baseline is taken or read as in the DAG).
    Exit 0 healthy or no data, 3 decaying or drifting, 4 when the service did not answer."""
    import sys

    from pipeline.spec import active

    spec = active()
    try:
        watched = watch(spec, url=args.url or None)
    except ServingUnreachable as exc:
        print(f"monitor {spec.name}: {exc}", file=sys.stderr)
        return 4
    if args.json:
        print(json.dumps(watched.record, indent=2, default=str))
    else:
        print(watched.decision.summary())
    bad = (MonitorVerdict.DECAYING, MonitorVerdict.DRIFTING)
    return 3 if watched.decision.verdict in bad else 0


def alerts_for(
    spec: ModelSpec, watched: Mapping[str, Any], links: Mapping[str, str] | None = None
) -> list[Any]:
    """Raise or resolve this model's ``champion_decaying`` alerts from one check, through
    :mod:`pipeline.alerts` (deduplicated there: the same open alert is not sent twice); the
    alerts to send. Decay: subject = the version, severity the kind's default. Score drift:
    subject ``<version>:score_drift``, warning. Each is resolved when its leg is judged
    healthy; a leg with no data changes nothing."""
    from pipeline import alerts

    version = watched.get("version")
    if not version:
        return []
    link = {k: v for k, v in (links or {}).items() if v}
    if watched.get("record_uri"):
        link["monitor_record"] = str(watched["record_uri"])
    link.setdefault("mlflow_version", f"{spec.model_name}/{version}")
    kind = alerts.AlertKind.CHAMPION_DECAYING
    out: list[Any] = []
    decay, drift = watched.get("decay_reason"), watched.get("drift_reason")
    subject, drift_subject = str(version), f"{version}:score_drift"
    if decay == MonitorReason.PERFORMANCE_DECAY.value:
        out.append(
            alerts.raise_alert(
                kind=kind,
                model=spec.name,
                subject=subject,
                summary=str(watched.get("message", "")),
                value=watched.get("live_value"),
                threshold=watched.get("decay_threshold"),
                links=link,
                details={"verdict": watched.get("verdict"), "labels": watched.get("labels")},
                suppress_minutes=spec.alerts.suppress_minutes,
            )
        )
    elif decay == MonitorReason.METRIC_HOLDS.value:
        out.append(
            alerts.resolve_alert(
                kind=kind, model=spec.name, subject=subject, summary=str(watched["message"])
            )
        )
    if drift == MonitorReason.SCORE_DRIFT.value:
        out.append(
            alerts.raise_alert(
                kind=kind,
                model=spec.name,
                subject=drift_subject,
                summary=str(watched.get("message", "")),
                value=watched.get("psi"),
                threshold=watched.get("psi_threshold"),
                links=link,
                severity=alerts.Severity.WARNING,
                details={"verdict": watched.get("verdict"), "leg": "score_drift"},
                suppress_minutes=spec.alerts.suppress_minutes,
            )
        )
    elif drift == MonitorReason.SCORES_STABLE.value:
        out.append(
            alerts.resolve_alert(
                kind=kind, model=spec.name, subject=drift_subject, summary=str(watched["message"])
            )
        )
    return [a for a in out if a is not None]
