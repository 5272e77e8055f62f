"""Gradient descent on resident tensors: stops itself on a gradient plateau, resumes after a crash.

Data stays on the device as tensors and is shuffled by index each epoch: no per-sample
DataLoader on the hot path. Device is picked automatically (CUDA, then MPS, then CPU);
on CUDA the forward pass runs under bf16 autocast and AdamW is fused. Optimizers: AdamW
or SGD with momentum; learning rate: linear warmup then cosine or step decay; gradients
clipped by global norm. The validation set is scored (loss, ROC AUC, PR AUC for binary
targets) at every epoch's end and, on short epochs, within them (``validate_every``,
``validation_cadence``: by default at the check cadence, at most 4 times an epoch), and
the best weights (lowest validation loss) are restored at the end.

Every ``check_every`` steps the ``GradientPlateauStopper`` decides from gradient
statistics (log-norm plateau every check; the EB criterion from exact per-sample
variances every ``eb_every`` steps), and at each validation from the validation loss;
its decision trace is logged to the run (``training/decision_trace.json``, whose
``records`` replay every non-continue decision: ``pipeline.decisions.replay``). Defaults
keep all of this, telemetry (137 snapshots taken in 960 steps, 41 kept) and state
checkpoints included, at about 2% of step-loop CPU on the reference MLP (``python -m
benchmarks.training_overhead``; telemetry alone about 1%).
Every ``snapshot_every`` steps ``GradientTelemetry`` copies the gradients and weights
(one call each into a preallocated buffer row: two before, one after the step); their
statistics are computed batched when the history is read (``GradientTelemetry.flush``:
one device→host copy), so a snapshot the history drops costs only its copies. The
cadence follows the budget (``telemetry_cadence``): first ``max_epochs × steps_per_epoch
// (4 × telemetry_snapshots)`` (budget / 256); a full history (64) keeps every other
snapshot and halves the rate, so a run that stops at an eighth of its budget keeps 32 and
any later stop 32–64; at most 64 of them per tensor become run metrics, sent by a
background thread at the end. The statistics are read after ``backward()`` (after
the loss scaler's ``unscale_`` where one is used) and before ``clip_grad_norm_``: they
describe the gradient the model produced, not the clipped one. Every
``state_every`` steps a training-state checkpoint is written atomically, so a killed or
retried task resumes from exactly where it was (bit-for-bit on CPU).

On the CPU, loss and gradient norm are read every step (cheap there), so a non-finite
or exploding value stops training at the step it appears. On an accelerator they are
accumulated on the device and read once per check, so detection waits for the next
check — the run still fails before anything is saved.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
import time
from collections.abc import Generator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from pipeline.contract import DataContract
from pipeline.metrics import classification_metrics
from pipeline.names import StopVerdict
from pipeline.train import distributed
from pipeline.train.features import FeatureSpec, fit_features, labels, transform
from pipeline.train.model import (
    BUILTIN_MLP,
    ModelInputs,
    ModelRef,
    build_model,
    model_ref_for,
    pick_device,
    predict_proba,
)
from pipeline.train.schedule import KINDS, LRSchedule
from pipeline.train.state import TrainingStateStore, decode, encode, restore_rng, rng_tensors
from pipeline.train.stopping import (
    GradientPlateauStopper,
    PerSampleGradStats,
    StopDecision,
    StopEvidence,
    TrainingDiverged,
)
from pipeline.train.telemetry import GradientTelemetry, TelemetrySink, sparse_parameters

__all__ = [
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "split_by_id",
    "holdout_mask",
    "train",
    "iter_train",
    "TrainingRun",
    "default_stopper",
    "val_patience_stopper",
    "no_stopper",
]

log = logging.getLogger(__name__)


def default_stopper() -> dict[str, Any]:
    """Our stopper: EB criterion or log-norm plateau (no significant trend), confirmed on
    3 checks, stops once validation agrees: the best validation loss gained < 0.3%
    (relative) over the last epoch of validations, or the last validation is > 1% above
    the best (Prechelt's GL_1); a relative val-loss patience of 3 epochs is the backstop
    (``pipeline.train.stopping``)."""
    return {
        "eb": True,
        "eb_window": 4,
        "eb_threshold": 0.0,
        "eb_hysteresis": 0.05,
        "norm_plateau": True,
        "norm_window": 6,
        "norm_tol": 0.5,
        "norm_t": 2.0,
        "val_mode": "rel",
        "val_min_delta": 1e-3,
        "patience": 3,
        "val_window": 1,
        "val_window_delta": 3e-3,
        "val_rise": 1e-2,
        "warmup_steps": 50,
        "confirm": 3,
    }


def val_patience_stopper(patience: int = 5, min_delta: float = 1e-4) -> dict[str, Any]:
    """The classic rule: validation loss patience (absolute ``min_delta``), nothing else."""
    return {
        "eb": False,
        "norm_plateau": False,
        "val_mode": "abs",
        "val_min_delta": min_delta,
        "patience": patience,
    }


def no_stopper() -> dict[str, Any]:
    """Fixed budget: only the divergence guard (non-finite / exploding gradients) is active."""
    return {"eb": False, "norm_plateau": False, "val_mode": "off"}


@dataclass(frozen=True)
class TrainConfig:
    max_epochs: int = 30
    learning_rate: float = 3e-3
    batch_size: int = 512
    weight_decay: float = 1e-4
    factory: str = BUILTIN_MLP  # the model factory (pipeline.train.model: the factory contract)
    factory_kwargs: dict[str, Any] = field(
        default_factory=lambda: {"hidden": [64, 32], "dropout": 0.1}
    )
    seed: int = 0
    val_fraction: float = 0.2
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere | fp32 | bf16
    optimizer: str = "adamw"  # adamw | sgd (momentum)
    momentum: float = 0.9
    nesterov: bool = False
    lr_schedule: str = "cosine"  # cosine | step | constant, after linear warmup
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    lr_step_every: int = 500
    lr_gamma: float = 0.5
    grad_clip: float | None = 5.0
    restore_best: bool = True  # end with the weights of the lowest validation loss
    stopper: dict[str, Any] = field(default_factory=default_stopper)
    check_every: int = 32  # stopper checks (gradient-norm evidence is accumulated every step)
    eb_every: int = 64  # per-sample variance for EB: every eb_every // check_every-th check
    # Validation cadence (``validation_cadence``): the validation set is scored every
    # ``validate_every`` batches of an epoch and at its end; 0 (the default) derives it from
    # the check cadence, between once and 4 times an epoch; -1: once an epoch (the classic).
    validate_every: int = 0
    # Gradient telemetry cadence: snapshot_every 0 (the default) derives it from the budget
    # (``telemetry_cadence``: first max(1, expected steps // (4 × telemetry_snapshots)), at
    # most telemetry_snapshots kept, thinned by halves), so a run that stops at an eighth of
    # its budget keeps telemetry_snapshots / 2 and any later stop between half and all of
    # them; a positive snapshot_every forces the first cadence. At most
    # TELEMETRY_METRIC_POINTS snapshots (evenly spaced, the last one always) become run
    # metrics; gradients.npz keeps all.
    snapshot_every: int = 0
    telemetry_snapshots: int = 64
    state_every: int = 500  # training-state checkpoints; 0: none
    telemetry: bool = True

    def __post_init__(self) -> None:
        if self.max_epochs < 1:
            raise ValueError(f"max_epochs must be >= 1, got {self.max_epochs}")
        if not 0 < self.learning_rate <= 100:
            raise ValueError(f"learning_rate must be in (0, 100], got {self.learning_rate}")
        if not 0 < self.val_fraction < 0.9:
            raise ValueError(f"val_fraction must be in (0, 0.9), got {self.val_fraction}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2, got {self.batch_size}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.lr_schedule not in KINDS:
            raise ValueError(f"lr_schedule must be one of {KINDS}, got {self.lr_schedule!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        if (
            min(self.check_every, self.lr_step_every, self.telemetry_snapshots) < 1
            or min(self.state_every, self.snapshot_every) < 0
        ):
            raise ValueError(
                "check_every, lr_step_every, telemetry_snapshots must be >= 1; state_every, "
                "snapshot_every >= 0 (snapshot_every 0: derived from telemetry_snapshots)"
            )
        if self.eb_every < 1:
            raise ValueError(f"eb_every must be >= 1, got {self.eb_every}")
        if self.validate_every < -1:
            raise ValueError(
                f"validate_every must be a number of batches >= 1, 0 (derived from check_every)"
                f" or -1 (once an epoch), got {self.validate_every}"
            )
        if "val_per_epoch" in self.stopper:
            raise ValueError(
                "stopper option val_per_epoch is set by the training loop from its validation "
                "cadence; set TrainConfig.validate_every instead"
            )
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1 or not 0 < self.lr_gamma <= 1:
            raise ValueError("warmup_steps >= 0, min_lr_ratio in [0, 1], lr_gamma in (0, 1]")
        GradientPlateauStopper(**self.stopper)  # validates the stopper configuration

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def flat(self) -> dict[str, Any]:
        """One level, for run parameters: ``stopper.<key>``."""
        d = {k: v for k, v in self.to_dict().items() if k not in ("stopper", "factory_kwargs")}
        return (
            d
            | {f"stopper.{k}": v for k, v in sorted(self.stopper.items())}
            | {f"model.{k}": v for k, v in sorted(self.factory_kwargs.items())}
        )


@dataclass
class TrainResult:
    model: nn.Module
    features: FeatureSpec
    model_ref: ModelRef
    config: TrainConfig
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    stop_reason: str = ""
    val_metrics: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"
    precision: str = "fp32"
    train_rows: int = 0
    val_rows: int = 0
    steps: int = 0
    validations: int = 0  # passes over the validation set (each val_rows rows)
    best_step: int = 0  # the step of the kept weights' validation (restore_best)
    world_size: int = 1  # training processes (torchrun ranks); this result is rank ``rank``'s
    rank: int = 0
    resumed_from: dict[str, Any] | None = None
    decision_trace: list[dict[str, Any]] = field(default_factory=list)
    stop_records: list[dict[str, Any]] = field(default_factory=list)  # replayable decisions
    telemetry: dict[str, Any] = field(default_factory=dict)


def split_by_id(ids: pd.Series, val_fraction: float) -> np.ndarray:
    """Deterministic validation mask from a hash of the id (stable across reruns)."""
    h = pd.util.hash_pandas_object(ids.astype(str), index=False).to_numpy()
    return (h % 10_000) < int(val_fraction * 10_000)


def holdout_mask(df: pd.DataFrame, contract: DataContract, val_fraction: float) -> np.ndarray:
    """The validation rows: by the id column's hash, or — a contract without one — by the
    hash of each row's declared values (stable across reruns and row order; identical rows
    fall on the same side, so a duplicate never leaks from training into validation)."""
    if contract.id_column is not None:
        return split_by_id(df[contract.id_column], val_fraction)
    cols = [c for c in contract.column_names if c in df.columns]
    h = pd.util.hash_pandas_object(df[cols].astype(str), index=False).to_numpy()
    return (h % 10_000) < int(val_fraction * 10_000)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


_OPERATIONAL = ("device", "state_every", "snapshot_every", "telemetry_snapshots", "telemetry")
TELEMETRY_METRIC_POINTS = 64  # per tensor and statistic, as run metrics


def telemetry_cadence(config: TrainConfig, steps_per_epoch: int) -> int:
    """The first snapshot_every for a run of ``config.max_epochs`` × ``steps_per_epoch``
    expected steps: a rate of ``4 × telemetry_snapshots`` (N = 64: 256) over the whole
    budget. The telemetry keeps at most N (``max_history``): when full, it keeps every other
    snapshot and snapshots half as often. So a run that stops before a quarter of its budget
    keeps 4N × (its share of the budget) — N/2 = 32 at an eighth — and any later stop keeps
    between N/2 and N, evenly spaced (all in gradients.npz; TELEMETRY_METRIC_POINTS of them
    become run metrics). A full run takes about 2N snapshots to keep N/2 to N: the first N
    at the first rate, then N/2 per doubling of the interval."""
    expected = max(1, config.max_epochs * steps_per_epoch)
    return config.snapshot_every or max(1, expected // (4 * config.telemetry_snapshots))


VALIDATIONS_PER_EPOCH_MAX = 4  # the derived validation cadence's upper bound


def validation_cadence(config: TrainConfig, steps_per_epoch: int) -> int:
    """Batches between validations within an epoch (``steps_per_epoch``: once an epoch,
    at its end): one after every ``cadence`` batches and one after the epoch's last
    (``validation_positions``). ``validate_every`` 0 derives it: the gradient-check
    cadence, so every validation can meet a fresh gradient verdict, but at least a quarter
    of an epoch (at most ``VALIDATIONS_PER_EPOCH_MAX`` passes an epoch, to bound the cost)
    and at most an epoch. Why more often than once an epoch on small data: a rule that
    waits for validation to agree stops no earlier than the validation after the best one,
    and with ~10 batches an epoch that is a whole epoch late."""
    spe = max(1, steps_per_epoch)
    if config.validate_every == -1:
        return spe
    if config.validate_every > 0:
        return min(spe, config.validate_every)
    return min(spe, max(config.check_every, math.ceil(spe / VALIDATIONS_PER_EPOCH_MAX)))


def validation_positions(every: int, steps_per_epoch: int) -> list[int]:
    """After which batches of an epoch (1-based) the validation set is scored, at
    ``validation_cadence`` ``every``: every ``every``-th, and the epoch's last (so
    ``ceil(steps_per_epoch / every)`` an epoch; the last interval may be shorter)."""
    spe = max(1, steps_per_epoch)
    return [*range(every, spe, every), spe]


def _fingerprint(config: TrainConfig, *arrays: np.ndarray) -> str:
    """What a training state must match to be resumed: config (minus operational knobs)
    and the exact training/validation tensors."""
    h = hashlib.sha256(
        json.dumps(
            {k: v for k, v in config.to_dict().items() if k not in _OPERATIONAL}, sort_keys=True
        ).encode()
    )
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _make_optimizer(
    config: TrainConfig, model: nn.Module, device: torch.device
) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=config.learning_rate,
            momentum=config.momentum,
            nesterov=config.nesterov and config.momentum > 0,
            weight_decay=config.weight_decay,
        )
    return torch.optim.AdamW(
        model.parameters(),
        lr=config.learning_rate,
        weight_decay=config.weight_decay,
        fused=device.type == "cuda",
    )


class _Accumulator:
    """Loss / gradient-norm bookkeeping between checks and over an epoch.

    Host mode (CPU): plain floats, read every step. Device mode: a small device tensor
    updated without syncing, read with the next check's single transfer."""

    def __init__(self, device: torch.device) -> None:
        self.host = device.type == "cpu"
        self.device = device
        self.reset_check()
        self.reset_epoch()

    def reset_check(self) -> None:
        # [loss_sum, norm_sum, log_norm_sum, max_norm, nonfinite, count, min_norm]
        if self.host:
            self.check: Any = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, math.inf]
        else:
            self.check = torch.tensor([0.0] * 6 + [math.inf], device=self.device)

    def reset_epoch(self) -> None:
        self.epoch: Any = (
            [0.0, 0.0, 0.0] if self.host else torch.zeros(3, device=self.device)
        )  # loss*rows, norm, steps

    def add(self, loss: torch.Tensor, norm: torch.Tensor, rows: int) -> tuple[float, float] | None:
        if self.host:
            lv, nv = loss.item(), float(norm)
            c = self.check
            if math.isfinite(lv) and math.isfinite(nv):
                c[0] += lv
                c[1] += nv
                c[2] += math.log(max(nv, 1e-30))
                c[3] = max(c[3], nv)
                c[6] = min(c[6], nv)
                self.epoch[0] += lv * rows
                self.epoch[1] += nv
                self.epoch[2] += 1
            else:
                c[4] += 1
            c[5] += 1
            return lv, nv
        lt, nt = loss.detach().float(), norm.detach().float()
        ok = torch.isfinite(lt) & torch.isfinite(nt)
        z = torch.zeros((), device=self.device)
        self.check += torch.stack(
            [
                torch.where(ok, lt, z),
                torch.where(ok, nt, z),
                torch.where(ok, torch.log(nt.clamp_min(1e-30)), z),
                z,
                (~ok).float(),
                torch.ones((), device=self.device),
                z,
            ]
        )
        self.check[3] = torch.maximum(self.check[3], torch.where(ok, nt, z))
        self.check[6] = torch.minimum(self.check[6], torch.where(ok, nt, self.check[6]))
        self.epoch += torch.stack(
            [torch.where(ok, lt * rows, z), torch.where(ok, nt, z), ok.float()]
        )
        return None

    def device_part(self) -> list[torch.Tensor]:
        return [] if self.host else [self.check]

    def evidence(self, host_check: np.ndarray | None) -> dict[str, Any]:
        c = self.check if self.host else [float(v) for v in host_check]  # type: ignore[union-attr]
        ok = c[5] - c[4]
        return {
            "loss": c[0] / ok if ok else None,
            "grad_norm": c[1] / ok if ok else None,
            "log_grad_norm": c[2] / ok if ok else None,
            "max_grad_norm": c[3] if ok else None,
            "min_grad_norm": c[6] if ok else None,
            "nonfinite": c[4] > 0,
        }

    def epoch_values(self) -> list[float]:
        return list(self.epoch) if self.host else [float(v) for v in self.epoch.cpu()]

    def state(self) -> dict[str, Any]:
        if self.host:
            return {"check": list(self.check), "epoch": list(self.epoch)}
        return {"check": self.check.detach().cpu(), "epoch": self.epoch.detach().cpu()}

    def load(self, st: dict[str, Any]) -> None:
        if self.host:
            self.check = [
                float(v)
                for v in (st["check"].tolist() if torch.is_tensor(st["check"]) else st["check"])
            ]
            self.epoch = [
                float(v)
                for v in (st["epoch"].tolist() if torch.is_tensor(st["epoch"]) else st["epoch"])
            ]
        else:
            self.check = torch.as_tensor(st["check"], dtype=torch.float32).to(self.device)
            self.epoch = torch.as_tensor(st["epoch"], dtype=torch.float32).to(self.device)


