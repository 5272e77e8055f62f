"""HTTP routes of the scoring service (FastAPI), and ``serve`` (uvicorn).

Every model spec is served (``pipeline.spec.discover()`` at start; a broken spec is
logged, reported by ``/readyz`` and skipped). Routes per model follow the Open Inference
Protocol (KServe v2), ``{name}`` being the spec's name (``card_fraud``; the registered
model's name, ``card-fraud``, is accepted too):

* ``POST /v2/models/{name}/infer`` (and ``/v2/models/{name}/versions/{v}/infer``, which
  pins a version now serving) — one input per feature column, ``{"inputs": [{"name":
  "<column>", "datatype": "FP64", "shape": [2], "data": [12.5, 80.0]}, ...], "id": "...",
  "parameters": {"routing_key": "card-17"}}``, or ``{"inputs": [row objects]}``. The
  answer: ``{"model_name", "model_version", "id", "parameters": {"alias", "request_id"},
  "outputs": [{"name": "probability_<class>", "datatype": "FP32", "shape": [N], "data":
  [...]}, ...]}`` — one output per class; ``"outputs": [{"name": ...}]`` in the request
  picks some. ``id`` echoes the request's ``id`` (the caller's correlation id; a new one
  when none was given); ``parameters.request_id`` is the id feedback refers to, issued by
  the service (a caller's ``id`` or ``X-Request-Id`` is never a feedback key).
* ``GET /v2/models/{name}`` — metadata: versions served, platform, inputs (from the
  served checkpoint's feature spec, typed and bounded by the contract), outputs, and the
  routing state in ``parameters``; ``GET /v2/models/{name}/ready`` (200 / 503).
* ``POST /v2/models/{name}/feedback`` — labels for earlier requests of that model
  (``Authorization: Bearer <PIPELINE_SERVING_FEEDBACK_TOKEN>``; see Feedback below).
* ``GET /v2/health/live``, ``GET /v2/health/ready`` (every model that has a champion in
  its registry serves one, or refused it; at least one serves), ``GET /v2`` (server
  metadata), ``GET /v2/models`` (the models served, and the broken specs).

An unknown model is 404 with ``{"error": ..., "known_models": [...]}``; OIP errors are
``{"error": "..."}`` (422 adds ``detail``: ``{"row", "field", "error"}`` per problem).

The single-model routes serve the default model (``PIPELINE_MODEL``): ``POST /predict``
(rows in, ``scores`` out — binary: the positive-class probability per row; multiclass:
a probability per class per row, in the order of ``classes``), ``POST /feedback`` (a
``"model"`` field names another model), ``GET /healthz``, ``GET /readyz`` (the default
model's detail, plus every model's readiness and the broken specs), ``GET /metrics``
(Prometheus text, every series labelled ``model``).

Feedback (both routes): ``{"feedback": [{"request_id": "...", "labels": [0, 1]}]}`` (or
``"label": 1`` for a one-row request; a single item may be posted without the wrapper),
with the feedback bearer token: 401 without it, 403 with a wrong one or when the service
has none configured. Only ids the service issued are taken (``request_id`` of
``/predict``, ``parameters.request_id`` of an OIP answer), each once, all or nothing:
200 ``{"matched", "unknown", "mismatched"}`` when every item was recorded; otherwise
nothing is recorded and the answer lists ``refused`` items (``index``, ``request_id``,
``result``, ``message``) with 404 when an id was never issued here (``forged``) or is no
longer pending (``unknown``), 409 when it was labelled before (``duplicate``: a second
label never overwrites the first), 422 when the label count is not the row count.

Several replicas (``PIPELINE_SERVING_ADVERTISE_URL`` set on each): an id names the
replica that issued it, and feedback for another replica's id is forwarded once to that
replica (:mod:`pipeline.serving.replicas`). Items are then grouped by the replica that
scored them, each group all or nothing: the 200 answer adds ``forwarded`` (items recorded
elsewhere); a refused batch may have recorded other groups (its message says how many
labels), and its items can be ``misrouted`` (421: a forwarded request never hops again)
or ``unreachable`` (502: that replica did not answer; send those again later).

``/admin/*`` (the fault switch, ``POST /admin/poll``) is served only with
``PIPELINE_SERVING_ADMIN_ENABLED=true`` and then only to ``Authorization: Bearer
<PIPELINE_SERVING_ADMIN_TOKEN>`` (401 / 403); see :mod:`pipeline.serving.access` for why
no client address is trusted.

Status codes: 200 scored; 400 the body is not JSON, not rows/tensors, or holds a number
out of range (``NaN``, ``Infinity``, ``1e400``, an integer beyond 64 bits); 401/403 a
token missing or wrong; 404 unknown model; 413 the body is larger than
``PIPELINE_SERVING_MAX_BODY_BYTES`` (1 MiB by default; refused before it is parsed); 422
a row breaks the model's contract; 500 the model failed (counted as the answering
version's error); 503 no verified champion of that model is loaded yet. Every 4xx is
counted in ``scoring_rejected_requests_total{model, status}``.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from time import perf_counter
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from pipeline.serving.access import (
    AccessPolicy,
    BodyLimit,
    bearer,
    token_matches,
)
from pipeline.serving.faults import FaultSpec
from pipeline.serving.metrics import observe_many
from pipeline.serving.replicas import FORWARDED_HEADER, forward_client, forward_feedback
from pipeline.serving.schema import (
    OIP_DATATYPE,
    BadRequest,
    InferRequest,
    RowsInvalid,
    infer_request,
    parse_json,
    rows_of,
)
from pipeline.serving.service import ScoringService, ServedModel, Slot

log = logging.getLogger(__name__)

INLINE_ROWS = 64  # bigger batches are scored on the thread pool, off the event loop
ROUTING_KEY_HEADER = "x-routing-key"
PROM_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PLATFORM = "pytorch_torchscript"  # OIP's name for a PyTorch model (served here as nn.Module)
# A refused feedback batch's status: the first row whose results it holds (else 422).
FEEDBACK_STATUS: tuple[tuple[int, frozenset[str]], ...] = (
    (404, frozenset({"forged", "unknown"})),
    (502, frozenset({"unreachable"})),
    (421, frozenset({"misrouted"})),
    (409, frozenset({"duplicate"})),
)


def _json(status: int, payload: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(
        json.dumps(payload).encode(),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


class _Refused(Exception):  # noqa: N818 - an answer, not a failure of the service
    """A request answered without scores: ``status``, a message, and extra fields."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


