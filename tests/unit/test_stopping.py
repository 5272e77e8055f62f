"""GradientPlateauStopper as tables: EB on noise vs signal, guards, stages, state round trip."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline import decisions
from pipeline.names import StopVerdict
from pipeline.train import stopping
from pipeline.train.stopping import (
    GradientPlateauStopper,
    PerSampleGradStats,
    StopEvidence,
    StopReason,
    decision_record,
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
        if d.verdict is not StopVerdict.CONTINUE:
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
        ({"val_window": 2}, "val_window"),  # a validation plateau needs val_mode abs/rel
        ({"val_window": -1, "val_mode": "rel"}, "val_window"),
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
    assert d.verdict is StopVerdict.STOP and d.reason is StopReason.EB_CRITERION
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


def regression_at_its_optimum(seed: int = 0, rows: int = 4000, d: int = 10, k: int = 3):
    """A linear least-squares problem and an ``nn.Linear`` set to its exact optimum on the
    data: a batch drawn from the data has a zero-mean gradient, i.e. pure noise."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(d, k, generator=gen, dtype=torch.float64) + 0.5 * torch.randn(
        rows, k, generator=gen, dtype=torch.float64
    )
    xa = torch.cat([x, torch.ones(rows, 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(xa, y).solution  # [d + 1, k]
    model = nn.Linear(d, k)
    with torch.no_grad():
        model.weight.copy_(sol[:d].T)
        model.bias.copy_(sol[d])
    return model, x.float(), y.float(), gen


def eb_checks_on(model, x, y, gen, *, batch: int, checks: int):
    """Evidence of ``checks`` fresh batches of the data, measured the way the training loop
    measures it (``PerSampleGradStats`` on a real forward/backward pass)."""
    stats = PerSampleGradStats(model)
    for i in range(1, checks + 1):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        model.zero_grad()
        stats.arm()
        nn.functional.mse_loss(model(x[idx]), y[idx]).backward()
        total, dims, b = stats.collect()
        norm = float(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm())
        yield StopEvidence(
            step=i * CHECK_EVERY,
            loss=1.0,
            grad_norm=norm,
            log_grad_norm=math.log(norm),
            max_grad_norm=norm,
            eb_sum=float(total),
            eb_dims=int(dims),
            batch_size=b,
        )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_eb_fires_on_a_real_model_at_its_optimum_fed_fresh_batches(seed):
    model, x, y, gen = regression_at_its_optimum(seed)
    s = GradientPlateauStopper(eb=True, norm_plateau=False, eb_window=4, confirm=3)
    hit = first_stop(s, eb_checks_on(model, x, y, gen, batch=64, checks=40))
    assert hit is not None, "EB never fired on a model at its optimum"
    assert hit[1].reason is StopReason.EB_CRITERION and hit[1].evidence["eb_dims"] == 33


def test_eb_does_not_fire_on_the_same_problem_away_from_its_optimum():
    model, x, y, gen = regression_at_its_optimum(0)
    with torch.no_grad():
        model.weight.mul_(0.5)  # halfway to the optimum: the gradient stands above its noise
    s = GradientPlateauStopper(eb=True, norm_plateau=False, eb_window=4, confirm=3)
    assert first_stop(s, eb_checks_on(model, x, y, gen, batch=64, checks=40)) is None
    assert s.trace[-1]["evidence"]["eb_smoothed"] < -1


# -- the gradient must agree with a validation plateau (val_window) ----------------------------

AGREE = {
    "eb": False,
    "norm_window": 3,
    "confirm": 2,
    "val_mode": "rel",
    "val_min_delta": 1e-3,
    "val_window": 2,
    "patience": 100,  # no validation-patience backstop in these tables
}


def epochs_of(val_losses, grad=None, per_epoch: int = 3) -> list[StopEvidence]:
    """``per_epoch`` gradient checks (flat norm unless ``grad(step)`` gives the evidence
    fields), then the epoch's validation, for each validation loss."""
    out, step = [], 0
    for epoch, v in enumerate(val_losses, 1):
        for _ in range(per_epoch):
            step += 10
            fields = (
                grad(step)
                if grad
                else {"grad_norm": 1.0, "log_grad_norm": 0.0, "max_grad_norm": 1.0}
            )
            out.append(StopEvidence(step=step, epoch=epoch, **fields))
        out.append(StopEvidence(step=step, epoch=epoch, val_loss=v))
    return out


def test_a_gradient_plateau_alone_does_not_stop_while_validation_improves():
    s = GradientPlateauStopper(**AGREE)
    improving = [1.0 * 0.97**i for i in range(30)]  # 3% a validation: material
    assert first_stop(s, epochs_of(improving)) is None
    grad_checks = [t for t in s.trace if t["evidence"]["kind"] == "gradient"]
    assert grad_checks[-1]["evidence"]["norm_count"] >= AGREE["confirm"]  # the gradient says stop
    assert grad_checks[-1]["reason"] == "val_improving"  # ... validation does not agree


@pytest.mark.parametrize(
    ("losses", "stop_epoch"),
    [
        ([1.0, 0.9, 0.8, 0.8, 0.8, 0.8, 0.8], 5),  # two validations without gain: epoch 5
        ([1.0, 0.9, 0.8, 0.7999, 0.7998, 0.7997], 5),  # gains below 1e-3 relative, together
        ([1.0, 0.9, 0.8, 0.799, 0.798, 0.797, 0.796], None),  # 0.25% over the window: material
    ],
)
def test_the_gradient_and_a_validation_plateau_agreeing_stop(losses, stop_epoch):
    s = GradientPlateauStopper(**AGREE)
    hit = first_stop(s, epochs_of(losses))
    if stop_epoch is None:
        assert hit is None
        return
    _, d = hit
    assert (d.verdict, d.reason) == (StopVerdict.STOP, StopReason.GRAD_NORM_PLATEAU)
    assert d.evidence["epoch"] == stop_epoch and d.evidence["kind"] == "validation"
    assert d.evidence["val_plateau"] is True and d.evidence["grad_confirmed"] == [
        "grad_norm_plateau"
    ]


def test_once_validation_has_plateaued_the_gradient_check_itself_can_stop():
    s = GradientPlateauStopper(**{**AGREE, "confirm": 5})  # confirmed only after the plateau
    hit = first_stop(s, epochs_of([1.0, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9], per_epoch=1))
    _, d = hit
    assert d.reason is StopReason.GRAD_NORM_PLATEAU and d.evidence["kind"] == "gradient"


@pytest.mark.parametrize(("pattern", "stops"), [("on", True), ("on-off", False)])
def test_hysteresis_the_gradient_signal_must_hold_for_confirm_checks(pattern, stops):
    """Validation has plateaued; EB flips on/clearly off every other check: never confirmed."""
    s = GradientPlateauStopper(
        **{**AGREE, "eb": True, "norm_plateau": False, "eb_window": 1, "confirm": 3}
    )

    def grad(step):
        on = pattern == "on" or (step // 10) % 2 == 0
        return eb_fields(0.5 if on else -0.5)

    hit = first_stop(s, epochs_of([1.0] * 12, grad=grad))
    assert (hit is not None) == stops
    if stops:
        assert hit[1].reason is StopReason.EB_CRITERION
    else:
        assert max(t["evidence"].get("eb_count", 0) for t in s.trace) == 1


def noisy_norm_evidence(seed: int, trend_per_1k: float, n: int = 30) -> list[StopEvidence]:
    """log‖g‖ with a trend and per-check noise of 0.2 (small batches), checks 3 steps apart."""
    gen = np.random.default_rng(seed)
    out = []
    for i in range(1, n + 1):
        log_norm = trend_per_1k * i * 3 / 1000 + 0.2 * gen.standard_normal()
        out.append(
            StopEvidence(
                step=i * 3,
                grad_norm=math.exp(log_norm),
                log_grad_norm=log_norm,
                max_grad_norm=math.exp(log_norm),
            )
        )
    return out


@pytest.mark.parametrize(
    ("norm_t", "trend", "stops"),
    [
        (None, 0.0, False),  # a fixed tolerance of 0.5/1k steps never sees noisy norms flat
        (2.0, 0.0, True),  # no significant trend: a plateau
        (2.0, -300.0, False),  # a real fall (-0.9 over 3 checks) is significant: no plateau
    ],
)
def test_norm_t_judges_the_slope_against_its_standard_error(norm_t, trend, stops):
    s = GradientPlateauStopper(eb=False, norm_window=6, confirm=3, norm_t=norm_t)
    assert (first_stop(s, noisy_norm_evidence(0, trend)) is not None) == stops


def test_val_window_delta_is_the_gain_the_window_may_bring():
    losses = [1.0, 0.9, 0.8, 0.795, 0.79, 0.785, 0.78]  # ~0.6% a validation
    strict = GradientPlateauStopper(**AGREE)  # window delta = val_min_delta = 0.1%
    loose = GradientPlateauStopper(**{**AGREE, "val_window_delta": 2e-2})  # 2% over 2
    assert first_stop(strict, epochs_of(losses)) is None
    _, d = first_stop(loose, epochs_of(losses))
    assert d.evidence["epoch"] == 5 and d.reason is StopReason.GRAD_NORM_PLATEAU


def test_a_batch_with_a_near_zero_gradient_is_not_the_divergence_baseline():
    """Near-separable data: one batch the model fits perfectly has ‖g‖ ~ 1e-6; the next
    ordinary batch (0.2) is 1000x that but not an explosion. The baseline is the lowest
    window mean; a real explosion (1000x the window means) still diverges."""
    s = GradientPlateauStopper(divergence_ratio=1e3, warmup_steps=10_000)
    s.update(StopEvidence(step=2, grad_norm=0.05, max_grad_norm=0.08, min_grad_norm=0.02))
    d = s.update(StopEvidence(step=4, grad_norm=0.1, max_grad_norm=0.2, min_grad_norm=1e-6))
    assert d.verdict is StopVerdict.CONTINUE and d.evidence["best_norm"] == 0.02
    assert s.divergence_limit(1e-6) == 20.0  # the loop's per-step test agrees
    d = s.update(StopEvidence(step=6, grad_norm=30.0, max_grad_norm=60.0, min_grad_norm=0.1))
    assert (d.verdict, d.reason) == (StopVerdict.DIVERGED, StopReason.DIVERGED)


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
    assert (d.verdict, d.reason) == (StopVerdict.DIVERGED, StopReason.NONFINITE)
    assert d.stop and "non-finite" in d.message and "step 3" in d.message


@pytest.mark.parametrize(
    ("spike", "ratio", "verdict"),
    [
        (2_000.0, 1e3, StopVerdict.DIVERGED),
        (500.0, 1e3, StopVerdict.CONTINUE),
        (60.0, 50.0, StopVerdict.DIVERGED),
    ],
)
def test_exploding_norm_stops_as_diverged(spike, ratio, verdict):
    s = GradientPlateauStopper(divergence_ratio=ratio, warmup_steps=10_000)
    for i in range(1, 6):
        assert (
            s.update(StopEvidence(step=i, grad_norm=1.0, max_grad_norm=1.2)).verdict
            is StopVerdict.CONTINUE
        )
    d = s.update(StopEvidence(step=6, grad_norm=spike / 2, max_grad_norm=spike))
    assert d.verdict is verdict
    if verdict is StopVerdict.DIVERGED:
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
    stopped = [i for i, v in enumerate(verdicts, 1) if v is StopVerdict.STOP]
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
    first = verdicts.index(StopVerdict.REDUCE_LR)
    stop = verdicts.index(StopVerdict.STOP)
    assert verdicts.count(StopVerdict.REDUCE_LR) == 1 and stop > first
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
    assert b.state == a.state and b.trace == a.trace and b.records == a.records
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
    assert (d.verdict, d.reason) == (StopVerdict.DIVERGED, StopReason.DIVERGED)
    assert d.evidence["best_norm"] == 0.5 and "lowest norm seen" in d.message


# -- decision records: every non-continue decision replays from its record alone ------------


def flat_norm(n: int = 30, **kw) -> list[StopEvidence]:
    return [
        StopEvidence(step=i * 10, grad_norm=1.0, log_grad_norm=0.0, max_grad_norm=1.0, **kw)
        for i in range(1, n)
    ]


def spiking(spike: float) -> list[StopEvidence]:
    calm = [StopEvidence(step=i, grad_norm=1.0, max_grad_norm=1.2) for i in range(1, 6)]
    return [*calm, StopEvidence(step=6, grad_norm=spike / 2, max_grad_norm=spike)]


def vals(losses: list[float]) -> list[StopEvidence]:
    return [StopEvidence(step=i * 100, epoch=i, val_loss=v) for i, v in enumerate(losses, 1)]


# id -> (stopper kwargs, evidence stream, which record (n-th non-continue; None: the last
# decision, whatever it is), expected verdict, expected reason)
REPLAY_CASES = {
    "eb_criterion": (
        {"eb": True, "norm_plateau": False, "eb_window": 4, "confirm": 3},
        lambda: list(noise_stream(0, 64, 400, checks=40)),
        0,
        StopVerdict.STOP,
        StopReason.EB_CRITERION,
    ),
    "grad_norm_plateau": (
        {"eb": False, "norm_window": 5, "confirm": 2},
        flat_norm,
        0,
        StopVerdict.STOP,
        StopReason.GRAD_NORM_PLATEAU,
    ),
    "val_loss_plateau": (
        {"eb": False, "norm_plateau": False, "val_mode": "rel", "patience": 3},
        lambda: vals([10.0, 9.996, 9.993, 9.991]),
        0,
        StopVerdict.STOP,
        StopReason.VAL_LOSS_PLATEAU,
    ),
    "reduce_lr": (
        {"eb": False, "norm_window": 3, "confirm": 2, "reduce_lr_factor": 0.5},
        flat_norm,
        0,
        StopVerdict.REDUCE_LR,
        StopReason.GRAD_NORM_PLATEAU,
    ),
    "stop_after_reduce_lr": (
        {"eb": False, "norm_window": 3, "confirm": 2, "reduce_lr_factor": 0.5},
        flat_norm,
        1,
        StopVerdict.STOP,
        StopReason.GRAD_NORM_PLATEAU,
    ),
    "max_steps": (
        {"eb": False, "norm_window": 3, "confirm": 10, "max_steps": 50},
        flat_norm,
        0,
        StopVerdict.STOP,
        StopReason.MAX_STEPS,
    ),
    "nan_loss": (
        {"warmup_steps": 1000},
        lambda: [*flat_norm(4), StopEvidence(step=40, loss=float("nan"), grad_norm=1.0)],
        0,
        StopVerdict.DIVERGED,
        StopReason.NONFINITE,
    ),
    "inf_gradient": (
        {},
        lambda: [StopEvidence(step=3, loss=1.0, grad_norm=float("inf"), nonfinite=True)],
        0,
        StopVerdict.DIVERGED,
        StopReason.NONFINITE,
    ),
    "exploding": (
        {"divergence_ratio": 1e3, "warmup_steps": 10_000},
        lambda: spiking(2_000.0),
        0,
        StopVerdict.DIVERGED,
        StopReason.DIVERGED,
    ),
    "continue_in_warmup": (
        {"warmup_steps": 1000},
        lambda: flat_norm(5),
        None,
        StopVerdict.CONTINUE,
        StopReason.WARMUP,
    ),
    "continue_confirming": (
        {"eb": False, "norm_window": 3, "confirm": 5},
        lambda: flat_norm(5),
        None,
        StopVerdict.CONTINUE,
        StopReason.CONFIRMING,
    ),
    "gradient_and_validation_agree": (
        AGREE,
        lambda: epochs_of([1.0, 0.9, 0.8, 0.8, 0.8, 0.8]),
        0,
        StopVerdict.STOP,
        StopReason.GRAD_NORM_PLATEAU,
    ),
    "continue_val_improving": (
        AGREE,
        lambda: epochs_of([1.0, 0.9, 0.8, 0.7])[:-1],  # the last gradient check of epoch 4
        None,
        StopVerdict.CONTINUE,
        StopReason.VAL_IMPROVING,
    ),
}


def recorded(case: str):
    """(record, decision, stopper) of the case: the stopper's own record of its n-th
    non-continue decision, or ``decision_record`` of its last decision."""
    kwargs, stream, nth, _, _ = REPLAY_CASES[case]
    s = GradientPlateauStopper(**kwargs)
    for ev in stream():
        before = s.state
        d = s.update(ev)
        if nth is not None and len(s.records) > nth:
            return s.records[nth], d, s
    assert nth is None, f"{case}: fewer than {nth + 1} non-continue decisions"
    return decision_record(s, ev, before, d), d, s


@pytest.mark.parametrize("case", list(REPLAY_CASES))
def test_a_recorded_decision_replays_from_its_record_alone(case):
    rec, d, s = recorded(case)
    *_, verdict, reason = REPLAY_CASES[case]
    assert (d.verdict, d.reason) == (verdict, reason)
    assert isinstance(d, decisions.Decision) and d.reasons == [d.reason]
    assert (rec["kind"], rec["record_version"]) == ("training_stop", 1)
    assert rec["rule"] == s.config() and rec["decision"] == d.to_dict()
    assert set(rec["inputs"]) == {"evidence", "state"}
    assert {"step", "verdict", "reason", "evidence"} <= set(d.to_dict())
    assert d.to_dict()["message"] == d.message
    assert decisions.replay(rec).to_dict() == d.to_dict()
    again = json.loads(json.dumps(rec, allow_nan=False))  # strict JSON: non-finite as strings
    assert decisions.replays(again)
    assert stopping.replay(again).to_dict() == d.to_dict()
    assert stopping.replay(again).state == d.state  # the next state too


def test_the_record_holds_the_state_before_the_decision():
    rec, d, s = recorded("stop_after_reduce_lr")
    before = rec["inputs"]["state"]
    assert before["lr_reductions"] == 1 and before["stopped"] is False
    assert d.state.stopped is True and s.state == d.state
    assert [r["decision"]["verdict"] for r in s.records] == ["reduce_lr", "stop"]


@pytest.mark.parametrize(
    ("case", "change"),
    [
        ("val_loss_plateau", {"patience": 5}),
        ("grad_norm_plateau", {"confirm": 10}),
        ("exploding", {"divergence_ratio": 1e6}),
        ("max_steps", {"max_steps": 10_000}),
        ("eb_criterion", {"eb_threshold": 0.5}),
    ],
)
def test_a_record_with_changed_thresholds_replays_differently(case, change):
    rec, d, _ = recorded(case)
    changed = json.loads(json.dumps({**rec, "rule": {**rec["rule"], **change}}))
    again = decisions.replay(changed)
    assert again.verdict is StopVerdict.CONTINUE and again.to_dict() != d.to_dict()
    assert not decisions.replays(changed) and decisions.replays(rec)


def test_a_record_of_another_kind_or_version_is_refused():
    rec, _, _ = recorded("grad_norm_plateau")
    for other in (
        {**rec, "kind": "promotion_gate_decision"},
        {**rec, "kind": "retrain"},
        {**rec, "record_version": 2},
        {"rule": rec["rule"], "inputs": rec["inputs"]},
    ):
        with pytest.raises(decisions.NotADecisionRecord):
            stopping.replay(other)
    with pytest.raises(decisions.NotADecisionRecord):
        decisions.replay({**rec, "kind": "training_stopper"})


class RecordingSink:
    """A TelemetrySink keeping the texts and the event summaries a training run logs."""

    def __init__(self) -> None:
        self.texts: dict[str, str] = {}
        self.summaries: dict[str, dict] = {}

    def log_metrics(self, metrics, step):
        pass

    def log_artifacts(self, local_dir, artifact_path):
        summary = Path(local_dir) / "summary.json"
        if summary.exists():
            self.summaries[artifact_path] = json.loads(summary.read_text())

    def log_text(self, text, artifact_file):
        self.texts[artifact_file] = text

    def set_tags(self, tags):
        pass


def test_a_training_run_keeps_its_stop_decision_as_a_record_that_replays(contract):
    from pipeline.data.generate import WorldSpec, generate
    from pipeline.train.loop import TrainConfig, train, val_patience_stopper

    df = generate(WorldSpec(rows=1500, seed=3))
    cfg = TrainConfig(
        max_epochs=10,
        batch_size=128,
        stopper=val_patience_stopper(patience=1, min_delta=1.0),  # the 2nd epoch stops
        telemetry=False,
        state_every=0,
    )
    sink = RecordingSink()
    r = train(df, contract, cfg, sink=sink)
    assert r.stop_reason == "val_loss_plateau" and len(r.history) == 2
    trace = json.loads(sink.texts["training/decision_trace.json"])
    assert trace["decisions"] == r.decision_trace and trace["config"]["val_mode"] == "abs"
    (rec,) = trace["records"]  # the one non-continue decision
    assert rec["decision"] == r.decision_trace[-1]
    assert (rec["decision"]["verdict"], rec["decision"]["reason"]) == ("stop", "val_loss_plateau")
    assert rec["inputs"]["evidence"]["val_loss"] == r.history[-1]["val_log_loss"]
    assert decisions.replays(rec)


def test_a_diverged_training_run_keeps_a_record_that_replays(contract):
    from pipeline.data.generate import WorldSpec, generate
    from pipeline.train.loop import TrainConfig, TrainingDiverged, train

    df = generate(WorldSpec(rows=3000, seed=7))
    cfg = TrainConfig(
        max_epochs=10, learning_rate=100.0, optimizer="sgd", snapshot_every=5, state_every=0
    )
    sink = RecordingSink()
    with pytest.raises(TrainingDiverged):
        train(df, contract, cfg, sink=sink)
    (rec,) = json.loads(sink.texts["training/decision_trace.json"])["records"]
    assert rec["decision"]["verdict"] == "diverged" and decisions.replays(rec)
    (tag,) = [t for t in sink.summaries if t.startswith("telemetry/diverged-step-")]
    summary = sink.summaries[tag]
    assert summary["record"] == rec and summary["decision"] == rec["decision"]


# -- validations within epochs: patience and the agreement window stay in epochs ----------


def test_patience_counts_epochs_of_validations():
    """With 3 validations an epoch, patience 2 (epochs) is 6 validations without a gain."""
    stopper = GradientPlateauStopper(
        eb=False, norm_plateau=False, val_mode="abs", patience=2, val_per_epoch=3
    )
    reasons = [stopper.update(StopEvidence(step=i, val_loss=1.0)).reason for i in range(1, 9)]
    assert reasons[:6] == [StopReason.NOT_PLATEAUED] * 6
    assert reasons[6] is StopReason.VAL_LOSS_PLATEAU and stopper.patience_validations == 6
    sd = stopper.state_dict()
    assert sd["config"]["val_per_epoch"] == 3
    with pytest.raises(ValueError, match="val_per_epoch must be >= 1"):
        GradientPlateauStopper(val_per_epoch=0)


def _agreeing(**kw):  # type: ignore[no-untyped-def]
    """A stopper whose log-norm plateau is confirmed, waiting for validation to agree."""
    from pipeline.train.stopping import StopperState

    cfg = {
        "eb": False,
        "val_mode": "rel",
        "val_window": 1,
        "val_window_delta": 3e-3,
        "val_per_epoch": 4,
        "patience": 3,
        **kw,
    }
    stopper = GradientPlateauStopper(**cfg)
    # the best fell 10% over the last epoch (4 validations); the best so far is 0.9
    state = StopperState(checks=20, norm_count=3, best_val=0.9, val_bests=(1.0, 0.97, 0.95, 0.9))
    return stopper, state


@pytest.mark.parametrize(
    ("val_rise", "val_loss", "verdict", "reason"),
    [
        # 2.2% above the best: past its best (GL), validation agrees at once
        (1e-2, 0.92, StopVerdict.STOP, StopReason.GRAD_NORM_PLATEAU),
        # 0.6% above: within the noise allowed, and the last epoch gained 10%: continue
        (1e-2, 0.905, StopVerdict.CONTINUE, StopReason.NOT_PLATEAUED),
        # without val_rise only the window counts: it still holds the 10% gain
        (None, 0.92, StopVerdict.CONTINUE, StopReason.NOT_PLATEAUED),
        # a new best: improving, whatever the rise setting
        (1e-2, 0.85, StopVerdict.CONTINUE, StopReason.NOT_PLATEAUED),
    ],
)
def test_validation_agrees_when_it_rises_above_its_best(val_rise, val_loss, verdict, reason):
    stopper, state = _agreeing(val_rise=val_rise)
    d = stopper.decide(StopEvidence(step=200, epoch=5, val_loss=val_loss), state)
    assert (d.verdict, d.reason) == (verdict, reason)
    assert d.evidence["window_validations"] == 4 and d.evidence["val_rise"] == val_rise
    assert d.evidence["val_risen"] is (verdict is StopVerdict.STOP)


def test_the_agreement_window_spans_an_epoch_of_validations():
    """val_window 1 with 4 validations an epoch: the gain is measured over the last 4, so a
    quarter-epoch without a gain (noise on a flat validation loss) does not agree."""
    stopper, state = _agreeing()
    d = stopper.decide(StopEvidence(step=200, epoch=5, val_loss=0.9), state)
    assert d.state.val_bests == (1.0, 0.97, 0.95, 0.9, 0.9)
    assert d.evidence["val_window_gain"] == pytest.approx(0.1) and not d.evidence["val_plateau"]
    assert d.verdict is StopVerdict.CONTINUE
    # a whole epoch (4 validations) since the best reached 0.9: nothing gained, it agrees
    for i in range(2):
        d = stopper.decide(StopEvidence(step=201 + i, epoch=5, val_loss=0.9), d.state)
        assert d.verdict is StopVerdict.CONTINUE and d.evidence["val_window_gain"] > 0.003
    d = stopper.decide(StopEvidence(step=203, epoch=5, val_loss=0.9), d.state)
    assert (d.verdict, d.reason) == (StopVerdict.STOP, StopReason.GRAD_NORM_PLATEAU)


def test_a_record_without_val_per_epoch_replays_as_one_validation_an_epoch():
    """Records written before validations within epochs (no val_per_epoch, no val_rise in
    the rule, no last_val in the state) replay as they decided."""
    stopper = GradientPlateauStopper(eb=False, norm_plateau=False, val_mode="abs", patience=2)
    before = stopper.state
    for i in range(1, 4):
        before = stopper.state
        d = stopper.update(StopEvidence(step=i, val_loss=1.0))
    rec = decision_record(stopper, StopEvidence(step=3, val_loss=1.0), before, d)
    for key in ("val_per_epoch", "val_rise"):
        del rec["rule"][key]
    del rec["inputs"]["state"]["last_val"]
    assert d.reason is StopReason.VAL_LOSS_PLATEAU and decisions.replays(rec)
