"""What a long-lived worker imports once so that every task it forks starts warm.

A task's body imports pandas, pyarrow, torch, MLflow, Great Expectations, Evidently and the
stage modules that use them: 2–5 s of a task's wall time on a small machine, paid again by
every task of every run, because each task is a fresh process. Airflow's LocalExecutor forks
each task from a long-lived worker process (``os.fork`` in the task SDK's supervisor, no
exec on Linux), so whatever that worker imported before the fork is already in the task's
``sys.modules``, shared copy-on-write. ``plugins/pipeline_executor.py`` is that executor.

Only imports happen here: no settings are read, no file, socket, thread or CUDA context is
opened (CUDA must be initialised after the fork, in the task). A module that fails to import
is reported and skipped: the task that needs it fails on its own, with its own traceback.
"""

from __future__ import annotations

import importlib
import time

# the libraries, then the stage modules that import them inside their functions
MODULES: tuple[str, ...] = (
    "numpy",
    "pandas",
    "pyarrow.parquet",
    "torch",
    "safetensors.torch",
    "mlflow",
    "great_expectations",
    "evidently",
    "pipeline.stages",
    "pipeline.ingest",
    "pipeline.validate",
    "pipeline.drift",
    "pipeline.decide",
    "pipeline.train.loop",
    "pipeline.train.telemetry",
    "pipeline.train.model",
    "pipeline.checkpoint",
    "pipeline.evaluate",
    "pipeline.gates",
    "pipeline.gate_report",
    "pipeline.registry",
    "pipeline.canary",
    "pipeline.approval",
    "pipeline.quarantine",
    # what the stages import on first use, inside their functions (found by diffing
    # ``sys.modules`` around each stage in a preloaded process; benchmarks/orchestration_tax.py):
    # AdamW's first step imports torch._dynamo (~1.8 s), the gradient plots matplotlib (~1.3 s),
    # the embedded MLflow store its SQLAlchemy/alembic models (~0.7 s, every task on SQLite)
    "torch._dynamo",
    "matplotlib.figure",
    "matplotlib.backends.backend_agg",
    "pyarrow.dataset",
    "mlflow.pyfunc",
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.model_registry.sqlalchemy_store",
    "pipeline.train.launch",
    "pipeline.reference_stats",
    "pipeline.ledger",
)


def preload(modules: tuple[str, ...] = MODULES) -> tuple[float, dict[str, str]]:
    """Import ``modules``; return the seconds it took and the ones that failed (name → error)."""
    t0 = time.perf_counter()
    failed: dict[str, str] = {}
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - reported; the task that needs it fails itself
            failed[name] = f"{type(e).__name__}: {e}"
    return time.perf_counter() - t0, failed
