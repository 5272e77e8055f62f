"""Benchmark: the scoring service against ``mlflow models serve`` on the same registered version.

``python -m benchmarks.serving_vs_mlflow`` (about two minutes; everything on 127.0.0.1
under a temporary PIPELINE_HOME with a local ``sqlite:///`` MLflow tracking/registry):

1. One small model is trained, its signed checkpoint published and registered the way
   ``register_challenger`` does it (an MLflow pyfunc *from code*,
   ``registry.log_serving_model``), gate-accepted and aliased ``champion``
   (``benchmarks.serving_canary._setup``).
2. Both servers are started by the benchmark, each in its own process group, on free
   loopback ports, one uvicorn worker each: ours, ``python -m pipeline serve`` (serving
   ``champion``), and ``mlflow models serve -m models:/<name>/<version> --env-manager local
   -w 1`` on that same version. Each is stopped by ``killpg`` (SIGTERM, then SIGKILL after
   a bounded wait), whatever happens.
3. Agreement first: the same rows (256 single rows, one 256-row batch) go to both; the
   scores must agree (positive-class probability; ``atol`` 1e-5) or the benchmark stops
   with exit 1 — a comparison with a server that answers errors is worthless.
4. Load, per request mix — ``single`` (one row per request) and ``batch256`` (256 rows per
   request): a closed loop of ``--concurrency`` client threads (4 by default), each on its
   own keep-alive ``http.client`` connection, for ``--seconds`` per phase; phases
   alternate between the two servers (ours, theirs / theirs, ours, ...) for
   ``--rounds`` rounds after a discarded warm-up phase each, so a noisy neighbour hits
   both. Every response is checked (200, and its scores equal the expected ones).
   Requests in each server's own format with the same rows: ours ``POST /predict`` with
   the rows as JSON objects, MLflow ``POST /invocations`` with ``{"dataframe_split": ...}``
   (the smaller of its two DataFrame formats; ``--mlflow-format records`` picks
   ``dataframe_records``). Neither server writes an access-log line per request (ours
   never does; MLflow's uvicorn is started with ``UVICORN_ACCESS_LOG=false``), and each
   keeps its own torch thread setting (ours 1, ``serve --torch-threads``; MLflow
   torch's default, one per core).

Concurrency 4: one worker per server on a 2-core machine is saturated by two requests in
flight (one being parsed while the other is scored); four keeps it saturated without
the client's own CPU (reported as ``client_cpu_share``, the client's CPU seconds over wall
seconds) becoming what is measured. Server CPU per request (every process of the
server's group, from ``/proc``) is reported too: the cost, independent of the client.

The last line is one JSON object (``benchmarks._targets.finish``): ``rps_ratio``
(ours/theirs requests/s) and ``p99_ratio`` (ours/theirs p99 latency), each the worst of
the two mixes (the lowest rps ratio, the highest p99 ratio), with the per-mix figures
(requests/s, p50, p99, server CPU per request, client CPU share) under ``mixes``; one
target per mix and ratio (``rps_ratio_single >= 2``, ``p99_ratio_single <= 0.5``, the
same for ``batch256``), so ``met`` holds only when every mix meets both.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks._targets import finish, target
from benchmarks.serving_canary import ROOT, _free_port, _setup

MIXES = {"single": 1, "batch256": 256}
RPS_TARGET, P99_TARGET = 2, 0.5  # ours/theirs: at least twice the requests/s, half the p99
ATOL = 1e-5
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- servers ------------------------------------------------------------------------------------


@dataclass
class Server:
    """One server process group: started detached, stopped with killpg."""

    name: str
    argv: list[str]
    ready_path: str
    log_path: Path
    port: int = field(default_factory=_free_port)
    proc: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def start(self, env: dict[str, str]) -> None:
        log = self.log_path.open("wb")
        try:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: killpg reaches its children
            )
        finally:
            log.close()

    def wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} before it was ready; "
                    f"its log ends:\n{self.log_tail()}"
                )
            try:
                c = http.client.HTTPConnection(self.host, self.port, timeout=2)
                c.request("GET", self.ready_path)
                r = c.getresponse()
                r.read()
                c.close()
                if r.status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(
            f"{self.name} was not ready on port {self.port} within {timeout:.0f} s "
            f"(GET {self.ready_path}); its log ends:\n{self.log_tail()}"
        )

    def pids(self) -> list[int]:
        """Every live (not zombie) process of the server's process group."""
        if self.proc is None:
            return []
        out = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == self.proc.pid and fields[0] != "Z":  # pgrp, state
                out.append(int(d.name))
        return out

    def cpu_seconds(self) -> float:
        """User + system CPU of the group's live processes."""
        total = 0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / CLK_TCK

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM to the whole group, SIGKILL to what is left after ``grace`` seconds:
        the group, not only the process started (``mlflow models serve`` runs uvicorn as
        its child, which may outlive it)."""
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break  # nothing left in the group
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                self.proc.poll()  # reap the leader
                if not self.pids():
                    break
                time.sleep(0.1)
            else:
                continue
            break
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


# -- requests and expected answers ------------------------------------------------------------


@dataclass(frozen=True)
class Mix:
    """The bodies one mix sends to each server, and the scores each must answer."""

    name: str
    ours: list[bytes]
    theirs: list[bytes]
    expected: list[list[float]]  # per body: the positive-class probability per row


def _rows(n: int, seed: int) -> tuple[list[dict[str, Any]], list[str]]:
    from pipeline.data.generate import WorldSpec, generate
    from pipeline.spec import active

    df = generate(WorldSpec(rows=n, seed=seed))
    cols = [c.name for c in active().contract_obj().features]
    rows = df[cols].astype(object).where(df[cols].notna(), None).to_dict(orient="records")
    return rows, cols


def ours_body(rows: list[dict[str, Any]]) -> bytes:
    return json.dumps(rows[0] if len(rows) == 1 else rows).encode()


def mlflow_body(rows: list[dict[str, Any]], columns: list[str], fmt: str) -> bytes:
    if fmt == "records":
        return json.dumps({"dataframe_records": rows}).encode()
    return json.dumps(
        {"dataframe_split": {"columns": columns, "data": [[r[c] for c in columns] for r in rows]}}
    ).encode()


def ours_scores(payload: bytes) -> list[float]:
    return json.loads(payload)["scores"]


def mlflow_scores(payload: bytes, column: str) -> list[float]:
    preds = json.loads(payload)["predictions"]
    return [p[column] for p in preds]


def agree(a: Sequence[float], b: Sequence[float], atol: float = ATOL) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= atol for x, y in zip(a, b, strict=True))


def _post(conn: http.client.HTTPConnection, path: str, body: bytes) -> tuple[int, bytes]:
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, r.read()


# -- the load generator -----------------------------------------------------------------------


@dataclass
class Phase:
    latencies_ms: list[float]
    requests: int
    wall_s: float
    client_cpu_s: float
    server_cpu_s: float


def drive(
    server: Server,
    path: str,
    bodies: list[bytes],
    check: Callable[[int, bytes], str | None],
    *,
    concurrency: int,
    seconds: float,
) -> Phase:
    """A closed loop of ``concurrency`` keep-alive connections for ``seconds``; every answer
    is checked (``check(body index, payload)`` returns a problem or None)."""
    lat: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[str] = []
    start = threading.Barrier(concurrency + 1)
    stop_at = [0.0]

    def worker(k: int) -> None:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
        mine = lat[k]
        i = k
        try:
            start.wait()
            while time.perf_counter() < stop_at[0]:
                j = i % len(bodies)
                t0 = time.perf_counter()
                status, payload = _post(conn, path, bodies[j])
                mine.append((time.perf_counter() - t0) * 1000)
                problem = (
                    f"HTTP {status}: {payload[:300]!r}" if status != 200 else check(j, payload)
                )
                if problem is not None:
                    errors.append(f"{server.name} {path}: {problem}")
                    return
                i += concurrency
        except Exception as exc:  # noqa: BLE001 - reported below, the phase is void
            errors.append(f"{server.name} {path}: {type(exc).__name__}: {exc}")
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()
    cpu0, srv0 = time.process_time(), server.cpu_seconds()
    t0 = time.perf_counter()
    stop_at[0] = t0 + seconds
    start.wait()
    for t in threads:
        t.join(seconds + 60)
    wall = time.perf_counter() - t0
    client_cpu, server_cpu = time.process_time() - cpu0, server.cpu_seconds() - srv0
    if errors:
        raise RuntimeError(f"{len(errors)} bad answer(s); first: {errors[0]}")
    if any(t.is_alive() for t in threads):
        raise RuntimeError(f"{server.name}: a request did not finish within 60 s of the phase")
    flat = [x for xs in lat for x in xs]
    return Phase(flat, len(flat), wall, client_cpu, server_cpu)


def percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), without numpy."""
    s = sorted(xs)
    if not s:
        raise ValueError("no samples")
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(phases: list[Phase]) -> dict[str, float]:
    lat = [x for p in phases for x in p.latencies_ms]
    n = sum(p.requests for p in phases)
    wall = sum(p.wall_s for p in phases)
    return {
        "requests": n,
        "rps": n / wall,
        "p50_ms": percentile(lat, 50),
        "p99_ms": percentile(lat, 99),
        "server_cpu_ms_per_request": 1000 * sum(p.server_cpu_s for p in phases) / n,
        "client_cpu_share": sum(p.client_cpu_s for p in phases) / wall,
    }


