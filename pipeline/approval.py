"""The human approval, as a decision like the others: a rule, evidence, a verdict.

When a model's policy requires approval, the DAG's ``approve_promotion`` task (Airflow's
human-in-the-loop operator) asks a reviewer to pick Approve or Reject after reading the gate
report; no answer before the timeout picks the default, Reject. :class:`ApprovalRule`
judges that answer: only exactly ``["Approve"]`` approves. The decision is recorded (who,
when, what they chose, their comment) and replays from its record like the stopper, the
retrain trigger, the gate and the canary analysis (``pipeline.decisions``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any, ClassVar

from pipeline import decisions
from pipeline.names import APPROVE_OPTION, REJECT_OPTION, ApprovalVerdict

KIND = "human_approval"
RECORD_VERSION = 1


class ApprovalReason(StrEnum):
    APPROVED = "approved"
    HUMAN_REJECTED = "human_rejected"  # the gate's GateReason.HUMAN_REJECTED: same word


@dataclass(frozen=True)
class ApprovalEvidence:
    chosen_options: tuple[str, ...]
    responded_by: str = ""  # empty: nobody answered (the timeout chose the default)
    responded_at: str = ""
    comment: str = ""
    model_version: str = ""

    @classmethod
    def from_hitl(cls, response: Mapping[str, Any], model_version: str = "") -> ApprovalEvidence:
        """From the HITL operator's answer (its XCom: ``chosen_options``,
        ``responded_by_user`` as ``{"id", "name"}``, ``responded_at``, ``params_input``)."""
        who = response.get("responded_by_user") or {}
        name = (who.get("name") or who.get("id")) if isinstance(who, Mapping) else str(who)
        params = response.get("params_input") or {}
        comment = params.get("comment", "") if isinstance(params, Mapping) else ""
        return cls(
            chosen_options=tuple(str(o) for o in (response.get("chosen_options") or ())),
            responded_by=str(name or ""),
            responded_at=str(response.get("responded_at") or ""),
            comment=str(comment or ""),
            model_version=str(model_version),
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["chosen_options"] = list(self.chosen_options)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ApprovalEvidence:
        return cls(**{**d, "chosen_options": tuple(d.get("chosen_options") or ())})


@dataclass(frozen=True)
class ApprovalDecision:
    KIND: ClassVar[str] = KIND
    RECORD_VERSION: ClassVar[int] = RECORD_VERSION

    verdict: ApprovalVerdict
    reason: ApprovalReason
    evidence: ApprovalEvidence

    @property
    def approved(self) -> bool:
        return self.verdict is ApprovalVerdict.APPROVE

    @property
    def reasons(self) -> list[ApprovalReason]:
        return [self.reason]

    @property
    def message(self) -> str:
        e = self.evidence
        who = e.responded_by or "an approver"
        if self.approved:
            return f"approved by {who}" + (f" at {e.responded_at}" if e.responded_at else "")
        if not e.responded_by:  # Airflow 3.3 stamps responded_at on the timeout's default too
            who = "nobody before the timeout (the default answer)"
        return f"{ApprovalReason.HUMAN_REJECTED.value}: rejected by {who} in human review" + (
            f" ({e.comment})" if e.comment else ""
        )

    def to_dict(self) -> dict[str, Any]:
        return decisions.common(self, self.evidence.to_dict())


@dataclass(frozen=True)
class ApprovalRule:
    """Approve only on exactly the approve option; anything else (Reject, the timeout's
    default, several options, none) is a rejection."""

    approve_option: str = APPROVE_OPTION
    reject_option: str = REJECT_OPTION

    def decide(self, evidence: ApprovalEvidence) -> ApprovalDecision:
        if list(evidence.chosen_options) == [self.approve_option]:
            return ApprovalDecision(ApprovalVerdict.APPROVE, ApprovalReason.APPROVED, evidence)
        return ApprovalDecision(ApprovalVerdict.REJECT, ApprovalReason.HUMAN_REJECTED, evidence)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def record(
        self, decision: ApprovalDecision, context: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        return decisions.record(
            decision, self.to_dict(), {"evidence": decision.evidence.to_dict()}, context
        )


def replay(record: Mapping[str, Any]) -> ApprovalDecision:
    decisions.check_version(record, KIND, [RECORD_VERSION])
    rule = ApprovalRule(**record["rule"])
    return rule.decide(ApprovalEvidence.from_dict(record["inputs"]["evidence"]))
