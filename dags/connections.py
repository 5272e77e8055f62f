"""Airflow Connections the pipeline uses, handed to it as settings.

``pipeline/`` knows nothing of Airflow: it reads its settings from the environment. Inside
a task, the Connection ``checkpoint_signing`` (password = key, login or extra ``key_id`` =
key id) — when it exists — becomes ``PIPELINE_SIGNING_KEY`` / ``PIPELINE_SIGNING_KEY_ID``
for this task process, ahead of whatever the environment said. No connection: the
settings stand. Any other lookup error is raised, so a broken secrets backend never
silently signs with a different key.
"""

from __future__ import annotations

import os

SIGNING_CONN_ID = "checkpoint_signing"


def use_signing_connection() -> bool:
    """Apply the signing Connection to this process's settings; True if one was found."""
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    from pipeline.settings import get_settings

    try:
        conn = Connection.get(SIGNING_CONN_ID)
    except AirflowNotFoundException:
        return False
    if conn is None or not conn.password:
        return False
    key_id = conn.extra_dejson.get("key_id") or conn.login or f"airflow:{SIGNING_CONN_ID}"
    os.environ["PIPELINE_SIGNING_KEY"] = conn.password
    os.environ["PIPELINE_SIGNING_KEY_ID"] = str(key_id)
    get_settings.cache_clear()
    return True
