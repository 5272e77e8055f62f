"""Checkpoints that prove they are intact: safetensors + a signed SHA-256 manifest.

Layout of a checkpoint directory::

    model.safetensors   weights (no pickle, ever)
    probe.parquet       a probe batch of raw input rows (Parquet: data, not code)
    probe.safetensors   the probabilities the model gave those rows at save time
    manifest.json       sha256 + size per file, tensor shapes/dtypes, finite flag,
                        model config, feature spec, data snapshot, code version
    manifest.sig        HMAC-SHA256 over manifest.json (key from settings)

Why HMAC: it needs nothing beyond the standard library and the key can live in
an Airflow Connection or a secret store; its limit is that verifiers hold the
same secret as signers. An asymmetric signature (``model-signing``) can replace
``sign``/``check_signature`` without touching the format.

A checkpoint is written into a temporary directory, fsynced, then renamed into
place; published to storage with the signature written last, so a reader never
sees a signed, half-written checkpoint.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from pipeline import __version__, storage
from pipeline.settings import PROJECT_ROOT, get_settings
from pipeline.train.features import FeatureSpec, transform
from pipeline.train.model import MLP, ModelConfig, predict_proba

WEIGHTS, PROBE, PROBE_ROWS, MANIFEST, SIGNATURE = (
    "model.safetensors", "probe.safetensors", "probe.parquet", "manifest.json", "manifest.sig",
)  # fmt: skip
FORMAT = "retrain-checkpoint/1"
PARITY_ATOL = 1e-5


class CheckpointError(RuntimeError):
    pass


def signing_key() -> tuple[bytes, str]:
    """(key, key id). From settings; the embedded default makes a local key once (0600)."""
    s = get_settings()
    if s.signing_key is not None:
        return s.signing_key.get_secret_value().encode(), s.signing_key_id
    path = s.home_dir / "keys" / "checkpoint-signing.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    return path.read_text().strip().encode(), "local-" + hashlib.sha256(path.read_bytes()).hexdigest()[:8]


def sign(manifest_bytes: bytes) -> str:
    key, key_id = signing_key()
    mac = hmac.new(key, manifest_bytes, hashlib.sha256).hexdigest()
    return json.dumps({"alg": "HMAC-SHA256", "key_id": key_id, "mac": mac})


def check_signature(manifest_bytes: bytes, signature: str) -> str | None:
    """None when valid, else the problem."""
    try:
        sig = json.loads(signature)
    except json.JSONDecodeError:
        return "signature file is not valid JSON"
    key, key_id = signing_key()
    if sig.get("alg") != "HMAC-SHA256":
        return f"unsupported signature algorithm {sig.get('alg')!r}"
    expected = hmac.new(key, manifest_bytes, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, str(sig.get("mac", ""))):
        return (f"signature does not verify with key {key_id} (signed with {sig.get('key_id')!r}): "
                "manifest edited after signing, or signed by another key")  # fmt: skip
    return None


def code_version() -> str:
    try:
        sha = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
        return f"{__version__}+g{sha}"
    except (OSError, subprocess.SubprocessError):
        return __version__


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(
    directory: Path,
    model: MLP,
    features: FeatureSpec,
    probe_rows: pd.DataFrame,
    *,
    data_snapshot: dict[str, Any],
    training: dict[str, Any],
) -> dict[str, Any]:
    """Write a signed checkpoint at ``directory`` atomically; return the manifest."""
    if directory.exists():
        raise CheckpointError(f"{directory} exists; checkpoints are never overwritten")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
    try:
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        all_finite = all(bool(torch.isfinite(t).all()) for t in state.values())
        if not all_finite:
            raise CheckpointError("refusing to save a model with non-finite weights")
        save_file(state, str(tmp / WEIGHTS))
        # Parity is checked end to end, raw rows -> features -> model, so a preprocessing
        # mismatch on reload is caught, not just a weights mismatch.
        probe_rows[features.input_columns].reset_index(drop=True).to_parquet(tmp / PROBE_ROWS)
        model_cpu = MLP(model.config)
        model_cpu.load_state_dict(state)
        probe_p = _probe_predictions(model_cpu, features, tmp / PROBE_ROWS)
        save_file({"probabilities": probe_p}, str(tmp / PROBE))
        manifest = {
            "format": FORMAT,
            "files": {
                name: {"sha256": _sha256_file(tmp / name), "size": (tmp / name).stat().st_size}
                for name in (WEIGHTS, PROBE, PROBE_ROWS)
            },
            "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                        for k, v in state.items()},  # fmt: skip
            "all_finite": all_finite,
            "model_config": model.config.to_dict(),
            "features": features.to_dict(),
            "data_snapshot": data_snapshot,
            "training": training,
            "code_version": code_version(),
        }
        manifest_bytes = json.dumps(manifest, indent=2, sort_keys=True).encode()
        (tmp / MANIFEST).write_bytes(manifest_bytes)
        (tmp / SIGNATURE).write_text(sign(manifest_bytes))
        for p in tmp.iterdir():
            with p.open("rb") as fh:
                os.fsync(fh.fileno())
        os.rename(tmp, directory)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _probe_predictions(model: MLP, spec: FeatureSpec, rows_path: Path) -> torch.Tensor:
    rows = pd.read_parquet(rows_path)
    return predict_proba(model, torch.from_numpy(transform(rows, spec))).contiguous()


def manifest_digest(directory: Path) -> str:
    return _sha256_file(directory / MANIFEST)


@dataclass
class Verification:
    path: str
    problems: list[str] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)
    manifest_sha256: str = ""

    @property
    def intact(self) -> bool:
        return not self.problems


def verify_checkpoint(directory: Path) -> Verification:
    """Every check, each failure its own line. Never unpickles anything."""
    v = Verification(path=str(directory))
    if not directory.is_dir():
        v.problems.append(f"{directory}: not a checkpoint directory")
        return v
    present = {p.name for p in directory.iterdir()}
    pickles = sorted(n for n in present if n.endswith((".pt", ".pth", ".pkl", ".bin", ".ckpt")))
    if pickles:
        v.problems.append(f"pickle-based file(s) {pickles} refused: only safetensors are loaded")
    for required in (MANIFEST, SIGNATURE):
        if required not in present:
            v.problems.append(f"missing {required}")
    if v.problems and MANIFEST not in present:
        return v
    manifest_bytes = (directory / MANIFEST).read_bytes()
    v.manifest_sha256 = hashlib.sha256(manifest_bytes).hexdigest()
    if SIGNATURE in present:
        problem = check_signature(manifest_bytes, (directory / SIGNATURE).read_text())
        if problem:
            v.problems.append(problem)
    try:
        manifest = json.loads(manifest_bytes)
    except json.JSONDecodeError as exc:
        v.problems.append(f"manifest.json is not valid JSON: {exc}")
        return v
    v.manifest = manifest
    files = manifest.get("files", {})
    extra = present - set(files) - {MANIFEST, SIGNATURE} - set(pickles)
    if extra:
        v.problems.append(f"unexpected file(s) not in manifest: {sorted(extra)}")
    for name, meta in files.items():
        path = directory / name
        if not path.is_file():
            v.problems.append(f"missing {name} (listed in manifest)")
            continue
        size = path.stat().st_size
        if size != meta["size"]:
            v.problems.append(f"{name}: size {size} != manifest {meta['size']} (truncated or padded)")
        elif _sha256_file(path) != meta["sha256"]:
            v.problems.append(f"{name}: sha256 mismatch (content changed after save)")
    if v.problems:
        return v
    try:
        model, spec = load_verified_model(directory, manifest)
        probe = load_file(str(directory / PROBE))
        got = _probe_predictions(model, spec, directory / PROBE_ROWS)
    except Exception as exc:  # noqa: BLE001 - reported as a problem, never raised past here
        v.problems.append(f"safe load failed: {exc}")
        return v
    if got.shape != probe["probabilities"].shape or not torch.allclose(
        got, probe["probabilities"], atol=PARITY_ATOL
    ):
        v.problems.append("reload parity failed: probe predictions differ from those recorded at save")
    return v


def load_verified_model(directory: Path, manifest: dict[str, Any]) -> tuple[MLP, FeatureSpec]:
    """Load weights with safetensors and check them against the manifest."""
    state = load_file(str(directory / WEIGHTS))
    tensors = manifest["tensors"]
    if set(state) != set(tensors):
        raise CheckpointError(f"tensor names differ from manifest: {sorted(set(state) ^ set(tensors))}")
    for name, t in state.items():
        meta = tensors[name]
        if list(t.shape) != meta["shape"] or str(t.dtype).removeprefix("torch.") != meta["dtype"]:
            raise CheckpointError(f"tensor {name}: {list(t.shape)}/{t.dtype} != manifest {meta}")
        if not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"tensor {name} has non-finite values")
    model = MLP(ModelConfig.from_dict(manifest["model_config"]))
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, FeatureSpec.from_dict(manifest["features"])


def publish(directory: Path, dest_uri: str) -> None:
    """Copy a local checkpoint to storage; the signature goes last."""
    names = sorted(p.name for p in directory.iterdir() if p.name != SIGNATURE) + [SIGNATURE]
    for name in names:
        storage.write_bytes(storage.join(dest_uri, name), (directory / name).read_bytes())


def fetch(uri: str, into: Path) -> Path:
    """Materialise a checkpoint from storage into a local directory (for verification)."""
    into.mkdir(parents=True, exist_ok=True)
    for obj in storage.list_uris(uri.rstrip("/") + "/"):
        name = obj.rsplit("/", 1)[-1]
        (into / name).write_bytes(storage.read_bytes(obj, verify=False))
    return into


def load_for_inference(uri: str) -> tuple[MLP, FeatureSpec, Verification]:
    """Fetch, verify, then load. Raises CheckpointError listing every problem."""
    with tempfile.TemporaryDirectory() as tmp:
        local = fetch(uri, Path(tmp) / "ckpt")
        v = verify_checkpoint(local)
        if not v.intact:
            raise CheckpointError(f"checkpoint {uri} failed verification: " + "; ".join(v.problems))
        model, spec = load_verified_model(local, v.manifest)
    return model, spec, v
