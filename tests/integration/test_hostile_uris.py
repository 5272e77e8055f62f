"""Hostile URIs through the real entry points: the CLI as subprocesses, Airflow's REST API.

A trigger may read only under its model's roots (``pipeline.uris``): the landing prefix and
allowed sources for a batch, the trusted prefix (or the spec's own set) for an evaluation set.
Here each entry point gets the URIs an attacker would try — ``/proc/self/environ``, ``..``,
``%2e%2e``, a symlinked folder, a ``file://host/`` authority, a query, a case trick — and must
refuse before anything is read, copied or moved, naming the allowed roots and what to do:

* the CLI (``python -m pipeline ingest_batch --batch …``, ``gate_promotion --eval-uri …``,
  ``run --batch …``): exit 2, the message on stderr, no file written or touched;
* Airflow's REST API on the UI stack (``ui_stack.py``, shared with ``test_trigger_form.py``):
  the trigger is refused with 400 by the Params' patterns, and no run is created;
* a real DAG run (``airflow dags test``) of a URI that passes the form's loose pattern (a
  symlinked folder inside the landing prefix) fails at its first task, without a retry,
  having read nothing.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from ui_stack import DAG_ID, Stack, shared_stack

from pipeline import storage
from pipeline.data.generate import WorldSpec, generate, to_parquet_bytes

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def tree(*folders: Path) -> dict[str, tuple[str | None, int, bool]]:
    """Every entry under the folders: its bytes' digest, mtime, whether a link (not followed)."""
    out = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            st = p.lstat()
            digest = storage.sha256_bytes(p.read_bytes()) if p.is_file() else None
            out[str(p)] = (digest, st.st_mtime_ns, p.is_symlink())
    return out


# -- the CLI ---------------------------------------------------------------------------------------


@pytest.fixture
def home(tmp_path: Path) -> dict:
    """A PIPELINE_HOME with a landed batch, the trusted set, and a secret outside both that
    links inside the landing and trusted folders lead to."""
    h = tmp_path / "home"
    store = h / "storage"
    land, trusted, outside = store / "landing" / "card_fraud", store / "trusted", tmp_path / "out"
    for folder in (land, trusted / "card_fraud", outside):
        folder.mkdir(parents=True)
    data = to_parquet_bytes(generate(WorldSpec(rows=300, seed=1)))
    for f in (land / "b.parquet", trusted / "card_fraud" / "eval.parquet", outside / "s.parquet"):
        f.write_bytes(data)
    for folder in (land, trusted):
        (folder / "link.parquet").symlink_to(outside / "s.parquet")
        (folder / "linkdir").symlink_to(outside)
    registered = tmp_path / "register_challenger.json"
    registered.write_text(
        json.dumps(
            {
                "stage": "register_challenger",
                "verdict": "registered",
                "model_name": "card-fraud",
                "model_version": "1",
                "mlflow_run_id": "x",
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "MLFLOW_"))}
    env["PIPELINE_HOME"] = str(h)
    return {
        "env": env,
        "home": h,
        "storage": store,
        "land": land,
        "outside": outside,
        "registered": registered,
    }


def cli(home: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        env=home["env"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


CLI_BATCHES = [
    "file:///proc/self/environ",
    "{land}/../../keys/k",
    "{land}/%2e%2e/%2e%2e/keys/k",
    "{land}//../b.parquet",
    "{land}/linkdir/s.parquet",
    "file://evilhost{land_path}/b.parquet",
    "{land}/b.parquet?versionId=1",
    "FILE://{land_path}/b.parquet",
]


@pytest.mark.parametrize("where", CLI_BATCHES)
def test_the_cli_refuses_a_hostile_batch_naming_the_landing_prefix(home, where):
    uri = where.format(land=home["land"].as_uri(), land_path=home["land"])
    before = tree(home["home"], home["outside"])
    r = cli(home, "ingest_batch", "--batch", uri)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "rejected: batch" in r.stderr and "Traceback" not in r.stderr
    assert home["land"].as_uri() in r.stderr  # the allowed root
    assert "data land --model card_fraud" in r.stderr  # what to do instead
    assert tree(home["home"], home["outside"]) == before  # nothing read, written, moved


def test_the_cli_run_refuses_the_process_environment_as_a_batch(home):
    """The issue's reproduction: `run --batch file:///proc/self/environ` stored the worker's
    environment as a snapshot."""
    before = tree(home["home"])
    r = cli(home, "run", "--batch", "file:///proc/self/environ")
    assert r.returncode == 2 and "outside model 'card_fraud'" in r.stderr, r.stderr
    assert tree(home["home"]) == before
    assert not (home["storage"] / "snapshots").exists()


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--eval-uri", "/etc/passwd"], "evaluation set '/etc/passwd' is refused"),
        (["--eval-uri", "{storage}/trusted/linkdir/s.parquet"], "resolves to"),
        (["--eval-uri", "{storage}/landing/card_fraud/b.parquet"], "outside model"),
        (["--eval-uri", "trusted/%2e%2e/keys/k"], "percent-encoded"),
        (  # the REST trigger, through the CLI: the first refusal is the floor
            ["--gate-floor", "0.5", "--gate-margin", "0", "--eval-uri", "/etc/passwd"],
            "gate_floor=0.5 loosens the policy",
        ),
    ],
)
def test_the_gate_refuses_a_hostile_evaluation_set_before_reading_it(home, flags, says):
    flags = [f.format(storage=home["storage"].as_uri()) for f in flags]
    before = tree(home["home"], home["outside"])
    r = cli(home, "gate_promotion", "--in", str(home["registered"]), *flags)
    assert r.returncode == 2, r.stdout + r.stderr
    assert says in r.stderr and "Traceback" not in r.stderr, r.stderr
    if "--gate-floor" not in flags:
        assert (home["storage"] / "trusted").as_uri() in r.stderr  # the trusted prefix
        assert "--as-eval" in r.stderr
    assert tree(home["home"], home["outside"]) == before


