"""The canary analysis, pure: canary vs champion over one window, and the run's limits.

Nothing here does I/O or reads the environment at import: the stats come in as
:class:`~pipeline.serving.metrics.VersionStats` (a pure module: ``prometheus_client`` and
``httpx`` are imported there only inside the functions that need them), and
:meth:`CanaryPlan.from_settings` / :meth:`CanaryPlan.from_spec` read the settings when
called. :mod:`pipeline.canary.rollout` does the HTTP and registry work.

**Analysis** (:class:`CanaryAnalysis`): canary vs champion over the same window on

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
the champion's accumulated behaviour since the canary started. A verdict
(``names.CanaryVerdict``) is PASS, FAIL, or INCONCLUSIVE (too little traffic for the checks
that need it).

**The decision protocol** (:mod:`pipeline.decisions`): a :class:`CanaryDecision` is a
``decisions.Decision`` of kind ``canary_analysis``; :func:`decision_record` keeps the
thresholds and the window's stats beside it, and :func:`replay` recomputes it from that
record alone (``decisions.replay(record)`` dispatches here).

**Run semantics** (:class:`AnalysisRun`, as Argo Rollouts' AnalysisRun): a FAIL counts
toward ``failure_limit`` (the run fails when failures exceed it; default 0: the first
failure); a measurement that cannot be taken (service down, counters reset) counts
toward ``consecutive_error_limit`` (a good measurement resets it; exceeding it aborts);
an INCONCLUSIVE *step* (the whole step's window) counts toward ``inconclusive_limit`` and
exceeding it pauses the rollout for a human.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from typing import Any, ClassVar

from pipeline import decisions
from pipeline.names import CanaryVerdict
from pipeline.serving.metrics import Histogram, VersionStats

KIND = "canary_analysis"  # the decision records' kind (decisions.REPLAYERS)
RECORD_VERSION = 1


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

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CanaryThresholds:
        """The inverse of :meth:`to_dict`; an unknown key is an error (it would be a rule
        this code does not apply, and a replay that silently ignored it would mislead)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown canary thresholds: {unknown}")
        return cls(**dict(d))


