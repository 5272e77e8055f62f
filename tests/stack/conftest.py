"""The `stack` suite: the pipeline against real servers, started and stopped here.

Session fixtures, each a real process on 127.0.0.1 and a free port:

* ``pg``      PostgreSQL 15: a throw-away cluster (initdb as user ``postgres``), databases
              ``airflow`` and ``mlflow`` with their own login roles (scram passwords).
* ``s3``      moto's server as the S3 API: bucket ``pipeline`` (landing zone, snapshots,
              checkpoints) and bucket ``mlflow`` (MLflow artifacts).
* ``mlflow``  ``mlflow server --app-name basic-auth`` on PostgreSQL, artifacts proxied to
              ``s3://mlflow/artifacts`` on moto (``--serve-artifacts``), one worker, no job runner.
* ``airflow`` api-server + scheduler + dag-processor, LocalExecutor (its workers preloading the
              pipeline: ``plugins/pipeline_executor.py``) on PostgreSQL, parallelism 2, simple
              auth manager, a shared JWT secret. Two users: ``admin`` (triggers the runs) and
              ``reviewer`` (role ``user``: answers approvals, ``test_stack_hitl.py``). Its
              models root links the shipped specs (``models/*``) and the stack-only ones
              (``tests/stack/specs/*``). ``airflow_config`` and ``serve_airflow`` build and
              start it; ``test_stack_celery.py`` makes a second one with them (CeleryExecutor,
              Redis, two workers), last in the suite, with this one paused (``others_paused``).

Every process is started in its own session (``start_new_session=True``) and stopped with
``os.killpg`` (SIGTERM, then SIGKILL) so no child outlives the suite; at the end every port
used is checked free again. Every wait is bounded.
"""

from __future__ import annotations

import importlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

# The stack tests import their helpers as ``from tests.stack.conftest import …``; pytest loads
# this file under another module name first. Registering it under that name too makes those
# imports find this module, not a second copy of it (a copy has its own generated secrets and
# its own PORTS_USED, which the end-of-session port check would not see).
if __name__ != "tests.stack.conftest":
    importlib.import_module("tests.stack")  # its parents first: the dotted name resolves
    sys.modules.setdefault("tests.stack.conftest", sys.modules[__name__])

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
HOST = "127.0.0.1"
S3_KEY, S3_SECRET = "stack-access-key", "stack-s3-" + secrets.token_hex(12)
MLFLOW_ADMIN, MLFLOW_ADMIN_PASSWORD = "admin", "stack-admin-" + secrets.token_hex(12)
AIRFLOW_USER = "admin"
# -- human paths (test_stack_hitl.py): a second Airflow user, role "user" (may answer a
# HITL task, trigger and clear runs; no admin rights), and the stack-only model specs --
REVIEWER = "reviewer"
STACK_SPECS = Path(__file__).parent / "specs"


