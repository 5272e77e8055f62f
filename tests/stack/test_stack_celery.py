"""Scale-out for real: the CeleryExecutor, a ``gpu`` queue, and training resumed on another worker.

A second Airflow (``airflow_config``/``serve_airflow`` of conftest.py, with the executor
changed), on its own database ``airflow_celery`` in the suite's PostgreSQL cluster, the
suite's moto S3 and MLflow server:

* ``redis``   Debian's ``redis-server`` on 127.0.0.1, a free port and a password (in its
              config file, off ``ps``), no persistence: the Celery broker;
* the result backend on PostgreSQL (``db+postgresql+psycopg2://…/airflow_celery``);
* two workers, each a "host" of its own: its process group, its ``PIPELINE_HOME`` (so a
  training state on one worker's disk is invisible to the other) and its hostname
  (``--celery-hostname``, and ``[core] hostname_callable`` reading ``STACK_HOSTNAME``, which
  is what a task instance records; on real hosts this is the machine's name):
  ``airflow celery worker --queues default`` (``default-a``) and
  ``airflow celery worker --queues gpu --concurrency 1`` (``gpu-a``).

``dags/placement.py`` (``PIPELINE_EXECUTION_MODE=auto``: queue ``gpu`` under Celery) routes
``train_model`` to the gpu worker; every other task goes to ``default``.

The model is ``card_fraud_scaled`` (``tests/stack/specs_celery/``: this Airflow's models root
holds only it): ~200 steps an epoch, 8 epochs, no stopper, so a run's step count is fixed and
the training states at steps 500 and 1000 fall a few seconds into training.

The LocalExecutor Airflow of the rest of the suite, if it is up, is paused (SIGSTOP) while
this module runs and resumed after it, so the two never compete for the CPU.

Bounds of the resume test: a SIGKILLed worker's task stops heartbeating; the scheduler fails
it after ``task_instance_heartbeat_timeout`` (20 s here, checked every 5 s) and the retry is
queued after the DAG's ``retry_delay`` (30 s); the new gpu worker takes it from Redis.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.stack.conftest import (
    BIN,
    HOST,
    Airflow,
    airflow_config,
    free_port,
    group_alive,
    land,
    port_open,
    serve_airflow,
    spawn,
    stop,
    wait_for,
)

SPEC = "card_fraud_scaled"
DAG = f"retrain_{SPEC}"
MODEL = "card-fraud-scaled"
LANDING = f"data/landing/{SPEC}/celery"  # bucket keys under the spec's landing prefix
TRUSTED_EVAL = f"data/trusted/{SPEC}/eval.parquet"
STATE_PREFIX = "data/train-state"  # <storage root>/train-state/<run key>/ in bucket pipeline
SPECS = Path(__file__).parent / "specs_celery"
ROWS, SEED = 2000, 7  # both runs train on the same rows: the same step count
HEARTBEAT_TIMEOUT = 20

HOSTNAME_MODULE = '''"""[core] hostname_callable of the stack's Celery workers: each is a host of its own."""
import os
import socket


def hostname() -> str:
    return os.environ.get("STACK_HOSTNAME") or socket.getfqdn()
