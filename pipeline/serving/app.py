"""HTTP routes of the scoring service (FastAPI), and ``serve`` (uvicorn).

Status codes: 200 scored; 400 the body is not JSON or not rows; 422 a row breaks the
contract (``detail`` lists ``{"row", "field", "error"}``); 500 the model failed (counted
as the answering version's error); 503 no verified champion is loaded yet.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from time import perf_counter
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from pipeline.serving.faults import FaultSpec
from pipeline.serving.schema import BadRequest, RowsInvalid, rows_of
from pipeline.serving.service import ScoringService

log = logging.getLogger(__name__)

LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})
INLINE_ROWS = 64  # bigger batches are scored on the thread pool, off the event loop
ROUTING_KEY_HEADER = "x-routing-key"
PROM_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _json(status: int, payload: Any) -> Response:
    return Response(json.dumps(payload).encode(), status_code=status, media_type="application/json")


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

    app = FastAPI(title="retrain-pipeline scoring service", lifespan=lifespan,
                  description=__doc__)  # fmt: skip
    app.state.service = service
    m = service.metrics

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        t0 = perf_counter()
        raw = await request.body()
        try:
            body = json.loads(raw)
            rows = rows_of(body, service.max_rows)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            m.rejected.labels("400").inc()
            return _json(400, {"detail": f"body is not valid JSON: {exc}"})
        except BadRequest as exc:
            m.rejected.labels("400").inc()
            return _json(400, {"detail": str(exc)})
        try:
            service.validator.check(rows)
        except RowsInvalid as exc:
            m.rejected.labels("422").inc()
            return _json(422, {"detail": [p.to_dict() for p in exc.problems], "message": str(exc)})
        key = request.headers.get(ROUTING_KEY_HEADER)
        if key is None and isinstance(body, dict):
            key = body.get("routing_key")
        slot = service.table.pick(None if key is None else str(key))
        if slot is None:
            m.rejected.labels("503").inc()
            return _json(503, {"detail": "no verified champion is loaded yet; see /readyz"})
        sm, model = slot.metrics, slot.model
        fault = service.faults.get(model.version)
        try:
            if fault is not None:
                if fault.latency_ms:
                    await asyncio.sleep(fault.latency_ms / 1000)
                if service.faults.fails(fault):
                    raise RuntimeError(f"injected fault on v{model.version} (see /admin/faults)")
            if len(rows) <= INLINE_ROWS:
                scores = model.score(rows)
            else:
                scores = await run_in_threadpool(model.score, rows)
            if fault is not None and fault.score_shift:
                scores = (scores + fault.score_shift).clip(0.0, 1.0)
        except Exception as exc:  # noqa: BLE001 - any model failure is a 500 counted on the model
            sm.requests.inc()
            sm.errors.inc()
            sm.latency.observe(perf_counter() - t0)
            log.warning("v%s failed: %s", model.version, exc)
            return _json(500, {"detail": f"model v{model.version} failed: {exc}",
                               "alias": slot.alias, "version": model.version})  # fmt: skip
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        service.feedback.remember(request_id, slot.alias, model.version, scores)
        values = scores.tolist()
        observe = sm.score.observe
        for s in values:
            observe(s)
        sm.rows.inc(len(values))
        sm.requests.inc()
        sm.latency.observe(perf_counter() - t0)
        return _json(200, {"request_id": request_id, "alias": slot.alias,
                           "version": model.version, "scores": values})  # fmt: skip

    @app.post("/feedback")
    async def feedback(request: Request) -> Response:
        """``{"feedback": [{"request_id": "...", "labels": [0, 1]}]}`` (or ``"label": 1``
        for a one-row request); a single item may be posted without the wrapper."""
        try:
            body = json.loads(await request.body())
            items = body.get("feedback", [body]) if isinstance(body, dict) else body
            pairs = []
            for i, it in enumerate(items):
                labels = it["labels"] if "labels" in it else [it["label"]]
                if not isinstance(labels, list):
                    raise ValueError(f"item {i}: labels must be an array")
                pairs.append((str(it["request_id"]), labels))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError, AttributeError,
                ValueError) as exc:  # fmt: skip
            return _json(400, {"detail": f"feedback must be {{'feedback': [{{'request_id', "
                                         f"'labels'}}]}}: {type(exc).__name__}: {exc}"})
        return _json(200, await run_in_threadpool(service.record_labels, pairs))

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

    if admin:
        _admin_routes(app, service)
    return app


def _loopback_only(request: Request) -> None:
    host = request.client.host if request.client else None
    if host not in LOOPBACK:
        raise HTTPException(403, f"/admin answers loopback clients only (you are {host})")


def _admin_routes(app: FastAPI, service: ScoringService) -> None:
    guard = [Depends(_loopback_only)]

    def publish() -> dict[str, Any]:
        faults = service.faults.to_dict()
        service.metrics.fault.clear()
        for v in faults:
            service.metrics.fault.labels(v).set(1)
        return faults

    @app.get("/admin/faults", dependencies=guard)
    async def get_faults() -> Response:
        return _json(200, service.faults.to_dict())

    @app.post("/admin/faults", dependencies=guard)
    async def set_fault(spec: FaultSpec) -> Response:
        service.faults.set(spec)
        log.warning("fault switch: %s", spec.model_dump())
        return _json(200, publish())

    @app.delete("/admin/faults", dependencies=guard)
    async def clear_faults() -> Response:
        service.faults.clear()
        return _json(200, publish())

    @app.delete("/admin/faults/{version}", dependencies=guard)
    async def clear_fault(version: str) -> Response:
        service.faults.clear(version)
        return _json(200, publish())

    @app.post("/admin/poll", dependencies=guard)
    async def poll_now() -> Response:
        """Re-read the registry now instead of at the next poll (operators, tests)."""
        await run_in_threadpool(service.poll_once)
        return _json(200, service.readiness())


def build_service(poll_seconds: float | None = None) -> ScoringService:
    from pipeline.contract import default_contract
    from pipeline.serving.schema import RowValidator
    from pipeline.settings import get_settings

    s = get_settings()
    return ScoringService(validator=RowValidator(default_contract()),
                          poll_seconds=poll_seconds or s.serving_poll_seconds)  # fmt: skip


def serve(host: str = "127.0.0.1", port: int = 8000, *, poll_seconds: float | None = None,
          torch_threads: int = 1, log_level: str = "info") -> None:  # fmt: skip
    """Run the service until interrupted. Binds loopback unless a host is given
    explicitly (``--host 0.0.0.0`` in a container)."""
    import torch
    import uvicorn

    from pipeline.settings import get_settings

    torch.set_num_threads(torch_threads)  # small batches: one thread has the lowest latency
    app = create_app(build_service(poll_seconds), admin=get_settings().serving_admin_enabled)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
