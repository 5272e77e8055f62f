"""`make demo`: run the retrain_model DAG for real, on the embedded default, through a story.

1. a first batch makes the first champion;
2. a drifted batch (covariate shift + concept drift) triggers retraining, the challenger
   beats the champion on the trusted evaluation set and is promoted;
3. a batch with poisoned labels is retrained on (the champion decays on its labels), and
   the gate rejects the challenger on the trusted set: the champion stays;
4. a batch that breaks the data contract is quarantined and the run fails, saying why.

Each run is `airflow dags test retrain_model <date> --conf …`: a real DAG run in the
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
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOME = Path(os.environ.get("PIPELINE_HOME", ROOT / ".local")).resolve()
AIRFLOW = str(Path(sys.executable).with_name("airflow"))
STATE = ("storage", "mlflow", "airflow", "keys", "demo")

STORY = [
    # (title, batch name, generator knobs, run date, eval set)
    ("first batch makes the first champion", "batch-001",
     {"seed": 1, "start": "2026-02-27T00:00:00Z"}, "2026-03-01", "eval-world-a"),
    ("drifted batch: retrain, challenger promoted", "batch-002",
     {"seed": 2, "start": "2026-03-01T00:00:00Z", "covariate_shift": 0.6, "concept_drift": 1.0},
     "2026-03-02", "eval-world-b"),
    ("poisoned labels: retrained, gate rejects, champion stays", "batch-003",
     {"seed": 3, "start": "2026-03-02T00:00:00Z", "covariate_shift": 0.6, "concept_drift": 1.0,
      "label_poison": 0.8}, "2026-03-03", "eval-world-b"),
    ("contract broken: batch quarantined, run fails", "batch-004",
     {"seed": 4, "rows": 5000, "start": "2026-03-03T00:00:00Z", "covariate_shift": 0.6,
      "concept_drift": 1.0, "schema_fault": "unknown_category"}, "2026-03-04", "eval-world-b"),
]  # fmt: skip
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
            storage.join(root, "trusted", f"{name}.parquet"), to_parquet_bytes(generate(WorldSpec(**knobs)))
        ).uri
    for _, batch, knobs, _, _ in STORY:
        spec = WorldSpec(**{"rows": 20_000, **knobs})
        uris[batch] = storage.write_bytes(
            storage.join(root, "landing", f"{batch}.parquet"), to_parquet_bytes(generate(spec))
        ).uri
    return uris


def run_dag(date: str, conf: dict, log_path: Path) -> tuple[int, float]:
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        rc = subprocess.call(
            [AIRFLOW, "dags", "test", "retrain_model", date, "--conf", json.dumps(conf)],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip
    return rc, time.perf_counter() - t0


def main() -> int:
    os.environ.setdefault("PIPELINE_HOME", str(HOME))
    archive_previous_state()
    (HOME / "airflow").mkdir(parents=True, exist_ok=True)
    logs = HOME / "demo"
    logs.mkdir(parents=True, exist_ok=True)
    print("initialising Airflow metadata DB (SQLite) ...", flush=True)
    subprocess.run([AIRFLOW, "db", "migrate"], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)  # fmt: skip
    # train_model runs in pool "gpu": `dags test` ignores pools, a scheduler (make airflow) does not
    subprocess.run([AIRFLOW, "pools", "set", "gpu", "1", "GPU training"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    print("landing reference data ...", flush=True)
    uris = land_data()

    from pipeline import registry, steps
    from pipeline.settings import get_settings

    results = []
    for i, (title, batch, _, date, eval_set) in enumerate(STORY, 1):
        print(f"\n[{i}/{len(STORY)}] {title}: airflow dags test retrain_model {date}", flush=True)
        conf = {"batch_uri": uris[batch], "eval_uri": uris[eval_set]}
        rc, secs = run_dag(date, conf, logs / f"run-{i}.log")
        ctx = _run_context(conf["batch_uri"])
        summary = steps.publish_summary(ctx) if ctx else None
        results.append((title, rc, secs, summary))
        state = "succeeded" if rc == 0 else f"failed (exit {rc})"
        print(f"    DAG run {state} in {secs:.0f}s; log: {logs / f'run-{i}.log'}")
        if summary:
            print("\n".join("    " + line for line in steps.format_summary(summary).splitlines()[1:]))

    print("\n== registry: model", get_settings().model_name)
    c = registry.client()
    name = get_settings().model_name
    for found in sorted(c.search_model_versions(f"name = '{name}'"), key=lambda m: int(m.version)):
        mv = c.get_model_version(name, found.version)  # search results carry no aliases
        aliases = ",".join(mv.aliases) or "-"
        print(f"  v{mv.version:<3} aliases={aliases:<30} gate={mv.tags.get('gate.verdict', '-'):<8}"
              f" {mv.tags.get('rejection_reason', '')}")  # fmt: skip
    champ = registry.alias_version(registry.CHAMPION)
    print(f"  champion: v{champ.version if champ else '-'}")

    expected = [0, 0, 0, "fail"]
    ok = all((rc == 0) if e == 0 else (rc != 0) for (_, rc, _, _), e in zip(results, expected, strict=True))
    ok = ok and champ is not None and str(champ.version) == "2"
    print(f"""
== open the UIs on what the demo made
  make airflow   -> http://127.0.0.1:8080  (DAG retrain_model, 4 runs; login printed on start)
  make mlflow    -> http://127.0.0.1:5000  (experiment retrain_model; Models -> {get_settings().model_name})
  state: {HOME}
""")
    print("demo story", "matched" if ok else "DID NOT match", "the expected outcomes")
    return 0 if ok else 1


def _run_context(batch_uri: str):
    """The DAG run that processed ``batch_uri``, found through its MLflow run's tags."""
    from pipeline import registry, steps

    found = registry.client().search_runs(
        [registry.experiment_id()], filter_string=f"tags.`data.batch_uri` = '{batch_uri}'",
        order_by=["attributes.start_time DESC"], max_results=1,
    )  # fmt: skip
    if not found:
        return None
    tags = found[0].data.tags
    return steps.RunContext(tags["airflow.dag_id"], tags["airflow.run_id"])


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
