"""Assets, one pair per model spec, declared in one place.

A producer (or ``python -m pipeline data land --model NAME --file PATH``) emits an event on
the model's ``batch`` asset with ``extra={"batch_uri": "…"}``; that model's
``retrain_<name>`` runs once per event. ``champion`` is updated when a promotion moves it.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import Asset


def batch_asset(spec: Any) -> Asset:
    return Asset(
        name=f"{spec.name}_batch",
        uri=spec.asset_uri,
        extra={"description": f"a new batch landed for model {spec.name}"},
    )


def champion_asset(spec: Any) -> Asset:
    return Asset(name=f"{spec.name}_champion", uri=f"pipeline://models/{spec.name}/champion")
