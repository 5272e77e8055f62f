"""Checkpoint integrity: every kind of damage is refused with its own reason."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest

from pipeline import checkpoint
from pipeline.data.generate import WorldSpec, generate
from pipeline.train.loop import TrainConfig, train


@pytest.fixture(scope="module")
def trained(contract):
    df = generate(WorldSpec(rows=3000, seed=11))
    return train(df, contract, TrainConfig(max_epochs=3, seed=1)), df


@pytest.fixture
def ckpt(pipeline_home, trained, tmp_path) -> Path:
    result, df = trained
    path = tmp_path / "ckpt"
    checkpoint.save_checkpoint(path, result.model, result.features, df.head(64),
                               data_snapshot={"uri": "file:///x", "sha256": "ab"},
                               training={"stop_reason": result.stop_reason})  # fmt: skip
    return path


def problems(path: Path) -> str:
    v = checkpoint.verify_checkpoint(path)
    assert not v.intact
    return " | ".join(v.problems)


def test_intact_checkpoint_verifies_and_loads(ckpt, trained):
    v = checkpoint.verify_checkpoint(ckpt)
    assert v.intact, v.problems
    assert v.manifest["all_finite"] is True
    assert set(v.manifest["files"]) == {"model.safetensors", "probe.safetensors", "probe.parquet"}
    model, spec = checkpoint.load_verified_model(ckpt, v.manifest)
    assert spec == trained[0].features


def test_never_overwrites(ckpt, trained):
    with pytest.raises(checkpoint.CheckpointError, match="never overwritten"):
        checkpoint.save_checkpoint(ckpt, trained[0].model, trained[0].features, trained[1].head(8),
                                   data_snapshot={}, training={})  # fmt: skip


def test_flipped_byte_in_weights(ckpt):
    p = ckpt / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[-5] ^= 0x01
    p.write_bytes(bytes(data))
    assert "model.safetensors: sha256 mismatch" in problems(ckpt)


def test_truncated_file(ckpt):
    p = ckpt / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-100])
    assert "truncated" in problems(ckpt)


def test_missing_file(ckpt):
    (ckpt / "probe.parquet").unlink()
    assert "missing probe.parquet" in problems(ckpt)


def test_extra_file(ckpt):
    (ckpt / "notes.txt").write_text("hi")
    assert "unexpected file(s) not in manifest: ['notes.txt']" in problems(ckpt)


def test_manifest_edited_after_signing(ckpt):
    m = json.loads((ckpt / "manifest.json").read_text())
    m["training"]["stop_reason"] = "edited"
    (ckpt / "manifest.json").write_text(json.dumps(m))
    assert "signature does not verify" in problems(ckpt)


def test_signature_from_another_key(ckpt, monkeypatch):
    from pipeline.settings import get_settings

    monkeypatch.setenv("PIPELINE_SIGNING_KEY", "another-key")
    get_settings.cache_clear()
    try:
        assert "signature does not verify" in problems(ckpt)
    finally:
        get_settings.cache_clear()


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp/checkpoint-pickle-executed")


def test_pickle_checkpoint_refused_without_executing(tmp_path, pipeline_home):
    MARKER.unlink(missing_ok=True)
    bad = tmp_path / "evil"
    bad.mkdir()
    (bad / "model.pt").write_bytes(pickle.dumps(_Payload()))
    msg = problems(bad)
    assert "pickle-based file(s) ['model.pt'] refused" in msg
    assert not MARKER.exists()


def test_pickle_file_next_to_valid_checkpoint_is_refused(ckpt):
    shutil.copy(ckpt / "model.safetensors", ckpt / "model.pt")
    assert "pickle-based" in problems(ckpt)


def test_cli_verify_exit_codes(ckpt, capsys):
    from pipeline.cli import main

    assert main(["checkpoint", "verify", str(ckpt)]) == 0
    assert capsys.readouterr().out.startswith("OK")
    (ckpt / "probe.parquet").unlink()
    assert main(["checkpoint", "verify", str(ckpt)]) == 1
    assert "FAIL" in capsys.readouterr().out