def _signing_pair() -> tuple[str, str]:
    """A throw-away Ed25519 pair: the PEM private key and its keyring entry (``stack=…``)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from pipeline.signing import keyring_entry

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return pem, keyring_entry("stack", key.public_key())


SIGNING_KEY_PEM, SIGNING_KEYRING = _signing_pair()
PORTS_USED: list[int] = []


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent
    stack = [i for i in items if here in Path(str(i.fspath)).parents]
    for item in stack:
        item.add_marker(pytest.mark.stack)
    # The stack tests run together, after the others (servers up only while needed). The DAG
    # run is the long pole: trigger it first, check it last, the rest runs meanwhile.
    # The scheduling faults (scheduler killed, eight runs at once) need Airflow to themselves:
    # they run at the very end.
    # After the first run (they need its champion) and before the scheduling faults: the
    # retrain checks and the scoring service started from the shipped configs.
    after_first = ("test_stack_retrain.py", "test_stack_shipped_config.py")
    first = [i for i in stack if i.name == "test_trigger_retrain_run"]
    runs = [i for i in stack if Path(str(i.fspath)).name == "test_stack_runs.py"]
    last = [i for i in stack if Path(str(i.fspath)).name in after_first and i not in first]
    # The CeleryExecutor Airflow (test_stack_celery.py) comes after everything else: in one
    # process (`make test-stack`) the LocalExecutor one is paused (SIGSTOP) while it runs, so
    # the two never compete for CPU; `make test` runs it in a process of its own, with its own
    # servers, beside the rest (tests/conftest.py, GROUPS).
    celery = [i for i in stack if Path(str(i.fspath)).name == "test_stack_celery.py"]
    middle = [
        i for i in stack if i not in first and i not in last and i not in runs and i not in celery
    ]
    items[:] = [i for i in items if i not in stack] + first + middle + last + runs + celery


# --- process helpers ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    PORTS_USED.append(port)
    return port


def port_open(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=0.5).close()
        return True
    except OSError:
        return False


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user in the group (postgres)
        return True
    return True


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 20.0) -> None:
    """Signal the whole process group, wait (bounded), then SIGKILL what is left."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and group_alive(proc.pid):
        proc.poll()
        time.sleep(0.2)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def spawn(cmd: list[str], env: dict[str, str], log: Path, **kw: Any) -> subprocess.Popen:
    with log.open("ab") as fh:
        return subprocess.Popen(
            cmd,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=kw.pop("cwd", ROOT),
            start_new_session=True,
            **kw,
        )


