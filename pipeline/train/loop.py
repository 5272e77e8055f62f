"""Gradient descent on resident tensors: stops itself on a gradient plateau, resumes after a crash.

Data stays on the device as tensors and is shuffled by index each epoch: no per-sample
DataLoader on the hot path. Device is picked automatically (CUDA, then MPS, then CPU);
on CUDA the forward pass runs under bf16 autocast and AdamW is fused. Optimizers: AdamW
or SGD with momentum; learning rate: linear warmup then cosine or step decay; gradients
clipped by global norm. Every epoch the validation set is scored (loss, ROC AUC, PR AUC
for binary targets) and the best weights (lowest validation loss) are restored at the end.

Every ``check_every`` steps the ``GradientPlateauStopper`` decides from gradient
statistics (log-norm plateau every check; the EB criterion from exact per-sample
variances every ``eb_every`` steps), and at each epoch end from the validation loss;
its decision trace is logged to the run. Defaults keep all of this, telemetry and
state checkpoints included, near 2.5% of step-loop CPU on the reference MLP
(``python -m benchmarks.training_overhead``).
Every ``snapshot_every`` steps ``GradientTelemetry`` takes per-tensor gradient
statistics (one device→host copy, shipped by a background thread). Every
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
    Verdict,
)
from pipeline.train.telemetry import GradientTelemetry, TelemetrySink

__all__ = [
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "split_by_id",
    "holdout_mask",
    "train",
    "iter_train",
    "default_stopper",
    "val_patience_stopper",
    "no_stopper",
]

log = logging.getLogger(__name__)


def default_stopper() -> dict[str, Any]:
    """Our stopper: EB criterion or log-norm plateau (confirmed), and a relative
    val-loss plateau, after a short warmup."""
    return {
        "eb": True,
        "eb_window": 4,
        "eb_threshold": 0.0,
        "eb_hysteresis": 0.05,
        "norm_plateau": True,
        "norm_window": 6,
        "norm_tol": 0.5,
        "val_mode": "rel",
        "val_min_delta": 1e-3,
        "patience": 3,
        "warmup_steps": 100,
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
    snapshot_every: int = (
        500  # gradient telemetry snapshots (one log_batch each; + one at the stop)
    )
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
            min(self.check_every, self.snapshot_every, self.lr_step_every) < 1
            or self.state_every < 0
        ):
            raise ValueError(
                "check_every, snapshot_every, lr_step_every must be >= 1; state_every >= 0"
            )
        if self.eb_every < 1:
            raise ValueError(f"eb_every must be >= 1, got {self.eb_every}")
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
    world_size: int = 1  # training processes (torchrun ranks); this result is rank ``rank``'s
    rank: int = 0
    resumed_from: dict[str, Any] | None = None
    decision_trace: list[dict[str, Any]] = field(default_factory=list)
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


_OPERATIONAL = ("device", "state_every", "snapshot_every", "telemetry")


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
    code_file: Path | None = None,
) -> TrainResult:
    """Train the spec's model (``config.factory``; ``code_file`` when the factory is a
    spec-local module) on ``df`` as the contract describes it.

    ``sink`` receives telemetry, the decision trace, tags and event artifacts (an MLflow
    run in the pipeline). ``state_dir`` enables crash-safe training-state checkpoints
    there and resumes from the newest valid one whose fingerprint (config + data)
    matches. Raises ``TrainingDiverged`` on a non-finite or exploding loss/gradient.
    """
    epochs = iter_train(df, contract, config, sink=sink, state_dir=state_dir, code_file=code_file)
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
    code_file: Path | None = None,
) -> Generator[dict[str, float], None, TrainResult]:
    """``train`` one epoch at a time: yields each epoch's history row, returns the
    TrainResult. Lets a caller interleave trainings (the overhead benchmark does)."""
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    ranks = distributed.ranks()  # one process, or one of torchrun's: see pipeline.train.distributed
    device = distributed.place(pick_device(config.device), ranks)
    if not ranks.main:
        sink = None  # rank 0 alone writes: tracking, telemetry, training states
    precision = resolve_precision(config.precision, device)
    val_mask = holdout_mask(df, contract, config.val_fraction)
    train_df, val_df = df[~val_mask], df[val_mask]
    spec = fit_features(train_df, contract)
    xtr_np, ytr_np = transform(train_df, spec), labels(train_df, spec)
    xva_np, y_va = transform(val_df, spec), labels(val_df, spec)
    if len(xtr_np) < 2 or len(xva_np) < 1:
        raise ValueError(f"need training and validation rows, got {len(xtr_np)} / {len(xva_np)}")
    fingerprint = _fingerprint(config, xtr_np, ytr_np, xva_np, y_va)
    x_tr, y_tr = torch.from_numpy(xtr_np).to(device), torch.from_numpy(ytr_np).to(device)
    x_va = torch.from_numpy(xva_np).to(device)

    ref = model_ref_for(config.factory, config.factory_kwargs, code_file)
    inputs = ModelInputs(
        x_tr.shape[1], len(spec.classes), spec, "binary" if len(spec.classes) == 2 else "multiclass"
    )
    model = build_model(ref, inputs, code_file).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _make_optimizer(config, model, device)
    net = distributed.wrap(model, device, ranks)  # forward through this; weights live in model
    n, bs = len(x_tr), config.batch_size
    steps_per_epoch = distributed.steps_per_epoch(n, bs, ranks)  # = ceil(n / bs) in one process
    total_steps = config.max_epochs * steps_per_epoch
    schedule = LRSchedule(
        config.learning_rate,
        total_steps,
        min(config.warmup_steps, total_steps),
        config.lr_schedule,
        config.min_lr_ratio,
        config.lr_step_every,
        config.lr_gamma,
    )
    stopper = GradientPlateauStopper(**config.stopper)
    eb_stats = PerSampleGradStats(model) if stopper.eb else None
    telemetry = (
        GradientTelemetry(
            list(model.named_parameters()),
            snapshot_every=config.snapshot_every,
            sink=sink,
            spill_dir=state_dir,
        )
        if config.telemetry and ranks.main
        else None
    )
    store = TrainingStateStore(state_dir) if state_dir is not None and config.state_every else None
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    use_bf16 = precision == "bf16"
    clip = config.grad_clip if config.grad_clip is not None else math.inf
    acc = _Accumulator(device)
    eb_checks = max(1, config.eb_every // config.check_every)

    result = TrainResult(
        model,
        spec,
        ref,
        config,
        device=str(device),
        precision=precision,
        train_rows=len(train_df),
        val_rows=len(val_df),
        world_size=ranks.world,
        rank=ranks.rank,
    )
    loop: dict[str, Any] = {
        "step": 0,
        "epoch": 1,
        "pos": 0,
        "best_loss": math.inf,
        "stopped": False,
        "finished": False,
        "epoch_seconds": 0.0,
        "epoch_cpu_seconds": 0.0,
        "tel_cpu_mark": 0.0,
    }
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    perm: torch.Tensor | None = None

    def snapshot_state(final: bool = False) -> None:
        if not ranks.main:
            return
        tensors: dict[str, torch.Tensor] = {}
        state = {
            "fingerprint": fingerprint,
            "config": config.to_dict(),
            "loop": dict(loop),
            "history": result.history,
            "best_epoch": result.best_epoch,
            "val_metrics": result.val_metrics,
            "stop_reason": result.stop_reason,
            "schedule": schedule.state_dict(),
            "stopper": stopper.state_dict(),
            "optimizer": encode(opt.state_dict(), tensors, "optim"),
            "model": encode(model.state_dict(), tensors, "model"),
            "best": encode(best_state, tensors, "best"),
            "acc": encode(acc.state(), tensors, "acc"),
            "telemetry_taken": telemetry.taken if telemetry else 0,
        }
        tensors.update(rng_tensors(gen))
        tensors["perm"] = perm if perm is not None else torch.zeros(0, dtype=torch.int64)
        if telemetry:
            tensors.update(telemetry.state_tensors())
        assert store is not None
        store.save(loop["step"], tensors, state, final=final)

    if store is not None:
        loaded = store.load_latest()
        if loaded is not None and loaded.state.get("fingerprint") != fingerprint:
            log.warning(
                "training state in %s is for another config or data; starting over", store.root
            )
            if ranks.main:
                store.clear()
            loaded = None
        if loaded is not None:
            t, st = loaded.tensors, loaded.state
            model.load_state_dict(decode(st["model"], t))
            opt.load_state_dict(decode(st["optimizer"], t))
            best_state = {k: v.to(device) for k, v in decode(st["best"], t).items()}
            acc.load(decode(st["acc"], t))
            schedule.load_state_dict(st["schedule"])
            stopper.load_state_dict(st["stopper"])
            restore_rng(t, gen)
            perm = t["perm"] if t["perm"].numel() else None
            loop.update(st["loop"])
            loop["best_loss"] = float(loop["best_loss"])
            result.history, result.best_epoch = st["history"], st["best_epoch"]
            result.val_metrics, result.stop_reason = st["val_metrics"], st["stop_reason"]
            if telemetry:
                telemetry.load_state_tensors(t, st["telemetry_taken"])
            result.resumed_from = {
                "step": loaded.step,
                "path": str(loaded.path),
                "manifest_sha256": loaded.manifest_sha256,
                "epoch": loop["epoch"],
                "position_in_epoch": loop["pos"],
            }
            log.info(
                "resumed from training state %s (step %d, epoch %d, batch %d of %d; "
                "manifest sha256 %s)",
                loaded.path.name,
                loaded.step,
                loop["epoch"],
                loop["pos"],
                steps_per_epoch,
                loaded.manifest_sha256[:12],
            )

    if sink is not None:
        _safe(
            sink.set_tags,
            {
                "train.device": str(device),
                "train.precision": precision,
                "train.optimizer": config.optimizer,
                **({"train.resumed_from_step": str(loop["step"])} if result.resumed_from else {}),
            },
        )

    if loop["finished"]:  # the state of a completed run (best weights restored): nothing left to do
        model.eval()
        result.steps = loop["step"]
        result.decision_trace = stopper.trace
        if telemetry:
            result.telemetry = telemetry.close()
        return result

    def event(tag: str, decision: StopDecision | None = None) -> None:
        trace = json.dumps({"decisions": stopper.trace, "config": stopper.config()}, default=str)
        if sink is not None and not _safe(sink.log_text, trace, "training/decision_trace.json"):
            keep = telemetry.spill_dir if telemetry else (state_dir or Path(tempfile.mkdtemp()))
            keep.mkdir(parents=True, exist_ok=True)
            (keep / "decision_trace.json").write_text(trace)
            result.telemetry["decision_trace_file"] = str(keep / "decision_trace.json")
            log.warning(
                "decision trace not logged to the run; kept at %s", keep / "decision_trace.json"
            )
        if telemetry:
            telemetry.write_artifacts(
                tag,
                {
                    "step": loop["step"],
                    "epoch": loop["epoch"],
                    **({"decision": decision.to_dict()} if decision else {}),
                },
            )

    def diverge(d: StopDecision) -> None:
        if telemetry:
            telemetry.snapshot_now(
                loop["step"]
            )  # the offending gradient, non-finite counts included
        event(f"diverged-step-{d.step}", d)
        if telemetry:
            result.telemetry = {**telemetry.close(), **result.telemetry}
        raise TrainingDiverged(
            f"training diverged: {d.message}, epoch {loop['epoch']}, learning rate "
            f"{schedule.lr(max(d.step, 1)):.3g} ({config.optimizer}); lower the learning rate "
            f"(now {config.learning_rate}) or clip gradients harder — no checkpoint was written"
        )

    def handle(d: StopDecision) -> None:
        if ranks.active:  # every rank acts on rank 0's decision and keeps rank 0's stopper
            d = distributed.from_main(d, ranks)  # state, so the next checks agree as well
            stopper.state = d.state
        if d.verdict is Verdict.DIVERGED:
            diverge(d)
        elif d.verdict is Verdict.REDUCE_LR:
            schedule.scale *= stopper.reduce_lr_factor or 1.0
            log.info(
                "step %d: %s — learning rate scale now %.3g", d.step, d.reason.value, schedule.scale
            )
            event(f"reduce_lr-step-{d.step}", d)
        elif d.verdict is Verdict.STOP:
            loop["stopped"] = True
            result.stop_reason = d.reason.value
            log.info("step %d: stop (%s)", d.step, d.reason.value)

    def _now() -> tuple[float, float]:
        return time.perf_counter(), time.thread_time()

    def _lap(t0: tuple[float, float]) -> tuple[float, float]:
        """Add the wall and this thread's CPU time since ``t0`` to the epoch's step-loop time."""
        now = _now()
        loop["epoch_seconds"] += now[0] - t0[0]
        loop["epoch_cpu_seconds"] += now[1] - t0[1]
        return now

    def end_epoch(partial: bool) -> None:
        proba = predict_proba(model, x_va).float().cpu().numpy()
        if not np.isfinite(proba).all():  # weights overflowed in the last step(s)
            diverge(
                stopper.update(
                    StopEvidence(step=loop["step"], epoch=loop["epoch"], val_loss=float("nan"))
                )
            )
        metrics = classification_metrics(y_va, proba)
        ep_loss, ep_norm, ep_steps = acc.epoch_values()
        tel_cpu = telemetry.sender_cpu_s if telemetry else 0.0  # the sender thread, this epoch
        seen = min(loop["pos"] * bs, n) // ranks.world  # this process's rows (rank 0's share)
        row = {
            "epoch": loop["epoch"],
            "step": loop["step"],
            "train_loss": ep_loss / max(seen, 1),
            "grad_norm": ep_norm / max(ep_steps, 1),
            "lr": schedule.lr(max(loop["step"], 1)),
            "seconds": loop["epoch_seconds"],
            "cpu_seconds": loop["epoch_cpu_seconds"],
            "telemetry_cpu_seconds": tel_cpu - loop["tel_cpu_mark"],
            **({"partial": 1.0} if partial else {}),
            **{f"val_{k}": v for k, v in metrics.items()},
        }
        result.history.append(row)
        done = [h["seconds"] for h in result.history if not h.get("partial")]
        eta = (config.max_epochs - loop["epoch"]) * sum(done) / max(len(done), 1)  # upper bound
        log.info(
            "epoch %d/%d step %d train_loss=%.4f val_loss=%.4f val_roc_auc=%.4f grad_norm=%.4f "
            "rows/s=%.0f eta<=%.0fs",
            loop["epoch"],
            config.max_epochs,
            loop["step"],
            row["train_loss"],
            metrics["log_loss"],
            metrics.get("roc_auc", float("nan")),
            row["grad_norm"],
            seen / max(row["seconds"], 1e-9),
            eta,
            extra={"progress": True},
        )
        if metrics["log_loss"] < loop["best_loss"]:
            loop["best_loss"] = metrics["log_loss"]
            best_state.update({k: v.detach().clone() for k, v in model.state_dict().items()})
            result.best_epoch, result.val_metrics = loop["epoch"], metrics
        acc.reset_epoch()
        loop["epoch_seconds"] = loop["epoch_cpu_seconds"] = 0.0
        loop["tel_cpu_mark"] = tel_cpu
        if not partial and not loop["stopped"]:
            handle(
                stopper.update(
                    StopEvidence(
                        step=loop["step"], epoch=loop["epoch"], val_loss=metrics["log_loss"]
                    )
                )
            )

    try:
        while loop["epoch"] <= config.max_epochs and not loop["stopped"]:
            if perm is None:
                perm = torch.randperm(n, generator=gen)
            perm_dev = perm.to(device)
            model.train()
            t0 = _now()
            while loop["pos"] < steps_per_epoch and not loop["stopped"]:
                loop["step"] += 1
                step = loop["step"]
                lr = schedule.apply(opt, step)
                idx = distributed.shard(perm_dev[loop["pos"] * bs : (loop["pos"] + 1) * bs], ranks)
                check = step % config.check_every == 0
                eb_due = (
                    check and eb_stats is not None and (step // config.check_every) % eb_checks == 0
                )
                snap = telemetry is not None and telemetry.due(step)
                if eb_due:
                    eb_stats.arm()  # type: ignore[union-attr]
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    loss = loss_fn(net(x_tr[idx]).float(), y_tr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                parts: dict[str, torch.Tensor] = {}  # everything the host needs, read in one copy
                batch = len(idx)
                if eb_due:
                    eb_sum, eb_dims, batch = eb_stats.collect()  # type: ignore[union-attr]
                    parts["eb"] = torch.stack([eb_sum, eb_dims])
                if snap:
                    telemetry.capture_grads()  # type: ignore[union-attr]
                norm = torch.nn.utils.clip_grad_norm_(params, clip)
                host_vals = acc.add(loss, norm, len(idx))
                if host_vals is not None and not (
                    math.isfinite(host_vals[0]) and math.isfinite(host_vals[1])
                ):
                    _lap(t0)
                    ev = StopEvidence(
                        step=step,
                        epoch=loop["epoch"],
                        loss=host_vals[0],
                        grad_norm=host_vals[1],
                        max_grad_norm=host_vals[1],
                        nonfinite=True,
                    )
                    diverge(stopper.update(ev))
                if host_vals is not None and host_vals[1] > stopper.divergence_limit(acc.check[6]):
                    _lap(t0)  # exploding between checks: decide now, on this window so far
                    handle(
                        stopper.update(
                            StopEvidence(step=step, epoch=loop["epoch"], **acc.evidence(None))
                        )
                    )
                opt.step()
                loop["pos"] += 1
                if snap:
                    parts["snap"] = telemetry.device_pack()  # type: ignore[union-attr]
                    parts["scalars"] = torch.stack([loss.detach().float(), norm.detach().float()])
                if check and not acc.host:
                    parts["acc"] = acc.check
                host = _to_host(parts)
                if snap:
                    telemetry.ingest(
                        step,
                        host["snap"],
                        {
                            "loss": float(host["scalars"][0]),
                            "lr": lr,  # type: ignore[union-attr]
                            "grad_norm": float(host["scalars"][1]),
                        },
                    )
                if check:
                    ev_acc = acc.evidence(host.get("acc"))
                    eb_part: dict[str, Any] = (
                        {
                            "eb_sum": float(host["eb"][0]),
                            "eb_dims": int(host["eb"][1]),
                            "batch_size": batch,
                        }
                        if eb_due
                        else {}
                    )
                    acc.reset_check()
                    handle(
                        stopper.update(
                            StopEvidence(step=step, epoch=loop["epoch"], **ev_acc, **eb_part)
                        )
                    )
                if store is not None and step % config.state_every == 0 and not loop["stopped"]:
                    t0 = _lap(t0)
                    snapshot_state()
            _lap(t0)
            partial = loop["pos"] < steps_per_epoch
            end_epoch(partial)
            yield result.history[-1]
            if not partial:
                loop["epoch"] += 1
                loop["pos"] = 0
                perm = None
        if not result.stop_reason:
            result.stop_reason = "max_epochs"
        result.steps = loop["step"]
        if telemetry and (not telemetry.steps or telemetry.steps[-1] != loop["step"]):
            telemetry.snapshot_now(loop["step"])  # the gradient at the stop, for the record
        if config.restore_best:
            model.load_state_dict(best_state)
        else:  # the last weights: report their validation metrics
            result.best_epoch, result.val_metrics = (
                int(result.history[-1]["epoch"]),
                {
                    k.removeprefix("val_"): v
                    for k, v in result.history[-1].items()
                    if k.startswith("val_")
                },
            )
        model.eval()
        loop["finished"] = True
        result.decision_trace = stopper.trace
        if store is not None:
            snapshot_state(final=True)
        event("final", None)
    finally:
        if eb_stats is not None:
            eb_stats.disarm()
        if telemetry is not None:
            result.telemetry = {**telemetry.close(), **result.telemetry}
    return result


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