def train(
    df: pd.DataFrame,
    contract: DataContract,
    config: TrainConfig,
    *,
    sink: TelemetrySink | None = None,
    state_dir: Path | None = None,
    state_remote: str | None = None,
    code_file: Path | None = None,
) -> TrainResult:
    """Train the spec's model (``config.factory``; ``code_file`` when the factory is a
    spec-local module) on ``df`` as the contract describes it.

    ``sink`` receives telemetry, the decision trace, tags and event artifacts (an MLflow
    run in the pipeline). ``state_dir`` enables crash-safe training-state checkpoints
    there and resumes from the newest valid one whose fingerprint (config + data)
    matches; ``state_remote`` (a storage URI) mirrors them there and resumes from there too,
    so a retry on another host resumes (``pipeline.train.state``). Raises
    ``TrainingDiverged`` on a non-finite or exploding loss/gradient.
    """
    epochs = iter_train(
        df,
        contract,
        config,
        sink=sink,
        state_dir=state_dir,
        state_remote=state_remote,
        code_file=code_file,
    )
    while True:
        try:
            next(epochs)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


def iter_train(
    df: pd.DataFrame,
    contract: DataContract,
    config: TrainConfig,
    *,
    sink: TelemetrySink | None = None,
    state_dir: Path | None = None,
    state_remote: str | None = None,
    code_file: Path | None = None,
) -> Generator[dict[str, float], None, TrainResult]:
    """``train`` one epoch at a time: yields each epoch's history row, returns the
    TrainResult. Lets a caller interleave trainings (the overhead benchmark does).
    Nothing runs (not even the seeding) before the first ``next()``."""
    run = TrainingRun(
        df,
        contract,
        config,
        sink=sink,
        state_dir=state_dir,
        state_remote=state_remote,
        code_file=code_file,
    )
    return (yield from run.run())


