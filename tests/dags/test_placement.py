"""train_model's GPU placement (dags/placement.py): pool always, queue only under Celery."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "dags"))  # as Airflow does

from placement import train_task_kwargs, uses_celery  # noqa: E402


@pytest.mark.parametrize(
    ("executor", "kwargs"),
    [
        ("LocalExecutor", {"pool": "gpu"}),
        ("CeleryExecutor", {"pool": "gpu", "queue": "gpu"}),
        (
            "airflow.providers.celery.executors.celery_executor.CeleryExecutor",
            {"pool": "gpu", "queue": "gpu"},
        ),
        ("LocalExecutor,CeleryExecutor", {"pool": "gpu", "queue": "gpu"}),
        ("KubernetesExecutor", {"pool": "gpu"}),
    ],
)
def test_gpu_placement(executor, kwargs):
    assert train_task_kwargs(executor) == kwargs
    assert uses_celery(executor) == ("queue" in kwargs)
