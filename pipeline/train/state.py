"""Crash-safe training-state checkpoints: resume a killed or retried training exactly.

A training-state checkpoint is a directory ``step-<step>`` holding

    tensors.safetensors   model, best-so-far weights, optimizer tensors, RNG states (uint8),
                          the epoch's index permutation, telemetry history
    state.json            everything else: step/epoch/position, accumulators, history,
                          stopper state and decision trace, LR schedule, optimizer layout
    manifest.json         format, step, sha256 + size of the two files above

It is written into a temporary directory, every file fsynced, then renamed into place
(and the parent directory fsynced), so a reader sees a complete checkpoint or none.
Loading verifies the manifest digests and falls back to the previous checkpoint if the
newest is damaged. Nothing is pickled: tensors go through safetensors, the rest is JSON
(tuples and non-string dict keys are tagged so they round-trip exactly).

These are *training* states, distinct from the signed model checkpoints of
``pipeline.checkpoint``; they live under ``<PIPELINE_HOME>/train-state/<run_key>/`` — a
local directory next to the worker, which is what the embedded default and a single
host need; a retry landing on another host starts over (see the README note).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipeline.storage import fsync_path, sha256_file

log = logging.getLogger(__name__)

FORMAT = "retrain-train-state/1"
TENSORS, STATE, MANIFEST = "tensors.safetensors", "state.json", "manifest.json"
_NAME = re.compile(r"^step-(\d{12})(-final)?$")


class StateCheckpointError(RuntimeError):
    pass


# -- JSON encoding of nested state with tensors lifted out ---------------------------------


def encode(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """JSON-able ``obj``; every tensor moves to ``tensors[prefix…]`` and leaves a reference."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: encode(v, tensors, f"{prefix}.{k}") for k, v in obj.items()}
        return {"__items__": [[k, encode(v, tensors, f"{prefix}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix} in a training state")


def decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {k: decode(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(decode(v, tensors) for v in obj["__tuple__"])
        return {k: decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    return obj


@dataclass
class LoadedState:
    step: int
    tensors: dict[str, torch.Tensor]
    state: dict[str, Any]
    path: Path
    manifest_sha256: str


class TrainingStateStore:
    """Atomic save / verified load of training states under one directory (one run key)."""

    def __init__(self, root: Path, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = keep

    def _complete(self) -> list[tuple[int, bool, Path]]:
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            m = _NAME.match(p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), bool(m.group(2)), p))
        return sorted(out, key=lambda t: (t[0], t[1]))

    def save(
        self,
        step: int,
        tensors: dict[str, torch.Tensor],
        state: dict[str, Any],
        final: bool = False,
    ) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        dest = self.root / (f"step-{step:012d}" + ("-final" if final else ""))
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=".tmp-"))
        try:
            save_file(
                {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
                str(tmp / TENSORS),
            )
            (tmp / STATE).write_text(json.dumps(state, sort_keys=True, allow_nan=True))
            manifest = {
                "format": FORMAT,
                "step": step,
                "final": final,
                "files": {
                    n: {"sha256": sha256_file(tmp / n), "size": (tmp / n).stat().st_size}
                    for n in (TENSORS, STATE)
                },
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
            for p in tmp.iterdir():
                fsync_path(p)
            fsync_path(tmp)
            if dest.exists():  # same step saved again (a resumed run): identical content
                shutil.rmtree(dest)
            os.rename(tmp, dest)
            fsync_path(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._prune()
        return dest

    def _prune(self) -> None:
        done = self._complete()
        for _, _, p in done[: max(len(done) - self.keep, 0)]:
            shutil.rmtree(p, ignore_errors=True)
        for p in self.root.glob(".tmp-*"):  # leftovers of a crash mid-write
            shutil.rmtree(p, ignore_errors=True)

    def verify(self, path: Path) -> tuple[dict[str, Any], str]:
        """(manifest, its sha256) or raise StateCheckpointError naming the problem."""
        try:
            raw = (path / MANIFEST).read_bytes()
            manifest = json.loads(raw)
        except (OSError, json.JSONDecodeError) as exc:
            raise StateCheckpointError(f"{path}: unreadable manifest: {exc}") from None
        if manifest.get("format") != FORMAT:
            raise StateCheckpointError(f"{path}: format {manifest.get('format')!r} != {FORMAT!r}")
        for name, meta in manifest["files"].items():
            f = path / name
            if not f.is_file():
                raise StateCheckpointError(f"{path}: missing {name}")
            if f.stat().st_size != meta["size"] or sha256_file(f) != meta["sha256"]:
                raise StateCheckpointError(f"{path}: {name} does not match its manifest digest")
        return manifest, hashlib.sha256(raw).hexdigest()

    def load_latest(self) -> LoadedState | None:
        """The newest checkpoint whose digests verify; damaged ones are skipped (logged)."""
        for step, _, path in reversed(self._complete()):
            try:
                _, digest = self.verify(path)
                tensors = load_file(str(path / TENSORS))
                state = json.loads((path / STATE).read_text())
            except (StateCheckpointError, OSError, ValueError) as exc:
                log.warning("training state %s is not usable (%s); trying an older one", path, exc)
                continue
            return LoadedState(step, tensors, state, path, digest)
        return None

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


# -- RNG states as uint8 tensors --------------------------------------------------------------


def rng_tensors(shuffle: torch.Generator) -> dict[str, torch.Tensor]:
    import numpy as np

    t = {"rng.torch_cpu": torch.get_rng_state(), "rng.shuffle": shuffle.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            t[f"rng.cuda.{i}"] = s
    if getattr(torch, "mps", None) is not None and torch.backends.mps.is_available():
        try:
            t["rng.mps"] = torch.mps.get_rng_state()
        except RuntimeError:
            pass
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    t["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).view(np.uint8).copy())
    t["rng.numpy_meta"] = torch.tensor(
        np.frombuffer(
            json.dumps([kind, int(pos), int(has_gauss), float(cached)]).encode(), np.uint8
        )
    )
    return t


def restore_rng(t: dict[str, torch.Tensor], shuffle: torch.Generator) -> None:
    import numpy as np

    torch.set_rng_state(t["rng.torch_cpu"])
    shuffle.set_state(t["rng.shuffle"])
    cuda = sorted(k for k in t if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t[k] for k in cuda])
    if "rng.mps" in t and torch.backends.mps.is_available():
        torch.mps.set_rng_state(t["rng.mps"])
    kind, pos, has_gauss, cached = json.loads(bytes(t["rng.numpy_meta"].numpy()).decode())
    keys = t["rng.numpy"].numpy().copy().view(np.uint32)
    np.random.set_state((kind, keys, pos, has_gauss, cached))
