"""When to stop gradient descent: a small decision object over gradient statistics.

``GradientPlateauStopper`` combines three plateau signals and a divergence guard:

* **EB criterion** (Mahsereci, Balles, Lassner, Hennig 2017, "Early stopping without a
  validation set"): with mini-batch gradient ``g`` (batch size ``B``) and per-sample
  gradient variance ``σ̂²_k`` over the ``D`` parameters, stop when

      1 − (B/D) · Σ_k g_k² / σ̂²_k  >  0

  i.e. when the gradient is no larger than its own sampling noise. ``σ̂²`` comes exactly
  and cheaply from ``PerSampleGradStats`` (forward/backward hooks on ``nn.Linear``).
  With ``σ̂²`` estimated on the same batch, ``B g²/σ̂²`` is F(1, B−1) distributed under
  the null (mean (B−1)/(B−3), not 1), so the sum is scaled by (B−3)/(B−1): otherwise
  a pure-noise gradient sits at −2/(B−3) on average and a smoothed EB never fires.
  EB is averaged over the last ``eb_window`` measurements (it may be measured on only
  some checks: evidence without it leaves the EB signal as it was).
  Diagonal preconditioning (Adam's 1/(√v+ε)) rescales ``g_k`` and ``σ̂_k`` by the same
  factor, so this per-coordinate form is the same on the preconditioned update as on
  the raw gradient: EB needs no optimizer-specific variant. (Adam's *momentum* is not
  covered: the statistic is of the batch gradient, not of the moving average.)
  ``σ̂²`` covers every ``nn.Linear`` (weights and biases, all layers, one vector);
  parameters of other modules are not in ``D``.
* **log-gradient-norm plateau**: least-squares slope of the per-check mean of
  log‖g‖ over the last ``norm_window`` checks, per 1000 steps, below ``norm_tol`` — or,
  with ``norm_t``, not significantly non-zero (|slope| < ``norm_t`` × its standard
  error): a fixed ``norm_tol`` means a different thing on every batch size and cadence.
* **validation-loss plateau** (optional): ``patience`` epochs of validations without an
  improvement of ``val_min_delta`` — absolute, or relative to |best| (``val_mode``).

**Validations, not epochs.** The stopper sees every validation the loop runs; with
``val_per_epoch`` of them an epoch (set by the loop from ``TrainConfig.validate_every``,
``pipeline.train.loop.validation_cadence``) ``patience`` and ``val_window`` stay in
epochs: ``patience × val_per_epoch`` validations (``patience_validations``), a window
of ``val_window × val_per_epoch`` (``window_validations``). With one validation an
epoch (``val_per_epoch`` 1, the default and every older record) nothing changes.

**Gradient and validation must agree** (``val_window`` > 0, the pipeline default): a
confirmed gradient signal stops only when validation has stopped improving — the best
validation loss fell by no more than ``val_window_delta`` (default ``val_min_delta``;
relative to it in ``rel`` mode) over the last ``val_window`` epochs of validations,
together; or, with ``val_rise``, the last validation is more than ``val_rise``
(relative) above the best: Prechelt's generalization loss GL_α ("Early stopping — but
when?", 1998), the fit is past its best however recent that best is. Until then the
decision is ``continue`` / ``val_improving``; the validation that completes the plateau
stops at once if the gradient is confirmed then (reason: the gradient signal). Why: on
data the stopper was not tuned on (issue 16), an adaptive optimizer's gradient norm
settles at its noise floor epochs before the validation loss stops falling, and the
gradient rule alone cost holdout AUC; the validation set is what says the fit still
improves. Why both forms: the window is robust on a flat, noisy validation loss (the
reference data: a window shorter than an epoch "agrees" on noise and cost AUC), and
the rise reacts within a validation or two to a sharp minimum (small sets that overfit
early), where the window would wait an epoch. ``patience`` stays as the backstop for a
validation loss that rises while the training gradient is still far from noise. The
pipeline default (``pipeline.train.loop.default_stopper``): EB or ``norm_t`` 2,
``confirm`` 3, ``val_window`` 1 epoch with ``val_window_delta`` 0.3% relative,
``val_rise`` 1%, patience 3 epochs; measured by ``python -m benchmarks.plateau_stopping``
on four datasets. The divergence baseline is the lowest
window-mean norm (only the first window uses its smallest step): on near-separable
data single batches have a gradient near 0, and 1000× that is an ordinary batch.

Gradient signals are debounced: each fires after ``confirm`` consecutive fresh positive
checks, with a hysteresis band (a check neither clearly on nor clearly off holds the
count); ``require`` says whether any signal (default) or all of them must fire.
Nothing fires before ``warmup_steps`` or ``min_steps``; ``max_steps`` always stops.
With ``reduce_lr_factor`` set, the first firing(s) reduce the learning rate
(``max_lr_reductions`` times, ``cooldown_checks`` of quiet after each) and the next one
stops. Divergence is checked on every evidence: a non-finite loss or gradient stops
at once (reason ``nonfinite``); a gradient norm above ``divergence_ratio`` × the lowest
norm seen so far stops as ``diverged``.

Shape (STYLE.md item 10): a validating constructor, an Enum of reasons, one pure
``decide(evidence, state) -> StopDecision(verdict, reason, evidence)``, and
``state_dict()``/``load_state_dict()`` so a resumed run decides exactly as before.

``StopDecision`` is a ``pipeline.decisions.Decision`` (kind ``training_stop``, verdicts
``names.StopVerdict``). Every decision that is not ``continue`` is kept in
``GradientPlateauStopper.records`` as a full decision record (:func:`decision_record`:
the stopper's configuration, the evidence and the stopper state before the decision),
which :func:`replay` — and ``decisions.replay`` — recompute from the record alone.
Non-finite evidence values are written as strings (``"nan"``, ``"inf"``) in
``to_dict()`` and in records, so both are strict JSON.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any, ClassVar

import torch
from torch import nn

from pipeline import decisions
from pipeline.names import StopVerdict


class TrainingDiverged(RuntimeError):
    """Loss or gradient became non-finite or exploded: no checkpoint may come out of this run."""


class StopReason(StrEnum):
    # continue
    WARMUP = "warmup"
    BELOW_MIN_STEPS = "below_min_steps"
    COOLDOWN = "cooldown"
    NOT_PLATEAUED = "not_plateaued"
    CONFIRMING = "confirming"
    VAL_IMPROVING = "val_improving"  # the gradient has plateaued, validation has not (yet)
    # stop / reduce_lr
    EB_CRITERION = "eb_criterion"
    GRAD_NORM_PLATEAU = "grad_norm_plateau"
    VAL_LOSS_PLATEAU = "val_loss_plateau"
    MAX_STEPS = "max_steps"
    # diverged
    NONFINITE = "nonfinite"
    DIVERGED = "diverged"


@dataclass(frozen=True)
class StopEvidence:
    """What the training loop measured since the previous check (host floats).

    ``eb_sum`` is Σ_k B·g_k²/σ̂²_k over the ``eb_dims`` entries with σ̂² > 0 (from
    ``PerSampleGradStats``); ``grad_norm`` the mean pre-clip norm since the last check,
    ``log_grad_norm`` the mean of its logarithm, ``max_grad_norm`` the largest.
    ``min_grad_norm`` the smallest (the divergence baseline is the lowest norm seen).
    ``val_loss`` is set on validation evidence (every validation the loop runs: at each
    epoch's end, and within epochs at ``TrainConfig.validate_every``).
    """

    step: int
    epoch: int = 0
    loss: float | None = None
    grad_norm: float | None = None
    log_grad_norm: float | None = None
    max_grad_norm: float | None = None
    min_grad_norm: float | None = None
    nonfinite: bool = False
    eb_sum: float | None = None
    eb_dims: int = 0
    batch_size: int = 0
    val_loss: float | None = None


@dataclass(frozen=True)
class StopperState:
    checks: int = 0
    eb_values: tuple[float, ...] = ()
    log_norms: tuple[float, ...] = ()
    steps_seen: tuple[int, ...] = ()
    best_norm: float | None = None
    eb_count: int = 0
    norm_count: int = 0
    best_val: float | None = None
    bad_vals: int = 0
    val_bests: tuple[float, ...] = ()  # the running best after each of the last validations
    last_val: float | None = None  # the last validation loss
    lr_reductions: int = 0
    cooldown_left: int = 0
    stopped: bool = False


@dataclass(frozen=True)
class StopDecision:
    KIND: ClassVar[str] = "training_stop"
    RECORD_VERSION: ClassVar[int] = 1

    verdict: StopVerdict
    reason: StopReason
    evidence: dict[str, Any]
    step: int
    state: StopperState = field(repr=False, default_factory=StopperState)

    @property
    def stop(self) -> bool:
        return self.verdict in (StopVerdict.STOP, StopVerdict.DIVERGED)

    @property
    def reasons(self) -> list[StopReason]:
        return [self.reason]

    @property
    def message(self) -> str:
        e = self.evidence
        if self.reason is StopReason.NONFINITE:
            return (
                f"non-finite {e.get('nonfinite_what', 'loss/gradient')} at step {self.step} "
                f"(loss={e.get('loss')}, grad_norm={e.get('max_grad_norm')})"
            )
        if self.reason is StopReason.DIVERGED:
            return (
                f"gradient norm {e['max_grad_norm']:.4g} exceeded {e['divergence_ratio']:g} x "
                f"the lowest norm seen, {e['best_norm']:.4g}, at step {self.step}"
            )
        return f"{self.verdict.value}: {self.reason.value} at step {self.step}"

    def to_dict(self) -> dict[str, Any]:
        """``step`` and ``decisions.common``: verdict, reason, reasons, message, evidence."""
        return {"step": self.step, **decisions.common(self, _json_safe(self.evidence))}


def _json_safe(obj: Any) -> Any:
    """``obj`` with non-finite floats as strings (``"nan"``, ``"inf"``, ``"-inf"``) and tuples
    as lists: what a strict JSON file holds, so a record compares equal after a round trip."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def _from_json(obj: Any) -> Any:
    """Inverse of ``_json_safe`` for evidence and state (whose only strings are numbers)."""
    if isinstance(obj, str):
        return float(obj)
    if isinstance(obj, list | tuple):
        return tuple(_from_json(v) for v in obj)
    return obj


def _finite(x: float | None) -> bool:
    return x is None or math.isfinite(x)


def _slope(xs: tuple[int, ...], ys: tuple[float, ...]) -> float:
    return _slope_se(xs, ys)[0]


def _slope_se(xs: tuple[int, ...], ys: tuple[float, ...]) -> tuple[float, float]:
    """Least-squares slope of ``ys`` over ``xs`` and its standard error (0 with < 3 points)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if not sxx:
        return 0.0, 0.0
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    if n < 3:
        return slope, 0.0
    rss = sum((y - my - slope * (x - mx)) ** 2 for x, y in zip(xs, ys, strict=True))
    return slope, math.sqrt(rss / (n - 2) / sxx)


class GradientPlateauStopper:
    """EB criterion + log-gradient-norm plateau + optional val-loss plateau, with guards."""

    def __init__(
        self,
        *,
        eb: bool = True,
        eb_window: int = 4,
        eb_threshold: float = 0.0,
        eb_hysteresis: float = 0.05,
        norm_plateau: bool = True,
        norm_window: int = 8,
        norm_tol: float = 0.5,
        norm_hysteresis: float = 0.5,
        norm_t: float | None = None,
        val_mode: str = "off",
        val_min_delta: float = 1e-3,
        patience: int = 3,
        val_per_epoch: int = 1,
        val_window: int = 0,
        val_window_delta: float | None = None,
        val_rise: float | None = None,
        warmup_steps: int = 0,
        min_steps: int = 0,
        max_steps: int | None = None,
        confirm: int = 3,
        require: str = "any",
        reduce_lr_factor: float | None = None,
        max_lr_reductions: int = 1,
        cooldown_checks: int = 4,
        divergence_ratio: float = 1e3,
    ) -> None:
        if eb_window < 1 or norm_window < 3:
            raise ValueError(
                f"eb_window must be >= 1 and norm_window >= 3, got {eb_window}, {norm_window}"
            )
        if eb_hysteresis < 0 or norm_hysteresis < 0 or norm_tol <= 0:
            raise ValueError(
                f"hysteresis must be >= 0 and norm_tol > 0, got {eb_hysteresis}, "
                f"{norm_hysteresis}, {norm_tol}"
            )
        if val_mode not in ("off", "abs", "rel"):
            raise ValueError(f"val_mode must be 'off', 'abs' or 'rel', got {val_mode!r}")
        if val_min_delta < 0 or patience < 1 or confirm < 1:
            raise ValueError(
                f"need val_min_delta >= 0, patience >= 1, confirm >= 1; got "
                f"{val_min_delta}, {patience}, {confirm}"
            )
        if warmup_steps < 0 or min_steps < 0 or (max_steps is not None and max_steps < 1):
            raise ValueError(
                f"bad step bounds: warmup={warmup_steps} min={min_steps} max={max_steps}"
            )
        if val_per_epoch < 1:
            raise ValueError(f"val_per_epoch must be >= 1, got {val_per_epoch}")
        if val_window < 0 or (val_window > 0 and val_mode == "off"):
            raise ValueError(
                f"val_window must be >= 0, and > 0 only with a validation plateau "
                f"(val_mode 'abs' or 'rel'); got val_window={val_window}, val_mode={val_mode!r}"
            )
        if (
            (norm_t is not None and norm_t <= 0)
            or (val_window_delta is not None and val_window_delta < 0)
            or (val_rise is not None and val_rise < 0)
        ):
            raise ValueError(
                f"norm_t must be > 0, val_window_delta and val_rise >= 0 (or None); got "
                f"{norm_t}, {val_window_delta}, {val_rise}"
            )
        if require not in ("any", "all"):
            raise ValueError(f"require must be 'any' or 'all', got {require!r}")
        if reduce_lr_factor is not None and not 0 < reduce_lr_factor < 1:
            raise ValueError(f"reduce_lr_factor must be in (0, 1), got {reduce_lr_factor}")
        if max_lr_reductions < 0 or cooldown_checks < 0:
            raise ValueError("max_lr_reductions and cooldown_checks must be >= 0")
        if divergence_ratio <= 1:
            raise ValueError(f"divergence_ratio must be > 1, got {divergence_ratio}")
        self.eb, self.eb_window, self.eb_threshold = eb, eb_window, eb_threshold
        self.eb_hysteresis, self.norm_plateau = eb_hysteresis, norm_plateau
        self.norm_window, self.norm_tol, self.norm_hysteresis = (
            norm_window,
            norm_tol,
            norm_hysteresis,
        )
        self.val_mode, self.val_min_delta, self.patience = val_mode, val_min_delta, patience
        self.val_per_epoch = val_per_epoch
        self.val_window, self.val_window_delta, self.norm_t = val_window, val_window_delta, norm_t
        self.val_rise = val_rise
        self.warmup_steps, self.min_steps, self.max_steps = warmup_steps, min_steps, max_steps
        self.confirm, self.require = confirm, require
        self.reduce_lr_factor, self.max_lr_reductions = reduce_lr_factor, max_lr_reductions
        self.cooldown_checks, self.divergence_ratio = cooldown_checks, divergence_ratio
        self.state = StopperState()
        self.trace: list[dict[str, Any]] = []
        self.records: list[dict[str, Any]] = []  # full records of the non-continue decisions

    # -- configuration ----------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        keys = (
            "eb",
            "eb_window",
            "eb_threshold",
            "eb_hysteresis",
            "norm_plateau",
            "norm_window",
            "norm_tol",
            "norm_hysteresis",
            "norm_t",
            "val_mode",
            "val_min_delta",
            "patience",
            "val_per_epoch",
            "val_window",
            "val_window_delta",
            "val_rise",
            "warmup_steps",
            "min_steps",
            "max_steps",
            "confirm",
            "require",
            "reduce_lr_factor",
            "max_lr_reductions",
            "cooldown_checks",
            "divergence_ratio",
        )
        return {k: getattr(self, k) for k in keys}

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> GradientPlateauStopper:
        return cls(**cfg)

    @property
    def window_validations(self) -> int:
        """``val_window`` is in epochs: the agreement window spans this many validations."""
        return self.val_window * self.val_per_epoch

    @property
    def patience_validations(self) -> int:
        """``patience`` is in epochs: this many validations without an improvement."""
        return self.patience * self.val_per_epoch

    # -- the pure core ----------------------------------------------------------------

    def decide(self, ev: StopEvidence, state: StopperState | None = None) -> StopDecision:
        """The verdict for ``ev`` given ``state`` (default: the current one). Pure: nothing
        is mutated; the decision carries the next state."""
        s = self.state if state is None else state
        e: dict[str, Any] = {
            "epoch": ev.epoch,
            "loss": ev.loss,
            "grad_norm": ev.grad_norm,
            "max_grad_norm": ev.max_grad_norm,
        }

        def out(verdict: StopVerdict, reason: StopReason, st: StopperState) -> StopDecision:
            if verdict in (StopVerdict.STOP, StopVerdict.DIVERGED):
                st = replace(st, stopped=True)
            return StopDecision(verdict, reason, e, ev.step, st)

        # 1. divergence guard: always on, no warmup, no patience
        bad = [
            n
            for n, v in (
                ("loss", ev.loss),
                ("gradient", ev.grad_norm),
                ("gradient", ev.max_grad_norm),
                ("validation loss", ev.val_loss),
            )
            if not _finite(v)
        ]
        if ev.nonfinite or bad:
            e["nonfinite_what"] = bad[0] if bad else "loss/gradient"
            return out(StopVerdict.DIVERGED, StopReason.NONFINITE, s)
        # The baseline is the lowest *window mean*: one batch the model already fits
        # perfectly (near-separable data) has a gradient near 0, and 1000x that is an
        # ordinary batch, not an explosion. Only the first window, with no baseline yet,
        # falls back to its smallest step, so an explosion inside it is still caught.
        first = s.best_norm is None and ev.min_grad_norm is not None
        low = ev.min_grad_norm if first or ev.grad_norm is None else ev.grad_norm
        if low is not None and low > 0:
            s = replace(s, best_norm=low if s.best_norm is None else min(s.best_norm, low))
        e.update(divergence_ratio=self.divergence_ratio, best_norm=s.best_norm)
        if (
            ev.max_grad_norm is not None
            and s.best_norm is not None
            and ev.max_grad_norm > self.divergence_ratio * s.best_norm
        ):
            return out(StopVerdict.DIVERGED, StopReason.DIVERGED, s)

        if self.max_steps is not None and ev.step >= self.max_steps:
            e["max_steps"] = self.max_steps
            return out(StopVerdict.STOP, StopReason.MAX_STEPS, s)

        if ev.val_loss is not None:
            return self._decide_val(ev, s, e, out)
        return self._decide_grad(ev, s, e, out)

    def _decide_val(self, ev, s, e, out) -> StopDecision:  # type: ignore[no-untyped-def]
        improved = s.best_val is None
        if s.best_val is not None:
            gain = s.best_val - ev.val_loss
            need = self.val_min_delta * (abs(s.best_val) if self.val_mode == "rel" else 1.0)
            improved = gain > need
            e.update(val_gain=gain, val_required_gain=need)
        best = ev.val_loss if improved else s.best_val
        run_best = ev.val_loss if s.val_bests == () else min(s.val_bests[-1], ev.val_loss)
        s = replace(
            s,
            best_val=best,
            bad_vals=0 if improved else s.bad_vals + 1,
            val_bests=(*s.val_bests, run_best)[-(self.window_validations + 1) :],
            last_val=ev.val_loss,
        )
        e.update(
            kind="validation",
            val_loss=ev.val_loss,
            best_val=best,
            bad_vals=s.bad_vals,
            patience=self.patience,
            patience_validations=self.patience_validations,
            val_mode=self.val_mode,
            val_min_delta=self.val_min_delta,
        )
        if self.val_mode == "off":
            return out(StopVerdict.CONTINUE, StopReason.NOT_PLATEAUED, s)
        if ev.step < max(self.warmup_steps, self.min_steps):
            reason = (
                StopReason.WARMUP if ev.step < self.warmup_steps else StopReason.BELOW_MIN_STEPS
            )
            return out(StopVerdict.CONTINUE, reason, s)
        if self.val_window:
            confirmed = self._confirmed(s)
            e.update(
                val_window=self.val_window,
                window_validations=self.window_validations,
                val_window_gain=self._window_gain(s),
                val_rise=self.val_rise,
                val_risen=self._val_risen(s),
                val_plateau=self._val_plateau(s),
                grad_confirmed=[r.value for r in confirmed],
                eb_count=s.eb_count,
                norm_count=s.norm_count,
                confirm=self.confirm,
            )
            if confirmed and self._val_plateau(s) and s.cooldown_left == 0:
                return self._fire(confirmed[0], s, out)  # validation now agrees
        if s.bad_vals >= self.patience_validations:
            return self._fire(StopReason.VAL_LOSS_PLATEAU, s, out)
        return out(StopVerdict.CONTINUE, StopReason.NOT_PLATEAUED, s)

    def _decide_grad(self, ev, s, e, out) -> StopDecision:  # type: ignore[no-untyped-def]
        """Each gradient signal keeps its own confirmation count, moved only by *fresh*
        evidence: +1 when on, reset when clearly off, held inside the hysteresis band or
        when this check carries no new value (EB is measured less often than the norm)."""
        e["kind"] = "gradient"
        if ev.step < self.warmup_steps:  # statistics recorded, not judged
            e["warmup_steps"] = self.warmup_steps
            if ev.eb_sum is not None and ev.eb_dims > 0 and ev.batch_size > 3:
                b = ev.batch_size
                e["eb"] = 1.0 - (b - 3) / (b - 1) * ev.eb_sum / ev.eb_dims
            return out(StopVerdict.CONTINUE, StopReason.WARMUP, s)
        s = replace(s, checks=s.checks + 1)
        counts: dict[StopReason, int] = {}
        signals: dict[str, bool | None] = {}  # this check's fresh verdict; None: none/not ready

        def step_count(old: int, fresh: bool, on: bool, off: bool) -> int:
            return old if not fresh else (old + 1 if on else (0 if off else old))

        if self.eb:
            eb_vals, fresh = s.eb_values, False
            if ev.eb_sum is not None and ev.eb_dims > 0 and ev.batch_size > 3:
                b = ev.batch_size
                eb_now = 1.0 - (b - 3) / (b - 1) * ev.eb_sum / ev.eb_dims
                eb_vals, fresh = (*eb_vals, eb_now)[-self.eb_window :], True
                e.update(eb=eb_now, eb_dims=ev.eb_dims, batch_size=b)
            ready = len(eb_vals) >= self.eb_window
            eb_s = sum(eb_vals) / len(eb_vals) if eb_vals else None
            on = eb_s is not None and ready and eb_s > self.eb_threshold
            off = eb_s is not None and ready and eb_s < self.eb_threshold - self.eb_hysteresis
            n = step_count(s.eb_count, fresh and ready, on, off)
            s = replace(s, eb_values=eb_vals, eb_count=n)
            counts[StopReason.EB_CRITERION] = n
            signals["eb_criterion"] = on if fresh and ready else None
            e.update(
                eb_smoothed=eb_s,
                eb_threshold=self.eb_threshold,
                eb_fresh=fresh,
                eb_hysteresis=self.eb_hysteresis,
                eb_window=self.eb_window,
                eb_count=n,
            )
        if self.norm_plateau:
            xs, ys, fresh = s.steps_seen, s.log_norms, ev.log_grad_norm is not None
            if fresh:
                xs = (*xs, ev.step)[-self.norm_window :]
                ys = (*ys, ev.log_grad_norm)[-self.norm_window :]
            ready = len(ys) >= self.norm_window
            slope, se = (x * 1000 for x in _slope_se(xs, ys)) if ready else (None, None)
            # plateau: a slope below norm_tol, or (norm_t) one not significantly non-zero
            tol = self.norm_tol
            if self.norm_t is not None and se is not None:
                tol = max(tol, self.norm_t * se)
            on = bool(ready and abs(slope) < tol)  # type: ignore[arg-type]
            off = bool(ready and abs(slope) > tol * (1 + self.norm_hysteresis))  # type: ignore[arg-type]
            if self.norm_t is not None:
                e.update(log_norm_slope_se_per_1k=se, norm_t=self.norm_t)
            n = step_count(s.norm_count, fresh and ready, on, off)
            s = replace(s, steps_seen=xs, log_norms=ys, norm_count=n)
            counts[StopReason.GRAD_NORM_PLATEAU] = n
            signals["grad_norm_plateau"] = on if fresh and ready else None
            e.update(
                log_norm_slope_per_1k=slope,
                norm_tol=self.norm_tol,
                norm_hysteresis=self.norm_hysteresis,
                norm_window=self.norm_window,
                norm_count=n,
            )
        e.update(
            signals=signals, confirm=self.confirm, require=self.require, min_steps=self.min_steps
        )
        if s.cooldown_left > 0:
            s = replace(s, cooldown_left=s.cooldown_left - 1, eb_count=0, norm_count=0)
            e.update(cooldown_left=s.cooldown_left)
            return out(StopVerdict.CONTINUE, StopReason.COOLDOWN, s)
        confirmed = self._confirmed(s)
        if self.val_window:
            e.update(
                val_window=self.val_window,
                val_window_gain=self._window_gain(s),
                val_plateau=self._val_plateau(s),
            )
        if not confirmed:
            pending = any(n > 0 for n in counts.values())
            return out(
                StopVerdict.CONTINUE,
                StopReason.CONFIRMING if pending else StopReason.NOT_PLATEAUED,
                s,
            )
        if ev.step < self.min_steps:
            return out(StopVerdict.CONTINUE, StopReason.BELOW_MIN_STEPS, s)
        if self.val_window and not self._val_plateau(s):
            return out(StopVerdict.CONTINUE, StopReason.VAL_IMPROVING, s)
        return self._fire(confirmed[0], s, out)

    def _window_gain(self, s: StopperState) -> float | None:
        """How much the best validation loss fell over the last ``val_window`` validations
        (None until there have been ``val_window + 1``)."""
        if len(s.val_bests) < self.window_validations + 1:
            return None
        return s.val_bests[0] - s.val_bests[-1]

    def _val_plateau(self, s: StopperState) -> bool:
        """Validation has stopped improving: the last ``val_window`` epochs of validations
        lowered the best validation loss by no more than ``val_window_delta`` (relative to
        it, in ``rel`` mode) all together — or, with ``val_rise``, the last validation is
        more than ``val_rise`` (relative) above the best (Prechelt's generalization loss:
        the fit is past its best, however recent the best is)."""
        if self._val_risen(s):
            return True
        gain = self._window_gain(s)
        if gain is None:
            return False
        scale = abs(s.val_bests[0]) if self.val_mode == "rel" else 1.0
        delta = self.val_min_delta if self.val_window_delta is None else self.val_window_delta
        return gain <= delta * scale

    def _val_risen(self, s: StopperState) -> bool:
        if self.val_rise is None or s.last_val is None or not s.val_bests:
            return False
        best = s.val_bests[-1]
        return s.last_val > best + self.val_rise * abs(best)

    def _confirmed(self, s: StopperState) -> list[StopReason]:
        """The gradient signals confirmed in ``s`` (count >= ``confirm``), in order EB, norm;
        empty unless ``require`` is met (any one of the enabled signals, or all of them)."""
        counts = {
            r: n
            for r, n, on in (
                (StopReason.EB_CRITERION, s.eb_count, self.eb),
                (StopReason.GRAD_NORM_PLATEAU, s.norm_count, self.norm_plateau),
            )
            if on
        }
        confirmed = [k for k, n in counts.items() if n >= self.confirm]
        if not counts or (self.require == "all" and len(confirmed) < len(counts)):
            return []
        return confirmed

    def _fire(self, reason: StopReason, s: StopperState, out) -> StopDecision:  # type: ignore[no-untyped-def]
        if self.reduce_lr_factor is not None and s.lr_reductions < self.max_lr_reductions:
            s = replace(
                s,
                lr_reductions=s.lr_reductions + 1,
                eb_count=0,
                norm_count=0,
                bad_vals=0,
                val_bests=(),
                eb_values=(),
                log_norms=(),
                steps_seen=(),
                cooldown_left=self.cooldown_checks,
            )
            d = out(StopVerdict.REDUCE_LR, reason, s)
            d.evidence.update(reduce_lr_factor=self.reduce_lr_factor, lr_reductions=s.lr_reductions)
            return d
        return out(StopVerdict.STOP, reason, s)

    def divergence_limit(self, window_min: float | None = None) -> float:
        """The gradient norm above which ``decide`` says DIVERGED now (inf: no baseline yet),
        so a loop can test every step cheaply and ask for a decision only then."""
        base = self.state.best_norm
        lows = [x for x in ((window_min,) if base is None else (base,)) if x is not None and x > 0]
        return self.divergence_ratio * min(lows) if lows else math.inf

    # -- the stateful shell --------------------------------------------------------------

    def update(self, ev: StopEvidence) -> StopDecision:
        """Decide, commit the next state, and append the decision to the trace (and, when it
        is not ``continue``, its replayable record to ``records``)."""
        before = self.state
        d = self.decide(ev)
        self.state = d.state
        self.trace.append(d.to_dict())
        if d.verdict is not StopVerdict.CONTINUE:
            self.records.append(decision_record(self, ev, before, d))
        return d

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.config(),
            "state": asdict(self.state),
            "trace": list(self.trace),
            "records": list(self.records),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd.get("config") and sd["config"] != self.config():
            raise ValueError(f"stopper state was saved with another configuration: {sd['config']}")
        st = dict(sd["state"])
        for k in ("eb_values", "log_norms", "steps_seen", "val_bests"):
            st[k] = tuple(st[k])
        self.state = StopperState(**st)
        self.trace = list(sd.get("trace", []))
        self.records = list(sd.get("records", []))


# -- decision records: what the stopper decided, from what, and its replay ----------------


def decision_record(
    stopper: GradientPlateauStopper,
    evidence: StopEvidence,
    state: StopperState,
    decision: StopDecision,
) -> dict[str, Any]:
    """``decisions.record`` of ``decision``: the stopper's configuration (the rule), and the
    evidence and the stopper state *before* the decision (the inputs), as plain dicts."""
    return decisions.record(
        decision,
        rule=stopper.config(),
        inputs={"evidence": _json_safe(asdict(evidence)), "state": _json_safe(asdict(state))},
    )


def replay(record: Mapping[str, Any]) -> StopDecision:
    """The decision a stopper with the record's configuration makes on the record's
    evidence and state (``decisions.replay`` dispatches ``training_stop`` records here)."""
    decisions.check_version(record, StopDecision.KIND, [1])
    stopper = GradientPlateauStopper.from_config(dict(record["rule"]))
    inputs = record["inputs"]
    ev = StopEvidence(**{k: _from_json(v) for k, v in inputs["evidence"].items()})
    state = StopperState(**{k: _from_json(v) for k, v in inputs["state"].items()})
    return stopper.decide(ev, state)


# -- per-sample gradient variance for the EB criterion ------------------------------------


class PerSampleGradStats:
    """Exact Σ_i (per-sample gradient)² for every ``nn.Linear``, one extra matmul per layer.

    For ``y = a Wᵀ + b`` and a loss that is the *mean* over the batch, the output gradient
    row ``δ_i`` already carries the 1/B factor, so sample i's gradient is ``B·δ_i a_iᵀ``
    and ``Σ_i G_i² = B²·(δ²)ᵀ(a²)`` elementwise (bias: ``B²·Σ_i δ_i²``). Hooks are attached
    only while ``armed`` (a check step), so ordinary steps keep the module fast path.
    Call ``collect()`` after ``backward()`` and *before* gradient clipping.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
        self._handles: list[Any] = []
        self._sumsq: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._batch = 0

    def arm(self) -> None:
        self.disarm()
        self._sumsq.clear()
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_hook(self._forward_hook(i)))

    def disarm(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _forward_hook(self, i: int):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            a = inputs[0].detach()
            self._batch = a.shape[0]

            def grad_hook(delta: torch.Tensor) -> None:
                d2 = delta.detach().float().square()
                w = d2.t() @ a.float().square()  # Σ_i δ_i² a_iᵀ², the extra matmul
                self._sumsq[i] = (w, d2.sum(0) if module.bias is not None else None)  # type: ignore[union-attr]

            output.register_hook(grad_hook)

        return hook

    def collect(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(Σ_k B g_k²/σ̂²_k, D, B) on the device, over entries with σ̂² > 0. Disarms.

        All layers are flattened into one vector first, so the cost is a handful of ops
        per check however many layers there are."""
        self.disarm()
        b = self._batch
        grads, sums = [], []
        for i, layer in enumerate(self.layers):
            if i not in self._sumsq or layer.weight.grad is None:
                continue
            w_sq, b_sq = self._sumsq[i]
            grads.append(layer.weight.grad.reshape(-1))
            sums.append(w_sq.reshape(-1))
            if b_sq is not None and layer.bias is not None and layer.bias.grad is not None:
                grads.append(layer.bias.grad)
                sums.append(b_sq)
        self._sumsq.clear()
        if not grads:
            z = torch.zeros((), device=self.layers[0].weight.device if self.layers else None)
            return z, z, b
        sumsq = torch.cat(sums).mul_(float(b) ** 2)  # per-sample gradient is B·δ_i a_iᵀ
        return (*eb_terms(torch.cat(grads).detach().float(), sumsq, b), b)


def eb_terms(g: torch.Tensor, sumsq: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_k B·g_k²/σ̂²_k and the count of entries with σ̂² > 0, from the mean gradient ``g``
    and Σ_i G_ik² (sum over samples of squared per-sample gradients)."""
    var = (sumsq - batch * g.square()) / max(batch - 1, 1)
    valid = var > 1e-7 * (sumsq / batch) + 1e-30
    ratio = torch.where(valid, batch * g.square() / torch.where(valid, var, 1.0), 0.0)
    return ratio.sum(), valid.sum().to(ratio.dtype)
