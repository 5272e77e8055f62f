"""Gradient telemetry: statistics equal plain PyTorch, logging never blocks, nothing is lost."""

from __future__ import annotations

import copy
import json
import math
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.train.loop import (
    TELEMETRY_METRIC_POINTS,
    TrainConfig,
    no_stopper,
    telemetry_cadence,
    train,
)
from pipeline.train.telemetry import (
    BINS,
    LOG2_MAX,
    LOG2_MIN,
    N_STATS,
    STAT_NAMES,
    GradientTelemetry,
    detect_events,
    gradient_stats,
    heatmap_grid,
    norm_series,
    sparse_parameters,
    update_ratios,
)


def reference_stats(g: torch.Tensor) -> tuple[list[float], np.ndarray]:
    """The same statistics, the obvious way."""
    v = g.detach().double().reshape(-1).numpy()
    finite = np.isfinite(v)
    head = [np.sqrt(np.sum(v**2)), np.max(np.abs(v)), np.mean(v), np.mean(v == 0), np.sum(~finite)]
    nz = v[finite & (v != 0)]
    x = np.clip(np.log2(np.abs(nz)), LOG2_MIN, LOG2_MAX)
    hist, _ = np.histogram(x, bins=BINS, range=(LOG2_MIN, LOG2_MAX))
    return head, hist


def reference_dead(g: torch.Tensor) -> float:
    """The share of units (rows of a weight, entries of a 1-D tensor) with an all-zero gradient."""
    rows = g.detach().reshape(g.shape[0], -1) if g.dim() >= 2 else g.detach().reshape(-1, 1)
    return float((rows.abs().amax(dim=1) == 0).double().mean())


def reference_rows(grads, before, model) -> np.ndarray:
    """Plain PyTorch's row per tensor, as a snapshot holds it: head, update ratio (from the
    weights ``before`` the step to the model's now), dead-unit share, histogram."""
    rows = []
    for g, b, p in zip(grads, before, model.parameters(), strict=True):
        head, hist = reference_stats(g)
        ratio = float((p.detach() - b).norm() / b.norm())
        rows.append([*head, ratio, reference_dead(g), *hist])
    return np.asarray(rows)