def verdict(per_mix: dict[str, dict[str, float]]) -> tuple[float, float, list[dict[str, Any]]]:
    """The worst mix's ratios (the lowest rps ratio, the highest p99 ratio) and one target
    per mix and ratio: all are met only when every mix meets both."""
    rps = min(m["rps_ratio"] for m in per_mix.values())
    p99 = max(m["p99_ratio"] for m in per_mix.values())
    targets = []
    for name, m in per_mix.items():
        targets.append(target(f"rps_ratio_{name}", round(m["rps_ratio"], 3), ">=", RPS_TARGET))
        targets.append(target(f"p99_ratio_{name}", round(m["p99_ratio"], 3), "<=", P99_TARGET))
    return round(rps, 3), round(p99, 3), targets


# -- main --------------------------------------------------------------------------------------


def _environment(home: Path) -> dict[str, str]:
    os.environ["PIPELINE_HOME"] = str(home)
    for var in (
        "PIPELINE_STORAGE_URI",
        "PIPELINE_MLFLOW_TRACKING_URI",
        "PIPELINE_SERVING_URL",
        "PIPELINE_SERVING_ADMIN_ENABLED",
        "MLFLOW_TRACKING_URI",
        "MLFLOW_REGISTRY_URI",
    ):
        os.environ.pop(var, None)
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "10"
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    from pipeline import settings

    settings.get_settings.cache_clear()
    uri = settings.get_settings().tracking_uri
    env = os.environ.copy()
    env["MLFLOW_TRACKING_URI"] = env["MLFLOW_REGISTRY_URI"] = uri
    # mlflow models serve runs `bash -c "exec uvicorn ..."`: this interpreter's uvicorn
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="per measured phase")
    ap.add_argument("--rounds", type=int, default=4, help="alternations per mix")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--mlflow-format", choices=("split", "records"), default="split")
    ap.add_argument("--ready-timeout", type=float, default=180.0)
    ap.add_argument("--keep-logs", default=None, help="copy both servers' logs to this folder")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-vs-mlflow-") as tmp:
        home = Path(tmp) / "home"
        env = _environment(home)
        from pipeline import registry
        from pipeline.spec import active

        t0 = time.monotonic()
        version, _ = _setup(home, serving_model=True)
        name = registry.model_name()
        positive = f"proba_{active().contract_obj().positive_label}"
        print(f"registered {name} v{version} in {time.monotonic() - t0:.1f} s", file=sys.stderr)

        ours = Server(
            "ours",
            [sys.executable, "-m", "pipeline", "serve", "--host", "127.0.0.1"],
            "/readyz",
            Path(tmp) / "ours.log",
        )
        ours.argv += ["--port", str(ours.port)]
        theirs = Server(
            "mlflow",
            [
                str(Path(sys.executable).parent / "mlflow"),
                "models",
                "serve",
                "-m",
                f"models:/{name}/{version}",
                "--env-manager",
                "local",
                "--host",
                "127.0.0.1",
                "-w",
                "1",
            ],
            "/ping",
            Path(tmp) / "mlflow.log",
        )
        theirs.argv += ["-p", str(theirs.port)]
        servers = (ours, theirs)
        try:
            ours.start(env)
            # both without a log line per request (ours logs none): theirs is uvicorn's CLI
            theirs.start({**env, "UVICORN_ACCESS_LOG": "false"})
            for s in servers:
                s.wait_ready(args.ready_timeout)
            result, targets = _measure(ours, theirs, positive, args)
        finally:
            for s in servers:
                s.stop()
            if args.keep_logs:
                Path(args.keep_logs).mkdir(parents=True, exist_ok=True)
                for s in servers:
                    Path(args.keep_logs, f"{s.name}.log").write_text(s.log_tail(10_000))
    print(finish({"bench": "serving_vs_mlflow", **result}, targets))
    return 0


