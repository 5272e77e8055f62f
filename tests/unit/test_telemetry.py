"""Gradient telemetry: statistics equal plain PyTorch, logging never blocks, nothing is lost."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.train.telemetry import (
    BINS,
    LOG2_MAX,
    LOG2_MIN,
    N_STATS,
    STAT_NAMES,
    GradientTelemetry,
    gradient_stats,
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


CASES = {
    "gaussian": torch.randn(64, 33, generator=torch.Generator().manual_seed(0)),
    "with-zeros": torch.tensor([0.0, 0.0, 1.5, -2.0, 0.25, 0.0]),
    "tiny-and-huge": torch.tensor([1e-30, -1e-20, 3e5, -1e10, 1.0]),  # clamped into end bins
    "all-zero": torch.zeros(7),
    "exact-powers": torch.tensor([0.5, 1.0, 2.0, 4.0, -0.125]),
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
            rows = []
            for g, b, p in zip(grads, before, model.parameters(), strict=True):
                head, hist = reference_stats(g)
                ratio = float((p.detach() - b).norm() / b.norm())
                rows.append([*head, ratio, *hist])
            expected[step] = np.asarray(rows)
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
