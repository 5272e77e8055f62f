"""Retraining pipeline library: one module per stage, no Airflow inside."""

__version__ = "0.1.0"