def _mixes(columns_rows: tuple[list[dict[str, Any]], list[str]], fmt: str) -> list[Mix]:
    rows, cols = columns_rows
    out = []
    for mix, n in MIXES.items():
        groups = [rows[i : i + n] for i in range(0, min(len(rows), 16 * n if n > 1 else 256), n)]
        out.append(
            Mix(
                mix,
                ours=[ours_body(g) for g in groups],
                theirs=[mlflow_body(g, cols, fmt) for g in groups],
                expected=[],
            )
        )
    return out


def _measure(
    ours: Server, theirs: Server, positive: str, args: argparse.Namespace
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    load_at_start = round(os.getloadavg()[0], 2)
    mixes = _mixes(_rows(4096, seed=99), args.mlflow_format)
    # agreement: both servers score every body of every mix the same
    a = http.client.HTTPConnection(ours.host, ours.port, timeout=30)
    b = http.client.HTTPConnection(theirs.host, theirs.port, timeout=30)
    for mix in mixes:
        for i, (ob, tb) in enumerate(zip(mix.ours, mix.theirs, strict=True)):
            sa, pa = _post(a, "/predict", ob)
            sb, pb = _post(b, "/invocations", tb)
            if sa != 200 or sb != 200:
                raise RuntimeError(
                    f"{mix.name} body {i}: ours answered {sa} {pa[:300]!r}, "
                    f"mlflow answered {sb} {pb[:300]!r}"
                )
            x, y = ours_scores(pa), mlflow_scores(pb, positive)
            if not agree(x, y):
                worst = max((abs(p - q) for p, q in zip(x, y, strict=False)), default=None)
                raise AssertionError(
                    f"{mix.name} body {i}: the servers disagree ({len(x)} vs {len(y)} scores, "
                    f"largest difference {worst}; atol {ATOL})"
                )
            mix.expected.append(x)
    a.close()
    b.close()

    per_mix: dict[str, dict[str, Any]] = {}
    for mix in mixes:
        exp = mix.expected

        def check_ours(j: int, payload: bytes, exp: list[list[float]] = exp) -> str | None:
            return None if agree(ours_scores(payload), exp[j]) else "scores changed"

        def check_theirs(j: int, payload: bytes, exp: list[list[float]] = exp) -> str | None:
            return None if agree(mlflow_scores(payload, positive), exp[j]) else "scores changed"

        plan = {
            "ours": (ours, "/predict", mix.ours, check_ours),
            "mlflow": (theirs, "/invocations", mix.theirs, check_theirs),
        }
        phases: dict[str, list[Phase]] = {"ours": [], "mlflow": []}
        for srv, path, bodies, check in plan.values():  # warm-up, discarded
            drive(
                srv,
                path,
                bodies,
                check,
                concurrency=args.concurrency,
                seconds=min(2.0, args.seconds),
            )
        for r in range(args.rounds):
            order = ("ours", "mlflow") if r % 2 == 0 else ("mlflow", "ours")
            for key in order:
                srv, path, bodies, check = plan[key]
                phases[key].append(
                    drive(
                        srv,
                        path,
                        bodies,
                        check,
                        concurrency=args.concurrency,
                        seconds=args.seconds,
                    )
                )
        o, t = summarize(phases["ours"]), summarize(phases["mlflow"])
        per_mix[mix.name] = {
            "rows_per_request": MIXES[mix.name],
            "rps_ratio": o["rps"] / t["rps"],
            "p99_ratio": o["p99_ms"] / t["p99_ms"],
            "p50_ratio": o["p50_ms"] / t["p50_ms"],
            # CPU per request, ours/theirs: the cost, whatever share of the cores each got
            "server_cpu_ratio": o["server_cpu_ms_per_request"] / t["server_cpu_ms_per_request"],
            "ours": {k: round(v, 3) for k, v in o.items()},
            "mlflow": {k: round(v, 3) for k, v in t.items()},
        }
        print(f"{mix.name}: {json.dumps(per_mix[mix.name])}", file=sys.stderr)
    rps, p99, targets = verdict(per_mix)
    for m in per_mix.values():
        for k in ("rps_ratio", "p99_ratio", "p50_ratio", "server_cpu_ratio"):
            m[k] = round(m[k], 3)
    result = {
        "rps_ratio": rps,
        "p99_ratio": p99,
        "aggregate": "worst mix (lowest rps_ratio, highest p99_ratio)",
        "mixes": per_mix,
        "concurrency": args.concurrency,
        "workers_per_server": 1,
        "seconds_per_phase": args.seconds,
        "rounds": args.rounds,
        "mlflow_format": args.mlflow_format,
        "loadavg_1m_at_start": load_at_start,
        "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
    }
    return result, targets


if __name__ == "__main__":
    raise SystemExit(main())
