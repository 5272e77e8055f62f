"""`make demo`: two models in one Airflow and one MLflow, each through its own DAG, for real.

The reference model, ``card_fraud`` (``retrain_card_fraud``), through a story:

1. a first batch makes the first champion;
2. a drifted batch (covariate shift + concept drift) triggers retraining, the challenger
   beats the champion on the trusted evaluation set and is promoted;
3. a batch with poisoned labels is retrained on (the champion decays on its labels), and
   the gate rejects the challenger on the trusted set: the champion stays;
4. a batch that breaks the data contract is quarantined and the run fails, saying why;
5. a fresh batch is retrained on (forced) and its challenger, non-inferior to the champion,
   goes through a canary on the scoring service under replayed traffic; a fault injected
   into the canary (50% errors, through the service's documented fault switch) makes the
   analysis roll it back: weight 0, alias removed, version tagged, champion untouched.

Between 4 and 5 the quarantined batch is run again (a new DAG run on the same bytes): it fails
at ``ingest_batch`` and raises no second alert. The demo ends with the alert summary
(``pipeline.alerts``: open alerts per model with their runbooks) and checks that the
quarantined batch raised one alert and the rolled-back canary one.

Then a model the project never designed for, ``digits`` (``retrain_digits``: scikit-learn's
handwritten digits, 10 classes, a residual network from its spec's own module):

6. a small first batch, landed with ``python -m pipeline data land``, makes its first champion;
7. a larger batch, retrained on (forced), beats it on the trusted set and is promoted.

Each run is `airflow dags test retrain_<model> <date> --conf …`: a real DAG run in the
Airflow metadata database (SQLite under .local/airflow), tasks executed in-process, MLflow
on SQLite under .local/mlflow, data under .local/storage. State from an earlier demo is
moved to .local/archive/<time>/, never deleted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOME = Path(os.environ.get("PIPELINE_HOME", ROOT / ".local")).resolve()
AIRFLOW = str(Path(sys.executable).with_name("airflow"))
STATE = ("storage", "mlflow", "airflow", "keys", "demo")

# The story below is written on a calendar of its own (early March 2026). It is moved so that
# it ends yesterday: each batch's event times lie in the past week, and the DAG runs' logical
# dates are a minute apart just before the demo started — so Airflow's UI shows each run
# lasting the minutes it took, not the months since March.
STARTED = datetime.now(UTC).replace(second=0, microsecond=0)
STORY_TODAY = datetime(2026, 3, 8, tzinfo=UTC)


def story_time(text: str) -> str:
    """A time of the story's calendar on the real one (the story's 8 March is today)."""
    today = STARTED.replace(hour=0, minute=0)
    moved = datetime.fromisoformat(text.replace("Z", "+00:00")) + (today - STORY_TODAY)
    return moved.strftime("%Y-%m-%dT%H:%M:%SZ")


def logical_date(run: int) -> str:
    """Run ``run`` (1-7) of the demo: minutes apart, all before the demo started."""
    return (STARTED - timedelta(minutes=10 - run)).isoformat()


STORY = [
    # (title, batch name, generator knobs, run date, eval set)
    (
        "first batch makes the first champion",
        "batch-001",
        {"seed": 1, "start": "2026-02-27T00:00:00Z"},
        "2026-03-01",
        "eval-world-a",
    ),
    (
        "drifted batch: retrain, challenger promoted",
        "batch-002",
        {"seed": 2, "start": "2026-03-01T00:00:00Z", "covariate_shift": 0.6, "concept_drift": 1.0},
        "2026-03-02",
        "eval-world-b",
    ),
    (
        "poisoned labels: retrained, gate rejects, champion stays",
        "batch-003",
        {
            "seed": 3,
            "start": "2026-03-02T00:00:00Z",
            "covariate_shift": 0.6,
            "concept_drift": 1.0,
            "label_poison": 0.8,
        },
        "2026-03-03",
        "eval-world-b",
    ),
    (
        "contract broken: batch quarantined, run fails",
        "batch-004",
        {
            "seed": 4,
            "rows": 5000,
            "start": "2026-03-03T00:00:00Z",
            "covariate_shift": 0.6,
            "concept_drift": 1.0,
            "schema_fault": "unknown_category",
        },
        "2026-03-04",
        "eval-world-b",
    ),
]
CANARY_BATCH = (
    "batch-005",
    {"seed": 5, "start": "2026-03-04T00:00:00Z", "covariate_shift": 0.6, "concept_drift": 1.0},
)
CANARY_ENV = {  # short steps so the demo takes a minute, not hours
    "PIPELINE_SERVING_POLL_SECONDS": "0.5",
    "PIPELINE_CANARY_STEPS": "[0.25, 0.5, 1.0]",
    "PIPELINE_CANARY_STEP_SECONDS": "5",
    "PIPELINE_CANARY_ANALYSIS_INTERVAL_SECONDS": "1",
    "PIPELINE_CANARY_BAKE_SECONDS": "5",
}
EVAL_SETS = {
    "eval-world-a": {"seed": 101, "rows": 10_000},
    "eval-world-b": {"seed": 102, "rows": 10_000, "covariate_shift": 0.6, "concept_drift": 1.0},
}


def archive_previous_state() -> None:
    present = [name for name in STATE if (HOME / name).exists()]
    if not present:
        return
    dest = HOME / "archive" / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    dest.mkdir(parents=True)
    for name in present:
        shutil.move(str(HOME / name), str(dest / name))
    print(f"earlier demo state moved to {dest}")


def land_data() -> dict[str, str]:
    from pipeline import storage
    from pipeline.data.generate import WorldSpec, generate, to_parquet_bytes
    from pipeline.settings import get_settings

    root = get_settings().storage_root
    uris = {}
    for name, knobs in EVAL_SETS.items():
        uris[name] = storage.write_bytes(
            storage.join(root, "trusted", f"{name}.parquet"),
            to_parquet_bytes(generate(WorldSpec(**knobs))),
        ).uri
    # the spec's own trusted set is the world as the story leaves it, so a run triggered
    # later from the Airflow UI (no eval_uri) is judged on it
    card = spec_obj("card_fraud")
    storage.write_bytes(
        storage.join(root, card.eval_location), storage.read_bytes(uris["eval-world-b"])
    )
    for _, batch, knobs, _, _ in [*STORY, ("", *CANARY_BATCH, "", "")]:
        knobs = {**knobs, **({"start": story_time(knobs["start"])} if "start" in knobs else {})}
        spec = WorldSpec(**{"rows": 20_000, **knobs})
        uris[batch] = storage.write_bytes(
            storage.join(root, "landing", "card_fraud", f"{batch}.parquet"),
            to_parquet_bytes(generate(spec)),
        ).uri
    return uris


CARD_DAG, DIGITS_DAG = "retrain_card_fraud", "retrain_digits"


def spec_obj(name: str):
    from pipeline.spec import get_spec

    return get_spec(name)


def run_dag(
    date: str, conf: dict, log_path: Path, env: dict | None = None, dag_id: str = CARD_DAG
) -> tuple[int, float]:
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        rc = subprocess.call(
            [AIRFLOW, "dags", "test", dag_id, date, "--conf", json.dumps(conf)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
        )
    return rc, time.perf_counter() - t0


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def canary_story(uris: dict[str, str], logs: Path) -> tuple[int, float, dict | None]:
    """Start the scoring service and a traffic replayer, run a canary, inject a fault."""
    import secrets
    import threading
    import urllib.request

    from pipeline import registry

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    admin_token = secrets.token_hex(32)
    env = {
        **os.environ,
        **CANARY_ENV,
        "PIPELINE_SERVING_URL": url,
        # this service's own fault switch, on for the demo only, behind a fresh token; the
        # replayer posts its labels with the feedback token (both read from this env)
        "PIPELINE_SERVING_ADMIN_ENABLED": "true",
        "PIPELINE_SERVING_ADMIN_TOKEN": admin_token,
        "PIPELINE_SERVING_FEEDBACK_TOKEN": secrets.token_hex(32),
    }
    py = sys.executable
    # the scoring service holds public keys only (it refuses to start with a private key): a
    # signing key set in this shell becomes its keyring entry, never the service's to hold
    serve_env = {k: v for k, v in env.items() if k != "PIPELINE_SIGNING_KEY"}
    if env.get("PIPELINE_SIGNING_KEY") and not env.get("PIPELINE_SIGNING_PUBLIC_KEYS"):
        from pipeline import signing

        signer = signing.configured_signer()
        serve_env["PIPELINE_SIGNING_PUBLIC_KEYS"] = signing.keyring_entry(
            signer.key_id, signer.public_key()
        )
    serve = subprocess.Popen(
        [py, "-m", "pipeline", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=serve_env,
        stdout=(logs / "serve.log").open("w"),
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        start_new_session=True,
    )
    replay = None
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        print(f"    scoring service ready on {url} (champion loaded from the registry)", flush=True)
        replay = subprocess.Popen(
            [
                py,
                "-m",
                "pipeline",
                "replay",
                "--url",
                url,
                "--batch",
                uris["eval-world-b"],
                "--rate",
                "40",
                "--duration",
                "240",
                "--rows-per-request",
                "16",
                "--labels-after",
                "1",
            ],
            env=env,
            stdout=(logs / "replay.log").open("w"),
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
        before = registry.alias_version(registry.CHAMPION)
        injected: dict = {}

        def inject_when_canary_is_live() -> None:
            end = time.time() + 400
            while time.time() < end and not injected:
                canary = registry.alias_version("canary")
                if canary is not None and (before is None or canary.version != before.version):
                    body = json.dumps({"version": str(canary.version), "error_rate": 0.5}).encode()
                    req = urllib.request.Request(
                        f"{url}/admin/faults",
                        data=body,
                        method="POST",
                        headers={
                            "Content-Type": "application/json",
                            "Authorization": f"Bearer {admin_token}",
                        },
                    )
                    urllib.request.urlopen(req, timeout=5).close()
                    injected["version"] = str(canary.version)
                    print(
                        f"    fault injected into canary v{canary.version}: 50% errors", flush=True
                    )
                    return
                time.sleep(0.5)

        thread = threading.Thread(target=inject_when_canary_is_live, daemon=True)
        thread.start()
        conf = {
            "batch_uri": uris[CANARY_BATCH[0]],
            "eval_uri": uris["eval-world-b"],
            "force_retrain": True,
            "canary": True,
            "gate_non_inferiority_margin": 0.05,
        }
        rc, secs = run_dag(logical_date(5), conf, logs / "run-5.log", env=env)
        thread.join(timeout=1)
        print_serving_slos(url)  # while the service still runs: its counters live with it
        return rc, secs, injected
    finally:
        if replay is not None:
            _stop(replay)
        _stop(serve)


def main() -> int:
    os.environ.setdefault("PIPELINE_HOME", str(HOME))
    archive_previous_state()
    (HOME / "airflow").mkdir(parents=True, exist_ok=True)
    logs = HOME / "demo"
    logs.mkdir(parents=True, exist_ok=True)
    print("initialising Airflow metadata DB (SQLite) ...", flush=True)
    subprocess.run(
        [AIRFLOW, "db", "migrate"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    # train_model runs in pool "gpu": `dags test` ignores pools, a scheduler (make airflow) does not
    subprocess.run(
        [AIRFLOW, "pools", "set", "gpu", "1", "GPU training"],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    print("landing reference data ...", flush=True)
    uris = land_data()

    from pipeline import stages

    results = []
    for i, (title, batch, _, _, eval_set) in enumerate(STORY, 1):
        date = logical_date(i)
        print(f"\n[{i}/7] {title}: airflow dags test {CARD_DAG} {date}", flush=True)
        # the story moves the world: the trusted set changes with it (card_fraud's spec allows
        # naming another set under trusted/; each use is tagged on the version)
        conf = {"batch_uri": uris[batch], "eval_uri": uris[eval_set]}
        rc, secs = run_dag(date, conf, logs / f"run-{i}.log")
        ctx = _run_context(conf["batch_uri"])
        summary = stages.publish_summary(ctx) if ctx else None
        results.append((title, rc, secs, summary))
        state = "succeeded" if rc == 0 else f"failed (exit {rc})"
        print(f"    DAG run {state} in {secs:.0f}s; log: {logs / f'run-{i}.log'}")
        if summary:
            print(
                "\n".join("    " + line for line in stages.format_summary(summary).splitlines()[1:])
            )

    # the same failure again: a new DAG run on the quarantined batch fails at ingest_batch
    # (the batch was moved to quarantine) and must raise no second alert
    rerun_date = (datetime.fromisoformat(logical_date(4)) + timedelta(seconds=30)).isoformat()
    print(f"\n[4b] the quarantined batch again: airflow dags test {CARD_DAG} {rerun_date}")
    rerun_rc, rerun_secs = run_dag(
        rerun_date, {"batch_uri": uris["batch-004"]}, logs / "run-4b.log"
    )
    print(
        f"    DAG run {'succeeded' if rerun_rc == 0 else f'failed (exit {rerun_rc})'} in "
        f"{rerun_secs:.0f}s (expected: failed, already quarantined); log: {logs / 'run-4b.log'}"
    )

    title = "canary under a fault: rolled back, champion stays"
    print(f"\n[5/7] {title}: scoring service + replayed traffic + airflow dags test", flush=True)
    rc, secs, injected = canary_story(uris, logs)
    ctx = _run_context(uris[CANARY_BATCH[0]])
    summary = stages.publish_summary(ctx) if ctx else None
    results.append((title, rc, secs, summary))
    print(
        f"    DAG run {'succeeded' if rc == 0 else f'failed (exit {rc})'} in {secs:.0f}s; "
        f"log: {logs / 'run-5.log'}"
    )
    if summary:
        print("\n".join("    " + line for line in stages.format_summary(summary).splitlines()[1:]))
    canary_rolled_back = bool(
        summary and summary.stages["promote_champion"]["verdict"] == "rolled_back" and injected
    )

    digits = digits_story(logs, results)
    card_champ = print_registry("card_fraud")
    digits_champ = print_registry("digits")

    alerts_ok = print_alerts()
    ledger_ok = print_ledger_and_slos({"card_fraud": 2, "digits": 2})
    history_ok = print_gradient_history(("card_fraud", "digits"), min_snapshots=32)

    expected = [0, 0, 0, "fail", 0, 0, 0]
    ok = all(
        (rc == 0) if e == 0 else (rc != 0)
        for (_, rc, _, _), e in zip(results, expected, strict=True)
    )
    ok = ok and card_champ == "2" and canary_rolled_back and rerun_rc != 0 and alerts_ok
    ok = ok and ledger_ok and history_ok
    ok = ok and digits["first"] is not None and digits_champ == str(int(digits["first"]) + 1)
    print(f"""
