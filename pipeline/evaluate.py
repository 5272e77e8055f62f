"""Evaluation: score a model on labelled data with the metrics the gates use, and time it.

Everything here goes raw rows -> features -> model, the path serving takes, so the
latency measured is the latency a caller of the registered model sees.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from pipeline.metrics import classification_metrics
from pipeline.train.features import FeatureSpec, labels, transform
from pipeline.train.model import predict_proba


def predict_frame(model: nn.Module, spec: FeatureSpec, rows: pd.DataFrame) -> pd.DataFrame:
    """Class probabilities for raw rows, one ``proba_<class>`` column per class."""
    proba = score_model(model, spec, rows)
    return pd.DataFrame(proba, columns=[f"proba_{c}" for c in spec.classes], index=rows.index)


def score_model(model: nn.Module, spec: FeatureSpec, df: pd.DataFrame) -> np.ndarray:
    """Class probabilities (rows x classes, float32) for raw rows."""
    x = torch.from_numpy(transform(df, spec))
    return predict_proba(model.cpu(), x).numpy()


def evaluate_model(model: nn.Module, spec: FeatureSpec, df: pd.DataFrame) -> dict[str, float]:
    return classification_metrics(labels(df, spec), score_model(model, spec, df))


@dataclass(frozen=True)
class LatencyReport:
    batch_size: int
    batches: int
    p50_ms: float
    p95_ms: float
    max_ms: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_latency(
    model: nn.Module,
    spec: FeatureSpec,
    df: pd.DataFrame,
    *,
    batch_size: int = 256,
    batches: int = 40,
    warmup: int = 3,
) -> LatencyReport:
    """Wall time per batch of ``batch_size`` raw rows (features + forward pass), on CPU,
    one thread pool as configured; ``warmup`` batches are run first and not counted."""
    if len(df) == 0:
        raise ValueError("cannot time a model on an empty frame")
    model = model.cpu().eval()
    starts = np.arange(batches + warmup) * batch_size % max(len(df) - batch_size, 1)
    times: list[float] = []
    for i, s in enumerate(starts):
        chunk = df.iloc[int(s) : int(s) + batch_size]
        t0 = time.perf_counter()
        predict_proba(model, torch.from_numpy(transform(chunk, spec)))
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1000)
    arr = np.asarray(times)
    return LatencyReport(
        batch_size,
        len(arr),
        float(np.percentile(arr, 50)),
        float(np.percentile(arr, 95)),
        float(arr.max()),
    )