'''


# --- Redis -------------------------------------------------------------------------------------


@dataclass
class Redis:
    port: int
    password: str

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@{HOST}:{self.port}/0"


@pytest.fixture(scope="module")
def redis(workdir: Path) -> Iterator[Redis]:
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server not found (Debian package redis-server; .ci/run installs it)")
    base = workdir / "redis"
    base.mkdir()
    port, password = free_port(), secrets.token_hex(16)
    conf = base / "redis.conf"
    conf.write_text(
        f"bind {HOST}\nport {port}\nrequirepass {password}\nprotected-mode yes\n"
        f'dir {base}\nsave ""\nappendonly no\ndaemonize no\nlogfile ""\n'
    )
    conf.chmod(0o600)
    log = base / "redis.log"
    proc = spawn([server, str(conf)], {"PATH": os.environ["PATH"]}, log)
    try:
        import redis as redis_client

        wait_for(
            lambda: (
                port_open(port)
                and redis_client.Redis(host=HOST, port=port, password=password).ping()
            ),
            "redis-server",
            30,
            proc,
            log,
        )
        yield Redis(port=port, password=password)
    finally:
        stop(proc)


# --- the Celery Airflow and its workers ----------------------------------------------------------


@dataclass
class CeleryStack:
    af: Airflow
    workdir: Path
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start_worker(self, hostname: str, queue: str, concurrency: int, wait: bool = True) -> None:
        """``airflow celery worker`` on one queue, as a host of its own (see the module doc);
        returns once Celery says it is ready (``wait``; else see :meth:`wait_ready`)."""
        home = self.workdir / "hosts" / hostname
        home.mkdir(parents=True)
        env = {
            **self.af.env,
            "PIPELINE_HOME": str(home / "pipeline-home"),
            "STACK_HOSTNAME": hostname,
        }
        log = self.af.home / f"worker-{hostname}.log"
        cmd = [str(BIN / "airflow"), "celery", "worker", "--queues", queue]
        cmd += ["--concurrency", str(concurrency), "--celery-hostname", hostname]
        cmd += ["--skip-serve-logs", "--without-gossip", "--without-mingle"]
        self.workers[hostname] = spawn(cmd, env, log)
        if wait:
            self.wait_ready(hostname)

    def wait_ready(self, hostname: str) -> None:
        log = self.af.home / f"worker-{hostname}.log"
        proc = self.workers[hostname]
        wait_for(lambda: " ready." in log.read_text(errors="replace"), hostname, 120, proc, log)

    def kill_worker(self, hostname: str) -> None:
        """The worker's host lost: its process group (Celery, its pool, each task's
        supervisor) and the groups of its descendants (Airflow runs each task in a process
        group of its own) SIGKILLed at once."""
        proc = self.workers.pop(hostname)
        groups = {proc.pid}
        for pid in _descendants(proc.pid):
            try:
                groups.add(os.getpgid(pid))
            except ProcessLookupError:
                pass
        for pgid in groups:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        stop(proc, signal.SIGKILL, grace=2)
        for pgid in groups:
            wait_for(lambda g=pgid: not group_alive(g), f"process group {pgid} gone", 10)

    def tail(self, hostname: str, n: int = 3000) -> str:
        f = self.af.home / f"worker-{hostname}.log"
        return f.read_text(errors="replace")[-n:] if f.exists() else ""


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


@pytest.fixture(scope="module")
def celery(pg, s3, mlflow_server, workdir, redis, others_paused) -> Iterator[CeleryStack]:
    af = airflow_config(pg, s3, workdir, name="airflow_celery", specs=(SPECS,))
    pyhost = workdir / "pyhost"
    pyhost.mkdir()
    (pyhost / "stack_hosts.py").write_text(HOSTNAME_MODULE)
    result_backend = "db+" + pg.url("airflow_celery")  # db+postgresql+psycopg2://
    af.env.update(
        {
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CELERY__BROKER_URL": redis.url,
            "AIRFLOW__CELERY__RESULT_BACKEND": result_backend,
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": "2",  # the default worker (core parallelism 2)
            # sending a task to Redis on a busy two-core machine may take more than the 1 s default
            "AIRFLOW__CELERY__OPERATION_TIMEOUT": "10",
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "stack_hosts.hostname",
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(pyhost), os.environ.get("PYTHONPATH")])
            ),
            # a SIGKILLed worker's task is failed (and retried) within ~25 s, not 5 min
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT),
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
        }
    )
    af.env.pop("PIPELINE_EXECUTION_MODE", None)  # auto: queue gpu under Celery
    af.procs["migrate"] = spawn(
        [str(BIN / "airflow"), "db", "migrate"], af.env, af.home / "migrate.log"
    )
    stack = CeleryStack(af=af, workdir=workdir)
    try:
        with serve_airflow(af, mlflow_server, DAG):
            stack.start_worker("default-a", "default", 2, wait=False)
            stack.start_worker("gpu-a", "gpu", 1, wait=False)
            stack.wait_ready("default-a")
            stack.wait_ready("gpu-a")
            land(s3, TRUSTED_EVAL, rows=2000, seed=171)
            yield stack
    finally:
        for hostname in list(stack.workers):  # a cold stop: the tests are done with them
            stop(stack.workers.pop(hostname), signal.SIGQUIT, grace=5)
        for name in list(af.procs):
            af.stop(name)


# --- helpers -----------------------------------------------------------------------------------


def task_instances(af: Airflow, run_id: str) -> dict[str, dict[str, Any]]:
    status, out = af.api("GET", f"dags/{DAG}/dagRuns/{run_id}/taskInstances")
    assert status == 200, (status, out)
    return {t["task_id"]: t for t in out["task_instances"]}


def run_succeeded(stack: CeleryStack, run_id: str, timeout: float = 420) -> None:
    af = stack.af
    state = af.wait_run(DAG, run_id, timeout=timeout)
    assert state == "success", (
        state,
        {k: (t["state"], t["hostname"]) for k, t in task_instances(af, run_id).items()},
        af.tail("scheduler"),
        {h: stack.tail(h, 1500) for h in stack.workers},
        af.task_logs()[-6000:],
    )


def task_succeeded(stack: CeleryStack, run_id: str, task_id: str, timeout: float = 420) -> None:
    """Wait (bounded) for ``task_id`` of the run to succeed; fail if the run fails first."""
    af = stack.af
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if task_instances(af, run_id).get(task_id, {}).get("state") == "success":
            return
        status, out = af.api("GET", f"dags/{DAG}/dagRuns/{run_id}")
        if status == 200 and out.get("state") in ("success", "failed"):
            break
        time.sleep(2)
    run_succeeded(stack, run_id, timeout=1)  # says why, with the logs


def mlflow_runs(run_key: str) -> list[Any]:
    from pipeline import registry

    return registry.client().search_runs(
        [registry.experiment_id()], filter_string=f"tags.`{registry.RUN_KEY_TAG}` = '{run_key}'"
    )


def remote_states(s3, run_key: str) -> list[str]:
    """The complete remote training states of a run (those with a manifest)."""
    out = s3.client().list_objects_v2(Bucket="pipeline", Prefix=f"{STATE_PREFIX}/{run_key}/")
    return sorted(
        o["Key"].split("/")[-2]
        for o in out.get("Contents", [])
        if o["Key"].endswith("/manifest.json")
    )


def the_spec():
    """This model's spec, for the test process's registry calls (experiment, model names)."""
    from pipeline.spec import load_spec, use_spec

    return use_spec(load_spec(SPECS / SPEC / "model.yaml"))


@pytest.fixture(scope="module")
def first(celery, s3) -> dict[str, Any]:
    """One retrain run, uninterrupted: the reference for the resumed one."""
    batch = land(s3, f"{LANDING}/first.parquet", rows=ROWS, seed=SEED)
    t0 = time.monotonic()
    run_id = celery.af.trigger(DAG, {"batch_uri": batch, "force_retrain": True})
    run_succeeded(celery, run_id)
    return {"run_id": run_id, "seconds": time.monotonic() - t0}


# --- the tests ---------------------------------------------------------------------------------


def test_train_model_runs_on_the_gpu_worker_the_rest_on_default(
    celery, first, s3, mlflow_client_env
):
    from pipeline import names

    tis = task_instances(celery.af, first["run_id"])
    ran = {k: t for k, t in tis.items() if t["state"] == "success"}
    assert ran["train_model"]["queue"] == "gpu"
    assert ran["train_model"]["hostname"] == "gpu-a"
    others = {k: (t["queue"], t["hostname"]) for k, t in ran.items() if k != "train_model"}
    assert {"ingest_batch", "validate_batch", "verify_checkpoint", "register_challenger"} <= set(
        others
    )
    assert set(others.values()) == {("default", "default-a")}, others

    run_key = names.run_key(DAG, first["run_id"])
    with the_spec():
        runs = mlflow_runs(run_key)
    assert len(runs) == 1
    assert "train.resumed_from_step" not in runs[0].data.tags
    assert int(runs[0].data.tags["train.steps"]) > 1000  # past both mid-training states
    assert remote_states(s3, run_key) == []  # cleaned up once the checkpoint was published
    print(f"\ncelery: first run {first['seconds']:.0f}s, {runs[0].data.tags['train.steps']} steps")


def test_a_killed_gpu_worker_s_training_resumes_on_another_worker(
    celery, first, s3, mlflow_client_env
):
    from pipeline import names, registry

    af = celery.af
    batch = land(s3, f"{LANDING}/second.parquet", rows=ROWS, seed=SEED)  # the same rows
    t0 = time.monotonic()
    run_id = af.trigger(DAG, {"batch_uri": batch, "force_retrain": True})
    run_key = names.run_key(DAG, run_id)

    # Kill the gpu worker as soon as train_model has a training state in object storage.
    deadline = time.monotonic() + 300
    while not remote_states(s3, run_key):
        assert time.monotonic() < deadline, (
            "no remote training state within 300 s",
            {k: t["state"] for k, t in task_instances(af, run_id).items()},
            celery.tail("gpu-a"),
        )
        time.sleep(0.2)
    celery.kill_worker("gpu-a")
    killed_at = time.monotonic()
    ti = task_instances(af, run_id)["train_model"]
    assert ti["state"] == "running" and ti["hostname"] == "gpu-a", ti
    states = remote_states(s3, run_key)
    assert states and not states[-1].endswith("-final"), states  # killed mid-training
    last = int(states[-1].split("-")[1])

    celery.start_worker("gpu-b", "gpu", 1)  # another host: an empty PIPELINE_HOME
    assert remote_states(s3, run_key) == states  # nothing trained on after the kill
    # the version is registered: the rest of the run (gate, promotion) is the first test's
    task_succeeded(celery, run_id, "register_challenger")
    seconds = time.monotonic() - t0

    ti = task_instances(af, run_id)["train_model"]
    assert (ti["queue"], ti["hostname"], ti["try_number"]) == ("gpu", "gpu-b", 2), ti
    logs = af.task_logs()
    assert f"downloaded from s3://pipeline/{STATE_PREFIX}/{run_key}/{states[-1]}" in logs

    with the_spec():
        runs = mlflow_runs(run_key)
        firsts = mlflow_runs(names.run_key(DAG, first["run_id"]))
        versions = registry.client().search_model_versions(f"name = '{MODEL}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]  # the retry kept the same run
    tags = runs[0].data.tags
    assert tags["train.resumed_from_step"] == str(last)
    assert tags["train.steps"] == firsts[0].data.tags["train.steps"]  # as uninterrupted
    assert len([v for v in versions if v.run_id == runs[0].info.run_id]) == 1, versions
    assert remote_states(s3, run_key) == []
    print(
        f"\ncelery: killed at step >= {last}, retry {time.monotonic() - killed_at:.0f}s after "
        f"the kill; the resumed run took {seconds:.0f}s"
    )
