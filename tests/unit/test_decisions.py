"""Decision rules as tables: the retrain decision and the human approval, and the shared
decision protocol (``pipeline.decisions``) that every decision follows — the gate's cases
are in test_gates.py, the stopper's in test_stopping.py, the canary's in test_canary.py."""

from __future__ import annotations

import pytest

from pipeline.decide import RetrainEvidence, RetrainPolicy, RetrainReason

R = RetrainReason


RETRAIN_CASES = [
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
]


@pytest.mark.parametrize(("evidence", "retrain", "reasons"), RETRAIN_CASES)
def test_retrain_policy(evidence, retrain, reasons):
    decision = RetrainPolicy().decide(evidence)
    assert decision.retrain is retrain
    assert decision.reasons == reasons
    assert decision.to_dict()["verdict"] == ("train" if retrain else "skip")


def test_retrain_policy_rejects_bad_thresholds():
    with pytest.raises(ValueError, match="decay_margin"):
        RetrainPolicy(decay_margin=-0.1)


# -- the shared protocol: every decision replays from its record ------------------------------


@pytest.mark.parametrize(("evidence", "retrain", "reasons"), RETRAIN_CASES)
def test_a_retrain_decision_replays_from_its_record(evidence, retrain, reasons):
    import json

    from pipeline import decisions

    policy = RetrainPolicy(decay_margin=0.02)
    decision = policy.decide(evidence)
    assert isinstance(decision, decisions.Decision)  # verdict, reasons, message, to_dict
    record = json.loads(json.dumps(policy.record(decision, {"run_key": "r"})))
    assert record["kind"] == "retrain" and record["record_version"] == 1
    again = decisions.replay(record)
    assert again.to_dict() == decision.to_dict() and decisions.replays(record)
    assert again.verdict.value == ("train" if retrain else "skip")


def test_a_tampered_retrain_record_replays_to_another_decision():
    from pipeline import decisions

    policy = RetrainPolicy(decay_margin=0.03)
    ev = RetrainEvidence(
        has_champion=True, champion_metric_at_promotion=0.83, champion_metric_on_batch=0.81
    )
    record = policy.record(policy.decide(ev))
    assert decisions.replays(record)
    record["rule"]["decay_margin"] = 0.01  # someone loosened the threshold after the fact
    assert not decisions.replays(record)
    assert decisions.replay(record).verdict.value == "train"


@pytest.mark.parametrize(
    ("chosen", "by", "verdict", "message"),
    [
        (["Approve"], "alice", "approve", "approved by alice"),
        (["Reject"], "bob", "reject", "human_rejected: rejected by bob in human review"),
        (["Reject"], "", "reject", "rejected by nobody before the timeout"),
        (["Approve", "Reject"], "carol", "reject", "rejected by carol"),
        ([], "dave", "reject", "rejected by dave"),
    ],
)
def test_human_approval_is_a_decision_that_replays(chosen, by, verdict, message):
    from pipeline import decisions
    from pipeline.approval import ApprovalEvidence, ApprovalRule

    response = {
        "chosen_options": chosen,
        "responded_by_user": {"id": by, "name": by} if by else None,
        # Airflow 3.3 stamps the time on the timeout's default answer as well (no user)
        "responded_at": "2026-03-01T10:00:00+00:00",
        "params_input": {},
    }
    rule = ApprovalRule()
    decision = rule.decide(ApprovalEvidence.from_hitl(response, "3"))
    assert decision.verdict.value == verdict and message in decision.message
    record = rule.record(decision)
    assert decisions.replay(record).to_dict() == decision.to_dict()


def test_replay_refuses_what_is_not_a_decision_record():
    from pipeline import decisions

    for bad in ({}, {"kind": "nope"}, {"kind": "retrain", "record_version": 99}, "text"):
        with pytest.raises(decisions.NotADecisionRecord):
            decisions.replay(bad)  # type: ignore[arg-type]
    assert decisions.record_path("canary_analysis", "step 2") == (
        "records/decisions/canary_analysis-step_2.json"
    )
