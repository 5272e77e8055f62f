"""`make airflow`: the Airflow UI on the embedded default, bound to 127.0.0.1.

Runs `airflow standalone` (api-server, scheduler, dag-processor, triggerer) in its own
process group with bounded parallelism, waits until it is healthy, prints the URL and
the login, and on Ctrl-C / SIGTERM stops the whole group — children included — so the
next start does not find a port or PID still taken. `--probe` starts, checks, and stops.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def env() -> dict[str, str]:
    home = Path(os.environ.get("PIPELINE_HOME", ROOT / ".local")).resolve()
    e = dict(os.environ)
    # standalone starts its components as `airflow …` from PATH: put this venv first
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e.get('PATH', '')}"
    e.setdefault("PIPELINE_HOME", str(home))
    e.setdefault("AIRFLOW_HOME", str(home / "airflow"))
    e.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(ROOT / "dags"))
    e.setdefault("AIRFLOW__CORE__PLUGINS_FOLDER", str(ROOT / "plugins"))
    e.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    e.setdefault(
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", f"sqlite:///{home / 'airflow' / 'airflow.db'}"
    )
    e.setdefault("AIRFLOW__API__HOST", "127.0.0.1")
    e.setdefault("AIRFLOW__API__PORT", "8080")
    e.setdefault("AIRFLOW__API__WORKERS", "1")
    # tasks report to the API server they were started by (Airflow's default assumes :8080)
    e.setdefault(
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL",
        f"http://{e['AIRFLOW__API__HOST']}:{e['AIRFLOW__API__PORT']}/execution/",
    )
    e.setdefault("AIRFLOW__CORE__PARALLELISM", "4")
    e.setdefault("AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG", "4")
    e.setdefault("AIRFLOW__SCHEDULER__PARSING_PROCESSES", "1")
    e.setdefault("AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES", "1")
    e.setdefault("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", "admin:admin")
    return e


def stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM the whole process group, then SIGKILL whatever is left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + grace
    while time.time() < deadline and _group_alive(proc.pid):  # children too, not just the parent
        proc.poll()
        time.sleep(0.5)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 240) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{url}/api/v2/monitor/health", timeout=3) as r:
                health = json.load(r)
            if health.get("metadatabase", {}).get("status") == "healthy":
                return True
        except OSError:
            pass
        time.sleep(2)
    return False


def login(e: dict[str, str]) -> str:
    f = Path(e["AIRFLOW_HOME"]) / "simple_auth_manager_passwords.json.generated"
    if f.exists():
        return ", ".join(f"{u} / {p}" for u, p in json.loads(f.read_text()).items())
    return "see the standalone log"


def main(argv: list[str]) -> int:
    e = env()
    Path(e["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    url = f"http://{e['AIRFLOW__API__HOST']}:{e['AIRFLOW__API__PORT']}"
    log_path = Path(e["AIRFLOW_HOME"]) / "standalone.log"
    with log_path.open("a") as log:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("airflow")), "standalone"],
            env=e,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        print(f"starting airflow standalone (log: {log_path}) ...", flush=True)
        if not wait_healthy(url, proc):
            print(f"Airflow did not become healthy; see {log_path}", file=sys.stderr)
            return 1
        print(
            f"Airflow UI: {url}   login: {login(e)}   (Ctrl-C stops it and all its children)",
            flush=True,
        )
        if "--probe" in argv:
            return 0
        while proc.poll() is None:
            time.sleep(1)
        return proc.returncode or 0
    except KeyboardInterrupt:
        return 0
    finally:
        stop(proc)
        print("airflow standalone stopped", flush=True)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
