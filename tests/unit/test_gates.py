"""The promotion gate as tables: floors, budgets, paired-bootstrap comparison, slices, replay."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from pipeline.gate_report import report_table
from pipeline.gates import (
    GateInputs,
    GateReason,
    PromotionGate,
    decision_record,
    replay,
)
from pipeline.metrics import bootstrap_counts, paired_bootstrap, rank_auc, weighted_auc

R = GateReason
N = 4000
RNG = np.random.default_rng(7)
Y = (RNG.random(N) < 0.3).astype(int)
CHANNEL = RNG.choice(["pos", "online", "atm"], N, p=[0.45, 0.4, 0.15])


def proba(strength: float, seed: int, *, degrade: str | None = None) -> np.ndarray:
    """A model whose scores separate the classes by ``strength``; noise from ``seed``.
    ``degrade``: a channel on which this model's scores are pure noise."""
    noise = np.random.default_rng(seed).normal(size=N)
    s = noise + strength * (2 * Y - 1)
    if degrade is not None:
        mask = CHANNEL == degrade
        s[mask] = np.random.default_rng(seed + 100).normal(size=mask.sum())
    p = 1 / (1 + np.exp(-s))
    return np.c_[1 - p, p]


def inputs(chal: np.ndarray, champ: np.ndarray | None, **kw) -> GateInputs:
    return GateInputs(
        Y,
        chal,
        champ,
        "3" if champ is not None else None,
        slices={"channel": CHANNEL},
        checkpoint_bytes=kw.get("size", 40_000),
        latency_p95_ms=kw.get("latency", 5.0),
    )


BASE = proba(1.0, 1)  # the champion: ROC AUC ~0.92


CASES = [
    (
        "improvement: whole CI above the margin",
        proba(1.5, 2),
        BASE,
        {},
        True,
        [R.IMPROVES_ON_CHAMPION],
    ),
    (
        "noisy tie: CI straddles zero -> champion stays",
        proba(1.0, 2),
        BASE,
        {},
        False,
        [R.NOT_BETTER_THAN_CHAMPION],
    ),
    (
        "the same tie passes as non-inferior within 0.03",
        proba(1.0, 2),
        BASE,
        {"non_inferiority_margin": 0.03},
        True,
        [R.NON_INFERIOR_TO_CHAMPION],
    ),
    (
        "clearly worse fails even with a non-inferiority margin",
        proba(0.6, 2),
        BASE,
        {"non_inferiority_margin": 0.01},
        False,
        [R.NOT_BETTER_THAN_CHAMPION],
    ),
    (
        "better, but by less than the required relative 10%",
        proba(1.5, 2),
        BASE,
        {"improvement": "relative", "margin": 0.1},
        False,
        [R.NOT_BETTER_THAN_CHAMPION],
    ),
    (
        "better overall, but one slice regresses",
        proba(1.6, 2, degrade="atm"),
        BASE,
        {"slices": ("channel",)},
        False,
        [R.SLICE_REGRESSION],
    ),
    (
        "better everywhere: slices pass",
        proba(1.5, 2),
        BASE,
        {"slices": ("channel",)},
        True,
        [R.IMPROVES_ON_CHAMPION],
    ),
    (
        "a slice column the evaluation set lacks fails explicitly",
        proba(1.5, 2),
        BASE,
        {"slices": ("country",)},
        False,
        [R.METRIC_MISSING],
    ),
    (
        "no champion: floors only",
        proba(1.0, 2),
        None,
        {"slices": ("channel",)},
        True,
        [R.NO_CHAMPION_FLOORS_MET],
    ),
    ("no champion and below the floor", proba(0.15, 2), None, {}, False, [R.BELOW_FLOOR]),
    (
        "beats a weak champion but not the floor",
        proba(0.3, 2),
        proba(0.05, 1),
        {},
        False,
        [R.BELOW_FLOOR],
    ),
    (
        "a floor on a lower-is-better metric is a ceiling",
        proba(1.5, 2),
        BASE,
        {"floors": {"roc_auc": 0.7, "log_loss": 0.05}},
        False,
        [R.BELOW_FLOOR],
    ),
    (
        "over the size budget",
        proba(1.5, 2),
        BASE,
        {"max_checkpoint_bytes": 10_000},
        False,
        [R.OVER_SIZE_BUDGET],
    ),
    (
        "over the latency budget",
        proba(1.5, 2),
        BASE,
        {"max_latency_p95_ms": 1.0},
        False,
        [R.OVER_LATENCY_BUDGET],
    ),
    (
        "within both budgets",
        proba(1.5, 2),
        BASE,
        {"max_checkpoint_bytes": 10**6, "max_latency_p95_ms": 50},
        True,
        [R.IMPROVES_ON_CHAMPION],
    ),
    (
        "gated on log loss (lower is better)",
        proba(1.5, 2),
        BASE,
        {"metric": "log_loss", "floors": {}},
        True,
        [R.IMPROVES_ON_CHAMPION],
    ),
]


