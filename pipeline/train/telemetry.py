"""Gradient telemetry: per-tensor gradient statistics, computed on the device, shipped off
the training thread.

Every ``snapshot_every`` steps, for each parameter tensor: L2 norm, L∞ norm, mean,
fraction of exact zeros, count of non-finite entries, update-to-weight ratio
‖Δw‖/‖w‖ of that step, and a histogram of log2|g| over fixed bin edges (``torch.histc``
with a fixed range: no min/max reduction, no device sync). All of it is packed into
one tensor and copied to the host once per snapshot.

The host side never blocks training: snapshots go into a bounded queue; a background
thread sends one ``MlflowClient.log_batch`` per snapshot with bounded retries. A
snapshot that finds the queue full, or that still fails after its retries, is appended
to a local spill file (JSON lines), which is logged to the run's artifacts at close —
or, if MLflow is down then too, left on disk and named in the report. Nothing is
dropped silently: ``report()`` counts sent + spilled (+ in flight at close) = taken.

``write_artifacts`` (end of training and every stop/divergence event) writes
``gradients.npz`` (every snapshot kept), ``norms.png`` (L2 norm per tensor over steps)
and ``histograms.png`` (log2|g| heat map per tensor over steps).
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

log = logging.getLogger(__name__)

STAT_NAMES = ("l2", "linf", "mean", "frac_zero", "nonfinite", "update_ratio")
N_STATS = len(STAT_NAMES)
LOG2_MIN, LOG2_MAX, BINS = -40.0, 8.0, 48  # one bin per octave; outside values go to the end bins


def hist_edges(lo: float = LOG2_MIN, hi: float = LOG2_MAX, bins: int = BINS) -> np.ndarray:
    return np.linspace(lo, hi, bins + 1)


class TelemetrySink(Protocol):
    """Where telemetry and training records go (an MLflow run in the pipeline)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifacts(self, local_dir: str, artifact_path: str) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...


class MlflowRunSink:
    """A TelemetrySink over one existing MLflow run."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client, self.run_id = client, run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), ts, int(step)) for k, v in metrics.items()]
        )

    def log_artifacts(self, local_dir: str, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, local_dir, artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))


# -- the device side -----------------------------------------------------------------------


@torch.no_grad()
def gradient_stats(
    grads: list[torch.Tensor], lo: float = LOG2_MIN, hi: float = LOG2_MAX, bins: int = BINS
) -> torch.Tensor:
    """[P, 5 + bins] float32 on the device: l2, linf, mean, frac_zero, nonfinite, histogram.

    The histogram counts the finite non-zero entries by log2|g| over ``bins`` equal bins
    of [lo, hi]; values outside the range are clamped into the end bins."""
    rows = []
    for g in grads:
        g = g.detach().float().reshape(-1)
        finite = torch.isfinite(g)
        a = g.abs()
        nz = finite & (a > 0)
        x = torch.where(nz, torch.log2(torch.where(nz, a, 1.0)).clamp(lo, hi), lo - 1.0)
        n = max(g.numel(), 1)
        head = torch.stack(
            [
                torch.linalg.vector_norm(g),
                a.max() if g.numel() else g.new_zeros(()),
                g.mean() if g.numel() else g.new_zeros(()),
                (g == 0).sum() / n,
                (~finite).sum(),
            ]
        ).float()
        rows.append(torch.cat([head, torch.histc(x, bins=bins, min=lo, max=hi)]))
    return torch.stack(rows)


@torch.no_grad()
def update_ratios(params: Sequence[torch.Tensor], before: Sequence[torch.Tensor]) -> torch.Tensor:
    """[P] ‖w_after − w_before‖ / ‖w_before‖ on the device."""
    out = [
        torch.linalg.vector_norm(p.detach().float() - b) / (torch.linalg.vector_norm(b) + 1e-12)
        for p, b in zip(params, before, strict=True)
    ]
    return torch.stack(out)


# -- the host side ----------------------------------------------------------------------------


@dataclass
class _Record:
    step: int
    metrics: dict[str, float]


class _Sender:
    """Bounded queue + one daemon thread: one ``log_metrics`` (= one log_batch) per record."""

    def __init__(
        self, sink: TelemetrySink, spill: _Spill, maxsize: int, retries: int, backoff_s: float
    ) -> None:
        self.sink, self.spill = sink, spill
        self.q: queue.Queue[_Record | None] = queue.Queue(maxsize=maxsize)
        self.retries, self.backoff_s = retries, backoff_s
        self.sent = 0
        self.failures: list[str] = []
        self.cpu_s = 0.0  # CPU time of this thread spent sending (what logging costs)
        self._stop = threading.Event()
        self._busy = threading.Event()
        self.thread = threading.Thread(target=self._run, name="gradient-telemetry", daemon=True)
        self.thread.start()

    def offer(self, rec: _Record) -> bool:
        try:
            self.q.put_nowait(rec)
            return True
        except queue.Full:
            return False

    def _run(self) -> None:
        while not (self._stop.is_set() and self.q.empty()):
            try:
                rec = self.q.get(timeout=0.5)  # close() also wakes it with a None
            except queue.Empty:
                continue
            if rec is None:
                continue
            self._busy.set()
            try:
                self._send(rec)
            finally:
                self._busy.clear()

    def _send(self, rec: _Record) -> None:
        t0 = time.thread_time()
        try:
            self._send_with_retries(rec)
        finally:
            self.cpu_s += time.thread_time() - t0

    def _send_with_retries(self, rec: _Record) -> None:
        for attempt in range(self.retries + 1):
            try:
                self.sink.log_metrics(rec.metrics, rec.step)
                self.sent += 1
                return
            except Exception as exc:  # noqa: BLE001 - any sink failure is retried, then spilled
                err = f"step {rec.step} attempt {attempt + 1}: {type(exc).__name__}: {exc}"
                if attempt == self.retries:
                    self.failures.append(err[:300])
                    self.spill.write(rec, reason="send_failed")
                    return
                self._stop.wait(self.backoff_s * 2**attempt)  # closing: no more waiting

    def close(self, timeout_s: float) -> int:
        """Stop; whatever is still queued after ``timeout_s`` is spilled. Returns the
        number of records possibly still in flight (a send that did not return)."""
        self._stop.set()
        try:
            self.q.put_nowait(None)
        except queue.Full:
            pass  # busy sending: it will see the stop flag when the queue drains
        self.thread.join(timeout_s)
        while True:
            try:
                rec = self.q.get_nowait()
            except queue.Empty:
                break
            if rec is not None:
                self.spill.write(rec, reason="not_sent_at_close")
        return 1 if self.thread.is_alive() and self._busy.is_set() else 0


class _Spill:
    """Append-only JSON lines of records that did not reach the sink."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0
        self.lost = 0  # could not even be written locally (disk full…): logged as errors
        self._lock = threading.Lock()

    def write(self, rec: _Record, reason: str) -> None:
        line = json.dumps(
            {
                "step": rec.step,
                "reason": reason,
                "metrics": {k: (v if math.isfinite(v) else str(v)) for k, v in rec.metrics.items()},
            }
        )
        with self._lock:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a") as fh:
                    fh.write(line + "\n")
                self.count += 1
            except OSError as exc:  # never fatal to training, never silent
                self.lost += 1
                log.error(
                    "telemetry record for step %d (%s) lost: cannot write %s: %s",
                    rec.step,
                    reason,
                    self.path,
                    exc,
                )


