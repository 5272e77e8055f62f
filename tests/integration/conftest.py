"""Integration fixtures: a real Airflow metadata DB and MLflow store in a temp dir."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
AIRFLOW = str(Path(sys.executable).with_name("airflow"))


@dataclass
class AirflowHome:
    env: dict[str, str]
    home: Path

    def dags_test(self, dag_id: str, conf: dict, timeout: int = 600) -> subprocess.CompletedProcess:
        """`airflow dags test`: a real DAG run recorded in the metadata DB, tasks in-process."""
        return subprocess.run(
            [AIRFLOW, "dags", "test", dag_id, "--conf", json.dumps(conf)],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def use(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Point this test process at the same embedded state as the DAG runs."""
        for k, v in self.env.items():
            if k.startswith(("PIPELINE_", "MLFLOW_")):
                monkeypatch.setenv(k, v)
        from pipeline import registry, settings

        settings.get_settings.cache_clear()
        registry.client.cache_clear()


@pytest.fixture(scope="session")
def airflow_db_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty Airflow metadata DB (SQLite) after ``airflow db migrate``, made once per test
    process (about 4 s of CPU); :func:`airflow_home` gives each test its own copy."""
    home = tmp_path_factory.mktemp("airflow-template")
    db = home / "airflow.db"
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{db}",
    }
    subprocess.run(
        [AIRFLOW, "db", "migrate"], env=env, check=True, capture_output=True, timeout=300
    )
    return db


@pytest.fixture
def airflow_home(tmp_path: Path, airflow_db_template: Path, migrated_db: Path) -> AirflowHome:
    """A fresh embedded default under tmp: a migrated Airflow metadata DB and MLflow store
    (copies of the per-process templates: the same files `airflow db migrate` and the first
    MLflow client would have made there), storage empty."""
    home = tmp_path / "local"
    env = {
        **os.environ,
        "PIPELINE_HOME": str(home),
        "AIRFLOW_HOME": str(home / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow' / 'airflow.db'}",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    }
    for var in ("PIPELINE_STORAGE_URI", "PIPELINE_MLFLOW_TRACKING_URI", "PIPELINE_EVAL_URI"):
        env.pop(var, None)
    (home / "airflow").mkdir(parents=True)
    shutil.copy(airflow_db_template, home / "airflow" / "airflow.db")
    (home / "mlflow").mkdir()
    shutil.copy(migrated_db, home / "mlflow" / "mlflow.db")
    return AirflowHome(env=env, home=home)
