"""Checkpoints that prove they are intact: safetensors + a signed SHA-256 manifest.

Layout of a checkpoint directory::

    model.safetensors      weights (no pickle, ever)
    probe.parquet          a probe batch of raw input rows (Parquet: data, not code)
    probe.safetensors      the probabilities the model gave those rows at save time
    optimizer.safetensors  optional: the optimizer's tensors (moments, steps)
    optimizer.json         optional: the optimizer's structure and scalars (hyperparameters)
    model_code.py          when the model's factory is a spec-local module: that file, so the
                           version is rebuilt with the code it was trained with (imported only
                           after digests and signature verified)
    manifest.json          sha256 + size per file, tensor shapes/dtypes, finite flag, stop
                           reason, model factory + kwargs + code digest, feature spec, data snapshot, code version
    manifest.sig           Ed25519 signature over manifest.json: {"alg", "key_id", "sig"}

Why Ed25519: verifiers (the gate, the scoring service) hold only public keys, so none of
them can forge what it checks; the private key stays with the trainer — inside Airflow
the Connection ``checkpoint_signing``, elsewhere ``PIPELINE_SIGNING_KEY`` from a secret
store, and with neither (the embedded default) a pair made once under
``PIPELINE_HOME/keys`` (git-ignored). A key never comes from the repository. The key id
in each signature and a keyring of trusted public keys (``PIPELINE_SIGNING_PUBLIC_KEYS``)
make rotation possible; keys, keyring and their checks are in :mod:`pipeline.signing`.
Checkpoints signed with the former HMAC-SHA256 key verify only when
``PIPELINE_SIGNING_LEGACY_HMAC_KEY`` is set; :func:`resign` (``python -m pipeline
checkpoint resign <uri>``) moves them to Ed25519 without touching anything but
``manifest.sig``.

Nothing is ever unpickled: weights and optimizer tensors are read with safetensors,
everything else is JSON or Parquet, and ``torch.load`` is never called — so
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` and friends have nothing to act on.

A checkpoint is written into a temporary sibling directory, each file fsynced, then
renamed into place (and the parent directory fsynced): a crash leaves either no
checkpoint or a whole one, and the leftover ``.<name>.tmp-*`` directory has no
signature, so nothing verifies or loads it. Publishing to storage writes the
signature last, so a reader never sees a signed, half-published checkpoint.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from pipeline import __version__, signing, storage
from pipeline.settings import PROJECT_ROOT
from pipeline.train.features import FeatureSpec, transform
from pipeline.train.model import (
    CODE_FILE,
    MLP,
    ModelConfig,
    ModelInputs,
    ModelRef,
    build_model,
    predict_proba,
)

WEIGHTS, PROBE, PROBE_ROWS, MANIFEST, SIGNATURE = (
    "model.safetensors",
    "probe.safetensors",
    "probe.parquet",
    "manifest.json",
    "manifest.sig",
)
OPTIMIZER, OPTIMIZER_STRUCTURE = "optimizer.safetensors", "optimizer.json"
FORMAT = "retrain-checkpoint/1"
PARITY_ATOL = 1e-5
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".joblib")


class CheckpointError(RuntimeError):
    pass


# -- signing (keys, keyring and their checks: pipeline/signing.py) ------------------------


def sign(manifest_bytes: bytes) -> str:
    """The ``manifest.sig`` text: an Ed25519 signature by this process's signing key."""
    return signing.configured_signer().sign(manifest_bytes)


def check_signature(manifest_bytes: bytes, signature: str) -> str | None:
    """None when valid (by a key of this process's keyring), else the problem."""
    return signing.configured_keyring().check(manifest_bytes, signature)[0]


def code_version() -> str:
    try:
        sha = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        return f"{__version__}+g{sha}"
    except (OSError, subprocess.SubprocessError):
        return __version__


# -- optimizer state without pickle ------------------------------------------------------
# A torch optimizer state dict is nested dicts/lists/tuples of tensors and scalars, with
# int keys (parameter indices). Tensors go to safetensors under their path; the structure
# goes to JSON with tagged nodes so key and container types survive the round trip.