== open the UIs on what the demo made
  make airflow   -> http://127.0.0.1:8080  (DAGs {CARD_DAG}: 6 runs, {DIGITS_DAG}: 2 runs; login printed on start)
  make mlflow    -> http://127.0.0.1:5000  (experiments {CARD_DAG}, {DIGITS_DAG}; Models -> card-fraud, digits)
  state: {HOME}
""")
    print("demo story", "matched" if ok else "DID NOT match", "the expected outcomes")
    return 0 if ok else 1


def digits_story(logs: Path, results: list) -> dict:
    """A second model on a dataset we did not design: first champion, then a better one."""
    import tempfile

    from models.digits import data
    from pipeline import registry, spec, stages, storage
    from pipeline.settings import get_settings

    digits = spec.get_spec("digits")
    root = get_settings().storage_root
    out: dict = {"first": None}
    with tempfile.TemporaryDirectory() as tmp:  # the data team's files, outside our storage
        files = data.write_batches(tmp, seed=0)
        storage.write_bytes(
            storage.join(root, digits.eval_location), storage.read_bytes(files["eval"])
        )
        landed = {}
        for name in ("batch-1", "batch-2"):
            rec = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pipeline",
                    "data",
                    "land",
                    "--model",
                    "digits",
                    "--file",
                    storage.local_path(files[name]).as_posix(),
                    "--no-event",
                    "--name",
                    f"{name}.parquet",
                ],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
            )
            landed[name] = json.loads(rec.stdout)["uri"]
    steps_ = [
        ("digits: a small first batch makes its first champion", "batch-1", {}, "2026-03-06"),
        (
            "digits: a larger batch, retrained on, beats it and is promoted",
            "batch-2",
            {"force_retrain": True},
            "2026-03-07",
        ),
    ]
    for i, (title, name, extra, _) in enumerate(steps_, 6):
        date = logical_date(i)
        print(
            f"\n[{i}/7] {title}: python -m pipeline data land --model digits; "
            f"airflow dags test {DIGITS_DAG} {date}",
            flush=True,
        )
        conf = {"batch_uri": landed[name], **extra}
        rc, secs = run_dag(date, conf, logs / f"run-{i}.log", dag_id=DIGITS_DAG)
        with spec.use_spec(digits):
            ctx = _run_context(conf["batch_uri"])
            summary = stages.publish_summary(ctx) if ctx else None
            champ = registry.alias_version(registry.CHAMPION)
        if i == 6 and champ is not None:
            out["first"] = str(champ.version)
        results.append((title, rc, secs, summary))
        print(
            f"    DAG run {'succeeded' if rc == 0 else f'failed (exit {rc})'} in {secs:.0f}s; "
            f"log: {logs / f'run-{i}.log'}"
        )
        if summary:
            print(
                "\n".join("    " + line for line in stages.format_summary(summary).splitlines()[1:])
            )
    return out


def print_registry(model: str) -> str | None:
    from pipeline import registry, spec

    with spec.use_spec(spec.get_spec(model)):
        c = registry.client()
        name = registry.model_name()
        print(f"\n== registry: model {name} (spec models/{model}/model.yaml)")
        for found in sorted(
            c.search_model_versions(f"name = '{name}'"), key=lambda m: int(m.version)
        ):
            mv = c.get_model_version(name, found.version)  # search results carry no aliases
            aliases = ",".join(mv.aliases) or "-"
            note = mv.tags.get("rejection_reason", "")
            if (
                mv.tags.get("rolled_back") == "true"
                or mv.tags.get("canary.verdict") == "rolled_back"
            ):
                note = "canary rolled back: " + mv.tags.get("canary.reason", "")
            metric = mv.tags.get("gate.metric", "")
            score = (
                f"{metric}={float(mv.tags[f'eval.{metric}']):.4f}"
                if f"eval.{metric}" in mv.tags
                else ""
            )
            note = note if len(note) <= 90 else note[:89] + "…"
            print(
                f"  v{mv.version:<3} aliases={aliases:<22} gate={mv.tags.get('gate.verdict', '-'):<8} "
                f"{score:<18} {note}"
            )
        champ = registry.alias_version(registry.CHAMPION)
        print(f"  champion: v{champ.version if champ else '-'}")
        return str(champ.version) if champ else None


def print_alerts() -> bool:
    """The alert summary (open alerts per model, with their runbooks) and the demo's check:
    the quarantined batch raised one alert — its re-run none — and the rolled-back canary
    one."""
    from pipeline import alerts

    current = alerts.all_alerts()
    print(f"\n== alerts ({alerts.alerts_file()})")
    for model in sorted({a.model for a in current}):
        opened = [a for a in current if a.model == model and a.state == "open"]
        print(f"  {model}: {len(opened)} open")
        for a in opened:
            print(
                f"    [{a.severity.value}] {a.kind.value} ({a.subject}) x{a.occurrences}: {a.summary}"
            )
            print(f"      runbook: {a.runbook}")
    card = [a for a in current if a.model == "card_fraud"]
    quarantined = [a for a in card if a.kind is alerts.AlertKind.BATCH_QUARANTINED]
    canary = [a for a in card if a.kind is alerts.AlertKind.CANARY_ROLLED_BACK]
    others = [a for a in card if a.kind is alerts.AlertKind.TASK_FAILED]
    ok = (
        len(quarantined) == 1
        and quarantined[0].occurrences == 2  # the re-run was seen, and raised nothing new
        and len(canary) == 1
        and not others  # the failed runs' summaries raised no alert of their own
    )
    print(
        f"  check: quarantined batch -> {len(quarantined)} alert"
        f" (seen {quarantined[0].occurrences if quarantined else 0}x: its re-run raised none), "
        f"rolled-back canary -> {len(canary)} alert, task_failed -> {len(others)}: "
        + ("as expected" if ok else "NOT as expected")
    )
    return ok


def print_serving_slos(url: str) -> None:
    """The serving SLOs of card_fraud from the live service (``python -m pipeline slo --url``):
    the injected fault's 5xx count against the error-rate objective."""
    from pipeline import slo, spec

    s = spec.get_spec("card_fraud")
    with spec.use_spec(s):
        report = slo.compute(s, service_url=url, timeout=5.0)
    print(f"    serving SLOs while the service ran (python -m pipeline slo --url {url}):")
    for row in report.rows:
        if row.source == "serving":
            left = "—" if row.budget_remaining is None else f"{row.budget_remaining:.0%}"
            actual = "no data" if row.actual is None else f"{row.actual:.4g} {row.unit}"
            print(f"      {row.name}: {actual} ({row.events or row.detail}), budget left "
                  f"{left}, {row.status.value}")  # fmt: skip


