"""The supported-stack check at ``import pipeline`` (pipeline/versions.py).

A distribution's metadata earlier on ``sys.path`` wins, so a ``*.dist-info`` folder on
PYTHONPATH makes a real interpreter see another installed version, without installing one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import versions

ROOT = Path(__file__).resolve().parents[2]


def _fake_dist(where: Path, name: str, version: str) -> None:
    info = where / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def _import_pipeline(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k != versions.ALLOW_ENV}
    full.update(PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}", **env)
    return subprocess.run(
        [sys.executable, "-c", "import pipeline; print('imported')"],
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_installed_stack_is_supported():
    assert versions.problems() == []


def test_an_unsupported_release_stops_the_import_naming_it_and_the_fix(tmp_path):
    _fake_dist(tmp_path, "evidently", "0.4.40")
    _fake_dist(tmp_path, "mlflow", "2.22.0")
    out = _import_pipeline(tmp_path)
    assert out.returncode != 0
    assert "UnsupportedVersionError" in out.stderr
    assert "evidently 0.4.40 is installed; this pipeline supports evidently>=0.7.23,<0.8" in (
        out.stderr
    )
    assert "mlflow 2.22.0 is installed" in out.stderr
    assert "pip install -r requirements.txt -c constraints.txt" in out.stderr
    assert "imported" not in out.stdout


def test_the_escape_hatch_warns_and_imports(tmp_path):
    _fake_dist(tmp_path, "torch", "3.0.0")
    out = _import_pipeline(tmp_path, **{versions.ALLOW_ENV: "true"})
    assert out.returncode == 0, out.stderr
    assert "imported" in out.stdout
    assert "torch 3.0.0 is installed" in out.stderr  # the warning, on the root logger's stderr


@pytest.mark.parametrize(
    ("got", "ok"),
    [("2.13.0+cpu", True), ("2.14.1", True), ("2.12.1", False), ("3.0.0", False), ("x.y", False)],
)
def test_local_and_invalid_versions(monkeypatch, got, ok):
    monkeypatch.setattr(versions, "installed", lambda dist: got)
    assert (versions.problems({"torch": ">=2.13,<3"}) == []) is ok


def test_a_missing_distribution_is_not_checked(monkeypatch):
    """The scoring image has no Airflow: the check skips what is not installed."""
    monkeypatch.setattr(versions, "installed", lambda dist: None)
    assert versions.problems() == []