def _encode(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(obj, torch.Tensor):
        name = path or "tensor"
        tensors[name] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": name}
    if isinstance(obj, dict):
        for k in obj:
            if not isinstance(k, str | int) or isinstance(k, bool):
                raise CheckpointError(
                    f"optimizer state key {k!r} at {path or '/'} is not str or int"
                )
        return {
            "__dict__": [
                [k, _encode(v, tensors, f"{path}.{k}" if path else str(k))] for k, v in obj.items()
            ]
        }
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": repr(obj)}
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise CheckpointError(
        f"optimizer state at {path or '/'} holds a {type(obj).__name__}; only tensors, "
        "numbers, strings, None and containers of them are stored (nothing is pickled)"
    )


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if isinstance(node, dict):
        if "__tensor__" in node:
            if node["__tensor__"] not in tensors:
                raise CheckpointError(
                    f"optimizer.json names tensor {node['__tensor__']!r}, absent from {OPTIMIZER}"
                )
            return tensors[node["__tensor__"]]
        if "__dict__" in node:
            return {k: _decode(v, tensors) for k, v in node["__dict__"]}
        if "__tuple__" in node:
            return tuple(_decode(v, tensors) for v in node["__tuple__"])
        if "__float__" in node:
            return float(node["__float__"])
        raise CheckpointError(f"optimizer.json has an untagged object {sorted(node)}")
    return node


def _write_optimizer_state(state: dict[str, Any], into: Path) -> dict[str, Any]:
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, tensors, "")
    save_file(tensors, str(into / OPTIMIZER))
    (into / OPTIMIZER_STRUCTURE).write_text(json.dumps(structure, indent=1, sort_keys=True))
    return {
        "tensors": {
            k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
            for k, v in tensors.items()
        },
        "all_finite": all(
            bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point()
        ),
    }


def load_optimizer_state(directory: Path) -> dict[str, Any] | None:
    """The optimizer state saved with the checkpoint (None if there is none), pickle-free.

    Call after :func:`verify_checkpoint`: the files are then known to be the signed ones.
    Feed the result to ``optimizer.load_state_dict`` to resume.
    """
    if not (directory / OPTIMIZER_STRUCTURE).is_file():
        return None
    tensors = load_file(str(directory / OPTIMIZER))
    return _decode(json.loads((directory / OPTIMIZER_STRUCTURE).read_text()), tensors)


# -- save ---------------------------------------------------------------------------------


