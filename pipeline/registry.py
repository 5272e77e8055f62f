"""MLflow tracking and registry: one run per DAG run, versions with lineage, aliases.

Runs are found again by a ``pipeline.run_key`` tag, so a retried task logs into
the same run and registers the same version instead of creating duplicates.
``champion`` moves only by compare-and-set against the version the decision saw, under a
lock in storage (MLflow has no server-side CAS), and each move is appended to the model's
promotion ledger (``pipeline.ledger``: MLflow keeps no alias history); see
``promote_champion``.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import PipelineRejection
from pipeline.names import Alias, RunTag
from pipeline.settings import get_settings

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from pipeline import ledger

PACKAGE_DIR = Path(__file__).resolve().parent

# the vocabulary's names (pipeline.names), as plain strings for the MLflow client
CHAMPION, CHALLENGER = Alias.CHAMPION.value, Alias.CHALLENGER.value
PREVIOUS = Alias.PREVIOUS_CHAMPION.value
RUN_KEY_TAG = RunTag.RUN_KEY.value


class RegistryConflict(PipelineRejection):
    """The alias moved since the decision was taken: nothing was changed. Retrying the
    same promotion cannot succeed (the gate must be re-run), so it fails without retries."""


@lru_cache(maxsize=1)
def client() -> MlflowClient:
    # Fail fast when a tracking server is down instead of retrying for minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow
    from mlflow import MlflowClient

    s = get_settings()
    if s.tracking_uri.startswith("sqlite:///"):
        (s.home_dir / "mlflow").mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(s.tracking_uri)
    mlflow.set_registry_uri(s.tracking_uri)
    return MlflowClient(tracking_uri=s.tracking_uri, registry_uri=s.tracking_uri)


def model_name() -> str:
    """The registered model of the active spec (``pipeline.spec.active``)."""
    from pipeline.spec import active

    return active().model_name


def experiment_name() -> str:
    from pipeline.spec import active

    return active().experiment_name


def experiment_id() -> str:
    s = get_settings()
    c = client()
    name = experiment_name()
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    from mlflow.exceptions import MlflowException

    try:
        return c.create_experiment(name, artifact_location=f"{s.artifact_root}/{name}")
    except MlflowException:  # created concurrently
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def get_or_create_run(run_key: str, tags: dict[str, str] | None = None) -> str:
    c = client()
    exp = experiment_id()
    found = c.search_runs([exp], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = c.create_run(
        exp,
        tags={RUN_KEY_TAG: run_key, **{str(k): str(v) for k, v in (tags or {}).items()}},
        run_name=(tags or {}).get("airflow.run_id", run_key)[:60],
    )
    return run.info.run_id


def log_record(run_id: str, name: str, record: dict[str, Any]) -> None:
    """A decision or stage record as a JSON artifact under ``records/``."""
    client().log_text(run_id, json.dumps(record, indent=2, default=str), f"records/{name}.json")


def log_text(run_id: str, text: str, path: str) -> None:
    client().log_text(run_id, text, path)


def log_bytes(run_id: str, data: bytes, path: str) -> str:
    """``data`` as the run's artifact ``path``; returns its ``runs:/`` URI."""
    import tempfile

    folder, _, name = path.rpartition("/")
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / name
        local.write_bytes(data)
        client().log_artifact(run_id, str(local), folder or None)
    return f"runs:/{run_id}/{path}"


def read_artifact(uri: str) -> bytes:
    """The bytes of a ``runs:/<run id>/<path>`` artifact (a decision record's side file)."""
    import tempfile

    import mlflow

    client()  # sets the tracking URI
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(uri, dst_path=tmp)
        return Path(local).read_bytes()


def log_metrics(run_id: str, metrics: dict[str, float], prefix: str = "", step: int = 0) -> None:
    import math

    from mlflow.entities import Metric

    ts = 0
    batch = [
        Metric(prefix + k, float(v), ts, step)
        for k, v in metrics.items()
        if isinstance(v, int | float) and math.isfinite(float(v))
    ]
    if batch:
        client().log_batch(run_id, metrics=batch)


_BATCH = 100  # MLflow's per-request limit for params and for tags in log_batch


def _log_batch(
    run_id: str, *, tags: list[Any] | None = None, params: list[Any] | None = None
) -> None:
    """Tags and params in one request per 100 of each: one round trip, one auth check."""
    tags, params = tags or [], params or []
    for i in range(0, max(len(tags), len(params)), _BATCH):
        client().log_batch(run_id, tags=tags[i : i + _BATCH], params=params[i : i + _BATCH])


