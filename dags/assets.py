"""Assets shared by the DAGs, declared once.

A producer (or ``python -m pipeline data land``) emits an event on
``batch_landed`` with ``extra={"batch_uri": "file://…/landing/x.parquet"}``;
``retrain_model`` runs once per event.
"""

from airflow.sdk import Asset

batch_landed = Asset("pipeline://landing/batch", extra={"description": "a new batch landed"})
champion_model = Asset("pipeline://registry/champion")
