"""DAG integrity, for every model spec: imports cleanly, wires the expected graph, Params
take their defaults and bounds from the spec, a broken spec is an import error of its own,
and nothing is touched at parse time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DAGS = ROOT / "dags"
HELPERS = set((DAGS / ".airflowignore").read_text().split())  # modules beside the DAGs
DAG_FILES = sorted(p for p in DAGS.glob("*.py") if p.name not in HELPERS | {"model_specs.py"})
SPECS = sorted(p.parent.name for p in (ROOT / "models").glob("*/model.yaml"))
HEAVY = [
    "torch",
    "pandas",
    "mlflow",
    "evidently",
    "great_expectations",
    "boto3",
    "sklearn",
    "pipeline.stages",
]


@pytest.fixture(scope="module")
def dagbag(tmp_path_factory):
    os.environ.setdefault("AIRFLOW_HOME", str(tmp_path_factory.mktemp("airflow")))
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    sys.path.insert(0, str(DAGS))  # Airflow puts the DAGs folder on sys.path, as here
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS))


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}


@pytest.mark.parametrize("dag_file", DAG_FILES, ids=lambda p: p.name)
def test_each_file_defines_a_dag_with_tags_retries_and_docs(dagbag, dag_file):
    dags = [d for d in dagbag.dags.values() if Path(d.fileloc).name == dag_file.name]
    assert dags, f"{dag_file.name} defines no DAG"
    for dag in dags:
        assert dag.tags, f"{dag.dag_id} has no tags"
        assert dag.doc_md and len(dag.doc_md) > 100
        for t in dag.tasks:
            assert t.retries >= 1, f"{dag.dag_id}.{t.task_id} has no retries"


def test_one_retrain_and_one_rollback_dag_per_spec(dagbag):
    assert len(SPECS) >= 2
    assert {f"retrain_{n}" for n in SPECS} | {f"rollback_{n}" for n in SPECS} <= set(dagbag.dags)


@pytest.mark.parametrize("model", SPECS)
def test_retrain_graph(dagbag, model):
    dag = dagbag.dags[f"retrain_{model}"]
    down = {t.task_id: sorted(t.downstream_task_ids) for t in dag.tasks}
    assert down == {
        "ingest_batch": ["detect_drift", "register_challenger", "train_model", "validate_batch"],
        "validate_batch": ["detect_drift"],
        "detect_drift": ["decide_retrain"],
        "decide_retrain": ["retrain_gate"],
        "retrain_gate": ["train_model"],
        "train_model": ["register_challenger", "verify_checkpoint"],
        "verify_checkpoint": ["register_challenger"],
        "register_challenger": ["gate_promotion"],
        "gate_promotion": ["approval_required", "promote_champion"],
        "approval_required": ["approve_promotion"],
        "approve_promotion": ["promote_champion"],
        "promote_champion": ["publish_summary"],
        "publish_summary": [],
    }
    assert dag.max_active_runs == 1
    assert dag.get_task("publish_summary").trigger_rule == "all_done"
    # optional human approval: skipped (not failed) when not required, and promotion still runs
    assert dag.get_task("approve_promotion").task_type == "HITLOperator"
    assert dag.get_task("promote_champion").trigger_rule == "none_failed"
    assert f"model:{model}" in dag.tags


@pytest.mark.parametrize("model", SPECS)
def test_monitor_graph(dagbag, model):
    """monitor_<model>: on the spec's cron, one run at a time; a decayed champion emits the
    model's own batch asset (the event retrain_<model> is scheduled on), nothing else does."""
    from pipeline.spec import get_spec

    spec = get_spec(model)
    if not spec.monitor.enabled:
        assert f"monitor_{model}" not in dagbag.dags
        return
    dag = dagbag.dags[f"monitor_{model}"]
    down = {t.task_id: sorted(t.downstream_task_ids) for t in dag.tasks}
    assert down == {
        "watch_champion": ["alert_on_call", "decay_warrants_retrain", "request_retrain"],
        "alert_on_call": [],
        "decay_warrants_retrain": ["request_retrain"],
        "request_retrain": [],
        "on_call_checks": [],
    }
    assert dag.max_active_runs == 1 and dag.catchup is False
    assert dag.timetable.expression == spec.monitor.cron
    assert {o.uri for o in dag.get_task("request_retrain").outlets} == {spec.asset_uri}
    assert not any(t.outlets for t in dag.tasks if t.task_id != "request_retrain")
    assert f"model:{model}" in dag.tags


@pytest.mark.parametrize("model", SPECS)
def test_each_model_has_its_own_asset(dagbag, model):
    from pipeline.spec import get_spec

    spec = get_spec(model)
    dag = dagbag.dags[f"retrain_{model}"]
    cond = dag.timetable.asset_condition
    assets = list(getattr(cond, "objects", [cond]))
    uris = {a.uri for a in assets} if spec.schedule.asset else set()
    assert uris == ({spec.asset_uri} if spec.schedule.asset else set())
    outlets = {o.uri for o in dag.get_task("promote_champion").outlets}
    assert outlets == {f"pipeline://models/{model}/champion"}


@pytest.mark.parametrize("model", SPECS)
def test_params_take_defaults_and_bounds_from_the_spec(dagbag, model):
    from pipeline.spec import get_spec

    spec = get_spec(model)
    params = dagbag.dags[f"retrain_{model}"].params
    for name in ("max_epochs", "learning_rate", "gate_margin", "gate_floor", "decay_margin"):
        schema = params.get_param(name).schema
        assert schema.get("type") in {"integer", "number"}
        assert ("maximum" in schema or "minimum" in schema) and schema.get("title")
    assert params["gate_floor"] == spec.floors[spec.primary_metric]
    assert params["gate_margin"] == spec.gate.margin
    assert params["max_epochs"] == spec.training.max_epochs
    assert params["gate_slices"] == list(spec.gate.slices)
    assert params["require_approval"] is spec.gate.require_approval
    assert params.get_param("max_epochs").schema["maximum"] == spec.training.max_epochs


