"""Evaluation: score a model on labelled data with the metrics the gates use."""

from __future__ import annotations

import pandas as pd
import torch

from pipeline.metrics import classification_metrics
from pipeline.train.features import FeatureSpec, labels, transform
from pipeline.train.model import MLP, predict_proba


def evaluate_model(model: MLP, spec: FeatureSpec, df: pd.DataFrame) -> dict[str, float]:
    x = torch.from_numpy(transform(df, spec))
    proba = predict_proba(model.cpu(), x).numpy()
    return classification_metrics(labels(df, spec), proba)
