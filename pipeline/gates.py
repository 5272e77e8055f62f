"""The promotion gate: the challenger must beat the champion by a margin.

With no champion, only an absolute floor applies — stated explicitly, never
treated as "champion scored 0". Champion and challenger are always reported
both ways, on the same trusted evaluation set.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any


class GateReason(StrEnum):
    NO_CHAMPION_ABOVE_FLOOR = "no_champion_above_floor"
    BELOW_FLOOR = "below_floor"
    BEATS_CHAMPION = "beats_champion_by_margin"
    NOT_BETTER_THAN_CHAMPION = "not_better_than_champion_by_margin"
    METRIC_MISSING = "metric_missing"


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: GateReason
    metric: str
    challenger: float | None
    champion: float | None
    champion_version: str | None
    margin: float
    floor: float
    message: str

    @property
    def verdict(self) -> str:
        return "promote" if self.promote else "reject"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["reason"] = self.reason.value
        d["verdict"] = self.verdict
        return d


@dataclass(frozen=True)
class PromotionGate:
    metric: str = "roc_auc"
    margin: float = 0.005
    floor: float = 0.7
    higher_is_better: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.margin < 1:
            raise ValueError(f"gate margin must be in [0, 1), got {self.margin}")

    def decide(
        self,
        challenger: dict[str, float],
        champion: dict[str, float] | None,
        champion_version: str | None = None,
    ) -> GateDecision:
        m = self.metric
        c = challenger.get(m)
        ch = champion.get(m) if champion else None

        def out(promote: bool, reason: GateReason, msg: str) -> GateDecision:
            return GateDecision(promote, reason, m, c, ch, champion_version, self.margin, self.floor, msg)

        if c is None:
            return out(False, GateReason.METRIC_MISSING, f"challenger has no {m} on the evaluation set")
        sign = 1 if self.higher_is_better else -1
        if sign * (c - self.floor) < 0:
            return out(False, GateReason.BELOW_FLOOR,
                       f"challenger {m}={c:.4f} is below the floor {self.floor:.4f}")  # fmt: skip
        if champion is None:
            return out(True, GateReason.NO_CHAMPION_ABOVE_FLOOR,
                       f"no champion; challenger {m}={c:.4f} clears the floor {self.floor:.4f}")  # fmt: skip
        if ch is None:
            return out(True, GateReason.NO_CHAMPION_ABOVE_FLOOR,
                       f"champion v{champion_version} has no {m}; challenger clears the floor")  # fmt: skip
        delta = sign * (c - ch)
        if delta >= self.margin:
            return out(True, GateReason.BEATS_CHAMPION,
                       f"challenger {m}={c:.4f} vs champion v{champion_version} {ch:.4f}: "
                       f"+{delta:.4f} >= margin {self.margin:.4f}")  # fmt: skip
        return out(False, GateReason.NOT_BETTER_THAN_CHAMPION,
                   f"challenger {m}={c:.4f} vs champion v{champion_version} {ch:.4f}: "
                   f"{delta:+.4f} < margin {self.margin:.4f}; champion stays")  # fmt: skip