CASES = {
    "gaussian": torch.randn(64, 33, generator=torch.Generator().manual_seed(0)),
    "with-zeros": torch.tensor([0.0, 0.0, 1.5, -2.0, 0.25, 0.0]),
    "tiny-and-huge": torch.tensor([1e-30, -1e-20, 3e5, -1e10, 1.0]),  # clamped into end bins
    "all-zero": torch.zeros(7),
    "exact-powers": torch.tensor([0.5, 1.0, 2.0, 4.0, -0.125]),
    # the float32 just below a power of two is in the octave below it (a float32 log2 rounds
    # it up to the power); denormals go to the lowest bin, 2^8 and above to the highest
    "just-below-powers": torch.from_numpy(
        np.array(
            [np.nextafter(np.float32(2.0**k), np.float32(0)) for k in (-30, -20, -10, -3, 1, 7, 8)]
            + [1e-40, -3e-39, 2.0**-40, -(2.0**8), 1e6],
            dtype=np.float32,
        )
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradient_stats_match_plain_pytorch(name):
    g = CASES[name]
    got = gradient_stats([g]).numpy()[0]
    head, hist = reference_stats(g)
    np.testing.assert_allclose(got[:5], head, rtol=1e-5, atol=1e-12)
    np.testing.assert_array_equal(got[5:], hist)
    assert got[5:].sum() == np.count_nonzero(g.numpy())


@pytest.mark.parametrize(
    ("values", "nonfinite"),
    [([1.0, float("nan"), 2.0], 1), ([float("inf"), float("-inf"), 0.0, 1.0], 2)],
)
def test_nonfinite_entries_are_counted_and_kept_out_of_the_histogram(values, nonfinite):
    got = gradient_stats([torch.tensor(values)]).numpy()[0]
    assert got[STAT_NAMES.index("nonfinite")] == nonfinite
    assert got[5:].sum() == sum(1 for v in values if np.isfinite(v) and v != 0)


def test_update_ratio_matches_plain_pytorch():
    before = [torch.randn(5, 4), torch.randn(3)]
    after = [b + 0.01 * torch.randn_like(b) for b in before]
    got = update_ratios(after, before).numpy()
    want = [float((a - b).norm() / b.norm()) for a, b in zip(after, before, strict=True)]
    np.testing.assert_allclose(got, want, rtol=1e-5)


class RecordingSink:
    def __init__(self, delay_s: float = 0.0, fail: bool = False, fail_artifacts: bool = False):
        self.delay_s, self.fail, self.fail_artifacts = delay_s, fail, fail_artifacts
        self.batches: list[tuple[int, dict[str, float]]] = []
        self.artifacts: list[tuple[str, list[str]]] = []
        self.texts: dict[str, str] = {}
        self.tags: dict[str, str] = {}
        self.lock = threading.Lock()

    def log_metrics(self, metrics, step):
        time.sleep(self.delay_s)
        if self.fail:
            raise ConnectionError("tracking server down")
        with self.lock:
            self.batches.append((step, dict(metrics)))

    def log_artifacts(self, local_dir, artifact_path):
        if self.fail_artifacts:
            raise ConnectionError("artifact store down")
        self.artifacts.append((artifact_path, sorted(p.name for p in Path(local_dir).iterdir())))

    def log_text(self, text, artifact_file):
        self.texts[artifact_file] = text

    def set_tags(self, tags):
        self.tags.update(tags)


def snapshots(tel: GradientTelemetry, model: nn.Module, steps: int, lr: float = 0.1):
    """Drive ``tel`` the way the loop does; return the plain-PyTorch expectation per step."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    expected = {}
    for step in range(1, steps + 1):
        x = torch.randn(16, 5)
        opt.zero_grad()
        model(x).square().mean().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        before = [p.detach().clone() for p in model.parameters()]
        due = tel.due(step)
        if due:
            tel.capture_grads()
        opt.step()
        if due:
            packed = tel.device_pack()
            assert packed.ndim == 1 and packed.numel() == tel.width  # one tensor, one transfer
            tel.ingest(step, packed.cpu().numpy(), {"loss": 1.0})
            expected[step] = reference_rows(grads, before, model)
    return expected


def test_snapshot_values_match_plain_pytorch_and_reach_the_sink():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    sink = RecordingSink()
    tel = GradientTelemetry(
        list(model.named_parameters()), snapshot_every=3, sink=sink, metric_stats=STAT_NAMES
    )
    expected = snapshots(tel, model, steps=10)
    report = tel.close()
    assert report["snapshots"] == report["sent"] == 3 and report["spilled"] == 0
    a = tel.arrays()
    assert list(a["steps"]) == [3, 6, 9]
    for i, step in enumerate(a["steps"]):
        got = np.concatenate([a["stats"][i], a["hist"][i]], axis=1)
        np.testing.assert_allclose(got, expected[step], rtol=1e-5, atol=1e-9)
    step, metrics = sink.batches[0]
    assert step == 3 and metrics["grad/0.weight/l2"] == pytest.approx(expected[3][0][0], rel=1e-5)
    assert {f"grad/2.bias/{s}" for s in STAT_NAMES} <= set(metrics) and metrics["train/loss"] == 1.0


@pytest.mark.parametrize(
    ("sink_kwargs", "queue_size", "expect_sent"),
    [
        ({"delay_s": 0.3}, 2, None),  # slow: the queue overflows, the rest is spilled
        ({"fail": True}, 64, 0),
    ],  # down: every snapshot fails its retries and is spilled
    ids=["slow-server", "server-down"],
)
def test_slow_or_down_tracking_never_blocks_and_never_drops(
    tmp_path, sink_kwargs, queue_size, expect_sent
):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    sink = RecordingSink(**sink_kwargs)
    tel = GradientTelemetry(
        list(model.named_parameters()),
        snapshot_every=1,
        sink=sink,
        spill_dir=tmp_path,
        queue_size=queue_size,
        retries=2,
        backoff_s=0.01,
    )
    t0 = time.perf_counter()
    snapshots(tel, model, steps=20)
    assert time.perf_counter() - t0 < 2.0  # 20 snapshots against a 0.3 s/batch server
    report = tel.close(timeout_s=5)
    assert report["snapshots"] == 20
    assert report["sent"] + report["spilled"] + report["in_flight_at_close"] == 20
    assert report["spilled"] > 0
    if expect_sent is not None:
        assert report["sent"] == expect_sent and report["send_failures"]
    lines = (tmp_path / "telemetry-spill" / "telemetry-spill.jsonl").read_text().splitlines()
    assert len(lines) == report["spilled"]
    assert {json.loads(x)["reason"] for x in lines} <= {
        "queue_full",
        "send_failed",
        "not_sent_at_close",
    }
    assert report["spill_logged_to"] == "telemetry/spill"  # artifacts still work here
    assert ("telemetry/spill", ["telemetry-spill.jsonl"]) in sink.artifacts


def test_artifacts_go_to_the_run_or_stay_on_disk_when_it_is_down(tmp_path):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    ok = RecordingSink()
    tel = GradientTelemetry(list(model.named_parameters()), snapshot_every=2, sink=ok)
    snapshots(tel, model, steps=8)
    where = tel.write_artifacts("final", {"stop_reason": "eb_criterion"})
    assert where["logged_to"] == "telemetry/final"
    assert ok.artifacts == [
        ("telemetry/final", ["gradients.npz", "histograms.png", "norms.png", "summary.json"])
    ]
    tel.close()

    down = RecordingSink(fail_artifacts=True)
    tel = GradientTelemetry(
        list(model.named_parameters()), snapshot_every=2, sink=down, spill_dir=tmp_path
    )
    snapshots(tel, model, steps=8)
    where = tel.write_artifacts("diverged-step-8")
    assert "sink_error" in where and Path(where["local_dir"]).is_dir()
    with np.load(Path(where["local_dir"]) / "gradients.npz") as z:
        assert z["stats"].shape == (4, 4, N_STATS) and z["hist"].shape == (4, 4, BINS)
        assert list(z["stat_names"]) == list(STAT_NAMES)
    tel.close()


def test_history_round_trips_for_resume():
    model = nn.Linear(5, 2)
    tel = GradientTelemetry(list(model.named_parameters()), snapshot_every=1)
    snapshots(tel, model, steps=4)
    again = GradientTelemetry(list(model.named_parameters()), snapshot_every=1)
    again.load_state_tensors(tel.state_tensors(), tel.taken)
    for k, v in tel.arrays().items():
        np.testing.assert_array_equal(again.arrays()[k], v)


# -- a history a reviewer can read ------------------------------------------------------------


class CopyingSink(RecordingSink):
    """Keeps a copy of every artifact folder, the way the run's artifact store would."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def log_artifacts(self, local_dir, artifact_path):
        super().log_artifacts(local_dir, artifact_path)
        shutil.copytree(local_dir, self.root / artifact_path, dirs_exist_ok=True)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, contract):
    """A demo-sized run: the reference data, the default spec's budget, the default stopper."""
    from pipeline.data.generate import WorldSpec, generate
    from pipeline.spec import get_spec

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("demo-run")
    sink = CopyingSink(root)
    cfg = TrainConfig(max_epochs=get_spec("card_fraud").training.max_epochs, state_every=0)
    result = train(generate(WorldSpec(rows=4000, seed=5)), contract, cfg, sink=sink)
    with np.load(root / "telemetry" / "final" / "gradients.npz") as z:
        arrays = {k: z[k] for k in z.files}
    return result, sink, arrays, root / "telemetry" / "final"


def test_a_demo_sized_run_keeps_a_history_with_real_step_axes(demo_run):
    result, sink, a, final = demo_run
    steps = a["steps"]
    assert len(steps) >= 32, f"{len(steps)} snapshots over {result.steps} steps"
    assert (np.diff(steps) > 0).all() and steps[-1] == result.steps
    assert {"norms.png", "histograms.png"} <= {p.name for p in final.iterdir()}
    x, norms = norm_series(a)  # what norms.png draws
    assert norms.shape == (len(steps), len(a["names"])) and (x == steps).all()
    assert np.isfinite(norms).sum(axis=0).min() >= 32  # a line per tensor, not one point
    for i in range(len(a["names"])):  # what histograms.png draws: one column per snapshot
        xe, ye, h = heatmap_grid(a, i)
        assert h.shape == (BINS, len(steps)) >= (BINS, 32)
        assert (np.diff(xe) > 0).all() and xe[0] < steps[0] and xe[-1] > steps[-1]
        assert (xe[:-1] < steps).all() and (steps < xe[1:]).all()
    per_tensor = {}
    for _, metrics in sink.batches:
        for k in metrics:
            per_tensor[k] = per_tensor.get(k, 0) + 1
    assert per_tensor["grad/net.0.weight/l2"] == min(len(steps), TELEMETRY_METRIC_POINTS)
    assert sink.batches[-1][0] == result.steps  # the last snapshot is always one of them
    health = json.loads((final / "summary.json").read_text())
    assert health["kept"] == len(steps) and health["events"] == []  # a healthy run
    assert 0 < health["final_update_ratio"] < 1
    assert result.telemetry["health"]["events"] == []


@pytest.mark.parametrize(
    ("epochs", "steps_per_epoch"), [(30, 7), (30, 32), (50, 250), (1, 3), (200, 1000)]
)
def test_the_cadence_keeps_enough_snapshots_even_when_stopping_at_half(epochs, steps_per_epoch):
    cfg = TrainConfig(max_epochs=epochs, telemetry=False)
    every = telemetry_cadence(cfg, steps_per_epoch)
    expected = epochs * steps_per_epoch
    assert expected // every >= min(64, expected)
    assert (expected // 2) // every >= min(32, expected // 2)
    assert (expected // 8) // every >= min(32, expected // 8)  # an early stop still reads


@pytest.mark.parametrize(("epochs", "steps_per_epoch"), [(30, 32), (30, 7), (50, 250), (4, 28)])
def test_an_early_stop_keeps_32_and_any_later_one_32_to_64(epochs, steps_per_epoch):
    """The default cadence, followed step by step: a stop at an eighth of the budget keeps
    32 snapshots (all of them when the run has fewer steps), any later stop 32-64, and the
    whole run takes about twice its history's bound, not more."""
    cfg = TrainConfig(max_epochs=epochs, telemetry=False)
    budget = epochs * steps_per_epoch
    model = torch.nn.Linear(3, 1)
    tel = GradientTelemetry(
        list(model.named_parameters()),
        snapshot_every=telemetry_cadence(cfg, steps_per_epoch),
        max_history=cfg.telemetry_snapshots,
    )
    assert cfg.telemetry_snapshots == 64
    for step in range(1, budget + 1):
        if tel.due(step):
            tel.ingest(step, np.zeros(tel.width, dtype=np.float32))
        if step >= budget // 8:
            assert min(32, step) <= len(tel.steps) <= 64, (step, len(tel.steps))
    assert tel.taken <= 2 * 64 + 16 and len(tel.steps) >= min(32, budget)


def test_a_thinned_history_holds_the_statistics_of_each_kept_snapshot():
    """The loop's path (capture_grads, capture_update) over a history that thins three
    times, read in the middle (as a training state does) and at the end: each kept snapshot
    holds exactly what plain PyTorch says of its step, every snapshot taken is counted,
    and the kept steps are the thinning rule's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    tel = GradientTelemetry(list(model.named_parameters()), snapshot_every=1, max_history=8)
    rule = GradientTelemetry(list(model.named_parameters()), snapshot_every=1, max_history=8)
    expected = {}
    for step in range(1, 61):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(
            model(torch.randn(16, 5)), torch.randint(0, 3, (16,))
        ).backward()
        due = tel.due(step)
        if due:
            tel.capture_grads()
            grads = [p.grad.clone() for p in model.parameters()]
            before = [p.detach().clone() for p in model.parameters()]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)  # after the capture
        opt.step()
        if due:
            tel.capture_update(step, {"loss": float(step)})
            expected[step] = reference_rows(grads, before, model)
        if rule.due(step):  # the same rule on values ingested one by one
            rule.ingest(step, np.zeros(rule.width, dtype=np.float32))
        if step == 30:
            tel.arrays()
    a = tel.arrays()
    assert list(a["steps"]) == rule.steps and tel.taken == rule.taken >= 16
    assert tel.snapshot_every == rule.snapshot_every >= 8
    for i, step in enumerate(a["steps"]):
        got = np.concatenate([a["stats"][i], a["hist"][i]], axis=1)
        # (atol: the mean of a softmax layer's gradient cancels to ~0 in float32)
        np.testing.assert_allclose(got, expected[step], rtol=1e-5, atol=1e-7)
        assert tel.scalars[i] == {"loss": float(step)}


def test_a_full_history_keeps_every_other_snapshot_and_halves_its_rate():
    """The bound that makes the cadence safe for any stop: never more than max_history kept,
    never fewer than half of it once full, evenly spaced, the newest always kept."""
    model = torch.nn.Linear(3, 1)
    tel = GradientTelemetry(list(model.named_parameters()), snapshot_every=1, max_history=8)
    step, taken = 0, []
    while step < 200:
        step += 1
        if tel.due(step):
            tel.ingest(step, np.zeros(tel.width, dtype=np.float32))
            taken.append(step)
    assert 4 <= len(tel.steps) <= 8 and tel.steps[-1] == taken[-1]
    gaps = np.diff(tel.steps)
    assert gaps.max() <= 2 * gaps.min(), tel.steps  # evenly spaced, within one doubling
    assert tel.snapshot_every >= 16 and len(taken) < 40  # the rate halved as the run went on


def scaled_and_clipped_steps(model, batches, clip, scaler_scale):
    """The documented order with a loss scaler and clipping: scale → backward → unscale_ →
    telemetry → clip → scaler.step → update."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=scaler_scale)
    tel = GradientTelemetry(list(model.named_parameters()), snapshot_every=1)
    clipped = []
    for step, (x, y) in enumerate(batches, start=1):
        opt.zero_grad()
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        scaler.unscale_(opt)
        tel.capture_grads()
        total = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        clipped.append((float(total), [p.grad.norm().item() for p in model.parameters()]))
        scaler.step(opt)
        scaler.update()
        tel.ingest(step, tel.device_pack().numpy())
    return tel.arrays(), clipped


def test_statistics_are_read_unscaled_and_before_clipping():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    plain = copy.deepcopy(model)
    batches = [(torch.randn(32, 6) * 5, torch.randint(0, 3, (32,))) for _ in range(3)]
    a, clipped = scaled_and_clipped_steps(model, batches, clip=0.05, scaler_scale=2.0**12)
    opt = torch.optim.SGD(plain.parameters(), lr=0.05)  # plain PyTorch: no scaler, same clip
    for i, (x, y) in enumerate(batches):
        opt.zero_grad()
        nn.functional.cross_entropy(plain(x), y).backward()
        want = [p.grad.norm().item() for p in plain.parameters()]
        np.testing.assert_allclose(a["stats"][i, :, STAT_NAMES.index("l2")], want, rtol=1e-4)
        total, after_clip = clipped[i]
        assert total == pytest.approx(math.sqrt(sum(w * w for w in want)), rel=1e-4)
        assert total > 0.05 and sum(v * v for v in after_clip) ** 0.5 == pytest.approx(0.05)
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.05)
        opt.step()


def test_the_loop_reads_gradients_before_clipping(contract):
    from pipeline.data.generate import WorldSpec, generate

    sink = RecordingSink()
    cfg = TrainConfig(max_epochs=2, grad_clip=1e-3, stopper=no_stopper(), state_every=0)
    train(generate(WorldSpec(rows=1500, seed=6)), contract, cfg, sink=sink)
    assert sink.batches
    for _, m in sink.batches:  # train/grad_norm: clip_grad_norm_'s pre-clip total norm
        per_tensor = [v for k, v in m.items() if k.startswith("grad/") and k.endswith("/l2")]
        total = math.sqrt(sum(v * v for v in per_tensor))
        assert total == pytest.approx(m["train/grad_norm"], rel=1e-4) and total > 1e-3


def history(l2: np.ndarray, dead: np.ndarray | None = None, frac_zero: np.ndarray | None = None):
    stats = np.zeros((*l2.shape, N_STATS), np.float32)
    stats[:, :, STAT_NAMES.index("l2")] = l2
    for name, v in (("dead_units", dead), ("frac_zero", frac_zero)):
        if v is not None:
            stats[:, :, STAT_NAMES.index(name)] = v
    return np.arange(1, len(l2) + 1) * 10, stats


def test_a_spike_a_vanishing_layer_and_dead_units_are_events():
    rng = np.random.default_rng(0)
    l2 = 1.0 + 0.1 * rng.random((40, 4))
    l2[25, 0] = 30.0  # a spike in tensor a
    l2[30:, 1] = np.geomspace(1e-3, 1e-9, 10)  # tensor b vanishes
    dead = np.zeros_like(l2)
    dead[-5:, 2] = 0.75  # tensor c: three quarters of its units get no gradient
    fz = np.zeros_like(l2)
    fz[:, 3] = 0.9  # tensor d: most entries zero (constant inputs), every unit alive
    steps, stats = history(l2, dead, fz)
    got = {(e["kind"], e["tensor"], e["step"]) for e in detect_events(steps, stats, "abcd")}
    assert got == {("spike", "a", 260), ("vanishing", "b", 400), ("dead_units", "c", 400)}
    healthy = history(1.0 + 0.1 * rng.random((40, 4)))
    assert detect_events(*healthy, "abcd") == []


def test_events_reach_the_alert_and_the_gate_report_through_the_run(tmp_path):
    """The telemetry's summary on a real (local) MLflow run is what the alert and the gate
    report read."""
    from mlflow import MlflowClient

    from pipeline import alerts
    from pipeline.gate_report import gradient_health_line
    from pipeline.train.telemetry import MlflowRunSink, load_summary

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("t", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    tel = GradientTelemetry(
        list(model.named_parameters()), snapshot_every=1, sink=MlflowRunSink(client, run_id)
    )
    snapshots(tel, model, steps=12, lr=0.01)
    spike = np.asarray(tel.stats[-1]).copy()
    spike[2, STAT_NAMES.index("l2")] *= 1e3  # 2.weight: a thousandfold gradient
    tel.ingest(13, np.concatenate([spike, tel.hists[-1]], axis=1).reshape(-1))
    tel.write_artifacts("final", {"stop_reason": "eb_criterion", "step": 13})
    tel.close()
    found = alerts.gradient_anomalies(alerts.gradient_series(run_id, client))
    assert [(a.tensor, a.what, a.step) for a in found] == [("2.weight", "spike", 13)]
    line = gradient_health_line(load_summary(run_id, client), run_id)
    assert "stop `eb_criterion` at step 13" in line and "spikes: `2.weight` at step 13" in line
    assert f"runs:/{run_id}/telemetry/final/norms.png" in line and "vanishing: none" in line
    assert "no telemetry summary" in gradient_health_line(None, run_id)


def test_dead_units_are_counted_per_unit_not_per_entry():
    """A hidden layer whose ReLU units never fire has dead units; an input that is always
    zero (a blank pixel) zeroes a weight column, which kills no unit; an embedding's
    unused rows are not judged."""
    torch.manual_seed(0)
    emb = nn.Embedding(50, 3)
    first, second = nn.Linear(6, 8), nn.Linear(8, 2)
    with torch.no_grad():
        first.bias[:6] = -1e3  # units 0-5 of 8 never fire: 75 % dead
    model = nn.ModuleDict({"emb": emb, "first": first, "second": second})
    names = list(model.named_parameters())
    tel = GradientTelemetry(names, snapshot_every=1, sparse=sparse_parameters(model))
    assert sparse_parameters(model) == {"emb.weight"}
    x = torch.randn(32, 6)
    x[:, :4] = 0.0  # four of the six inputs constant zero: most of first.weight's entries zero
    ids = torch.randint(0, 5, (32,))  # the batch uses 5 of the 50 embedding rows
    for step in (1, 2):
        for p in model.parameters():
            p.grad = None
        out = second(torch.relu(first(x))) + emb(ids)[:, :2]
        out.sum().backward()
        tel.capture_grads()
        tel.capture_update(step, {})
    a = tel.arrays()
    stat = {n: a["stats"][-1, i] for i, (n, _) in enumerate(names)}
    dead, zero = STAT_NAMES.index("dead_units"), STAT_NAMES.index("frac_zero")
    assert stat["first.weight"][dead] == pytest.approx(0.75)  # rows of the silent units
    assert stat["first.weight"][zero] > 0.75  # + the constant-zero input columns
    assert stat["second.weight"][dead] == 0.0  # its rows see the two live units
    assert math.isnan(stat["emb.weight"][dead]) and stat["emb.weight"][zero] >= 0.9
    events = {(e["kind"], e["tensor"]) for e in tel.gradient_events()}
    assert ("dead_units", "first.weight") not in events  # two snapshots: too few to judge
    steps = np.arange(1, 7)
    hist = np.repeat(a["stats"][-1:], 6, axis=0)
    got = {(e["kind"], e["tensor"]) for e in detect_events(steps, hist, [n for n, _ in names])}
    assert ("dead_units", "first.weight") in got and ("dead_units", "first.bias") in got
    assert not any(t == "emb.weight" for _, t in got)
