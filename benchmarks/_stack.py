"""Servers for the benchmarks, started by the stack suite's own code (tests/stack/conftest.py).

The stack suite already starts a throw-away PostgreSQL 15 cluster (its ``pg`` fixture) and
Airflow's api-server, scheduler and dag-processor (``airflow_config`` + ``serve_airflow``:
LocalExecutor, its workers preloading the pipeline, ``plugins/pipeline_executor.py``), each
process in its own process group, stopped with ``os.killpg``, every wait bounded, everything
on 127.0.0.1 under a temporary folder. A benchmark calls the same code (the ``pg`` fixture's
``__wrapped__`` generator function as a context manager, the helpers as they are) rather than
a second copy of it, so the benchmark's Airflow is the suite's, with the suite's settings.

``local_executor_airflow`` is that Airflow *without* the suite's S3 and MLflow server: the
pipeline inside its tasks runs on the embedded defaults under ``pipeline_home`` (local
storage, MLflow on SQLite), so a DAG run under the scheduler does the same work as the same
stages called in one process on the same ``pipeline_home``: what differs is Airflow only.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.stack import conftest as stack  # noqa: E402  (after the repository root is on the path)

# what the suite's environment points at S3 or its MLflow server: the embedded defaults instead
_STACK_ONLY = (
    "PIPELINE_STORAGE_URI",
    "PIPELINE_S3_ENDPOINT_URL",
    "PIPELINE_MLFLOW_ARTIFACT_URI",
    "PIPELINE_SIGNING_KEY",
    "PIPELINE_SIGNING_KEY_ID",
    "PIPELINE_SIGNING_PUBLIC_KEYS",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "AIRFLOW_CONN_AWS_DEFAULT",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
)


def fixture_body(fixture):
    """A pytest fixture's generator function, as a context manager."""
    return contextlib.contextmanager(fixture.__wrapped__)


class NoPostgres(RuntimeError):
    """PostgreSQL 15's binaries are not where the stack suite looks (``PG_BIN``)."""


@contextlib.contextmanager
def local_executor_airflow(
    workdir: Path, pipeline_home: Path, env: dict[str, str]
) -> Iterator[stack.Airflow]:
    """PostgreSQL + Airflow (api-server, scheduler, dag-processor; the suite's settings) under
    ``workdir``, tasks running the pipeline on ``pipeline_home``'s embedded defaults and ``env``.
    ``retrain_<default model>`` is unpaused, its catch-up cron run failed; stopped on exit."""
    workdir.chmod(0o755)  # the cluster runs as user postgres under it
    with contextlib.ExitStack() as stop:
        try:
            pg = stop.enter_context(fixture_body(stack.pg)(workdir))
        except stack.pytest.skip.Exception as exc:
            raise NoPostgres(str(exc)) from None
        af = stack.airflow_config(pg, stack.S3(endpoint="", env={}), workdir,
                                  specs=(ROOT / "models",))  # fmt: skip
        for name in _STACK_ONLY:
            af.env.pop(name, None)
        af.env.update(env)
        af.env["PIPELINE_HOME"] = str(pipeline_home)
        stop.callback(lambda: [af.stop(name) for name in list(af.procs)])
        af.procs["migrate"] = stack.spawn(
            [str(stack.BIN / "airflow"), "db", "migrate"], af.env, af.home / "migrate.log"
        )
        # MLflow on pipeline_home's SQLite: serve_airflow sets the tracking URI it is given
        tracking = SimpleNamespace(
            url=f"sqlite:///{pipeline_home / 'mlflow' / 'mlflow.db'}", admin=("", "")
        )
        running = stop.enter_context(stack.serve_airflow(af, tracking, stack.DAG_ID))
        stack._fail_the_catchup_run(running)
        yield running
