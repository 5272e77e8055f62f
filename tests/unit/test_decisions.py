"""Decision rules as tables: the retrain decision and the promotion gate."""

from __future__ import annotations

import pytest

from pipeline.decide import RetrainEvidence, RetrainPolicy, RetrainReason
from pipeline.gates import GateReason, PromotionGate

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
        (RetrainEvidence(has_champion=True, champion_metric_at_promotion=0.83,
                         champion_metric_on_batch=0.79), True, [R.PERFORMANCE_DECAY]),
        (RetrainEvidence(has_champion=True, champion_metric_at_promotion=0.83,
                         champion_metric_on_batch=0.81), False, [R.NOTHING_CHANGED]),
        (RetrainEvidence(has_champion=True, champion_age_days=31), True, [R.MODEL_TOO_OLD]),
        (RetrainEvidence(has_champion=True, dataset_drift=True, champion_metric_at_promotion=0.9,
                         champion_metric_on_batch=0.5), True, [R.DATASET_DRIFT, R.PERFORMANCE_DECAY]),
    ],
)  # fmt: skip
def test_retrain_policy(evidence, retrain, reasons):
    decision = RetrainPolicy().decide(evidence)
    assert decision.retrain is retrain
    assert decision.reasons == reasons
    assert decision.to_dict()["verdict"] == ("train" if retrain else "skip")


def test_retrain_policy_rejects_bad_thresholds():
    with pytest.raises(ValueError, match="decay_margin"):
        RetrainPolicy(decay_margin=-0.1)


@pytest.mark.parametrize(
    ("challenger", "champion", "promote", "reason"),
    [
        ({"roc_auc": 0.80}, None, True, GateReason.NO_CHAMPION_ABOVE_FLOOR),
        ({"roc_auc": 0.65}, None, False, GateReason.BELOW_FLOOR),
        ({"roc_auc": 0.65}, {"roc_auc": 0.60}, False, GateReason.BELOW_FLOOR),
        ({"roc_auc": 0.830}, {"roc_auc": 0.800}, True, GateReason.BEATS_CHAMPION),
        ({"roc_auc": 0.803}, {"roc_auc": 0.800}, False, GateReason.NOT_BETTER_THAN_CHAMPION),
        ({"roc_auc": 0.805}, {"roc_auc": 0.800}, True, GateReason.BEATS_CHAMPION),  # == margin
        ({"roc_auc": 0.75}, {"roc_auc": 0.80}, False, GateReason.NOT_BETTER_THAN_CHAMPION),
        ({}, {"roc_auc": 0.80}, False, GateReason.METRIC_MISSING),
    ],
)  # fmt: skip
def test_promotion_gate(challenger, champion, promote, reason):
    d = PromotionGate(margin=0.005, floor=0.7).decide(challenger, champion, "3" if champion else None)
    assert d.promote is promote
    assert d.reason is reason
    record = d.to_dict()
    assert record["verdict"] == ("promote" if promote else "reject")
    assert record["reason"] == reason.value


def test_gate_message_names_threshold_and_values():
    d = PromotionGate(margin=0.01, floor=0.7).decide({"roc_auc": 0.80}, {"roc_auc": 0.805}, "7")
    assert "0.8000" in d.message and "0.8050" in d.message and "v7" in d.message
    assert "margin 0.0100" in d.message


def test_gate_rejects_bad_margin():
    with pytest.raises(ValueError, match="margin"):
        PromotionGate(margin=1.5)