@dataclass(frozen=True)
class CanaryCheck:
    """One check of one window (error rate, latency, score PSI, labelled metric)."""

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
    """The analysis of one window: a ``decisions.Decision`` of kind ``canary_analysis``."""

    KIND: ClassVar[str] = KIND
    RECORD_VERSION: ClassVar[int] = RECORD_VERSION

    verdict: CanaryVerdict
    reason: CanaryReason
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def failed_checks(self) -> list[str]:
        return [c["name"] for c in self.evidence.get("checks", []) if c["passed"] is False]

    @property
    def reasons(self) -> list[CanaryReason]:
        """The primary reason first, then the other failing checks' reasons in order."""
        rest = (CanaryReason(n) for n in self.failed_checks)
        return [self.reason, *(r for r in rest if r is not self.reason)]

    def to_dict(self) -> dict[str, Any]:
        return decisions.common(self, self.evidence)


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
                CanaryVerdict.FAIL, failed[0].name, "; ".join(c.detail for c in failed), evidence
            )
        # The traffic checks must all have been judged; the labelled one joins when it can.
        unjudged = [c for c in checks[:3] if c.passed is None]
        if unjudged:
            return CanaryDecision(
                CanaryVerdict.INCONCLUSIVE,
                CanaryReason.TOO_LITTLE_TRAFFIC,
                "too little traffic to judge: " + "; ".join(c.detail for c in unjudged),
                evidence,
            )
        judged = ", ".join(c.name.value for c in checks if c.passed)
        return CanaryDecision(
            CanaryVerdict.PASS, CanaryReason.HEALTHY, f"canary healthy on {judged}", evidence
        )

    def _errors(self, b: VersionStats, c: VersionStats) -> CanaryCheck:
        t = self.t
        base_rate = error_rate(b) if b.requests >= t.min_requests else None
        base = base_rate or 0.0
        bound = min(base + t.max_error_rate_increase, 1.0)
        thr = f"<= baseline + {t.max_error_rate_increase:.3f} (binomial test, alpha {t.alpha:g})"
        rate = error_rate(c)
        p = binomial_sf(int(round(c.errors)), int(round(c.requests)), bound)
        if c.requests > 0 and p < t.alpha:
            return CanaryCheck(
                CanaryReason.ERROR_RATE,
                False,
                rate,
                base_rate,
                thr,
                f"canary error rate {rate:.3f} ({c.errors:.0f}/{c.requests:.0f}) vs baseline "
                f"{base:.3f}: significantly over the bound {bound:.3f} (p={p:.2g})",
            )
        if c.requests < t.min_requests or b.requests < t.min_requests:
            return CanaryCheck(
                CanaryReason.ERROR_RATE,
                None,
                rate,
                base_rate,
                thr,
                f"error rate needs {t.min_requests} requests a side (canary "
                f"{c.requests:.0f}, baseline {b.requests:.0f})",
            )
        return CanaryCheck(
            CanaryReason.ERROR_RATE,
            True,
            rate,
            base_rate,
            thr,
            f"canary error rate {rate:.3f} vs baseline {base:.3f} (bound {bound:.3f})",
        )

    def _latency(self, b: VersionStats, c: VersionStats) -> CanaryCheck:
        t = self.t
        thr = (
            f"share of canary requests slower than max({t.max_latency_p95_ratio:g} x baseline "
            f"p95, baseline p95 + {t.latency_slack_ms:g} ms) not significantly over 5 %"
        )
        bp95 = b.latency.quantile(0.95) if b.requests >= t.min_requests else None
        cp95 = c.latency.quantile(0.95)
        ms = lambda v: None if v is None else v * 1000  # noqa: E731
        if bp95 is None:
            return CanaryCheck(
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
            return CanaryCheck(
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
            return CanaryCheck(
                CanaryReason.LATENCY,
                None,
                ms(cp95),
                ms(bp95),
                thr,
                f"latency needs {t.min_requests} canary requests (got {n})",
            )
        return CanaryCheck(
            CanaryReason.LATENCY,
            True,
            ms(cp95),
            ms(bp95),
            thr,
            f"canary p95 {cp95 * 1000:.1f} ms vs baseline {bp95 * 1000:.1f} ms; {slower}/{n} "
            f"slower than {bound * 1000:.1f} ms",
        )

    def _scores(self, b: VersionStats, c: VersionStats) -> CanaryCheck:
        t = self.t
        thr = f"PSI <= {t.max_psi:g}"
        nb, nc = b.score.total, c.score.total
        if nb < t.min_scores or nc < t.min_scores:
            return CanaryCheck(
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
        return CanaryCheck(
            CanaryReason.SCORE_DISTRIBUTION,
            value <= t.max_psi,
            value,
            0.0,
            thr,
            f"predicted-score PSI {value:.3f} (raw {raw:.3f} less {noise:.3f} expected "
            f"from sampling) over {nc:.0f} canary / {nb:.0f} baseline rows "
            f"(bound {t.max_psi:g})",
        )

    def _labelled(self, b: VersionStats, c: VersionStats) -> CanaryCheck:
        t = self.t
        thr = f"ROC AUC >= baseline - {t.max_metric_drop:g}"
        counts = [
            b.labelled_pos.total,
            b.labelled_neg.total,
            c.labelled_pos.total,
            c.labelled_neg.total,
        ]
        if min(counts) < t.min_labels_per_class:
            return CanaryCheck(
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
        return CanaryCheck(
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


# -- the record that replays a decision ---------------------------------------------------------


def decision_record(
    decision: CanaryDecision,
    thresholds: CanaryThresholds,
    baseline: VersionStats,
    canary: VersionStats,
    *,
    labelled_baseline: VersionStats | None = None,
    labelled_canary: VersionStats | None = None,
    baseline_kind: str = "same window",
    context: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``decisions.record`` of one window's decision: the thresholds as the rule, the
    arguments ``CanaryAnalysis(thresholds).decide`` was given as the inputs (stats as
    ``VersionStats.to_dict()``; ``None`` for a labelled side not given), and ``context``
    (where it was made: not replayed)."""

    def _stats(s: VersionStats | None) -> dict[str, Any] | None:
        return None if s is None else s.to_dict()

    return decisions.record(
        decision,
        rule=thresholds.to_dict(),
        inputs={
            "baseline": _stats(baseline),
            "canary": _stats(canary),
            "labelled_baseline": _stats(labelled_baseline),
            "labelled_canary": _stats(labelled_canary),
            "baseline_kind": baseline_kind,
        },
        context=context,
    )


def replay(record: Mapping[str, Any]) -> CanaryDecision:
    """Recompute a ``canary_analysis`` record's decision from its own thresholds and stats
    (``decisions.replay`` dispatches here); any other record is ``NotADecisionRecord``."""
    decisions.check_version(record, KIND, [RECORD_VERSION])
    inputs = record["inputs"]

    def _stats(key: str) -> VersionStats | None:
        value = inputs.get(key)
        return None if value is None else VersionStats.from_dict(value)

    baseline, canary = _stats("baseline"), _stats("canary")
    if baseline is None or canary is None:
        raise decisions.NotADecisionRecord(
            "a canary_analysis record needs the baseline's and the canary's stats"
        )
    return CanaryAnalysis(CanaryThresholds.from_dict(record["rule"])).decide(
        baseline,
        canary,
        labelled_baseline=_stats("labelled_baseline"),
        labelled_canary=_stats("labelled_canary"),
        baseline_kind=str(inputs.get("baseline_kind", "same window")),
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
        if decision.verdict is CanaryVerdict.FAIL:
            self.failures += 1
            if self.failures > self.policy.failure_limit:
                self.status = RunStatus.FAILED
        elif decision.verdict is CanaryVerdict.INCONCLUSIVE and final:
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
