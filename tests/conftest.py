"""Shared fixtures. Every test gets its own embedded state (PIPELINE_HOME) under tmp."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _reset_caches() -> None:
    from pipeline import registry, settings

    settings.get_settings.cache_clear()
    registry.client.cache_clear()


@pytest.fixture
def pipeline_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty embedded default: storage, MLflow (SQLite) and keys under tmp_path."""
    home = tmp_path / "home"
    monkeypatch.setenv("PIPELINE_HOME", str(home))
    for var in (
        "PIPELINE_STORAGE_URI",
        "PIPELINE_MLFLOW_TRACKING_URI",
        "PIPELINE_SIGNING_KEY",
        "PIPELINE_EVAL_URI",
        "PIPELINE_S3_ENDPOINT_URL",
    ):
        monkeypatch.delenv(var, raising=False)
    _reset_caches()
    yield home
    _reset_caches()


@pytest.fixture(scope="session")
def contract():
    from pipeline.contract import load_contract

    return load_contract(ROOT / "models" / "card_fraud" / "contract.yaml")
