"""Gradient telemetry: per-tensor gradient statistics over a run, kept as a history that a
reviewer can read, at a cost measured by ``benchmarks/training_overhead.py``.

What a snapshot holds, per parameter tensor: L2 norm, L∞ norm, mean, fraction of exact
zeros, count of non-finite entries, update-to-weight ratio ‖Δw‖/‖w‖ of that step, the
share of dead units (units whose gradient is exactly zero in every entry: a row of a
weight, one per output unit of a linear or convolutional layer, or an entry of a 1-D
tensor; not judged — NaN — for embedding tables, whose rows a batch does not use are zero
by design), and a histogram of log2|g| over fixed bin edges (one per octave, no min/max
reduction).

When the gradient is read: after ``backward()`` and — where a loss scaler is used —
after ``GradScaler.unscale_(optimizer)``, and *before* ``clip_grad_norm_``: the
statistics describe the gradient the loss produced, in its true units, not the scaled
one (×2^16 under fp16 loss scaling) nor the clipped one (whose norm is just the clip
threshold). ``TrainingRun`` (``pipeline.train.loop``) has no loss scaler (bf16 autocast
needs none) and calls ``capture_grads()`` between ``backward()`` and the clip; a loop with
one calls it after ``unscale_`` (tests/unit/test_telemetry.py checks both against plain
PyTorch).

Cost: on a snapshot step the training thread only copies (the gradients, and the weights
before and after the step, each flattened into a preallocated buffer row, one call each).
The pending buffer has room for the whole history and one more (``max_history`` + 1
snapshots, fewer when they would pass ``flush_elements``), so when the history thins —
at most ``max_history`` are kept: a full history keeps every other snapshot and doubles
``snapshot_every``, so it stays evenly spaced wherever the run stops — the snapshots it
drops are raw copies whose statistics are never computed. ``flush()`` — whenever the
history is read (a training state, the artifacts, the end), and when a big model fills
the buffer — computes the statistics of the pending snapshots together (``_grad_stats``:
a fixed number of passes over the [K, N] copies whatever K; the log2|g| octave read from
the float32 exponent bits, exactly, with one ``bincount``; per-tensor sums by one one-hot
matmul on small models; maxima and dead units on each tensor's own columns) and copies
them to the host once. The cadence is the loop's (``telemetry_cadence``: first a rate of
256 snapshots over the run's budget, at most 64 kept).

Where it goes: ``write_artifacts`` (end of training and every stop/divergence event)
writes ``telemetry/<tag>/`` on the run: ``gradients.npz`` (every snapshot kept; ``steps``
is the real step of each), ``norms.png`` (L2 norm per tensor over steps:
``norm_series``), ``histograms.png`` (log2|g| heat map per tensor over steps, one column
per snapshot spanning its real steps: ``heatmap_grid``) and ``summary.json`` (cadence,
final update ratio, and ``events``: spikes, vanishing gradients, dead units —
``detect_events``). At ``close()`` at most ``metric_points`` snapshots, evenly spaced,
become run metrics (``grad/<tensor>/<stat>``, ``train/<scalar>``): a bounded queue and a
background thread send one ``MlflowClient.log_batch`` per snapshot with bounded retries;
a record that finds the queue full, or still fails after its retries, is appended to a
local spill file (JSON lines), logged to the run's artifacts at close — or, if MLflow is
down then too, left on disk and named in the report. Nothing is dropped silently:
``close()`` counts sent + spilled (+ in flight at close) = ``metric_records``.
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

STAT_NAMES = ("l2", "linf", "mean", "frac_zero", "nonfinite", "update_ratio", "dead_units")
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


def segment_ids(sizes: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """[sum(sizes)] int64: the index of the tensor each entry of the flattened tensors
    belongs to (what the fused statistics reduce over)."""
    return torch.repeat_interleave(
        torch.arange(len(sizes), device=device), torch.as_tensor(list(sizes), device=device)
    )


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


ONE_HOT_MAX = 1 << 22  # segment sums by a dense [N, P] one-hot matmul up to this many entries
EXP_SLOTS = 257  # exact zero, then the 255 float32 exponents (denormals first), non-finite


class Segments:
    """How P tensors lie in their concatenation: per-tensor sums of [K, N] rows by one
    matmul with a one-hot [N, P] (small models: one BLAS call), else ``index_add``;
    per-tensor and per-unit maxima on each tensor's own columns (a view, no copy)."""

    def __init__(
        self,
        sizes: Sequence[int],
        device: torch.device | str = "cpu",
        units: Sequence[int] | None = None,
    ) -> None:
        self.p, self.n = len(sizes), int(sum(sizes))
        self.ids = segment_ids(sizes, device)
        self.lengths = torch.as_tensor(list(sizes), device=device)
        self.counts = self.lengths.float().clamp_min(1)
        self.one_hot = (
            torch.nn.functional.one_hot(self.ids, self.p).float()
            if self.n * self.p <= ONE_HOT_MAX
            else None
        )
        # units per tensor (``unit_counts``): each tensor's entries split into that many
        # equal rows, in order; 0 = not judged. Default: every entry is a unit.
        units = list(sizes) if units is None else [int(u) for u in units]
        if len(units) != self.p or any(
            u < 0 or (u and n % u) for u, n in zip(units, sizes, strict=True)
        ):
            raise ValueError(f"units {units} do not split tensors of sizes {list(sizes)}")
        starts = np.concatenate([[0], np.cumsum(list(sizes), dtype=np.int64)]).tolist()
        # (first column, entries, units) per tensor: what ``max_and_dead`` reduces over
        self.blocks = [
            (int(starts[j]), int(n), int(u))
            for j, (n, u) in enumerate(zip(sizes, units, strict=True))
        ]
        self._offsets: dict[tuple[int, int], torch.Tensor] = {}  # bin_offsets, the last one

    def bin_offsets(self, k: int, width: int) -> torch.Tensor:
        """[k, N] int32: where each entry's histogram of ``width`` bins starts in the flat
        [k, P, width] count (snapshot × tensor), cached per (k, width)."""
        key = (k, width)
        if key not in self._offsets:
            if k * self.p * width >= 2**31:
                raise ValueError(f"{k} snapshots x {self.p} tensors x {width} bins overflow int32")
            rows = torch.arange(k, device=self.ids.device, dtype=torch.int32) * (self.p * width)
            self._offsets = {key: (self.ids.to(torch.int32) * width)[None, :] + rows[:, None]}
        return self._offsets[key]

    def max_and_dead(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[K, N] magnitudes -> ([K, P] per-tensor maxima (0 for an empty tensor), [K, P]
        the share of each tensor's units whose entries are all exactly zero, NaN for a
        tensor whose units are not judged). A unit is dead when the sum of its magnitudes
        is 0 (a sum of non-negative numbers is 0 only when each is), which reduces faster
        than a maximum over each unit's short row."""
        k = a.shape[0]
        zero = a.new_zeros(k)
        nan = a.new_full((k,), float("nan"))
        peaks, dead = [], []
        for start, n, u in self.blocks:
            if n == 0:
                peaks.append(zero)
                dead.append(nan)
                continue
            cols = a[:, start : start + n]  # a view: this tensor's columns
            peaks.append(cols.amax(-1))
            if u:
                per_unit = cols.reshape(k, u, n // u).sum(-1)  # [K, units]
                dead.append((per_unit == 0).sum(-1) / u)
            else:
                dead.append(nan)
        return torch.stack(peaks, -1), torch.stack(dead, -1)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """[K, N] -> [K, P] per-tensor sums."""
        if self.one_hot is not None:
            return x @ self.one_hot
        return torch.zeros(x.shape[0], self.p, device=x.device).index_add_(1, self.ids, x)


def unit_counts(named_params: Sequence[tuple[str, torch.Tensor]], sparse: set[str]) -> list[int]:
    """Units per tensor, for ``Segments(units=…)``: the first dimension of a weight of two
    or more dimensions (an output unit of a linear layer, an output map of a convolution), each
    entry of a 1-D tensor; 0 for the names in ``sparse`` (embedding tables) and scalars."""
    out = []
    for name, t in named_params:
        if name in sparse or t.dim() == 0:
            out.append(0)
        else:
            out.append(int(t.shape[0]) if t.numel() else 0)
    return out


def sparse_parameters(model: torch.nn.Module) -> set[str]:
    """Names of the parameters of the model's embedding tables (``nn.Embedding``,
    ``nn.EmbeddingBag``): rows a batch does not look up get no gradient by design."""
    kinds = (torch.nn.Embedding, torch.nn.EmbeddingBag)
    return {
        f"{mod_name}.{p_name}" if mod_name else p_name
        for mod_name, mod in model.named_modules()
        if isinstance(mod, kinds)
        for p_name, _ in mod.named_parameters(recurse=False)
    }


def _octave_fold(lo: float, bins: int, device: torch.device) -> torch.Tensor | None:
    """For one bin per octave with an integer ``lo`` inside float32's range: the histogram
    bin of each float32 exponent slot 1..255 (``EXP_SLOTS``), else None."""
    if not (float(lo).is_integer() and -126 < lo and lo + bins <= 128):
        return None
    # slot s = biased exponent + 1 holds floor(log2|g|) = s - 128 (slot 1: denormals, < 2^-126)
    return (torch.arange(1, EXP_SLOTS - 1, device=device) - 128 - int(lo)).clamp_(0, bins - 1)


@torch.no_grad()
def _grad_stats(
    g: torch.Tensor,
    seg: Segments,
    lo: float = LOG2_MIN,
    hi: float = LOG2_MAX,
    bins: int = BINS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """([K, P, 5 + bins] l2, linf, mean, frac_zero, nonfinite, histogram of log2|g|;
    [K, P] dead-unit shares) for K snapshots of the P tensors' gradients concatenated
    (``g``: [K, N]). A fixed, small number of passes over ``g`` and no device sync.

    With one bin per octave (the default edges) the bin is read from the float32 bits:
    floor(log2|g|) is the exponent, exactly (no log2, no rounding at powers of two); one
    ``bincount`` counts the exponent slots per (snapshot, tensor) — exact zeros and
    non-finite entries are slots of their own — and the slots fold into the bins on the
    small [K, P, 257] count. Other edges take log2 (``hi - lo`` bins of equal width)."""
    g = g.float().contiguous()
    k, p = g.shape[0], seg.p
    fold = _octave_fold(lo, bins, g.device) if hi - lo == bins else None
    if fold is not None:
        bits = g.view(torch.int32).bitwise_and(0x7FFFFFFF)  # |g|, as its bits
        a = bits.view(torch.float32)
        key = bits >> 23  # the biased exponent: 0 zero or denormal, 255 inf or NaN
        key.add_(bits.clamp(max=1)).add_(seg.bin_offsets(k, EXP_SLOTS))  # slot 0: exact 0
        slots = torch.bincount(key.view(-1), minlength=k * p * EXP_SLOTS)
        slots = slots.view(k, p, EXP_SLOTS).float()
        hist = torch.zeros(k, p, bins, device=g.device).index_add_(2, fold, slots[..., 1:-1])
        zeros, nonfinite = slots[..., 0], slots[..., -1]
    else:
        w = bins + 2
        a = g.abs()
        x = torch.log2(a).sub_(lo).mul_(bins / (hi - lo))
        b = x.floor_().clamp_(0, bins - 1).to(torch.int32)  # zeros and non-finite: masked next
        b.masked_fill_(a == 0, bins).masked_fill_(torch.isfinite(g).logical_not_(), bins + 1)
        b.add_(seg.bin_offsets(k, w))  # in place, int32: the [K, N] index arrays are the cost
        h = torch.bincount(b.view(-1), minlength=k * p * w).view(k, p, w).float()
        hist, zeros, nonfinite = h[..., :bins], h[..., bins], h[..., bins + 1]
    n = seg.counts
    peak, dead = seg.max_and_dead(a)
    head = torch.stack([seg.sum(g * g).sqrt_(), peak, seg.sum(g).div_(n), zeros / n, nonfinite], -1)
    return torch.cat([head, hist], -1), dead


def _pack(rows: torch.Tensor, ratios: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """[K, P, N_STATS + BINS] in ``STAT_NAMES`` order from ``_grad_stats`` rows [K, P,
    5 + BINS], the update ratios [K, P] and the dead-unit shares [K, P]."""
    return torch.cat([rows[..., :5], ratios[..., None], dead[..., None], rows[..., 5:]], -1)


@torch.no_grad()
def batched_update_ratios(after: torch.Tensor, before: torch.Tensor, seg: Segments) -> torch.Tensor:
    """[K, P] ‖w_after − w_before‖ / ‖w_before‖ per tensor from [K, N] flattened weights."""
    d = after - before
    return seg.sum(d.mul_(d)).sqrt_() / (seg.sum(before * before).sqrt_() + 1e-12)


def gradient_stats(
    grads: list[torch.Tensor], lo: float = LOG2_MIN, hi: float = LOG2_MAX, bins: int = BINS
) -> torch.Tensor:
    """[P, 5 + bins] float32 on the device: l2, linf, mean, frac_zero, nonfinite, histogram
    (``_grad_stats`` of one snapshot). The histogram counts the finite non-zero entries
    by log2|g| over ``bins`` equal bins of [lo, hi]; values outside go to the end bins."""
    flat = _flat(grads)
    seg = Segments([t.numel() for t in grads], flat.device)
    return _grad_stats(flat[None], seg, lo, hi, bins)[0][0]


def update_ratios(params: Sequence[torch.Tensor], before: Sequence[torch.Tensor]) -> torch.Tensor:
    """[P] ‖w_after − w_before‖ / ‖w_before‖ on the device."""
    after = _flat(params)
    seg = Segments([t.numel() for t in params], after.device)
    return batched_update_ratios(after[None], _flat(before)[None], seg)[0]


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
    """Snapshots of per-tensor gradient statistics, kept as a history, sent without blocking.

    Per snapshot step the loop calls ``capture_grads()`` after ``backward()`` (after the
    loss scaler's ``unscale_``, before clipping) and ``capture_update(step, scalars)``
    after ``optimizer.step()``. Both only copy (the gradients, the weights before and
    after, flattened); a history over ``max_history`` thins (``_thin``) before any
    statistics are computed, and the statistics of the pending snapshots are computed
    together, batched, by ``flush()`` — whenever the history is read, and when the buffer
    is full. The lower-level ``device_pack()`` + ``ingest()`` do one snapshot at once (one
    flat device tensor to read with anything else).
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
        metric_points: int = 64,
        flush_elements: int = 1 << 20,
        sparse: set[str] | frozenset[str] = frozenset(),
    ) -> None:
        if min(snapshot_every, queue_size, metric_points) < 1 or retries < 0 or max_history < 2:
            raise ValueError(
                "snapshot_every, queue_size, metric_points >= 1; retries >= 0; max_history >= 2"
            )
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self._tensors: list[torch.Tensor] = list(self.params)  # the same, typed as tensors
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
        # Which statistics become run metrics (each value costs ~0.5 ms of sender CPU on the
        # embedded SQLite store); every statistic and the histograms are in gradients.npz.
        self.metric_stats = tuple(metric_stats)
        # The run metrics are at most metric_points snapshots of the history, evenly spaced
        # (the last one always), sent at close: the step loop never pays for them.
        self.metric_points = metric_points
        dev = self.params[0].device if self.params else torch.device("cpu")
        # dead units are not judged on ``sparse`` tensors (``sparse_parameters``: embeddings)
        self._seg = Segments(
            [q.numel() for q in self.params], dev, unit_counts(named_params, set(sparse))
        )
        self._numel = self._seg.n
        # one kernel copies all the tensors, flattened, into a buffer row (``_chunk_cat``:
        # float32 tensors of one or more dimensions on one device, none empty); else one
        # ``cat`` of their flat views
        self._one_call = hasattr(torch, "_chunk_cat") and all(
            q.dtype == torch.float32 and q.dim() >= 1 and q.numel() > 0 and q.device == dev
            for q in self.params
        )
        # Pending snapshots (raw copies): room for the whole history and one more, so a
        # history that thins drops raw copies, never computed statistics (fewer for a big
        # model: flush_elements per buffer, then a full buffer is flushed).
        self._flush_k = max(1, min(max_history + 1, flush_elements // max(self._numel, 1)))
        self.edges = hist_edges()
        self.steps: list[int] = []
        self.stats: list[np.ndarray] = []  # [P, N_STATS] each
        self.hists: list[np.ndarray] = []  # [P, BINS] each
        self.scalars: list[dict[str, float]] = []  # loss, lr, grad_norm at each snapshot
        self.taken = 0
        self.taken_before_resume = 0
        self.artifact_log: list[dict[str, Any]] = []  # one record per write_artifacts
        # The pending snapshots' copies: [3 (grads, weights before, after), K, N], and its
        # rows ([1, N] views), each filled by one call (``_copy_into``).
        self._buf: torch.Tensor | None = None
        self._rows: list[tuple[torch.Tensor, ...]] = []
        self._pending: list[tuple[int, dict[str, float | torch.Tensor]]] = []  # step, scalars
        self._captured = False
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

    def _copy_into(self, j: int, tensors: list[torch.Tensor]) -> None:
        """``tensors`` (one per parameter), flattened and concatenated, into the next
        pending row of buffer ``j`` (0 gradients, 1 weights before the step, 2 after)."""
        if self._buf is None:
            dev = self.params[0].device
            self._buf = torch.zeros(3, self._flush_k, self._numel, device=dev, dtype=torch.float32)
            self._rows = [self._buf[i].split(1) for i in range(3)]
        row = self._rows[j][len(self._pending)]
        if self._one_call:
            torch._chunk_cat(tensors, 0, 1, out=row)
        else:
            torch.cat([t.reshape(1, -1) for t in tensors], 1, out=row)

    @torch.no_grad()
    def capture_grads(self) -> None:
        """Copy the gradients as they are now: call it after ``backward()`` — and after
        ``GradScaler.unscale_(optimizer)`` when a loss scaler is used — and before
        ``clip_grad_norm_`` (see the module docstring); and the weights, for the update
        ratio. Two copies into preallocated buffer rows, one call each: nothing else."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        self._copy_into(0, grads)
        self._copy_into(1, self._tensors)  # no_grad: a plain copy, no detach needed
        self._captured = True

    @torch.no_grad()
    def capture_update(self, step: int, scalars: dict[str, float | torch.Tensor]) -> None:
        """After ``optimizer.step()``: the snapshot of ``step`` is complete (its statistics
        are computed at the next ``flush()``: when the history is read, or by itself when
        the buffer is full). ``scalars`` (loss, lr, …) may be device tensors: they are read
        with the statistics, in the same copy."""
        assert self._captured, "capture_grads() first"
        self._copy_into(2, self._tensors)
        self._pending.append((int(step), scalars))
        self._captured = False
        self.taken += 1
        if len(self.steps) + len(self._pending) > self.max_history:
            self._thin()  # before any statistics: a dropped snapshot costs none
        if len(self._pending) >= self._flush_k:
            self.flush()

    def _thin(self) -> None:
        """Keep every other snapshot of the history (computed, then pending, in step
        order), the newest always, and snapshot half as often from now on: the history
        stays evenly spaced, between max_history/2 and max_history snapshots wherever the
        run stops. Dropped pending snapshots are raw copies: the kept ones move up in the
        buffer (one copy), their statistics still to compute."""
        c, total = len(self.steps), len(self.steps) + len(self._pending)
        keep = [*range(0, total - 1, 2), total - 1]
        done = [i for i in keep if i < c]
        self.steps = [self.steps[i] for i in done]
        self.stats = [self.stats[i] for i in done]
        self.hists = [self.hists[i] for i in done]
        self.scalars = [self.scalars[i] for i in done]
        rows = [i - c for i in keep if i >= c]
        if rows != list(range(len(rows))):
            assert self._buf is not None
            self._buf[:, : len(rows)] = self._buf[:, torch.as_tensor(rows, device=self._buf.device)]
        self._pending = [self._pending[i] for i in rows]
        self.snapshot_every *= 2

    @torch.no_grad()
    def flush(self) -> None:
        """The statistics of every pending snapshot, in one batched computation and one
        device→host copy, into the history."""
        if not self._pending:
            return
        assert self._buf is not None
        pend, self._pending = self._pending, []
        k, p = len(pend), len(self.params)
        rows, dead = _grad_stats(self._buf[0, :k], self._seg)
        ratios = batched_update_ratios(self._buf[2, :k], self._buf[1, :k], self._seg)
        packed = _pack(rows, ratios, dead)
        dev_keys = [
            (i, n) for i, x in enumerate(pend) for n, v in x[1].items() if torch.is_tensor(v)
        ]
        parts = [packed.reshape(-1)]
        if dev_keys:
            parts.append(torch.stack([pend[i][1][n].detach().float() for i, n in dev_keys]))  # type: ignore[union-attr]
        host = torch.cat(parts).cpu().numpy()
        width = p * (N_STATS + BINS)
        read = dict(zip(dev_keys, host[k * width :].tolist(), strict=True))
        for i, (step, sc) in enumerate(pend):
            vals = {n: read[(i, n)] if torch.is_tensor(v) else float(v) for n, v in sc.items()}
            self._append(step, host[i * width : (i + 1) * width], vals)

    def snapshot_now(self, step: int, scalars: dict[str, float] | None = None) -> None:
        """An out-of-schedule snapshot of the gradients as they are now (at a stop or a
        divergence); there is no update to measure, so update_ratio is NaN."""
        self._captured = False  # a capture without its update: not a snapshot
        self.flush()
        if not any(p.grad is not None for p in self.params):
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        rows, dead = _grad_stats(_flat(grads)[None], self._seg)
        nan = torch.full(rows.shape[:2], float("nan"), device=rows.device)
        packed = _pack(rows, nan, dead).reshape(-1)
        self.ingest(step, packed.cpu().numpy(), scalars)

    def device_pack(self) -> torch.Tensor:
        """One snapshot at once: one flat float32 device tensor, per tensor [l2, linf, mean,
        frac_zero, nonfinite, update_ratio, dead_units, hist...]. Call after the optimizer
        step."""
        assert self._captured and self._buf is not None, "capture_grads() first"
        r = len(self._pending)
        rows, dead = _grad_stats(self._buf[0, r : r + 1], self._seg)
        after = _flat(self.params)[None]
        ratios = batched_update_ratios(after, self._buf[1, r : r + 1], self._seg)
        self._captured = False
        return _pack(rows, ratios, dead).reshape(-1)

    def ingest(
        self, step: int, values: np.ndarray, scalars: dict[str, float] | None = None
    ) -> None:
        """Record a host copy of ``device_pack()`` (and the step's scalars) in the history."""
        self.taken += 1
        self._append(step, values, scalars)

    def _append(
        self, step: int, values: np.ndarray, scalars: dict[str, float] | None = None
    ) -> None:
        m = np.asarray(values, dtype=np.float32).reshape(len(self.params), N_STATS + BINS)
        self.steps.append(int(step))
        self.stats.append(m[:, :N_STATS].copy())
        self.hists.append(m[:, N_STATS:].copy())
        self.scalars.append({k: float(v) for k, v in (scalars or {}).items()})
        if len(self.steps) + len(self._pending) > self.max_history:
            self._thin()

    def _metric_records(self) -> list[_Record]:
        """At most ``metric_points`` snapshots of the history (evenly spaced, the last one
        always) as run metrics: ``grad/<tensor>/<stat>``, ``grad/nonfinite_total``,
        ``train/<scalar>``."""
        n = len(self.steps)
        pick = sorted({round(i) for i in np.linspace(0, n - 1, min(n, self.metric_points))})
        nf = STAT_NAMES.index("nonfinite")
        out = []
        for j in pick if n else []:
            m = self.stats[j]
            metrics = {
                f"grad/{name}/{s}": float(m[i, STAT_NAMES.index(s)])
                for i, name in enumerate(self.names)
                for s in self.metric_stats
            }
            metrics["grad/nonfinite_total"] = float(m[:, nf].sum())
            metrics.update({f"train/{k}": v for k, v in self.scalars[j].items()})
            out.append(_Record(self.steps[j], metrics))
        return out

    # -- what the history says ----------------------------------------------------------------

    def gradient_events(self) -> list[dict[str, Any]]:
        """Spikes, vanishing gradients and dead units in the kept history (``detect_events``)."""
        a = self.arrays()
        return detect_events(a["steps"], a["stats"], [str(n) for n in a["names"]])

    def health(self) -> dict[str, Any]:
        """The history in a few numbers: snapshots, their steps and cadence, the final update
        ratio (median over tensors of the last snapshot that has one), the events."""
        a = self.arrays()
        steps, stats = a["steps"], a["stats"]
        ratio = None
        for row in stats[::-1]:
            r = row[:, STAT_NAMES.index("update_ratio")]
            if np.isfinite(r).any():
                ratio = float(np.nanmedian(r))
                break
        return {
            "snapshot_every": self.snapshot_every,
            "metric_points": self.metric_points,
            "kept": int(len(steps)),
            "first_step": int(steps[0]) if len(steps) else None,
            "last_step": int(steps[-1]) if len(steps) else None,
            "final_update_ratio": ratio,
            "events": self.gradient_events(),
        }

    # -- artifacts --------------------------------------------------------------------------

    def arrays(self) -> dict[str, np.ndarray]:
        self.flush()
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
                    {
                        "tag": tag,
                        "snapshots": int(len(arrays["steps"])),
                        **self.health(),
                        **(summary or {}),
                    },
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
            self.artifact_log.append(where)
            shutil.rmtree(tmp, ignore_errors=True)

    # -- shutdown and accounting ------------------------------------------------------------

    def close(self, timeout_s: float = 10.0) -> dict[str, Any]:
        """Flush the sender (bounded), log the spill file if any, and report the tally."""
        if self._closed is not None:
            return self._closed
        self.flush()
        records = self._metric_records() if self._sender else []
        for rec in records:  # the sender drains them while close() waits (bounded)
            if not self._sender.offer(rec):  # type: ignore[union-attr]
                self.spill.write(rec, reason="queue_full")
        in_flight = self._sender.close(timeout_s) if self._sender else 0
        rep: dict[str, Any] = {
            # sent + spilled + lost + in flight = metric_records (<= metric_points)
            "snapshots": self.taken,
            "metric_records": len(records),
            "snapshots_before_resume": self.taken_before_resume,
            "sent": self._sender.sent if self._sender else 0,
            "spilled": self.spill.count,
            "lost": self.spill.lost,
            "in_flight_at_close": in_flight,
            "sender_cpu_s": round(self._sender.cpu_s, 4) if self._sender else 0.0,
            "send_failures": (self._sender.failures[-5:] if self._sender else []),
            "artifacts": self.artifact_log,
            "health": self.health(),
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
        stats = t["telemetry.stats"]
        if stats.dim() != 3 or stats.shape[1:] != (len(self.params), N_STATS):
            log.warning(
                "training state's telemetry history has shape %s, not [T, %d, %d] (written by "
                "another version): the history restarts at the resumed step",
                tuple(stats.shape),
                len(self.params),
                N_STATS,
            )
            self.taken = self.taken_before_resume = taken
            return
        self.steps = [int(s) for s in t["telemetry.steps"].tolist()]
        self.stats = list(t["telemetry.stats"].numpy())
        self.hists = list(t["telemetry.hist"].numpy())
        self.scalars = [{} for _ in self.steps]  # the run metrics of those steps: grad/ only
        self.taken = self.taken_before_resume = taken


def load_summary(run_id: str, client: Any, tag: str = "final") -> dict[str, Any] | None:
    """``telemetry/<tag>/summary.json`` of an MLflow run (snapshots, cadence, final update
    ratio, events, and the stop's decision), or None when the run has none."""
    try:
        with tempfile.TemporaryDirectory(prefix="telemetry-summary-") as tmp:
            path = client.download_artifacts(run_id, f"telemetry/{tag}/summary.json", tmp)
            loaded = json.loads(Path(path).read_text())
    except Exception as exc:  # noqa: BLE001 - an absent artifact is MlflowException/OSError
        log.info("run %s has no telemetry/%s/summary.json: %s", run_id, tag, exc)
        return None
    return loaded if isinstance(loaded, dict) else None


SPIKE_FACTOR = 10.0  # a tensor's L2 norm this many times the median of its earlier snapshots
VANISH_BELOW = 1e-7  # a tensor's L2 norm under this at its last two snapshots
DEAD_FRACTION = 0.5  # a tensor with at least this share of dead units (no gradient at all) ...
MIN_SNAPSHOTS = 4  # fewer snapshots: nothing is judged
SPIKE_WINDOW = 16  # a spike is judged against the median of this many earlier snapshots
SPIKE_FLOOR = 0.1  # ... but never below this share of the whole model's median norm there


def detect_events(
    steps: np.ndarray,
    stats: np.ndarray,
    names: Sequence[str],
    *,
    spike_factor: float = SPIKE_FACTOR,
    vanish_below: float = VANISH_BELOW,
    dead_fraction: float = DEAD_FRACTION,
    min_snapshots: int = MIN_SNAPSHOTS,
) -> list[dict[str, Any]]:
    """Per tensor, from a history ``stats[snapshot, tensor, STAT_NAMES]`` at ``steps``:

    * ``spike``: the first snapshot whose L2 norm exceeds ``spike_factor`` × the median of
      that tensor's ``SPIKE_WINDOW`` earlier snapshots, that median floored at
      ``SPIKE_FLOOR`` × the whole model's median norm over them (a tensor whose gradient
      is a small part of the model's, a softmax bias say, is noise around zero: a tenfold
      jump from there is not a spike);
    * ``vanishing``: the L2 norm is below ``vanish_below`` at the last two snapshots;
    * ``dead_units``: the share of dead units (``dead_units``: units whose whole row of
      gradient is exactly zero, no signal reaches them) ≥ ``dead_fraction`` at the last two
      snapshots. Counted per unit, not per entry: a weight column that is zero because an
      input is constant zero (blank pixels) is not a dead unit.

    Each event: ``{"kind", "tensor", "step", "value", "threshold"}``."""
    out: list[dict[str, Any]] = []
    if len(steps) < min_snapshots:
        return out
    l2 = stats[:, :, STAT_NAMES.index("l2")].astype(np.float64)
    dead = stats[:, :, STAT_NAMES.index("dead_units")].astype(np.float64)

    def ev(kind: str, i: int, j: int, value: float, threshold: float) -> dict[str, Any]:
        return {
            "kind": kind,
            "tensor": str(names[j]),
            "step": int(steps[i]),
            "value": float(value),
            "threshold": float(threshold),
        }

    total = np.sqrt(np.nansum(l2 * l2, axis=1))
    for j in range(l2.shape[1]):
        col = l2[:, j]
        for i in range(min_snapshots - 1, len(col)):
            lo = max(0, i - SPIKE_WINDOW)
            prev, prev_total = col[lo:i], total[lo:i]
            prev = prev[np.isfinite(prev)]
            med = float(np.median(prev)) if len(prev) else 0.0
            med = max(med, SPIKE_FLOOR * float(np.median(prev_total)))
            if med > 0 and np.isfinite(col[i]) and col[i] > spike_factor * med:
                out.append(ev("spike", i, j, col[i], spike_factor * med))
                break
        if (col[-2:] < vanish_below).all():
            out.append(ev("vanishing", len(col) - 1, j, col[-1], vanish_below))
        elif (dead[-2:, j] >= dead_fraction).all():  # NaN (not judged) compares False
            out.append(ev("dead_units", len(col) - 1, j, dead[-1, j], dead_fraction))
    return out


def norm_series(a: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """What ``norms.png`` draws: (steps [T], L2 norm [T, P]); zeros become NaN (log axis)."""
    y = a["stats"][:, :, STAT_NAMES.index("l2")].astype(np.float64)
    return a["steps"], np.where(y > 0, y, np.nan)


def heatmap_grid(a: dict[str, np.ndarray], i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What ``histograms.png`` draws for tensor ``i``: (step edges [T+1], log2|g| bin edges
    [BINS+1], share of entries [BINS, T]). Column t spans the steps halfway to its
    neighbours, so the x axis is the real steps, however uneven the snapshots."""
    steps = a["steps"].astype(np.float64)
    if len(steps) == 1:
        x = np.array([steps[0] - 0.5, steps[0] + 0.5])
    else:
        mid = (steps[1:] + steps[:-1]) / 2
        x = np.concatenate([[2 * steps[0] - mid[0]], mid, [2 * steps[-1] - mid[-1]]])
    h = a["hist"][:, i, :].T.astype(np.float64)
    return x, a["edges"], h / np.maximum(h.sum(axis=0, keepdims=True), 1)


def _short(name: str) -> str:
    return name.removeprefix("net.")


def _plot_norms(a: dict[str, np.ndarray], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    steps, norms = norm_series(a)
    for i, name in enumerate(a["names"]):
        ax.plot(
            steps, norms[:, i], marker="." if len(steps) < 16 else None, label=_short(str(name))
        )
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
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        x, edges, h = heatmap_grid(a, i)
        ax.pcolormesh(x, edges, h, cmap="viridis", shading="flat")
        ax.set_title(_short(str(name)), fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.set_ylabel("log2|g|", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.suptitle("Gradient log2|g| histogram over steps (fraction of entries)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
