"""train_model's placement is chosen by settings, not DAG edits: the DAG is parsed in a fresh
process with the environment of each mode, and the rendered task is checked (operator, pool,
queue, executor, GPU resources)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "infra" / "k8s" / "training-pod-template.yaml"

PROBE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1] + "/retrain_model.py")
if bag.import_errors:
    print(json.dumps({"errors": {k: str(v)[-800:] for k, v in bag.import_errors.items()}})); raise SystemExit
t = bag.dags["retrain_card_fraud"].get_task("train_model")
cfg = t.executor_config or {}
pod = cfg.get("pod_override")
if pod is not None and not isinstance(pod, dict):
    pod = pod.to_dict()
print(json.dumps({"operator": type(t).__name__, "pool": t.pool, "queue": t.queue,
                  "executor": t.executor, "template": cfg.get("pod_template_file"), "pod": pod,
                  "others": sorted(x.task_id for x in bag.dags["retrain_card_fraud"].tasks
                                   if x.pool == t.pool and x.task_id != "train_model")}))
"""


def render(tmp_path: Path, **env: str) -> dict:
    e = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PIPELINE_", "AIRFLOW__CORE__EXECUTOR"))
    }
    e.update(
        {
            "AIRFLOW_HOME": str(tmp_path / "airflow"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "True",
            **env,
        }
    )
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(ROOT / "dags")],
        env=e,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "errors" not in result, result
    return result


def _gpu_limit(pod: dict) -> str:
    base = next(c for c in pod["spec"]["containers"] if c["name"] == "base")
    return str(base["resources"]["limits"]["nvidia.com/gpu"])


def test_default_is_in_process_with_the_gpu_pool(tmp_path):
    r = render(tmp_path, AIRFLOW__CORE__EXECUTOR="LocalExecutor")
    assert (r["operator"], r["pool"], r["queue"]) == ("_PythonDecoratedOperator", "gpu", "default")
    assert r["template"] is None and r["pod"] is None
    assert r["others"] == []  # only training holds a GPU slot


def test_inprocess_mode_ignores_celery_routing(tmp_path):
    r = render(
        tmp_path, AIRFLOW__CORE__EXECUTOR="CeleryExecutor", PIPELINE_EXECUTION_MODE="inprocess"
    )
    assert (r["pool"], r["queue"], r["pod"]) == ("gpu", "default", None)


@pytest.mark.parametrize("executor", ["CeleryExecutor", "LocalExecutor"])
def test_celery_mode_routes_to_the_gpu_queue(tmp_path, executor):
    r = render(
        tmp_path,
        AIRFLOW__CORE__EXECUTOR=executor,
        PIPELINE_EXECUTION_MODE="celery",
        PIPELINE_GPU_QUEUE="gpu",
    )
    assert (r["operator"], r["pool"], r["queue"]) == ("_PythonDecoratedOperator", "gpu", "gpu")
    assert r["pod"] is None


def test_auto_mode_under_celery_routes_to_the_gpu_queue(tmp_path):
    r = render(tmp_path, AIRFLOW__CORE__EXECUTOR="CeleryExecutor")
    assert (r["pool"], r["queue"]) == ("gpu", "gpu")


def test_kubernetes_mode_renders_a_gpu_pod(tmp_path):
    r = render(
        tmp_path,
        AIRFLOW__CORE__EXECUTOR="LocalExecutor",
        PIPELINE_EXECUTION_MODE="kubernetes",
        PIPELINE_K8S_GPUS="2",
    )
    assert r["pool"] == "gpu" and r["queue"] == "default"
    assert r["executor"] is None  # KubernetesExecutor not configured: not named (would not parse)
    assert _gpu_limit(r["pod"]) == "2"
    base = next(c for c in r["pod"]["spec"]["containers"] if c["name"] == "base")
    assert {"name": "PIPELINE_TRAIN_PROCESSES", "value": "2"} in [
        {k: e[k] for k in ("name", "value")} for e in base["env"]
    ]  # one torchrun rank per GPU
    assert any(t["key"] == "nvidia.com/gpu" for t in r["pod"]["spec"]["tolerations"])
    assert Path(r["template"]) == TEMPLATE
    template = yaml.safe_load(TEMPLATE.read_text())
    assert template["spec"]["containers"][0]["name"] == "base"
    assert template["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_kubernetes_mode_uses_the_kubernetes_executor_when_configured(tmp_path):
    pytest.importorskip(
        "airflow.providers.cncf.kubernetes",
        reason="KubernetesExecutor needs the cncf.kubernetes provider",
    )
    r = render(
        tmp_path,
        AIRFLOW__CORE__EXECUTOR="CeleryExecutor,KubernetesExecutor",
        PIPELINE_EXECUTION_MODE="kubernetes",
    )
    assert r["executor"] == "KubernetesExecutor" and _gpu_limit(r["pod"]) == "1"


def test_unknown_mode_fails_parsing_with_a_clear_error(tmp_path):
    e = {
        **os.environ,
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "PIPELINE_EXECUTION_MODE": "gpu-farm",
    }
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(ROOT / "dags")],
        env=e,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert "PIPELINE_EXECUTION_MODE='gpu-farm'" in out.stdout + out.stderr
