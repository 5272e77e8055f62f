"""Where the training task runs in Airflow: the ``gpu`` pool, and the ``gpu`` Celery queue
only when the Celery executor is configured (other executors have no queues to route by).

``PIPELINE_EXECUTION_MODE`` chooses explicitly, without editing the DAG:
``auto`` (default: as above), ``inprocess`` (pool only: the task runs in the worker process),
``celery`` (pool + queue ``gpu``), ``kubernetes`` (pool + an ``executor_config`` for a GPU pod:
``pod_template_file`` = ``PIPELINE_K8S_POD_TEMPLATE_FILE`` and a ``pod_override`` whose ``base``
container has an ``nvidia.com/gpu`` limit; plus ``executor="KubernetesExecutor"`` when that
executor is configured, e.g. ``AIRFLOW__CORE__EXECUTOR=CeleryExecutor,KubernetesExecutor``).
The ``pod_override`` is a ``kubernetes.client.V1Pod`` when the client is installed (it is with
the cncf.kubernetes provider, which the KubernetesExecutor needs); otherwise the same pod as a
plain dict, so the DAG still parses and the placement can be checked.

Called while the DAG file is parsed, so it reads only the environment and Airflow's
configuration (files/env, no metadata database) and imports nothing heavy. It lives beside
the DAGs, not in ``pipeline/``: it is about Airflow, and the library knows nothing of Airflow.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

MODES = ("auto", "inprocess", "celery", "kubernetes")
DEFAULT_POD_TEMPLATE = (
    Path(__file__).resolve().parents[1] / "infra" / "k8s" / "training-pod-template.yaml"
)


def _executor() -> str:
    value = os.environ.get("AIRFLOW__CORE__EXECUTOR")
    if value is not None:
        return value
    try:
        from airflow.configuration import conf

        return str(conf.get("core", "executor", fallback=""))
    except Exception:  # noqa: BLE001 - outside Airflow: no executor, no queue
        return ""


def uses_celery(executor: str | None = None) -> bool:
    """True when any configured executor (Airflow 3 allows a comma-separated list) is Celery."""
    names = (executor if executor is not None else _executor()).split(",")
    return any(n.strip().rsplit(".", 1)[-1].split(":")[-1] == "CeleryExecutor" for n in names)


def uses_kubernetes(executor: str | None = None) -> bool:
    names = (executor if executor is not None else _executor()).split(",")
    return any(n.strip().rsplit(".", 1)[-1].split(":")[-1] == "KubernetesExecutor" for n in names)


def execution_mode(mode: str | None = None) -> str:
    value = (
        (mode if mode is not None else os.environ.get("PIPELINE_EXECUTION_MODE", ""))
        .strip()
        .lower()
    )
    value = value or "auto"
    if value not in MODES:
        raise ValueError(f"PIPELINE_EXECUTION_MODE={value!r}: use one of {', '.join(MODES)}")
    return value


def gpu_pod_override() -> Any:
    """The training pod's ``base`` container with ``PIPELINE_K8S_GPUS`` GPUs (requests = limits),
    one training process per GPU (``PIPELINE_TRAIN_PROCESSES``: more than one runs torchrun
    with DistributedDataParallel inside the pod), and the GPU taint tolerated; a ``V1Pod`` when
    the kubernetes client is installed, else the same as a dict."""
    gpus = os.environ.get("PIPELINE_K8S_GPUS", "1")
    resources = {"limits": {"nvidia.com/gpu": gpus}, "requests": {"nvidia.com/gpu": gpus}}
    env = [{"name": "PIPELINE_TRAIN_PROCESSES", "value": gpus}]
    toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    try:
        from kubernetes.client import models as k8s
    except ImportError:
        return {
            "spec": {
                "containers": [{"name": "base", "resources": resources, "env": env}],
                "tolerations": [toleration],
            }
        }
    return k8s.V1Pod(
        spec=k8s.V1PodSpec(
            containers=[
                k8s.V1Container(
                    name="base",
                    resources=k8s.V1ResourceRequirements(**resources),
                    env=[k8s.V1EnvVar(**e) for e in env],
                )
            ],
            tolerations=[k8s.V1Toleration(**toleration)],
        )
    )


def train_task_kwargs(executor: str | None = None, mode: str | None = None) -> dict[str, Any]:
    """``@task(**train_task_kwargs())``: pool always; queue only under Celery (or mode celery);
    a GPU pod's executor_config in mode kubernetes."""
    mode = execution_mode(mode)
    kwargs: dict[str, Any] = {"pool": os.environ.get("PIPELINE_GPU_POOL", "gpu")}
    if mode == "celery" or (mode == "auto" and uses_celery(executor)):
        kwargs["queue"] = os.environ.get("PIPELINE_GPU_QUEUE", "gpu")
    elif mode == "kubernetes":
        template = os.environ.get("PIPELINE_K8S_POD_TEMPLATE_FILE", str(DEFAULT_POD_TEMPLATE))
        kwargs["executor_config"] = {
            "pod_template_file": template,
            "pod_override": gpu_pod_override(),
        }
        if uses_kubernetes(executor):  # naming an executor that is not configured fails parsing
            kwargs["executor"] = "KubernetesExecutor"
    return kwargs
