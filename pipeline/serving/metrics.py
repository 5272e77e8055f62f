"""The scoring service's Prometheus metrics, and the reader the canary analysis uses.

Every series carries ``model`` (the model spec's name, e.g. ``card_fraud``: one service
serves every model); per-slot series add ``alias`` = the slot that answered and
``version`` = the model version (versions are numbered per registered model, so a
version means something only beside its ``model``):

=====================================  =========  =====================================
``scoring_requests_total``             counter    requests answered by a model (2xx/5xx)
``scoring_errors_total``               counter    of those, the ones that failed (5xx)
``scoring_rows_total``                 counter    rows scored
``scoring_request_latency_seconds``    histogram  handler time, fault latency included
``scoring_predicted_score``            histogram  binary: the positive-class probability
                                                  per row; multiclass: every class's
                                                  probability (rows x classes values)
``scoring_labelled_score``             histogram  the same, for rows whose label arrived
                                                  (extra label ``label`` = "1" | "0":
                                                  multiclass, one-vs-rest: "1" for the
                                                  true class's probability)
``scoring_labelled_roc_auc``           gauge      exact ROC AUC over the last labels
                                                  (multiclass: micro-averaged one-vs-rest)
``scoring_model_info``                 gauge      1 per slot now serving (+ manifest)
``scoring_canary_weight``              gauge      the weight applied (0 when no canary)
``scoring_model_refused``              gauge      1 per version refused while it stands
``scoring_refusals_total``             counter    refusals to serve a version, by
                                                  ``alias`` and ``reason`` (rejected,
                                                  rolled_back, not_gated,
                                                  manifest_mismatch, model_code,
                                                  verification_failed, ...: see
                                                  ``service.RefusalReason``)
``scoring_fault_active``               gauge      1 per version with an injected fault
``scoring_rejected_requests_total``    counter    400/401/403/404/409/413/422 answers
                                                  (never a model's fault; ``model=""``:
                                                  no model named, or an unknown one)
``scoring_registry_polls_total``       counter    registry polls, by ``result``
``scoring_feedback_total``             counter    feedback rows, by ``result`` (matched,
                                                  unknown, forged, duplicate,
                                                  mismatched, held_back; with
                                                  replicas: forwarded, misrouted,
                                                  unreachable)
=====================================  =========  =====================================

Bad input is refused before routing, so it never counts against a model. Windows are
differences of two scrapes (:meth:`Snapshot.since`): a counter that went backwards (the
service restarted) makes the measurement impossible rather than wrong. A reader passes
``model`` to :func:`parse_snapshot` / :func:`scrape` to see one model's series only.
Several replicas are read by :class:`pipeline.serving.replicas.ReplicaSet` and summed by
:func:`merge_snapshots`; their windows are taken replica by replica.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

# Positive-class probability: resolved at both tails, where fraud scores live.
SCORE_BUCKETS: tuple[float, ...] = (
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.6,
    0.7,
    0.8,
    0.85,
    0.9,
    0.95,
    0.98,
    0.99,
    0.995,
    0.999,
    1.0,
)
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0015,
    0.002,
    0.003,
    0.004,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
)
PREFIX = "scoring_"


class MeasurementError(RuntimeError):
    """A measurement that cannot be taken (service down, reset counters, bad text)."""


# -- service side ---------------------------------------------------------------------------


class ServiceMetrics:
    """All series of one service instance, on its own registry (several apps can share a
    process, as in tests and the benchmark)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry(auto_describe=False)
        av = ["model", "alias", "version"]
        mv = ["model", "version"]
        self.requests = Counter("scoring_requests", "Requests answered by a model.", av, registry=r)
        self.errors = Counter("scoring_errors", "Requests a model failed (5xx).", av, registry=r)
        self.rows = Counter("scoring_rows", "Rows scored.", av, registry=r)
        self.latency = Histogram(
            "scoring_request_latency_seconds",
            "Handler latency.",
            av,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.score = Histogram(
            "scoring_predicted_score",
            "Predicted probability per row (binary: positive class; multiclass: every class).",
            av,
            buckets=SCORE_BUCKETS,
            registry=r,
        )
        self.labelled = Histogram(
            "scoring_labelled_score",
            "Predicted score of labelled rows.",
            [*av, "label"],
            buckets=SCORE_BUCKETS,
            registry=r,
        )
        self.auc = Gauge(
            "scoring_labelled_roc_auc", "ROC AUC over the most recent labels.", av, registry=r
        )
        self.info = Gauge(
            "scoring_model_info",
            "1 for each slot now serving.",
            [*av, "manifest_sha256"],
            registry=r,
        )
        self.weight = Gauge(
            "scoring_canary_weight", "Canary traffic weight applied.", ["model"], registry=r
        )
        self.refused = Gauge(
            "scoring_model_refused", "1 per version refused while it stands.", mv, registry=r
        )
        self.refusals = Counter(
            "scoring_refusals",
            "Refusals to serve a version, by alias and reason.",
            [*av, "reason"],
            registry=r,
        )
        self.fault = Gauge(
            "scoring_fault_active", "1 per version with an injected fault.", mv, registry=r
        )
        self.rejected = Counter(
            "scoring_rejected_requests",
            "Requests refused as bad input.",
            ["model", "status"],
            registry=r,
        )
        self.polls = Counter(
            "scoring_registry_polls", "Registry polls.", ["model", "result"], registry=r
        )
        self.feedback = Counter(
            "scoring_feedback", "Feedback rows.", ["model", "result"], registry=r
        )

    def slot(self, model: str, alias: str, version: str) -> SlotMetrics:
        k = (model, alias, version)
        return SlotMetrics(
            self.requests.labels(*k),
            self.errors.labels(*k),
            self.rows.labels(*k),
            self.latency.labels(*k),
            self.score.labels(*k),
        )

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def observe_many(histogram: Any, values: Any) -> None:
    """``histogram.observe(v)`` for each of ``values`` (a prometheus_client Histogram
    child), counted per bucket at once: one ``inc`` per bucket hit and one for the sum,
    instead of a locked Python call per value (a 256-row request observes 256 scores).
    The buckets and the sum end as ``observe`` leaves them (the sum up to rounding).
    Falls back to ``observe`` per value where the client's internals differ."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64).reshape(-1)
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total: Any = getattr(histogram, "_sum", None)
    if (
        not isinstance(bounds, list)
        or not isinstance(buckets, list)
        or len(buckets) != len(bounds)
        or not hasattr(total, "inc")
        or np.isnan(v).any()
    ):
        for x in v.tolist():
            histogram.observe(x)
        return
    if v.size == 0:
        return
    # observe: the first bucket whose bound >= the value (the last bound is +Inf)
    counts = np.bincount(np.searchsorted(bounds, v, side="left"), minlength=len(bounds))
    total.inc(float(v.sum()))
    for i in np.flatnonzero(counts).tolist():
        buckets[i].inc(int(counts[i]))


@dataclass(frozen=True)
class SlotMetrics:
    """The children of one (model, alias, version), bound once so a request pays no label lookup."""

    requests: Any
    errors: Any
    rows: Any
    latency: Any
    score: Any


# -- reader side (the canary analysis) -----------------------------------------------------


@dataclass(frozen=True)
class Histogram:
    """Bucket upper bounds (+Inf last) and *non-cumulative* counts per bucket."""

    bounds: tuple[float, ...]
    counts: tuple[float, ...]

    @classmethod
    def empty(cls, bounds: Iterable[float]) -> Histogram:
        b = tuple(bounds)
        if not b or b[-1] != math.inf:
            b = (*b, math.inf)
        return cls(b, tuple(0.0 for _ in b))

    @property
    def total(self) -> float:
        return float(sum(self.counts))

    def __add__(self, other: Histogram) -> Histogram:
        self._same(other)
        return Histogram(
            self.bounds, tuple(a + b for a, b in zip(self.counts, other.counts, strict=True))
        )

    def __sub__(self, other: Histogram) -> Histogram:
        self._same(other)
        diff = tuple(a - b for a, b in zip(self.counts, other.counts, strict=True))
        if any(d < -1e-9 for d in diff):
            raise MeasurementError("a histogram went backwards: the service restarted")
        return Histogram(self.bounds, tuple(max(d, 0.0) for d in diff))

    def _same(self, other: Histogram) -> None:
        if self.bounds != other.bounds:
            raise MeasurementError(f"bucket bounds differ: {self.bounds} vs {other.bounds}")

    def count_above(self, value: float) -> float:
        """Observations certainly above ``value``: those in buckets whose lower edge is >= it."""
        lower, out = 0.0, 0.0
        for upper, c in zip(self.bounds, self.counts, strict=True):
            if lower >= value:
                out += c
            lower = upper
        return out

    def quantile(self, q: float) -> float | None:
        """Prometheus ``histogram_quantile``: linear inside the bucket; None when empty."""
        total = self.total
        if total <= 0:
            return None
        rank, seen, lower = q * total, 0.0, 0.0
        for upper, c in zip(self.bounds, self.counts, strict=True):
            if c > 0 and seen + c >= rank:
                if math.isinf(upper):
                    return lower  # the highest finite bound, as Prometheus does
                return lower + (upper - lower) * (rank - seen) / c
            seen += c
            lower = upper if not math.isinf(upper) else lower
        return lower

    def to_dict(self) -> dict[str, Any]:
        return {
            "bounds": [b if math.isfinite(b) else "+Inf" for b in self.bounds],
            "counts": list(self.counts),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Histogram:
        return cls(
            tuple(math.inf if b == "+Inf" else float(b) for b in d["bounds"]),
            tuple(float(c) for c in d["counts"]),
        )


@dataclass(frozen=True)
class VersionStats:
    """Everything one version did (over all slots it answered from), cumulative or a window."""

    requests: float = 0.0
    errors: float = 0.0
    rows: float = 0.0
    latency: Histogram = field(default_factory=lambda: Histogram.empty(LATENCY_BUCKETS))
    score: Histogram = field(default_factory=lambda: Histogram.empty(SCORE_BUCKETS))
    labelled_pos: Histogram = field(default_factory=lambda: Histogram.empty(SCORE_BUCKETS))
    labelled_neg: Histogram = field(default_factory=lambda: Histogram.empty(SCORE_BUCKETS))

    def __add__(self, o: VersionStats) -> VersionStats:
        return VersionStats(
            self.requests + o.requests,
            self.errors + o.errors,
            self.rows + o.rows,
            self.latency + o.latency,
            self.score + o.score,
            self.labelled_pos + o.labelled_pos,
            self.labelled_neg + o.labelled_neg,
        )

    def __sub__(self, o: VersionStats) -> VersionStats:
        if (
            self.requests < o.requests - 1e-9
            or self.errors < o.errors - 1e-9
            or self.rows < o.rows - 1e-9
        ):
            raise MeasurementError("a counter went backwards: the service restarted")
        return VersionStats(
            self.requests - o.requests,
            self.errors - o.errors,
            self.rows - o.rows,
            self.latency - o.latency,
            self.score - o.score,
            self.labelled_pos - o.labelled_pos,
            self.labelled_neg - o.labelled_neg,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "rows": self.rows,
            "latency": self.latency.to_dict(),
            "score": self.score.to_dict(),
            "labelled_pos": self.labelled_pos.to_dict(),
            "labelled_neg": self.labelled_neg.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VersionStats:
        return cls(
            float(d["requests"]),
            float(d["errors"]),
            float(d["rows"]),
            Histogram.from_dict(d["latency"]),
            Histogram.from_dict(d["score"]),
            Histogram.from_dict(d["labelled_pos"]),
            Histogram.from_dict(d["labelled_neg"]),
        )


@dataclass(frozen=True)
class Snapshot:
    """One scrape of ``/metrics``: cumulative stats per version and what is serving.
    ``parts``: the replicas' own snapshots when this one sums several
    (:func:`merge_snapshots`), by base URL; empty for a single scrape."""

    versions: dict[str, VersionStats]
    serving: dict[str, str]  # alias -> version
    canary_weight: float | None
    refused: frozenset[str]
    faults: frozenset[str]
    parts: dict[str, Snapshot] = field(default_factory=dict)

    def stats(self, version: str) -> VersionStats:
        return self.versions.get(str(version), VersionStats())

    def since(self, earlier: Snapshot, version: str) -> VersionStats:
        """What ``version`` did between ``earlier`` and this scrape. Over replicas: replica
        by replica, then summed, so one replica's reset is seen even while the others'
        growth would hide it in a sum; a different set of replicas in the two scrapes
        makes the window unmeasurable (MeasurementError)."""
        if not self.parts and not earlier.parts:
            return self.stats(version) - earlier.stats(version)
        now = self.parts or {"(one scrape)": self}
        then = earlier.parts or {"(one scrape)": earlier}
        if set(now) != set(then):
            gone, new = sorted(set(then) - set(now)), sorted(set(now) - set(then))
            raise MeasurementError(
                "the scoring replicas changed between the two measurements (gone: "
                f"{gone or 'none'}; new: {new or 'none'}): this window cannot be measured, "
                "the next one can"
            )
        total = VersionStats()
        for url in sorted(now):
            try:
                total = total + now[url].since(then[url], version)
            except MeasurementError as exc:
                raise MeasurementError(f"replica {url}: {exc}") from None
        return total


def merge_snapshots(parts: dict[str, Snapshot]) -> Snapshot:
    """Several replicas' scrapes (by base URL) as one service: counters and histograms
    summed per version; an alias counts as serving a version, and the canary weight as
    applied, only when every replica says so (a rollout waits for all of them); a version
    refused, or with a fault, on any replica is so for the service."""
    if not parts:
        raise MeasurementError("no scoring replica to measure")
    snaps = list(parts.values())
    versions: dict[str, VersionStats] = {}
    for snap in snaps:
        for v, st in snap.versions.items():
            versions[v] = versions[v] + st if v in versions else st
    serving: dict[str, str] = {}
    for alias in sorted({a for snap in snaps for a in snap.serving}):
        seen = {snap.serving.get(alias) for snap in snaps}
        if len(seen) == 1 and None not in seen:
            serving[alias] = str(seen.pop())
    weights = {snap.canary_weight for snap in snaps}
    weight = weights.pop() if len(weights) == 1 else None
    return Snapshot(
        versions,
        serving,
        weight,
        frozenset().union(*(snap.refused for snap in snaps)),
        frozenset().union(*(snap.faults for snap in snaps)),
        parts=dict(parts),
    )


def _cumulative_to_hist(buckets: dict[float, float]) -> Histogram:
    bounds = tuple(sorted(buckets))
    cum = [buckets[b] for b in bounds]
    counts = tuple(c - p for c, p in zip(cum, [0.0, *cum[:-1]], strict=True))
    return Histogram(bounds, tuple(max(c, 0.0) for c in counts))


def parse_snapshot(text: str, model: str | None = None) -> Snapshot:
    """Parse the service's Prometheus text (``prometheus_client.parser``).

    ``model``: only that model's series (a series without a ``model`` label, from a
    single-model service, counts as that model's). None: every series, summed by version
    (meaningful only when one model is served)."""
    from prometheus_client.parser import text_string_to_metric_families

    scalars: dict[str, dict[str, float]] = {}
    hists: dict[tuple[str, str], dict[float, float]] = {}
    serving: dict[str, str] = {}
    weight: float | None = None
    refused: set[str] = set()
    faults: set[str] = set()
    try:
        families = list(text_string_to_metric_families(text))
    except Exception as exc:  # noqa: BLE001 - any parse failure is a failed measurement
        raise MeasurementError(f"metrics text does not parse: {exc}") from None
    for fam in families:
        for s in fam.samples:
            name, labels, value = s.name, s.labels, float(s.value)
            if not name.startswith(PREFIX):
                continue
            if model is not None and labels.get("model", model) != model:
                continue
            short = name[len(PREFIX) :]
            v = labels.get("version", "")
            if short in ("requests_total", "errors_total", "rows_total"):
                scalars.setdefault(v, {})
                scalars[v][short] = scalars[v].get(short, 0.0) + value
            elif short.endswith("_bucket") and short[: -len("_bucket")] in (
                "request_latency_seconds",
                "predicted_score",
                "labelled_score",
            ):
                base = short[: -len("_bucket")]
                if base == "labelled_score":
                    base = "labelled_pos" if labels.get("label") == "1" else "labelled_neg"
                le = float(labels["le"])
                h = hists.setdefault((v, base), {})
                h[le] = h.get(le, 0.0) + value
            elif short == "model_info" and value > 0:
                serving[labels["alias"]] = v
            elif short == "canary_weight":
                weight = value
            elif short == "model_refused" and value > 0:
                refused.add(v)
            elif short == "fault_active" and value > 0:
                faults.add(v)
    versions: dict[str, VersionStats] = {}
    for v in set(scalars) | {k[0] for k in hists}:
        sc = scalars.get(v, {})
        kw: dict[str, Any] = {}
        for base, key in (
            ("request_latency_seconds", "latency"),
            ("predicted_score", "score"),
            ("labelled_pos", "labelled_pos"),
            ("labelled_neg", "labelled_neg"),
        ):
            if (v, base) in hists:
                kw[key] = _cumulative_to_hist(hists[(v, base)])
        versions[v] = VersionStats(
            sc.get("requests_total", 0.0),
            sc.get("errors_total", 0.0),
            sc.get("rows_total", 0.0),
            **kw,
        )
    return Snapshot(versions, serving, weight, frozenset(refused), frozenset(faults))


def scrape(
    base_url: str, *, timeout: float = 5.0, client: Any = None, model: str | None = None
) -> Snapshot:
    """GET ``<base_url>/metrics`` and parse it (``model``: that model's series only); any
    failure is a MeasurementError."""
    import httpx

    url = base_url.rstrip("/") + "/metrics"
    try:
        if client is not None:
            resp = client.get(url, timeout=timeout)
        else:
            resp = httpx.get(url, timeout=timeout)
    except httpx.HTTPError as exc:
        raise MeasurementError(f"GET {url} failed: {type(exc).__name__}: {exc}") from None
    if resp.status_code != 200:
        raise MeasurementError(f"GET {url} answered {resp.status_code}")
    return parse_snapshot(resp.text, model)
