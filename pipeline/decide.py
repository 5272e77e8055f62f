"""The retrain decision: a small rule object with an enum of reasons and a pure core."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class RetrainReason(StrEnum):
    FORCED = "forced"
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


@dataclass(frozen=True)
class RetrainDecision:
    retrain: bool
    reasons: list[RetrainReason]
    evidence: RetrainEvidence
    policy: dict[str, Any] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return "train" if self.retrain else "skip"

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "reasons": [r.value for r in self.reasons],
                "evidence": asdict(self.evidence), "policy": self.policy}  # fmt: skip

    def summary(self) -> str:
        return f"{self.verdict}: " + ", ".join(r.value for r in self.reasons)


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
        if self.max_model_age_days <= 0:
            raise ValueError(f"max_model_age_days must be > 0, got {self.max_model_age_days}")

    def decide(self, e: RetrainEvidence) -> RetrainDecision:
        reasons: list[RetrainReason] = []
        if e.forced:
            reasons.append(RetrainReason.FORCED)
        if not e.has_champion:
            reasons.append(RetrainReason.NO_CHAMPION)
        if self.retrain_on_drift and e.dataset_drift:
            reasons.append(RetrainReason.DATASET_DRIFT)
        if self.retrain_on_label_shift and e.label_drifted:
            reasons.append(RetrainReason.LABEL_SHIFT)
        if (
            e.champion_metric_at_promotion is not None
            and e.champion_metric_on_batch is not None
            and e.champion_metric_at_promotion - e.champion_metric_on_batch > self.decay_margin
        ):
            reasons.append(RetrainReason.PERFORMANCE_DECAY)
        if e.champion_age_days is not None and e.champion_age_days > self.max_model_age_days:
            reasons.append(RetrainReason.MODEL_TOO_OLD)
        retrain = bool(reasons)
        return RetrainDecision(
            retrain, reasons or [RetrainReason.NOTHING_CHANGED], e, asdict(self)
        )