def print_gradient_history(models: tuple[str, ...], min_snapshots: int) -> bool:
    """How many gradient snapshots each training run kept (``telemetry/final/summary.json``:
    the history behind norms.png and histograms.png), and the check that each kept enough."""
    from pipeline import registry, spec
    from pipeline.train.telemetry import load_summary

    ok = True
    print(f"\n== gradient history per training run (at least {min_snapshots} snapshots)")
    for name in models:
        with spec.use_spec(spec.get_spec(name)):
            runs = registry.client().search_runs(
                [registry.experiment_id()], order_by=["attributes.start_time ASC"]
            )
            for run in runs:
                summary = load_summary(run.info.run_id, registry.client())
                if summary is None:  # no training in this run (skipped, quarantined)
                    continue
                kept = int(summary.get("kept", 0))
                ok = ok and kept >= min_snapshots
                events = len(summary.get("events") or [])
                print(f"  {name} {run.data.tags.get('airflow.run_id', run.info.run_id)}: {kept} "
                      f"snapshots, every {summary.get('snapshot_every')} steps, stop "
                      f"{summary.get('stop_reason')} at step {summary.get('step')}, "
                      f"{events} gradient events")  # fmt: skip
    print("  check:", "as expected" if ok else "NOT as expected")
    return ok


