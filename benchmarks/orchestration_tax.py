"""The orchestration tax: a whole ``retrain_<model>`` DAG run against its stages' own compute.

The shipped default model spec (``PIPELINE_MODEL``, ``models/``), a batch from the reference
generator (``pipeline/data/generate.py``) landed under the spec's landing prefix and a
10,000-row trusted set, at each ``--rows`` size, three ways, each on a fresh
``PIPELINE_HOME`` (embedded defaults: local storage, MLflow on SQLite, no champion yet, so
each run ingests, validates, trains, verifies, registers, gates and promotes):

* **in-process**: the same stage functions the tasks call (``pipeline.stages``), in the
  DAG's order, in one Python process, each timed; imports excluded (``pipeline.preload``
  first). Their sum is the work.
* **embedded**: ``airflow dags test`` on Airflow's SQLite default (what ``make demo`` runs):
  tasks in the CLI's process, one after the other.
* **scheduler**: api-server + scheduler + dag-processor on a throw-away PostgreSQL 15, the
  stack suite's own start code and settings (``benchmarks/_stack.py``): LocalExecutor with
  preloading workers (``plugins/pipeline_executor.PreloadingLocalExecutor``), heartbeat 2 s,
  parallelism 2. The run is triggered through the REST API once both executor workers have
  preloaded the pipeline (a deployment's start, not a run's: ``workers_preload_s``).

Per DAG: ``dag_wall_s`` is what a user waits: the ``airflow dags test`` process from start to
exit (embedded), the DAG run's ``queued_at`` (the trigger) to its ``end_date`` (scheduler).
``overhead_share = (dag_wall_s - stage compute in-process) / dag_wall_s``. The in-process run
and the DAG runs happen minutes apart: on a shared machine whose load changes meanwhile,
``overhead_share_in_run`` is the same share measured inside the DAG run alone, the wall
outside the task bodies that call a stage (so a body's own imports count as work there).

Per task, from the task instance's ``start_date``/``end_date`` and its log (the scheduler's
task log files; ``airflow dags test``'s console, cut per task):

* ``startup_s``: task instance start → the task body starting, i.e. Airflow's line
  ``::endgroup::`` closing its "Pre Execute" log group, written just before the operator calls
  the body (under the scheduler: the fork, the DAG file's parse, the task's API calls); the
  body then calls the stage after a spec load and a Connection lookup (milliseconds);
* ``body_s``: body start → the stage's own line ``<task>: <verdict> — …`` (``pipeline.stages``,
  written as the stage returns); ``extra_s = body_s −`` that stage's in-process compute: what
  the task pays inside its body beyond the work (imports on first use, a fresh MLflow client
  and store per process, and the machine's load);
* ``tail_s`` (stage line → task instance end: XCom, state), ``queued_s``, ``gap_s`` (previous
  task's end → this one's start: the scheduler's loop and a free executor slot), ``wall_s``.

``task_startup_median_s`` is the median ``startup_s`` over the tasks that ran, all sizes.
``lead_s``/``trail_s``: DAG wall start → first task start, last task end → DAG wall end.

Targets (scheduler): ``overhead_share_1m <= 0.25``, ``task_startup_median_s <= 3``.

    python -m benchmarks.orchestration_tax [--rows 20000,1000000] [--modes scheduler,embedded]
        [--airflow-env AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL=1] [--keep]

Every run trains with one torch thread (``OMP_NUM_THREADS=1`` unless set): on a shared
2-core machine two threads made the small model's steps 10-100x slower at random. About 5
minutes per mode on a quiet 2-core machine (the 1M-row training stops itself after 3
epochs), three times that on a busy one; ``--rows 20000`` alone is under half of it. Sizes
other than 1M report no ``overhead_share_1m`` (its target then reads as missed). Exit 0
whether or not a target is met; non-zero only when it could not
run (no PostgreSQL 15 for the scheduler: ``PG_BIN``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
LOGICAL_DATE = "2026-03-01T00:00:00+00:00"
EVAL_ROWS = 10_000
TARGET_OVERHEAD_1M, TARGET_STARTUP_S = 0.25, 3.0
# tasks whose body calls no stage function: their whole wall is orchestration
NO_STAGE = ("retrain_gate", "approval_required")
AIRFLOW_ENV: dict[str, str] = {}  # --airflow-env: Airflow settings for both kinds of DAG run
STAGE_LINE = re.compile(r"^(\S+Z) \[\w+\s*\] (\w+): .*\[pipeline\.stages\]")


# --- the work: the stages, in one process ------------------------------------------------------


def run_stages(batch_uri: str, dag_id: str) -> dict[str, float]:
    """The DAG's stages in its order, on this process's settings; seconds per stage."""
    from pipeline.preload import preload

    preload()  # imports are not the work: every task finds them preloaded too
    from pipeline import spec, stages

    spec.activate(spec.active())
    ctx = stages.RunContext(dag_id=dag_id, run_id="in-process", run_after=LOGICAL_DATE)
    seconds: dict[str, float] = {}

    def timed(name: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        out = fn(ctx, *args, **kwargs)
        seconds[name] = time.perf_counter() - t0
        return out

    policy = stages.run_policy({})
    ing = timed("ingest_batch", stages.ingest_batch, batch_uri, policy=policy)
    timed("validate_batch", stages.validate_batch, ing)
    drifted = timed("detect_drift", stages.detect_drift, ing)
    decided = timed("decide_retrain", stages.decide_retrain, drifted, force=False, policy=policy)
    if not decided.retrain:
        raise SystemExit(f"in-process run decided not to retrain ({decided.summary})")
    trained = timed("train_model", stages.train_model, ing)
    verified = timed("verify_checkpoint", stages.verify_checkpoint, trained)
    reg = timed("register_challenger", stages.register_challenger, ing, trained, verified)
    gated = timed("gate_promotion", stages.gate_promotion, reg, policy=policy)
    timed("promote_champion", stages.promote_champion, gated)
    seconds["publish_summary"] = _timed_summary(ctx)
    return seconds


def _timed_summary(ctx) -> float:
    from pipeline import stages

    t0 = time.perf_counter()
    stages.format_summary(stages.publish_summary(ctx))
    return time.perf_counter() - t0


# --- set-up shared by the three ways ------------------------------------------------------------


def pipeline_env(home: Path) -> dict[str, str]:
    """This process's environment without any PIPELINE_/AIRFLOW settings, on ``home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "AIRFLOW"))}
    env.update({"PIPELINE_HOME": str(home), "PIPELINE_DEVICE": "cpu", "PYTHONUNBUFFERED": "1"})
    # One intra-op thread, as the stack suite and the torchrun launcher run training: on a
    # shared 2-core machine two torch threads made this small model's steps 10-100x slower,
    # at random, which would measure the neighbours' load instead of the orchestration
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def make_data(data: Path, rows: int) -> dict[str, Any]:
    """The batch and the trusted set, once per size, under ``data``; their relative keys."""
    from pipeline import spec
    from pipeline.data.generate import WorldSpec, generate, to_parquet_bytes

    s = spec.active()
    batch_key = f"{s.landing_prefix.strip('/')}/bench/batch.parquet"
    for key, world in ((batch_key, WorldSpec(rows=rows, seed=1)),
                       (s.eval_location, WorldSpec(rows=EVAL_ROWS, seed=101))):  # fmt: skip
        path = data / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(to_parquet_bytes(generate(world)))
    return {"batch_key": batch_key, "dag_id": s.retrain_dag_id}