@dataclass(frozen=True)
class _Scored:
    slot: Slot
    proba: np.ndarray  # rows x classes
    request_id: str


def output_name(cls: Any) -> str:
    return f"probability_{cls}"


def _version_of(served: ServedModel, version: str) -> Slot | None:
    for s in (served.table.champion, served.table.canary):
        if s is not None and s.model.version == version:
            return s
    return None


def create_app(
    service: ScoringService, *, access: AccessPolicy | None = None, poll: bool = True
) -> FastAPI:
    """The app over ``service``. ``access``: who may use ``/admin`` and ``/feedback``, and
    the body limit (default: admin off, feedback off, 1 MiB). ``poll``: poll the registry
    on startup and keep polling (off in unit tests that drive ``service.poll_once``)."""
    access = access or AccessPolicy()
    ids = access.request_ids()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if poll:
            await run_in_threadpool(service.poll_once)
            service.start()
            # Everything alive after startup (torch, pandas, mlflow, the models) moves to a
            # permanent generation: full collections no longer walk it, which trims GC
            # pauses from the latency tail.
            gc.collect()
            gc.freeze()
        try:
            yield
        finally:
            service.stop()
            client = forwarder.pop("client", None)
            if client is not None:
                await client.aclose()

    app = FastAPI(title="retrain-pipeline scoring service", lifespan=lifespan, description=__doc__)
    app.state.service = service
    app.state.access = access
    m = service.metrics

    def model_label(path: str) -> str:
        """The ``model`` label of a request refused before routing (by its path)."""
        if path.startswith("/v2/models/"):
            name = path.split("/")[3]
            served = service.model(name) if name else None
            return served.name if served is not None else ""
        if path in ("/predict", "/feedback"):
            served = service.model(None)
            return served.name if served is not None else ""
        return ""

    app.add_middleware(
        BodyLimit,
        max_bytes=access.max_body_bytes,
        on_refused=lambda scope, status: m.rejected.labels(
            model_label(scope.get("path", "")), str(status)
        ).inc(),
    )

    def unknown(name: str | None) -> _Refused:
        what = f"unknown model {name!r}" if name is not None else "no default model is served"
        return _Refused(404, f"{what}; known models: {service.names}", known_models=service.names)

    def served_or_404(name: str | None) -> ServedModel:
        served = service.model(name)
        if served is None:
            m.rejected.labels("", "404").inc()
            raise unknown(name)
        return served

    async def score(
        served: ServedModel,
        rows: list[Any],
        key: str | None,
        t0: float,
        version: str | None = None,
    ) -> _Scored:
        """Validate, route, score, record: the one path every scoring route takes."""
        try:
            served.validator.check(rows)
        except RowsInvalid as exc:
            m.rejected.labels(served.name, "422").inc()
            raise _Refused(422, str(exc), detail=[p.to_dict() for p in exc.problems]) from None
        if version is not None:
            slot = _version_of(served, version)
            if slot is None:
                m.rejected.labels(served.name, "404").inc()
                serving = [
                    s.model.version for s in (served.table.champion, served.table.canary) if s
                ]
                raise _Refused(
                    404,
                    f"model {served.name!r} does not serve v{version}; serving {serving}",
                    versions=serving,
                )
        else:
            slot = served.table.pick(key)
        if slot is None:
            m.rejected.labels(served.name, "503").inc()
            raise _Refused(
                503, f"no verified champion of model {served.name!r} is loaded yet; see /readyz"
            )
        sm, model = slot.metrics, slot.model
        fault = service.faults.get(served.name, model.version)
        try:
            if fault is not None:
                if fault.latency_ms:
                    await asyncio.sleep(fault.latency_ms / 1000)
                if service.faults.fails(fault):
                    raise RuntimeError(f"injected fault on v{model.version} (see /admin/faults)")
            if len(rows) <= INLINE_ROWS:
                proba = model.proba(rows)
            else:
                proba = await run_in_threadpool(model.proba, rows)
            if fault is not None and fault.score_shift:
                proba = served.shift(model, proba, fault.score_shift)
        except Exception as exc:  # noqa: BLE001 - any model failure is a 500 counted on the model
            sm.requests.inc()
            sm.errors.inc()
            sm.latency.observe(perf_counter() - t0)
            log.warning("%s v%s failed: %s", served.name, model.version, exc)
            raise _Refused(
                500,
                f"model {served.name} v{model.version} failed: {exc}",
                alias=slot.alias,
                version=model.version,
            ) from None
        request_id = ids.issue()  # the feedback key: the service's own, never the caller's
        kept = served.scores_of(model, proba)
        served.feedback.remember(request_id, slot.alias, model.version, kept)
        observe_many(sm.score, kept)
        sm.rows.inc(len(rows))
        sm.requests.inc()
        sm.latency.observe(perf_counter() - t0)
        return _Scored(slot, proba, request_id)

    def legacy_error(r: _Refused) -> Response:
        if r.status == 422:
            return _json(422, {"detail": r.extra["detail"], "message": r.message})
        return _json(r.status, {"detail": r.message, **r.extra})

    def oip_error(r: _Refused) -> Response:
        return _json(r.status, {"error": r.message, **r.extra})

    async def json_body(request: Request) -> Any:
        return parse_json(await request.body())

    # -- the default model's routes ---------------------------------------------------------

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        t0 = perf_counter()
        try:
            served = served_or_404(None)
        except _Refused as r:
            return legacy_error(r)
        try:
            body = await json_body(request)
            rows = rows_of(body, service.max_rows)
        except BadRequest as exc:
            m.rejected.labels(served.name, "400").inc()
            return _json(400, {"detail": str(exc)})
        key = request.headers.get(ROUTING_KEY_HEADER)
        if key is None and isinstance(body, dict):
            key = body.get("routing_key")
        try:
            out = await score(served, rows, None if key is None else str(key), t0)
        except _Refused as r:
            return legacy_error(r)
        model = out.slot.model
        payload: dict[str, Any] = {
            "request_id": out.request_id,
            "model": served.name,
            "alias": out.slot.alias,
            "version": model.version,
        }
        if served.multiclass:
            payload["classes"] = model.classes
            payload["scores"] = out.proba.tolist()
        else:
            payload["scores"] = out.proba[:, model.positive_index].tolist()
        return _json(200, payload)

    def feedback_refused(request: Request, name: str | None) -> Response | None:
        """The feedback token's check: None when the caller may post labels."""
        served = service.model(name)
        label = served.name if served is not None else ""
        expected = access.feedback_token
        if expected is None:
            status, msg = (
                403,
                (
                    "feedback is disabled on this service: no PIPELINE_SERVING_FEEDBACK_TOKEN "
                    "is configured"
                ),
            )
        else:
            given = bearer(request.headers)
            if given is None:
                m.rejected.labels(label, "401").inc()
                msg = "feedback needs 'Authorization: Bearer <PIPELINE_SERVING_FEEDBACK_TOKEN>'"
                return _json(
                    401, {"detail": msg, "error": msg}, headers={"WWW-Authenticate": "Bearer"}
                )
            if token_matches(given, expected):
                return None
            status, msg = 403, "the feedback token is not the service's"
        m.rejected.labels(label, str(status)).inc()
        return _json(status, {"detail": msg, "error": msg})

    forwarder: dict[str, Any] = {}  # the forwarding HTTP client, made on first use

    async def settle(
        served: ServedModel,
        pairs: list[tuple[str, list[Any]]],
        owners: list[str | None],
        hopped: bool,
    ) -> tuple[dict[str, int], list[tuple[int, str, str]]]:
        """Record every (verified) item where it was scored: here, or at the replica its
        id names, forwarded once (never when this request was itself forwarded). Each
        replica's group is all or nothing; (counts, refusals by index in ``pairs``)."""
        here = access.advertise_url
        local: list[int] = []
        remote: dict[str, list[int]] = {}
        refused: list[tuple[int, str, str]] = []
        for i, owner in enumerate(owners):
            if owner is None or owner == here:
                local.append(i)
            elif here is not None and not hopped:
                remote.setdefault(owner, []).append(i)
            else:  # no second hop; a service without an address of its own forwards nothing
                why = "it was forwarded here already" if hopped else "this one forwards none"
                refused.append(
                    (i, "misrouted", f"request {pairs[i][0][:80]} was scored by {owner}; {why}")
                )
                m.feedback.labels(served.name, "misrouted").inc(len(pairs[i][1]) or 1)
        counts = {"matched": 0, "unknown": 0, "mismatched": 0}
        if refused:
            counts["misrouted"] = len(refused)

        def add(
            found: dict[str, int], idx: list[int], refusals: list[tuple[int, str, str]]
        ) -> None:
            for k, v in found.items():
                counts[k] = counts.get(k, 0) + v
            refused.extend((idx[j], result, why) for j, result, why in refusals)

        if local:
            found, refusals = await run_in_threadpool(
                served.record_labels, [pairs[i] for i in local]
            )
            add(found, local, refusals)
        if remote:
            assert here is not None and access.feedback_token is not None
            if "client" not in forwarder:
                forwarder["client"] = forward_client()
            answers = await asyncio.gather(
                *(
                    forward_feedback(
                        forwarder["client"],
                        owner,
                        served.name,
                        [pairs[i] for i in idx],
                        token=access.feedback_token,
                        sender=here,
                    )
                    for owner, idx in remote.items()
                )
            )
            for idx, (found, refusals) in zip(remote.values(), answers, strict=True):
                add(found, idx, refusals)
                rows = sum(len(pairs[i][1]) or 1 for i in idx)
                if not refusals:
                    m.feedback.labels(served.name, "forwarded").inc(rows)
                    counts["forwarded"] = counts.get("forwarded", 0) + len(idx)
                elif any(r == "unreachable" for _, r, _ in refusals):
                    m.feedback.labels(served.name, "unreachable").inc(rows)
                    log.warning(
                        "feedback for %d item(s) not forwarded: %s", len(idx), refusals[0][2]
                    )
        refused.sort()
        return counts, refused

    async def feedback_for(request: Request, name: str | None, by_body: bool) -> Response:
        """``{"feedback": [{"request_id": "...", "labels": [0, 1]}]}`` (or ``"label": 1``
        for a one-row request); a single item may be posted without the wrapper."""
        denied = feedback_refused(request, name)
        if denied is not None:
            return denied
        try:
            body = await json_body(request)
            if by_body and isinstance(body, dict) and body.get("model") is not None:
                name = str(body["model"])
            items = body.get("feedback", [body]) if isinstance(body, dict) else body
            if not isinstance(items, list) or not items:
                raise ValueError("no feedback items")
            pairs: list[tuple[str, list[Any]]] = []
            for i, it in enumerate(items):
                labels = it["labels"] if "labels" in it else [it["label"]]
                if not isinstance(labels, list):
                    raise ValueError(f"item {i}: labels must be an array")
                rid = it["request_id"]
                if not isinstance(rid, str):
                    raise ValueError(f"item {i}: request_id must be a string")
                pairs.append((rid, labels))
        except (BadRequest, TypeError, KeyError, AttributeError, ValueError) as exc:
            msg = (
                f"feedback must be {{'feedback': [{{'request_id', 'labels'}}]}}: "
                f"{type(exc).__name__}: {exc}"
            )
            served = service.model(name)
            m.rejected.labels(served.name if served else "", "400").inc()
            return _json(400, {"detail": msg, "error": msg})
        served = service.model(name)
        if served is None:
            m.rejected.labels("", "404").inc()
            return oip_error(unknown(name))
        verified = [ids.verify(rid) for rid, _ in pairs]
        forged = [
            (i, "forged", f"request id {rid[:80]!r} was not issued by this service")
            for i, ((rid, _), v) in enumerate(zip(pairs, verified, strict=True))
            if v is None
        ]
        if forged:  # nothing is recorded, nor forwarded anywhere
            served.count_refused(pairs, forged)
            counts = {"matched": 0, "unknown": 0, "mismatched": 0, "forged": len(forged)}
            refused = forged
        else:
            owners = [v.owner for v in verified if v is not None]
            hopped = request.headers.get(FORWARDED_HEADER) is not None
            counts, refused = await settle(served, pairs, owners, hopped)
            if not refused:
                return _json(200, counts)
        results = {r for _, r, _ in refused}
        status = next(
            (code for code, found in FEEDBACK_STATUS if results & found),
            422,
        )
        m.rejected.labels(served.name, str(status)).inc()
        first = refused[0][2]
        recorded = counts.get("matched", 0)
        done = (
            "nothing recorded"
            if not recorded
            else f"the {recorded} label(s) of the other items recorded"
        )
        msg = f"{len(refused)} of {len(pairs)} feedback item(s) refused, {done}; first: {first}"
        return _json(
            status,
            {
                **counts,
                "detail": msg,
                "error": msg,
                "refused": [
                    {"index": i, "request_id": pairs[i][0][:80], "result": r, "message": why}
                    for i, r, why in refused
                ],
            },
        )

    @app.post("/feedback")
    async def feedback(request: Request) -> Response:
        """Labels for the default model, or the model the body's ``"model"`` names."""
        return await feedback_for(request, None, True)

    @app.get("/healthz")
    async def healthz() -> Response:
        alive = service.poller_alive
        return _json(200 if alive else 503, {"status": "ok" if alive else "poller stopped"})

    @app.get("/readyz")
    async def readyz() -> Response:
        detail = service.readiness()
        return _json(200 if detail["ready"] else 503, detail)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(m.render(), media_type=PROM_CONTENT_TYPE)

    # -- Open Inference Protocol (KServe v2) ------------------------------------------------

    @app.get("/v2")
    async def server_metadata() -> Response:
        return _json(
            200,
            {"name": "retrain-pipeline-scoring", "version": _package_version(), "extensions": []},
        )

    @app.get("/v2/health/live")
    async def live() -> Response:
        alive = service.poller_alive
        return _json(200 if alive else 503, {"live": alive})

    @app.get("/v2/health/ready")
    async def server_ready() -> Response:
        ready = service.ready
        return _json(
            200 if ready else 503,
            {"ready": ready, "models": {n: mdl.ready for n, mdl in sorted(service.models.items())}},
        )

    @app.get("/v2/models")
    async def list_models() -> Response:
        return _json(
            200,
            {
                "models": [
                    {
                        "name": mdl.name,
                        "registered_model": mdl.registered_model,
                        "task": mdl.task,
                        "ready": mdl.ready,
                    }
                    for _, mdl in sorted(service.models.items())
                ],
                "default_model": service.default,
                "broken_specs": dict(service.broken),
            },
        )

    @app.get("/v2/models/{name}")
    async def model_metadata(name: str) -> Response:
        try:
            served = served_or_404(name)
        except _Refused as r:
            return oip_error(r)
        return _json(200, _metadata(served))

    @app.get("/v2/models/{name}/ready")
    async def model_ready(name: str) -> Response:
        try:
            served = served_or_404(name)
        except _Refused as r:
            return oip_error(r)
        return _json(200 if served.ready else 503, {"name": served.name, "ready": served.ready})

    async def infer(request: Request, name: str, version: str | None) -> Response:
        t0 = perf_counter()
        try:
            served = served_or_404(name)
            try:
                body = await json_body(request)
                req = infer_request(body, service.max_rows, served.validator.types)
            except BadRequest as exc:
                m.rejected.labels(served.name, "400").inc()
                raise _Refused(400, str(exc)) from None
            classes = served.classes
            names = [output_name(c) for c in classes]
            bad = [o for o in req.outputs if o not in names]
            if bad:
                m.rejected.labels(served.name, "400").inc()
                raise _Refused(400, f"unknown output(s) {bad}; model {served.name!r} has {names}")
            key = request.headers.get(ROUTING_KEY_HEADER) or req.parameters.get("routing_key")
            out = await score(served, req.rows, None if key is None else str(key), t0, version)
        except _Refused as r:
            return oip_error(r)
        return _json(200, _infer_response(served, req, out))

    @app.post("/v2/models/{name}/infer")
    async def infer_routed(request: Request, name: str) -> Response:
        return await infer(request, name, None)

    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer_version(request: Request, name: str, version: str) -> Response:
        return await infer(request, name, version)

    @app.post("/v2/models/{name}/feedback")
    async def model_feedback(request: Request, name: str) -> Response:
        return await feedback_for(request, name, False)

    if access.admin_token is not None:
        _admin_routes(app, service, access.admin_token)
    return app


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("retrain-pipeline")
    except PackageNotFoundError:
        return "0"