def save_checkpoint(
    directory: Path,
    model: torch.nn.Module,
    features: FeatureSpec,
    probe_rows: pd.DataFrame,
    *,
    data_snapshot: dict[str, Any],
    training: dict[str, Any],
    model_ref: ModelRef | None = None,
    code_file: Path | None = None,
    stop_reason: str | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a signed checkpoint at ``directory`` atomically; return the manifest.

    ``model_ref`` says how to rebuild the model (default: the built-in MLP from its
    config); ``code_file`` is the factory's spec-local module, copied in as
    ``model_code.py``. ``stop_reason`` defaults to ``training["stop_reason"]``;
    ``optimizer_state`` (an ``optimizer.state_dict()``) is stored without pickle when given.
    """
    if model_ref is None:
        if not isinstance(model, MLP):
            raise CheckpointError("a model that is not the built-in MLP needs its model_ref")
        model_ref = ModelRef(
            "pipeline.train.model:mlp",
            {"hidden": list(model.config.hidden), "dropout": model.config.dropout},
        )
    if (model_ref.code_sha256 is None) != (code_file is None):
        raise CheckpointError("model_ref.code_sha256 and code_file go together")
    signer = signing.configured_signer()  # a bad key is refused before any work
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
        names = [WEIGHTS, PROBE, PROBE_ROWS]
        if code_file is not None:
            shutil.copyfile(code_file, tmp / CODE_FILE)
            names.append(CODE_FILE)
        # Parity is checked end to end, raw rows -> features -> model, so a preprocessing
        # mismatch on reload is caught, not just a weights mismatch — and the model is
        # rebuilt the way a reader will rebuild it (the factory, from the copied code).
        probe_rows[features.input_columns].reset_index(drop=True).to_parquet(tmp / PROBE_ROWS)
        model_cpu = _rebuild(model_ref, features, tmp)
        model_cpu.load_state_dict(state)
        probe_p = _probe_predictions(model_cpu, features, tmp / PROBE_ROWS)
        save_file({"probabilities": probe_p}, str(tmp / PROBE))
        optimizer_meta = None
        if optimizer_state is not None:
            optimizer_meta = _write_optimizer_state(optimizer_state, tmp)
            names += [OPTIMIZER, OPTIMIZER_STRUCTURE]
        manifest = {
            "format": FORMAT,
            "files": {
                name: {
                    "sha256": storage.sha256_file(tmp / name),
                    "size": (tmp / name).stat().st_size,
                }
                for name in names
            },
            "tensors": {
                k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                for k, v in state.items()
            },
            "all_finite": all_finite,
            "stop_reason": stop_reason
            if stop_reason is not None
            else str(training.get("stop_reason", "unknown")),
            "optimizer": optimizer_meta,
            "model": model_ref.to_dict(),
            "features": features.to_dict(),
            "data_snapshot": data_snapshot,
            "training": training,
            "code_version": code_version(),
        }
        manifest_bytes = json.dumps(manifest, indent=2, sort_keys=True).encode()
        (tmp / MANIFEST).write_bytes(manifest_bytes)
        (tmp / SIGNATURE).write_text(signer.sign(manifest_bytes))
        for p in tmp.iterdir():
            with p.open("rb") as fh:
                os.fsync(fh.fileno())
        storage.fsync_path(tmp)
        os.rename(tmp, directory)
        storage.fsync_path(directory.parent)
        return manifest
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        full = _disk_full(exc)
        if full is not None:
            raise storage.StorageFullError(
                f"checkpoint {directory} not written: {os.strerror(full)} in "
                f"{directory.parent}; nothing was left behind (its temporary folder was "
                "removed) and earlier checkpoints are untouched. Free space there (or raise "
                "the file-size limit) and retry the task.",
                full,
            ) from exc
        raise


# errno of a full disk, a file over RLIMIT_FSIZE, a quota; safetensors reports them as text
_FULL_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def _disk_full(exc: BaseException) -> int | None:
    """The errno when ``exc`` (an OSError, or safetensors' own error, which carries only its
    message: "... (os error 28)") says the disk or the file-size limit is full."""
    if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
        return exc.errno
    text = str(exc)
    return next((n for n in _FULL_ERRNOS if f"(os error {n})" in text), None)


def _inputs(features: FeatureSpec) -> ModelInputs:
    k = len(features.classes)
    return ModelInputs(features.width, k, features, "binary" if k == 2 else "multiclass")


def _rebuild(ref: ModelRef, features: FeatureSpec, directory: Path) -> torch.nn.Module:
    """The model's skeleton, from its factory: the spec-local code is the checkpoint's copy."""
    code = directory / CODE_FILE if ref.code_sha256 is not None else None
    return build_model(ref, _inputs(features), code)


def _probe_predictions(model: torch.nn.Module, spec: FeatureSpec, rows_path: Path) -> torch.Tensor:
    rows = pd.read_parquet(rows_path)
    return predict_proba(model, torch.from_numpy(transform(rows, spec))).contiguous()


def manifest_digest(directory: Path) -> str:
    return storage.sha256_file(directory / MANIFEST)


def checkpoint_bytes(manifest: dict[str, Any]) -> int:
    """Size of the checkpoint's payload files, as recorded in its (verified) manifest."""
    return int(sum(meta["size"] for meta in manifest.get("files", {}).values()))


# -- verify and load ------------------------------------------------------------------------


@dataclass
class Verification:
    path: str
    problems: list[str] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)
    manifest_sha256: str = ""
    signature_alg: str = ""  # set when the signature verified: "Ed25519" (or legacy HMAC)
    signature_key_id: str = ""

    @property
    def intact(self) -> bool:
        return not self.problems

    def problem(self, text: str) -> None:
        """Record one problem as one line (exception texts can span lines)."""
        self.problems.append(" ".join(str(text).split()))


