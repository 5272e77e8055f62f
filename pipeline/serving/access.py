"""Who may do what on the scoring service, and what may come in.

* ``/admin/*`` (the fault switch, poll-now) exists only when ``serving_admin_enabled``
  (default off: 404), and then answers only a request carrying
  ``Authorization: Bearer <serving_admin_token>``; the service refuses to start with admin
  on and no strong token.
* ``/feedback`` and ``/v2/models/{name}/feedback`` answer only
  ``Authorization: Bearer <serving_feedback_token>`` (unset: feedback is refused, 403).
* Tokens are compared with :func:`hmac.compare_digest`; a strong token has at least
  :data:`MIN_TOKEN_CHARS` characters and is not a ``change-me`` placeholder.
* Request bodies larger than ``serving_max_body_bytes`` are answered 413 before any of
  the body is parsed: from ``Content-Length`` when given, else while the chunks arrive.
* Feedback keys are issued by the service (:class:`RequestIds`), never chosen by a caller.
* With several replicas each one names itself in the ids it issues
  (``serving_advertise_url``), under the ids' HMAC tag; feedback reaching another replica
  is forwarded once to the one named (:mod:`pipeline.serving.replicas`). The tag's key is
  then ``serving_request_id_key``, held by the replicas only: the label feed holds the
  feedback token, so a key derived from it would let the feed make an id that names any
  address, and the service would connect there.

Why no loopback check: a client's address is not an identity. uvicorn's
``ProxyHeadersMiddleware`` rewrites ``scope["client"]`` from ``X-Forwarded-For`` for any
trusted peer (``--forwarded-allow-ips``, ``FORWARDED_ALLOW_IPS=*``), and even the raw
socket peer is 127.0.0.1 for every caller behind a sidecar proxy, ``kubectl
port-forward`` or a loopback reverse proxy. A check on either lets strangers in exactly
where services are usually deployed, so the token is the only thing that admits a caller
and no header or address is consulted.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from pipeline.errors import PipelineRejection

MIN_TOKEN_CHARS = 32
MIB = 1 << 20
DEFAULT_MAX_BODY_BYTES = MIB
PLACEHOLDER = "change-me"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class ServingConfigError(PipelineRejection):
    """The service's access settings are unsafe or inconsistent: it refuses to start
    (``python -m pipeline serve`` prints it and exits 2)."""


def _secret(value: Any) -> str | None:
    """A token from settings (SecretStr, str or None); empty or blank means unset."""
    if value is None:
        return None
    raw = value.get_secret_value() if hasattr(value, "get_secret_value") else str(value)
    raw = raw.strip()
    return raw or None


def check_strong(token: str, variable: str) -> None:
    if len(token) < MIN_TOKEN_CHARS or PLACEHOLDER in token.lower():
        why = (
            "is a change-me placeholder"
            if PLACEHOLDER in token.lower()
            else f"has {len(token)} characters, fewer than {MIN_TOKEN_CHARS}"
        )
        raise ServingConfigError(
            f"{variable} {why}: use a random token, e.g. `openssl rand -hex 32`"
        )


def replica_url(url: str, variable: str = "PIPELINE_SERVING_ADVERTISE_URL") -> str:
    """``url`` as the one canonical base URL of a replica, ``http(s)://host:port``: no
    user, path, query or fragment (a forward goes to a fixed path on that host, nothing
    else). ServingConfigError names ``variable`` otherwise."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise ServingConfigError(f"{variable}={url!r} is not a URL: {exc}") from None
    host = parts.hostname
    if parts.scheme not in ("http", "https") or not host:
        raise ServingConfigError(
            f"{variable}={url!r} must be http(s)://host:port, e.g. http://10.0.3.7:8000"
        )
    if parts.username or parts.password or parts.path not in ("", "/") or parts.query:
        raise ServingConfigError(
            f"{variable}={url!r} must be a bare http(s)://host:port (no user, path or query)"
        )
    if parts.fragment:
        raise ServingConfigError(f"{variable}={url!r} must not have a fragment")
    port = port or (443 if parts.scheme == "https" else 80)
    shown = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{shown.lower()}:{port}"


