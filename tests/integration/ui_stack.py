"""A real Airflow + MLflow stack for UI tests, started once per pytest session.

1. a fresh PIPELINE_HOME under pytest's tmp: ``airflow db migrate``, a small landed batch and
   a trusted evaluation set, and one real DAG run (``airflow dags test retrain_card_fraud``) so the
   registry has a model version with its gate report before any UI starts;
2. ``airflow standalone`` (the API server serves our plugin) and ``mlflow ui`` on free ports
   of 127.0.0.1, in their own process groups, stopped with all their children at the end.

Both ``test_trigger_form.py`` and ``test_browser.py`` use it through ``shared_stack()``, so a
session that runs both starts Airflow once.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DAG_ID = "retrain_card_fraud"

_STACK: Stack | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Stack:
    home: Path
    env: dict[str, str]
    airflow_url: str
    mlflow_url: str
    username: str = ""
    password: str = ""
    seed_run_id: str = ""
    seed_version: str = ""
    procs: list[subprocess.Popen] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    # -- Airflow REST API ------------------------------------------------------------------

    def token(self) -> str:
        body = json.dumps({"username": self.username, "password": self.password}).encode()
        req = urllib.request.Request(
            f"{self.airflow_url}/auth/token",
            data=body,
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r)["access_token"]

    def api(
        self, method: str, path: str, body: Any = None, token: str | None = None
    ) -> tuple[int, Any]:
        """(status, parsed JSON or text) of an API call; HTTP errors are returned, not raised."""
        data = None if body is None else json.dumps(body).encode()
        headers = {
            "Content-Type": "application/json",
            "Authorization": f"Bearer {token or self.token()}",
        }
        req = urllib.request.Request(
            f"{self.airflow_url}{path}", data=data, method=method, headers=headers
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            return status, json.loads(raw or b"null")
        except ValueError:
            return status, raw.decode(errors="replace")

    def stop(self) -> None:
        sys.path.insert(0, str(ROOT / "scripts"))
        import airflow_standalone as sa

        for proc in reversed(self.procs):
            sa.stop(proc)
        self.procs.clear()


def _wait_http(url: str, proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=3):
                return True
        except OSError:
            time.sleep(1)
    return False


def start_stack(base: Path) -> Stack:
    sys.path.insert(0, str(ROOT / "scripts"))
    import airflow_standalone as sa

    home = base / "local"
    (home / "airflow").mkdir(parents=True)
    af_port, ml_port = free_port(), free_port()
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AIRFLOW_", "AIRFLOW__", "PIPELINE_", "MLFLOW_TRACKING"))
    }
    clean.update(
        PIPELINE_HOME=str(home),
        AIRFLOW__API__PORT=str(af_port),
        PIPELINE_MLFLOW_UI_URL=f"http://127.0.0.1:{ml_port}",
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="2",
        MLFLOW_HTTP_REQUEST_TIMEOUT="30",
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
    )
    old = os.environ.copy()
    try:  # sa.env() reads os.environ
        os.environ.clear()
        os.environ.update(clean)
        env = sa.env()
    finally:
        os.environ.clear()
        os.environ.update(old)
    stack = Stack(
        home=home,
        env=env,
        airflow_url=f"http://127.0.0.1:{af_port}",
        mlflow_url=f"http://127.0.0.1:{ml_port}",
    )

    t0 = time.perf_counter()
    subprocess.run(
        [str(BIN / "airflow"), "db", "migrate"],
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    stack.timings["db_migrate"] = time.perf_counter() - t0

    # one real run: a small batch, a trusted eval set -> version 1 with its gate report
    t0 = time.perf_counter()
    seed = (
        "from pipeline import storage\n"
        "from pipeline.data.generate import WorldSpec, generate, to_parquet_bytes\n"
        "from pipeline.settings import get_settings\n"
        "root = get_settings().storage_root\n"
        "w = lambda p, s: storage.write_bytes(f'{root}/{p}', to_parquet_bytes(generate(s))).uri\n"
        "print(w('trusted/eval.parquet', WorldSpec(rows=4000, seed=101)))\n"
        "print(w('landing/card_fraud/batch-ui.parquet', WorldSpec(rows=8000, seed=1)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", seed],
        env=env,
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout.split()
    eval_uri, batch_uri = out[-2], out[-1]
    conf = {"batch_uri": batch_uri, "eval_uri": eval_uri, "max_epochs": 12}
    r = subprocess.run(
        [str(BIN / "airflow"), "dags", "test", DAG_ID, "--conf", json.dumps(conf)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    stack.timings["dags_test"] = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError("seeding DAG run failed:\n" + r.stdout[-3000:] + r.stderr[-3000:])

    t0 = time.perf_counter()
    log = (home / "servers.log").open("a")
    stack.procs.append(
        subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "ui",
                "--backend-store-uri",
                f"sqlite:///{home / 'mlflow' / 'mlflow.db'}",
                "--default-artifact-root",
                (home / "mlflow" / "artifacts").as_uri(),
                "--host",
                "127.0.0.1",
                "--port",
                str(ml_port),
                "--workers",
                "1",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    )
    stack.procs.append(
        subprocess.Popen(
            [str(BIN / "airflow"), "standalone"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    )
    try:
        if not sa.wait_healthy(stack.airflow_url, stack.procs[1], timeout=300):
            raise RuntimeError(
                f"airflow standalone never became healthy; see {home / 'servers.log'}"
            )
        if not _wait_http(f"{stack.mlflow_url}/health", stack.procs[0], timeout=120):
            raise RuntimeError(f"mlflow ui never answered; see {home / 'servers.log'}")
        stack.timings["servers_up"] = time.perf_counter() - t0
        pw_file = Path(env["AIRFLOW_HOME"]) / "simple_auth_manager_passwords.json.generated"
        stack.username, stack.password = next(iter(json.loads(pw_file.read_text()).items()))
        # paused: runs triggered by the tests are created and queued, never executed
        status, body = stack.api("PATCH", f"/api/v2/dags/{DAG_ID}", {"is_paused": True})
        assert status == 200, body
        status, runs = stack.api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns?limit=1")
        assert status == 200 and runs["dag_runs"], runs
        stack.seed_run_id = runs["dag_runs"][0]["dag_run_id"]
        ti = f"/api/v2/dags/{DAG_ID}/dagRuns/{urllib.request.quote(stack.seed_run_id, safe='')}"
        status, xcom = stack.api(
            "GET", f"{ti}/taskInstances/register_challenger/xcomEntries/return_value"
        )
        assert status == 200, xcom
        value = xcom["value"] if isinstance(xcom["value"], dict) else json.loads(xcom["value"])
        stack.seed_version = str(value["model_version"])
    except BaseException:
        stack.stop()
        raise
    return stack


def shared_stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Stack:
    """The session's stack, started on first use (from a module-scoped fixture) and stopped
    when the last module of the session that uses it is done (at the latest, at the end)."""
    global _STACK
    if _STACK is None:
        _STACK = start_stack(tmp_path_factory.mktemp("ui-stack"))
        request.config.add_cleanup(_stop_shared)
    request.addfinalizer(lambda: _release(request))
    return _STACK


def _uses_stack(item: pytest.Item) -> bool:
    return getattr(getattr(item, "module", None), "shared_stack", None) is shared_stack


def _release(request: pytest.FixtureRequest) -> None:
    """Stop the stack unless a later test of the session uses it: its servers (a scheduler, a
    triggerer, a DAG processor, an API server, the MLflow UI) would otherwise keep running
    through the rest of the suite. Under pytest-xdist the modules that use it are one work unit
    (tests/conftest.py), so no later one comes to this worker."""
    items = request.session.items
    here = [i for i, item in enumerate(items) if getattr(item, "module", None) is request.module]
    if not any(_uses_stack(item) for item in items[max(here, default=-1) + 1 :]):
        _stop_shared()


def _stop_shared() -> None:
    global _STACK
    if _STACK is not None:
        _STACK.stop()
        _STACK = None
