"""Canary rollout: traffic steps, canary-vs-champion analysis, and the outcome.

**Plan** (:class:`CanaryPlan`): traffic weights in steps (default 5 %, 25 %, 50 %, 100 %),
each held for an interval; a measurement every ``analysis_interval_s``; after full
promotion a *bake* window. The weight is written to the registry (tag ``canary.weight``,
see :mod:`pipeline.serving.traffic`); the scoring service follows it.

**Measurements** are read from the service's ``/metrics`` over HTTP (Prometheus text,
parsed with ``prometheus_client.parser``): in production real traffic flows and this
code only reads. The service serves every model: a rollout reads only the series
labelled with its own model (``model`` = the active spec's name). A window is the
difference of two scrapes, per version.

**Analysis** (:class:`CanaryAnalysis`, pure): canary vs champion over the same window on

* error rate — fails when the canary's errors are significantly more than the champion's
  rate plus ``max_error_rate_increase`` allows (one-sided binomial test at ``alpha``), which
  can happen before ``min_requests`` (8 errors in 17 requests is decisive; 1 in 20 is not);
* p95 latency — the bound is ``max_latency_p95_ratio`` x the champion's p95, and at least
  ``latency_slack_ms`` above it (ratios of 2 ms latencies are noise); fails when
  significantly more than 5 % of the canary's requests are slower than the bound (the same
  binomial test: robust to the p95 of a few dozen requests on a busy host, and decisive
  early against a real slowdown, from ``min_requests_fail_fast`` requests);
* predicted-score distribution — PSI over bins of equal champion mass, less what sampling
  alone would show at these sample sizes (:func:`psi_noise`), fails above ``max_psi``
  (needs ``min_scores`` rows on both sides);
* the primary metric (ROC AUC) once labels arrived — from the labelled-score histograms
  (``POST /feedback``), cumulative since the canary started; fails when the canary is
  worse by more than ``max_metric_drop`` *and* that excess clears ``metric_z`` standard
  errors (Hanley-McNeil) — a few dozen labels are noisy; skipped (not inconclusive)
  until both sides have ``min_labels_per_class`` of each class.

When the champion saw too little traffic in the window (the 100 % step) the baseline is
the champion's accumulated behaviour since the canary started. A verdict is PASS, FAIL, or
INCONCLUSIVE (too little traffic for the checks that need it).

**Run semantics** (:class:`AnalysisRun`, as Argo Rollouts' AnalysisRun): a FAIL counts
toward ``failure_limit`` (the run fails when failures exceed it; default 0: the first
failure); a measurement that cannot be taken (service down, counters reset) counts
toward ``consecutive_error_limit`` (a good measurement resets it; exceeding it aborts:
an unmeasurable canary is not promoted, it is *aborted*: out of traffic, but not tagged
``rolled_back`` — the model was not judged bad, and a retry may run it again); an
INCONCLUSIVE *step* (the whole step's window)
counts toward ``inconclusive_limit`` and exceeding it **pauses** the rollout for a human
rather than guessing — weight and alias stay where they are, the state is recorded on
the version (``canary.state``) and ``python -m pipeline canary --version V --resume``
(or ``--abort``) continues. Mid-step measurements use the window since the previous
one (fresh faults are seen at once); the end of a step judges the whole step.

**Outcome** (tags ``canary.*`` on the version, the JSON record
``records/canary_rollout.json`` on its run, and the returned dict):

* pass — ``registry.promote_champion`` (compare-and-set) moves ``champion``; the old one
  becomes ``previous_champion``; weight back to 0; alias ``canary`` removed. Then the
  *bake*: the new champion is compared with the previous champion's behaviour recorded
  during the canary (score distribution, error rate, latency, labelled metric); a
  regression rolls back to ``previous_champion`` (:mod:`pipeline.rollback`).
* fail — weight 0 at once, alias ``canary`` removed, version tagged ``rolled_back`` with
  the failed analysis; champion untouched.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from pipeline.serving.metrics import Histogram, MeasurementError, Snapshot, VersionStats

log = logging.getLogger(__name__)

RECORD_KIND = "canary_rollout"


class Verdict(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"


class CanaryReason(StrEnum):
    HEALTHY = "healthy"
    ERROR_RATE = "error_rate"
    LATENCY = "latency_p95"
    SCORE_DISTRIBUTION = "score_psi"
    LABELLED_METRIC = "labelled_roc_auc"
    TOO_LITTLE_TRAFFIC = "too_little_traffic"
    CANARY_REFUSED = "canary_refused_by_service"
    MEASUREMENT_ERRORS = "measurement_errors"
    NO_CHAMPION = "no_champion"
    ABORTED = "aborted"


class RunStatus(StrEnum):
    RUNNING = "running"
    SUCCESSFUL = "successful"
    FAILED = "failed"
    ERROR = "error"
    PAUSED = "paused"


# -- the pure helpers -------------------------------------------------------------------------


def _groups(baseline: Histogram, canary: Histogram, bins: int) -> list[tuple[float, float]]:
    """Adjacent buckets merged into groups holding about 1/``bins`` of the baseline each."""
    b_total = baseline.total
    groups: list[tuple[float, float]] = []
    acc_b = acc_c = 0.0
    for b, c in zip(baseline.counts, canary.counts, strict=True):
        acc_b, acc_c = acc_b + b, acc_c + c
        if acc_b >= b_total / bins:
            groups.append((acc_b, acc_c))
            acc_b = acc_c = 0.0
    if acc_b or acc_c:
        if groups:
            last_b, last_c = groups.pop()
            groups.append((last_b + acc_b, last_c + acc_c))
        else:
            groups.append((acc_b, acc_c))
    return groups


def psi(baseline: Histogram, canary: Histogram, bins: int = 10, eps: float = 1e-4) -> float | None:
    """Population stability index of ``canary`` against ``baseline``, over groups of
    adjacent buckets holding about 1/``bins`` of the baseline each (fine buckets, few
    groups: the statistic's noise grows with the number of groups)."""
    b_total, c_total = baseline.total, canary.total
    if b_total <= 0 or c_total <= 0:
        return None
    out = 0.0
    for b, c in _groups(baseline, canary, bins):
        p, q = max(b / b_total, eps), max(c / c_total, eps)
        out += (q - p) * math.log(q / p)
    return out


def psi_noise(baseline: Histogram, canary: Histogram, bins: int = 10) -> float:
    """What PSI reads with no shift at all, from sampling alone: about
    (groups - 1) x (1/n_baseline + 1/n_canary) (PSI is a symmetric chi-square divergence).
    With 150 canary rows that is ~0.08 — a third of the usual 0.25 bound — so the check
    subtracts it rather than fail good canaries on small samples."""
    b_total, c_total = baseline.total, canary.total
    if b_total <= 0 or c_total <= 0:
        return math.inf
    g = len(_groups(baseline, canary, bins))
    return max(g - 1, 0) * (1 / b_total + 1 / c_total)


def binned_auc(pos: Histogram, neg: Histogram) -> float | None:
    """ROC AUC from score histograms of positives and negatives (ties within a bucket
    count one half): P(score_pos > score_neg)."""
    p_total, n_total = pos.total, neg.total
    if p_total <= 0 or n_total <= 0:
        return None
    above, acc = p_total, 0.0
    for p, n in zip(pos.counts, neg.counts, strict=True):
        above -= p
        acc += n * (above + 0.5 * p)
    return acc / (p_total * n_total)


def auc_se(auc: float, positives: float, negatives: float) -> float:
    """Standard error of a ROC AUC (Hanley & McNeil, 1982)."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (
        auc * (1 - auc) + (positives - 1) * (q1 - auc * auc) + (negatives - 1) * (q2 - auc * auc)
    ) / (positives * negatives)
    return math.sqrt(max(var, 0.0))


def binomial_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p): how surprising k events in n trials are."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0:
        return 0.0
    if p >= 1:
        return 1.0

    def pmf(i: int) -> float:
        return math.exp(
            math.lgamma(n + 1)
            - math.lgamma(i + 1)
            - math.lgamma(n - i + 1)
            + i * math.log(p)
            + (n - i) * math.log1p(-p)
        )

    if k <= n - k:  # the shorter sum: 1 - P(X < k)
        return max(0.0, 1.0 - math.fsum(pmf(i) for i in range(k)))
    return min(1.0, math.fsum(pmf(i) for i in range(k, n + 1)))


def error_rate(s: VersionStats) -> float | None:
    return s.errors / s.requests if s.requests > 0 else None


# -- the decision -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CanaryThresholds:
    max_error_rate_increase: float = 0.01
    alpha: float = 0.01  # significance of the error and latency tests
    max_latency_p95_ratio: float = 1.5
    latency_slack_ms: float = 25.0
    max_psi: float = 0.25
    psi_bins: int = 10
    max_metric_drop: float = 0.03
    metric_z: float = 2.33  # the drop beyond max_metric_drop must clear z standard errors
    min_requests: int = 50
    min_requests_fail_fast: int = 10
    min_scores: int = 200
    min_labels_per_class: int = 20

    def __post_init__(self) -> None:
        if not 0 <= self.max_error_rate_increase < 1:
            raise ValueError(
                f"max_error_rate_increase must be in [0, 1), got {self.max_error_rate_increase}"
            )
        if not 0 < self.alpha < 0.5:
            raise ValueError(f"alpha must be in (0, 0.5), got {self.alpha}")
        if self.max_latency_p95_ratio < 1:
            raise ValueError(
                f"max_latency_p95_ratio must be >= 1, got {self.max_latency_p95_ratio}"
            )
        if self.latency_slack_ms < 0:
            raise ValueError(f"latency_slack_ms must be >= 0, got {self.latency_slack_ms}")
        if self.max_psi <= 0 or self.psi_bins < 2:
            raise ValueError(
                f"max_psi must be > 0 and psi_bins >= 2, got {self.max_psi}, {self.psi_bins}"
            )
        if not 0 <= self.max_metric_drop < 1:
            raise ValueError(f"max_metric_drop must be in [0, 1), got {self.max_metric_drop}")
        if self.metric_z < 0:
            raise ValueError(f"metric_z must be >= 0, got {self.metric_z}")
        if min(self.min_requests, self.min_scores, self.min_labels_per_class) < 1:
            raise ValueError("min_requests, min_scores and min_labels_per_class must be >= 1")
        if not 1 <= self.min_requests_fail_fast <= self.min_requests:
            raise ValueError(
                "min_requests_fail_fast must be in [1, min_requests], got "
                f"{self.min_requests_fail_fast}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Check:
    name: CanaryReason
    passed: bool | None  # None: not judged (too little data)
    canary: float | None
    baseline: float | None
    threshold: str
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "name": self.name.value}


@dataclass(frozen=True)
class CanaryDecision:
    verdict: Verdict
    reason: CanaryReason
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def failed_checks(self) -> list[str]:
        return [c["name"] for c in self.evidence.get("checks", []) if c["passed"] is False]

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict.value,
            "reason": self.reason.value,
            "message": self.message,
            "evidence": self.evidence,
        }


class CanaryAnalysis:
    """Canary vs baseline over one window: ``decide(...) -> CanaryDecision``. Pure."""

    def __init__(self, thresholds: CanaryThresholds | None = None) -> None:
        self.t = thresholds or CanaryThresholds()

    def decide(
        self,
        baseline: VersionStats,
        canary: VersionStats,
        *,
        labelled_baseline: VersionStats | None = None,
        labelled_canary: VersionStats | None = None,
        baseline_kind: str = "same window",
    ) -> CanaryDecision:
        checks = [
            self._errors(baseline, canary),
            self._latency(baseline, canary),
            self._scores(baseline, canary),
            self._labelled(labelled_baseline or baseline, labelled_canary or canary),
        ]
        evidence = {
            "canary": {"requests": canary.requests, "errors": canary.errors, "rows": canary.rows},
            "baseline": {
                "requests": baseline.requests,
                "errors": baseline.errors,
                "rows": baseline.rows,
                "kind": baseline_kind,
            },
            "checks": [c.to_dict() for c in checks],
        }
        failed = [c for c in checks if c.passed is False]
        if failed:
            return CanaryDecision(
                Verdict.FAIL, failed[0].name, "; ".join(c.detail for c in failed), evidence
            )
        # The traffic checks must all have been judged; the labelled one joins when it can.
        unjudged = [c for c in checks[:3] if c.passed is None]
        if unjudged:
            return CanaryDecision(
                Verdict.INCONCLUSIVE,
                CanaryReason.TOO_LITTLE_TRAFFIC,
                "too little traffic to judge: " + "; ".join(c.detail for c in unjudged),
                evidence,
            )
        judged = ", ".join(c.name.value for c in checks if c.passed)
        return CanaryDecision(
            Verdict.PASS, CanaryReason.HEALTHY, f"canary healthy on {judged}", evidence
        )

    def _errors(self, b: VersionStats, c: VersionStats) -> Check:
        t = self.t
        base_rate = error_rate(b) if b.requests >= t.min_requests else None
        base = base_rate or 0.0
        bound = min(base + t.max_error_rate_increase, 1.0)
        thr = f"<= baseline + {t.max_error_rate_increase:.3f} (binomial test, alpha {t.alpha:g})"
        rate = error_rate(c)
        p = binomial_sf(int(round(c.errors)), int(round(c.requests)), bound)
        if c.requests > 0 and p < t.alpha:
            return Check(
                CanaryReason.ERROR_RATE,
                False,
                rate,
                base_rate,
                thr,
                f"canary error rate {rate:.3f} ({c.errors:.0f}/{c.requests:.0f}) vs baseline "
                f"{base:.3f}: significantly over the bound {bound:.3f} (p={p:.2g})",
            )
        if c.requests < t.min_requests or b.requests < t.min_requests:
            return Check(
                CanaryReason.ERROR_RATE,
                None,
                rate,
                base_rate,
                thr,
                f"error rate needs {t.min_requests} requests a side (canary "
                f"{c.requests:.0f}, baseline {b.requests:.0f})",
            )
        return Check(
            CanaryReason.ERROR_RATE,
            True,
            rate,
            base_rate,
            thr,
            f"canary error rate {rate:.3f} vs baseline {base:.3f} (bound {bound:.3f})",
        )

    def _latency(self, b: VersionStats, c: VersionStats) -> Check:
        t = self.t
        thr = (
            f"share of canary requests slower than max({t.max_latency_p95_ratio:g} x baseline "
            f"p95, baseline p95 + {t.latency_slack_ms:g} ms) not significantly over 5 %"
        )
        bp95 = b.latency.quantile(0.95) if b.requests >= t.min_requests else None
        cp95 = c.latency.quantile(0.95)
        ms = lambda v: None if v is None else v * 1000  # noqa: E731
        if bp95 is None:
            return Check(
                CanaryReason.LATENCY,
                None,
                ms(cp95),
                None,
                thr,
                f"latency needs {t.min_requests} baseline requests (got {b.requests:.0f})",
            )
        bound = max(bp95 * t.max_latency_p95_ratio, bp95 + t.latency_slack_ms / 1000)
        n = int(round(c.latency.total))
        slower = int(round(c.latency.count_above(bound)))
        p = binomial_sf(slower, n, 0.05)
        if n >= t.min_requests_fail_fast and p < t.alpha:
            return Check(
                CanaryReason.LATENCY,
                False,
                ms(cp95),
                ms(bp95),
                thr,
                f"canary p95 {ms(cp95):.1f} ms vs baseline {bp95 * 1000:.1f} ms: "
                f"{slower}/{n} canary requests slower than {bound * 1000:.1f} ms "
                f"(p={p:.2g})",
            )
        if n < t.min_requests or cp95 is None:
            return Check(
                CanaryReason.LATENCY,
                None,
                ms(cp95),
                ms(bp95),
                thr,
                f"latency needs {t.min_requests} canary requests (got {n})",
            )
        return Check(
            CanaryReason.LATENCY,
            True,
            ms(cp95),
            ms(bp95),
            thr,
            f"canary p95 {cp95 * 1000:.1f} ms vs baseline {bp95 * 1000:.1f} ms; {slower}/{n} "
            f"slower than {bound * 1000:.1f} ms",
        )

    def _scores(self, b: VersionStats, c: VersionStats) -> Check:
        t = self.t
        thr = f"PSI <= {t.max_psi:g}"
        nb, nc = b.score.total, c.score.total
        if nb < t.min_scores or nc < t.min_scores:
            return Check(
                CanaryReason.SCORE_DISTRIBUTION,
                None,
                None,
                None,
                thr,
                f"score PSI needs {t.min_scores} rows a side (canary {nc:.0f}, baseline {nb:.0f})",
            )
        raw = psi(b.score, c.score, t.psi_bins)
        assert raw is not None
        noise = psi_noise(b.score, c.score, t.psi_bins)
        value = max(raw - noise, 0.0)
        return Check(
            CanaryReason.SCORE_DISTRIBUTION,
            value <= t.max_psi,
            value,
            0.0,
            thr,
            f"predicted-score PSI {value:.3f} (raw {raw:.3f} less {noise:.3f} expected "
            f"from sampling) over {nc:.0f} canary / {nb:.0f} baseline rows "
            f"(bound {t.max_psi:g})",
        )

    def _labelled(self, b: VersionStats, c: VersionStats) -> Check:
        t = self.t
        thr = f"ROC AUC >= baseline - {t.max_metric_drop:g}"
        counts = [
            b.labelled_pos.total,
            b.labelled_neg.total,
            c.labelled_pos.total,
            c.labelled_neg.total,
        ]
        if min(counts) < t.min_labels_per_class:
            return Check(
                CanaryReason.LABELLED_METRIC,
                None,
                None,
                None,
                thr,
                f"labelled metric needs {t.min_labels_per_class} labels of each class a "
                f"side (baseline {counts[0]:.0f}+/{counts[1]:.0f}-, canary "
                f"{counts[2]:.0f}+/{counts[3]:.0f}-)",
            )
        ba, ca = (
            binned_auc(b.labelled_pos, b.labelled_neg),
            binned_auc(c.labelled_pos, c.labelled_neg),
        )
        assert ba is not None and ca is not None
        se = math.hypot(auc_se(ba, counts[0], counts[1]), auc_se(ca, counts[2], counts[3]))
        drop = ba - ca
        ok = drop - t.max_metric_drop <= t.metric_z * se
        return Check(
            CanaryReason.LABELLED_METRIC,
            ok,
            ca,
            ba,
            thr,
            f"canary ROC AUC {ca:.4f} vs baseline {ba:.4f} (drop {drop:+.4f}, s.e. "
            f"{se:.4f}) on {counts[2] + counts[3]:.0f}/{counts[0] + counts[1]:.0f} "
            f"labelled rows; fails when the drop exceeds {t.max_metric_drop:g} by more "
            f"than {t.metric_z:g} s.e.",
        )


# -- the run: Argo-style limits ------------------------------------------------------------


@dataclass(frozen=True)
class AnalysisPolicy:
    failure_limit: int = 0
    consecutive_error_limit: int = 4
    inconclusive_limit: int = 0

    def __post_init__(self) -> None:
        if min(self.failure_limit, self.consecutive_error_limit, self.inconclusive_limit) < 0:
            raise ValueError(
                "failure_limit, consecutive_error_limit and inconclusive_limit must be >= 0"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class AnalysisRun:
    """Counts failures, consecutive measurement errors and inconclusive steps; says when
    the run has failed, errored (abort) or must pause. ``state_dict`` to resume."""

    def __init__(self, policy: AnalysisPolicy | None = None) -> None:
        self.policy = policy or AnalysisPolicy()
        self.failures = 0
        self.consecutive_errors = 0
        self.errors = 0
        self.inconclusives = 0
        self.measurements = 0
        self.status = RunStatus.RUNNING
        self.last: dict[str, Any] | None = None

    def record(self, decision: CanaryDecision, *, final: bool = False) -> RunStatus:
        """One measurement's decision; ``final``: it judges a whole step."""
        self.measurements += 1
        self.consecutive_errors = 0
        self.last = {
            "verdict": decision.verdict.value,
            "reason": decision.reason.value,
            "message": decision.message,
            "final": final,
        }
        if decision.verdict is Verdict.FAIL:
            self.failures += 1
            if self.failures > self.policy.failure_limit:
                self.status = RunStatus.FAILED
        elif decision.verdict is Verdict.INCONCLUSIVE and final:
            self.inconclusives += 1
            if self.inconclusives > self.policy.inconclusive_limit:
                self.status = RunStatus.PAUSED
        return self.status

    def record_error(self, error: str) -> RunStatus:
        self.measurements += 1
        self.errors += 1
        self.consecutive_errors += 1
        self.last = {"verdict": "error", "message": error}
        if self.consecutive_errors > self.policy.consecutive_error_limit:
            self.status = RunStatus.ERROR
        return self.status

    def resume(self) -> None:
        """A human looked at a paused run and said go on: the inconclusive count restarts."""
        if self.status is RunStatus.PAUSED:
            self.status = RunStatus.RUNNING
        self.inconclusives = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy.to_dict(),
            "failures": self.failures,
            "consecutive_errors": self.consecutive_errors,
            "errors": self.errors,
            "inconclusives": self.inconclusives,
            "measurements": self.measurements,
            "status": self.status.value,
            "last": self.last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy = AnalysisPolicy(**state["policy"])
        for k in ("failures", "consecutive_errors", "errors", "inconclusives", "measurements"):
            setattr(self, k, int(state[k]))
        self.status = RunStatus(state["status"])
        self.last = state.get("last")


# -- the plan -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CanaryStep:
    weight: float
    seconds: float


@dataclass(frozen=True)
class CanaryPlan:
    steps: tuple[CanaryStep, ...] = tuple(CanaryStep(w, 300.0) for w in (0.05, 0.25, 0.5, 1.0))
    analysis_interval_s: float = 60.0
    bake_s: float = 600.0
    load_timeout_s: float = 60.0  # for the service to load the canary / apply a weight
    thresholds: CanaryThresholds = field(default_factory=CanaryThresholds)
    policy: AnalysisPolicy = field(default_factory=AnalysisPolicy)

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "steps",
            tuple(s if isinstance(s, CanaryStep) else CanaryStep(*s) for s in self.steps),
        )
        if not self.steps:
            raise ValueError("a canary plan needs at least one step")
        weights = [s.weight for s in self.steps]
        if any(not 0 < w <= 1 for w in weights):
            raise ValueError(f"step weights must be in (0, 1], got {weights}")
        if any(b <= a for a, b in zip(weights, weights[1:], strict=False)):
            raise ValueError(f"step weights must increase, got {weights}")
        if any(s.seconds <= 0 for s in self.steps):
            raise ValueError("every step needs a positive interval")
        if self.analysis_interval_s <= 0:
            raise ValueError(f"analysis_interval_s must be > 0, got {self.analysis_interval_s}")
        if any(s.seconds < self.analysis_interval_s for s in self.steps):
            raise ValueError(
                f"each step must last at least one analysis interval ({self.analysis_interval_s}s)"
            )
        if self.bake_s < 0 or self.load_timeout_s <= 0:
            raise ValueError("bake_s must be >= 0 and load_timeout_s > 0")

    @classmethod
    def from_settings(cls, **overrides: Any) -> CanaryPlan:
        from pipeline.settings import get_settings

        s = get_settings()
        kw: dict[str, Any] = {
            "steps": tuple(CanaryStep(float(w), s.canary_step_seconds) for w in s.canary_steps),
            "analysis_interval_s": s.canary_analysis_interval_seconds,
            "bake_s": s.canary_bake_seconds,
        }
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_spec(cls, spec: Any, **overrides: Any) -> CanaryPlan:
        """The plan of a model spec: its ``canary`` timings where set, else the settings'
        (``PIPELINE_CANARY_*``); ``overrides`` win over both."""
        from pipeline.settings import get_settings

        s, c = get_settings(), spec.canary
        pick = lambda v, default: default if v is None else v  # noqa: E731
        step_s = float(pick(c.step_seconds, s.canary_step_seconds))
        kw: dict[str, Any] = {
            "steps": tuple(CanaryStep(float(w), step_s) for w in pick(c.steps, s.canary_steps)),
            "analysis_interval_s": float(
                pick(c.analysis_interval_seconds, s.canary_analysis_interval_seconds)
            ),
            "bake_s": float(pick(c.bake_seconds, s.canary_bake_seconds)),
        }
        kw.update(overrides)
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": [asdict(s) for s in self.steps],
            "analysis_interval_s": self.analysis_interval_s,
            "bake_s": self.bake_s,
            "load_timeout_s": self.load_timeout_s,
            "thresholds": self.thresholds.to_dict(),
            "policy": self.policy.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CanaryPlan:
        return cls(
            steps=tuple(CanaryStep(**s) for s in d["steps"]),
            analysis_interval_s=d["analysis_interval_s"],
            bake_s=d["bake_s"],
            load_timeout_s=d["load_timeout_s"],
            thresholds=CanaryThresholds(**d["thresholds"]),
            policy=AnalysisPolicy(**d["policy"]),
        )


