"""Shared fixtures. Every test gets its own embedded state (PIPELINE_HOME) under tmp."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _reset_caches() -> None:
    from pipeline import registry, settings

    settings.get_settings.cache_clear()
    registry.client.cache_clear()


@pytest.fixture
def pipeline_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty embedded default: storage, MLflow (SQLite) and keys under tmp_path."""
    home = tmp_path / "home"
    monkeypatch.setenv("PIPELINE_HOME", str(home))
    for var in (
        "PIPELINE_STORAGE_URI",
        "PIPELINE_MLFLOW_TRACKING_URI",
        "PIPELINE_SIGNING_KEY",
        "PIPELINE_SIGNING_KEY_ID",
        "PIPELINE_SIGNING_PUBLIC_KEYS",
        "PIPELINE_SIGNING_LEGACY_HMAC_KEY",
        "PIPELINE_EVAL_URI",
        "PIPELINE_S3_ENDPOINT_URL",
    ):
        monkeypatch.delenv(var, raising=False)
    _reset_caches()
    yield home
    _reset_caches()


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, fully migrated MLflow SQLite store, made once per test process (MLflow's
    migrations take seconds); :func:`mlflow_store` gives each test its own copy."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_store(pipeline_home: Path, migrated_db: Path) -> Path:
    """The embedded default's MLflow store, migrated: a copy of the template under this test's
    PIPELINE_HOME (the same file the pipeline would create there)."""
    import shutil

    dst = pipeline_home / "mlflow" / "mlflow.db"
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(migrated_db, dst)
    return dst


@pytest.fixture(scope="session")
def contract():
    from pipeline.contract import load_contract

    return load_contract(ROOT / "models" / "card_fraud" / "contract.yaml")


# --- lanes and the parallel run (`make test`) ---------------------------------------------------
#
# Each test belongs to one lane, named by its folder under tests/ and marked with it: ``unit``,
# ``dags``, ``integration``, ``stack``; the browser tests (marker ``browser``, in
# tests/integration) are a lane of their own. ``make test-<lane>`` runs one lane; ``make test``
# runs them all at once under pytest-xdist (``-n N --dist loadgroup``) with the scheduler below:
#
# * a work unit is a module (its module-scoped fixtures are made once), or a group of modules
#   that must share a process: the stack suite with Airflow (its session servers, its run order,
#   the burst and the faults that need Airflow to themselves), the stack tests that need only
#   PostgreSQL, S3 and MLflow (servers of their own, in another process), the CeleryExecutor
#   stack and the human paths (each on its own model's DAGs: a process, and so servers, of its
#   own, so the LocalExecutor stack's burst is not queued behind them: the stack's serial
#   chain was the run's long pole, mostly waiting on runs, timeouts and outages), the UI
#   stack's two modules, and the tests that time things in real time (the serving canary's
#   windows, the promotion race, the kill mid-epoch: one at a time); a module in SPLIT (no
#   shared fixtures) is one unit per test;
# * units go out in collection order, which the workers report with the long poles first
#   (FIRST, measured: the stack, the whole-DAG runs, ...; then the lanes in LANE_ORDER);
# * the worker that takes the stack is given nothing else: a worker starts its last test only
#   once it holds a next one, so a unit queued behind the stack would wait for the burst;
# * a worker runs at a lower CPU priority (NICE) while it runs anything but the stack or the
#   tests that measure throughput or wait in real time, so the critical path keeps its CPU;
#   each worker's torch uses one thread (OMP_NUM_THREADS, unless set), not one per core.
#
# (pytest-xdist 3.8's own xdist_group marker does not take effect with pytest 9, which no longer
# lets it rename node ids; the groups are therefore named here, by module.)

LANES = ("unit", "dags", "integration", "stack")
GROUPS = {  # module, relative to tests/ -> the unit it belongs to (other stack modules: "stack")
    "stack/test_stack_faults.py": "stack-servers",
    "stack/test_stack_security.py": "stack-servers",
    "stack/test_stack_celery.py": "stack-celery",
    "stack/test_stack_hitl.py": "stack-hitl",
    "integration/test_trigger_form.py": "ui-stack",
    "integration/test_browser.py": "ui-stack",
    "integration/test_hostile_uris.py": "ui-stack",
    "integration/test_serving_canary.py": "timing",
    "integration/test_promotion_race.py": "timing",
    "integration/test_resume_sigkill.py": "timing",
}
# the stack's units, each a process with servers of its own: the LocalExecutor suite, then
# the CeleryExecutor stack and the human paths (long poles, first out, full CPU priority)
STACK_UNITS = ("stack", "stack-celery", "stack-hitl")
SPLIT = {"integration/test_retrain_dag.py"}  # independent long tests: one unit each
FIRST = (  # units (or modules) in this order, then the lanes in LANE_ORDER
    *STACK_UNITS,
    "integration/test_retrain_dag.py",
    "integration/test_monitor_loop.py",
    "timing",
    "ui-stack",
    "integration/test_resource_limits.py",
    "integration/test_transient_reads.py",
    "unit/test_spec.py",
    "stack-servers",
)
LANE_ORDER = ("integration", "dags", "unit")
DEDICATED = ("stack",)  # the worker that runs one of these runs nothing else


