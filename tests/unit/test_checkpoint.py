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


def other_key(ck, _):
    """A forgery: signed by some other key under the trusted key's id."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from pipeline import signing

    key_id = json.loads((ck / "manifest.sig").read_text())["key_id"]
    forger = signing.Signer(key_id, Ed25519PrivateKey.generate(), "forger")
    (ck / "manifest.sig").write_text(forger.sign((ck / "manifest.json").read_bytes()))


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
    ("signed with another key under the trusted id", other_key, "does not verify with trusted key"),
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

SIGNING_VARS = (
    "PIPELINE_SIGNING_KEY",
    "PIPELINE_SIGNING_KEY_ID",
    "PIPELINE_SIGNING_PUBLIC_KEYS",
    "PIPELINE_SIGNING_LEGACY_HMAC_KEY",
)


@pytest.fixture
def signing_env(pipeline_home, monkeypatch):
    """Set PIPELINE_SIGNING_* (a None value unsets); nothing inherited from outside."""
    from pipeline.settings import get_settings

    for var in SIGNING_VARS:
        monkeypatch.delenv(var, raising=False)

    def set_env(**values: str | None) -> None:
        for name, value in values.items():
            if value is None:
                monkeypatch.delenv(f"PIPELINE_SIGNING_{name}", raising=False)
            else:
                monkeypatch.setenv(f"PIPELINE_SIGNING_{name}", value)
        get_settings.cache_clear()

    yield set_env
    get_settings.cache_clear()


def test_local_key_lives_in_pipeline_home_not_the_repository(signing_env, pipeline_home):
    from pipeline import signing

    signer = signing.configured_signer()
    path = pipeline_home / "keys" / signing.LOCAL_PRIVATE
    assert path.is_file() and oct(path.stat().st_mode & 0o777) == "0o600"
    assert ROOT not in path.resolve().parents or ".local" in path.parts
    assert signer.key_id.startswith("local-")
    assert (pipeline_home / "keys" / signing.LOCAL_PUBLIC).is_file()


def _pair(tmp_path: Path, key_id: str) -> tuple[str, str]:
    """(private key PEM, keyring entry) of a fresh pair made by the real command."""
    from pipeline.cli import main

    assert main(["keys", "generate", "--out", str(tmp_path / "keys"), "--key-id", key_id]) == 0
    from pipeline import signing

    pem = (tmp_path / "keys" / f"{key_id}.key").read_text()
    return pem, signing.keyring_entry(key_id, signing.parse_private_key(pem).public_key())


def test_rotation_old_checkpoints_verify_while_their_key_is_trusted(
    signing_env, trained, tmp_path, capsys
):
    old_pem, old_entry = _pair(tmp_path, "k-old")
    new_pem, new_entry = _pair(tmp_path, "k-new")
    capsys.readouterr()
    signing_env(KEY=old_pem, KEY_ID="k-old", PUBLIC_KEYS=old_entry)
    _save(tmp_path / "old", trained)
    signing_env(KEY=new_pem, KEY_ID="k-new", PUBLIC_KEYS=f"{old_entry},{new_entry}")
    _save(tmp_path / "new", trained)
    for name, key_id in (("old", "k-old"), ("new", "k-new")):
        v = checkpoint.verify_checkpoint(tmp_path / name)
        assert v.intact and (v.signature_alg, v.signature_key_id) == ("Ed25519", key_id)
    signing_env(PUBLIC_KEYS=new_entry)  # the old key retired
    assert "signed by key 'k-old', which is not trusted" in problems(tmp_path / "old")
    assert "['k-new']" in problems(tmp_path / "old")
    assert checkpoint.verify_checkpoint(tmp_path / "new").intact


def test_signing_refuses_a_bad_key_before_writing_anything(signing_env, trained, tmp_path):
    from pipeline import signing

    signing_env(KEY="change-me-pipeline-signing-key")
    with pytest.raises(signing.SigningKeyError, match="PIPELINE_SIGNING_KEY is a placeholder"):
        _save(tmp_path / "ck", trained)
    assert not (tmp_path / "ck").exists()
    assert not (tmp_path / "keys").exists()  # and no local key made behind the setting's back


LEGACY_KEY = "legacy-" + "0123456789abcdef" * 3


def _legacy_sign(ck: Path, key: str = LEGACY_KEY) -> None:
    """What checkpoints from before Ed25519 carry: HMAC-SHA256 over manifest.json."""
    import hashlib
    import hmac

    mac = hmac.new(key.encode(), (ck / "manifest.json").read_bytes(), hashlib.sha256).hexdigest()
    sig = {"alg": "HMAC-SHA256", "key_id": "local-1a2b3c4d", "mac": mac}
    (ck / "manifest.sig").write_text(json.dumps(sig))


def test_legacy_hmac_checkpoint_verifies_only_with_the_legacy_setting(signing_env, ckpt):
    _legacy_sign(ckpt)
    msg = problems(ckpt)
    assert "legacy HMAC-SHA256 key ('local-1a2b3c4d'), not trusted by default" in msg
    assert "PIPELINE_SIGNING_LEGACY_HMAC_KEY" in msg
    assert "python -m pipeline checkpoint resign <uri>" in msg
    signing_env(LEGACY_HMAC_KEY=LEGACY_KEY)
    v = checkpoint.verify_checkpoint(ckpt)
    assert v.intact and v.signature_alg == "HMAC-SHA256", v.problems
    signing_env(LEGACY_HMAC_KEY="another-" + "fedcba9876543210" * 3)
    assert "does not verify with PIPELINE_SIGNING_LEGACY_HMAC_KEY" in problems(ckpt)


def _env(**signing: str) -> dict[str, str]:
    """This environment without any PIPELINE_* setting, plus the given signing ones."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    return {**env, **{f"PIPELINE_SIGNING_{k}": v for k, v in signing.items()}}