def wait_for(
    check: Callable[[], bool],
    what: str,
    timeout: float,
    proc: subprocess.Popen | None = None,
    log: Path | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise RuntimeError(
        f"{what} not ready within {timeout:.0f}s (exit {proc and proc.poll()})\n{tail}"
    )


def http(
    method: str,
    url: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    auth: tuple[str, str] | None = None,
    timeout: float = 15,
) -> tuple[int, Any]:
    """One HTTP call: (status, parsed JSON or text). Never raises on HTTP errors."""
    import base64

    data = json.dumps(body).encode() if body is not None else None
    h = {"Content-Type": "application/json", **(headers or {})}
    if auth:
        h["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    req = urllib.request.Request(url, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


# --- PostgreSQL ------------------------------------------------------------------------------


@dataclass
class Postgres:
    port: int
    passwords: dict[str, str]
    dir: Path

    def url(self, db: str, driver: str = "psycopg2") -> str:
        return f"postgresql+{driver}://{db}:{self.passwords[db]}@{HOST}:{self.port}/{db}"

    def create_database(self, db: str) -> None:
        """Another database in this cluster, owned by a login role of the same name."""
        if db in self.passwords:
            return
        pw = pwd.getpwnam("postgres")
        password = secrets.token_hex(12)
        for stmt in (
            f"CREATE ROLE {db} LOGIN PASSWORD '{password}'",
            f"CREATE DATABASE {db} OWNER {db}",
            f"REVOKE ALL ON DATABASE {db} FROM PUBLIC",
        ):
            subprocess.run(
                [str(PG_BIN / "psql"), "-h", str(self.dir / "sock"), "-p", str(self.port)]
                + ["-U", "postgres", "-v", "ON_ERROR_STOP=1", "-c", stmt],
                env={"PATH": os.environ["PATH"], "LANG": "C.UTF-8"},
                check=True,
                capture_output=True,
                timeout=60,
                user=pw.pw_uid,
                group=pw.pw_gid,
                extra_groups=[],
                cwd=self.dir,
            )
        self.passwords[db] = password


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="stack-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def pg(workdir: Path) -> Iterator[Postgres]:
    if not (PG_BIN / "postgres").exists():
        pytest.skip(f"PostgreSQL 15 binaries not found in {PG_BIN}")
    pw = pwd.getpwnam("postgres")
    base = workdir / "pg"
    base.mkdir()
    os.chown(base, pw.pw_uid, pw.pw_gid)
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    os.chown(sock, pw.pw_uid, pw.pw_gid)
    su_pw = secrets.token_hex(12)
    pwfile = base / "pw"
    pwfile.write_text(su_pw)
    os.chown(pwfile, pw.pw_uid, pw.pw_gid)
    as_pg = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": [], "cwd": base}
    env = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8"}
    subprocess.run(
        [
            str(PG_BIN / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "--pwfile",
            str(pwfile),
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--no-sync",
        ],
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
        **as_pg,
    )
    pwfile.unlink()
    port = free_port()
    log = base / "postgres.log"
    proc = spawn(
        [
            str(PG_BIN / "postgres"),
            "-D",
            str(data),
            "-p",
            str(port),
            "-k",
            str(sock),
            "-c",
            f"listen_addresses={HOST}",
            "-c",
            "fsync=off",
            "-c",
            "max_connections=200",
            "-c",
            "shared_buffers=64MB",
        ],
        env,
        log,
        **as_pg,
    )
    psql = [
        str(PG_BIN / "psql"),
        "-h",
        str(sock),
        "-p",
        str(port),
        "-U",
        "postgres",
        "-v",
        "ON_ERROR_STOP=1",
    ]
    try:
        wait_for(
            lambda: (
                subprocess.run(
                    [str(PG_BIN / "pg_isready"), "-h", str(sock), "-p", str(port)],
                    capture_output=True,
                ).returncode
                == 0
            ),
            "postgres",
            60,
            proc,
            log,
        )
        passwords = {db: secrets.token_hex(12) for db in ("airflow", "mlflow")}
        sql = "".join(
            f"CREATE ROLE {db} LOGIN PASSWORD '{p}'; CREATE DATABASE {db} OWNER {db}; "
            f"REVOKE ALL ON DATABASE {db} FROM PUBLIC;\n"
            for db, p in passwords.items()
        )
        for stmt in sql.replace("; ", ";\n").splitlines():  # CREATE DATABASE: one per call
            subprocess.run(
                [*psql, "-c", stmt], env=env, check=True, capture_output=True, timeout=60, **as_pg
            )
        yield Postgres(port=port, passwords=passwords, dir=base)
    finally:
        stop(proc, signal.SIGINT)  # fast shutdown


# --- S3 (moto) -------------------------------------------------------------------------------


@dataclass
class S3:
    endpoint: str
    env: dict[str, str]

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=S3_KEY,
            aws_secret_access_key=S3_SECRET,
            region_name="us-east-1",
        )


@pytest.fixture(scope="session")
def s3(workdir: Path) -> Iterator[S3]:
    port = free_port()
    log = workdir / "moto.log"
    # moto's request recorder (off unless a test starts it: test_stack_shipped_config.py)
    # writes here, not into the repository (its default is ./moto_recording).
    env = {**os.environ, "MOTO_RECORDER_FILEPATH": str(workdir / "moto-recording.jsonl")}
    proc = spawn([str(BIN / "moto_server"), "-H", HOST, "-p", str(port)], env, log)
    try:
        wait_for(lambda: port_open(port), "moto_server", 60, proc, log)
        s = S3(
            endpoint=f"http://{HOST}:{port}",
            env={
                "AWS_ACCESS_KEY_ID": S3_KEY,
                "AWS_SECRET_ACCESS_KEY": S3_SECRET,
                "AWS_DEFAULT_REGION": "us-east-1",
            },
        )
        for bucket in ("pipeline", "mlflow"):
            s.client().create_bucket(Bucket=bucket)
        yield s
    finally:
        stop(proc)


# --- MLflow ----------------------------------------------------------------------------------


@dataclass
class MlflowServer:
    url: str
    port: int
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen | None = None
    admin: tuple[str, str] = (MLFLOW_ADMIN, MLFLOW_ADMIN_PASSWORD)

    def start(self, timeout: float = 120) -> None:
        cmd = [
            str(BIN / "mlflow"),
            "server",
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--serve-artifacts",
            "--artifacts-destination",
            "s3://mlflow/artifacts",
            "--app-name",
            "basic-auth",
        ]
        self.proc = spawn(cmd, self.env, self.log)
        wait_for(
            lambda: http("GET", f"{self.url}/health", timeout=3)[0] == 200,
            "mlflow server",
            timeout,
            self.proc,
            self.log,
        )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM: a clean stop; SIGKILL: the server dies at once (a crash, a lost node)."""
        if self.proc is not None:
            stop(self.proc, sig)
            self.proc = None

    def api(self, method: str, path: str, body: Any = None, auth: tuple[str, str] | None = None):
        return http(method, f"{self.url}/api/2.0/mlflow/{path}", body, auth=auth or self.admin)


def mlflow_env(pg: Postgres, s3: S3, workdir: Path) -> dict[str, str]:
    ini = workdir / "basic_auth.ini"
    if not ini.exists():
        ini.write_text(
            "[mlflow]\ndefault_permission = READ\n"
            f"database_uri = {pg.url('mlflow')}\nadmin_username = {MLFLOW_ADMIN}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            "auth_cache_ttl_seconds = 60\n"
        )
        ini.chmod(0o600)
    return {
        **os.environ,
        **s3.env,
        "MLFLOW_BACKEND_STORE_URI": pg.url("mlflow"),  # by env: the password stays off `ps`
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        "MLFLOW_AUTH_ADMIN_PASSWORD": MLFLOW_ADMIN_PASSWORD,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        "MLFLOW_S3_ENDPOINT_URL": s3.endpoint,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }


@pytest.fixture(scope="session")
def mlflow_server(pg: Postgres, s3: S3, workdir: Path) -> Iterator[MlflowServer]:
    # No Airflow here: the tests that need only PostgreSQL, S3 and MLflow (faults, security) may
    # run in a process of their own (`make test`). Where Airflow is wanted too, ``airflow``
    # asks for ``airflow_migrated`` first, so `airflow db migrate` still overlaps this start.
    port = free_port()
    server = MlflowServer(
        url=f"http://{HOST}:{port}",
        port=port,
        env=mlflow_env(pg, s3, workdir),
        log=workdir / "mlflow.log",
    )
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def mlflow_client_env(
    mlflow_server: MlflowServer, s3: S3, tmp_path: Path, monkeypatch
) -> MlflowServer:
    """Point this test process's pipeline + MLflow client at the stack (fail-fast client)."""
    env = {
        "PIPELINE_HOME": str(tmp_path / "home"),
        "PIPELINE_MLFLOW_TRACKING_URI": mlflow_server.url,
        "PIPELINE_MLFLOW_ARTIFACT_URI": "mlflow-artifacts:/pipeline",
        "PIPELINE_STORAGE_URI": "s3://pipeline/data",
        "PIPELINE_S3_ENDPOINT_URL": s3.endpoint,
        "MLFLOW_TRACKING_USERNAME": MLFLOW_ADMIN,
        "MLFLOW_TRACKING_PASSWORD": MLFLOW_ADMIN_PASSWORD,
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
        **s3.env,
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    from pipeline import registry, settings

    settings.get_settings.cache_clear()
    registry.client.cache_clear()
    yield mlflow_server
    settings.get_settings.cache_clear()
    registry.client.cache_clear()


# --- the first retrain_card_fraud run (triggered first, checked last) ---

#: the reference model's spec (models/card_fraud/model.yaml): its DAG, registered model,
#: experiment, and where its batches and trusted set live under the storage root
#: (PIPELINE_STORAGE_URI=s3://pipeline/data)
SPEC_NAME = "card_fraud"
DAG_ID = f"retrain_{SPEC_NAME}"
MODEL = "card-fraud"
EXPERIMENT = f"retrain_{SPEC_NAME}"
LANDING = f"data/landing/{SPEC_NAME}"  # bucket keys: the spec's landing prefix
TRUSTED_EVAL = f"data/trusted/{SPEC_NAME}/eval.parquet"  # the spec's evaluation.uri


def land(s3, key: str, **spec: Any) -> str:
    from pipeline.data.generate import WorldSpec, generate, to_parquet_bytes

    s3.client().put_object(
        Bucket="pipeline", Key=key, Body=to_parquet_bytes(generate(WorldSpec(**spec)))
    )
    return f"s3://pipeline/{key}"


@pytest.fixture(scope="session")
def retrain_triggered(airflow, s3, mlflow_server) -> dict[str, Any]:
    batch = land(s3, f"{LANDING}/stack/batch.parquet", rows=3000, seed=1)
    eval_uri = land(s3, TRUSTED_EVAL, rows=2000, seed=101)
    # The spec's policy (roc_auc floor 0.7, latency 250 ms, max_epochs 30 with the plateau
    # stopper: ~20 epochs here) and trusted set: a run may only tighten them.
    conf = {"batch_uri": batch, "force_retrain": True}
    t0 = time.monotonic()
    return {"run_id": airflow.trigger(DAG_ID, conf), "t0": t0, "batch": batch, "eval": eval_uri}


@pytest.fixture(scope="session")
def first_run(retrain_triggered, airflow) -> dict[str, Any]:
    run_id, t0 = retrain_triggered["run_id"], retrain_triggered["t0"]
    batch, eval_uri = retrain_triggered["batch"], retrain_triggered["eval"]
    state = airflow.wait_run(DAG_ID, run_id, timeout=480)
    states = airflow.task_states(DAG_ID, run_id)
    assert state == "success", (
        state,
        states,
        airflow.tail("scheduler"),
        airflow.task_logs()[-6000:],
    )
    return {
        "run_id": run_id,
        "batch": batch,
        "eval": eval_uri,
        "seconds": time.monotonic() - t0,
        "states": states,
    }


# --- Airflow ---------------------------------------------------------------------------------


@dataclass
class Airflow:
    url: str
    env: dict[str, str]
    home: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    _token: str = ""

    def start(self, component: str) -> None:
        cmd = {
            "api-server": ["api-server", "-H", HOST, "-p", self.url.rsplit(":", 1)[1], "-w", "1"],
            "scheduler": ["scheduler"],
            "dag-processor": ["dag-processor"],
        }[component]
        self.procs[component] = spawn(
            [str(BIN / "airflow"), *cmd], self.env, self.home / f"{component}.log"
        )

    def stop(self, component: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(component, None)
        if proc is not None:
            stop(proc, sig, grace=20 if sig == signal.SIGTERM else 2)

    def password(self, user: str = AIRFLOW_USER) -> str:
        """The simple auth manager's generated password for ``user`` (written by the
        api-server to its passwords file on first start)."""
        pwfile = self.home / "simple_auth_manager_passwords.json"
        return json.loads(pwfile.read_text())[user]

    def producer_env(self) -> dict[str, str]:
        """The environment of a producer outside Airflow (``python -m pipeline data land``):
        the pipeline's storage (S3), the Airflow API's URL and credentials; no Airflow config."""
        env = {k: v for k, v in self.env.items() if not k.startswith("AIRFLOW")}
        env.update(
            {
                "PIPELINE_AIRFLOW_API_URL": self.url,
                "PIPELINE_AIRFLOW_USERNAME": AIRFLOW_USER,
                "PIPELINE_AIRFLOW_PASSWORD": self.password(),
            }
        )
        env.pop("PIPELINE_AIRFLOW_TOKEN", None)
        return env

    def token(self) -> str:
        if not self._token:
            status, body = http(
                "POST",
                f"{self.url}/auth/token",
                {"username": AIRFLOW_USER, "password": self.password()},
            )
            assert status in (200, 201), (status, body)
            self._token = body["access_token"]
        return self._token

    def api(self, method: str, path: str, body: Any = None, timeout: float = 30):
        return http(
            method,
            f"{self.url}/api/v2/{path}",
            body,
            headers={"Authorization": f"Bearer {self.token()}"},
            timeout=timeout,
        )

    # -- human paths (test_stack_hitl.py): the REST API as another user (its own JWT) --
    def api_as(self, user: str, method: str, path: str, body: Any = None, timeout: float = 30):
        status, out = http(
            "POST", f"{self.url}/auth/token", {"username": user, "password": self.password(user)}
        )
        assert status in (200, 201), (user, status, out)
        return http(
            method,
            f"{self.url}/api/v2/{path}",
            body,
            headers={"Authorization": f"Bearer {out['access_token']}"},
            timeout=timeout,
        )

    def trigger(self, dag_id: str, conf: dict[str, Any], run_id: str | None = None) -> str:
        body = {"logical_date": None, "conf": conf, **({"dag_run_id": run_id} if run_id else {})}
        status, out = self.api("POST", f"dags/{dag_id}/dagRuns", body)
        assert status == 200, (status, out)
        return out["dag_run_id"]

    def wait_run(self, dag_id: str, run_id: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        state = "?"
        while time.monotonic() < deadline:
            status, out = self.api("GET", f"dags/{dag_id}/dagRuns/{run_id}")
            state = out.get("state", "?") if status == 200 else "?"
            if state in ("success", "failed"):
                return state
            for name, proc in self.procs.items():
                assert proc.poll() is None, f"airflow {name} exited: {self.tail(name)}"
            time.sleep(2)
        return f"timeout (last state {state})"

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str]:
        _, out = self.api("GET", f"dags/{dag_id}/dagRuns/{run_id}/taskInstances")
        return {t["task_id"]: t["state"] for t in out.get("task_instances", [])}

    def tail(self, component: str, n: int = 3000) -> str:
        f = self.home / f"{component}.log"
        return f.read_text(errors="replace")[-n:] if f.exists() else ""

    def task_logs(self) -> str:
        return "\n".join(
            p.read_text(errors="replace") for p in sorted((self.home / "logs").rglob("*.log"))
        )


def airflow_config(
    pg: Postgres,
    s3: S3,
    workdir: Path,
    name: str = "airflow",
    specs: tuple[Path, ...] = (ROOT / "models", STACK_SPECS),
) -> Airflow:
    """An Airflow's home ``workdir/<name>``, its environment and its database ``<name>`` in
    ``pg`` (the suite's LocalExecutor one by default; test_stack_celery.py makes a second,
    changing the executor), with a models root of the specs under ``specs``."""
    home = workdir / name
    home.mkdir()
    # human paths (test_stack_hitl.py): the shipped specs (models/*) and the stack-only ones
    # (tests/stack/specs/*), linked into one models root that the DAGs and tasks read
    models = workdir / ("models" if name == "airflow" else f"models-{name}")
    models.mkdir()
    for spec_dir in [d for folder in specs for d in folder.iterdir()]:
        if (spec_dir / "model.yaml").is_file():
            (models / spec_dir.name).symlink_to(spec_dir, target_is_directory=True)
    pg.create_database(name)
    api_port = free_port()
    env = {
        **os.environ,
        **s3.env,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        # Airflow's LocalExecutor, its workers preloading the pipeline (plugins/pipeline_executor.py)
        "AIRFLOW__CORE__EXECUTOR": "pipeline_executor.PreloadingLocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "2",
        "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "2",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{AIRFLOW_USER}:admin,{REVIEWER}:user",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(
            home / "simple_auth_manager_passwords.json"
        ),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://{HOST}:{api_port}/execution/",
        "AIRFLOW__CORE__FERNET_KEY": "",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": pg.url(name),
        "AIRFLOW__API__HOST": HOST,
        "AIRFLOW__API__PORT": str(api_port),
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
        # On: asset-triggered runs are created by the same scheduler loop as cron runs
        # (use_job_schedule=False would drop both). The only cron is retrain_card_fraud's
        # 03:00 UTC (catchup off): unpausing creates a run for the latest slot gone by, failed
        # at once (_fail_the_catchup_run); a suite running across 03:00 gets one more, which
        # finds no batch in its date folder and fails at ingest_batch (after its retries, about
        # a minute in the queue of max_active_runs=1), leaving no model version; the tests
        # look only at the runs they start.
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "True",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
        # a worker is freed within 1 s of its task's end, not 5 (plugins/pipeline_executor.py)
        "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
        "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "300",
        # A killed scheduler's running tasks are found within ~30 s, not the 5 min default
        # (test_stack_runs.py); the deploy guide says what these cost in production.
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "30",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD": "15",
        "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "15",
        # human paths: an approval past its response timeout is resolved within 5 s (the
        # scheduler's awaiting_input sweep runs on this interval; default 15 s)
        "AIRFLOW__SCHEDULER__TRIGGER_TIMEOUT_CHECK_INTERVAL": "5",
        "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
        "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "600",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        # the pipeline inside every task
        "PIPELINE_HOME": str(workdir / "pipeline-home"),
        "PIPELINE_MODELS_ROOT": str(models),
        "PIPELINE_STORAGE_URI": "s3://pipeline/data",
        "PIPELINE_S3_ENDPOINT_URL": s3.endpoint,
        # Through the server's artifact proxy. Not "mlflow-artifacts:/": joined with the
        # experiment name that gives mlflow-artifacts://retrain_card_fraud, a *host* the server
        # refuses (MLflow 3.17 host policy); a path keeps it host-less.
        "PIPELINE_MLFLOW_ARTIFACT_URI": "mlflow-artifacts:/pipeline",
        # the trainer's Ed25519 key (a task's private key) and the keyring that trusts it
        "PIPELINE_SIGNING_KEY": SIGNING_KEY_PEM,
        "PIPELINE_SIGNING_KEY_ID": "stack",
        "PIPELINE_SIGNING_PUBLIC_KEYS": SIGNING_KEYRING,
        "PIPELINE_DEVICE": "cpu",
        "MLFLOW_TRACKING_USERNAME": MLFLOW_ADMIN,
        "MLFLOW_TRACKING_PASSWORD": MLFLOW_ADMIN_PASSWORD,
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
        # A Connection whose secret must never reach MLflow or the task logs unmasked.
        "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(
            {
                "conn_type": "aws",
                "login": S3_KEY,
                "password": S3_SECRET,
                "extra": {"endpoint_url": s3.endpoint},
            }
        ),
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    for var in ("PIPELINE_EVAL_URI", "PIPELINE_EXECUTION_MODE", "PIPELINE_MLFLOW_TRACKING_URI"):
        env.pop(var, None)
    return Airflow(url=f"http://{HOST}:{api_port}", env=env, home=home)


@pytest.fixture(scope="session")
def airflow_migrated(pg: Postgres, s3: S3, workdir: Path) -> Iterator[Airflow]:
    """Environment + `airflow db migrate`, started early so it overlaps MLflow's start."""
    af = airflow_config(pg, s3, workdir)
    log = af.home / "migrate.log"
    af.procs["migrate"] = spawn([str(BIN / "airflow"), "db", "migrate"], af.env, log)
    try:
        yield af
    finally:
        for name in list(af.procs):
            af.stop(name)


SERVING: list[Airflow] = []  # the Airflows up now (test_stack_celery.py pauses the others)


@pytest.fixture(scope="session")
def airflow(airflow_migrated: Airflow, mlflow_server: MlflowServer) -> Iterator[Airflow]:
    with serve_airflow(airflow_migrated, mlflow_server, DAG_ID) as af:
        _fail_the_catchup_run(af)
        yield af


@contextmanager
def serve_airflow(af: Airflow, mlflow_server: MlflowServer, dag_id: str) -> Iterator[Airflow]:
    """Wait for ``af``'s migration, start its api-server, dag-processor and scheduler, make
    the ``gpu`` pool, wait for ``dag_id`` to be parsed and unpause it; stop them on exit."""
    af.env["PIPELINE_MLFLOW_TRACKING_URI"] = mlflow_server.url
    # the credentials the server was started with
    af.env["MLFLOW_TRACKING_USERNAME"], af.env["MLFLOW_TRACKING_PASSWORD"] = mlflow_server.admin
    migrate = af.procs.pop("migrate")
    try:
        rc = migrate.wait(timeout=300)
    except subprocess.TimeoutExpired:
        stop(migrate)
        raise
    assert rc == 0, (af.home / "migrate.log").read_text()[-3000:]
    for component in ("api-server", "dag-processor", "scheduler"):
        af.start(component)
    try:
        wait_for(
            lambda: http("GET", f"{af.url}/api/v2/monitor/health", timeout=3)[0] == 200,
            "airflow api-server",
            180,
            af.procs["api-server"],
            af.home / "api-server.log",
        )
        status, out = af.api(
            "POST", "pools", {"name": "gpu", "slots": 1, "description": "GPU slots"}
        )
        assert status in (200, 201, 409), (status, out)
        wait_for(
            lambda: af.api("GET", f"dags/{dag_id}")[0] == 200,
            f"{dag_id} parsed",
            180,
            af.procs["dag-processor"],
            af.home / "dag-processor.log",
        )
        status, out = af.api("PATCH", f"dags/{dag_id}", {"is_paused": False})
        assert status == 200, (status, out)
        SERVING.append(af)
        yield af
    finally:
        if af in SERVING:
            SERVING.remove(af)
        for name in ("scheduler", "dag-processor", "api-server"):
            af.stop(name)


def _fail_the_catchup_run(af: Airflow, timeout: float = 60) -> None:
    """Unpaused, the DAG gets one cron run at once: with catchup off Airflow still runs the
    latest slot gone by (today's 03:00 UTC, whatever the hour). Its date folder holds no batch,
    so it would fail at ingest_batch only after its retries (about two minutes), and with
    max_active_runs=1 the suite's first run would queue behind it. It is marked failed as soon
    as it appears (as an operator would); the tests look only at the runs they start."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, out = af.api("GET", f"dags/{DAG_ID}/dagRuns?limit=100")
        cron = [
            r["dag_run_id"]
            for r in (out.get("dag_runs", []) if status == 200 else [])
            if r.get("run_type") == "scheduled"
        ]
        if cron:
            for run_id in cron:
                path = f"dags/{DAG_ID}/dagRuns/{urllib.request.quote(run_id, safe='')}"
                for _ in range(10):  # the scheduler may hold the run's rows: a 500, then retry
                    status, out = af.api("PATCH", path, {"state": "failed"})
                    if status < 500:
                        break
                    time.sleep(1)
                assert status == 200, (status, out)
            return
        time.sleep(0.5)


@pytest.fixture(scope="module")
def others_paused() -> Iterator[None]:
    """The Airflows serving now in this process (the suite's LocalExecutor one, when the
    module runs in the same process as the rest of the stack) SIGSTOPped for a module that
    brings its own (test_stack_celery.py), SIGCONTed after it: on two cores, an idle
    scheduler and dag-processor still cost CPU. None in a process of its own."""
    procs = [p for af in SERVING for p in af.procs.values() if p.poll() is None]
    for p in procs:
        os.killpg(p.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="session", autouse=True)
def ports_free_at_end() -> Iterator[None]:
    yield
    still = [p for p in PORTS_USED if port_open(p)]
    assert not still, f"ports still answering after the stack stopped: {still}"
