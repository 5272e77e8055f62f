"""Contract-driven featurisation: standardised numerics, one-hot categoricals.

The fitted state is plain JSON (means, scales, category lists), stored in the
checkpoint manifest, so a model is always reloaded with the exact preprocessing
it was trained with — and nothing is pickled.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from pipeline.contract import DataContract


@dataclass(frozen=True)
class FeatureSpec:
    numeric: list[str]
    means: list[float]
    scales: list[float]
    log_scaled: list[str]
    # Ordered (column, categories) pairs: a list, because column order fixes the layout
    # of the feature vector and JSON objects are not ordered once keys are sorted.
    categorical: list[tuple[str, list[str]]]
    target: str
    classes: list[int]

    @property
    def width(self) -> int:
        return len(self.numeric) * 2 + sum(len(v) + 1 for _, v in self.categorical)

    @property
    def input_columns(self) -> list[str]:
        return self.numeric + [c for c, _ in self.categorical]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["categorical"] = [[c, list(v)] for c, v in self.categorical]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureSpec:
        d = dict(d)
        d["categorical"] = [(str(c), list(v)) for c, v in d["categorical"]]
        return cls(**d)


def fit_features(df: pd.DataFrame, contract: DataContract) -> FeatureSpec:
    numeric = contract.numeric_features
    log_scaled = [c for c in numeric if _skewed(contract, c)]
    means, scales = [], []
    for col in numeric:
        values = _numeric(df[col])
        values = np.log1p(np.clip(values, 0, None)) if col in log_scaled else values
        m = float(np.nanmean(values)) if np.isfinite(values).any() else 0.0
        sd = float(np.nanstd(values)) if np.isfinite(values).any() else 1.0
        means.append(m)
        scales.append(sd if sd > 1e-12 else 1.0)
    categorical = [(c, list(contract.column(c).categories)) for c in contract.categorical_features]
    return FeatureSpec(
        numeric,
        means,
        scales,
        log_scaled,
        categorical,
        contract.target,
        list(contract.target_values),
    )


_LOG_SCALE_MIN_RANGE = 1000.0


def _skewed(contract: DataContract, col: str) -> bool:
    c = contract.column(col)
    return (
        c.min is not None
        and c.min >= 0
        and c.max is not None
        and c.max - c.min >= _LOG_SCALE_MIN_RANGE
    )


def _numeric(s: pd.Series) -> np.ndarray:
    return pd.to_numeric(s, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)


def transform(df: pd.DataFrame, spec: FeatureSpec) -> np.ndarray:
    """Feature matrix (float32): per numeric a standardised value and a missing flag;
    per categorical a one-hot block plus an 'unknown' slot."""
    blocks = []
    for col, m, sd in zip(spec.numeric, spec.means, spec.scales, strict=True):
        v = _numeric(df[col])
        if col in spec.log_scaled:
            v = np.log1p(np.clip(v, 0, None))
        missing = ~np.isfinite(v)
        blocks.append(np.where(missing, 0.0, (v - m) / sd)[:, None])
        blocks.append(missing.astype(np.float64)[:, None])
    for col, cats in spec.categorical:
        codes = pd.Categorical(df[col], categories=cats).codes  # -1 = unknown
        onehot = np.zeros((len(df), len(cats) + 1))
        onehot[np.arange(len(df)), np.where(codes < 0, len(cats), codes)] = 1.0
        blocks.append(onehot)
    return np.hstack(blocks).astype(np.float32)


def labels(df: pd.DataFrame, spec: FeatureSpec) -> np.ndarray:
    """Class indices 0..K-1 in the contract's order of target values."""
    index = {v: i for i, v in enumerate(spec.classes)}
    y = df[spec.target].map(index)
    if y.isna().any():
        bad = sorted(set(df.loc[y.isna(), spec.target].astype(str)))[:5]
        raise ValueError(f"label column {spec.target!r} has values outside {spec.classes}: {bad}")
    return y.to_numpy(dtype=np.int64)