class GradientTelemetry:
    """Snapshots of per-tensor gradient statistics, sent without blocking training.

    Per snapshot step the loop calls ``capture_grads()`` after ``backward()`` (before
    clipping), ``device_pack()`` after ``optimizer.step()`` (returns one flat device
    tensor to read together with anything else), then ``ingest(step, host_values)``.
    """

    def __init__(
        self,
        named_params: list[tuple[str, torch.nn.Parameter]],
        *,
        snapshot_every: int = 200,
        sink: TelemetrySink | None = None,
        spill_dir: Path | None = None,
        queue_size: int = 64,
        retries: int = 3,
        backoff_s: float = 0.2,
        max_history: int = 4096,
        metric_stats: tuple[str, ...] = ("l2", "update_ratio"),
    ) -> None:
        if snapshot_every < 1 or queue_size < 1 or retries < 0 or max_history < 2:
            raise ValueError("snapshot_every, queue_size >= 1; retries >= 0; max_history >= 2")
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.snapshot_every = snapshot_every
        self.sink = sink
        # Everything kept locally lives in one folder, logged to the run as telemetry/spill at
        # close (under a training-state folder it is a sibling of the step-* checkpoints).
        base = spill_dir or Path(tempfile.gettempdir()) / f"telemetry-{os.getpid()}-{id(self):x}"
        self.spill_dir = base / "telemetry-spill"
        self.spill = _Spill(self.spill_dir / "telemetry-spill.jsonl")
        self.max_history = max_history
        unknown = set(metric_stats) - set(STAT_NAMES)
        if unknown:
            raise ValueError(f"unknown telemetry statistics {sorted(unknown)}; known: {STAT_NAMES}")
        # Which statistics become run metrics (each log_batch costs ~0.3 ms per metric on the
        # embedded store); every statistic and the histograms are in gradients.npz anyway.
        self.metric_stats = tuple(metric_stats)
        self.edges = hist_edges()
        self.steps: list[int] = []
        self.stats: list[np.ndarray] = []  # [P, N_STATS] each
        self.hists: list[np.ndarray] = []  # [P, BINS] each
        self.taken = 0
        self.taken_before_resume = 0
        self.events: list[dict[str, Any]] = []
        self._grad_rows: torch.Tensor | None = None
        self._before: list[torch.Tensor] | None = None
        self._sender = _Sender(sink, self.spill, queue_size, retries, backoff_s) if sink else None
        self._closed: dict[str, Any] | None = None

    @property
    def sender_cpu_s(self) -> float:
        """CPU seconds the background sender has spent so far (what shipping costs)."""
        return self._sender.cpu_s if self._sender else 0.0

    @property
    def width(self) -> int:
        return len(self.params) * (N_STATS + BINS)

    def due(self, step: int) -> bool:
        return step % self.snapshot_every == 0

    def capture_grads(self) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        self._grad_rows = gradient_stats(grads)
        self._before = [p.detach().float().clone() for p in self.params]

    def snapshot_now(self, step: int, scalars: dict[str, float] | None = None) -> None:
        """An out-of-schedule snapshot of the gradients as they are now (at a stop or a
        divergence); there is no update to measure, so update_ratio is NaN."""
        if not any(p.grad is not None for p in self.params):
            return
        self.capture_grads()
        self._before = None
        rows = self._grad_rows
        assert rows is not None
        nan = torch.full((rows.shape[0], 1), float("nan"), device=rows.device)
        packed = torch.cat([rows[:, :5], nan, rows[:, 5:]], dim=1).reshape(-1)
        self._grad_rows = None
        self.ingest(step, packed.cpu().numpy(), scalars)

    def device_pack(self) -> torch.Tensor:
        """One flat float32 device tensor: per tensor [l2, linf, mean, frac_zero, nonfinite,
        update_ratio, hist...]. Call after the optimizer step."""
        assert self._grad_rows is not None and self._before is not None, "capture_grads() first"
        ratios = update_ratios(self.params, self._before)
        rows = torch.cat([self._grad_rows[:, :5], ratios[:, None], self._grad_rows[:, 5:]], dim=1)
        self._grad_rows = self._before = None
        return rows.reshape(-1)

    def ingest(
        self, step: int, values: np.ndarray, scalars: dict[str, float] | None = None
    ) -> None:
        """Record a host copy of ``device_pack()`` and queue it for the sink (never blocks)."""
        m = np.asarray(values, dtype=np.float32).reshape(len(self.params), N_STATS + BINS)
        self.steps.append(int(step))
        self.stats.append(m[:, :N_STATS].copy())
        self.hists.append(m[:, N_STATS:].copy())
        self.taken += 1
        if len(self.steps) > self.max_history:  # keep every other old snapshot, newest always
            keep = list(range(0, len(self.steps) - 1, 2)) + [len(self.steps) - 1]
            self.steps = [self.steps[i] for i in keep]
            self.stats = [self.stats[i] for i in keep]
            self.hists = [self.hists[i] for i in keep]
        metrics = {
            f"grad/{n}/{s}": float(m[i, STAT_NAMES.index(s)])
            for i, n in enumerate(self.names)
            for s in self.metric_stats
        }
        metrics["grad/nonfinite_total"] = float(m[:, STAT_NAMES.index("nonfinite")].sum())
        metrics.update({f"train/{k}": float(v) for k, v in (scalars or {}).items()})
        rec = _Record(int(step), metrics)
        if self._sender is None or not self._sender.offer(rec):
            if self._sender is not None:
                self.spill.write(rec, reason="queue_full")

    # -- artifacts --------------------------------------------------------------------------

    def arrays(self) -> dict[str, np.ndarray]:
        p = len(self.params)
        return {
            "steps": np.asarray(self.steps, dtype=np.int64),
            "stats": np.stack(self.stats) if self.stats else np.zeros((0, p, N_STATS), np.float32),
            "hist": np.stack(self.hists) if self.hists else np.zeros((0, p, BINS), np.float32),
            "edges": self.edges,
            "names": np.asarray(self.names),
            "stat_names": np.asarray(STAT_NAMES),
        }

    def write_artifacts(self, tag: str, summary: dict[str, Any] | None = None) -> dict[str, Any]:
        """npz + PNGs + summary.json into ``telemetry/<tag>`` of the run (into the spill dir
        if the sink fails). Without a sink nothing is written: ``arrays()`` has it all.
        Never raises: a failure is reported in the returned record and logged."""
        if self.sink is None:
            return {"tag": tag, "skipped": "no sink"}
        where: dict[str, Any] = {"tag": tag}
        tmp = Path(tempfile.mkdtemp(prefix="telemetry-"))
        try:
            arrays = self.arrays()
            np.savez_compressed(tmp / "gradients.npz", **arrays)  # type: ignore[arg-type]
            (tmp / "summary.json").write_text(
                json.dumps(
                    {"tag": tag, "snapshots": int(len(arrays["steps"])), **(summary or {})},
                    indent=2,
                    default=str,
                )
            )
            if len(arrays["steps"]):
                _plot_norms(arrays, tmp / "norms.png")
                _plot_heatmaps(arrays, tmp / "histograms.png")
            where["files"] = sorted(p.name for p in tmp.iterdir())
            try:
                self.sink.log_artifacts(str(tmp), f"telemetry/{tag}")
                where["logged_to"] = f"telemetry/{tag}"
                return where
            except Exception as exc:  # noqa: BLE001 - kept on disk and reported instead
                where["sink_error"] = f"{type(exc).__name__}: {exc}"[:300]
            dest = self.spill_dir / "artifacts" / tag
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(tmp, dest)
            where["local_dir"] = str(dest)
            log.warning("telemetry artifacts for %s kept at %s: %s", tag, dest, where["sink_error"])
            return where
        except Exception as exc:  # noqa: BLE001 - artifacts must never fail the training
            where["error"] = f"{type(exc).__name__}: {exc}"[:300]
            log.error("telemetry artifacts for %s could not be written: %s", tag, where["error"])
            return where
        finally:
            self.events.append(where)
            shutil.rmtree(tmp, ignore_errors=True)

    # -- shutdown and accounting ------------------------------------------------------------

    def close(self, timeout_s: float = 10.0) -> dict[str, Any]:
        """Flush the sender (bounded), log the spill file if any, and report the tally."""
        if self._closed is not None:
            return self._closed
        in_flight = self._sender.close(timeout_s) if self._sender else 0
        rep: dict[str, Any] = {
            # sent + spilled + lost + in flight = snapshots - snapshots_before_resume
            "snapshots": self.taken,
            "snapshots_before_resume": self.taken_before_resume,
            "sent": self._sender.sent if self._sender else 0,
            "spilled": self.spill.count,
            "lost": self.spill.lost,
            "in_flight_at_close": in_flight,
            "sender_cpu_s": round(self._sender.cpu_s, 4) if self._sender else 0.0,
            "send_failures": (self._sender.failures[-5:] if self._sender else []),
            "artifacts": self.events,
        }
        if self.spill.count and self.sink is not None:
            try:
                self.sink.log_artifacts(str(self.spill.path.parent), "telemetry/spill")
                rep["spill_logged_to"] = "telemetry/spill"
            except Exception as exc:  # noqa: BLE001 - the file stays; the report names it
                rep["spill_log_error"] = f"{type(exc).__name__}: {exc}"[:300]
        if self.spill.count:
            rep["spill_file"] = str(self.spill.path)
            log.warning(
                "gradient telemetry: %d record(s) not sent to the tracking server; kept in %s",
                self.spill.count,
                self.spill.path,
            )
        self._closed = rep
        return rep

    # -- resume ---------------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        a = self.arrays()
        return {
            "telemetry.steps": torch.from_numpy(a["steps"]),
            "telemetry.stats": torch.from_numpy(np.ascontiguousarray(a["stats"], np.float32)),
            "telemetry.hist": torch.from_numpy(np.ascontiguousarray(a["hist"], np.float32)),
        }

    def load_state_tensors(self, t: dict[str, torch.Tensor], taken: int) -> None:
        self.steps = [int(s) for s in t["telemetry.steps"].tolist()]
        self.stats = list(t["telemetry.stats"].numpy())
        self.hists = list(t["telemetry.hist"].numpy())
        self.taken = self.taken_before_resume = taken


def _short(name: str) -> str:
    return name.removeprefix("net.")


def _plot_norms(a: dict[str, np.ndarray], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for i, name in enumerate(a["names"]):
        y = a["stats"][:, i, 0]
        ax.plot(a["steps"], np.where(y > 0, y, np.nan), label=_short(str(name)))
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("gradient L2 norm")
    ax.set_title("Gradient L2 norm per tensor")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)


def _plot_heatmaps(a: dict[str, np.ndarray], path: Path) -> None:
    from matplotlib.figure import Figure

    names = list(a["names"])[:12]
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(4.2 * cols, 2.8 * rows), dpi=100)
    steps, edges = a["steps"], a["edges"]
    x1 = steps[-1] if len(steps) > 1 else steps[0] + 1
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        h = a["hist"][:, i, :].T
        h = h / np.maximum(h.sum(axis=0, keepdims=True), 1)
        ax.imshow(
            h,
            aspect="auto",
            origin="lower",
            cmap="viridis",
            extent=(steps[0], x1, edges[0], edges[-1]),
        )
        ax.set_title(_short(str(name)), fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.set_ylabel("log2|g|", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.suptitle("Gradient log2|g| histogram over steps (fraction of entries)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