def test_resign_command_moves_a_legacy_checkpoint_to_ed25519_weights_untouched(
    signing_env, trained, tmp_path, capsys
):
    from pipeline import storage
    from pipeline.settings import get_settings

    pem, entry = _pair(tmp_path, "prod-2")
    capsys.readouterr()
    local = tmp_path / "ck"
    _save(local, trained)
    _legacy_sign(local)
    uri = storage.join(get_settings().storage_root, "checkpoints", "legacy")  # file:// storage
    checkpoint.publish(local, uri)
    published = storage.local_path(uri)
    before = {p.name: p.read_bytes() for p in published.iterdir() if p.name != "manifest.sig"}
    trainer = {
        **_env(KEY=pem, KEY_ID="prod-2", PUBLIC_KEYS=entry, LEGACY_HMAC_KEY=LEGACY_KEY),
        "PIPELINE_HOME": str(tmp_path / "trainer-home"),
    }
    cmd = [sys.executable, "-m", "pipeline", "checkpoint", "resign", uri]
    without_legacy = {k: v for k, v in trainer.items() if k != "PIPELINE_SIGNING_LEGACY_HMAC_KEY"}
    refused = subprocess.run(
        cmd, env=without_legacy, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert refused.returncode == 1 and "not trusted by default" in refused.stdout, refused
    done = subprocess.run(cmd, env=trainer, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "RESIGNED" in done.stdout and "HMAC-SHA256 key local-1a2b3c4d -> Ed25519 key prod-2" in (
        done.stdout
    )
    after = {p.name: p.read_bytes() for p in published.iterdir() if p.name != "manifest.sig"}
    sig_digest = after.pop("manifest.sig.sha256").decode()
    before.pop("manifest.sig.sha256")
    assert after == before  # weights, probe, manifest and their digests: byte for byte
    assert sig_digest == storage.sha256_file(published / "manifest.sig")
    kept = published.parent / "legacy.signatures" / "HMAC-SHA256-local-1a2b3c4d.sig"
    assert json.loads(kept.read_text())["alg"] == "HMAC-SHA256"  # the old signature kept
    signing_env(PUBLIC_KEYS=entry)  # a verifier: keyring only, no legacy key
    _model, _spec, v = checkpoint.load_for_inference(uri)
    assert v.intact and (v.signature_alg, v.signature_key_id) == ("Ed25519", "prod-2")
    again = subprocess.run(cmd, env=trainer, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.startswith("UNCHANGED"), again

    from pipeline.cli import main  # the same for a plain local directory, in-process

    names = sorted(p.name for p in local.iterdir())
    weights = (local / "model.safetensors").read_bytes()
    signing_env(KEY=pem, KEY_ID="prod-2", LEGACY_HMAC_KEY=LEGACY_KEY)
    assert main(["checkpoint", "resign", str(local)]) == 0
    signing_env(KEY=None, LEGACY_HMAC_KEY=None)
    assert checkpoint.verify_checkpoint(local).signature_key_id == "prod-2"
    assert sorted(p.name for p in local.iterdir()) == names  # no stray file in the checkpoint
    assert (local / "model.safetensors").read_bytes() == weights


VERIFY_ONLY = """
import json, sys
from pathlib import Path
sys.path.insert(0, {root!r})
from pipeline import checkpoint, signing
v = checkpoint.verify_checkpoint(Path({ck!r}))
try:
    checkpoint.sign(b"anything")
    could_sign = True
except signing.SigningKeyError as exc:
    could_sign = str(exc)
print(json.dumps({{"intact": v.intact, "problems": v.problems, "key": v.signature_key_id,
                  "trust": signing.verifier_startup_check(serving=True),
                  "could_sign": could_sign}}))
"""


def test_scoring_side_verifies_with_only_the_public_keyring(signing_env, trained, tmp_path, capsys):
    pem, entry = _pair(tmp_path, "prod-1")
    capsys.readouterr()
    signing_env(KEY=pem, KEY_ID="prod-1", PUBLIC_KEYS=entry)
    ck = tmp_path / "ck"
    _save(ck, trained)
    scoring_home = tmp_path / "scoring-home"
    env = {**_env(PUBLIC_KEYS=entry), "PIPELINE_HOME": str(scoring_home)}
    assert not any("PRIVATE" in v for v in env.values())
    out = subprocess.run(
        [sys.executable, "-c", VERIFY_ONLY.format(root=str(ROOT), ck=str(ck))],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["intact"] and got["key"] == "prod-1", got["problems"]
    assert "['prod-1'] from PIPELINE_SIGNING_PUBLIC_KEYS" in got["trust"]
    assert "PIPELINE_SIGNING_KEY is not set" in got["could_sign"]  # it cannot sign at all
    assert not (scoring_home / "keys").exists()  # and no key was made for it
