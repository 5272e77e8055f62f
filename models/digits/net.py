"""A small pre-norm residual MLP, the ``digits`` model's factory (``net:build``).

The pipeline calls ``build(inputs, **model.kwargs)`` with a ``ModelInputs`` (see
``pipeline/train/model.py``) and trains what it returns. Nothing here knows the dataset:
the widths come from ``inputs``, so the same file fits any contract.

This file is copied into every checkpoint and imported on its own (by file path, under a
name derived from its SHA-256), so it imports only torch: no relative imports, no
``pipeline`` or ``models`` imports.

Shape::

    x (rows, input_width)
      -> stem: Linear(input_width, width)
      -> blocks x [ h + Linear(Dropout(GELU(Linear(LayerNorm(h))))) ]
      -> LayerNorm -> head: Linear(width, num_classes)
    logits (rows, num_classes)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class ResidualBlock(nn.Module):
    """Pre-norm residual MLP block: ``h + W2(Dropout(GELU(W1(LayerNorm(h)))))``."""

    def __init__(self, width: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(self.drop(self.act(self.fc1(self.norm(h)))))


class ResidualMLP(nn.Module):
    def __init__(
        self, input_width: int, num_classes: int, width: int, blocks: int, dropout: float
    ) -> None:
        super().__init__()
        self.stem = nn.Linear(input_width, width)
        self.blocks = nn.Sequential(*(ResidualBlock(width, dropout) for _ in range(blocks)))
        self.norm = nn.LayerNorm(width)  # pre-norm blocks leave the residual stream unnormalised
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.stem(x))))


def _positive_int(name: str, value: Any, minimum: int) -> int:
    # bool is an int subclass: `width: true` in YAML is a mistake, not 1
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"model.kwargs.{name} must be an integer >= {minimum}, got {value!r}")
    return value


def build(inputs: Any, width: int = 128, blocks: int = 2, dropout: float = 0.1) -> ResidualMLP:
    """The factory: a residual MLP from ``inputs.input_width`` features to
    ``inputs.num_classes`` logits.

    ``width``: hidden width (>= 1); ``blocks``: residual blocks (>= 1); ``dropout``: inside
    each block, in [0, 1). Raises ValueError naming the bad kwarg.
    """
    width = _positive_int("width", width, 1)
    blocks = _positive_int("blocks", blocks, 1)
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise ValueError(f"model.kwargs.dropout must be a number in [0, 1), got {dropout!r}")
    input_width = getattr(inputs, "input_width", None)
    num_classes = getattr(inputs, "num_classes", None)
    if isinstance(input_width, bool) or not isinstance(input_width, int) or input_width < 1:
        raise ValueError(f"inputs.input_width must be an integer >= 1, got {input_width!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"inputs.num_classes must be an integer >= 2, got {num_classes!r}")
    return ResidualMLP(input_width, num_classes, width, blocks, float(dropout))