def _module(nodeid: str) -> str:
    return nodeid.split("::", 1)[0].removeprefix("tests/")


def lane_of(nodeid: str) -> str | None:
    lane = _module(nodeid).split("/", 1)[0]
    return lane if lane in LANES and nodeid.startswith("tests/") else None


def unit_of(nodeid: str) -> str:
    """The work unit of a test (``make test``): see above."""
    module = _module(nodeid)
    if module in GROUPS:
        return GROUPS[module]
    if lane_of(nodeid) == "stack":
        return "stack"
    if module in SPLIT:
        return nodeid
    return nodeid.split("::", 1)[0]


def _rank(nodeid: str) -> int:
    for key in (unit_of(nodeid), _module(nodeid)):
        if key in FIRST:
            return FIRST.index(key)
    lane = lane_of(nodeid)
    return len(FIRST) + (LANE_ORDER.index(lane) if lane in LANE_ORDER else len(LANE_ORDER))


def _loadgroup(config: pytest.Config) -> bool:
    """``--dist loadgroup``: on the controller as given, on a worker as xdist records it."""
    if not config.pluginmanager.hasplugin("xdist"):
        return False
    return (
        bool(getattr(config.option, "loadgroup", False)) or config.getoption("dist") == "loadgroup"
    )


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]):
    for item in items:
        lane = lane_of(item.nodeid)
        if lane is not None:
            item.add_marker(getattr(pytest.mark, lane))
    result = yield
    if hasattr(config, "workerinput"):  # an xdist worker: the order it reports to the scheduler
        items.sort(key=lambda item: _rank(item.nodeid))  # stable: each unit keeps its order
    return result


TERMINAL_ENV = ("COLUMNS", "LINES")


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    node.workerinput["terminal_env"] = {k: os.environ.get(k) for k in TERMINAL_ENV}


def pytest_configure(config: pytest.Config) -> None:
    """An xdist worker: the controller's environment (GNU readline, imported in every worker,
    stdin not a terminal, exports COLUMNS=80 LINES=24, which shutil.get_terminal_size, the CLI's
    progress line, would read), and one torch/OpenMP thread per process unless OMP_NUM_THREADS
    says otherwise (N workers, each training with a thread per core, would oversubscribe)."""
    if not hasattr(config, "workerinput"):
        return
    for k, v in (config.workerinput.get("terminal_env") or {}).items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    os.environ.setdefault("OMP_NUM_THREADS", "1")


NICE = 5  # added to a worker's niceness while it runs anything but the units below
FULL_PRIORITY = (  # units or modules: the critical path, and the tests that time themselves
    *STACK_UNITS,
    "timing",
    "ui-stack",
    "unit/test_telemetry.py",  # 20 snapshots in under 2 s
    "unit/test_gates.py",  # 1000 bootstrap resamples in under 5 s
)
_base_nice: int | None = None
_nice: int | None = None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Under ``make test`` the stack's DAG runs are the critical path: a worker running other
    units (and the processes it starts meanwhile) yields the CPU to it; the tests that measure
    throughput or wait in real time (serving canary, promotion race, browser) do not."""
    global _base_nice, _nice
    config = item.config
    if not hasattr(config, "workerinput") or not _loadgroup(config):
        return
    if _base_nice is None:
        _base_nice = _nice = os.getpriority(os.PRIO_PROCESS, 0)
    full = unit_of(item.nodeid) in FULL_PRIORITY or _module(item.nodeid) in FULL_PRIORITY
    want = _base_nice + (0 if full else NICE)
    if want != _nice:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, want)  # back up needs CAP_SYS_NICE (root)
            _nice = want
        except OSError:
            pass


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    if config.getoption("dist", "no") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    config.option.loadscopereorder = False  # the order above, not "most tests first"

    class LaneScheduling(LoadGroupScheduling):
        """Work units as above, in collection order; a dedicated unit's worker stops after it."""

        def _split_scope(self, nodeid: str) -> str:
            if nodeid.rfind("@") > nodeid.rfind("]"):  # an xdist_group suffix, where it works
                return super()._split_scope(nodeid)
            return unit_of(nodeid)

        def _assign_work_unit(self, node) -> None:
            unit = next(iter(self.workqueue))
            super()._assign_work_unit(node)
            if unit in DEDICATED and len(self.nodes) > 1:
                node.shutdown()  # after the unit's tests: nothing queued behind them

    return LaneScheduling(config, log)
