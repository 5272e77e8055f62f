"""Benchmark: the scoring service's alias router, and the canary's time to roll back.

``python -m benchmarks.serving_canary`` (about a minute; everything on 127.0.0.1 under a
temporary PIPELINE_HOME):

(a) p50/p99 latency of ``POST /predict`` through the alias router (contract validation,
    weighted routing with a canary at 50 %, metrics, feedback bookkeeping) against a bare
    FastAPI endpoint that parses the same JSON and calls the same verified model — both
    routes in the same uvicorn process (``--serve``, a subprocess), requests interleaved
    one by one (router, bare / bare, router) from one keep-alive client, single-row
    bodies; then rows/s through the router with 64-row bodies.
(b) time from an injected fault (``POST /admin/faults {"error_rate": 0.5}`` on the canary
    version, with replayed traffic flowing) to the canary weight reading 0 in the registry,
    with the analysis interval the canary ran with. ``/admin`` is off by default: the
    benchmark's own service is started with it on and a token generated for the run.

The last line is one JSON object: bench, p50_ratio, p99_ratio, rows_per_s,
rollback_seconds, analysis_interval_seconds (and the raw numbers). Targets: p99_ratio <=
1.10; rollback_seconds <= 2 x analysis_interval_seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from fastapi import Request  # module level: FastAPI resolves the route's annotations here
from fastapi.responses import Response

from benchmarks._targets import finish, target

ROOT = Path(__file__).resolve().parent.parent
ANALYSIS_INTERVAL = 1.0
POLL = 0.25


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the server side (subprocess) ----------------------------------------------------------


def serve_with_bare_route(port: int) -> None:
    """The real service plus ``/bare/predict``: same process, same verified model object."""
    import pandas as pd
    import torch
    import uvicorn

    from pipeline.evaluate import score_model
    from pipeline.serving.access import AccessPolicy
    from pipeline.serving.app import build_service, create_app

    torch.set_num_threads(1)
    service = build_service(POLL)
    app = create_app(service, access=AccessPolicy.from_settings())
    bound: dict = {}

    @app.post("/bare/predict")
    async def bare(request: Request) -> Response:
        if "m" not in bound:
            bound["m"] = service.model().table.champion.model  # bound once: no routing per request
        m = bound["m"]
        body = json.loads(await request.body())
        rows = body if isinstance(body, list) else [body]
        df = pd.DataFrame.from_records(rows, columns=m.spec.input_columns)
        scores = score_model(m.model, m.spec, df)[:, m.positive_index]
        return Response(
            json.dumps({"scores": scores.tolist()}).encode(), media_type="application/json"
        )

    import logging

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# -- the client side --------------------------------------------------------------------------


def _setup(home: Path, *, serving_model: bool = False) -> tuple[str, str]:
    """Train one small model, publish a signed checkpoint, register it twice (v1, v2).

    ``serving_model``: each version's source is the checkpoint logged as the MLflow model
    ``register_challenger`` logs (``registry.log_serving_model``: models from code), so
    ``mlflow models serve -m models:/<name>/<version>`` can serve it too."""
    from pipeline import checkpoint, registry, settings, storage
    from pipeline.data.generate import WorldSpec, generate
    from pipeline.spec import active
    from pipeline.train.loop import TrainConfig, train

    settings.get_settings.cache_clear()
    registry.client.cache_clear()
    df = generate(WorldSpec(rows=5000, seed=11))
    result = train(
        df,
        active().contract_obj(),
        TrainConfig(max_epochs=4, seed=1, batch_size=256, telemetry=False, state_every=0),
    )
    local = home / "ckpt"
    checkpoint.save_checkpoint(
        local,
        result.model,
        result.features,
        df.head(64),
        data_snapshot={"uri": "bench", "sha256": "bench"},
        training={"stop_reason": result.stop_reason},
    )
    uri = storage.join(settings.get_settings().storage_root, "checkpoints", "bench")
    checkpoint.publish(local, uri)
    tags = {  # what register_challenger and an accepting gate record: the service needs them
        "checkpoint.uri": uri,
        "checkpoint.manifest_sha256": checkpoint.manifest_digest(local),
        "gate.verdict": "promote",
    }
    versions = []
    for i in (1, 2):
        run_id = registry.get_or_create_run(f"bench-{i}")
        source, model_id = uri, None
        if serving_model:
            info = registry.log_serving_model(run_id, local, df.head(5))
            source, model_id = info.model_uri, info.model_id
        versions.append(
            registry.register_version(
                run_id, f"bench-{i}", source, tags, description="benchmark", model_id=model_id
            )
        )
    registry.set_alias(registry.CHAMPION, versions[0])
    return versions[0], versions[1]


def _wait(url: str, ok, timeout: float = 120.0) -> dict:  # noqa: ANN001
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url + "/readyz", timeout=5)
            if ok(r):
                return r.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} never reached the expected state")


def _latency(url: str, rows: list[dict], pairs: int, warmup: int) -> dict:
    import httpx
    import numpy as np

    router, bare = [], []
    bodies = [json.dumps(r).encode() for r in rows]
    headers = {"content-type": "application/json"}
    with httpx.Client(base_url=url, timeout=10) as c:
        for i in range(warmup + pairs):
            body = bodies[i % len(bodies)]
            order = (("/predict", router), ("/bare/predict", bare))
            for path, sink in order if i % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                r = c.post(path, content=body, headers=headers)
                dt = (time.perf_counter() - t0) * 1000
                if r.status_code != 200:
                    raise RuntimeError(f"{path} answered {r.status_code}: {r.text[:200]}")
                if i >= warmup:
                    sink.append(dt)
        batch = json.dumps(rows[:64]).encode()
        t0, n = time.perf_counter(), 0
        for _ in range(150):
            c.post("/predict", content=batch, headers=headers).raise_for_status()
            n += 64
        rows_per_s = n / (time.perf_counter() - t0)
    r, b = np.asarray(router), np.asarray(bare)
    return {
        "router_p50_ms": float(np.percentile(r, 50)),
        "router_p99_ms": float(np.percentile(r, 99)),
        "bare_p50_ms": float(np.percentile(b, 50)),
        "bare_p99_ms": float(np.percentile(b, 99)),
        "pairs": pairs,
        "rows_per_s": rows_per_s,
    }


def _rollback_time(url: str, champion: str, canary: str, traffic_rows) -> dict:  # noqa: ANN001
    import httpx

    from pipeline.canary import CanaryPlan, CanaryThresholds, run_canary_rollout
    from pipeline.serving import traffic
    from pipeline.serving.replay import ReplayConfig, prepare, replay

    plan = CanaryPlan(
        steps=((0.25, 60.0), (0.5, 60.0), (1.0, 60.0)),
        analysis_interval_s=ANALYSIS_INTERVAL,
        bake_s=0,
        load_timeout_s=30,
        thresholds=CanaryThresholds(min_requests=20, min_requests_fail_fast=8, min_scores=100),
    )
    stop = threading.Event()
    load = threading.Thread(
        target=replay,
        daemon=True,
        args=(
            ReplayConfig(url=url, rate=80, duration_s=120, rows_per_request=8),
            prepare(traffic_rows, 8),
            stop,
        ),
    )
    load.start()
    out: dict = {}
    rollout = threading.Thread(
        target=lambda: out.update(
            run_canary_rollout(canary, champion, plan=plan, service_url=url, run_key="bench")
        ),
        daemon=True,
    )
    rollout.start()
    # let the canary pass two measurements at 25 % first
    deadline = time.monotonic() + 60
    while traffic.canary_weight() != 0.25 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(2.3 * ANALYSIS_INTERVAL)
    httpx.post(
        url + "/admin/faults",
        json={"version": canary, "error_rate": 0.5},
        headers={"Authorization": f"Bearer {os.environ['PIPELINE_SERVING_ADMIN_TOKEN']}"},
        timeout=5,
    ).raise_for_status()
    t_fault = time.monotonic()
    registry_zero = service_zero = None
    while time.monotonic() - t_fault < 30 and (registry_zero is None or service_zero is None):
        if registry_zero is None and traffic.canary_weight() == 0.0:
            registry_zero = time.monotonic() - t_fault
        if (
            service_zero is None
            and httpx.get(url + "/readyz", timeout=5).json()["canary_weight"] == 0
        ):
            service_zero = time.monotonic() - t_fault
        time.sleep(0.02)
    rollout.join(30)
    stop.set()
    load.join(30)
    return {
        "rollback_seconds": registry_zero,
        "service_weight_zero_seconds": service_zero,
        "canary_verdict": out.get("verdict"),
        "canary_reason": out.get("reason"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--pairs", type=int, default=3000)
    ap.add_argument("--keep-log", default=None, help="copy the service's log here")
    args = ap.parse_args()
    if args.serve is not None:
        serve_with_bare_route(args.serve)
        return 0

    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        home = Path(tmp) / "home"
        os.environ["PIPELINE_HOME"] = str(home)
        for var in ("PIPELINE_STORAGE_URI", "PIPELINE_MLFLOW_TRACKING_URI", "PIPELINE_SERVING_URL"):
            os.environ.pop(var, None)
        # the service subprocess inherits these: /admin on, with this run's own token
        os.environ["PIPELINE_SERVING_ADMIN_ENABLED"] = "true"
        os.environ["PIPELINE_SERVING_ADMIN_TOKEN"] = secrets.token_hex(32)
        champion, canary = _setup(home)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        log = (Path(tmp) / "serve.log").open("w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.serving_canary", "--serve", str(port)],
            cwd=ROOT,
            env=os.environ.copy(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            from pipeline import registry
            from pipeline.data.generate import WorldSpec, generate
            from pipeline.serving import traffic
            from pipeline.spec import active

            _wait(url, lambda r: r.status_code == 200)
            # (a) the router with a live canary at 50 %, both versions the same model
            registry.set_alias(traffic.CANARY, canary)
            traffic.set_canary_weight(0.5)
            _wait(url, lambda r: r.json().get("canary_weight") == 0.5)
            df = generate(WorldSpec(rows=4000, seed=99))
            feats = [c.name for c in active().contract_obj().features]
            rows = df[feats].astype(object).where(df[feats].notna(), None).to_dict(orient="records")
            lat = _latency(url, rows[:500], args.pairs, warmup=200)
            traffic.set_canary_weight(0.0)
            registry.delete_alias(traffic.CANARY)
            _wait(url, lambda r: r.json().get("canary") is None)
            # (b) fault -> weight 0
            rb = _rollback_time(url, champion, canary, df)
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
            if args.keep_log:
                Path(args.keep_log).write_text((Path(tmp) / "serve.log").read_text())
    result = {
        "bench": "serving_canary",
        "p50_ratio": round(lat["router_p50_ms"] / lat["bare_p50_ms"], 4),
        "p99_ratio": round(lat["router_p99_ms"] / lat["bare_p99_ms"], 4),
        "rows_per_s": round(lat["rows_per_s"], 1),
        "rollback_seconds": None
        if rb["rollback_seconds"] is None
        else round(rb["rollback_seconds"], 3),
        "analysis_interval_seconds": ANALYSIS_INTERVAL,
        **{
            k: round(v, 3) if isinstance(v, float) else v
            for k, v in lat.items()
            if k != "rows_per_s"
        },
        **{k: v for k, v in rb.items() if k != "rollback_seconds"},
    }
    targets = [
        target("p99_ratio", result["p99_ratio"], "<=", 1.10),
        target("rollback_seconds", result["rollback_seconds"], "<=", 2 * ANALYSIS_INTERVAL),
    ]
    print(finish(result, targets))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