@pytest.mark.parametrize(
    ("chal", "champ", "gate", "promote", "reasons"), [pytest.param(*c[1:], id=c[0]) for c in CASES]
)
def test_promotion_gate(chal, champ, gate, promote, reasons):
    d = PromotionGate(**gate).decide(inputs(chal, champ))
    assert d.promote is promote, d.message
    assert d.reasons == reasons, d.message
    assert d.reason is reasons[0]
    rec = d.to_dict()
    assert rec["verdict"] == ("promote" if promote else "reject")
    assert rec["reason"] == reasons[0].value
    if champ is not None and not promote:
        assert d.message.endswith("champion v3 stays")


def test_noisy_tie_interval_straddles_zero_and_message_says_so():
    d = PromotionGate().decide(inputs(proba(1.0, 2), BASE))
    vs = next(c for c in d.checks if c.kind == "champion")
    assert vs.ci_low < 0 < vs.ci_high
    assert "straddles zero" in d.message and "0.0050" in d.message


def test_budgets_without_measurements_fail_explicitly():
    d = PromotionGate(max_checkpoint_bytes=10**6, max_latency_p95_ms=50).decide(
        GateInputs(Y, proba(1.5, 2), None)
    )
    assert not d.promote and d.reasons == [R.METRIC_MISSING]
    assert "not measured" in d.message


def test_no_champion_is_stated_never_scored_zero():
    d = PromotionGate(slices=("channel",)).decide(inputs(proba(1.0, 2), None))
    assert d.champion is None and d.champion_metrics is None
    assert "no champion" in d.message
    assert not [c for c in d.checks if c.kind == "champion"]
    slice_rows = [c for c in d.checks if c.kind == "slice"]
    assert slice_rows and all(c.passed is None for c in slice_rows)


def test_slice_regression_names_the_slice():
    d = PromotionGate(slices=("channel",)).decide(inputs(proba(1.6, 2, degrade="atm"), BASE))
    failed = [c for c in d.failed if c.kind == "slice"]
    assert [c.metric for c in failed] == ["roc_auc [channel=atm]"]
    assert "channel=atm" in d.message


def test_small_slices_are_reported_not_judged():
    d = PromotionGate(slices=("channel",), min_slice_rows=1000).decide(inputs(proba(1.5, 2), BASE))
    atm = next(c for c in d.checks if c.metric == "roc_auc [channel=atm]")
    assert atm.passed is None and "not judged" in atm.detail


def test_replay_from_the_json_record_gives_the_same_decision():
    gate = PromotionGate(
        slices=("channel",),
        non_inferiority_margin=0.01,
        max_checkpoint_bytes=10**6,
        max_latency_p95_ms=50,
    )
    inp = inputs(proba(1.1, 2), BASE)
    decision = gate.decide(inp)
    record = json.loads(json.dumps(decision_record(gate, inp, decision, {"model_version": "4"})))
    assert record["champion_version"] == "3"
    assert record["rule"]["non_inferiority_margin"] == 0.01
    assert record["decision"]["verdict"] == decision.verdict
    again = replay(record)
    assert again.to_dict() == decision.to_dict()


