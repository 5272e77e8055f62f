"""The stack this pipeline supports, checked when ``pipeline`` is imported.

An Airflow, MLflow, torch, Great Expectations or Evidently release outside these ranges
changes APIs the pipeline calls (Airflow 3's task SDK, MLflow 3's logged models, GX 1.x's
data contexts, Evidently 0.7's reports) and fails later, mid-run, with an error that names
none of them. Checking the installed distributions' metadata at import turns that into one
clear message before any task starts. A distribution that is not installed is not checked
(the scoring image has no Airflow; a CLI host may have no Evidently): the import that needs
it fails on its own, naming it.

``PIPELINE_ALLOW_UNSUPPORTED_VERSIONS=true`` turns the error into a logged warning, for
someone trying a new release on purpose. Each range starts at the minor release the suite
runs on (the pins in requirements.txt) and stops before the next major (for Evidently, still
0.x, before the next minor): later minors are assumed compatible, earlier ones are untested.
Widen a range only with a green suite on the release it admits.

Standard library and ``packaging`` only: ``pipeline.names`` (imported by DAG files at parse
time) pays about as much as reading six ``METADATA`` files.
"""

from __future__ import annotations

import logging
import os
from importlib import metadata

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

log = logging.getLogger(__name__)

ALLOW_ENV = "PIPELINE_ALLOW_UNSUPPORTED_VERSIONS"

SUPPORTED: dict[str, str] = {
    "apache-airflow": ">=3.3,<4",
    "mlflow": ">=3.17,<4",
    "torch": ">=2.13,<3",
    "great-expectations": ">=1.24,<2",
    "evidently": ">=0.7.23,<0.8",
    "pandas": ">=2.3,<3",  # Evidently 0.7 refuses pandas 3
}


class UnsupportedVersionError(ImportError):
    """An installed distribution is outside the range this pipeline supports."""


def installed(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def problems(supported: dict[str, str] | None = None) -> list[str]:
    """One line per installed distribution outside its supported range."""
    found = []
    for dist, spec in (supported or SUPPORTED).items():
        got = installed(dist)
        if got is None:
            continue
        try:
            ok = Version(got) in SpecifierSet(spec)
        except InvalidVersion:
            ok = False
        if not ok:
            found.append(f"{dist} {got} is installed; this pipeline supports {dist}{spec}")
    return found


def check(supported: dict[str, str] | None = None) -> None:
    """Raise UnsupportedVersionError naming every distribution out of range and what to do."""
    found = problems(supported)
    if not found:
        return
    message = (
        "unsupported versions: "
        + "; ".join(found)
        + ". Install the tested pins: pip install -r requirements.txt -c constraints.txt"
        + f" (or set {ALLOW_ENV}=true to run an unsupported stack at your own risk)"
    )
    if os.environ.get(ALLOW_ENV, "").strip().lower() in ("1", "true", "yes"):
        log.warning("%s", message)
        return
    raise UnsupportedVersionError(message)
