"""Crash-safe training-state checkpoints: resume a killed or retried training exactly.

A training-state checkpoint is a directory ``step-<step>`` holding

    tensors.safetensors   model, best-so-far weights, optimizer tensors, RNG states (uint8),
                          the epoch's index permutation, telemetry history
    state.json            everything else: step/epoch/position, accumulators, history,
                          stopper state and decision trace, LR schedule, optimizer layout
    manifest.json         format, step, final, the run's fingerprint (config + data),
                          sha256 + size of the two files above

It is written into a temporary directory, every file fsynced, then renamed into place
(and the parent directory fsynced), so a reader sees a complete checkpoint or none.
Loading verifies the manifest digests and falls back to the previous checkpoint if the
newest is damaged. Nothing is pickled: tensors go through safetensors, the rest is JSON
(tuples and non-string dict keys are tagged so they round-trip exactly).

These are *training* states, distinct from the signed model checkpoints of
``pipeline.checkpoint``; they live under ``<PIPELINE_HOME>/train-state/<run_key>/``, the
write-ahead copy next to the worker, and — when the store has a ``remote`` (the training
stage passes ``<storage root>/train-state/<run_key>`` to ``train(state_remote=…)``) — in
object storage too, so a retry that lands on another worker resumes:

* after a state is complete locally, its three files are uploaded to
  ``<remote>/step-…/``, the manifest last (a remote state without a manifest is
  incomplete and ignored), and the remote copy keeps the last ``keep`` states like the
  local one. An upload that fails (after botocore's bounded retries of transient S3
  errors, ``pipeline.storage``) is logged as a warning and training goes on: the local
  copy is still there, and the next state is uploaded again;
* :meth:`TrainingStateStore.load_latest` takes the newest state of the two places: a
  remote one newer than every valid local one (or the only one) is downloaded into the
  local directory first. Remote files are untrusted input: the manifest is read with a
  size bound and must be well-formed (format, step and name agree, a fingerprint); each
  file is downloaded no larger than its manifest says and must match its size and
  SHA-256 before anything parses it, and ``state.json`` must carry the manifest's
  fingerprint. A state that fails is refused with a warning naming what was wrong and
  the next older one is tried; nothing is unpickled (safetensors and JSON only). The
  loop then resumes only a state whose fingerprint is its own config and data
  (``pipeline.train.loop``); a run with none left starts over;
* :meth:`~TrainingStateStore.clear` (another config or data) removes both copies, and the
  training stage removes the remote one (:func:`clear_remote`) once the signed model
  checkpoint is published.

The remote states are trusted as far as the storage root is (a writer there could also
replace the data snapshots); they are not signed. Uploads are synchronous, in the
training loop, every ``state_every`` steps (default 500): on a large model over a slow
link, raise ``state_every``. Tests: ``tests/unit/test_train_state_remote.py`` (host A to
host B over a local folder and over moto's S3, tampered states refused);
``tests/stack/test_stack_celery.py`` (a SIGKILLed Celery worker's training resumed on
another worker).
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

from pipeline import storage
from pipeline.storage import fsync_path, sha256_file

log = logging.getLogger(__name__)

FORMAT = "retrain-train-state/1"
TENSORS, STATE, MANIFEST = "tensors.safetensors", "state.json", "manifest.json"
_NAME = re.compile(r"^step-(\d{12})(-final)?$")
MAX_MANIFEST_BYTES = 1 << 20  # a remote manifest larger than this is refused unread
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


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
    origin: str = ""  # the remote state it was downloaded from; "" when it was local


class TrainingStateStore:
    """Atomic save / verified load of training states under one directory (one run key)."""

    def __init__(self, root: Path, keep: int = 2, remote: str | None = None) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = keep
        self.remote = RemoteStates(remote) if remote else None

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
                "fingerprint": state.get("fingerprint"),
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
        if self.remote is not None:
            self.remote.upload(dest, self.keep)
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
        """The newest checkpoint whose digests verify, local or (with a remote) in object
        storage; damaged or refused ones are skipped (logged). At the same step the local
        copy is tried first; a remote one is downloaded into the local directory."""
        candidates: list[tuple[int, bool, bool, Path | str]] = [
            (step, final, True, path) for step, final, path in self._complete()
        ]
        if self.remote is not None:
            candidates += [(s, f, False, name) for s, f, name in self.remote.states()]
        for step, _, is_local, where in sorted(candidates, key=lambda c: c[:3], reverse=True):
            origin = ""
            try:
                if is_local:
                    path = Path(where)
                else:
                    assert self.remote is not None
                    origin = storage.join(self.remote.uri, str(where))
                    path = self.remote.fetch(str(where), self.root)
                _, digest = self.verify(path)
                tensors = load_file(str(path / TENSORS))
                state = json.loads((path / STATE).read_text())
            except storage.TransientStorageError:
                # the storage away is not a bad state: fail the task so it is retried, rather
                # than start over (and then prune the remote states this attempt is behind)
                raise
            except Exception as exc:  # noqa: BLE001 - damaged or refused
                log.warning(
                    "training state %s is not usable (%s); trying an older one",
                    origin or where,
                    exc,
                )
                continue
            if origin:
                log.info("training state %s downloaded from %s", path.name, origin)
            return LoadedState(step, tensors, state, path, digest, origin)
        if candidates:
            log.warning(
                "no usable training state in %s%s; training starts over",
                self.root,
                f" or {self.remote.uri}" if self.remote is not None else "",
            )
        return None

    def clear(self) -> None:
        """Remove every state of this run key: the local directory and the remote copy."""
        shutil.rmtree(self.root, ignore_errors=True)
        if self.remote is not None:
            self.remote.clear()


class RemoteStates:
    """The object-storage copy of one run key's training states (``file://`` or ``s3://``,
    through ``pipeline.storage``): ``<uri>/step-<step>[-final]/`` with the three files of a
    local state, the manifest written last. Listing and writing failures are logged, never
    raised: the local copy is the write-ahead one, training goes on without the mirror."""

    def __init__(self, uri: str) -> None:
        self.uri = uri.rstrip("/")

    def _listing(self) -> dict[str, set[str]]:
        """``{state directory name: file names}`` of everything under the prefix."""
        out: dict[str, set[str]] = {}
        for u in storage.list_uris(self.uri + "/"):
            rest = u[len(self.uri) + 1 :] if u.startswith(self.uri + "/") else ""
            parts = rest.split("/")
            if len(parts) == 2 and _NAME.match(parts[0]):
                out.setdefault(parts[0], set()).add(parts[1])
        return out

    def states(self) -> list[tuple[int, bool, str]]:
        """(step, final, name) of every remote state with a manifest, oldest first; [] when
        the location cannot be listed for good (logged); a transient failure of the storage
        (``TransientStorageError``) is raised: the task fails and is retried."""
        try:
            listing = self._listing()
        except storage.TransientStorageError:
            raise  # retried by the task's retries, never judged as "no remote states"
        except Exception as exc:  # noqa: BLE001 - resume from the local copy, or start over
            log.warning(
                "cannot list the remote training states at %s (%s); using the local ones only",
                self.uri,
                exc,
            )
            return []
        out = []
        for name, files in listing.items():
            m = _NAME.match(name)
            if m and MANIFEST in files:
                out.append((int(m.group(1)), bool(m.group(2)), name))
        return sorted(out)

    def upload(self, path: Path, keep: int) -> bool:
        """Copy the complete local state ``path`` to ``<uri>/<its name>/`` (manifest last),
        then prune the remote copy to ``keep`` states. False (and a warning) on failure."""
        name = path.name
        try:
            self._delete_state(name)  # the same step saved again: replace it
            for f in (TENSORS, STATE, MANIFEST):
                storage.write_bytes(storage.join(self.uri, name, f), (path / f).read_bytes())
            self._prune(name, keep)
        except Exception as exc:  # noqa: BLE001 - never fatal to training
            log.warning(
                "training state %s not uploaded to %s (%s); the local copy is kept and "
                "training goes on (a retry on another worker would resume from an older "
                "remote state, or start over)",
                name,
                self.uri,
                exc,
            )
            return False
        return True

    def _prune(self, newest: str, keep: int) -> None:
        """Keep the ``keep`` newest states up to ``newest``; drop the rest, and states past
        ``newest`` (left by an attempt that got further and was not resumed from)."""
        m = _NAME.match(newest)
        assert m is not None
        top = (int(m.group(1)), bool(m.group(2)))
        listing = self._listing()
        named = sorted(
            ((int(mm.group(1)), bool(mm.group(2))), n)
            for n in listing
            if (mm := _NAME.match(n)) is not None
        )
        complete = [k for k, n in named if k <= top and MANIFEST in listing[n]]
        floor = complete[-keep] if len(complete) >= keep else (-1, False)
        for k, n in named:
            if k > top or k < floor:
                self._delete_state(n, listing[n])

    def _delete_state(self, name: str, files: set[str] | None = None) -> None:
        """Remove one remote state, the manifest first (so it is never seen half-deleted)."""
        if files is None:
            files = self._listing().get(name, set())
        for f in sorted(files, key=lambda f: f != MANIFEST):
            storage.delete(storage.join(self.uri, name, f))

    def clear(self) -> None:
        try:
            for name, files in self._listing().items():
                self._delete_state(name, files)
        except Exception as exc:  # noqa: BLE001 - leftovers are pruned by the next run
            log.warning("remote training states at %s not removed (%s)", self.uri, exc)

    def fetch(self, name: str, root: Path) -> Path:
        """Download the remote state ``name`` into ``root/<name>`` (replacing a local copy of
        that name, which did not verify) and return it, or raise StateCheckpointError saying
        what is wrong with it. Checked before anything is parsed: the manifest's size and
        shape, each file's size (bounded by the manifest and the free disk) and SHA-256, and
        that ``state.json`` carries the manifest's fingerprint."""
        where = storage.join(self.uri, name)
        m = _NAME.match(name)
        assert m is not None
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-remote-"))
        try:
            storage.download(
                storage.join(where, MANIFEST), tmp / MANIFEST, max_bytes=MAX_MANIFEST_BYTES
            )
            manifest = _check_manifest(
                (tmp / MANIFEST).read_bytes(), where, int(m.group(1)), bool(m.group(2))
            )
            files = manifest["files"]
            need = sum(meta["size"] for meta in files.values())
            free = shutil.disk_usage(root).free
            if need > free:
                raise StateCheckpointError(
                    f"{where}: its files need {need} bytes, {root} has {free} free"
                )
            for f in (TENSORS, STATE):
                meta = files[f]
                got = storage.download(storage.join(where, f), tmp / f, max_bytes=meta["size"])
                if got.size != meta["size"] or got.sha256 != meta["sha256"]:
                    raise StateCheckpointError(
                        f"{where}: {f} ({got.size} bytes, sha256 {got.sha256[:12]}) does not "
                        f"match its manifest ({meta['size']} bytes, {meta['sha256'][:12]})"
                    )
            try:
                fingerprint = json.loads((tmp / STATE).read_text()).get("fingerprint")
            except (ValueError, AttributeError) as exc:
                raise StateCheckpointError(f"{where}: unreadable {STATE}: {exc}") from None
            if fingerprint != manifest["fingerprint"]:
                raise StateCheckpointError(
                    f"{where}: {STATE} is for fingerprint {str(fingerprint)[:12]}, its "
                    f"manifest says {manifest['fingerprint'][:12]}"
                )
            for p in tmp.iterdir():
                fsync_path(p)
            fsync_path(tmp)
            dest = root / name
            if dest.exists():
                shutil.rmtree(dest)
            os.rename(tmp, dest)
            fsync_path(root)
        except storage.IntegrityError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StateCheckpointError(f"{where}: refused: {exc}") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return dest


