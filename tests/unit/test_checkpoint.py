"""Checkpoint integrity: every kind of damage is refused with its own reason, nothing is
ever unpickled, a crash mid-write leaves the previous checkpoint intact, and optimizer
state round-trips without pickle."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline import checkpoint
from pipeline.data.generate import WorldSpec, generate
from pipeline.train.loop import TrainConfig, train

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained(contract):
    df = generate(WorldSpec(rows=3000, seed=11))
    return train(df, contract, TrainConfig(max_epochs=3, seed=1)), df


def _save(path: Path, trained, **kw) -> dict:
    result, df = trained
    return checkpoint.save_checkpoint(
        path,
        result.model,
        result.features,
        df.head(64),
        data_snapshot={"uri": "file:///x", "sha256": "ab"},
        training={"stop_reason": result.stop_reason},
        **kw,
    )


@pytest.fixture
def ckpt(pipeline_home, trained, tmp_path) -> Path:
    path = tmp_path / "checkpoints" / "ckpt"
    _save(path, trained)
    return path


def problems(path: Path) -> str:
    v = checkpoint.verify_checkpoint(path)
    assert not v.intact
    assert all("\n" not in p for p in v.problems)
    return " | ".join(v.problems)


def test_intact_checkpoint_verifies_and_loads(ckpt, trained):
    v = checkpoint.verify_checkpoint(ckpt)
    assert v.intact, v.problems
    assert v.manifest["all_finite"] is True
    assert v.manifest["stop_reason"] == trained[0].stop_reason  # explicit, top level
    assert v.manifest["optimizer"] is None
    for key in ("tensors", "model", "features", "data_snapshot", "code_version"):
        assert v.manifest[key]
    assert set(v.manifest["files"]) == {"model.safetensors", "probe.safetensors", "probe.parquet"}
    model, spec = checkpoint.load_verified_model(ckpt, v.manifest)
    assert spec == trained[0].features


def test_never_overwrites(ckpt, trained):
    with pytest.raises(checkpoint.CheckpointError, match="never overwritten"):
        _save(ckpt, trained)


# -- the rejection matrix -------------------------------------------------------------------


def _resign(ck: Path, edit=None) -> None:
    """Recompute digests of the payload files and re-sign with the valid key, after
    ``edit(manifest)``: damage that the digests and the signature no longer catch."""
    m = json.loads((ck / "manifest.json").read_text())
    for name in m["files"]:
        data = (ck / name).read_bytes()
        m["files"][name] = {
            "sha256": checkpoint.hashlib.sha256(data).hexdigest(),
            "size": len(data),
        }
    if edit:
        edit(m)
    raw = json.dumps(m, indent=2, sort_keys=True).encode()
    (ck / "manifest.json").write_bytes(raw)
    (ck / "manifest.sig").write_text(checkpoint.sign(raw))


def flip_byte(ck, _):
    p = ck / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[-5] ^= 0x01
    p.write_bytes(bytes(data))


def truncate(ck, _):
    p = ck / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-100])


def manifest_edited(ck, _):
    m = json.loads((ck / "manifest.json").read_text())
    m["stop_reason"] = "edited"
    (ck / "manifest.json").write_text(json.dumps(m))


def other_key(ck, monkeypatch):
    from pipeline.settings import get_settings

    monkeypatch.setenv("PIPELINE_SIGNING_KEY", "another-key")
    get_settings.cache_clear()


def shape_vs_config(ck, _):
    def edit(m):
        m["model"]["kwargs"]["hidden"] = [32, 32]  # tensors still say 64 x 32

    _resign(ck, edit)


def non_finite(ck, _):
    state = load_file(str(ck / "model.safetensors"))
    name = sorted(state)[0]
    state[name].view(-1)[0] = float("nan")
    save_file(state, str(ck / "model.safetensors"))
    _resign(ck)  # the manifest still claims all_finite: true


def probe_changed(ck, _):
    probe = load_file(str(ck / "probe.safetensors"))
    save_file(
        {"probabilities": probe["probabilities"].flip(1).contiguous()},
        str(ck / "probe.safetensors"),
    )
    _resign(ck)


def signed_pickle_payload(ck, _):
    (ck / "model.safetensors").write_bytes(pickle.dumps(_Payload()))
    _resign(ck)  # even a validly signed manifest cannot make a pickle load


def torch_zip_payload(ck, _):
    torch.save({"w": _Payload()}, ck / "model.safetensors")
    _resign(ck)


def unknown_format(ck, _):
    _resign(ck, lambda m: m.update(format="someone-else/9"))


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp/checkpoint-pickle-executed")

DAMAGE = [
    ("flipped byte", flip_byte, "model.safetensors: sha256 mismatch"),
    ("truncated", truncate, "model.safetensors: size"),
    ("missing file", lambda ck, _: (ck / "probe.parquet").unlink(), "missing probe.parquet"),
    (
        "extra file",
        lambda ck, _: (ck / "notes.txt").write_text("hi"),
        "unexpected file(s) not in manifest: ['notes.txt']",
    ),
    ("missing signature", lambda ck, _: (ck / "manifest.sig").unlink(), "missing manifest.sig"),
    ("missing manifest", lambda ck, _: (ck / "manifest.json").unlink(), "missing manifest.json"),
    ("manifest edited after signing", manifest_edited, "signature does not verify"),
    ("signed with another key", other_key, "signature does not verify"),
    (
        "pickle file beside the weights",
        lambda ck, _: shutil.copy(ck / "model.safetensors", ck / "model.pt"),
        "pickle-based file(s)",
    ),
    ("pickle payload as weights, re-signed", signed_pickle_payload, "safe load failed"),
    ("torch.save zip as weights, re-signed", torch_zip_payload, "safe load failed"),
    ("tensor shapes vs model config, re-signed", shape_vs_config, "but the model config expects"),
    ("non-finite weights, re-signed", non_finite, "has non-finite values"),
    ("probe predictions changed, re-signed", probe_changed, "reload parity failed"),
    ("unknown format, re-signed", unknown_format, "is not 'retrain-checkpoint/1'"),
]


@pytest.mark.parametrize(("damage", "expected"), [pytest.param(d, e, id=i) for i, d, e in DAMAGE])
def test_rejection_matrix(ckpt, damage, expected, monkeypatch, capsys):
    from pipeline.cli import main
    from pipeline.settings import get_settings

    MARKER.unlink(missing_ok=True)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # must not matter: no torch.load
    monkeypatch.setattr(torch, "load", _no_torch_load)
    try:
        damage(ckpt, monkeypatch)
        msg = problems(ckpt)
        assert expected in msg, msg
        assert main(["checkpoint", "verify", str(ckpt)]) == 1
        lines = capsys.readouterr().out.strip().splitlines()
        assert lines and all(line.startswith(f"FAIL {ckpt}: ") for line in lines)
        assert len(lines) == len(checkpoint.verify_checkpoint(ckpt).problems)  # one per problem
        with pytest.raises(checkpoint.CheckpointError, match="failed verification"):
            checkpoint.load_local_for_inference(ckpt)
    finally:
        get_settings.cache_clear()
    assert not MARKER.exists(), "a pickle payload was executed"


def _no_torch_load(*args, **kwargs):
    raise AssertionError("torch.load called on a checkpoint")


def test_pickle_only_directory_refused_without_executing(tmp_path, pipeline_home, monkeypatch):
    MARKER.unlink(missing_ok=True)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    bad = tmp_path / "evil"
    bad.mkdir()
    (bad / "model.pt").write_bytes(pickle.dumps(_Payload()))
    (bad / "optimizer.pkl").write_bytes(pickle.dumps(_Payload()))
    msg = problems(bad)
    assert "pickle-based file(s) ['model.pt', 'optimizer.pkl'] refused" in msg
    assert not MARKER.exists()


def test_cli_verify_ok_and_not_a_directory(ckpt, tmp_path, capsys):
    from pipeline.cli import main

    assert main(["checkpoint", "verify", str(ckpt)]) == 0
    assert capsys.readouterr().out.startswith(f"OK {ckpt} manifest sha256 ")
    assert main(["checkpoint", "verify", ckpt.as_uri()]) == 0
    capsys.readouterr()
    assert main(["checkpoint", "verify", str(tmp_path / "nope")]) == 1
    assert capsys.readouterr().out.count("\n") == 1


def test_published_checkpoint_loads_for_inference_without_torch_load(ckpt, monkeypatch):
    from pipeline import storage
    from pipeline.settings import get_settings

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.setattr(torch, "load", _no_torch_load)
    uri = storage.join(get_settings().storage_root, "checkpoints", "c1")
    checkpoint.publish(ckpt, uri)
    model, spec, v = checkpoint.load_for_inference(uri)
    assert v.intact and v.manifest_sha256 == checkpoint.manifest_digest(ckpt)


# -- atomic write ---------------------------------------------------------------------------


def test_crash_mid_write_leaves_previous_checkpoint_and_nothing_half_written(
    ckpt, trained, monkeypatch
):
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    calls = []
    real = checkpoint.save_file

    def crash_after_first_file(*args, **kwargs):
        calls.append(args[1])
        if len(calls) > 1:
            raise OSError("disk full (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", crash_after_first_file)
    target = ckpt.parent / "ckpt-2"
    with pytest.raises(OSError, match="simulated"):
        _save(target, trained)
    assert len(calls) == 2  # the weights were written before the crash
    assert not target.exists()
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["ckpt"]  # no temp dir left over
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    assert checkpoint.verify_checkpoint(ckpt).intact


KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {root!r})
from pipeline import checkpoint
from pipeline.contract import default_contract
from pipeline.data.generate import WorldSpec, generate
from pipeline.train.features import fit_features
from pipeline.train.model import MLP, ModelConfig

df = generate(WorldSpec(rows=1000, seed=3))
spec = fit_features(df, default_contract())
model = MLP(ModelConfig(input_dim=spec.width, num_classes=2))
real = checkpoint.save_file
def save_then_die(tensors, path, *a, **k):
    real(tensors, path, *a, **k)
    os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no except/finally runs
checkpoint.save_file = save_then_die
checkpoint.save_checkpoint(Path({target!r}), model, spec, df.head(8), data_snapshot={{}},
                           training={{}})
"""