@dataclass(frozen=True)
class AccessPolicy:
    """The service's access rules. ``admin_token`` None: ``/admin/*`` is not served (404);
    ``feedback_token`` None: feedback is refused (403). ``advertise_url``: this replica's
    base URL, named in the ids it issues (None: one replica, ids name none, feedback is
    never forwarded); it needs ``request_id_key``, the ids' HMAC key, shared by the
    replicas and different from the feedback token."""

    admin_token: str | None = None
    feedback_token: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    advertise_url: str | None = None
    request_id_key: str | None = None

    def __post_init__(self) -> None:
        if self.admin_token is not None:
            check_strong(self.admin_token, "PIPELINE_SERVING_ADMIN_TOKEN")
        if self.feedback_token is not None:
            check_strong(self.feedback_token, "PIPELINE_SERVING_FEEDBACK_TOKEN")
        if self.max_body_bytes < 1:
            raise ServingConfigError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}")
        if self.request_id_key is not None:
            check_strong(self.request_id_key, "PIPELINE_SERVING_REQUEST_ID_KEY")
            if self.feedback_token is not None and hmac.compare_digest(
                self.request_id_key.encode(), self.feedback_token.encode()
            ):
                raise ServingConfigError(
                    "PIPELINE_SERVING_REQUEST_ID_KEY must differ from "
                    "PIPELINE_SERVING_FEEDBACK_TOKEN: the label feed holds the token, and "
                    "with the ids' key it could make ids naming any address"
                )
        if self.advertise_url is not None:
            object.__setattr__(self, "advertise_url", replica_url(self.advertise_url))
            if self.request_id_key is None:
                raise ServingConfigError(
                    "PIPELINE_SERVING_ADVERTISE_URL (several replicas, feedback forwarded "
                    "between them) needs PIPELINE_SERVING_REQUEST_ID_KEY: the same random key "
                    "on every replica and on no client (`openssl rand -hex 32`)"
                )

    @property
    def admin(self) -> bool:
        return self.admin_token is not None

    def request_ids(self) -> RequestIds:
        """The ids this replica issues and accepts."""
        return RequestIds(self.request_id_key or self.feedback_token, owner=self.advertise_url)

    @classmethod
    def from_settings(cls, settings: Any = None) -> AccessPolicy:
        """From ``PIPELINE_SERVING_*``; ServingConfigError names what to set."""
        if settings is None:
            from pipeline.settings import get_settings

            settings = get_settings()
        admin = _secret(settings.serving_admin_token)
        if settings.serving_admin_enabled and admin is None:
            raise ServingConfigError(
                "PIPELINE_SERVING_ADMIN_ENABLED=true needs PIPELINE_SERVING_ADMIN_TOKEN (at "
                f"least {MIN_TOKEN_CHARS} characters, e.g. `openssl rand -hex 32`); or leave "
                "admin off (the default)"
            )
        return cls(
            admin_token=admin if settings.serving_admin_enabled else None,
            feedback_token=_secret(settings.serving_feedback_token),
            max_body_bytes=int(settings.serving_max_body_bytes),
            advertise_url=(settings.serving_advertise_url or "").strip() or None,
            request_id_key=_secret(settings.serving_request_id_key),
        )


def bearer(headers: Any) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    value = headers.get("authorization")
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def token_matches(given: str | None, expected: str) -> bool:
    if given is None:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