def _infer_response(served: ServedModel, req: InferRequest, out: _Scored) -> dict[str, Any]:
    model = out.slot.model
    n = int(out.proba.shape[0])
    wanted = set(req.outputs)
    outputs = [
        {"name": output_name(c), "datatype": "FP32", "shape": [n], "data": out.proba[:, i].tolist()}
        for i, c in enumerate(model.classes)
        if not wanted or output_name(c) in wanted
    ]
    return {
        "model_name": served.name,
        "model_version": model.version,
        "id": req.id if req.id is not None else out.request_id,
        "parameters": {
            "alias": out.slot.alias,
            "request_id": out.request_id,
            "registered_model": served.registered_model,
        },
        "outputs": outputs,
    }


def _metadata(served: ServedModel) -> dict[str, Any]:
    """OIP model metadata: inputs from the served champion's feature spec (the contract's
    features before one is loaded), typed and bounded by the contract."""
    t = served.table
    champ = t.champion.model if t.champion else None
    columns = {c.name: c for c in served.validator.columns}
    names = champ.spec.input_columns if champ is not None else list(columns)
    inputs = []
    for name in names:
        col = columns.get(name)
        params: dict[str, Any] = {}
        if col is not None:
            params["nullable"] = col.nullable
            if col.categories:
                params["categories"] = list(col.categories)
            if col.min is not None:
                params["min"] = col.min
            if col.max is not None:
                params["max"] = col.max
        inputs.append(
            {
                "name": name,
                "datatype": OIP_DATATYPE.get(col.type if col else "float", "FP64"),
                "shape": [-1],
                "parameters": params,
            }
        )
    outputs = [
        {"name": output_name(c), "datatype": "FP32", "shape": [-1], "parameters": {"class": c}}
        for c in served.classes
    ]
    versions = [s.model.version for s in (t.champion, t.canary) if s is not None]
    return {
        "name": served.name,
        "versions": versions,
        "platform": PLATFORM,
        "inputs": inputs,
        "outputs": outputs,
        "parameters": {
            "registered_model": served.registered_model,
            "task": served.task,
            "classes": served.classes,
            "ready": served.ready,
            "champion": champ.version if champ else None,
            "canary": t.canary.model.version if t.canary else None,
            "canary_weight": t.weight,
        },
    }