def test_killed_mid_write_leaves_no_checkpoint_that_verifies(ckpt, trained, tmp_path):
    """A real SIGKILL after the first file: the leftover temp dir is never the checkpoint."""
    target = ckpt.parent / "ckpt-2"
    env = {**os.environ, "PIPELINE_HOME": str(tmp_path / "home")}
    out = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT.format(root=str(ROOT), target=str(target))],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == -9, out.stderr[-2000:]
    assert not target.exists()
    leftovers = [p for p in ckpt.parent.iterdir() if p.name.startswith(".ckpt-2.tmp-")]
    assert len(leftovers) == 1 and (leftovers[0] / "model.safetensors").exists()
    assert "missing manifest.json" in problems(leftovers[0])  # unsigned: nothing accepts it
    assert checkpoint.verify_checkpoint(ckpt).intact
    _save(target, trained)  # the next attempt writes the checkpoint whole
    assert checkpoint.verify_checkpoint(target).intact


# -- optimizer state without pickle ---------------------------------------------------------


def test_optimizer_state_round_trips_without_pickle(pipeline_home, trained, tmp_path):
    model = trained[0].model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    loss = model(torch.randn(16, model.config.input_dim)).sum()
    loss.backward()
    opt.step()
    manifest = _save(
        tmp_path / "ck", trained, optimizer_state=opt.state_dict(), stop_reason="grad_norm_plateau"
    )
    ck = tmp_path / "ck"
    assert {"optimizer.safetensors", "optimizer.json"} <= set(manifest["files"])
    assert manifest["stop_reason"] == "grad_norm_plateau"
    assert manifest["optimizer"]["all_finite"] is True
    json.loads((ck / "optimizer.json").read_text())  # structure is plain JSON
    assert checkpoint.verify_checkpoint(ck).intact

    loaded = checkpoint.load_optimizer_state(ck)
    fresh = torch.optim.AdamW(model.parameters(), lr=0.5)
    fresh.load_state_dict(loaded)
    want, got = opt.state_dict(), fresh.state_dict()
    assert got["param_groups"] == want["param_groups"]
    assert set(got["state"]) == set(want["state"])
    for i, st in want["state"].items():
        for k, v in st.items():
            assert torch.equal(got["state"][i][k], v), (i, k)


def test_optimizer_state_with_non_data_objects_is_refused(pipeline_home, trained, tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="nothing is pickled"):
        _save(tmp_path / "ck", trained, optimizer_state={"state": {}, "hook": object()})
    assert not (tmp_path / "ck").exists()


# -- the signing key --------------------------------------------------------------------------


def test_local_key_lives_in_pipeline_home_not_the_repository(pipeline_home):
    key, key_id = checkpoint.signing_key()
    path = pipeline_home / "keys" / "checkpoint-signing.key"
    assert path.is_file() and oct(path.stat().st_mode & 0o777) == "0o600"
    assert ROOT not in path.resolve().parents or ".local" in path.parts
    assert key_id.startswith("local-") and len(key) == 64