def test_replay_refuses_other_records():
    with pytest.raises(ValueError, match="not a promotion gate record"):
        replay({"kind": "retrain_decision"})


def test_float32_probabilities_replay_exactly():
    gate = PromotionGate()
    inp = inputs(proba(1.5, 2).astype(np.float32), BASE.astype(np.float32))
    d = gate.decide(inp)
    assert replay(json.loads(json.dumps(decision_record(gate, inp, d)))).to_dict() == d.to_dict()


def test_report_table_has_every_column_and_a_row_per_check():
    d = PromotionGate(slices=("channel",), max_checkpoint_bytes=10**6).decide(
        inputs(proba(1.5, 2), BASE)
    )
    table = report_table(d)
    header = table.splitlines()[0]
    for col in (
        "metric",
        "champion v3",
        "challenger",
        "difference",
        "95% CI",
        "threshold",
        "result",
    ):
        assert col in header
    assert len(table.splitlines()) == 2 + len(d.checks)
    assert "| roc_auc |" in table and "CI lower bound of the gain >= 0.0050" in table


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"margin": 1.5}, "margin"),
        ({"non_inferiority_margin": -0.1}, "non_inferiority"),
        ({"metric": "pr_auc"}, "gate metric"),
        ({"floors": {"f1": 0.5}}, "unknown metric"),
        ({"improvement": "percent"}, "improvement"),
        ({"resamples": 10}, "resamples"),
        ({"max_latency_p95_ms": 0}, "max_latency"),
        ({"confidence": 1.0}, "confidence"),
    ],
)
def test_gate_rejects_bad_thresholds(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PromotionGate(**kwargs)


def test_inputs_must_be_the_same_rows():
    with pytest.raises(ValueError, match="not the same rows"):
        GateInputs(Y, proba(1.0, 1), proba(1.0, 2)[:-1], "3")
    with pytest.raises(ValueError, match="without the champion's version"):
        GateInputs(Y, proba(1.0, 1), proba(1.0, 2))


# -- the numerics underneath ---------------------------------------------------------------


def test_rank_auc_matches_sklearn_with_ties_and_weights():
    from sklearn.metrics import roc_auc_score

    s = np.round(proba(1.0, 3)[:, 1], 2)  # many ties
    assert rank_auc(Y, np.c_[1 - s, s]) == pytest.approx(roc_auc_score(Y, s), abs=1e-12)
    w = bootstrap_counts(N, 3, seed=5)
    got = weighted_auc(Y == 1, s, w)
    want = [roc_auc_score(Y, s, sample_weight=row) for row in w]
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_multiclass_auc_is_one_vs_rest_macro():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y3 = rng.integers(0, 3, 2000)
    p3 = rng.dirichlet([1, 1, 1], 2000) + np.eye(3)[y3] * 0.3
    p3 /= p3.sum(axis=1, keepdims=True)
    assert rank_auc(y3, p3) == pytest.approx(roc_auc_score(y3, p3, multi_class="ovr"), abs=1e-12)


def test_paired_bootstrap_is_seeded_and_fast():
    t0 = time.perf_counter()
    a = paired_bootstrap("roc_auc", Y, proba(1.2, 2), BASE, resamples=1000, seed=0)
    elapsed = time.perf_counter() - t0
    b = paired_bootstrap("roc_auc", Y, proba(1.2, 2), BASE, resamples=1000, seed=0)
    assert a == b
    assert a["ci_low"] < a["diff"] < a["ci_high"]
    assert elapsed < 5, f"1000 resamples of {N} rows took {elapsed:.2f}s"
