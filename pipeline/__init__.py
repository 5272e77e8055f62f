"""Retraining pipeline library: one module per stage, no Airflow inside.

Importing it checks the installed stack against the supported ranges (pipeline/versions.py).
"""

from pipeline.versions import check as _check_versions

__version__ = "0.1.0"

_check_versions()
