"""The model: a small MLP classifier over contract-derived features."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class ModelConfig:
    input_dim: int
    num_classes: int
    hidden: tuple[int, ...] = (64, 32)
    dropout: float = 0.1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return cls(
            input_dim=int(d["input_dim"]),
            num_classes=int(d["num_classes"]),
            hidden=tuple(int(h) for h in d["hidden"]),
            dropout=float(d["dropout"]),
        )


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = config.input_dim
        for h in config.hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(config.dropout)]
            width = h
        layers.append(nn.Linear(width, config.num_classes))
        self.net = nn.Sequential(*layers)
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def pick_device(preference: str = "auto") -> torch.device:
    """CUDA, then MPS, then CPU — unless a device is named explicitly."""
    if preference != "auto":
        return torch.device(preference)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor, batch_size: int = 65_536) -> torch.Tensor:
    model.eval()
    outs = [torch.softmax(model(x[i : i + batch_size]).float(), dim=1) for i in range(0, len(x), batch_size)]
    return torch.cat(outs) if outs else torch.empty(0, 0)
