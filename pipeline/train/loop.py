"""Gradient descent on resident tensors, with early stopping and best-weights restore.

Data stays on the device as tensors and is shuffled by index each epoch: no
per-sample DataLoader on the hot path. The stopping rule here is the simple one
(validation loss patience and a gradient-norm plateau); the full gradient-aware
stopper is its own module.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from pipeline.contract import DataContract
from pipeline.metrics import classification_metrics
from pipeline.train.features import FeatureSpec, fit_features, labels, transform
from pipeline.train.model import MLP, ModelConfig, pick_device, predict_proba

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Loss or gradient became non-finite: no checkpoint may come out of this run."""


@dataclass(frozen=True)
class TrainConfig:
    max_epochs: int = 30
    learning_rate: float = 3e-3
    batch_size: int = 512
    weight_decay: float = 1e-4
    hidden: tuple[int, ...] = (64, 32)
    dropout: float = 0.1
    seed: int = 0
    patience: int = 4
    grad_plateau_window: int = 5
    grad_plateau_tol: float = 0.01
    val_fraction: float = 0.2
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.max_epochs < 1:
            raise ValueError(f"max_epochs must be >= 1, got {self.max_epochs}")
        if not 0 < self.learning_rate < 1:
            raise ValueError(f"learning_rate must be in (0, 1), got {self.learning_rate}")
        if not 0 < self.val_fraction < 0.9:
            raise ValueError(f"val_fraction must be in (0, 0.9), got {self.val_fraction}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    model: MLP
    features: FeatureSpec
    model_config: ModelConfig
    config: TrainConfig
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    stop_reason: str = ""
    val_metrics: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"
    train_rows: int = 0
    val_rows: int = 0


def split_by_id(ids: pd.Series, val_fraction: float) -> np.ndarray:
    """Deterministic validation mask from a hash of the id (stable across reruns)."""
    h = pd.util.hash_pandas_object(ids.astype(str), index=False).to_numpy()
    return (h % 10_000) < int(val_fraction * 10_000)


def train(df: pd.DataFrame, contract: DataContract, config: TrainConfig) -> TrainResult:
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    device = pick_device(config.device)
    val_mask = split_by_id(df[contract.id_column], config.val_fraction)
    train_df, val_df = df[~val_mask], df[val_mask]
    spec = fit_features(train_df, contract)
    x_tr = torch.from_numpy(transform(train_df, spec)).to(device)
    y_tr = torch.from_numpy(labels(train_df, spec)).to(device)
    x_va = torch.from_numpy(transform(val_df, spec)).to(device)
    y_va = labels(val_df, spec)

    mcfg = ModelConfig(x_tr.shape[1], len(spec.classes), config.hidden, config.dropout)
    model = MLP(mcfg).to(device)
    opt = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay,
        fused=device.type == "cuda",
    )  # fmt: skip
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    use_bf16 = device.type == "cuda"

    result = TrainResult(model, spec, mcfg, config, device=str(device),
                         train_rows=len(train_df), val_rows=len(val_df))  # fmt: skip
    best_loss, best_state, bad_epochs = math.inf, copy.deepcopy(model.state_dict()), 0
    grad_norms: list[float] = []
    n = len(x_tr)
    for epoch in range(1, config.max_epochs + 1):
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(n, generator=gen).to(device)
        total, norm_sum, steps = 0.0, 0.0, 0
        for i in range(0, n, config.batch_size):
            idx = perm[i : i + config.batch_size]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = loss_fn(model(x_tr[idx]).float(), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0))
            loss_value = loss.item()
            if not (math.isfinite(gnorm) and math.isfinite(loss_value)):
                raise TrainingDiverged(
                    f"non-finite {'loss' if not math.isfinite(loss_value) else 'gradient'} "
                    f"at epoch {epoch}, step {steps}; lower the learning rate "
                    f"(now {config.learning_rate}) — no checkpoint was written"
                )
            opt.step()
            total += loss_value * len(idx)
            norm_sum += gnorm
            steps += 1
        proba = predict_proba(model, x_va).cpu().numpy()
        metrics = classification_metrics(y_va, proba)
        grad_norms.append(norm_sum / max(steps, 1))
        row = {"epoch": epoch, "train_loss": total / n, "grad_norm": grad_norms[-1],
               "seconds": time.perf_counter() - t0, **{f"val_{k}": v for k, v in metrics.items()}}  # fmt: skip
        result.history.append(row)
        log.info(
            "epoch %d/%d train_loss=%.4f val_loss=%.4f val_roc_auc=%.4f grad_norm=%.4f rows/s=%.0f",
            epoch, config.max_epochs, row["train_loss"], metrics["log_loss"],
            metrics.get("roc_auc", float("nan")), grad_norms[-1], n / max(row["seconds"], 1e-9),
        )  # fmt: skip
        if metrics["log_loss"] < best_loss - 1e-5:
            best_loss, bad_epochs = metrics["log_loss"], 0
            best_state = copy.deepcopy(model.state_dict())
            result.best_epoch, result.val_metrics = epoch, metrics
        else:
            bad_epochs += 1
        if bad_epochs >= config.patience:
            result.stop_reason = "val_loss_patience"
            break
        if _grad_plateau(grad_norms, config.grad_plateau_window, config.grad_plateau_tol):
            result.stop_reason = "grad_norm_plateau"
            break
    else:
        result.stop_reason = "max_epochs"
    model.load_state_dict(best_state)
    model.eval()
    return result


def _grad_plateau(norms: list[float], window: int, tol: float) -> bool:
    """Slope of log gradient norm per epoch over the last ``window`` epochs below ``tol``."""
    if len(norms) < window:
        return False
    y = np.log(np.asarray(norms[-window:]) + 1e-12)
    slope = np.polyfit(np.arange(window), y, 1)[0]
    return abs(slope) < tol