# -- the rollout (I/O: registry, the service's /metrics) ------------------------------------------


class _Stop(Exception):  # noqa: N818 - control flow inside the rollout
    def __init__(self, verdict: str, reason: CanaryReason, message: str) -> None:
        super().__init__(message)
        self.verdict, self.reason, self.message = verdict, reason, message


class _Rollout:
    def __init__(
        self, version: str, champion: str, plan: CanaryPlan, url: str, run_key: str, actor: str
    ) -> None:
        import httpx

        from pipeline.spec import active

        self.version, self.champion, self.plan, self.url = version, champion, plan, url
        self.run_key, self.actor = run_key, actor
        self.model = active().name  # the service serves many models: read this one's series
        self.analysis = CanaryAnalysis(plan.thresholds)
        self.run = AnalysisRun(plan.policy)
        # a busy service answers /metrics behind its queue of requests: be patient
        self.http = httpx.Client(timeout=max(5.0, min(30.0, plan.analysis_interval_s * 2)))
        self.history: list[dict[str, Any]] = []
        self.step_index = -1
        self.weight = 0.0
        self.phase_start: Snapshot | None = None
        self.last_snapshot: Snapshot | None = None
        self.started = time.monotonic()

    # measurements
    def _scrape(self) -> Snapshot | None:
        from pipeline.serving.metrics import scrape

        try:
            snap = scrape(
                self.url, client=self.http, timeout=self.http.timeout.read or 10.0, model=self.model
            )
        except MeasurementError as exc:
            status = self.run.record_error(str(exc))
            self._note("error", message=str(exc))
            log.warning("canary v%s: measurement error: %s", self.version, exc)
            if status is RunStatus.ERROR:
                raise _Stop(
                    "aborted",
                    CanaryReason.MEASUREMENT_ERRORS,
                    f"{self.run.consecutive_errors} consecutive measurements could not be "
                    f"taken (limit {self.plan.policy.consecutive_error_limit}); last: {exc}",
                ) from None
            return None
        if self.version in snap.refused:
            raise _Stop(
                "rolled_back",
                CanaryReason.CANARY_REFUSED,
                f"the scoring service refused v{self.version}: its checkpoint failed "
                "verification (see /readyz)",
            )
        self.last_snapshot = snap
        return snap

    def _note(self, kind: str, **kw: Any) -> None:
        entry = {
            "t": round(time.monotonic() - self.started, 3),
            "kind": kind,
            "step": self.step_index,
            "weight": self.weight,
            **kw,
        }
        self.history.append(entry)
        del self.history[:-200]

    def _wait_for(self, what: str, ok) -> Snapshot:  # noqa: ANN001
        deadline = time.monotonic() + self.plan.load_timeout_s
        pause = min(0.1, self.plan.analysis_interval_s / 4)
        while True:
            snap = self._scrape()
            if snap is not None and ok(snap):
                return snap
            if time.monotonic() > deadline:
                raise _Stop(
                    "aborted",
                    CanaryReason.MEASUREMENT_ERRORS,
                    f"the scoring service at {self.url} did not {what} within "
                    f"{self.plan.load_timeout_s:g}s",
                )
            time.sleep(pause)

    def _check_registry(self) -> None:
        from pipeline.serving import traffic

        state = traffic.read_state()
        if state.canary != self.version:
            raise _Stop(
                "aborted",
                CanaryReason.ABORTED,
                f"alias canary moved to {state.canary!r} outside this rollout",
            )
        if state.champion != self.champion:
            raise _Stop(
                "aborted",
                CanaryReason.ABORTED,
                f"champion moved to v{state.champion} outside this rollout",
            )

    def _decide(self, snap: Snapshot, since: Snapshot) -> CanaryDecision:
        assert self.phase_start is not None
        base = snap.since(since, self.champion)
        kind = "same window"
        if base.requests < self.plan.thresholds.min_requests:
            base, kind = snap.since(self.phase_start, self.champion), "champion since canary start"
        return self.analysis.decide(
            base,
            snap.since(since, self.version),
            baseline_kind=kind,
            labelled_baseline=snap.since(self.phase_start, self.champion),
            labelled_canary=snap.since(self.phase_start, self.version),
        )

    def _record(self, d: CanaryDecision, *, final: bool) -> RunStatus:
        status = self.run.record(d, final=final)
        self._note(
            "step" if final else "interval",
            verdict=d.verdict.value,
            reason=d.reason.value,
            message=d.message,
        )
        log.info(
            "canary v%s step %d (%g): %s %s — %s",
            self.version,
            self.step_index,
            self.weight,
            "step" if final else "interval",
            d.verdict.value,
            d.message,
        )
        if status is RunStatus.FAILED:
            raise _Stop("rolled_back", d.reason, d.message)
        if status is RunStatus.PAUSED:
            raise _Stop("paused", d.reason, f"paused for a human at {self.weight:.0%}: {d.message}")
        return status

    def steps(self, start: int) -> None:
        from pipeline.serving import traffic

        for idx in range(start, len(self.plan.steps)):
            step = self.plan.steps[idx]
            self.step_index, self.weight = idx, step.weight
            traffic.set_canary_weight(step.weight)
            snap = self._wait_for(
                f"apply weight {step.weight:g}",
                lambda s, w=step.weight: (
                    s.serving.get("canary") == self.version
                    and s.canary_weight is not None
                    and abs(s.canary_weight - w) < 1e-9
                ),
            )
            self._note("weight", message=f"weight {step.weight:g} applied")
            step_start = last = snap
            deadline = time.monotonic() + step.seconds
            # measurements on a fixed cadence (scrape and registry time are not added to it)
            next_at = time.monotonic() + self.plan.analysis_interval_s
            while True:
                time.sleep(max(0.0, min(next_at, deadline) - time.monotonic()))
                next_at = max(
                    next_at + self.plan.analysis_interval_s,
                    time.monotonic() + self.plan.analysis_interval_s / 4,
                )
                snap2 = self._scrape()
                final = time.monotonic() >= deadline - 1e-3
                if snap2 is None:
                    if final:  # the step cannot be judged without a measurement: extend it
                        deadline = time.monotonic() + self.plan.analysis_interval_s
                    continue
                try:
                    interval = self._decide(snap2, last)
                    whole = self._decide(snap2, step_start) if final else None
                except MeasurementError as exc:  # counters reset: the service restarted
                    if self.run.record_error(str(exc)) is RunStatus.ERROR:
                        raise _Stop("aborted", CanaryReason.MEASUREMENT_ERRORS, str(exc)) from None
                    step_start = last = snap2
                    deadline = max(deadline, time.monotonic() + step.seconds)
                    continue
                self._record(interval, final=False)  # raises on failure: rollback at once
                last = snap2
                if whole is not None:
                    self._record(whole, final=True)
                self._check_registry()  # nobody else moved the aliases meanwhile
                if whole is not None:
                    break

    def bake(
        self, baseline: VersionStats, baseline_labelled: VersionStats
    ) -> CanaryDecision | None:
        """New champion vs the previous champion's recorded canary-phase behaviour."""
        if self.plan.bake_s <= 0:
            return None
        self.step_index, self.weight = len(self.plan.steps), 1.0
        run = AnalysisRun(self.plan.policy)
        self.run = run
        try:
            start = self._scrape() or self.last_snapshot
        except _Stop as stop:
            return CanaryDecision(
                Verdict.INCONCLUSIVE, stop.reason, f"bake not judged: {stop.message}"
            )
        assert start is not None and self.phase_start is not None
        last, deadline = start, time.monotonic() + self.plan.bake_s
        decision: CanaryDecision | None = None
        next_at = time.monotonic() + self.plan.analysis_interval_s
        while time.monotonic() < deadline - 1e-3:
            time.sleep(max(0.0, min(next_at, deadline) - time.monotonic()))
            next_at = max(
                next_at + self.plan.analysis_interval_s,
                time.monotonic() + self.plan.analysis_interval_s / 4,
            )
            try:
                snap = self._scrape()
            except _Stop as stop:  # measurement errors in the bake: keep the champion, say so
                return CanaryDecision(
                    Verdict.INCONCLUSIVE, stop.reason, f"bake not judged: {stop.message}"
                )
            if snap is None:
                continue
            final = time.monotonic() >= deadline - 1e-3
            try:
                windows = [(snap.since(last, self.version), False)]
                if final:
                    windows.append((snap.since(start, self.version), True))
                labelled = snap.since(self.phase_start, self.version)
            except MeasurementError as exc:
                run.record_error(str(exc))
                last = start = snap
                continue
            for window, is_final in windows:
                decision = self.analysis.decide(
                    baseline,
                    window,
                    labelled_baseline=baseline_labelled,
                    labelled_canary=labelled,
                    baseline_kind="previous champion, recorded in the canary",
                )
                run.record(decision, final=is_final)
                self._note(
                    "bake",
                    verdict=decision.verdict.value,
                    reason=decision.reason.value,
                    message=decision.message,
                    final=is_final,
                )
                if run.status is RunStatus.FAILED:
                    return decision
            last = snap
        return decision