def _validate(dagbag, model, name, value):
    import copy

    params = copy.deepcopy(dagbag.dags[f"retrain_{model}"].params)
    params.validate()  # the defaults are valid
    params[name] = value
    params.validate()


@pytest.mark.parametrize("model", SPECS)
@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("max_epochs", 0),
        ("max_epochs", 10_000),
        ("learning_rate", 0),
        ("gate_margin", -0.1),
        ("gate_floor", 1.5),
        ("force_retrain", "yes"),
        ("gate_margin", 0.0),  # below the spec's margin
        ("decay_margin", 0.9),
        ("gate_max_checkpoint_mb", 1e6),
    ],
)
def test_bad_or_looser_trigger_values_are_refused_by_the_form(dagbag, model, name, value):
    with pytest.raises(Exception, match=f"param {name}"):
        _validate(dagbag, model, name, value)


@pytest.mark.parametrize("model", SPECS)
def test_tighter_trigger_values_are_accepted_by_the_form(dagbag, model):
    from pipeline.spec import get_spec

    spec = get_spec(model)
    floor = spec.floors[spec.primary_metric]
    _validate(
        dagbag, model, "gate_floor", min(floor + 0.01, 1.0) if spec.direction > 0 else floor / 2
    )
    _validate(dagbag, model, "gate_margin", spec.gate.margin + 0.01)
    _validate(dagbag, model, "require_approval", True)
    _validate(dagbag, model, "max_epochs", 1)


def test_a_broken_spec_is_an_import_error_naming_file_and_field_and_the_others_load(tmp_path):
    """One team's typo in its spec never hides another team's DAGs."""
    import shutil

    root = tmp_path / "models"
    shutil.copytree(ROOT / "models" / "card_fraud", root / "card_fraud")
    broken = root / "broken_one"
    broken.mkdir()
    shutil.copy(ROOT / "models" / "card_fraud" / "contract.yaml", broken / "contract.yaml")
    (broken / "model.yaml").write_text(
        "contract: contract.yaml\ntask: binary\ngate: {margn: 0.1}\n"
    )
    code = (
        f"import sys, json; sys.path.insert(0, {str(DAGS)!r});"
        "from airflow.dag_processing.dagbag import DagBag;"
        f"b = DagBag(dag_folder={str(DAGS)!r});"
        "print(json.dumps({'dags': sorted(b.dags), 'errors': {k.rsplit('/', 1)[-1]: v for k, v in b.import_errors.items()}}))"
    )
    env = {
        **os.environ,
        "PIPELINE_MODELS_ROOT": str(root),
        "AIRFLOW_HOME": str(tmp_path / "af"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    }
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["dags"] == ["monitor_card_fraud", "retrain_card_fraud", "rollback_card_fraud"]
    assert list(got["errors"]) == ["model_specs.py"]
    error = got["errors"]["model_specs.py"]
    assert "broken_one/model.yaml" in error and "gate.margn" in error and "unknown field" in error


@pytest.mark.parametrize("dag_file", DAG_FILES, ids=lambda p: p.name)
def test_parse_time_is_light_and_touches_no_database(dag_file, tmp_path):
    """Import the DAG file in a fresh interpreter whose metadata DB does not exist and
    cannot be created: parsing must succeed and must not import heavy libraries."""
    code = (
        f"import sys, json, runpy; sys.path.insert(0, {str(DAGS)!r}); runpy.run_path({str(dag_file)!r});"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    )
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(tmp_path),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "sqlite:////nonexistent/dir/airflow.db",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    }
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
    assert not Path("/nonexistent/dir/airflow.db").exists()


SHORT_CIRCUITS = {"retrain_gate", "approval_required"}  # decisions already made upstream


@pytest.mark.parametrize("model", SPECS)
def test_every_task_is_a_cli_command_with_its_options(dagbag, model):
    """CLI parity: a failed task is replayed with ``python -m pipeline <task id>``; the names
    are the vocabulary's (pipeline.names.Task), and every trigger Param is a flag of the
    command that uses it (``gate_margin`` -> ``--gate-margin``)."""
    import argparse

    from pipeline.cli import build_parser
    from pipeline.names import Task

    dag = dagbag.dags[f"retrain_{model}"]
    assert set(dag.task_ids) == {t.value for t in Task}
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for task_id in set(dag.task_ids) - SHORT_CIRCUITS:
        assert task_id in sub.choices, f"no `python -m pipeline {task_id}`"

    def flags(command: str) -> set[str]:
        return {o for a in sub.choices[command]._actions for o in a.option_strings}

    wanted = {
        "ingest_batch": ["batch_uri"],
        "decide_retrain": ["force_retrain", "decay_margin"],
        "train_model": ["max_epochs", "learning_rate"],
        "gate_promotion": [p for p in dag.params if p.startswith("gate_")] + ["eval_uri"],
        "promote_champion": ["require_approval", "canary"],
    }
    for command, params in wanted.items():
        for p in params:
            flag = "--batch" if p == "batch_uri" else "--" + p.replace("_", "-")
            assert p in dag.params, p
            assert flag in flags(command), f"{command} lacks {flag} (Param {p})"
            assert flag in flags("run") or p == "batch_uri", f"run lacks {flag}"
    # every Param has a flag somewhere
    every = set().union(*(flags(c) for c in sub.choices))
    missing = [
        p for p in dag.params if p != "batch_uri" and "--" + p.replace("_", "-") not in every
    ]
    assert not missing, missing
