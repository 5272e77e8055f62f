"""The Airflow REST API v2 client the pipeline's own commands use (landing, on-call checks).

``token`` gets a bearer token (``POST /auth/token``, simple auth manager and FAB) from the
``PIPELINE_AIRFLOW_USERNAME``/``PIPELINE_AIRFLOW_PASSWORD`` settings, unless
``PIPELINE_AIRFLOW_TOKEN`` is set. ``request`` makes one call with a 10 s timeout and up to 3
tries with backoff on connection errors and 5xx (``retry_timeouts=False`` for a call that must
not be sent twice); ``check`` turns an unsuccessful answer into an :class:`AirflowAPIError`
that names the call, the status and what it means.

Hand-written on httpx rather than the ``apache-airflow-client`` package: three calls, and the
retry and error wording the pipeline's commands need; the generated client would add a
dependency and its own retry policy.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import httpx

from pipeline.errors import PipelineRejection
from pipeline.settings import get_settings

log = logging.getLogger(__name__)

TIMEOUT_S = 10.0
TRIES = 3
BACKOFF_S = 0.5  # then 1.0: doubled after each failed try


class AirflowAPIError(PipelineRejection):
    """A call to Airflow's REST API failed: unreachable, refused or answered an error."""


def request(
    client: httpx.Client, method: str, url: str, *, retry_timeouts: bool = True, **kwargs: Any
) -> httpx.Response:
    """One call with up to TRIES tries on connection errors and 5xx; the last answer (a
    4xx at once) is returned, a transport error after the last try raises AirflowAPIError.
    ``retry_timeouts=False``: a request that may have reached the server (a read timeout)
    is not sent again (a second asset event would start a second run)."""
    retryable: tuple[type[Exception], ...] = (
        (httpx.TransportError,) if retry_timeouts else (httpx.ConnectError, httpx.ConnectTimeout)
    )
    delay = BACKOFF_S
    for attempt in range(1, TRIES + 1):
        try:
            resp = client.request(method, url, **kwargs)
        except retryable as exc:
            if attempt == TRIES:
                raise AirflowAPIError(
                    f"{method} {url}: {type(exc).__name__}: {exc} "
                    f"(after {TRIES} tries); is the Airflow API server up?"
                ) from None
        except httpx.TransportError as exc:
            raise AirflowAPIError(
                f"{method} {url}: {type(exc).__name__}: {exc}; not retried (the "
                "request may have reached Airflow: check the asset's events "
                "before landing again)"
            ) from None
        else:
            if resp.status_code < 500 or attempt == TRIES:
                return resp
            log.warning("%s %s: HTTP %d, try %d/%d", method, url, resp.status_code, attempt, TRIES)
        time.sleep(delay)
        delay *= 2
    raise AssertionError("unreachable")


def check(
    resp: httpx.Response, what: str, hint: Callable[[int], str | None] = lambda _s: None
) -> None:
    if resp.is_success:
        return
    status = resp.status_code
    detail = resp.text.strip().replace("\n", " ")[:300]
    meaning = hint(status) or {
        401: "not authenticated: check PIPELINE_AIRFLOW_USERNAME/PIPELINE_AIRFLOW_PASSWORD "
        "(or PIPELINE_AIRFLOW_TOKEN: expired?)",
        403: "forbidden: the Airflow user's role does not allow this call",
    }.get(status, "server error" if status >= 500 else "request refused")
    raise AirflowAPIError(
        f"{what}: {resp.request.method} {resp.request.url} answered HTTP {status}: "
        f"{meaning} ({detail})"
    )


def token(client: httpx.Client, url: str) -> str:
    s = get_settings()
    if s.airflow_token is not None and s.airflow_token.get_secret_value():
        return s.airflow_token.get_secret_value()
    if not s.airflow_username or s.airflow_password is None:
        raise AirflowAPIError(
            f"no credentials for the Airflow API at {url}: set "
            "PIPELINE_AIRFLOW_USERNAME and PIPELINE_AIRFLOW_PASSWORD, or "
            "PIPELINE_AIRFLOW_TOKEN (or pass --no-event)"
        )
    resp = request(
        client,
        "POST",
        f"{url}/auth/token",
        json={"username": s.airflow_username, "password": s.airflow_password.get_secret_value()},
    )
    check(
        resp,
        "getting an Airflow access token",
        lambda st: (
            f"credentials refused for user {s.airflow_username!r}: check PIPELINE_AIRFLOW_USERNAME/"
            "PIPELINE_AIRFLOW_PASSWORD"
            if st in (400, 401, 403)
            else None
        ),
    )
    token = resp.json().get("access_token")
    if not isinstance(token, str) or not token:
        raise AirflowAPIError(
            f"POST {url}/auth/token answered HTTP {resp.status_code} without an access_token"
        )
    return token