def _check_manifest(raw: bytes, where: str, step: int, final: bool) -> dict[str, Any]:
    """A remote manifest, parsed and checked for shape; StateCheckpointError otherwise."""
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise StateCheckpointError(f"{where}: unreadable manifest: {exc}") from None
    problem = None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(manifest, dict):
        problem = "is not a JSON object"
    elif manifest.get("format") != FORMAT:
        problem = f"has format {manifest.get('format')!r}, not {FORMAT!r}"
    elif manifest.get("step") != step or manifest.get("final") is not final:
        problem = f"is for step {manifest.get('step')!r} (final {manifest.get('final')!r})"
    elif not isinstance(manifest.get("fingerprint"), str) or not _HEX64.match(
        manifest["fingerprint"]
    ):
        problem = "has no fingerprint"
    elif not isinstance(files, dict) or set(files) != {TENSORS, STATE}:
        problem = f"does not list exactly {TENSORS} and {STATE}"
    else:
        for f, meta in files.items():
            if not (
                isinstance(meta, dict)
                and isinstance(meta.get("size"), int)
                and not isinstance(meta.get("size"), bool)
                and meta["size"] >= 0
                and isinstance(meta.get("sha256"), str)
                and _HEX64.match(meta["sha256"])
            ):
                problem = f"has no valid size and sha256 for {f}"
                break
    if problem:
        raise StateCheckpointError(f"{where}: the manifest {problem}; refused")
    return dict(manifest)


def clear_remote(uri: str) -> None:
    """Remove the remote training states under ``uri`` (the published model checkpoint
    supersedes them); a failure is logged, not raised."""
    RemoteStates(uri).clear()


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