# -- Airflow's REST API (the UI stack: airflow standalone, the DAGs paused) ----------------------


@pytest.fixture(scope="module")
def stack(request, tmp_path_factory) -> Stack:
    return shared_stack(request, tmp_path_factory)


@pytest.fixture(scope="module")
def token(stack) -> str:
    return stack.token()


def _runs(stack: Stack, token: str, dag_id: str) -> int:
    status, body = stack.api("GET", f"/api/v2/dags/{dag_id}/dagRuns?limit=1", token=token)
    assert status == 200, body
    return int(body["total_entries"])


@pytest.mark.parametrize(
    ("conf", "fields"),
    [
        ({"batch_uri": "file:///proc/self/environ"}, ["batch_uri"]),
        ({"batch_uri": "{storage}/landing/card_fraud/../../keys/signing.key"}, ["batch_uri"]),
        ({"batch_uri": "{storage}/landing/card_fraud/%2e%2e/x.parquet"}, ["batch_uri"]),
        ({"eval_uri": "/etc/passwd"}, ["eval_uri"]),
        ({"gate_floor": 0.5, "gate_margin": 0, "eval_uri": "/etc/passwd"}, ["gate_", "eval_uri"]),
    ],
)
def test_a_hostile_trigger_is_refused_by_the_rest_api_before_a_run_exists(
    stack, token, conf, fields
):
    storage_uri = (stack.home / "storage").as_uri()
    conf = {k: v.format(storage=storage_uri) if isinstance(v, str) else v for k, v in conf.items()}
    runs, before = _runs(stack, token, DAG_ID), tree(stack.home / "storage")
    status, body = stack.api(
        "POST", f"/api/v2/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": conf}, token=token
    )
    assert status == 400, (status, body)
    detail = str(body.get("detail") if isinstance(body, dict) else body)
    assert any(f in detail for f in fields), detail
    assert _runs(stack, token, DAG_ID) == runs  # no run was created
    assert tree(stack.home / "storage") == before


def test_a_hostile_batch_past_the_form_fails_the_first_task_having_read_nothing(airflow_home):
    """A symlinked folder inside the landing prefix passes the form's pattern (a pattern
    cannot see links): a real DAG run (``airflow dags test``, recorded in the metadata DB)
    fails at its first task at once — not retried — with no snapshot, no quarantine, and
    the file the link leads to untouched. (The UI stack's API server, above, cannot execute
    tasks: its runs stay queued.)"""
    store = airflow_home.home / "storage"
    land = store / "landing" / "card_fraud"
    outside = airflow_home.home.parent / "outside"
    land.mkdir(parents=True)
    outside.mkdir()
    secret = outside / "secret.parquet"
    secret.write_bytes(to_parquet_bytes(generate(WorldSpec(rows=500, seed=9))))
    (land / "linkdir").symlink_to(outside)
    before = tree(store, outside)
    r = airflow_home.dags_test(
        DAG_ID, {"batch_uri": (land / "linkdir" / "secret.parquet").as_uri()}
    )
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-4000:]
    assert "outside model 'card_fraud'" in out and "resolves to" in out, out[-4000:]
    db = sqlite3.connect(airflow_home.home / "airflow" / "airflow.db")
    tries = {
        task: (state, n)
        for task, state, n in db.execute(
            "SELECT task_id, state, try_number FROM task_instance WHERE dag_id = ?", (DAG_ID,)
        )
    }
    db.close()
    assert tries["ingest_batch"] == ("failed", 1), tries  # deterministic: not retried
    assert tries["validate_batch"][0] == "upstream_failed", tries
    after = tree(store, outside)
    new = sorted(set(after) - set(before))
    assert all("/storage/runs" in p for p in new), new  # only publish_summary's record
    assert {p: after.get(p) for p in before} == before  # nothing read, copied, moved
    assert not (store / "snapshots").exists() and not (store / "quarantine").exists()