def run_canary_rollout(
    version: str,
    expected_champion: str | None,
    *,
    plan: CanaryPlan | None = None,
    service_url: str | None = None,
    run_key: str = "cli",
    actor: str | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Canary ``version`` against ``expected_champion`` (the version the gate compared
    against) and promote it or roll it back. Returns the outcome record.

    Raises ``RegistryConflict`` (nothing changed) when the champion is no longer the
    expected one — before any traffic moves, or at the final compare-and-set (then the
    canary is first taken out of traffic)."""
    from pipeline import registry
    from pipeline.serving import traffic
    from pipeline.settings import get_settings
    from pipeline.spec import active

    version = str(version)
    plan = plan or CanaryPlan.from_spec(active())
    url = service_url or get_settings().serving_url
    actor = actor or "unknown"
    mv = registry.client().get_model_version(registry.model_name(), version)
    champ = registry.alias_version(registry.CHAMPION)
    champ_v = str(champ.version) if champ else None
    base: dict[str, Any] = {
        "kind": RECORD_KIND,
        "model_version": version,
        "champion_version": expected_champion,
        "service_url": url,
        "plan": plan.to_dict(),
        "run_key": run_key,
        "actor": actor,
    }
    status = mv.tags.get("canary.status")
    if resume and expected_champion is None:
        expected_champion = mv.tags.get("canary.champion_version")
        base["champion_version"] = expected_champion
    if champ_v == version:
        return {
            **base,
            "verdict": "promoted",
            "reason": status or "already champion",
            "summary": f"v{version} is already champion",
            "idempotent": True,
        }
    if status == "rolled_back" and not resume:
        return {
            **base,
            "verdict": "rolled_back",
            "reason": mv.tags.get("canary.reason", ""),
            "summary": mv.tags.get("canary.summary", "rolled back earlier"),
            "idempotent": True,
        }
    if champ_v != (str(expected_champion) if expected_champion is not None else None):
        saw = f"v{expected_champion}" if expected_champion else "no champion"
        raise registry.RegistryConflict(
            f"champion is v{champ_v}, but the gate compared v{version} against {saw}; "
            "no traffic was moved — re-run the gate against the current champion"
        )
    if champ_v is None:
        replaced = registry.promote_champion(version, None)
        rec = {
            **base,
            "verdict": "promoted",
            "reason": CanaryReason.NO_CHAMPION.value,
            "previous_champion": replaced,
            "summary": f"no champion to compare against: v{version} promoted directly",
        }
        _finish(
            version,
            mv.run_id,
            rec,
            {"canary.status": "promoted", "canary.reason": CanaryReason.NO_CHAMPION.value},
        )
        return rec

    ro = _Rollout(version, champ_v, plan, url, run_key, actor)
    start_step = 0
    if resume and mv.tags.get("canary.state"):
        state = json.loads(mv.tags["canary.state"])
        ro.run.load_state_dict(state["run"])
        ro.run.resume()
        start_step = int(state["step"])
    registry.tag_version(
        version,
        {
            "canary.status": "running",
            "canary.champion_version": champ_v,
            "canary.started_by": actor,
            "canary.run_key": run_key,
        },
    )
    verdict, reason, message = "promoted", CanaryReason.HEALTHY, ""
    previous: str | None = None
    bake: CanaryDecision | None = None
    rolled_back_after_bake: dict[str, Any] | None = None
    baseline = baseline_labelled = None
    try:
        try:
            if not resume or traffic.read_state().canary != version:
                traffic.set_canary_weight(0.0)
                registry.set_alias(traffic.CANARY, version)
            ro.phase_start = ro._wait_for(
                f"load v{version} as canary",
                lambda s: (
                    s.serving.get("canary") == version and s.serving.get("champion") == champ_v
                ),
            )
            ro._note(
                "loaded", message=f"service serves canary v{version} beside champion v{champ_v}"
            )
            ro.steps(start_step)
        except _Stop as stop:
            verdict, reason, message = stop.verdict, stop.reason, stop.message
        snap = ro.last_snapshot
        if snap is not None and ro.phase_start is not None:
            try:
                baseline = snap.since(ro.phase_start, champ_v)
                baseline_labelled = baseline
            except MeasurementError:
                baseline = None
        if verdict == "promoted":
            message = (
                f"v{version} passed {len(plan.steps)} steps "
                f"({', '.join(f'{s.weight:.0%}' for s in plan.steps)}) against champion "
                f"v{champ_v}"
            )
            try:
                previous = registry.promote_champion(version, champ_v)
            except registry.RegistryConflict as exc:
                _out_of_traffic(version)
                registry.tag_version(
                    version, {"canary.status": "conflict", "canary.summary": str(exc)[:4000]}
                )
                raise
            _out_of_traffic(version)
            registry.tag_version(
                version,
                {
                    "promoted_at": _now(),
                    "promoted_by": actor,
                    "promoted.previous_champion": previous or "none",
                },
            )
            if baseline is not None:
                bake = ro.bake(baseline, baseline_labelled or baseline)
                if bake is not None and bake.verdict is Verdict.FAIL:
                    from pipeline.rollback import rollback_champion

                    rolled_back_after_bake = rollback_champion(
                        f"bake regression of v{version}: {bake.message}",
                        target_version=previous,
                        who=f"canary-bake ({actor})",
                        expected_champion=version,
                        run_key=f"{run_key}__bake_rollback",
                        source="canary_bake",
                    )
                    verdict, reason = "rolled_back_after_bake", bake.reason
                    message = f"promoted, then rolled back in the bake: {bake.message}"
        elif verdict == "rolled_back" or verdict == "aborted":
            if verdict == "rolled_back" or traffic.read_state().canary == version:
                _out_of_traffic(version)
        # paused: weight and alias stay; a human resumes or aborts
    except BaseException:
        if verdict != "paused":
            try:
                _out_of_traffic(version)
            except Exception:  # noqa: BLE001 - best effort while failing
                log.exception("could not take v%s out of traffic", version)
        raise
    finally:
        ro.http.close()

    rec = {
        **base,
        "champion_version": champ_v,
        "verdict": verdict,
        "reason": reason.value,
        "summary": message,
        "step_reached": ro.step_index,
        "weight_reached": ro.weight,
        "previous_champion": previous,
        "analysis_run": ro.run.state_dict(),
        "measurements": ro.history,
        "baseline": {"version": champ_v, "stats": baseline.to_dict() if baseline else None},
        "bake": bake.to_dict() if bake else None,
        "rollback": rolled_back_after_bake,
        "seconds": round(time.monotonic() - ro.started, 3),
    }
    tags: dict[str, Any] = {
        "canary.status": {"promoted": "promoted", "paused": "paused", "aborted": "aborted"}.get(
            verdict, "rolled_back"
        ),
        "canary.reason": reason.value,
        "canary.summary": message[:4000],
        "canary.step": ro.step_index,
        "canary.weight_reached": ro.weight,
        "canary.finished_at": _now(),
    }
    if verdict == "rolled_back":
        tags.update(
            {"rolled_back": "true", "rollback_reason": f"canary {reason.value}: {message}"[:4000]}
        )
    if verdict == "paused":
        tags["canary.state"] = json.dumps({"step": ro.step_index, "run": ro.run.state_dict()})[
            :4900
        ]
    if bake is not None:
        tags.update({"bake.verdict": bake.verdict.value, "bake.reason": bake.reason.value})
    _finish(version, mv.run_id, rec, tags)
    return rec


def _out_of_traffic(version: str) -> None:
    """Weight 0 first (the service stops routing at its next poll), then the alias."""
    from pipeline import registry
    from pipeline.serving import traffic

    traffic.set_canary_weight(0.0)
    if traffic.read_state().canary == version:
        registry.delete_alias(traffic.CANARY)


def _finish(version: str, run_id: str | None, rec: dict[str, Any], tags: dict[str, Any]) -> None:
    from pipeline import registry

    registry.tag_version(version, tags)
    if rec.get("verdict") in ("promoted", "rolled_back", "rolled_back_after_bake", "aborted"):
        held = registry.alias_version(registry.CHALLENGER)  # decided: no longer a candidate
        if held is not None and str(held.version) == str(version):
            registry.delete_alias(registry.CHALLENGER)
    if run_id:
        try:
            registry.log_record(run_id, RECORD_KIND, rec)
        except Exception:  # noqa: BLE001 - the tags carry the outcome; the record is the detail
            log.exception("could not log the canary record on run %s", run_id)
    log.info("canary v%s: %s (%s) — %s", version, rec["verdict"], rec["reason"], rec["summary"])


def _now() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat(timespec="seconds")


def abort_canary(version: str, reason: str, who: str = "unknown") -> dict[str, Any]:
    """A human's answer to a paused (or any running) canary: out of traffic, tagged."""
    from pipeline import registry
    from pipeline.errors import PipelineRejection
    from pipeline.serving import traffic

    if len(reason.strip()) < 3:
        raise PipelineRejection("a reason of at least 3 characters is required")
    status = (
        registry.client()
        .get_model_version(registry.model_name(), str(version))
        .tags.get("canary.status")
    )
    if traffic.read_state().canary != str(version) and status not in ("running", "paused"):
        raise PipelineRejection(
            f"v{version} is not a running or paused canary (status {status!r}); nothing changed"
        )
    _out_of_traffic(str(version))
    tags = {
        "canary.status": "rolled_back",
        "canary.reason": CanaryReason.ABORTED.value,
        "canary.summary": f"aborted by {who}: {reason}"[:4000],
        "rolled_back": "true",
        "rollback_reason": f"canary aborted by {who}: {reason}"[:4000],
        "canary.finished_at": _now(),
    }
    mv = registry.client().get_model_version(registry.model_name(), str(version))
    rec = {
        "kind": RECORD_KIND,
        "model_version": str(version),
        "verdict": "rolled_back",
        "reason": CanaryReason.ABORTED.value,
        "summary": tags["canary.summary"],
        "actor": who,
    }
    _finish(str(version), mv.run_id, rec, tags)
    return rec
