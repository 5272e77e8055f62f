"""Decision rules as tables: the retrain decision (the promotion gate: test_gates.py)."""

from __future__ import annotations

import pytest

from pipeline.decide import RetrainEvidence, RetrainPolicy, RetrainReason

R = RetrainReason


@pytest.mark.parametrize(
    ("evidence", "retrain", "reasons"),
    [
        (RetrainEvidence(has_champion=False), True, [R.NO_CHAMPION]),
        (RetrainEvidence(has_champion=True, dataset_drift=False), False, [R.NOTHING_CHANGED]),
        (RetrainEvidence(has_champion=True, forced=True), True, [R.FORCED]),
        (RetrainEvidence(has_champion=True, dataset_drift=True), True, [R.DATASET_DRIFT]),
        (RetrainEvidence(has_champion=True, label_drifted=True), True, [R.LABEL_SHIFT]),
        # decay beyond the margin (0.03) retrains; within it does not
        (
            RetrainEvidence(
                has_champion=True, champion_metric_at_promotion=0.83, champion_metric_on_batch=0.79
            ),
            True,
            [R.PERFORMANCE_DECAY],
        ),
        (
            RetrainEvidence(
                has_champion=True, champion_metric_at_promotion=0.83, champion_metric_on_batch=0.81
            ),
            False,
            [R.NOTHING_CHANGED],
        ),
        (RetrainEvidence(has_champion=True, champion_age_days=31), True, [R.MODEL_TOO_OLD]),
        (
            RetrainEvidence(
                has_champion=True,
                dataset_drift=True,
                champion_metric_at_promotion=0.9,
                champion_metric_on_batch=0.5,
            ),
            True,
            [R.DATASET_DRIFT, R.PERFORMANCE_DECAY],
        ),
    ],
)
def test_retrain_policy(evidence, retrain, reasons):
    decision = RetrainPolicy().decide(evidence)
    assert decision.retrain is retrain
    assert decision.reasons == reasons
    assert decision.to_dict()["verdict"] == ("train" if retrain else "skip")


def test_retrain_policy_rejects_bad_thresholds():
    with pytest.raises(ValueError, match="decay_margin"):
        RetrainPolicy(decay_margin=-0.1)
