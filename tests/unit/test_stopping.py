"""GradientPlateauStopper as tables: EB on noise vs signal, guards, stages, state round trip."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.train.stopping import (
    GradientPlateauStopper,
    PerSampleGradStats,
    StopEvidence,
    StopReason,
    Verdict,
    eb_terms,
)

CHECK_EVERY = 10


def grad_evidence(step: int, g: torch.Tensor, per_sample: torch.Tensor) -> StopEvidence:
    """Evidence from explicit per-sample gradients [B, D] (mean gradient ``g``)."""
    b = per_sample.shape[0]
    total, dims = eb_terms(g, per_sample.square().sum(0), b)
    norm = float(torch.linalg.vector_norm(g))
    return StopEvidence(
        step=step,
        loss=1.0,
        grad_norm=norm,
        log_grad_norm=math.log(norm),
        max_grad_norm=norm,
        eb_sum=float(total),
        eb_dims=int(dims),
        batch_size=b,
    )


def noise_stream(seed: int, b: int, d: int, checks: int, scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    for i in range(1, checks + 1):
        ps = torch.randn(b, d, generator=gen) * scale
        yield grad_evidence(i * CHECK_EVERY, ps.mean(0), ps)


def decaying_stream(
    seed: int, b: int, d: int, checks: int, rate: float = 0.99, noise: float = 1e-3
):
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(d, generator=gen)
    for i in range(1, checks + 1):
        g = direction * rate**i
        ps = g + noise * torch.randn(b, d, generator=gen)
        yield grad_evidence(i * CHECK_EVERY, ps.mean(0), ps)


def first_stop(stopper: GradientPlateauStopper, stream) -> tuple[int, object] | None:
    for i, ev in enumerate(stream, 1):
        d = stopper.update(ev)
        if d.verdict is not Verdict.CONTINUE:
            return i, d
    return None


# -- the constructor validates ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eb_window": 0}, "eb_window"),
        ({"norm_window": 2}, "norm_window"),
        ({"norm_tol": 0}, "norm_tol"),
        ({"val_mode": "sometimes"}, "val_mode"),
        ({"patience": 0}, "patience"),
        ({"confirm": 0}, "confirm"),
        ({"warmup_steps": -1}, "step bounds"),
        ({"max_steps": 0}, "step bounds"),
        ({"require": "most"}, "require"),
        ({"reduce_lr_factor": 1.5}, "reduce_lr_factor"),
        ({"divergence_ratio": 1.0}, "divergence_ratio"),
        ({"eb_hysteresis": -1}, "hysteresis"),
    ],
)
def test_bad_configuration_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientPlateauStopper(**kwargs)


# -- EB: fires on noise, not on a real gradient ----------------------------------------------


@pytest.mark.parametrize(
    ("seed", "batch", "dims"),
    [(0, 64, 400), (1, 256, 400), (2, 32, 1000), (3, 512, 200)],
)
def test_zero_mean_noise_gradient_fires_eb_within_bounded_checks(seed, batch, dims):
    s = GradientPlateauStopper(eb=True, norm_plateau=False, eb_window=4, confirm=3)
    hit = first_stop(s, noise_stream(seed, batch, dims, checks=40))
    assert hit is not None, "EB never fired on a pure-noise gradient"
    checks, d = hit
    assert d.verdict is Verdict.STOP and d.reason is StopReason.EB_CRITERION
    # Under the null the (bias-corrected) smoothed EB sits at 0, so each check is a coin
    # flip; hysteresis keeps near-misses from resetting the count, which bounds the wait.
    assert checks <= 30
    assert d.evidence["eb_smoothed"] > 0 and d.evidence["eb_threshold"] == 0.0


@pytest.mark.parametrize(
    ("seed", "rate", "noise"),
    [(0, 0.99, 1e-3), (1, 0.99, 1e-2), (2, 0.98, 1e-4)],
)
def test_steadily_decaying_deterministic_gradient_does_not_stop(seed, rate, noise):
    s = GradientPlateauStopper(eb=True, norm_plateau=True, confirm=3)
    assert first_stop(s, decaying_stream(seed, 128, 300, checks=80, rate=rate, noise=noise)) is None
    last = s.trace[-1]["evidence"]
    assert last["eb_smoothed"] < -100  # the gradient stands far above its noise
    assert abs(last["log_norm_slope_per_1k"]) > s.norm_tol


def test_log_norm_plateau_fires_on_a_flat_norm():
    s = GradientPlateauStopper(eb=False, norm_plateau=True, norm_window=5, confirm=2)
    evs = [
        StopEvidence(
            step=i * 10,
            grad_norm=0.5,
            log_grad_norm=math.log(0.5) + 1e-4 * (-1) ** i,
            max_grad_norm=0.5,
        )
        for i in range(1, 20)
    ]
    checks, d = first_stop(s, evs)
    assert d.reason is StopReason.GRAD_NORM_PLATEAU and checks == 5 + 2 - 1


# -- divergence guard: no warmup, no patience -------------------------------------------------


@pytest.mark.parametrize(
    "evidence",
    [
        StopEvidence(step=3, loss=float("nan"), grad_norm=1.0),
        StopEvidence(step=3, loss=1.0, grad_norm=float("inf")),
        StopEvidence(step=3, loss=1.0, grad_norm=1.0, max_grad_norm=float("nan")),
        StopEvidence(step=3, nonfinite=True),
        StopEvidence(step=3, val_loss=float("nan")),
    ],
    ids=["nan-loss", "inf-grad", "nan-max-grad", "flagged", "nan-val-loss"],
)
def test_nonfinite_stops_at_once_even_in_warmup(evidence):
    s = GradientPlateauStopper(warmup_steps=1000, min_steps=1000, confirm=10)
    d = s.update(evidence)
    assert (d.verdict, d.reason) == (Verdict.DIVERGED, StopReason.NONFINITE)
    assert d.stop and "non-finite" in d.message and "step 3" in d.message


@pytest.mark.parametrize(
    ("spike", "ratio", "verdict"),
    [
        (2_000.0, 1e3, Verdict.DIVERGED),
        (500.0, 1e3, Verdict.CONTINUE),
        (60.0, 50.0, Verdict.DIVERGED),
    ],
)
def test_exploding_norm_stops_as_diverged(spike, ratio, verdict):
    s = GradientPlateauStopper(divergence_ratio=ratio, warmup_steps=10_000)
    for i in range(1, 6):
        assert (
            s.update(StopEvidence(step=i, grad_norm=1.0, max_grad_norm=1.2)).verdict
            is Verdict.CONTINUE
        )
    d = s.update(StopEvidence(step=6, grad_norm=spike / 2, max_grad_norm=spike))
    assert d.verdict is verdict
    if verdict is Verdict.DIVERGED:
        assert d.reason is StopReason.DIVERGED
        assert d.evidence["best_norm"] == 1.0 and "step 6" in d.message and "exceeded" in d.message


# -- validation-loss plateau: abs and rel modes -------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "min_delta", "losses", "stops_at"),
    [
        ("abs", 1e-3, [10.0, 9.996, 9.993, 9.991], None),  # each gains > 1e-3 on the best
        ("rel", 1e-3, [10.0, 9.996, 9.993, 9.991], 4),  # needs 1e-3 * |10| = 0.01 on the best
        ("rel", 1e-3, [-10.0, -10.004, -10.007, -10.009], 4),  # |best| for a negative loss
        ("abs", 0.0, [1.0, 1.0, 1.0, 1.0], 4),
        ("off", 1e-3, [1.0, 1.0, 1.0, 1.0], None),
    ],
)
def test_val_loss_plateau_modes(mode, min_delta, losses, stops_at):
    s = GradientPlateauStopper(val_mode=mode, val_min_delta=min_delta, patience=3)
    verdicts = [s.update(StopEvidence(step=i, val_loss=v)).verdict for i, v in enumerate(losses, 1)]
    stopped = [i for i, v in enumerate(verdicts, 1) if v is Verdict.STOP]
    assert (stopped[0] if stopped else None) == stops_at
    if stops_at:
        assert s.trace[-1]["reason"] == "val_loss_plateau"


# -- stages: warmup, min/max steps, hysteresis, reduce-LR-then-stop ------------------------------


@pytest.mark.parametrize(
    ("kwargs", "expected_reason", "expected_checks"),
    [
        ({"warmup_steps": 100}, StopReason.GRAD_NORM_PLATEAU, 9 + 3 + 2),
        ({"min_steps": 200}, StopReason.GRAD_NORM_PLATEAU, 20),
        ({"max_steps": 50}, StopReason.MAX_STEPS, 5),
    ],
)
def test_step_bounds(kwargs, expected_reason, expected_checks):
    s = GradientPlateauStopper(eb=False, norm_window=3, confirm=3, **kwargs)
    flat = [
        StopEvidence(step=i * 10, grad_norm=1.0, log_grad_norm=0.0, max_grad_norm=1.0)
        for i in range(1, 50)
    ]
    checks, d = first_stop(s, flat)
    assert d.reason is expected_reason and checks == expected_checks


def test_hysteresis_band_holds_the_count_and_a_clear_miss_resets_it():
    s = GradientPlateauStopper(
        eb=True, norm_plateau=False, eb_window=1, confirm=3, eb_hysteresis=0.1
    )

    def ev(step, eb):  # eb = 1 - (B-3)/(B-1) * sum/dims  ->  sum for a target eb
        b, dims = 11, 100
        return StopEvidence(
            step=step, eb_sum=(1 - eb) * dims * (b - 1) / (b - 3), eb_dims=dims, batch_size=b
        )

    counts = [
        s.update(ev(i, e)).evidence["eb_count"]
        for i, e in enumerate([0.2, 0.1, -0.05, -0.5, 0.2, 0.2], 1)
    ]
    assert counts == [1, 2, 2, 0, 1, 2]  # -0.05 is in the band (held); -0.5 is clearly off


def test_reduce_lr_then_stop():
    s = GradientPlateauStopper(
        eb=False, norm_window=3, confirm=2, reduce_lr_factor=0.5, cooldown_checks=2
    )
    flat = [
        StopEvidence(step=i * 10, grad_norm=1.0, log_grad_norm=0.0, max_grad_norm=1.0)
        for i in range(1, 30)
    ]
    verdicts = [s.update(e).verdict for e in flat]
    first = verdicts.index(Verdict.REDUCE_LR)
    stop = verdicts.index(Verdict.STOP)
    assert verdicts.count(Verdict.REDUCE_LR) == 1 and stop > first
    assert s.trace[first]["evidence"]["reduce_lr_factor"] == 0.5
    assert [t["reason"] for t in s.trace[first + 1 : first + 3]] == ["cooldown", "cooldown"]


# -- purity and state round trip -------------------------------------------------------------------


def test_decide_is_pure():
    s = GradientPlateauStopper(eb=False, norm_window=3)
    ev = StopEvidence(step=10, grad_norm=1.0, log_grad_norm=0.0, max_grad_norm=1.0)
    before = s.state
    a, b = s.decide(ev), s.decide(ev)
    assert s.state == before and a.state == b.state and a.to_dict() == b.to_dict()
    assert a.state.checks == 1 and s.state.checks == 0


@pytest.mark.parametrize("split", [1, 7, 15])
def test_state_round_trips_through_state_dict(split):
    kwargs = {"eb": True, "norm_plateau": True, "val_mode": "rel", "confirm": 4}
    stream = list(noise_stream(5, 64, 300, checks=30, scale=0.1))
    a = GradientPlateauStopper(**kwargs)
    for ev in stream[:split]:
        a.update(ev)
    b = GradientPlateauStopper(**kwargs)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))  # JSON, as in a training state
    assert b.state == a.state and b.trace == a.trace
    rest = [a.update(ev).to_dict() for ev in stream[split:]]
    assert [b.update(ev).to_dict() for ev in stream[split:]] == rest


def test_state_from_another_configuration_is_refused():
    a = GradientPlateauStopper(confirm=3)
    with pytest.raises(ValueError, match="another configuration"):
        GradientPlateauStopper(confirm=4).load_state_dict(a.state_dict())


# -- per-sample gradient statistics are exact ------------------------------------------------------


@pytest.mark.parametrize("batch", [2, 17, 64])
def test_per_sample_sum_of_squares_matches_explicit_per_sample_gradients(batch):
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(batch)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(batch, 6), torch.randint(0, 3, (batch,))
    stats = PerSampleGradStats(model)
    stats.arm()
    nn.functional.cross_entropy(model(x), y).backward()
    total, dims, b = stats.collect()
    assert not stats._handles and b == batch  # disarmed again

    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return nn.functional.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    want_total, want_dims = 0.0, 0
    for name, g in per_sample.items():
        mean = g.mean(0)
        assert torch.allclose(mean, dict(model.named_parameters())[name].grad, atol=1e-6)
        t, d = eb_terms(mean, g.square().sum(0), batch)
        want_total += float(t)
        want_dims += int(d)
    assert int(dims) == want_dims
    assert np.isclose(float(total), want_total, rtol=1e-4)


def eb_fields(eb: float, b: int = 11, dims: int = 100) -> dict:
    """Evidence fields giving a (bias-corrected) EB value of ``eb``."""
    return {"eb_sum": (1 - eb) * dims * (b - 1) / (b - 3), "eb_dims": dims, "batch_size": b}


def test_eb_measured_less_often_than_checks_counts_only_fresh_values():
    s = GradientPlateauStopper(eb=True, norm_plateau=False, eb_window=1, confirm=2)
    evs = [
        StopEvidence(
            step=i * 10,
            grad_norm=1.0,
            log_grad_norm=0.0,
            max_grad_norm=1.0,
            **(eb_fields(0.5) if i % 3 == 0 else {}),
        )
        for i in range(1, 20)
    ]
    checks, d = first_stop(s, evs)
    assert checks == 6 and d.reason is StopReason.EB_CRITERION  # fresh at checks 3 and 6
    assert [t["evidence"]["eb_fresh"] for t in s.trace[:3]] == [False, False, True]


@pytest.mark.parametrize(("require", "stops"), [("any", True), ("all", False)])
def test_require_any_or_all_signals(require, stops):
    s = GradientPlateauStopper(
        eb=True, norm_plateau=True, eb_window=1, norm_window=3, confirm=2, require=require
    )
    evs = [
        StopEvidence(
            step=i * 10, grad_norm=1.0, log_grad_norm=0.0, max_grad_norm=1.0, **eb_fields(-5.0)
        )
        for i in range(1, 20)
    ]  # flat norm, EB far below 0
    hit = first_stop(s, evs)
    assert (hit is not None) == stops
    if stops:
        assert hit[1].reason is StopReason.GRAD_NORM_PLATEAU


def test_explosion_inside_the_first_window_is_caught_by_the_window_minimum():
    s = GradientPlateauStopper(divergence_ratio=1e3, warmup_steps=10_000)
    assert s.divergence_limit() == math.inf and s.divergence_limit(0.5) == 500.0
    d = s.update(StopEvidence(step=32, grad_norm=80.0, max_grad_norm=1800.0, min_grad_norm=0.5))
    assert (d.verdict, d.reason) == (Verdict.DIVERGED, StopReason.DIVERGED)
    assert d.evidence["best_norm"] == 0.5 and "lowest norm seen" in d.message
