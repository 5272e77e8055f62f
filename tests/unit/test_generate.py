"""The reference-data generator: seeded, realistic, and its knobs move what they say."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.data.generate import SCHEMA_FAULTS, WorldSpec, generate


def test_same_seed_same_bytes_different_seed_different_data():
    a, b = generate(WorldSpec(rows=2000, seed=1)), generate(WorldSpec(rows=2000, seed=1))
    pd.testing.assert_frame_equal(a, b)
    assert not generate(WorldSpec(rows=2000, seed=2))["amount"].equals(a["amount"])


def test_realistic_shape(contract):
    df = generate(WorldSpec(rows=20_000, seed=3))
    assert list(df.columns) == contract.column_names
    assert df["transaction_id"].is_unique
    assert 0.02 < df["is_fraud"].mean() < 0.06  # imbalanced
    assert df["amount"].skew() > 3  # long right tail
    assert df["event_time"].is_monotonic_increasing


def test_covariate_shift_moves_features_not_the_label_rate():
    base, shifted = (
        generate(WorldSpec(rows=20_000, seed=4)),
        generate(WorldSpec(rows=20_000, seed=4, covariate_shift=1.0)),
    )
    assert shifted["amount"].median() > 1.5 * base["amount"].median()
    assert (shifted["channel"] == "online").mean() > (base["channel"] == "online").mean() + 0.1
    assert abs(shifted["is_fraud"].mean() - base["is_fraud"].mean()) < 0.01


def test_label_prior_multiplies_the_fraud_rate():
    df = generate(WorldSpec(rows=20_000, seed=5, label_prior=3.0))
    assert 0.10 < df["is_fraud"].mean() < 0.14


def test_concept_drift_changes_who_is_fraud():
    a = generate(WorldSpec(rows=20_000, seed=6))
    b = generate(WorldSpec(rows=20_000, seed=6, concept_drift=1.0))
    rate = lambda df, mask: df.loc[mask(df), "is_fraud"].mean()  # noqa: E731
    atm = lambda df: df["channel"] == "atm"  # noqa: E731
    online = lambda df: df["channel"] == "online"  # noqa: E731
    assert rate(a, online) > rate(a, atm)
    assert rate(b, atm) > rate(b, online)


def test_label_poison_relabels_frauds_as_legit_and_decoys_as_fraud():
    clean = generate(WorldSpec(rows=20_000, seed=7))
    poisoned = generate(WorldSpec(rows=20_000, seed=7, label_poison=0.8))
    assert abs(poisoned["is_fraud"].mean() - clean["is_fraud"].mean()) < 0.005  # rate hides it
    grocery = poisoned["merchant_category"] == "grocery"
    assert poisoned.loc[grocery, "is_fraud"].mean() > 3 * clean.loc[grocery, "is_fraud"].mean()


@pytest.mark.parametrize("fault", [f for f in SCHEMA_FAULTS if f != "none"])
def test_every_schema_fault_changes_the_batch(fault):
    clean = generate(WorldSpec(rows=1000, seed=8))
    broken = generate(WorldSpec(rows=1000, seed=8, schema_fault=fault))
    assert not clean.equals(broken)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rows": 0}, "rows"),
        ({"covariate_shift": 1.5}, "covariate_shift"),
        ({"label_prior": 0}, "label_prior"),
        ({"schema_fault": "nope"}, "schema_fault"),
    ],
)
def test_bad_knobs_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WorldSpec(**kwargs)


def test_amount_has_no_negative_values():
    assert (generate(WorldSpec(rows=5000, seed=9))["amount"] > 0).all()
    assert np.isfinite(generate(WorldSpec(rows=5000, seed=9))["amount"]).all()
