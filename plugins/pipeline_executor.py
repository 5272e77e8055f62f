"""LocalExecutor whose worker processes import the pipeline once, so every task starts warm.

Set ``AIRFLOW__CORE__EXECUTOR=pipeline_executor.PreloadingLocalExecutor`` (the plugins folder
is on the scheduler's ``sys.path``). Everything else is Airflow's own LocalExecutor: the same
queues, parallelism, heartbeats and failure handling.

Why: on Linux the task SDK's supervisor forks each task from the LocalExecutor worker that
picked it up (no exec), so a module that worker imported is already imported in the task.
Each worker imports ``pipeline.preload.MODULES`` (pandas, torch, MLflow, GX, Evidently and
the stage modules) once, when it starts, instead of each task importing them again: that is
2–5 s less per task on a small machine (``benchmarks/task_start.py`` measures it). The cost
is memory: each worker holds those modules, which the tasks it forks share
copy-on-write (``preloaded_worker_rss_mb`` in the benchmark: about 600 MB measured here).
The scheduler process itself imports none of it.

Nothing is preloaded on platforms where the supervisor execs a fresh interpreter (macOS):
there the preload would only cost memory. The DAG files are still parsed by each task, so
a changed DAG or spec is seen by the next task, as with the stock executor; a changed
*pipeline module* is seen by tasks only after the scheduler (and so its workers) restarts —
deploy new code by restarting, as the compose file and the Helm chart do.

A worker is busy until the task SDK's supervisor returns, and in Airflow 3.3 that is often
``[workers] min_heartbeat_interval`` (5 s by default) after the task process ended: when its
sockets close before it is reaped, the supervisor sleeps one interval before it looks again.
With two slots and a DAG of short tasks, both are often asleep and the next task waits:
up to 12-18 s of a ``retrain_<model>`` run here (``benchmarks/orchestration_tax.py``).
``AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL=1`` bounds the sleep to a second, for one
heartbeat a second per running task on the API server (cheap on one host).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
from typing import Any

from airflow.executors.local_executor import LocalExecutor, _run_worker

log = logging.getLogger(__name__)

# where the task SDK's supervisor execs instead of forking (airflow.sdk ... supervisor)
_EXEC_PLATFORMS = ("darwin",)


def _preloading_worker(**kwargs: Any) -> None:
    """The LocalExecutor worker loop, after importing the pipeline once."""
    if sys.platform not in _EXEC_PLATFORMS:
        from pipeline.preload import preload

        seconds, failed = preload()
        log.info("worker pid=%d preloaded the pipeline in %.1fs", os.getpid(), seconds)
        for name, error in failed.items():
            log.warning("worker pid=%d could not preload %s (%s)", os.getpid(), name, error)
    _run_worker(**kwargs)


class PreloadingLocalExecutor(LocalExecutor):
    """Airflow's LocalExecutor; its workers run ``_preloading_worker``.

    ``_spawn_worker`` is LocalExecutor's own (apache-airflow-core 3.3), with the target
    changed; pipeline/versions.py keeps Airflow within the 3.x releases it was checked on."""

    def _spawn_worker(self) -> None:
        p = multiprocessing.Process(
            target=_preloading_worker,
            kwargs={
                "logger_name": self.log.name,
                "input": self.activity_queue,
                "output": self.result_queue,
                "unread_messages": self._unread_messages,
                "team_conf": self.conf,
            },
        )
        p.start()
        assert p.pid is not None
        self.workers[p.pid] = p
