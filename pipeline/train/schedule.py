"""Learning-rate schedules as pure functions of the step: linear warmup, then cosine or step.

The state is two numbers (``scale``, set by the stopper's reduce-LR stage, and the
configuration), so it round-trips through JSON in a training-state checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

KINDS = ("cosine", "step", "constant")


@dataclass
class LRSchedule:
    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    kind: str = "cosine"
    min_lr_ratio: float = 0.0
    step_every: int = 1000  # "step": multiply by gamma every step_every steps after warmup
    gamma: float = 0.5
    scale: float = 1.0  # reduce-LR stage multiplies this

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"lr schedule must be one of {KINDS}, got {self.kind!r}")
        if self.base_lr <= 0 or self.total_steps < 1 or self.warmup_steps < 0:
            raise ValueError(
                f"bad schedule: base_lr={self.base_lr} total_steps={self.total_steps} "
                f"warmup_steps={self.warmup_steps}"
            )
        if not 0 <= self.min_lr_ratio <= 1 or not 0 < self.gamma <= 1 or self.step_every < 1:
            raise ValueError(
                f"bad schedule: min_lr_ratio={self.min_lr_ratio} gamma={self.gamma} "
                f"step_every={self.step_every}"
            )

    def factor(self, step: int) -> float:
        """Multiplier of ``base_lr`` for optimizer step ``step`` (1-based)."""
        if self.warmup_steps and step <= self.warmup_steps:
            return step / self.warmup_steps
        after = step - self.warmup_steps
        if self.kind == "cosine":
            span = max(self.total_steps - self.warmup_steps, 1)
            p = min(max(after / span, 0.0), 1.0)
            return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))
        if self.kind == "step":
            return self.gamma ** (max(after - 1, 0) // self.step_every)
        return 1.0

    def lr(self, step: int) -> float:
        return self.base_lr * self.factor(step) * self.scale

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self.lr(step)
        for g in optimizer.param_groups:
            g["lr"] = lr
        return lr

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.scale = float(sd["scale"])