def set_tags(run_id: str, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag

    _log_batch(run_id, tags=[RunTag(str(k), str(v)) for k, v in tags.items()])


def log_params(run_id: str, params: dict[str, Any]) -> None:
    """Logging a param again with the same value is a no-op in MLflow, so a retried task may
    call this again."""
    from mlflow.entities import Param

    _log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])


def end_run(run_id: str, status: str = "FINISHED") -> None:
    client().set_terminated(run_id, status)


def alias_version(alias: str) -> ModelVersion | None:
    from mlflow.exceptions import MlflowException

    name = model_name()
    try:
        return client().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _active_name() -> str:
    from pipeline.spec import active

    return active().name


def find_version(run_id: str, run_key: str) -> str | None:
    """The version this run_key already registered from ``run_id``, if any (retries)."""
    name = model_name()
    for mv in client().search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
        if mv.tags.get(RUN_KEY_TAG) == run_key:
            return str(mv.version)
    return None


def register_version(
    run_id: str,
    run_key: str,
    source: str,
    tags: dict[str, Any],
    description: str,
    model_id: str | None = None,
) -> str:
    """Register ``source`` as a new version (or return the one this run_key already made).

    ``model_id`` links the version to an MLflow 3 LoggedModel (signature, input example)."""
    from mlflow.exceptions import MlflowException

    c = client()
    name = model_name()
    try:
        c.create_registered_model(
            name,
            description=f"Retrained by the {experiment_name()} DAG; aliases say who serves.",
            tags={"pipeline.model": _active_name()},
        )
    except MlflowException:
        pass  # already exists
    existing = find_version(run_id, run_key)
    if existing is not None:
        return existing
    mv = c.create_model_version(
        name,
        source=source,
        run_id=run_id,
        tags={RUN_KEY_TAG: run_key, **{str(k): str(v) for k, v in tags.items()}},
        description=description,
        model_id=model_id,
    )
    return str(mv.version)


SERVING_REQUIREMENTS = (
    "mlflow",
    "torch",
    "safetensors",
    "pandas",
    "pyarrow",
    "numpy",
    "pydantic-settings",
    "pyyaml",
)


def _pinned(names: tuple[str, ...]) -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for n in names:
        try:
            out.append(f"{n}=={version(n).split('+')[0]}")
        except PackageNotFoundError:
            out.append(n)
    return out


def log_serving_model(run_id: str, checkpoint_dir: Path, input_example: pd.DataFrame) -> Any:
    """Log the checkpoint as an MLflow 3 model *from code* on ``run_id``; return its ModelInfo.

    ``pipeline/serving_model.py`` is the model: MLflow stores that file and the
    checkpoint directory as an artifact, never a cloudpickle of a Python object (with
    ``python_model`` given as a path, ``mlflow.pyfunc`` skips the cloudpickle dump and
    records ``model_code_path`` instead). The signature is inferred from the input
    example and the model's own output on it; MLflow then loads the logged model once,
    in-process, to check that example serves — which verifies the checkpoint again.
    Requirements are pinned from this environment rather than inferred (inference
    would load the model in a subprocess).
    """
    import mlflow
    from mlflow.models import infer_signature

    from pipeline.checkpoint import load_local_for_inference
    from pipeline.evaluate import predict_frame

    client()  # tracking URI set
    model, spec, _ = load_local_for_inference(checkpoint_dir)
    example = input_example[spec.input_columns].reset_index(drop=True)
    mlflow.set_experiment(experiment_id=experiment_id())  # where the LoggedModel lives
    with warnings.catch_warnings():
        # the contract's integer columns are never null; MLflow's generic hint does not apply
        warnings.filterwarnings("ignore", message=".*integer column", category=UserWarning)
        signature = infer_signature(example, predict_frame(model, spec, example))
        return _log_from_code(run_id, checkpoint_dir, signature, example)


def _log_from_code(run_id: str, checkpoint_dir: Path, signature: Any, example: Any) -> Any:
    import mlflow
    from mlflow.models import Model

    return Model.log(
        artifact_path=None,
        name="model",
        flavor=mlflow.pyfunc,
        run_id=run_id,
        python_model=str(PACKAGE_DIR / "serving_model.py"),
        artifacts={"checkpoint": str(checkpoint_dir)},
        code_paths=[str(PACKAGE_DIR)],
        signature=signature,
        input_example=example,
        pip_requirements=_pinned(SERVING_REQUIREMENTS),
        flavor_name="pyfunc.ModelFromCode",
    )


