"""MLflow tracking and registry: one run per DAG run, versions with lineage, aliases.

Runs are found again by a ``pipeline.run_key`` tag, so a retried task logs into
the same run and registers the same version instead of creating duplicates.
``champion`` moves only by compare-and-set against the version the decision saw.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from pipeline.settings import get_settings

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous_champion"
RUN_KEY_TAG = "pipeline.run_key"


class RegistryConflict(RuntimeError):
    """The alias moved since the decision was taken: nothing was changed."""


@lru_cache(maxsize=1)
def client() -> MlflowClient:
    # Fail fast when a tracking server is down instead of retrying for minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    import mlflow
    from mlflow import MlflowClient

    s = get_settings()
    if s.tracking_uri.startswith("sqlite:///"):
        (s.home_dir / "mlflow").mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(s.tracking_uri)
    mlflow.set_registry_uri(s.tracking_uri)
    return MlflowClient(tracking_uri=s.tracking_uri, registry_uri=s.tracking_uri)


def experiment_id() -> str:
    s = get_settings()
    c = client()
    exp = c.get_experiment_by_name(s.experiment_name)
    if exp is not None:
        return exp.experiment_id
    from mlflow.exceptions import MlflowException

    try:
        return c.create_experiment(
            s.experiment_name, artifact_location=f"{s.artifact_root}/{s.experiment_name}"
        )
    except MlflowException:  # created concurrently
        return c.get_experiment_by_name(s.experiment_name).experiment_id


def get_or_create_run(run_key: str, tags: dict[str, str] | None = None) -> str:
    c = client()
    exp = experiment_id()
    found = c.search_runs([exp], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = c.create_run(exp, tags={RUN_KEY_TAG: run_key, **(tags or {})}, run_name=run_key)
    return run.info.run_id


def log_record(run_id: str, name: str, record: dict[str, Any]) -> None:
    """A decision or stage record as a JSON artifact under ``records/``."""
    client().log_text(run_id, json.dumps(record, indent=2, default=str), f"records/{name}.json")


def log_text(run_id: str, text: str, path: str) -> None:
    client().log_text(run_id, text, path)


def log_metrics(run_id: str, metrics: dict[str, float], prefix: str = "", step: int = 0) -> None:
    import math

    from mlflow.entities import Metric

    ts = 0
    batch = [Metric(prefix + k, float(v), ts, step) for k, v in metrics.items()
             if isinstance(v, int | float) and math.isfinite(float(v))]  # fmt: skip
    if batch:
        client().log_batch(run_id, metrics=batch)


def set_tags(run_id: str, tags: dict[str, Any]) -> None:
    c = client()
    for k, v in tags.items():
        c.set_tag(run_id, k, str(v))


def end_run(run_id: str, status: str = "FINISHED") -> None:
    client().set_terminated(run_id, status)


def alias_version(alias: str) -> ModelVersion | None:
    from mlflow.exceptions import MlflowException

    name = get_settings().model_name
    try:
        return client().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def register_version(
    run_id: str, run_key: str, source: str, tags: dict[str, Any], description: str
) -> str:
    """Register ``source`` as a new version (or return the one this run_key already made)."""
    from mlflow.exceptions import MlflowException

    c = client()
    name = get_settings().model_name
    try:
        c.create_registered_model(
            name, description="Retrained by the retrain_model DAG; aliases say who serves."
        )
    except MlflowException:
        pass  # already exists
    for mv in c.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
        if mv.tags.get(RUN_KEY_TAG) == run_key:
            return str(mv.version)
    mv = c.create_model_version(
        name, source=source, run_id=run_id,
        tags={RUN_KEY_TAG: run_key, **{k: str(v) for k, v in tags.items()}},
        description=description,
    )  # fmt: skip
    return str(mv.version)


def tag_version(version: str, tags: dict[str, Any]) -> None:
    c = client()
    name = get_settings().model_name
    for k, v in tags.items():
        c.set_model_version_tag(name, version, k, str(v))


def describe_version(version: str, description: str) -> None:
    client().update_model_version(get_settings().model_name, version, description=description)


def set_alias(alias: str, version: str) -> None:
    client().set_registered_model_alias(get_settings().model_name, alias, version)


def delete_alias(alias: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client().delete_registered_model_alias(get_settings().model_name, alias)
    except MlflowException:
        pass


def promote_champion(version: str, expected_champion: str | None) -> str | None:
    """Compare-and-set ``champion`` → ``version``. Returns the previous champion.

    MLflow has no atomic alias CAS; we check immediately before the write and the
    DAG runs with ``max_active_runs=1`` so promotions are serialised. Raises
    RegistryConflict (changing nothing) if champion moved since the decision.
    """
    current = alias_version(CHAMPION)
    current_v = str(current.version) if current else None
    if current_v == version:
        return expected_champion  # already done (idempotent retry)
    if current_v != expected_champion:
        raise RegistryConflict(
            f"champion is v{current_v}, but the gate compared against v{expected_champion}; "
            "re-run the gate against the current champion"
        )
    if current_v is not None:
        set_alias(PREVIOUS, current_v)
    set_alias(CHAMPION, version)
    return current_v
