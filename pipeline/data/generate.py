"""Seeded generator of realistic card-transaction batches (the reference dataset).

Imbalanced binary fraud label; numeric features with skewed, realistic
distributions; categorical features; an event time and a unique id. Knobs move
the world the way production data moves:

- ``covariate_shift`` (0..1): feature distributions move (bigger amounts, more
  online and night-time traffic, more digital goods, longer distances);
- ``label_prior`` (multiplier): the fraud rate changes;
- ``concept_drift`` (0..1): the feature→label relationship changes (fraud moves
  from online card-not-present to ATM cash-outs far from home at night);
- ``label_poison`` (0..1): that fraction of true frauds is relabelled legit and as
  many decoy legit rows (cheap grocery) are relabelled fraud;
- ``schema_fault``: break the batch on purpose (see ``SCHEMA_FAULTS``).

Only this module and ``models/card_fraud/contract.yaml`` name these columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

MERCHANTS = [
    "grocery",
    "fuel",
    "restaurant",
    "travel",
    "electronics",
    "fashion",
    "gaming",
    "pharmacy",
    "digital_goods",
    "cash_withdrawal",
]
CHANNELS = ["pos", "online", "atm", "contactless"]
COUNTRIES = ["home", "neighbour", "far"]
SCHEMA_FAULTS = (
    "none",
    "missing_column",
    "renamed_column",
    "null_storm",
    "out_of_range",
    "unknown_category",
    "duplicate_ids",
    "future_time",
)


LABEL = "is_fraud"  # the reference data's label column


def positive_rate(df: pd.DataFrame) -> float | None:
    return float(df[LABEL].mean()) if LABEL in df else None


@dataclass(frozen=True)
class WorldSpec:
    rows: int = 20_000
    seed: int = 0
    start: str = "2026-01-01T00:00:00Z"
    covariate_shift: float = 0.0
    label_prior: float = 1.0
    concept_drift: float = 0.0
    label_poison: float = 0.0
    schema_fault: str = "none"
    base_fraud_rate: float = 0.04

    def __post_init__(self) -> None:
        if self.rows < 1:
            raise ValueError(f"rows must be >= 1, got {self.rows}")
        for name in ("covariate_shift", "concept_drift", "label_poison"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {v}")
        if self.label_prior <= 0:
            raise ValueError(f"label_prior must be > 0, got {self.label_prior}")
        if self.schema_fault not in SCHEMA_FAULTS:
            raise ValueError(
                f"schema_fault must be one of {SCHEMA_FAULTS}, got {self.schema_fault!r}"
            )


def _probs(base: list[float], shifted: list[float], s: float) -> np.ndarray:
    p = (1 - s) * np.asarray(base) + s * np.asarray(shifted)
    return p / p.sum()


def generate(spec: WorldSpec) -> pd.DataFrame:
    rng = np.random.default_rng(spec.seed)
    n, s, c = spec.rows, spec.covariate_shift, spec.concept_drift

    merchant = rng.choice(
        len(MERCHANTS),
        n,
        p=_probs(
            [0.22, 0.12, 0.15, 0.05, 0.07, 0.09, 0.05, 0.08, 0.07, 0.10],
            [0.12, 0.08, 0.10, 0.06, 0.12, 0.08, 0.10, 0.04, 0.20, 0.10],
            s,
        ),
    )
    channel = rng.choice(4, n, p=_probs([0.45, 0.25, 0.08, 0.22], [0.25, 0.45, 0.12, 0.18], s))
    country = rng.choice(3, n, p=_probs([0.85, 0.11, 0.04], [0.70, 0.18, 0.12], s))
    amount = np.round(rng.lognormal(3.4 + 0.7 * s, 1.0, n), 2)
    amount = np.clip(amount, 0.5, 99_000)
    card_age = rng.gamma(2.0, 400.0 * (1 - 0.4 * s), n).astype(int).clip(0, 19_999)
    hour_p = _probs(
        [1, 0.6, 0.4, 0.3, 0.3, 0.5, 1, 2, 3, 4, 4, 5, 6, 5, 5, 5, 5, 6, 6, 5, 4, 3, 2, 1.5],
        [3, 3, 3, 2.5, 2, 1.5, 1, 2, 3, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 3.5, 3.5],
        s,
    )
    hour = rng.choice(24, n, p=hour_p)
    distance = np.round(rng.lognormal(1.5 + 0.8 * s, 1.3, n), 2).clip(0, 19_999)
    distance = np.where(country == 2, distance + rng.uniform(500, 5000, n), distance)
    txn_count = rng.poisson(2.0 + 2.0 * s, n).clip(0, 499)
    merchant_risk = np.round(rng.beta(2 + 0.0 * s, 8 - 3 * s, n), 4)

    # Fraud logit: world A (online card-not-present) blended into world B (ATM cash-out).
    online = channel == 1
    night = (hour <= 4) | (hour >= 23)
    risky_merchant = np.isin(merchant, [4, 6, 8])
    log_amt = np.log1p(amount)
    score_a = (
        1.6 * online
        + 0.9 * risky_merchant
        + 0.55 * (log_amt - 3.4)
        + 1.1 * (country == 2)
        - 0.0012 * card_age
        + 0.25 * txn_count
        + 3.0 * merchant_risk
    )
    score_b = (
        1.8 * (channel == 2)
        + 1.6 * (merchant == 9)
        + 1.3 * night
        + 0.45 * np.log1p(distance)
        - 0.4 * (log_amt - 3.4)
        - 0.8 * online
        + 0.6 * (country == 1)
    )
    score = (1 - c) * score_a + c * score_b + rng.normal(0, 0.3, n)
    target_rate = min(0.5, spec.base_fraud_rate * spec.label_prior)
    lo, hi = -30.0, 30.0
    for _ in range(60):  # intercept giving the target fraud rate (deterministic bisection)
        mid = (lo + hi) / 2
        if (1 / (1 + np.exp(-(score + mid)))).mean() > target_rate:
            hi = mid
        else:
            lo = mid
    p = 1 / (1 + np.exp(-(score + lo)))
    label = (rng.uniform(size=n) < p).astype(np.int64)

    if spec.label_poison > 0:
        pos = np.flatnonzero(label == 1)
        flip = rng.choice(pos, int(round(spec.label_poison * len(pos))), replace=False)
        decoy = np.flatnonzero((label == 0) & (merchant == 0))
        fake = rng.choice(decoy, min(len(decoy), len(flip)), replace=False)
        label[flip] = 0
        label[fake] = 1

    start = pd.Timestamp(spec.start)
    offsets = np.sort(rng.uniform(0, 86_400, n))
    df = pd.DataFrame(
        {
            "transaction_id": [f"t{spec.seed:05d}-{i:08d}" for i in range(n)],
            "event_time": start + pd.to_timedelta(offsets, unit="s"),
            "amount": amount,
            "card_age_days": card_age.astype(np.int64),
            "hour": hour.astype(np.int64),
            "distance_from_home_km": distance,
            "txn_count_24h": txn_count.astype(np.int64),
            "merchant_risk_score": merchant_risk,
            "merchant_category": np.asarray(MERCHANTS)[merchant],
            "channel": np.asarray(CHANNELS)[channel],
            "country": np.asarray(COUNTRIES)[country],
            LABEL: label,
        }
    )
    # A few genuine missing values, within the contract's tolerance.
    df.loc[rng.uniform(size=n) < 0.005, "distance_from_home_km"] = np.nan
    return _apply_fault(df, spec.schema_fault, rng)


def _apply_fault(df: pd.DataFrame, fault: str, rng: np.random.Generator) -> pd.DataFrame:
    if fault == "missing_column":
        return df.drop(columns=["merchant_risk_score"])
    if fault == "renamed_column":
        return df.rename(columns={"amount": "amount_usd"})
    if fault == "null_storm":
        df.loc[rng.uniform(size=len(df)) < 0.4, "amount"] = np.nan
    elif fault == "out_of_range":
        df.loc[df.index[:50], "hour"] = 27
    elif fault == "unknown_category":
        df.loc[df.index[:200], "channel"] = "crypto_atm"
    elif fault == "duplicate_ids":
        df.loc[df.index[1:100], "transaction_id"] = df.loc[df.index[0], "transaction_id"]
    elif fault == "future_time":
        df.loc[df.index[:10], "event_time"] = pd.Timestamp("2200-01-01", tz="UTC")
    return df


def to_parquet_bytes(df: pd.DataFrame) -> bytes:
    import io

    buf = io.BytesIO()
    # page checksums (CRC32 per data page): readers verify them, so a corrupted page is an
    # error instead of silently wrong values
    df.to_parquet(buf, index=False, write_page_checksum=True)
    return buf.getvalue()
