"""Make sure an MLflow basic-auth user exists, with this password, and is not an admin.

The scoring service's own, least-privilege MLflow login: it reads the registry (aliases,
versions, tags) and nothing more. MLflow's basic-auth gives a non-admin user
``default_permission`` on every experiment and registered model it did not create; the
stack's is ``READ`` (``docker-compose.yaml``, config ``mlflow_basic_auth``), so this user
can read and cannot write, tag, alias or delete. With ``default_permission =
NO_PERMISSIONS`` grant it READ on each registered model instead (MLflow's
``registered-models/permissions/create``).

Run by compose's one-shot ``mlflow-init``; on Kubernetes, once, from anywhere that
reaches the MLflow server (``infra/README.md``)::

    MLFLOW_URL=http://127.0.0.1:5000 MLFLOW_ADMIN_USERNAME=admin MLFLOW_ADMIN_PASSWORD=... \\
      MLFLOW_NEW_USERNAME=scoring MLFLOW_NEW_PASSWORD=... python infra/mlflow/ensure_user.py

Idempotent: a user that exists gets the password given (so ``.env`` stays the truth) and
loses admin if it had it. Standard library only (runs in any image with Python 3.9+).
Passwords are read from the environment, never from arguments (``ps`` shows those).
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

API = "/api/2.0/mlflow/users"
MIN_PASSWORD = 12  # MLflow's own minimum


def _env(name: str) -> str:
    value = os.environ.get(name, "").strip()
    if not value:
        sys.exit(f"ensure_user: {name} is not set")
    return value


def _call(base: str, auth: str, method: str, path: str, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        base + path,
        data=data,
        method=method,
        headers={"Authorization": auth, "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def _wait_healthy(base: str, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            sys.exit(f"ensure_user: MLflow at {base} did not answer /health within {seconds:g}s")
        time.sleep(2)


def main() -> int:
    base = _env("MLFLOW_URL").rstrip("/")
    admin, admin_pw = _env("MLFLOW_ADMIN_USERNAME"), _env("MLFLOW_ADMIN_PASSWORD")
    user, password = _env("MLFLOW_NEW_USERNAME"), _env("MLFLOW_NEW_PASSWORD")
    if user == admin:
        sys.exit(
            f"ensure_user: MLFLOW_NEW_USERNAME is the admin ({admin!r}): give the service "
            "its own user, e.g. `scoring`"
        )
    if len(password) < MIN_PASSWORD or "change-me" in password.lower():
        sys.exit(
            f"ensure_user: the password of {user!r} must have at least {MIN_PASSWORD} "
            "characters and not be a change-me placeholder (`openssl rand -hex 24`)"
        )
    auth = "Basic " + base64.b64encode(f"{admin}:{admin_pw}".encode()).decode()
    _wait_healthy(base)
    status, text = _call(
        base, auth, "POST", f"{API}/create", {"username": user, "password": password}
    )
    if status == 200:
        action = "created"
    elif "RESOURCE_ALREADY_EXISTS" in text:
        status, text = _call(
            base,
            auth,
            "PATCH",
            f"{API}/update-password",
            {"username": user, "password": password},
        )
        if status != 200:
            sys.exit(f"ensure_user: could not set {user!r}'s password: {status} {text[:300]}")
        action = "password set"
    else:
        sys.exit(f"ensure_user: could not create {user!r}: {status} {text[:300]}")
    status, text = _call(
        base, auth, "PATCH", f"{API}/update-admin", {"username": user, "is_admin": False}
    )
    if status != 200:
        sys.exit(f"ensure_user: could not make {user!r} a non-admin: {status} {text[:300]}")
    query = urllib.parse.urlencode({"username": user})
    status, text = _call(base, auth, "GET", f"{API}/get?{query}")
    if status != 200 or json.loads(text)["user"].get("is_admin") is not False:
        sys.exit(f"ensure_user: {user!r} is not a plain user after the update: {text[:300]}")
    print(f"ensure_user: MLflow user {user!r} {action}, not an admin, at {base}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