def fresh_home(parent: Path, name: str, data: Path) -> Path:
    """A PIPELINE_HOME with nothing but the landed files (no MLflow, no champion)."""
    home = parent / name
    shutil.copytree(data, home / "storage")
    return home


def batch_uri(home: Path, key: str) -> str:
    return (home / "storage" / key).as_uri()


def in_process(home: Path, key: str, dag_id: str) -> dict[str, float]:
    """``run_stages`` in a child process on ``home`` (this one holds no pipeline state)."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.orchestration_tax", "--_stages", batch_uri(home, key),
         "--_dag-id", dag_id],
        env=pipeline_env(home), cwd=ROOT, capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    if out.returncode != 0:
        raise SystemExit(f"in-process stages failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- reading a DAG run back ---------------------------------------------------------------------


def _ts(value: str | None) -> float | None:
    if not value:
        return None
    t = datetime.fromisoformat(value.replace(" ", "T"))
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()


LOG_LINE = re.compile(r"^(\S+Z) \[\s*\w+\s*\] (.*?)\s+\[([\w.]+)\]")


def log_events(text: str) -> list[tuple[float, str, str]]:
    """(time, logger, message) of each line of an Airflow task log: JSON lines (a scheduler's
    task log file) or the console lines of ``airflow dags test``."""
    events = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            ts = _ts(rec.get("timestamp"))
            if ts is not None:
                events.append((ts, str(rec.get("logger", "")), str(rec.get("event", ""))))
            continue
        m = LOG_LINE.match(line)
        if m:
            events.append((_ts(m.group(1)) or 0.0, m.group(3), m.group(2)))
    return events


def task_marks(task_id: str, text: str) -> dict[str, float]:
    """In one task's log: ``body``, when Airflow closed its "Pre Execute" log group (the line
    just before the operator runs the task's body), and ``stage_end``, the stage's own line
    ``<task>: <verdict> — …`` (``pipeline.stages``, written when the stage returns)."""
    marks: dict[str, float] = {}
    for ts, logger, message in log_events(text):
        if message.strip() == "::endgroup::" and "body" not in marks:
            marks["body"] = ts
        elif logger == "pipeline.stages" and message.startswith(f"{task_id}:"):
            marks["stage_end"] = ts
    return marks


def per_task(
    tis: list[dict[str, Any]], logs: dict[str, str], compute: dict[str, float]
) -> dict[str, dict[str, Any]]:
    """Per task that ran, seconds: ``startup_s`` (task instance start → its body starts),
    ``body_s`` (body start → the stage's line), ``extra_s`` (``body_s`` − the stage's
    in-process compute), ``tail_s`` (the stage's line → task instance end), ``queued_s``,
    ``gap_s`` (the previous task's end → this one's start) and ``wall_s``."""
    ran = sorted((t for t in tis if t["start"] and t["end"]), key=lambda t: t["start"])
    out: dict[str, dict[str, Any]] = {}
    prev_end: float | None = None
    for t in ran:
        tid, start, end = t["task_id"], t["start"], t["end"]
        row: dict[str, Any] = {"state": t["state"], "wall_s": round(end - start, 2)}
        marks = task_marks(tid, logs.get(tid, ""))
        if t["state"] == "success" and "body" in marks:
            row["startup_s"] = round(marks["body"] - start, 2)
            if "stage_end" in marks and tid in compute:
                row["body_s"] = round(marks["stage_end"] - marks["body"], 2)
                row["stage_s"] = round(compute[tid], 2)
                row["extra_s"] = round(row["body_s"] - compute[tid], 2)
                row["tail_s"] = round(end - marks["stage_end"], 2)
        if t.get("queued") is not None:
            row["queued_s"] = round(start - t["queued"], 2)
        if prev_end is not None:
            row["gap_s"] = round(start - prev_end, 2)
        prev_end = max(prev_end or 0.0, end)
        out[tid] = row
    return out


def summarise(
    wall: tuple[float, float], tis: list[dict[str, Any]], compute: dict[str, float],
    tasks: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """The DAG's wall (``wall``: its start and end), the work and where the rest went."""
    dag_wall, work = wall[1] - wall[0], sum(compute.values())
    ran = [t for t in tis if t["start"] and t["end"]]

    def total(key: str) -> float:
        return round(sum(r.get(key, 0.0) for r in tasks.values()), 1)

    startups = [r["startup_s"] for r in tasks.values() if "startup_s" in r]
    bodies = total("body_s")
    return {
        "dag_wall_s": round(dag_wall, 1),
        "stage_compute_s": round(work, 1),
        "overhead_s": round(dag_wall - work, 1),
        "overhead_share": round((dag_wall - work) / dag_wall, 3),
        # the same share measured inside this run alone: the wall outside the stage-calling
        # task bodies (immune to the machine's load changing between this run and the
        # in-process one; counts a body's imports and per-process set-up as work)
        "stage_bodies_s": bodies,
        "overhead_share_in_run": round((dag_wall - bodies) / dag_wall, 3),
        "task_startup_median_s": round(statistics.median(startups), 2) if startups else None,
        "task_startup_max_s": max(startups) if startups else None,
        # where the overhead went (the sums add up to it, give or take the tasks with no stage)
        "lead_s": round(min(t["start"] for t in ran) - wall[0], 1),
        "startup_sum_s": total("startup_s"),
        "extra_sum_s": total("extra_s"),
        "tail_sum_s": total("tail_s"),
        "gap_sum_s": total("gap_s"),
        "trail_s": round(wall[1] - max(t["end"] for t in ran), 1),
        "tasks": tasks,
    }


# --- (a) embedded: airflow dags test ------------------------------------------------------------


def embedded(home: Path, key: str, dag_id: str, compute: dict[str, float]) -> dict[str, Any]:
    env = pipeline_env(home)
    af_home = home / "airflow"
    af_home.mkdir(parents=True)
    env.update({
        "AIRFLOW_HOME": str(af_home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{af_home / 'airflow.db'}",
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        **AIRFLOW_ENV,
    })  # fmt: skip
    airflow = str(BIN / "airflow")
    subprocess.run([airflow, "db", "migrate"], env=env, cwd=ROOT, check=True,
                   capture_output=True, timeout=600)  # fmt: skip
    log = home / "dags-test.log"
    conf = json.dumps({"batch_uri": batch_uri(home, key)})
    t0 = time.time()
    with log.open("w") as fh:
        rc = subprocess.run(
            [airflow, "dags", "test", dag_id, LOGICAL_DATE, "--conf", conf],
            env=env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=3600,
            start_new_session=True,
        ).returncode  # fmt: skip
    t1 = time.time()
    if rc != 0:
        raise SystemExit(f"airflow dags test failed (exit {rc}); log: {log}")
    with sqlite3.connect(af_home / "airflow.db") as db:
        rows = db.execute(
            "SELECT task_id, state, start_date, end_date FROM task_instance WHERE dag_id = ?",
            (dag_id,),
        ).fetchall()
    tis = [{"task_id": r[0], "state": r[1], "start": _ts(r[2]), "end": _ts(r[3])} for r in rows]
    return summarise((t0, t1), tis, compute, per_task(tis, split_dags_test_log(log), compute))


def split_dags_test_log(log: Path) -> dict[str, str]:
    """``airflow dags test``'s console log, cut into each task's lines."""
    parts: dict[str, list[str]] = {}
    current: str | None = None
    for line in log.read_text(errors="replace").splitlines():
        m = re.search(r"\[DAG TEST\] (starting|end) task task_id=(\w+)|"
                      r"\[DAG TEST\] starting task_id=(\w+)", line)  # fmt: skip
        if m and "starting" in line:
            current = m.group(3) or m.group(2)
        elif m:
            current = None
        elif current:
            parts.setdefault(current, []).append(line)
    return {k: "\n".join(v) for k, v in parts.items()}


# --- (b) a real scheduler: LocalExecutor on PostgreSQL -----------------------------------------


def scheduler(home: Path, key: str, dag_id: str, compute: dict[str, float]) -> dict[str, Any]:
    from benchmarks import _stack

    workdir = Path(tempfile.mkdtemp(prefix="otax-stack-", dir=home.parent))
    env = {k: v for k, v in pipeline_env(home).items()
           if k.startswith("PIPELINE_") or k == "OMP_NUM_THREADS"}  # fmt: skip
    env.update(AIRFLOW_ENV)
    with _stack.local_executor_airflow(workdir, home, env) as af:
        # a deployed scheduler's workers have preloaded long before a run: wait for them here
        # rather than count their start (reported as workers_preload_s) in the first task
        t0 = time.monotonic()
        workers = int(af.env.get("AIRFLOW__CORE__PARALLELISM", "1"))
        _stack.stack.wait_for(
            lambda: af.tail("scheduler", n=10_000_000).count("preloaded the pipeline in")
            >= workers,
            "the executor's workers preloading the pipeline", 600, af.procs["scheduler"],
            af.home / "scheduler.log",
        )  # fmt: skip
        preload_s = time.monotonic() - t0
        run_id = af.trigger(dag_id, {"batch_uri": batch_uri(home, key)})
        state = af.wait_run(dag_id, run_id, timeout=3600)
        if state != "success":
            raise SystemExit(f"scheduler run {run_id} ended {state}: {af.tail('scheduler')}")
        path = f"dags/{dag_id}/dagRuns/{_quote(run_id)}"
        _, run = af.api("GET", path)
        _, out = af.api("GET", f"{path}/taskInstances")
        logs = {}
        run_logs = af.home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}"
        for attempt in sorted(run_logs.glob("task_id=*/attempt=*.log")):  # the last one stays
            logs[attempt.parent.name.removeprefix("task_id=")] = attempt.read_text(errors="replace")
    tis = [
        {"task_id": t["task_id"], "state": t["state"], "start": _ts(t.get("start_date")),
         "end": _ts(t.get("end_date")), "queued": _ts(t.get("queued_when"))}
        for t in out.get("task_instances", [])
    ]  # fmt: skip
    wall = (_ts(run["queued_at"]) or 0.0, _ts(run["end_date"]) or 0.0)
    result = summarise(wall, tis, compute, per_task(tis, logs, compute))
    result["workers_preload_s"] = round(preload_s, 1)
    return result


def _quote(run_id: str) -> str:
    import urllib.parse

    return urllib.parse.quote(run_id, safe="")


# --- the benchmark ------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="20000,1000000", help="comma-separated batch sizes")
    ap.add_argument("--modes", default="scheduler,embedded", help="scheduler, embedded")
    ap.add_argument("--keep", action="store_true", help="keep the state folder (logs, DBs)")
    ap.add_argument("--airflow-env", action="append", default=[], metavar="NAME=VALUE",
                    help="an Airflow setting for the DAG runs, e.g. "
                    "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL=1 (repeatable)")  # fmt: skip
    ap.add_argument("--_stages", help=argparse.SUPPRESS)
    ap.add_argument("--_dag-id", dest="dag_id", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._stages:  # the child of in_process()
        print(json.dumps(run_stages(args._stages, args.dag_id)))
        return 0

    sizes = [int(r) for r in args.rows.split(",") if r.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    state = Path(tempfile.mkdtemp(prefix="otax-"))
    state.chmod(0o755)  # the PostgreSQL cluster (user postgres) lives under it
    results: dict[str, dict[str, Any]] = {m: {} for m in ("in_process", *modes)}
    AIRFLOW_ENV.update(dict(kv.split("=", 1) for kv in args.airflow_env))
    try:
        for rows in sizes:
            label = f"{rows // 1000}k" if rows < 1_000_000 else f"{rows // 1_000_000}m"
            data = state / f"data-{label}"
            meta = make_data(data, rows)
            key, dag_id = meta["batch_key"], meta["dag_id"]
            results["in_process"][label] = {}
            for mode in modes:
                # the work, measured right before the run it is compared with: on a shared
                # machine the load changes within minutes
                print(f"== {rows} rows: in-process stages (for {mode})", flush=True)
                home = fresh_home(state, f"inproc-{mode}-{label}", data)
                compute = in_process(home, key, dag_id)
                results["in_process"][label][mode] = {
                    "stage_compute_s": round(sum(compute.values()), 1),
                    "stages": {k: round(v, 2) for k, v in compute.items()},
                }
                print(f"== {rows} rows: {mode}", flush=True)
                run = {"embedded": embedded, "scheduler": scheduler}[mode]
                results[mode][label] = run(fresh_home(state, f"{mode}-{label}", data), key,
                                           dag_id, compute)  # fmt: skip
                r = results[mode][label]
                (state / "results.json").write_text(json.dumps(results, indent=1))
                print(f"   dag wall {r['dag_wall_s']}s, stages {r['stage_compute_s']}s, overhead "
                      f"{r['overhead_share']:.0%} (in the run alone "
                      f"{r['overhead_share_in_run']:.0%}), task start-up median "
                      f"{r['task_startup_median_s']}s", flush=True)  # fmt: skip
    finally:
        if args.keep:
            print(f"state kept in {state}")
        else:
            shutil.rmtree(state, ignore_errors=True)
    print(report(results))
    return 0


def report(results: dict[str, dict[str, Any]]) -> str:
    """The last line: the headline figures (under the scheduler when it ran), every run's
    breakdown, and the targets (``benchmarks._targets``)."""
    from benchmarks._targets import finish, target

    sched, emb = results.get("scheduler", {}), results.get("embedded", {})
    headline = sched or emb
    startups = [
        r["startup_s"] for run in headline.values() for r in run["tasks"].values()
        if "startup_s" in r
    ]  # fmt: skip
    result = {
        "bench": "orchestration_tax",
        "overhead_share_1m": headline.get("1m", {}).get("overhead_share"),
        "task_startup_median_s": round(statistics.median(startups), 2) if startups else None,
        "overhead_share_20k": headline.get("20k", {}).get("overhead_share"),
        "overhead_share_in_run_1m": headline.get("1m", {}).get("overhead_share_in_run"),
        "overhead_share_in_run_20k": headline.get("20k", {}).get("overhead_share_in_run"),
        "headline_from": "scheduler" if sched else "embedded",
        "airflow_env": AIRFLOW_ENV,
        "in_process": results.get("in_process", {}),
        "embedded": emb,
        "scheduler": sched,
    }
    targets = [
        target("overhead_share_1m", result["overhead_share_1m"], "<=", TARGET_OVERHEAD_1M),
        target("task_startup_median_s", result["task_startup_median_s"], "<=", TARGET_STARTUP_S),
    ]
    return finish(result, targets)


if __name__ == "__main__":
    raise SystemExit(main())