def _admin_routes(app: FastAPI, service: ScoringService, token: str) -> None:
    """``/admin/*``, each behind the admin bearer token (no address is trusted: see
    :mod:`pipeline.serving.access`)."""

    def admin_token(request: Request) -> None:
        given = bearer(request.headers)
        if given is None:
            service.metrics.rejected.labels("", "401").inc()
            raise HTTPException(
                401,
                "/admin needs 'Authorization: Bearer <PIPELINE_SERVING_ADMIN_TOKEN>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not token_matches(given, token):
            service.metrics.rejected.labels("", "403").inc()
            raise HTTPException(403, "the admin token is not the service's")

    guard = [Depends(admin_token)]

    def publish() -> dict[str, Any]:
        service.metrics.fault.clear()
        for model, version in service.faults.keys():
            service.metrics.fault.labels(model, version).set(1)
        return service.faults.to_dict()

    def resolve(name: str | None) -> ServedModel | Response:
        served = service.model(name)
        if served is None:
            return _json(
                404,
                {
                    "error": f"unknown model {name!r}; known models: {service.names}",
                    "known_models": service.names,
                },
            )
        return served

    @app.get("/admin/faults", dependencies=guard)
    async def get_faults() -> Response:
        return _json(200, service.faults.to_dict())

    @app.post("/admin/faults", dependencies=guard)
    async def set_fault(request: Request) -> Response:
        try:
            spec = FaultSpec.model_validate(parse_json(await request.body()))
        except BadRequest as exc:
            service.metrics.rejected.labels("", "400").inc()
            return _json(400, {"detail": str(exc), "error": str(exc)})
        except ValidationError as exc:
            service.metrics.rejected.labels("", "422").inc()
            return _json(422, {"detail": json.loads(exc.json(include_url=False))})
        served = resolve(spec.model)
        if isinstance(served, Response):
            return served
        spec = spec.model_copy(update={"model": served.name})
        service.faults.set(spec)
        log.warning("fault switch: %s", spec.model_dump())
        return _json(200, publish())

    @app.delete("/admin/faults", dependencies=guard)
    async def clear_faults() -> Response:
        service.faults.clear()
        return _json(200, publish())

    @app.delete("/admin/faults/{version}", dependencies=guard)
    async def clear_fault(version: str, model: str | None = None) -> Response:
        served = resolve(model)
        if isinstance(served, Response):
            return served
        service.faults.clear(served.name, version)
        return _json(200, publish())

    @app.post("/admin/poll", dependencies=guard)
    async def poll_now() -> Response:
        """Re-read the registry now instead of at the next poll (operators, tests)."""
        await run_in_threadpool(service.poll_once)
        return _json(200, service.readiness())


def build_service(poll_seconds: float | None = None, root: Any = None) -> ScoringService:
    """Every model spec under the models root (``root``: another folder): a broken spec
    (or one whose contract cannot be read) is logged and skipped, the others served."""
    from pipeline.serving.service import ServedModel
    from pipeline.settings import get_settings
    from pipeline.spec import discover

    s = get_settings()
    found = discover(root)
    broken = {str(path): err for path, err in found.errors}
    for path, err in found.errors:
        log.error("model spec %s is not served: %s", path, err)
    models = []
    for spec in found.specs:
        try:
            models.append(ServedModel.from_spec(spec))
        except Exception as exc:  # noqa: BLE001 - one model's trouble never stops the others
            broken[str(spec.path)] = f"{type(exc).__name__}: {exc}"
            log.exception("model %s is not served", spec.name)
    log.info("serving models %s (default %s)", [mdl.name for mdl in models], s.model)
    return ScoringService(
        models, default=s.model, poll_seconds=poll_seconds or s.serving_poll_seconds, broken=broken
    )


def startup_checks() -> AccessPolicy:
    """What the service refuses to start with, checked before anything slow: unsafe access
    settings (ServingConfigError) and bad signing keys, or a private key in the service
    (``signing.verifier_startup_check(serving=True)``: SigningKeyError). Logs what it
    trusts and, with several replicas, the address it names in its request ids."""
    from pipeline.signing import verifier_startup_check

    access = AccessPolicy.from_settings()
    log.info("checkpoint signatures: %s", verifier_startup_check(serving=True))
    if access.advertise_url:
        log.info("replica %s: feedback for its ids is forwarded here", access.advertise_url)
    return access


def app_from_settings(
    poll_seconds: float | None = None, *, access: AccessPolicy | None = None
) -> FastAPI:
    """The service as settings describe it (``PIPELINE_SERVING_*``): what ``serve`` runs,
    and an app factory for any ASGI server's own flags, e.g. ``uvicorn --factory
    pipeline.serving.app:app_from_settings --workers 1 --proxy-headers``. Raises (before
    any model is read) what :func:`startup_checks` refuses; ``access``: already checked."""
    access = access or startup_checks()
    return create_app(build_service(poll_seconds), access=access)


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    poll_seconds: float | None = None,
    torch_threads: int = 1,
    log_level: str = "info",
) -> None:
    """Run the service until interrupted. Binds loopback unless a host is given
    explicitly (``--host 0.0.0.0`` in a container)."""
    access = startup_checks()  # unsafe access settings, bad keys: refused before slow imports
    import torch
    import uvicorn

    torch.set_num_threads(torch_threads)  # small batches: one thread has the lowest latency
    app = app_from_settings(poll_seconds, access=access)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
