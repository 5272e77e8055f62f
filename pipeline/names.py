"""The project's vocabulary: task ids, aliases, MLflow tag keys, verdicts, record paths.

One dependency-free module (stdlib only) used by the DAGs, the pipeline, the plugin and the
CLI, so a renamed key is one edit here and an ``AttributeError`` everywhere it was used —
never a silently empty UI column. The DAG files import it at parse time: keep it free of
any import beyond the standard library.
"""

from __future__ import annotations

import re
from enum import StrEnum


class Task(StrEnum):
    """The ``retrain_<model>`` DAG's task ids, in run order; each is also
    ``python -m pipeline <task id>``."""

    INGEST_BATCH = "ingest_batch"
    VALIDATE_BATCH = "validate_batch"
    DETECT_DRIFT = "detect_drift"
    DECIDE_RETRAIN = "decide_retrain"
    RETRAIN_GATE = "retrain_gate"
    TRAIN_MODEL = "train_model"
    VERIFY_CHECKPOINT = "verify_checkpoint"
    REGISTER_CHALLENGER = "register_challenger"
    GATE_PROMOTION = "gate_promotion"
    APPROVAL_REQUIRED = "approval_required"
    APPROVE_PROMOTION = "approve_promotion"
    PROMOTE_CHAMPION = "promote_champion"
    PUBLISH_SUMMARY = "publish_summary"


# The stages that write a verdict to the run (``stage.<task id>.verdict``), in run order.
STAGES: tuple[Task, ...] = (
    Task.INGEST_BATCH,
    Task.VALIDATE_BATCH,
    Task.DETECT_DRIFT,
    Task.DECIDE_RETRAIN,
    Task.TRAIN_MODEL,
    Task.VERIFY_CHECKPOINT,
    Task.REGISTER_CHALLENGER,
    Task.GATE_PROMOTION,
    Task.PROMOTE_CHAMPION,
)

RETRAIN_DAG_PREFIX = "retrain_"
ROLLBACK_DAG_PREFIX = "rollback_"


class Alias(StrEnum):
    """Registry aliases: who serves, who waits, who served before."""

    CHAMPION = "champion"
    CHALLENGER = "challenger"
    CANARY = "canary"
    PREVIOUS_CHAMPION = "previous_champion"


# -- verdicts: one enum per decision, each named for it ------------------------------------


class StopVerdict(StrEnum):
    CONTINUE = "continue"
    REDUCE_LR = "reduce_lr"
    STOP = "stop"
    DIVERGED = "diverged"


class RetrainVerdict(StrEnum):
    TRAIN = "train"
    SKIP = "skip"


class GateVerdict(StrEnum):
    PROMOTE = "promote"
    REJECT = "reject"


class CanaryVerdict(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"


class ApprovalVerdict(StrEnum):
    APPROVE = "approve"
    REJECT = "reject"


class PromotionVerdict(StrEnum):
    """What the ``promote_champion`` task did (directly or through a canary)."""

    PROMOTED = "promoted"
    NOT_PROMOTED = "not_promoted"
    CONFLICT = "conflict"
    ROLLED_BACK = "rolled_back"
    ROLLED_BACK_AFTER_BAKE = "rolled_back_after_bake"
    PAUSED = "paused"
    ABORTED = "aborted"


APPROVE_OPTION, REJECT_OPTION = "Approve", "Reject"  # the HITL form's options


# -- MLflow tag keys ------------------------------------------------------------------------


class RunTag(StrEnum):
    """Tags on a DAG run's MLflow run."""

    RUN_KEY = "pipeline.run_key"
    MODEL = "pipeline.model"
    SPEC = "pipeline.spec"
    DAG_ID = "airflow.dag_id"
    RUN_ID = "airflow.run_id"
    BATCH_URI = "data.batch_uri"
    SNAPSHOT_URI = "data.snapshot_uri"
    SNAPSHOT_SHA256 = "data.snapshot_sha256"
    ROWS = "data.rows"
    POLICY_OVERRIDES = "policy.overrides"
    MODEL_VERSION = "model.version"
    RETRAIN_VERDICT = "retrain.verdict"
    RETRAIN_REASONS = "retrain.reasons"
    # where detect_drift's reference statistics came from: the champion's cache, or
    # "recomputed: <why>" (pipeline.reference_stats)
    DRIFT_REFERENCE = "drift.reference_stats"


class VersionTag(StrEnum):
    """Tags on a registered model version (what a reviewer reads)."""

    SNAPSHOT_URI = "data.snapshot_uri"
    SNAPSHOT_SHA256 = "data.snapshot_sha256"
    CHECKPOINT_URI = "checkpoint.uri"
    MANIFEST_SHA256 = "checkpoint.manifest_sha256"
    GATE_VERDICT = "gate.verdict"
    GATE_REASON = "gate.reason"
    GATE_MARGIN = "gate.margin"
    GATE_RECORD = "gate.record"
    APPROVAL_REQUIRED = "approval.required"  # written by the gate: "true" | "false"
    APPROVAL_VERDICT = "approval.verdict"
    APPROVAL_BY = "approval.by"
    APPROVAL_AT = "approval.at"
    PROMOTED_AT = "promoted_at"
    PROMOTED_BY = "promoted_by"
    REJECTED = "rejected"
    REJECTION_REASON = "rejection_reason"
    ROLLED_BACK = "rolled_back"
    ROLLBACK_REASON = "rollback_reason"
    CANARY_VERDICT = "canary.verdict"
    CANARY_REASON = "canary.reason"
    CANARY_WEIGHT = "canary.weight"
    # the version's cached reference statistics (pipeline.reference_stats): the runs:/ URI
    # of their stats.json and its SHA-256, checked before a drift check trusts them
    REFERENCE_STATS_URI = "reference_stats.uri"
    REFERENCE_STATS_SHA256 = "reference_stats.sha256"


def stage_verdict_tag(stage: str) -> str:
    return f"stage.{stage}.verdict"


def stage_summary_tag(stage: str) -> str:
    return f"stage.{stage}.summary"


# -- keys and record paths ------------------------------------------------------------------

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_key(text: str) -> str:
    """A storage- and tag-safe key: every character outside ``[A-Za-z0-9._-]`` becomes ``_``."""
    return _UNSAFE.sub("_", text)


def run_key(dag_id: str, run_id: str) -> str:
    """The one key of a DAG run (or CLI run) across storage, MLflow tags and records."""
    return safe_key(f"{dag_id}__{run_id}")


RECORDS_DIR = "records"  # stage records: records/<stage>.json on the MLflow run
DECISIONS_DIR = "records/decisions"  # decision records: records/decisions/<kind>[-<n>].json
REFERENCE_STATS_DIR = "reference_stats"  # a version run's cached reference statistics