def verify_checkpoint(directory: Path) -> Verification:
    """Every check, each failure its own line. Never unpickles anything. Unsafe signing
    settings (a malformed keyring, a weak legacy key) raise ``signing.SigningKeyError``: they
    are this process's fault, not the checkpoint's."""
    v = Verification(path=str(directory))
    if not directory.is_dir():
        v.problem(f"{directory}: not a checkpoint directory")
        return v
    present = {p.name for p in directory.iterdir()}
    pickles = sorted(n for n in present if n.lower().endswith(PICKLE_SUFFIXES))
    if pickles:
        v.problem(f"pickle-based file(s) {pickles} refused: only safetensors are loaded")
    for required in (MANIFEST, SIGNATURE):
        if required not in present:
            v.problem(f"missing {required}")
    if MANIFEST not in present:
        return v
    manifest_bytes = (directory / MANIFEST).read_bytes()
    v.manifest_sha256 = hashlib.sha256(manifest_bytes).hexdigest()
    if SIGNATURE in present:
        problem, alg, key_id = signing.configured_keyring().check(
            manifest_bytes, (directory / SIGNATURE).read_text(errors="replace")
        )
        if problem:
            v.problem(problem)
        else:
            v.signature_alg, v.signature_key_id = alg, key_id
    try:
        manifest = json.loads(manifest_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        v.problem(f"manifest.json is not valid JSON: {exc}")
        return v
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        v.problem(
            f"manifest format {manifest.get('format') if isinstance(manifest, dict) else None!r}"
            f" is not {FORMAT!r}"
        )
        return v
    v.manifest = manifest
    files = manifest.get("files", {})
    extra = present - set(files) - {MANIFEST, SIGNATURE} - set(pickles)
    if extra:
        v.problem(f"unexpected file(s) not in manifest: {sorted(extra)}")
    for name, meta in files.items():
        path = directory / name
        if not path.is_file():
            v.problem(f"missing {name} (listed in manifest)")
            continue
        size = path.stat().st_size
        if size != meta["size"]:
            v.problem(f"{name}: size {size} != manifest {meta['size']} (truncated or padded)")
        elif storage.sha256_file(path) != meta["sha256"]:
            v.problem(f"{name}: sha256 mismatch (content changed after save)")
    if v.problems:
        return v
    try:
        model, spec = load_verified_model(directory, manifest)
        probe = load_file(str(directory / PROBE))
        got = _probe_predictions(model, spec, directory / PROBE_ROWS)
        if OPTIMIZER_STRUCTURE in files:
            load_optimizer_state(directory)
    except Exception as exc:  # noqa: BLE001 - reported as a problem, never raised past here
        v.problem(f"safe load failed: {exc}")
        return v
    if got.shape != probe["probabilities"].shape or not torch.allclose(
        got, probe["probabilities"], atol=PARITY_ATOL
    ):
        v.problem("reload parity failed: probe predictions differ from those recorded at save")
    return v


def load_verified_model(
    directory: Path, manifest: dict[str, Any]
) -> tuple[torch.nn.Module, FeatureSpec]:
    """Load weights with safetensors and check them against the manifest and the model the
    factory builds. Call only on a verified directory: a spec-local factory's code is
    imported from it."""
    state = load_file(str(directory / WEIGHTS))
    tensors = manifest["tensors"]
    if set(state) != set(tensors):
        raise CheckpointError(
            f"tensor names differ from manifest: {sorted(set(state) ^ set(tensors))}"
        )
    features = FeatureSpec.from_dict(manifest["features"])
    if "model" in manifest:
        ref = ModelRef.from_dict(manifest["model"])
        if (
            ref.code_sha256 is not None
            and manifest["files"].get(CODE_FILE, {}).get("sha256") != ref.code_sha256
        ):
            raise CheckpointError(f"{CODE_FILE} is not the code the manifest's model names")
        model = _rebuild(ref, features, directory)
    else:  # checkpoints from before model factories: the built-in MLP's config
        model = MLP(ModelConfig.from_dict(manifest["model_config"]))
    expected = model.state_dict()
    if set(state) != set(expected):
        raise CheckpointError(
            "tensor names differ from the model config's layers: "
            f"{sorted(set(state) ^ set(expected))}"
        )
    for name, t in state.items():
        meta = tensors[name]
        if list(t.shape) != meta["shape"] or str(t.dtype).removeprefix("torch.") != meta["dtype"]:
            raise CheckpointError(f"tensor {name}: {list(t.shape)}/{t.dtype} != manifest {meta}")
        if t.shape != expected[name].shape:
            raise CheckpointError(
                f"tensor {name} has shape {list(t.shape)} but the model config "
                f"expects {list(expected[name].shape)}"
            )
        if not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"tensor {name} has non-finite values")
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, features


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


def load_local_for_inference(directory: Path) -> tuple[torch.nn.Module, FeatureSpec, Verification]:
    """Verify a local checkpoint directory, then load it. Raises CheckpointError listing
    every problem. This is what the registered MLflow model calls when it loads."""
    v = verify_checkpoint(directory)
    if not v.intact:
        raise CheckpointError(
            f"checkpoint {directory} failed verification: " + "; ".join(v.problems)
        )
    model, spec = load_verified_model(directory, v.manifest)
    return model, spec, v