def bearer_auth_headers(token: str | None) -> dict[str, str]:
    """The header a client sends (the replayer, the demo, the tests)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


# -- request ids: issued by the service, checked without a lookup ---------------------------


@dataclass(frozen=True)
class IssuedId:
    """A request id whose tag verified: ``owner`` is the replica that issued it (its
    advertised base URL; None: an id of a service that names no replica)."""

    nonce: str
    owner: str | None


class RequestIds:
    """Feedback keys the service issues on every scored request: ``<nonce>.<tag>``, or
    ``<nonce>.<owner>.<tag>`` where ``owner`` is the issuing replica's advertised URL
    (base64url), the tag an HMAC over everything before it. An id a caller made up fails
    the tag (``forged``); one the service issued but no longer holds (evicted, a restart)
    is ``unknown``. The key (``secret``) is shared by every replica of one deployment, so
    each recognises the others' ids and may trust the owner they name; without one it
    is random per process."""

    CONTEXT = b"pipeline.serving.request-id/1"
    NONCE_CHARS, TAG_CHARS, MAX_OWNER_CHARS = 32, 24, 400

    def __init__(self, secret: str | None = None, owner: str | None = None) -> None:
        base = secret.encode() if secret else secrets.token_bytes(32)
        self._key = hmac.new(base, self.CONTEXT, hashlib.sha256).digest()
        self.owner = replica_url(owner) if owner else None
        self._owner_part = (
            base64.urlsafe_b64encode(self.owner.encode()).decode().rstrip("=")
            if self.owner
            else None
        )

    def _tag(self, body: str) -> str:
        return hmac.new(self._key, body.encode(), hashlib.sha256).hexdigest()[: self.TAG_CHARS]

    def issue(self) -> str:
        nonce = secrets.token_hex(self.NONCE_CHARS // 2)
        body = nonce if self._owner_part is None else f"{nonce}.{self._owner_part}"
        return f"{body}.{self._tag(body)}"

    def verify(self, request_id: str) -> IssuedId | None:
        """The id's nonce and owner when its tag verifies, else None (never issued by a
        replica holding this key). The owner is decoded only after the tag verified."""
        if len(request_id) > self.NONCE_CHARS + self.MAX_OWNER_CHARS + self.TAG_CHARS + 2:
            return None
        body, dot, tag = request_id.rpartition(".")
        if not dot or len(tag) != self.TAG_CHARS:
            return None
        nonce, _, owner_part = body.partition(".")
        if len(nonce) != self.NONCE_CHARS:
            return None
        if not hmac.compare_digest(tag, self._tag(body)):
            return None
        if not owner_part:
            return IssuedId(nonce, None)
        try:
            raw = base64.urlsafe_b64decode(owner_part + "=" * (-len(owner_part) % 4))
            owner = replica_url(raw.decode("ascii"))
        except (binascii.Error, UnicodeDecodeError, ValueError, ServingConfigError):
            return None
        return IssuedId(nonce, owner)

    def issued(self, request_id: str) -> bool:
        return self.verify(request_id) is not None


# -- body size, before anything parses it --------------------------------------------------


class BodyLimit:
    """ASGI middleware: at most ``max_bytes`` of request body reach the app. A declared
    ``Content-Length`` above the limit is answered 413 without reading the body; a body
    without one (chunked) is read up to the limit and answered 413 the moment it passes
    it. ``on_refused(scope, status)`` counts the answer."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        on_refused: Callable[[Scope, int], None] | None = None,
    ) -> None:
        self.app, self.max_bytes, self.on_refused = app, max_bytes, on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = None
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                declared = value
                break
        if declared is not None:
            text = declared.decode("latin-1").strip()
            if not text.isdigit() or len(text) > 18:
                await self._answer(scope, send, 400, f"Content-Length {text[:40]!r} is not valid")
                return
            if int(text) > self.max_bytes:
                await self._too_large(scope, send, f"Content-Length {text}")
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._too_large(scope, send, "the body")
                return
            if body:
                chunks.append(body)
            if not message.get("more_body", False):
                break
        buffered = b"".join(chunks)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": buffered, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, send: Send, what: str) -> None:
        await self._answer(
            scope,
            send,
            413,
            f"{what} exceeds the {self.max_bytes}-byte request limit "
            "(PIPELINE_SERVING_MAX_BODY_BYTES); send fewer rows per request",
        )

    async def _answer(self, scope: Scope, send: Send, status: int, message: str) -> None:
        if self.on_refused is not None:
            self.on_refused(scope, status)
        body = json.dumps({"error": message, "detail": message}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
