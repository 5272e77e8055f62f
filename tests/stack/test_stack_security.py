"""Security against the real MLflow server (basic-auth on PostgreSQL) and our storage code.

* anonymous and wrong-password requests get 401, the admin gets 200;
* a user with the default READ permission can read a model but cannot move its alias (403),
  where the admin's same request gets past authorization;
* storage keys with '..', absolute parts or NUL are refused by pipeline.storage.join before
  any request reaches S3.
"""

from __future__ import annotations

import secrets

import pytest

from pipeline import storage
from tests.stack.conftest import http


def test_anonymous_and_wrong_password_get_401(mlflow_server):
    url = f"{mlflow_server.url}/api/2.0/mlflow/experiments/search"
    body = {"max_results": 1}
    assert http("POST", url, body)[0] == 401
    assert (
        http("POST", url, body, auth=("admin", "not-the-password-" + secrets.token_hex(4)))[0]
        == 401
    )
    assert http("POST", url, body, auth=("nobody", "whatever-password"))[0] == 401
    status, out = http("POST", url, body, auth=mlflow_server.admin)
    assert status == 200, out
    # the artifact proxy is behind the same auth
    assert http("GET", f"{mlflow_server.url}/api/2.0/mlflow-artifacts/artifacts")[0] == 401


def test_read_only_user_cannot_move_an_alias(mlflow_server):
    name = f"sec-model-{secrets.token_hex(3)}"
    reader = ("reader-" + secrets.token_hex(3), "reader-pass-" + secrets.token_hex(8))
    status, out = http(
        "POST",
        f"{mlflow_server.url}/api/2.0/mlflow/users/create",
        {"username": reader[0], "password": reader[1]},
        auth=mlflow_server.admin,
    )
    assert status == 200, out
    status, out = mlflow_server.api("POST", "registered-models/create", {"name": name})
    assert status == 200, out
    status, out = mlflow_server.api(
        "POST", "model-versions/create", {"name": name, "source": "s3://mlflow/artifacts/sec/model"}
    )
    assert status == 200, out
    alias = {"name": name, "alias": "champion", "version": "1"}

    # READ (the configured default) lets the reader see the model ...
    status, out = mlflow_server.api("GET", f"registered-models/get?name={name}", auth=reader)
    assert status == 200, out
    # ... but not move, delete or re-tag anything
    assert mlflow_server.api("POST", "registered-models/alias", alias, auth=reader)[0] == 403
    assert (
        mlflow_server.api(
            "DELETE", "registered-models/alias", {"name": name, "alias": "champion"}, auth=reader
        )[0]
        == 403
    )
    assert (
        mlflow_server.api("DELETE", "registered-models/delete", {"name": name}, auth=reader)[0]
        == 403
    )
    status, out = mlflow_server.api("GET", f"registered-models/alias?name={name}&alias=champion")
    assert status != 200 and "not found" in out["message"], out  # the reader changed nothing
    # the admin's identical request is allowed
    status, out = mlflow_server.api("POST", "registered-models/alias", alias)
    assert status == 200, out
    assert mlflow_server.api("GET", f"registered-models/alias?name={name}&alias=champion")[0] == 200


@pytest.mark.parametrize(
    "part",
    [
        "../escape.parquet",
        "a/../../b",
        "/etc/passwd",
        "s3://other/x",
        "bad\x00name",
        "..",
        "./x",
        "~/x",
        "C:\\x",
        "",
    ],
)
def test_unsafe_storage_paths_are_refused_before_any_request(part, s3, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(storage, "_backend", lambda uri: calls.append(uri))  # would be the request
    before = s3.client().list_objects_v2(Bucket="pipeline").get("KeyCount", 0)
    with pytest.raises(storage.UnsafePathError) as exc:
        storage.write_bytes(storage.join("s3://pipeline/data", "snapshots", part), b"x")
    assert calls == []
    assert repr(part)[1:-1][:6] in str(exc.value) or "empty" in str(exc.value)
    assert s3.client().list_objects_v2(Bucket="pipeline").get("KeyCount", 0) == before


def test_safe_storage_paths_still_join():
    assert (
        storage.join("s3://b/data/", "snapshots", "ab12/data.parquet")
        == "s3://b/data/snapshots/ab12/data.parquet"
    )
    assert storage.join(
        "file:///tmp/x", "reports", "retrain_card_fraud__manual__2026-01-01T00_00_00"
    ) == ("file:///tmp/x/reports/retrain_card_fraud__manual__2026-01-01T00_00_00")