def load_for_inference(uri: str) -> tuple[torch.nn.Module, FeatureSpec, Verification]:
    """Fetch, verify, then load. Raises CheckpointError listing every problem."""
    with tempfile.TemporaryDirectory() as tmp:
        local = fetch(uri, Path(tmp) / "ckpt")
        try:
            return load_local_for_inference(local)
        except CheckpointError as exc:
            raise CheckpointError(str(exc).replace(str(local), uri, 1)) from None


# -- re-signing -------------------------------------------------------------------------------


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)[:100] or "unknown"


def _replace_local(directory: Path, data: bytes, keep_dir: Path) -> None:
    """Swap ``directory/manifest.sig`` for ``data`` in one rename (the temp file is made in
    ``keep_dir``, so the checkpoint never shows a stray file), and its storage digest
    sidecar when it has one (a checkpoint published to ``file://`` storage)."""
    for name, content in (
        (SIGNATURE, data),
        (SIGNATURE + storage.SIDECAR, hashlib.sha256(data).hexdigest().encode()),
    ):
        target = directory / name
        if name != SIGNATURE and not target.exists():
            continue
        fd, tmp = tempfile.mkstemp(dir=keep_dir, prefix=".resign-", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(content)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    storage.fsync_path(directory)


def resign(target: str) -> dict[str, str]:
    """Re-sign a checkpoint with this process's Ed25519 key, after verifying it whole
    (digests, signature — with ``PIPELINE_SIGNING_LEGACY_HMAC_KEY`` for an HMAC one —,
    safe load, reload parity). Only ``manifest.sig`` changes: weights and manifest are
    never written, so ``checkpoint.manifest_sha256`` tags stay true. The previous signature
    is kept beside the checkpoint, in ``<checkpoint>.signatures/<alg>-<key id>.sig``.

    ``target``: a local directory (or ``file://`` path; a checkpoint published to file
    storage included) or an ``s3://`` prefix. On S3 the new signature is staged under
    ``.signatures/``, the old one moved there, then the staged one moved in; a run cut off
    in between is finished by running it again (Ed25519 is deterministic: same bytes).
    Raises CheckpointError listing every problem when the checkpoint does not verify."""
    signer = signing.configured_signer()
    remote = "://" in target and not target.startswith("file://")
    base = target.rstrip("/")
    kept = base + ".signatures"
    staged = f"{kept}/pending-{_safe_name(signer.key_id)}.sig"
    recovered = False
    with tempfile.TemporaryDirectory() as tmp:
        if remote:
            local = fetch(base, Path(tmp) / "ckpt")
            if not (local / SIGNATURE).exists() and storage.exists(staged):
                (local / SIGNATURE).write_bytes(storage.read_bytes(staged))
                recovered = True  # cut off after the old signature was moved away
        else:
            # A copy without storage sidecars: what a reader fetches and verifies.
            local = fetch(storage.file_uri(Path(base.removeprefix("file://"))), Path(tmp) / "c")
        v = verify_checkpoint(local)
        if not v.intact:
            raise CheckpointError(
                f"checkpoint {target} does not verify, so it is not re-signed: "
                + "; ".join(v.problems)
            )
        old = (local / SIGNATURE).read_bytes()
        new = signer.sign((local / MANIFEST).read_bytes()).encode()
    was = f"{v.signature_alg} key {v.signature_key_id}"
    now = f"{signing.ALG} key {signer.key_id}"
    result = {"checkpoint": target, "was": was, "now": now}
    if old == new:
        if recovered:
            storage.move(staged, storage.join(base, SIGNATURE))
            return {**result, "status": "resigned (finished an interrupted re-sign)"}
        return {**result, "status": "unchanged: already signed by this key"}
    keep_name = f"{_safe_name(v.signature_alg)}-{_safe_name(v.signature_key_id)}.sig"
    if remote:
        storage.write_bytes(staged, new)
        storage.move(storage.join(base, SIGNATURE), f"{kept}/{keep_name}")
        storage.move(staged, storage.join(base, SIGNATURE))
    else:
        directory = Path(base.removeprefix("file://"))
        keep_dir = directory.parent / (directory.name + ".signatures")
        keep_dir.mkdir(exist_ok=True)
        if not (keep_dir / keep_name).exists():
            (keep_dir / keep_name).write_bytes(old)
        _replace_local(directory, new, keep_dir)
    return {**result, "status": "resigned", "previous_signature": f"{kept}/{keep_name}"}
