"""Crash-safe training: SIGKILL `python -m pipeline train` mid-epoch, run it again, and it
resumes from the last complete training-state checkpoint — same weights as an
uninterrupted seeded run, one MLflow run."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline import checkpoint, registry, stages, storage
from pipeline.contract import default_contract
from pipeline.data.generate import WorldSpec, generate, to_parquet_bytes
from pipeline.ingest import read_frame
from pipeline.settings import get_settings
from pipeline.train.loop import TrainConfig, split_by_id, train

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
ARGS = {"max_epochs": 5, "batch_size": 64, "seed": 3, "learning_rate": 3e-3}
STATE_EVERY = 5


def newest_state(folder: Path) -> Path | None:
    done = sorted(p for p in folder.glob("step-*") if p.is_dir()) if folder.is_dir() else []
    return done[-1] if done else None


def test_sigkill_mid_epoch_then_resume(pipeline_home, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    root = get_settings().storage_root
    batch = storage.write_bytes(
        f"{root}/landing/card_fraud/b.parquet",
        to_parquet_bytes(generate(WorldSpec(rows=4000, seed=11))),
    ).uri
    ctx = stages.RunContext(dag_id="resume", run_id="r1")
    ingested = stages.ingest_batch(ctx, batch)
    record = tmp_path / "ingested.json"
    record.write_text(json.dumps(ingested.to_xcom()))
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "train",
        "--in",
        str(record),
        "--dag-id",
        ctx.dag_id,
        "--run-id",
        ctx.run_id,
        "--state-every",
        str(STATE_EVERY),
    ]
    for k, v in ARGS.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    state_dir = get_settings().home_dir / "train-state" / ctx.run_key
    df = read_frame(ingested.uri)
    train_rows = int((~split_by_id(df[default_contract().id_column], 0.2)).sum())
    steps_per_epoch = math.ceil(train_rows / ARGS["batch_size"])

    # 1. start training, SIGKILL it once a mid-epoch training state exists
    first = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and first.poll() is None:
            s = newest_state(state_dir)
            if s is not None and json.loads((s / "state.json").read_text())["loop"]["pos"] > 0:
                os.kill(first.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
    finally:
        if first.poll() is None and time.monotonic() >= deadline:
            first.kill()
    first.wait(30)
    out1 = first.stdout.read().decode()
    assert first.returncode == -signal.SIGKILL, f"training was not killed mid-run:\n{out1[-3000:]}"
    killed_at = newest_state(state_dir)
    assert killed_at is not None and not killed_at.name.endswith("-final")
    killed = json.loads((killed_at / "state.json").read_text())["loop"]
    assert 0 < killed["pos"] < steps_per_epoch, "the kill was not mid-epoch"
    assert killed["step"] < ARGS["max_epochs"] * steps_per_epoch

    # 2. the retry resumes from exactly that checkpoint and finishes
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"resumed from training state {killed_at.name}" in second.stderr
    rec = json.loads(second.stdout[second.stdout.index("{") :])
    assert rec["resumed_from"]["step"] == killed["step"]
    assert rec["resumed_from"]["position_in_epoch"] == killed["pos"]
    assert not state_dir.exists()  # superseded by the published checkpoint

    # 3. same weights as an uninterrupted run with the same seed
    torch.set_num_threads(1)
    cfg = TrainConfig(**ARGS, device=get_settings().device, state_every=0, telemetry=False)
    reference = train(df, default_contract(), cfg)
    resumed, _, _ = checkpoint.load_for_inference(rec["checkpoint_uri"])
    for name, want in reference.model.state_dict().items():
        got = resumed.state_dict()[name]
        assert torch.allclose(got, want, rtol=0, atol=1e-6), name
    assert rec["stop_reason"] == reference.stop_reason and rec["steps"] == reference.steps

    # 4. one MLflow run, and it says it was resumed
    runs = registry.client().search_runs([registry.experiment_id()])
    assert len(runs) == 1 and runs[0].info.run_id == ingested.mlflow_run_id
    assert runs[0].data.tags["train.resumed_from_step"] == str(killed["step"])
    assert runs[0].data.tags["stage.train_model.verdict"] == "trained"