@dataclass
class _Progress:
    """Where a run is; a training state saves (and a resume restores) it as ``loop``."""

    step: int = 0
    epoch: int = 1
    pos: int = 0  # batches done in this epoch
    best_loss: float = math.inf
    stopped: bool = False
    finished: bool = False
    epoch_seconds: float = 0.0  # this epoch's step loop: wall time
    epoch_cpu_seconds: float = 0.0  # ... and the training thread's CPU time
    tel_cpu_mark: float = 0.0  # the telemetry sender's CPU seconds at the epoch's start
    validations: int = 0  # passes over the validation set so far
    best_step: int = 0  # the step of the lowest validation loss so far


class TrainingRun:
    """One run of ``train``: ``run()`` is the algorithm, each step of it a method.

    Setup (``_setup``): seeds and device, data, model and optimizer, the stopper and the
    instruments, then the resume from a training-state checkpoint. Then per epoch
    (``_train_epoch``): the batch steps (``_step``: forward/backward, the per-step host
    guard, the optimizer step, the one device→host read, the stopper check, the
    training-state checkpoint), then the end of the epoch (``_end_epoch``: validation,
    history row, best weights, the validation-loss decision). Then ``_finish``.

    Construction only stores the arguments; everything happens in ``run()``.
    """

    def __init__(
        self,
        df: pd.DataFrame,
        contract: DataContract,
        config: TrainConfig,
        *,
        sink: TelemetrySink | None = None,
        state_dir: Path | None = None,
        state_remote: str | None = None,
        code_file: Path | None = None,
    ) -> None:
        self.df, self.contract, self.config = df, contract, config
        self.sink, self.state_dir, self.code_file = sink, state_dir, code_file
        self.state_remote = state_remote

    def run(self) -> Generator[dict[str, float], None, TrainResult]:
        """Yields each epoch's history row (a partial one for an epoch cut short by a
        stop), returns the TrainResult."""
        self._setup()
        if self.progress.finished:  # a completed run's state: nothing left to do
            return self._already_finished()
        try:
            while self.progress.epoch <= self.config.max_epochs and not self.progress.stopped:
                partial = self._train_epoch()
                yield self.result.history[-1]
                if not partial:
                    self._next_epoch()
            self._finish()
        finally:
            self._release()
        return self.result

    __iter__ = run

    # -- setup ----------------------------------------------------------------------------

    def _setup(self) -> None:
        self._place()
        self._load_data()
        self._build_model()
        self._build_instruments()
        self._start_result()
        if self.store is not None:
            self._resume()
        self._tag_run()

    def _place(self) -> None:
        """Seeds, this process's rank and device, the precision."""
        torch.manual_seed(self.config.seed)
        np.random.seed(self.config.seed)
        self.ranks = distributed.ranks()  # one process, or one of torchrun's
        self.device = distributed.place(pick_device(self.config.device), self.ranks)
        if not self.ranks.main:
            self.sink = None  # rank 0 alone writes: tracking, telemetry, training states
        self.precision = resolve_precision(self.config.precision, self.device)

    def _load_data(self) -> None:
        """Holdout split, features, the tensors on the device, the data's fingerprint."""
        df, config, device = self.df, self.config, self.device
        val_mask = holdout_mask(df, self.contract, config.val_fraction)
        train_df, val_df = df[~val_mask], df[val_mask]
        self.spec = spec = fit_features(train_df, self.contract)
        xtr_np, ytr_np = transform(train_df, spec), labels(train_df, spec)
        xva_np, self.y_va = transform(val_df, spec), labels(val_df, spec)
        if len(xtr_np) < 2 or len(xva_np) < 1:
            raise ValueError(
                f"need training and validation rows, got {len(xtr_np)} / {len(xva_np)}"
            )
        self.fingerprint = _fingerprint(config, xtr_np, ytr_np, xva_np, self.y_va)
        self.x_tr, self.y_tr = (
            torch.from_numpy(xtr_np).to(device),
            torch.from_numpy(ytr_np).to(device),
        )
        self.x_va = torch.from_numpy(xva_np).to(device)
        self.train_rows, self.val_rows = len(train_df), len(val_df)

    def _build_model(self) -> None:
        """The model, its optimizer, the (distributed) forward, the learning-rate schedule."""
        config, spec, device = self.config, self.spec, self.device
        self.ref = model_ref_for(config.factory, config.factory_kwargs, self.code_file)
        task = "binary" if len(spec.classes) == 2 else "multiclass"
        inputs = ModelInputs(self.x_tr.shape[1], len(spec.classes), spec, task)
        self.model = build_model(self.ref, inputs, self.code_file).to(device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = _make_optimizer(config, self.model, device)
        self.net = distributed.wrap(self.model, device, self.ranks)  # forward; weights: model
        self.n, self.bs = len(self.x_tr), config.batch_size
        self.steps_per_epoch = distributed.steps_per_epoch(self.n, self.bs, self.ranks)
        total_steps = config.max_epochs * self.steps_per_epoch
        self.schedule = LRSchedule(
            config.learning_rate,
            total_steps,
            min(config.warmup_steps, total_steps),
            config.lr_schedule,
            config.min_lr_ratio,
            config.lr_step_every,
            config.lr_gamma,
        )

    def _build_instruments(self) -> None:
        """Stopper, per-sample statistics, telemetry, state store, loss, shuffling RNG."""
        config = self.config
        every = validation_cadence(config, self.steps_per_epoch)
        positions = validation_positions(every, self.steps_per_epoch)
        self.val_within = frozenset(positions[:-1])  # the last one is the epoch's end
        # the stopper counts validations; its patience and window are in epochs
        self.stopper = GradientPlateauStopper(**config.stopper, val_per_epoch=len(positions))
        self.eb_stats = PerSampleGradStats(self.model) if self.stopper.eb else None
        self.telemetry = (
            GradientTelemetry(
                list(self.model.named_parameters()),
                snapshot_every=telemetry_cadence(config, self.steps_per_epoch),
                max_history=max(2, config.telemetry_snapshots),
                metric_points=TELEMETRY_METRIC_POINTS,
                sink=self.sink,
                spill_dir=self.state_dir,
                sparse=sparse_parameters(self.model),
            )
            if config.telemetry and self.ranks.main
            else None
        )
        self.store = (
            TrainingStateStore(self.state_dir, remote=self.state_remote)
            if self.state_dir is not None and config.state_every
            else None
        )
        self.loss_fn = nn.CrossEntropyLoss()
        self.gen = torch.Generator(device="cpu").manual_seed(config.seed)
        self.use_bf16 = self.precision == "bf16"
        self.clip = config.grad_clip if config.grad_clip is not None else math.inf
        self.acc = _Accumulator(self.device)
        self.eb_checks = max(1, config.eb_every // config.check_every)
        self._last_val: tuple[int, dict[str, float]] | None = None  # (step, metrics)

    def _start_result(self) -> None:
        self.result = TrainResult(
            self.model,
            self.spec,
            self.ref,
            self.config,
            device=str(self.device),
            precision=self.precision,
            train_rows=self.train_rows,
            val_rows=self.val_rows,
            world_size=self.ranks.world,
            rank=self.ranks.rank,
        )
        self.progress = _Progress()
        self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.perm: torch.Tensor | None = None
        self._t0 = (0.0, 0.0)  # the step loop's lap start (``_train_epoch``, ``_lap``)

    def _resume(self) -> None:
        """Continue from the newest valid training state of this config and data, if any."""
        assert self.store is not None
        loaded = self.store.load_latest()
        if loaded is not None and loaded.state.get("fingerprint") != self.fingerprint:
            log.warning(
                "training state in %s is for another config or data; starting over",
                self.store.root,
            )
            if self.ranks.main:
                self.store.clear()
            loaded = None
        if loaded is None:
            return
        self._restore(loaded.tensors, loaded.state)
        p = self.progress
        self.result.resumed_from = {
            "step": loaded.step,
            "path": str(loaded.path),
            "manifest_sha256": loaded.manifest_sha256,
            "epoch": p.epoch,
            "position_in_epoch": p.pos,
        }
        log.info(
            "resumed from training state %s (step %d, epoch %d, batch %d of %d; "
            "manifest sha256 %s)",
            loaded.path.name,
            loaded.step,
            p.epoch,
            p.pos,
            self.steps_per_epoch,
            loaded.manifest_sha256[:12],
        )

    def _restore(self, t: dict[str, torch.Tensor], st: dict[str, Any]) -> None:
        """Everything ``_snapshot_state`` saved, back in place."""
        self.model.load_state_dict(decode(st["model"], t))
        self.opt.load_state_dict(decode(st["optimizer"], t))
        self.best_state = {k: v.to(self.device) for k, v in decode(st["best"], t).items()}
        self.acc.load(decode(st["acc"], t))
        self.schedule.load_state_dict(st["schedule"])
        self.stopper.load_state_dict(st["stopper"])
        restore_rng(t, self.gen)
        self.perm = t["perm"] if t["perm"].numel() else None
        self.progress = _Progress(**{**asdict(self.progress), **st["loop"]})
        self.progress.best_loss = float(self.progress.best_loss)
        r = self.result
        r.history, r.best_epoch = st["history"], st["best_epoch"]
        r.val_metrics, r.stop_reason = st["val_metrics"], st["stop_reason"]
        if self.telemetry:
            self.telemetry.load_state_tensors(t, st["telemetry_taken"])

    def _tag_run(self) -> None:
        if self.sink is None:
            return
        resumed = {"train.resumed_from_step": str(self.progress.step)}
        _safe(
            self.sink.set_tags,
            {
                "train.device": str(self.device),
                "train.precision": self.precision,
                "train.optimizer": self.config.optimizer,
                **(resumed if self.result.resumed_from else {}),
            },
        )

    def _already_finished(self) -> TrainResult:
        self.model.eval()
        p = self.progress
        self.result.steps, self.result.validations = p.step, p.validations
        self.result.best_step = p.best_step
        self.result.decision_trace = self.stopper.trace
        if self.telemetry:
            self.result.telemetry = self.telemetry.close()
        return self.result

    # -- one epoch --------------------------------------------------------------------------

    def _train_epoch(self) -> bool:
        """The epoch's remaining batch steps, then its end. True: the epoch was cut short
        (a stop mid-epoch), its history row is partial."""
        p = self.progress
        if self.perm is None:
            self.perm = torch.randperm(self.n, generator=self.gen)
        perm_dev = self.perm.to(self.device)
        self.model.train()
        self._t0 = self._now()
        while p.pos < self.steps_per_epoch and not p.stopped:
            self._step(perm_dev)
        # the pending telemetry snapshots stay pending across epochs: a flush costs the same
        # whatever it holds (GradientTelemetry.capture_update decides when)
        self._lap()
        partial = p.pos < self.steps_per_epoch
        self._end_epoch(partial)
        return partial

    def _next_epoch(self) -> None:
        self.progress.epoch += 1
        self.progress.pos = 0
        self.perm = None

    def _step(self, perm_dev: torch.Tensor) -> None:
        """One optimizer step on the next batch; a stopper check every ``check_every``
        steps, a training-state checkpoint every ``state_every``."""
        config, p = self.config, self.progress
        p.step += 1
        step = p.step
        lr = self.schedule.apply(self.opt, step)
        idx = distributed.shard(perm_dev[p.pos * self.bs : (p.pos + 1) * self.bs], self.ranks)
        check = step % config.check_every == 0
        eb_due = (
            check
            and self.eb_stats is not None
            and (step // config.check_every) % self.eb_checks == 0
        )
        snap = self.telemetry is not None and self.telemetry.due(step)
        loss, norm, parts, batch = self._forward_backward(idx, eb_due, snap)
        host_vals = self.acc.add(loss, norm, len(idx))
        if host_vals is not None:
            self._guard_host(step, *host_vals)
        self.opt.step()
        p.pos += 1
        if snap:  # copies only; the statistics are batched (GradientTelemetry.flush)
            self.telemetry.capture_update(  # type: ignore[union-attr]
                step,
                {"loss": host_vals[0], "grad_norm": host_vals[1], "lr": lr}
                if host_vals is not None
                else {"loss": loss.detach(), "grad_norm": norm.detach(), "lr": lr},
            )
        host = self._read_back(loss, norm, parts, check)
        if check:
            self._check(step, host, eb_due, batch)
        if p.pos in self.val_within and not p.stopped:
            self._validate_within_epoch()  # the epoch's last one is _end_epoch's
        if self.store is not None and step % config.state_every == 0 and not p.stopped:
            self._t0 = self._lap()
            self._snapshot_state()

    def _forward_backward(
        self, idx: torch.Tensor, eb_due: bool, snap: bool
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], int]:
        """Loss, backward, the EB statistics and telemetry gradients when due, then the
        clipped gradient norm: (loss, pre-clip norm, device parts to read, batch size)."""
        if eb_due:
            self.eb_stats.arm()  # type: ignore[union-attr]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            loss = self.loss_fn(self.net(self.x_tr[idx]).float(), self.y_tr[idx])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        parts: dict[str, torch.Tensor] = {}  # everything the host needs, read in one copy
        batch = len(idx)
        if eb_due:
            eb_sum, eb_dims, batch = self.eb_stats.collect()  # type: ignore[union-attr]
            parts["eb"] = torch.stack([eb_sum, eb_dims])
        if snap:
            self.telemetry.capture_grads()  # type: ignore[union-attr]
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        return loss, norm, parts, batch

    def _guard_host(self, step: int, loss: float, norm: float) -> None:
        """Host mode (CPU) reads loss and norm every step: a non-finite one diverges at this
        step, and an exploding norm is decided on now, on the check window so far."""
        epoch = self.progress.epoch
        if not (math.isfinite(loss) and math.isfinite(norm)):
            self._lap()
            ev = StopEvidence(
                step=step,
                epoch=epoch,
                loss=loss,
                grad_norm=norm,
                max_grad_norm=norm,
                nonfinite=True,
            )
            self._diverge(self.stopper.update(ev))
        if norm > self.stopper.divergence_limit(self.acc.check[6]):
            self._lap()  # exploding between checks: decide now, on this window so far
            ev = StopEvidence(step=step, epoch=epoch, **self.acc.evidence(None))
            self._handle(self.stopper.update(ev))

    def _read_back(
        self,
        loss: torch.Tensor,
        norm: torch.Tensor,
        parts: dict[str, torch.Tensor],
        check: bool,
    ) -> dict[str, np.ndarray]:
        """The step's one device→host copy (EB terms, the device-mode check window)."""
        if check and not self.acc.host:
            parts["acc"] = self.acc.check
        return _to_host(parts)

    def _check(self, step: int, host: dict[str, np.ndarray], eb_due: bool, batch: int) -> None:
        """The stopper's gradient check on the window since the last one."""
        ev_acc = self.acc.evidence(host.get("acc"))
        eb_part: dict[str, Any] = (
            {"eb_sum": float(host["eb"][0]), "eb_dims": int(host["eb"][1]), "batch_size": batch}
            if eb_due
            else {}
        )
        self.acc.reset_check()
        ev = StopEvidence(step=step, epoch=self.progress.epoch, **ev_acc, **eb_part)
        self._handle(self.stopper.update(ev))

    # -- the stopper's decisions --------------------------------------------------------------

    def _handle(self, d: StopDecision) -> None:
        if self.ranks.active:  # every rank acts on rank 0's decision and keeps rank 0's
            d = distributed.from_main(d, self.ranks)  # stopper state, so the next checks
            self.stopper.state = d.state  # agree as well
        if d.verdict is StopVerdict.DIVERGED:
            self._diverge(d)
        elif d.verdict is StopVerdict.REDUCE_LR:
            self.schedule.scale *= self.stopper.reduce_lr_factor or 1.0
            log.info(
                "step %d: %s — learning rate scale now %.3g",
                d.step,
                d.reason.value,
                self.schedule.scale,
            )
            self._event(f"reduce_lr-step-{d.step}", d)
        elif d.verdict is StopVerdict.STOP:
            self.progress.stopped = True
            self.result.stop_reason = d.reason.value
            log.info("step %d: stop (%s)", d.step, d.reason.value)

    def _diverge(self, d: StopDecision) -> None:
        p = self.progress
        if self.telemetry:  # the offending gradient, non-finite counts included
            self.telemetry.snapshot_now(p.step)
        self._event(f"diverged-step-{d.step}", d)
        if self.telemetry:
            self.result.telemetry = {**self.telemetry.close(), **self.result.telemetry}
        raise TrainingDiverged(
            f"training diverged: {d.message}, epoch {p.epoch}, learning rate "
            f"{self.schedule.lr(max(d.step, 1)):.3g} ({self.config.optimizer}); lower the "
            f"learning rate (now {self.config.learning_rate}) or clip gradients harder — "
            "no checkpoint was written"
        )

    def _event(self, tag: str, decision: StopDecision | None = None) -> None:
        """The decision trace (and the records of the non-continue decisions) to the run —
        or to a local file when that fails —, and the event's telemetry artifacts."""
        stopper = self.stopper
        trace = json.dumps(
            {"decisions": stopper.trace, "config": stopper.config(), "records": stopper.records},
            default=str,
        )
        if self.sink is not None and not _safe(
            self.sink.log_text, trace, "training/decision_trace.json"
        ):
            keep = (
                self.telemetry.spill_dir
                if self.telemetry
                else (self.state_dir or Path(tempfile.mkdtemp()))
            )
            keep.mkdir(parents=True, exist_ok=True)
            (keep / "decision_trace.json").write_text(trace)
            self.result.telemetry["decision_trace_file"] = str(keep / "decision_trace.json")
            log.warning(
                "decision trace not logged to the run; kept at %s", keep / "decision_trace.json"
            )
        if self.telemetry:
            summary: dict[str, Any] = {
                "step": self.progress.step,
                "epoch": self.progress.epoch,
                "stop_reason": self.result.stop_reason or None,
            }
            if decision is not None:
                summary["decision"] = decision.to_dict()
                last = stopper.records[-1] if stopper.records else None
                if last is not None and last["decision"]["step"] == decision.step:
                    summary["record"] = last  # replayable: pipeline.decisions.replay
            self.telemetry.write_artifacts(tag, summary)

    # -- end of an epoch, end of the run --------------------------------------------------------

    def _end_epoch(self, partial: bool) -> None:
        """Validation, the history row, the best weights so far; after a whole epoch, the
        validation-loss decision."""
        p = self.progress
        metrics = self._validate()
        tel_cpu = self._record_epoch(metrics, partial)
        self._keep_if_best(metrics)
        self.acc.reset_epoch()
        p.epoch_seconds = p.epoch_cpu_seconds = 0.0
        p.tel_cpu_mark = tel_cpu
        if not partial and not p.stopped:
            self._val_decision(metrics)

    def _validate_within_epoch(self) -> None:
        """A validation within the epoch (``validation_positions``): the best
        weights and the stopper's validation decision, as at an epoch's end. Not step-loop
        time (``epoch_seconds``), like the epoch-end validation."""
        self._lap()
        metrics = self._validate()
        self.model.train()
        self._keep_if_best(metrics)
        self._val_decision(metrics)
        self._t0 = self._now()

    def _keep_if_best(self, metrics: dict[str, float]) -> None:
        p = self.progress
        if metrics["log_loss"] < p.best_loss:
            p.best_loss, p.best_step = metrics["log_loss"], p.step
            self.best_state.update(
                {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            )
            self.result.best_epoch, self.result.val_metrics = p.epoch, metrics

    def _val_decision(self, metrics: dict[str, float]) -> None:
        p = self.progress
        ev = StopEvidence(step=p.step, epoch=p.epoch, val_loss=metrics["log_loss"])
        self._handle(self.stopper.update(ev))

    def _validate(self) -> dict[str, float]:
        """The validation set's metrics; weights that overflowed in the last step(s) diverge.
        One pass per step: an epoch cut short right after a validation reuses it."""
        p = self.progress
        if self._last_val is not None and self._last_val[0] == p.step:
            return self._last_val[1]
        proba = predict_proba(self.model, self.x_va).float().cpu().numpy()
        p.validations += 1
        if not np.isfinite(proba).all():
            ev = StopEvidence(step=p.step, epoch=p.epoch, val_loss=float("nan"))
            self._diverge(self.stopper.update(ev))
        metrics = classification_metrics(self.y_va, proba)
        self._last_val = (p.step, metrics)
        return metrics

    def _record_epoch(self, metrics: dict[str, float], partial: bool) -> float:
        """Append and log the epoch's history row; returns the telemetry sender's CPU
        seconds so far (the next epoch's mark)."""
        config, p, history = self.config, self.progress, self.result.history
        ep_loss, ep_norm, ep_steps = self.acc.epoch_values()
        tel_cpu = self.telemetry.sender_cpu_s if self.telemetry else 0.0
        seen = min(p.pos * self.bs, self.n) // self.ranks.world  # this process's rows
        row = {
            "epoch": p.epoch,
            "step": p.step,
            "train_loss": ep_loss / max(seen, 1),
            "grad_norm": ep_norm / max(ep_steps, 1),
            "lr": self.schedule.lr(max(p.step, 1)),
            "seconds": p.epoch_seconds,
            "cpu_seconds": p.epoch_cpu_seconds,
            "telemetry_cpu_seconds": tel_cpu - p.tel_cpu_mark,
            **({"partial": 1.0} if partial else {}),
            **{f"val_{k}": v for k, v in metrics.items()},
        }
        history.append(row)
        done = [h["seconds"] for h in history if not h.get("partial")]
        eta = (config.max_epochs - p.epoch) * sum(done) / max(len(done), 1)  # upper bound
        log.info(
            "epoch %d/%d step %d train_loss=%.4f val_loss=%.4f val_roc_auc=%.4f grad_norm=%.4f "
            "rows/s=%.0f eta<=%.0fs",
            p.epoch,
            config.max_epochs,
            p.step,
            row["train_loss"],
            metrics["log_loss"],
            metrics.get("roc_auc", float("nan")),
            row["grad_norm"],
            seen / max(row["seconds"], 1e-9),
            eta,
            extra={"progress": True},
        )
        return tel_cpu

    def _finish(self) -> None:
        """The stop snapshot, the weights to keep, the final state and decision trace."""
        r, p = self.result, self.progress
        if not r.stop_reason:
            r.stop_reason = "max_epochs"
        r.steps, r.validations, r.best_step = p.step, p.validations, p.best_step
        tel = self.telemetry
        if tel:
            tel.flush()  # the pending snapshots first: is the stop step one of them?
        if tel and (not tel.steps or tel.steps[-1] != p.step):
            tel.snapshot_now(p.step)  # the gradient at the stop, for the record
        if self.config.restore_best:
            self.model.load_state_dict(self.best_state)
        else:  # the last weights: report their validation metrics
            last = r.history[-1]
            r.best_epoch, r.best_step = int(last["epoch"]), p.step
            r.val_metrics = {
                k.removeprefix("val_"): v for k, v in last.items() if k.startswith("val_")
            }
        self.model.eval()
        p.finished = True
        r.decision_trace = self.stopper.trace
        r.stop_records = list(self.stopper.records)
        if self.store is not None:
            self._snapshot_state(final=True)
        self._event("final", None)

    def _release(self) -> None:
        """However the run ends: hooks off, telemetry flushed and accounted."""
        if self.eb_stats is not None:
            self.eb_stats.disarm()
        if self.telemetry is not None:
            self.result.telemetry = {**self.telemetry.close(), **self.result.telemetry}

    # -- training states and step-loop time ------------------------------------------------------

    def _snapshot_state(self, final: bool = False) -> None:
        """A training-state checkpoint of everything ``_restore`` needs (rank 0 only)."""
        if not self.ranks.main:
            return
        r, tel = self.result, self.telemetry
        tensors: dict[str, torch.Tensor] = {}
        state = {
            "fingerprint": self.fingerprint,
            "config": self.config.to_dict(),
            "loop": asdict(self.progress),
            "history": r.history,
            "best_epoch": r.best_epoch,
            "val_metrics": r.val_metrics,
            "stop_reason": r.stop_reason,
            "schedule": self.schedule.state_dict(),
            "stopper": self.stopper.state_dict(),
            "optimizer": encode(self.opt.state_dict(), tensors, "optim"),
            "model": encode(self.model.state_dict(), tensors, "model"),
            "best": encode(self.best_state, tensors, "best"),
            "acc": encode(self.acc.state(), tensors, "acc"),
            "telemetry_taken": tel.taken if tel else 0,
        }
        tensors.update(rng_tensors(self.gen))
        perm = self.perm
        tensors["perm"] = perm if perm is not None else torch.zeros(0, dtype=torch.int64)
        if tel:
            tensors.update(tel.state_tensors())
        assert self.store is not None
        self.store.save(self.progress.step, tensors, state, final=final)

    @staticmethod
    def _now() -> tuple[float, float]:
        return time.perf_counter(), time.thread_time()

    def _lap(self) -> tuple[float, float]:
        """Add the wall and this thread's CPU time since ``_t0`` to the epoch's step-loop
        time; returns now (the caller may make it the new ``_t0``)."""
        now = self._now()
        self.progress.epoch_seconds += now[0] - self._t0[0]
        self.progress.epoch_cpu_seconds += now[1] - self._t0[1]
        return now


def _to_host(parts: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """One device->host copy for all of ``parts`` (flattened, float32), split again by name."""
    if not parts:
        return {}
    flat = torch.cat([t.reshape(-1).float() for t in parts.values()]).cpu().numpy()
    out, at = {}, 0
    for name, t in parts.items():
        out[name] = flat[at : at + t.numel()]
        at += t.numel()
    return out


def _safe(fn: Any, *args: Any) -> bool:
    """Tracking calls outside the hot loop: a failure is logged, never fatal to training."""
    try:
        fn(*args)
        return True
    except Exception as exc:  # noqa: BLE001
        log.warning("tracking call %s failed: %s", getattr(fn, "__name__", fn), exc)
        return False
