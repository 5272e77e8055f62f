"""What each stage returns: a frozen record with named, typed fields.

A record is small (URIs, digests, verdicts, a few numbers) and crosses process boundaries
as JSON: Airflow's XCom between tasks, ``--in``/stdout between CLI commands. ``to_xcom()``
gives that JSON-able dict (with ``"stage"`` naming the record's type); ``from_xcom(d)``
reads it back and refuses a dict of another stage or with a key the record does not have —
so a renamed field is an error at the next task, never a silently empty value.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from pipeline.names import Task

R = TypeVar("R", bound="StageRecord")


class RecordError(ValueError):
    """A dict that is not the record a stage expects (wrong stage, unknown or missing key)."""


@dataclass(frozen=True, kw_only=True)
class StageRecord:
    STAGE: ClassVar[Task]

    verdict: str
    summary: str = ""
    model: str = ""  # the spec's name
    mlflow_run_id: str = ""
    mlflow_experiment_id: str | None = None

    @property
    def stage(self) -> str:
        return self.STAGE.value

    def to_xcom(self) -> dict[str, Any]:
        return {"stage": self.STAGE.value, **dataclasses.asdict(self)}

    @classmethod
    def from_xcom(cls: type[R], d: Any) -> R:
        if isinstance(d, cls):
            return d
        if not isinstance(d, dict):
            raise RecordError(f"{cls.STAGE.value} record: expected a JSON object, got {d!r:.80}")
        stage = d.get("stage", cls.STAGE.value)
        if stage != cls.STAGE.value:
            raise RecordError(
                f"expected the {cls.STAGE.value} record, got the {stage} record "
                "(pass the upstream records in the task's order)"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names - {"stage"})
        if unknown:
            raise RecordError(
                f"{cls.STAGE.value} record has unknown key(s) {unknown}; known: {sorted(names)}"
            )
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except TypeError as exc:  # a required field is missing
            raise RecordError(f"{cls.STAGE.value} record: {exc}") from exc

    def base(self) -> dict[str, Any]:
        """The fields every downstream record carries on (model, MLflow run)."""
        return {
            "model": self.model,
            "mlflow_run_id": self.mlflow_run_id,
            "mlflow_experiment_id": self.mlflow_experiment_id,
        }


@dataclass(frozen=True, kw_only=True)
class Ingested(StageRecord):
    STAGE = Task.INGEST_BATCH
    uri: str  # the immutable, content-addressed snapshot
    sha256: str
    rows: int
    source_uri: str  # where the batch landed
    parse_error: str | None = None


@dataclass(frozen=True, kw_only=True)
class Validated(StageRecord):
    STAGE = Task.VALIDATE_BATCH
    report_uri: str
    html_uri: str
    rows: int | None
    failed_expectations: list[str] = field(default_factory=list)
    extra_columns: list[str] = field(default_factory=list)
    quarantine_uri: str | None = None
    quarantined: str | None = None  # "moved" | "copied"
    ledger: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Drifted(StageRecord):
    STAGE = Task.DETECT_DRIFT
    has_champion: bool
    champion_version: str | None = None
    report: dict[str, Any] | None = None
    html_uri: str | None = None
    dataset_drift: bool | None = None
    drift_share: float | None = None
    share_threshold: float | None = None
    drifted_columns: list[str] = field(default_factory=list)
    label_drifted: bool | None = None
    reference_positive_rate: float | None = None
    current_positive_rate: float | None = None
    champion_metric: str | None = None
    champion_metric_on_batch: float | None = None
    champion_metric_at_promotion: float | None = None
    champion_metric_rows: int | None = None
    champion_age_days: float | None = None


@dataclass(frozen=True, kw_only=True)
class RetrainDecided(StageRecord):
    STAGE = Task.DECIDE_RETRAIN
    reason: str
    reasons: list[str]
    message: str
    evidence: dict[str, Any]
    policy: dict[str, Any]
    record_uri: str | None = None  # the replayable decision record on the MLflow run

    @property
    def retrain(self) -> bool:
        return self.verdict == "train"


@dataclass(frozen=True, kw_only=True)
class Trained(StageRecord):
    STAGE = Task.TRAIN_MODEL
    steps: int
    stop_reason: str
    batch_sha256: str = ""  # the training batch's content hash (its alerts' subject)
    world_size: int = 1
    rank: int = 0
    checkpoint_uri: str | None = None  # None on ranks other than 0: they do not publish
    manifest_sha256: str | None = None
    epochs: int = 0
    best_epoch: int = 0
    val_metrics: dict[str, float] = field(default_factory=dict)
    final_grad_norm: float | None = None  # mean gradient norm of the last epoch
    device: str = ""
    precision: str = ""
    resumed_from: dict[str, Any] | None = None
    telemetry: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Verified(StageRecord):
    STAGE = Task.VERIFY_CHECKPOINT
    checkpoint_uri: str
    manifest_sha256: str
    batch_sha256: str = ""  # the batch the checkpoint was trained on
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class Registered(StageRecord):
    STAGE = Task.REGISTER_CHALLENGER
    model_name: str
    model_version: str


@dataclass(frozen=True, kw_only=True)
class Gated(StageRecord):
    STAGE = Task.GATE_PROMOTION
    promote: bool
    reason: str
    reasons: list[str]
    message: str
    metric: str
    challenger: float | None
    champion: float | None
    champion_version: str | None
    model_name: str
    model_version: str
    eval_uri: str
    eval_sha256: str
    latency_p95_ms: float
    record_uri: str  # the replayable decision record (MLflow artifact)
    model_url: str
    report_table: str
    report_markdown: str
    checks: list[dict[str, Any]] = field(default_factory=list)
    challenger_metrics: dict[str, float] = field(default_factory=dict)
    champion_metrics: dict[str, float] | None = None
    gate: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Approved(StageRecord):
    """The human approval's decision (the ``approve_promotion`` HITL task's answer, judged)."""

    STAGE = Task.APPROVE_PROMOTION
    reason: str
    reasons: list[str]
    message: str
    model_version: str
    responded_by: str = ""
    responded_at: str = ""
    record_uri: str | None = None

    @property
    def approved(self) -> bool:
        return self.verdict == "approve"


@dataclass(frozen=True, kw_only=True)
class Promoted(StageRecord):
    STAGE = Task.PROMOTE_CHAMPION
    model_version: str | None = None
    previous_champion: str | None = None
    path: str = "direct"  # "direct" | "canary"
    reason: str | None = None
    canary: dict[str, Any] | None = None
    error: str | None = None


@dataclass(frozen=True, kw_only=True)
class StageSummary(StageRecord):
    STAGE = Task.PUBLISH_SUMMARY
    run_key: str
    dag_id: str
    run_id: str
    batch_uri: str | None
    model_version: str | None
    champion_version: str | None
    stages: dict[str, dict[str, str]]


RECORDS: dict[str, type[StageRecord]] = {
    r.STAGE.value: r
    for r in (
        Ingested,
        Validated,
        Drifted,
        RetrainDecided,
        Trained,
        Verified,
        Registered,
        Gated,
        Approved,
        Promoted,
        StageSummary,
    )
}


def from_xcom(d: Any) -> StageRecord:
    """Any stage's record from its dict (the ``"stage"`` key says which)."""
    stage = d.get("stage") if isinstance(d, dict) else None
    if stage not in RECORDS:
        raise RecordError(f"not a stage record: stage={stage!r}; known: {sorted(RECORDS)}")
    return RECORDS[stage].from_xcom(d)