def tag_version(version: str, tags: dict[str, Any]) -> None:
    c = client()
    name = model_name()
    for k, v in tags.items():
        c.set_model_version_tag(name, version, str(k), str(v))


def describe_version(version: str, description: str) -> None:
    client().update_model_version(model_name(), version, description=description)


def set_alias(alias: str, version: str) -> None:
    client().set_registered_model_alias(model_name(), alias, version)


def delete_alias(alias: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client().delete_registered_model_alias(model_name(), alias)
    except MlflowException:
        pass


def champion_lock_uri() -> str:
    from pipeline import storage

    name = model_name()
    return storage.join(get_settings().storage_root, "locks", "registry", f"{name}.champion.lock")


def promote_champion(
    version: str,
    expected_champion: str | None,
    *,
    lock_timeout: float | None = None,
    move: ledger.Move | None = None,
) -> str | None:
    """Compare-and-set ``champion`` -> ``version``; returns the replaced champion (or None).

    Succeeds only if ``champion`` still points at ``expected_champion`` — the version
    the gate compared against (None: there was no champion). Otherwise raises
    RegistryConflict and changes nothing. ``previous_champion`` is moved to the
    replaced version in the same critical section. Retrying a promotion that already
    happened is a no-op.

    MLflow has no server-side compare-and-set for aliases, so the read-check-set runs
    under a lock object in storage (``pipeline.locks``: create-if-absent, unique owner
    token, stale after 120 s), which makes it safe across processes and machines that
    share the storage root. Writers that bypass the lock (the MLflow UI, other tools)
    are outside this guarantee.

    Every move is appended to the model's promotion ledger (``pipeline.ledger``) inside the
    same critical section, after the alias moved; ``move`` says what it is (action, who,
    why, the decision; default: a promotion by "unknown"). A retry after the alias moved
    but before the entry was written writes it then (the no-op path checks the ledger).
    """
    from pipeline import ledger as ledger_
    from pipeline import locks

    move = move or ledger_.Move()
    model = _active_name()

    kwargs = {} if lock_timeout is None else {"timeout": lock_timeout}
    with locks.storage_lock(champion_lock_uri(), purpose=f"promote v{version}", **kwargs):
        current = alias_version(CHAMPION)
        current_v = str(current.version) if current else None
        if current_v == version:  # already done (idempotent retry): is it in the ledger?
            with _ledger_guard(move, version):
                last = ledger_.newest(model)
                if last is None or last.to_version != version:
                    ledger_.record_move(model, expected_champion, version, move)
            return expected_champion
        if current_v != expected_champion:
            saw = f"v{expected_champion}" if expected_champion else "no champion"
            raise RegistryConflict(
                f"champion is v{current_v}, but the gate compared v{version} against {saw}; "
                "nothing changed — re-run the gate against the current champion"
            )
        with _ledger_guard(move, version):  # a promotion refuses before anything moves
            ledger_.newest(model)
        if current_v is not None:
            set_alias(PREVIOUS, current_v)
        set_alias(CHAMPION, version)
        with _ledger_guard(move, version):
            ledger_.record_move(model, current_v, version, move)
        return current_v


@contextmanager
def _ledger_guard(move: ledger.Move, version: str) -> Iterator[None]:
    """A ledger that fails its integrity check refuses a promotion (nothing moves: restore the
    named object first), but never blocks a rollback: on call must be able to stop the
    bleeding while the ledger is repaired. The rollback goes ahead, logged as unrecorded."""
    from pipeline import ledger as ledger_

    try:
        yield
    except ledger_.LedgerError as exc:
        if move.action not in ledger_.ROLLBACKS:
            raise
        logging.getLogger(__name__).error(
            "rollback to v%s goes ahead WITHOUT a ledger entry: %s", version, exc
        )


def reject_version(version: str, reasons: list[str], tags: dict[str, Any] | None = None) -> None:
    """Tag a version as rejected with its reasons and keep it out of serving.

    It loses the ``challenger`` alias if it holds it; ``champion``/``canary`` never
    pointed at it (a rejected version is never promoted)."""
    tag_version(
        version, {"rejected": "true", "rejection_reason": "; ".join(reasons)[:4000], **(tags or {})}
    )
    held = alias_version(CHALLENGER)
    if held is not None and str(held.version) == str(version):
        delete_alias(CHALLENGER)