def print_ledger_and_slos(expected_moves: dict[str, int]) -> bool:
    """Each model's promotion ledger (``python -m pipeline history``: one entry per move of
    ``champion``) and its SLOs (``python -m pipeline slo``), and the check that the ledger
    holds exactly the demo's champion moves."""
    from pipeline import ledger, slo, spec

    ok = True
    for name, moves in expected_moves.items():
        s = spec.get_spec(name)
        with spec.use_spec(s):
            rows = ledger.entries(name)
            print(f"\n== promotion ledger: {name} (python -m pipeline history --model {name})")
            print("\n".join("  " + line for line in ledger.format_table(rows).splitlines()))
            print(f"  check: {len(rows)} entries for {moves} champion moves: "
                  + ("as expected" if len(rows) == moves else "NOT as expected"))  # fmt: skip
            ok = ok and len(rows) == moves
            print(f"== SLOs: {name} (python -m pipeline slo --model {name})")
            report = slo.compute(s, timeout=2.0)
            print("\n".join("  " + line for line in report.table().splitlines()))
    return ok


def _run_context(batch_uri: str):
    """The DAG run that processed ``batch_uri``, found through its MLflow run's tags."""
    from pipeline import registry, stages

    found = registry.client().search_runs(
        [registry.experiment_id()],
        filter_string=f"tags.`data.batch_uri` = '{batch_uri}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not found:
        return None
    tags = found[0].data.tags
    return stages.RunContext(tags["airflow.dag_id"], tags["airflow.run_id"])


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
