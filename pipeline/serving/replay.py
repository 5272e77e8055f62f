"""Traffic replayer: real HTTP requests from a batch, at a set rate, then its labels.

``python -m pipeline replay --url http://127.0.0.1:8000 --batch file://…/batch.parquet
--rate 50 --duration 60 --labels-after 5`` sends ``rate`` requests a second (open loop:
request *i* is due at ``i / rate`` s, whether or not earlier ones answered) for
``duration`` seconds — at most ``rate x duration`` requests (and ``--max-requests``),
at most ``concurrency`` in flight — each with ``rows_per_request`` rows of the batch's
feature columns, in order, wrapping around. With ``--labels-after S`` each answered
request's labels (the contract's target column) are posted to ``/feedback`` S seconds
after the answer, as a real label feed would arrive, so the service can compute the
labelled metric per alias: keyed by the id the service issued for that answer, with the
feedback bearer token (``feedback_token``; default ``PIPELINE_SERVING_FEEDBACK_TOKEN``,
the service's own setting). It always stops by itself: after the last request,
pending labels are sent once they are due, and nothing else.

``--key-column`` sends that column's value as ``X-Routing-Key`` (sticky routing).
``model`` (a spec's name) sends to that model's OIP routes instead
(``/v2/models/{model}/infer`` with ``{"inputs": [rows]}``, and ``.../feedback``); the
rows are that model's contract features (``prepare(..., contract=)``; default: the
active spec's).
The report counts what was sent and what was answered, by status and by version.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pipeline.serving.access import bearer_auth_headers


@dataclass(frozen=True)
class ReplayConfig:
    url: str
    rate: float
    duration_s: float
    labels_after_s: float | None = None
    rows_per_request: int = 1
    max_requests: int | None = None
    concurrency: int = 16
    timeout_s: float = 10.0
    key_column: str | None = None
    model: str | None = None  # None: /predict and /feedback (the service's default model)
    # Bearer token for /feedback; None: PIPELINE_SERVING_FEEDBACK_TOKEN
    feedback_token: str | None = field(default=None, repr=False)

    def feedback_auth(self) -> dict[str, str]:
        token = self.feedback_token
        if token is None:
            from pipeline.settings import get_settings

            secret = get_settings().serving_feedback_token
            token = secret.get_secret_value() if secret is not None else None
        return bearer_auth_headers(token)

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url must be http(s)://…, got {self.url!r}")
        if not 0 < self.rate <= 10_000:
            raise ValueError(f"rate must be in (0, 10000] requests/s, got {self.rate}")
        if not 0 < self.duration_s <= 86_400:
            raise ValueError(f"duration must be in (0, 86400] s, got {self.duration_s}")
        if self.labels_after_s is not None and not 0 <= self.labels_after_s <= 3600:
            raise ValueError(f"labels_after must be in [0, 3600] s, got {self.labels_after_s}")
        if not 1 <= self.rows_per_request <= 10_000:
            raise ValueError(f"rows_per_request must be in [1, 10000], got {self.rows_per_request}")
        if self.max_requests is not None and self.max_requests < 1:
            raise ValueError(f"max_requests must be >= 1, got {self.max_requests}")
        if not 1 <= self.concurrency <= 256:
            raise ValueError(f"concurrency must be in [1, 256], got {self.concurrency}")

    @property
    def total_requests(self) -> int:
        n = max(1, int(math.floor(self.rate * self.duration_s)))
        return min(n, self.max_requests) if self.max_requests else n


@dataclass
class ReplayReport:
    sent: int = 0
    answered_2xx: int = 0
    status: dict[str, int] = field(default_factory=dict)
    transport_errors: int = 0
    by_version: dict[str, int] = field(default_factory=dict)
    labels_sent: int = 0
    feedback: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    late_starts: int = 0  # requests that could not start on time (concurrency exhausted)
    latency_ms_p50: float | None = None
    latency_ms_p99: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Traffic:
    """Pre-encoded request bodies and their labels (so the loop spends no time on JSON)."""

    bodies: list[bytes]
    labels: list[list[Any]]
    keys: list[str | None]


def prepare(
    df: Any,
    rows_per_request: int,
    key_column: str | None = None,
    limit: int | None = None,
    contract: Any = None,
    oip: bool = False,
) -> Traffic:
    """Bodies of ``rows_per_request`` contract feature rows each (NaN -> null); ``oip``:
    as ``{"inputs": [rows]}`` (the OIP route). ``contract``: default the active spec's."""
    if contract is None:
        from pipeline.spec import active

        contract = active().contract_obj()
    features = [c.name for c in contract.features]
    missing = [c for c in features if c not in df.columns]
    if missing:
        raise ValueError(f"the batch lacks feature columns {missing}")
    target = contract.target if contract.target in df.columns else None
    n_req = max(1, len(df) // rows_per_request)
    if limit is not None:
        n_req = min(n_req, limit)
    feats = df[features].astype(object).where(df[features].notna(), None)
    records = feats.to_dict(orient="records")
    for r in records:
        for k, v in r.items():
            if isinstance(v, np.generic):
                r[k] = v.item()
    labels = df[target].tolist() if target else None
    keys = df[key_column].astype(str).tolist() if key_column else None
    bodies, label_lists, key_list = [], [], []
    for i in range(n_req):
        lo, hi = i * rows_per_request, (i + 1) * rows_per_request
        chunk = records[lo:hi]
        if oip:
            bodies.append(json.dumps({"inputs": chunk}).encode())
        else:
            bodies.append(json.dumps(chunk[0] if rows_per_request == 1 else chunk).encode())
        label_lists.append(
            [int(v) if isinstance(v, int | np.integer) else v for v in labels[lo:hi]]
            if labels
            else []
        )
        key_list.append(keys[lo] if keys else None)
    return Traffic(bodies, label_lists, key_list)


def replay(
    cfg: ReplayConfig, traffic: Traffic, stop: threading.Event | None = None
) -> ReplayReport:
    """Send the traffic as configured; returns when done (bounded in count and time)."""
    return asyncio.run(_replay(cfg, traffic, stop or threading.Event()))


async def _replay(cfg: ReplayConfig, traffic: Traffic, stop: threading.Event) -> ReplayReport:
    import httpx

    report = ReplayReport()
    status: Counter[str] = Counter()
    versions: Counter[str] = Counter()
    feedback: Counter[str] = Counter()
    latencies: list[float] = []
    pending: list[tuple[float, str, list[Any]]] = []  # (due, request id, labels)
    sem = asyncio.Semaphore(cfg.concurrency)
    base = cfg.url.rstrip("/")
    score_path = f"/v2/models/{cfg.model}/infer" if cfg.model else "/predict"
    feedback_path = f"/v2/models/{cfg.model}/feedback" if cfg.model else "/feedback"
    n = cfg.total_requests
    feedback_headers = cfg.feedback_auth() if cfg.labels_after_s is not None else {}
    limits = httpx.Limits(
        max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency
    )
    hard_deadline = (
        time.monotonic() + cfg.duration_s + cfg.timeout_s + (cfg.labels_after_s or 0) + 5
    )

    async with httpx.AsyncClient(timeout=cfg.timeout_s, limits=limits) as client:

        async def one(i: int) -> None:
            k = i % len(traffic.bodies)
            headers = {"content-type": "application/json"}
            if traffic.keys[k]:
                headers["x-routing-key"] = str(traffic.keys[k])
            try:
                t0 = time.perf_counter()
                resp = await client.post(
                    base + score_path, content=traffic.bodies[k], headers=headers
                )
                latencies.append((time.perf_counter() - t0) * 1000)
            except httpx.HTTPError:
                report.transport_errors += 1
                return
            finally:
                sem.release()
            status[str(resp.status_code)] += 1
            if 200 <= resp.status_code < 300:
                report.answered_2xx += 1
                body = resp.json()
                versions[str(body.get("version", body.get("model_version")))] += 1
                if cfg.labels_after_s is not None and traffic.labels[k]:
                    pending.append(
                        (
                            time.monotonic() + cfg.labels_after_s,
                            body.get("request_id") or body["parameters"]["request_id"],
                            traffic.labels[k],
                        )
                    )

        async def flush(force: bool = False) -> None:
            now = time.monotonic()
            due = [p for p in pending if force or p[0] <= now]
            if not due:
                return
            for p in due:
                pending.remove(p)
            items = [{"request_id": rid, "labels": labels} for _, rid, labels in due]
            try:
                resp = await client.post(
                    base + feedback_path, json={"feedback": items}, headers=feedback_headers
                )
                if resp.status_code == 200:
                    for k, v in resp.json().items():
                        feedback[k] += int(v)
                else:
                    feedback[f"refused_{resp.status_code}"] += len(items)
                report.labels_sent += sum(len(x["labels"]) for x in items)
            except httpx.HTTPError:
                feedback["transport_error"] += len(items)

        t0 = time.monotonic()
        tasks: set[asyncio.Task[None]] = set()
        last_flush = t0
        for i in range(n):
            if stop.is_set() or time.monotonic() > hard_deadline:
                break
            due = t0 + i / cfg.rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if sem.locked():
                report.late_starts += 1
            await sem.acquire()
            report.sent += 1
            task = asyncio.create_task(one(i))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            if pending and time.monotonic() - last_flush >= 0.2:
                last_flush = time.monotonic()
                await flush()
        if tasks:
            await asyncio.wait(tasks, timeout=max(0.1, hard_deadline - time.monotonic()))
        while pending and not stop.is_set() and time.monotonic() < hard_deadline:
            await flush()
            if pending:
                # wait for the next label to fall due (at least 50 ms: labels go in batches)
                await asyncio.sleep(
                    min(0.2, max(0.05, min(p[0] for p in pending) - time.monotonic()))
                )
        if pending:
            await flush(force=True)
        report.seconds = round(time.monotonic() - t0, 3)

    report.status, report.by_version, report.feedback = dict(status), dict(versions), dict(feedback)
    if latencies:
        report.latency_ms_p50 = round(float(np.percentile(latencies, 50)), 3)
        report.latency_ms_p99 = round(float(np.percentile(latencies, 99)), 3)
    return report


def replay_batch(
    cfg: ReplayConfig, batch_uri: str, stop: threading.Event | None = None
) -> ReplayReport:
    """Read the batch (checksums verified) and replay it."""
    from pipeline.ingest import read_frame

    df = read_frame(batch_uri)
    contract = None
    if cfg.model:
        from pipeline.spec import get_spec

        contract = get_spec(cfg.model).contract_obj()
    return replay(
        cfg,
        prepare(
            df,
            cfg.rows_per_request,
            cfg.key_column,
            limit=cfg.total_requests,
            contract=contract,
            oip=bool(cfg.model),
        ),
        stop,
    )
