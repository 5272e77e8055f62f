"""One shape for every decision the pipeline makes, and one record that replays it.

Five rules decide: the training stopper (``train.stopping.GradientPlateauStopper``), the
retrain trigger (``decide.RetrainPolicy``), the promotion gate (``gates.PromotionGate``), the
canary analysis (``canary.analysis.CanaryAnalysis``) and the human approval
(``approval.ApprovalRule``). Each is a small object with validated thresholds and a pure
``decide(evidence) -> decision``; each decision satisfies :class:`Decision`:

* ``verdict`` — a member of that decision's verdict enum (``names.GateVerdict`` …),
* ``reasons`` — members of its reason enum, the primary one first (``reason``),
* ``message`` — one line naming the values and thresholds behind the verdict,
* ``to_dict()`` — ``{"verdict", "reason", "reasons", "message", "evidence", ...}``.

:func:`record` wraps a decision with the rule's thresholds and the inputs it saw, keyed by
``kind`` and ``record_version``; :func:`replay` dispatches on the kind to the rule's module
and recomputes the decision from the record alone; :func:`replays` says whether that gives
back the recorded decision. The records are logged on the run's MLflow run under
``records/decisions/`` (:func:`record_path`).

This module is the gate's record format (``gates.decision_record``) made general: the gate
was the one decision that could be replayed; now all five can.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from enum import StrEnum
from typing import Any, ClassVar, Protocol, runtime_checkable

from pipeline.names import DECISIONS_DIR, safe_key


@runtime_checkable
class Decision(Protocol):
    KIND: ClassVar[str]
    RECORD_VERSION: ClassVar[int]

    @property
    def verdict(self) -> StrEnum: ...

    @property
    def reasons(self) -> Sequence[StrEnum]: ...

    @property
    def message(self) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...


# kind -> "module:function" taking the whole record and returning the recomputed decision.
# Strings, so that replaying a gate record does not import torch and vice versa.
REPLAYERS: dict[str, str] = {
    "training_stop": "pipeline.train.stopping:replay",
    "retrain": "pipeline.decide:replay",
    "promotion_gate_decision": "pipeline.gates:replay",
    "canary_analysis": "pipeline.canary.analysis:replay",
    "human_approval": "pipeline.approval:replay",
    "champion_monitor": "pipeline.monitor:replay",
}


def common(decision: Decision, evidence: Mapping[str, Any]) -> dict[str, Any]:
    """The fields every decision's ``to_dict()`` starts with."""
    reasons = [r.value for r in decision.reasons]
    return {
        "verdict": decision.verdict.value,
        "reason": reasons[0] if reasons else None,
        "reasons": reasons,
        "message": decision.message,
        "evidence": dict(evidence),
    }


def record(
    decision: Decision,
    rule: Mapping[str, Any],
    inputs: Mapping[str, Any],
    context: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything needed to audit the decision and to replay it: the rule's thresholds, the
    inputs it saw, the decision it made, and where it was made (``context``: not replayed)."""
    return {
        "kind": decision.KIND,
        "record_version": decision.RECORD_VERSION,
        "rule": dict(rule),
        "inputs": dict(inputs),
        "decision": decision.to_dict(),
        "context": dict(context or {}),
    }


class NotADecisionRecord(ValueError):
    """The object is not a record this version of the pipeline can replay."""


def replay(rec: Mapping[str, Any], load: Callable[[str], bytes] | None = None) -> Decision:
    """Recompute a recorded decision from its own rule and inputs. Nothing else is read —
    except, through ``load(uri) -> bytes``, a side file the record names with its digest
    (the gate's per-row arrays; ``registry.read_artifact`` reads one from MLflow)."""
    kind = rec.get("kind") if isinstance(rec, Mapping) else None
    target = REPLAYERS.get(str(kind))
    if target is None:
        raise NotADecisionRecord(
            f"not a decision record: kind={kind!r}; known kinds: {sorted(REPLAYERS)}"
        )
    module, func = target.split(":")
    fn = getattr(importlib.import_module(module), func)
    takes_load = "load" in inspect.signature(fn).parameters  # only records with side files
    decision: Decision = fn(rec, load) if takes_load else fn(rec)
    return decision


def replays(rec: Mapping[str, Any], load: Callable[[str], bytes] | None = None) -> bool:
    """True when replaying the record gives back exactly the recorded decision."""
    return _plain(replay(rec, load).to_dict()) == _plain(rec["decision"])


def check_version(
    rec: Mapping[str, Any], kind: str, supported: Sequence[int], label: str | None = None
) -> int:
    """The record's version, if this code can replay it; a clear error otherwise."""
    if rec.get("kind") != kind:
        raise NotADecisionRecord(f"not a {label or kind} record: kind={rec.get('kind')!r}")
    version = rec.get("record_version")
    if version not in supported:
        raise NotADecisionRecord(
            f"{kind} record version {version!r} is not one this code replays ({list(supported)})"
        )
    return int(version)  # type: ignore[arg-type]  # checked just above


def record_path(kind: str, name: str | None = None) -> str:
    """``records/decisions/<kind>.json`` (or ``<kind>-<name>.json`` for one of several)."""
    return f"{DECISIONS_DIR}/{safe_key(kind)}" + (f"-{safe_key(name)}" if name else "") + ".json"


def _plain(obj: Any) -> Any:
    """JSON's view of a value: what a record holds after a round trip through a file."""
    import json

    return json.loads(json.dumps(obj, default=str))
