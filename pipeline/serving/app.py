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
  picks some. ``id`` (or ``X-Request-Id``, or a new one) is the id feedback refers to.
* ``GET /v2/models/{name}`` — metadata: versions served, platform, inputs (from the
  served checkpoint's feature spec, typed and bounded by the contract), outputs, and the
  routing state in ``parameters``; ``GET /v2/models/{name}/ready`` (200 / 503).
* ``POST /v2/models/{name}/feedback`` — labels for earlier requests of that model.
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

Status codes: 200 scored; 400 the body is not JSON or not rows/tensors; 404 unknown
model; 422 a row breaks the model's contract; 500 the model failed (counted as the
answering version's error); 503 no verified champion of that model is loaded yet.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from time import perf_counter
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from pipeline.serving.faults import FaultSpec
from pipeline.serving.schema import (
    OIP_DATATYPE,
    BadRequest,
    InferRequest,
    RowsInvalid,
    infer_request,
    rows_of,
)
from pipeline.serving.service import ScoringService, ServedModel, Slot

log = logging.getLogger(__name__)

LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})
INLINE_ROWS = 64  # bigger batches are scored on the thread pool, off the event loop
ROUTING_KEY_HEADER = "x-routing-key"
PROM_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PLATFORM = "pytorch_torchscript"  # OIP's name for a PyTorch model (served here as nn.Module)


def _json(status: int, payload: Any) -> Response:
    return Response(json.dumps(payload).encode(), status_code=status, media_type="application/json")


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


def create_app(service: ScoringService, *, admin: bool = True, poll: bool = True) -> FastAPI:
    """The app over ``service``. ``poll``: poll the registry on startup and keep polling
    (off in unit tests that drive ``service.poll_once`` themselves)."""

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

    app = FastAPI(title="retrain-pipeline scoring service", lifespan=lifespan, description=__doc__)
    app.state.service = service
    m = service.metrics

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
        request_id: str | None,
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
        request_id = request_id or uuid.uuid4().hex
        kept = served.scores_of(model, proba)
        served.feedback.remember(request_id, slot.alias, model.version, kept)
        observe = sm.score.observe
        for s in kept.reshape(-1).tolist():
            observe(s)
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
        raw = await request.body()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRequest(f"body is not valid JSON: {exc}") from None

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
            out = await score(
                served,
                rows,
                None if key is None else str(key),
                request.headers.get("x-request-id"),
                t0,
            )
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

    async def feedback_for(request: Request, name: str | None, by_body: bool) -> Response:
        """``{"feedback": [{"request_id": "...", "labels": [0, 1]}]}`` (or ``"label": 1``
        for a one-row request); a single item may be posted without the wrapper."""
        try:
            body = await json_body(request)
            if by_body and isinstance(body, dict) and body.get("model") is not None:
                name = str(body["model"])
            items = body.get("feedback", [body]) if isinstance(body, dict) else body
            pairs = []
            for i, it in enumerate(items):
                labels = it["labels"] if "labels" in it else [it["label"]]
                if not isinstance(labels, list):
                    raise ValueError(f"item {i}: labels must be an array")
                pairs.append((str(it["request_id"]), labels))
        except (BadRequest, TypeError, KeyError, AttributeError, ValueError) as exc:
            msg = (
                f"feedback must be {{'feedback': [{{'request_id', 'labels'}}]}}: "
                f"{type(exc).__name__}: {exc}"
            )
            return _json(400, {"detail": msg, "error": msg})
        served = service.model(name)
        if served is None:
            m.rejected.labels("", "404").inc()
            return oip_error(unknown(name))
        return _json(200, await run_in_threadpool(served.record_labels, pairs))

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
            rid = req.id or request.headers.get("x-request-id")
            out = await score(served, req.rows, None if key is None else str(key), rid, t0, version)
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

    if admin:
        _admin_routes(app, service)
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
        "id": out.request_id,
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


def _loopback_only(request: Request) -> None:
    host = request.client.host if request.client else None
    if host not in LOOPBACK:
        raise HTTPException(403, f"/admin answers loopback clients only (you are {host})")


def _admin_routes(app: FastAPI, service: ScoringService) -> None:
    guard = [Depends(_loopback_only)]

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
    async def set_fault(spec: FaultSpec) -> Response:
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
    import torch
    import uvicorn

    from pipeline.settings import get_settings

    torch.set_num_threads(torch_threads)  # small batches: one thread has the lowest latency
    app = create_app(build_service(poll_seconds), admin=get_settings().serving_admin_enabled)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
