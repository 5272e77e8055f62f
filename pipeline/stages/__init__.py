"""The stages of one retraining run, as functions of typed records.

Each DAG task calls exactly one of these; ``python -m pipeline <task id>`` calls the same
function, so any task can be reproduced without Airflow. What passes between stages is a
frozen record (``records``: URIs, digests, verdicts — never data) that crosses XCom and
the CLI as JSON (``to_xcom()`` / ``from_xcom()``).

Every stage writes its verdict and a one-line summary as tags on the run's MLflow run
(``stage.<task id>.verdict`` / ``.summary``), so the run, the summary and a reviewer all
read the same record.

| module | stages |
|---|---|
| ``context`` | ``RunContext``, the run's policy, writing a verdict |
| ``data`` | ``resolve_batch_uri``, ``ingest_batch``, ``validate_batch``, ``detect_drift``, ``decide_retrain`` |
| ``training`` | ``train_model``, ``verify_checkpoint`` |
| ``promotion`` | ``register_challenger``, ``gate_promotion``, ``approve_promotion``, ``promote_champion``, ``canary_rollout`` |
| ``summary`` | ``publish_summary`` |
"""

from pipeline.stages.context import RunContext, run_policy
from pipeline.stages.data import (
    decide_retrain,
    detect_drift,
    ingest_batch,
    production_decay,
    resolve_batch_uri,
    validate_batch,
)
from pipeline.stages.promotion import (
    approve_promotion,
    canary_rollout,
    gate_promotion,
    promote_champion,
    register_challenger,
)
from pipeline.stages.records import (
    Approved,
    Drifted,
    Gated,
    Ingested,
    Promoted,
    Registered,
    RetrainDecided,
    StageSummary,
    Trained,
    Validated,
    Verified,
)
from pipeline.stages.summary import format_summary, publish_summary
from pipeline.stages.training import train_config, train_model, verify_checkpoint

__all__ = [
    "Approved",
    "Drifted",
    "Gated",
    "Ingested",
    "Promoted",
    "Registered",
    "RetrainDecided",
    "RunContext",
    "StageSummary",
    "Trained",
    "Validated",
    "Verified",
    "approve_promotion",
    "canary_rollout",
    "decide_retrain",
    "detect_drift",
    "format_summary",
    "gate_promotion",
    "ingest_batch",
    "production_decay",
    "promote_champion",
    "publish_summary",
    "register_challenger",
    "resolve_batch_uri",
    "run_policy",
    "train_config",
    "train_model",
    "validate_batch",
    "verify_checkpoint",
]
