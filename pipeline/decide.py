"""The retrain decision: a small rule object with an enum of reasons and a pure core.

``RetrainPolicy(...)`` validates its thresholds when built; ``policy.decide(evidence)``
is a pure function of the evidence and returns a :class:`RetrainDecision` — verdict
(``train`` | ``skip``), the reasons (the first is the primary one), the evidence and the
policy — whose record is enough to replay the decision. A skip is a verdict too: it
carries the reason ``nothing_changed`` and a message that names every value that was
below its threshold.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

from pipeline import decisions
from pipeline.names import RetrainVerdict

KIND = "retrain"
RECORD_VERSION = 1


class RetrainReason(StrEnum):
    FORCED = "forced"
    PRODUCTION_DECAY = "production_decay"  # monitor_<model> judged the served champion decayed
    NO_CHAMPION = "no_champion"
    DATASET_DRIFT = "dataset_drift"
    LABEL_SHIFT = "label_shift"
    PERFORMANCE_DECAY = "performance_decay"
    MODEL_TOO_OLD = "model_too_old"
    NOTHING_CHANGED = "nothing_changed"


@dataclass(frozen=True)
class RetrainEvidence:
    has_champion: bool
    dataset_drift: bool | None = None
    drift_share: float | None = None
    label_drifted: bool | None = None
    champion_metric_at_promotion: float | None = None
    champion_metric_on_batch: float | None = None
    champion_age_days: float | None = None
    forced: bool = False
    production_decay: str | None = None  # the monitor's verdict line, when it asked for this run
    metric: str = "roc_auc"
    drift_share_threshold: float | None = None
    drifted_columns: tuple[str, ...] = ()
    direction: int = 1  # +1: the metric is higher-is-better (roc_auc), -1: lower (log_loss)

    def __post_init__(self) -> None:
        if self.drift_share is not None and not 0.0 <= self.drift_share <= 1.0:
            raise ValueError(f"drift_share must be in [0, 1], got {self.drift_share}")
        for name in (
            "champion_metric_at_promotion",
            "champion_metric_on_batch",
            "champion_age_days",
        ):
            v = getattr(self, name)
            if v is not None and not math.isfinite(v):
                raise ValueError(f"{name} must be finite or None, got {v}")
        if self.champion_age_days is not None and self.champion_age_days < 0:
            raise ValueError(f"champion_age_days must be >= 0, got {self.champion_age_days}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["drifted_columns"] = list(self.drifted_columns)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RetrainEvidence:
        return cls(**{**d, "drifted_columns": tuple(d.get("drifted_columns") or ())})

    @property
    def metric_drop(self) -> float | None:
        if self.champion_metric_at_promotion is None or self.champion_metric_on_batch is None:
            return None
        return self.direction * (self.champion_metric_at_promotion - self.champion_metric_on_batch)


@dataclass(frozen=True)
class RetrainDecision:
    KIND: ClassVar[str] = KIND
    RECORD_VERSION: ClassVar[int] = RECORD_VERSION

    retrain: bool
    reasons: list[RetrainReason]
    evidence: RetrainEvidence
    policy: dict[str, Any] = field(default_factory=dict)

    @property
    def verdict(self) -> RetrainVerdict:
        return RetrainVerdict.TRAIN if self.retrain else RetrainVerdict.SKIP

    @property
    def reason(self) -> RetrainReason:
        """The primary reason (the first that applied)."""
        return self.reasons[0]

    @property
    def message(self) -> str:
        """Every reason with the value and the threshold behind it."""
        return "; ".join(_explain(r, self.evidence, self.policy) for r in self.reasons)

    def to_dict(self) -> dict[str, Any]:
        return {**decisions.common(self, self.evidence.to_dict()), "policy": self.policy}

    def summary(self) -> str:
        return (
            f"{self.verdict.value}: "
            + ", ".join(r.value for r in self.reasons)
            + f" — {self.message}"
        )


def _explain(reason: RetrainReason, e: RetrainEvidence, policy: dict[str, Any]) -> str:
    m, margin, max_age = e.metric, policy.get("decay_margin"), policy.get("max_model_age_days")
    share = f"{e.drift_share:.2f}" if e.drift_share is not None else "n/a"
    limit = (
        f"{e.drift_share_threshold:.2f}" if e.drift_share_threshold is not None else "the threshold"
    )
    if reason is RetrainReason.FORCED:
        return "forced by the trigger"
    if reason is RetrainReason.PRODUCTION_DECAY:
        return f"the monitor judged the served champion decayed: {e.production_decay}"
    if reason is RetrainReason.NO_CHAMPION:
        return "no champion yet: the first model is trained"
    if reason is RetrainReason.DATASET_DRIFT:
        cols = f" ({', '.join(e.drifted_columns)})" if e.drifted_columns else ""
        return f"dataset drift: drifted feature share {share} >= {limit}{cols}"
    if reason is RetrainReason.LABEL_SHIFT:
        return "the label prior shifted"
    if reason is RetrainReason.PERFORMANCE_DECAY:
        return (
            f"champion {m} {e.champion_metric_at_promotion:.4f} at promotion -> "
            f"{e.champion_metric_on_batch:.4f} on this batch, drop {e.metric_drop:.4f} > "
            f"margin {margin}"
        )
    if reason is RetrainReason.MODEL_TOO_OLD:
        return f"champion is {e.champion_age_days:.1f} days old > {max_age} days"
    parts = [
        f"no dataset drift (share {share} < {limit})"
        if e.dataset_drift is not None
        else "drift not measured"
    ]
    if e.label_drifted is not None:
        parts.append(
            "label prior stable" if not e.label_drifted else "label shift ignored by policy"
        )
    drop = e.metric_drop
    if drop is not None:
        parts.append(
            f"champion {m} {e.champion_metric_at_promotion:.4f} -> "
            f"{e.champion_metric_on_batch:.4f} (drop {drop:.4f} <= margin {margin})"
        )
    else:
        parts.append(f"champion {m} on this batch not measurable")
    if e.champion_age_days is not None:
        parts.append(f"age {e.champion_age_days:.1f} <= {max_age} days")
    return ", ".join(parts)


@dataclass(frozen=True)
class RetrainPolicy:
    """Retrain on drift, label shift, decay beyond ``decay_margin``, age, or when forced."""

    decay_margin: float = 0.03
    max_model_age_days: float = 30.0
    retrain_on_drift: bool = True
    retrain_on_label_shift: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.decay_margin < 1:
            raise ValueError(f"decay_margin must be in [0, 1), got {self.decay_margin}")
        if not self.max_model_age_days > 0:
            raise ValueError(f"max_model_age_days must be > 0, got {self.max_model_age_days}")

    def decide(self, e: RetrainEvidence) -> RetrainDecision:
        reasons: list[RetrainReason] = []
        if e.forced:
            reasons.append(RetrainReason.FORCED)
        if e.production_decay:
            reasons.append(RetrainReason.PRODUCTION_DECAY)
        if not e.has_champion:
            reasons.append(RetrainReason.NO_CHAMPION)
        if self.retrain_on_drift and e.dataset_drift:
            reasons.append(RetrainReason.DATASET_DRIFT)
        if self.retrain_on_label_shift and e.label_drifted:
            reasons.append(RetrainReason.LABEL_SHIFT)
        drop = e.metric_drop
        if drop is not None and drop > self.decay_margin:
            reasons.append(RetrainReason.PERFORMANCE_DECAY)
        if e.champion_age_days is not None and e.champion_age_days > self.max_model_age_days:
            reasons.append(RetrainReason.MODEL_TOO_OLD)
        retrain = bool(reasons)
        return RetrainDecision(retrain, reasons or [RetrainReason.NOTHING_CHANGED], e, asdict(self))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def record(
        self, decision: RetrainDecision, context: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """The replayable record: these thresholds, the evidence, the decision."""
        return decisions.record(
            decision, self.to_dict(), {"evidence": decision.evidence.to_dict()}, context
        )


def replay(record: Mapping[str, Any]) -> RetrainDecision:
    decisions.check_version(record, KIND, [RECORD_VERSION])
    policy = RetrainPolicy(**record["rule"])
    return policy.decide(RetrainEvidence.from_dict(record["inputs"]["evidence"]))
