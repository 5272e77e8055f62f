"""The scoring service's state: per model, verified versions, the routing table and the
labels fed back for earlier requests; the registry poller over all of them. No HTTP here
(see ``app.py``).

One :class:`ServedModel` per model spec (``models/<name>/model.yaml``): its registered
model's ``champion`` and ``canary`` aliases and canary weight, its contract's row
validator, its own routing table. A model that cannot be served (a broken spec, a
registry that has never heard of it, a refused checkpoint) never stops the others.

Each routing table is one immutable object; the poller builds a new one and replaces the
reference in a single assignment, so a request reads either the old table or the new
one, never a mix, and finishes on the model it started with. Models are loaded only by
the poller, never on the request path.

**Serve only what the gate allowed** (:func:`load_version`). An alias is a pointer anyone
with registry write access can move (the MLflow UI does it in two clicks), so the
service does not take it as the decision. Before it loads a version it checks, in
order, and refuses (:class:`RefusalReason`) a version that is

1. tagged ``rejected`` (the gate or a human reviewer said no) or ``rolled_back`` (a
   canary, a bake or an operator took it out of service);
2. not accepted by the gate (``gate.verdict`` is not ``promote``);
3. without the checkpoint URI or the manifest digest recorded at registration
   (``checkpoint.uri``, ``checkpoint.manifest_sha256``);
4. a checkpoint whose ``manifest.json`` is not the one registered (its SHA-256 differs
   from the recorded digest: edited, re-signed or swapped in storage);
5. built by another factory than its spec's in git (name or module digest differ); the
   checkpoint's own copy of the code (``model_code.py``) is never executed: the spec's
   module file is imported first and the checkpoint's identical bytes resolve to it;
6. a checkpoint that fails ``checkpoint`` verification (digests, signature, finite
   tensors, reload parity), or a model that cannot score a plain row.

A refused version never takes traffic; the last good model keeps serving. ``/readyz``
names the refusal (``refused``, ``refusals``, ``notes``), and the metrics count it:
``scoring_refusals_total{model, alias, version, reason}`` once per refusal and
``scoring_model_refused{model, version}`` = 1 while it stands. A refusal read from tags
(1-3) is re-checked on each poll (one registry call), so re-gating or re-tagging a
version is followed without a restart; one read from the checkpoint (4-6) lasts for the
process, as the checkpoint is immutable. Nothing on this path unpickles, calls
``torch.load`` or loads an MLflow pyfunc: weights are safetensors, the rest JSON and
Parquet.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.names import GateVerdict, VersionTag
from pipeline.serving import traffic
from pipeline.serving.encode import RowEncoder
from pipeline.serving.faults import FaultSwitch
from pipeline.serving.metrics import ServiceMetrics, SlotMetrics
from pipeline.serving.schema import RowValidator

if TYPE_CHECKING:
    from pipeline.spec import ModelSpec

log = logging.getLogger(__name__)

CHAMPION, CANARY = "champion", traffic.CANARY
BINARY, MULTICLASS = "binary", "multiclass"


@dataclass(frozen=True)
class LoadedModel:
    """A verified model: the checkpoint passed ``checkpoint.load_for_inference``."""

    version: str
    checkpoint_uri: str
    manifest_sha256: str
    model: Any  # any torch.nn.Module: float batch -> logits
    spec: Any  # pipeline.train.features.FeatureSpec
    positive_index: int
    # The checkpoint's featurisation on JSON rows (encode.RowEncoder); None: through pandas
    encoder: RowEncoder | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.encoder is None:
            object.__setattr__(self, "encoder", RowEncoder.for_spec(self.spec))
        if self.encoder is not None:
            self.model.cpu()  # once, here, instead of on every request (score_model)

    @property
    def classes(self) -> list[Any]:
        return list(self.spec.classes)

    def proba(self, rows: list[dict[str, Any]]) -> np.ndarray:
        """Class probabilities (rows x classes) per raw row (features from the checkpoint):
        ``evaluate.score_model`` on the rows' DataFrame, computed without building one
        when the row encoder agrees with the reference featurisation (see ``encode``).
        A cell the encoder cannot take (a checkpoint whose columns the contract no longer
        types the same: a string in a numeric column) goes the reference way."""
        if self.encoder is not None:
            try:
                x = self.encoder.encode(rows)
            except (TypeError, ValueError):
                pass
            else:
                import torch

                from pipeline.train.model import predict_proba

                return predict_proba(self.model, torch.from_numpy(x)).numpy()
        import pandas as pd

        from pipeline.evaluate import score_model

        df = pd.DataFrame.from_records(rows, columns=self.spec.input_columns)
        return score_model(self.model, self.spec, df)

    def score(self, rows: list[dict[str, Any]]) -> np.ndarray:
        """Positive-class probability per raw row (a binary model's score)."""
        return self.proba(rows)[:, self.positive_index]

    def describe(self) -> dict[str, str]:
        return {
            "version": self.version,
            "checkpoint_uri": self.checkpoint_uri,
            "manifest_sha256": self.manifest_sha256,
        }


def warm_up(model: LoadedModel, rounds: int = 3) -> None:
    """Score a few plain rows before the model takes traffic, so its first live requests
    do not pay for cold caches and lazy initialisation (seen as a canary latency spike)."""
    spec = model.spec
    row: dict[str, Any] = dict.fromkeys(spec.numeric, 0.0)
    row.update({c: cats[0] for c, cats in spec.categorical})
    for _ in range(rounds):
        for n in (1, 8, 64):
            model.proba([row] * n)


class RefusalReason(StrEnum):
    """Why the service refuses to serve a version (the ``reason`` label)."""

    REJECTED = "rejected"  # tagged rejected: the gate or a human reviewer said no
    ROLLED_BACK = "rolled_back"  # tagged rolled_back: a canary, bake or operator said no
    NOT_GATED = "not_gated"  # the gate never accepted it (gate.verdict is not promote)
    NOT_APPROVED = "not_approved"  # its policy required a human approval it never got
    NO_CHECKPOINT = "no_checkpoint"  # no checkpoint.uri tag
    NO_MANIFEST_DIGEST = "no_manifest_digest"  # no checkpoint.manifest_sha256 tag
    MANIFEST_MISMATCH = "manifest_mismatch"  # manifest.json is not the one registered
    MODEL_CODE = "model_code"  # built by another factory than its spec's in git
    VERIFICATION_FAILED = "verification_failed"  # digests, signature, parity, ...
    WRONG_TASK = "wrong_task"  # binary vs multiclass
    WARM_UP_FAILED = "warm_up_failed"  # cannot score a plain row


# Refusals read from the version's tags: re-checked each poll (one registry call).
TAG_REASONS = frozenset(
    {
        RefusalReason.REJECTED,
        RefusalReason.ROLLED_BACK,
        RefusalReason.NOT_GATED,
        RefusalReason.NOT_APPROVED,
        RefusalReason.NO_CHECKPOINT,
        RefusalReason.NO_MANIFEST_DIGEST,
    }
)


class ModelRefused(RuntimeError):
    """The version may not be served (``reason``): never takes traffic."""

    def __init__(
        self, message: str, reason: RefusalReason = RefusalReason.VERIFICATION_FAILED
    ) -> None:
        super().__init__(message)
        self.reason = RefusalReason(reason)


@dataclass(frozen=True)
class Refusal:
    reason: RefusalReason
    message: str
    alias: str

    @property
    def lasting(self) -> bool:
        """Read from the checkpoint (immutable): not re-checked while the process lives."""
        return self.reason not in TAG_REASONS

    def to_dict(self) -> dict[str, str]:
        return {"reason": self.reason.value, "message": self.message, "alias": self.alias}


def gate_refusal(version: str, tags: dict[str, str]) -> ModelRefused | None:
    """What the version's tags say against serving it (None: the gate allowed it)."""
    if tags.get(VersionTag.REJECTED) == "true":
        why = tags.get(VersionTag.REJECTION_REASON) or "no reason recorded"
        return ModelRefused(
            f"v{version} is tagged rejected ({why[:300]}): a rejected version is never "
            "served, whatever the aliases say",
            RefusalReason.REJECTED,
        )
    if tags.get(VersionTag.ROLLED_BACK) == "true":
        why = tags.get(VersionTag.ROLLBACK_REASON) or tags.get("rollback.reason") or "no reason"
        return ModelRefused(
            f"v{version} is tagged rolled_back ({why[:300]}): it was taken out of service; "
            "promote a new version through the gate instead",
            RefusalReason.ROLLED_BACK,
        )
    verdict = tags.get(VersionTag.GATE_VERDICT)
    if verdict != GateVerdict.PROMOTE:
        return ModelRefused(
            f"v{version} was never accepted by the promotion gate ({VersionTag.GATE_VERDICT}="
            f"{verdict!r}, needs {GateVerdict.PROMOTE.value!r}): an alias moved by hand does "
            "not make a version servable; run it through retrain's gate_promotion",
            RefusalReason.NOT_GATED,
        )
    if (
        tags.get(VersionTag.APPROVAL_REQUIRED) == "true"
        and tags.get(VersionTag.APPROVAL_VERDICT) != "approved"  # as approve_promotion tags it
    ):
        return ModelRefused(
            f"v{version}'s policy required a human approval ({VersionTag.APPROVAL_REQUIRED}="
            f"true) and it has none ({VersionTag.APPROVAL_VERDICT}="
            f"{tags.get(VersionTag.APPROVAL_VERDICT)!r}): answer approve_promotion in "
            "Airflow, or `python -m pipeline approve_promotion --approve`",
            RefusalReason.NOT_APPROVED,
        )
    if not tags.get(VersionTag.CHECKPOINT_URI):
        return ModelRefused(
            f"v{version} has no {VersionTag.CHECKPOINT_URI} tag", RefusalReason.NO_CHECKPOINT
        )
    if not tags.get(VersionTag.MANIFEST_SHA256):
        return ModelRefused(
            f"v{version} has no {VersionTag.MANIFEST_SHA256} tag: the manifest digest recorded "
            "at registration is what the served checkpoint is compared with",
            RefusalReason.NO_MANIFEST_DIGEST,
        )
    return None


def check_model_code(version: str, manifest: dict[str, Any], spec: ModelSpec | None) -> None:
    """The checkpoint's model must be built by its spec's factory, from the spec's code in
    git: same factory, and for a spec-local module the same file digest. ModelRefused
    (model_code) otherwise. Without a spec (a bare loader), only importable factories."""
    from pipeline.train.model import BUILTIN_MLP, file_sha256

    ref = manifest.get("model") or {"factory": BUILTIN_MLP}  # pre-factory: the built-in MLP
    factory, code_sha = str(ref.get("factory")), ref.get("code_sha256")
    if spec is None:
        if code_sha is not None:
            raise ModelRefused(
                f"v{version}'s factory {factory!r} is code carried in the checkpoint, and no "
                "model spec says which code in git it must be",
                RefusalReason.MODEL_CODE,
            )
        return
    if factory != spec.model.factory:
        raise ModelRefused(
            f"v{version} was built by factory {factory!r}, but spec {spec.name!r} names "
            f"{spec.model.factory!r}: the service builds models only with the spec's factory",
            RefusalReason.MODEL_CODE,
        )
    git_file = spec.factory_module_file
    if git_file is None:
        if code_sha is not None:
            raise ModelRefused(
                f"v{version} carries its factory's code (sha256 {str(code_sha)[:12]}) but "
                f"spec {spec.name!r}'s factory {factory!r} is no file next to the spec",
                RefusalReason.MODEL_CODE,
            )
        return
    git_sha = file_sha256(git_file)
    if code_sha != git_sha:
        raise ModelRefused(
            f"v{version} was trained with {factory!r} code sha256 "
            f"{str(code_sha)[:12] if code_sha else 'none'}, but the spec's module {git_file} "
            f"is sha256 {git_sha[:12]}: code from the artifact store is never executed; "
            "serve a version trained with this code (retrain), or deploy the service at the "
            "commit the version was trained from (its code.version tag)",
            RefusalReason.MODEL_CODE,
        )


def _import_spec_factory(spec: ModelSpec) -> None:
    """Import the spec's factory module from git (a spec-local file is imported under its
    digest's name, so loading a checkpoint whose code has that digest uses this module and
    never executes the checkpoint's copy)."""
    from pipeline.train.model import resolve_factory

    resolve_factory(spec.model.factory, spec.factory_module_file)


def load_version(
    registered_model: str,
    version: str,
    positive_label: Any = None,
    spec: ModelSpec | None = None,
) -> LoadedModel:
    """Registry version of ``registered_model`` -> verified model, if the gate allowed it
    (see the module's docstring for the checks, in order). ModelRefused says why not; any
    other exception (registry or storage unreachable) is transient and retried next poll."""
    import json
    import tempfile

    from pipeline import checkpoint, storage
    from pipeline.registry import client

    mv = client().get_model_version(registered_model, version)
    tags = {str(k): str(v) for k, v in (mv.tags or {}).items()}
    refused = gate_refusal(str(version), tags)
    if refused is not None:
        raise refused
    uri, recorded = tags[VersionTag.CHECKPOINT_URI], tags[VersionTag.MANIFEST_SHA256]
    with tempfile.TemporaryDirectory(prefix="serving-ckpt-") as tmp:
        local = checkpoint.fetch(uri, Path(tmp) / "ckpt")
        manifest_path = local / checkpoint.MANIFEST
        if not manifest_path.is_file():
            raise ModelRefused(
                f"checkpoint {uri} of v{version} has no {checkpoint.MANIFEST}",
                RefusalReason.VERIFICATION_FAILED,
            )
        digest = storage.sha256_file(manifest_path)
        if digest != recorded:
            raise ModelRefused(
                f"checkpoint {uri} of v{version}: {checkpoint.MANIFEST} sha256 {digest[:12]} "
                f"is not the {recorded[:12]} recorded at registration "
                f"({VersionTag.MANIFEST_SHA256}): the checkpoint in storage is not the one "
                "the gate judged",
                RefusalReason.MANIFEST_MISMATCH,
            )
        try:
            manifest = json.loads(manifest_path.read_bytes())
        except (ValueError, UnicodeDecodeError) as exc:
            raise ModelRefused(
                f"checkpoint {uri}: {checkpoint.MANIFEST} is not JSON: {exc}",
                RefusalReason.VERIFICATION_FAILED,
            ) from None
        if not isinstance(manifest, dict):
            raise ModelRefused(
                f"checkpoint {uri}: {checkpoint.MANIFEST} is not an object",
                RefusalReason.VERIFICATION_FAILED,
            )
        check_model_code(str(version), manifest, spec)
        if spec is not None:
            from pipeline.train.model import FactoryError

            try:
                _import_spec_factory(spec)
            except FactoryError as exc:
                raise ModelRefused(
                    f"spec {spec.name!r}'s factory cannot be imported: {exc}",
                    RefusalReason.MODEL_CODE,
                ) from None
        try:
            model, features, verification = checkpoint.load_local_for_inference(local)
        except checkpoint.CheckpointError as exc:
            raise ModelRefused(
                str(exc).replace(str(local), uri, 1), RefusalReason.VERIFICATION_FAILED
            ) from None
    classes = list(features.classes)
    idx = classes.index(positive_label) if positive_label in classes else len(classes) - 1
    return LoadedModel(str(version), uri, verification.manifest_sha256, model, features, idx)


@dataclass(frozen=True)
class Slot:
    alias: str
    model: LoadedModel
    metrics: SlotMetrics


@dataclass(frozen=True)
class RoutingTable:
    champion: Slot | None = None
    canary: Slot | None = None
    weight: float = 0.0  # applied: 0 unless a canary is loaded

    def pick(self, key: str | None) -> Slot | None:
        if self.canary is not None and traffic.goes_to_canary(self.weight, key):
            return self.canary
        return self.champion


class FeedbackStore:
    """One model's scores of recent requests by (server-issued) id, until their labels
    arrive (bounded, oldest first out); the ids already labelled (bounded too), so a second
    label for a request is refused rather than taken; and the most recent (score,
    is-positive) pairs per (alias, version) for the AUC (multiclass: one pair per class of
    each row, one-vs-rest)."""

    def __init__(self, capacity: int = 100_000, auc_window: int = 20_000) -> None:
        self._pending: OrderedDict[str, tuple[str, str, np.ndarray]] = OrderedDict()
        self._done: OrderedDict[str, None] = OrderedDict()
        self._labelled: dict[tuple[str, str], deque[tuple[float, int]]] = {}
        self.capacity, self.auc_window = capacity, auc_window
        self._lock = threading.Lock()

    def remember(self, request_id: str, alias: str, version: str, scores: np.ndarray) -> None:
        with self._lock:
            self._pending[request_id] = (alias, version, scores)
            while len(self._pending) > self.capacity:
                self._pending.popitem(last=False)

    def claim(
        self, items: list[tuple[str, list[Any]]]
    ) -> tuple[list[tuple[str, str, np.ndarray, list[Any]]], list[tuple[int, str, str]]]:
        """All or nothing: every item's (alias, version, scores, labels), taken out of the
        pending store — or, when any item cannot be taken, nothing taken and the refusals
        ``(index, result, message)``: ``duplicate`` (already labelled, or twice in this
        batch), ``unknown`` (not pending here) or ``mismatched`` (label count != rows)."""
        refused: list[tuple[int, str, str]] = []
        seen: set[str] = set()
        with self._lock:
            for i, (rid, labels) in enumerate(items):
                if rid in self._done or rid in seen:
                    refused.append((i, "duplicate", f"request {rid} is already labelled"))
                elif rid not in self._pending:
                    refused.append(
                        (
                            i,
                            "unknown",
                            f"request {rid} is not pending here (expired, a restart, or "
                            "scored by another replica)",
                        )
                    )
                elif len(labels) != len(self._pending[rid][2]):
                    n = len(self._pending[rid][2])
                    refused.append(
                        (i, "mismatched", f"request {rid} scored {n} row(s), {len(labels)} labels")
                    )
                seen.add(rid)
            if refused:
                return [], refused
            out = []
            for rid, labels in items:
                alias, version, scores = self._pending.pop(rid)
                self._done[rid] = None
                out.append((alias, version, scores, labels))
            while len(self._done) > self.capacity:
                self._done.popitem(last=False)
            return out, []

    def add_labels(
        self, alias: str, version: str, scores: list[float], positive: list[int]
    ) -> None:
        with self._lock:
            d = self._labelled.setdefault((alias, version), deque(maxlen=self.auc_window))
            d.extend(zip(scores, positive, strict=True))

    def auc(self, alias: str, version: str) -> float | None:
        from pipeline.metrics import weighted_auc

        with self._lock:
            pairs = list(self._labelled.get((alias, version), ()))
        if not pairs:
            return None
        s = np.asarray([p[0] for p in pairs])
        y = np.asarray([p[1] for p in pairs], dtype=bool)
        if y.all() or not y.any():
            return None
        return float(weighted_auc(y, s, np.ones(len(s)))[0])


@dataclass
class PollStatus:
    ok: bool = False
    at: float | None = None
    error: str | None = None
    desired: traffic.ServingState | None = None
    polls: int = 0


def _same_label(a: Any, b: Any) -> bool:
    return bool(a == b) or str(a) == str(b)


class ServedModel:
    """One model the service serves: its registry state, verified versions, routing
    table, refusals and feedback. ``name`` is the spec's name (the URL's ``{name}`` and
    the metrics' ``model`` label), ``registered_model`` the MLflow registered model."""

    def __init__(
        self,
        name: str,
        *,
        validator: RowValidator,
        loader: Callable[[str], LoadedModel],
        read_state: Callable[[], traffic.ServingState],
        registered_model: str | None = None,
        task: str = BINARY,
        classes: Iterable[Any] = (0, 1),
        positive_label: Any = 1,
        feedback_capacity: int = 100_000,
        metrics: ServiceMetrics | None = None,
        faults: FaultSwitch | None = None,
        spec: ModelSpec | None = None,
    ) -> None:
        if task not in (BINARY, MULTICLASS):
            raise ValueError(f"task must be {BINARY!r} or {MULTICLASS!r}, got {task!r}")
        self.name, self.registered_model = name, registered_model or name.replace("_", "-")
        self.validator, self.loader, self.read_state = validator, loader, read_state
        self.task, self.contract_classes, self.positive_label = task, list(classes), positive_label
        self.spec = spec
        self.metrics = metrics or ServiceMetrics()
        self.faults = faults or FaultSwitch()
        self.table = RoutingTable()
        self.refused: dict[str, str] = {}  # version -> why (the message)
        self.refusals: dict[str, Refusal] = {}  # version -> reason, message, alias
        self.status = PollStatus()
        self.feedback = FeedbackStore(feedback_capacity)
        self._models: dict[str, LoadedModel] = {}
        self._slots: dict[tuple[str, str], Slot] = {}
        self._poll_lock = threading.Lock()
        self.metrics.weight.labels(name).set(0)

    @classmethod
    def from_spec(cls, spec: ModelSpec, **kw: Any) -> ServedModel:
        """The model of ``spec``: registry calls name ``spec.model_name`` explicitly."""
        contract = spec.contract_obj()
        kw.setdefault(
            "loader",
            partial(
                load_version, spec.model_name, positive_label=contract.positive_label, spec=spec
            ),
        )
        kw.setdefault("read_state", partial(traffic.read_state, spec.model_name))
        return cls(
            spec.name,
            validator=RowValidator(contract),
            registered_model=spec.model_name,
            task=spec.task.type,
            classes=contract.target_values,
            positive_label=contract.positive_label,
            spec=spec,
            **kw,
        )

    @property
    def multiclass(self) -> bool:
        return self.task == MULTICLASS

    @property
    def ready(self) -> bool:
        return self.table.champion is not None

    @property
    def classes(self) -> list[Any]:
        """The served champion's classes (the contract's before one is loaded)."""
        champ = self.table.champion
        return champ.model.classes if champ is not None else list(self.contract_classes)

    def scores_of(self, model: LoadedModel, proba: np.ndarray) -> np.ndarray:
        """What the metrics and the feedback keep: binary, the positive-class probability
        per row; multiclass, every class's."""
        return proba if self.multiclass else proba[:, model.positive_index]

    def shift(self, model: LoadedModel, proba: np.ndarray, by: float) -> np.ndarray:
        """A fault's score shift: binary on the positive class (the other is 1 - it);
        multiclass on every class, renormalised."""
        out = proba.astype(np.float64, copy=True)
        if not self.multiclass and out.shape[1] == 2:
            pos = model.positive_index
            out[:, pos] = np.clip(out[:, pos] + by, 0.0, 1.0)
            out[:, 1 - pos] = 1.0 - out[:, pos]
            return out
        out = np.clip(out + by, 0.0, 1.0)
        sums = out.sum(axis=1, keepdims=True)
        return np.where(sums > 0, out / np.where(sums > 0, sums, 1.0), 1.0 / out.shape[1])

    # -- the poll -----------------------------------------------------------------------

    def poll_once(self) -> RoutingTable:
        """Read the registry, load (verify) what is new, swap the table. Never raises for
        registry or storage trouble: the current table keeps serving."""
        m = self.metrics
        with self._poll_lock:
            try:
                state = self.read_state()
            except Exception as exc:  # noqa: BLE001 - registry down: keep serving
                m.polls.labels(self.name, "error").inc()
                self.status = PollStatus(
                    False,
                    time.time(),
                    f"{type(exc).__name__}: {exc}",
                    self.status.desired,
                    self.status.polls + 1,
                )
                log.warning("registry poll for %s failed: %s", self.name, exc)
                return self.table
            errors: list[str] = []
            champ = self._resolve(state.champion, CHAMPION, errors)
            canary = self._resolve(state.canary, CANARY, errors)
            old = self.table
            champion_slot = self._slot(CHAMPION, champ) if champ else old.champion
            canary_slot = self._slot(CANARY, canary) if canary else None
            new = RoutingTable(champion_slot, canary_slot, state.weight if canary_slot else 0.0)
            if new != old:
                self.table = new  # the one atomic swap
                self._publish(old, new)
            keep = {s.model.version for s in (new.champion, new.canary) if s}
            self._models = {v: mdl for v, mdl in self._models.items() if v in keep}
            self._slots = {k: s for k, s in self._slots.items() if k[1] in keep}
            m.polls.labels(self.name, "ok" if not errors else "load_error").inc()
            self.status = PollStatus(
                not errors, time.time(), "; ".join(errors) or None, state, self.status.polls + 1
            )
            return new

    def _refuse(self, version: str, alias: str, refused: ModelRefused) -> None:
        why, reason = str(refused), refused.reason
        before = self.refusals.get(version)
        self.refused[version] = why
        self.refusals[version] = Refusal(reason, why, alias)
        self.metrics.refused.labels(self.name, version).set(1)
        if before is None or before.reason != reason or before.alias != alias:
            self.metrics.refusals.labels(self.name, alias, version, reason.value).inc()
            log.error("%s: refusing %s v%s (%s): %s", self.name, alias, version, reason, why)

    def _unrefuse(self, version: str) -> None:
        if self.refusals.pop(version, None) is not None:
            self.refused.pop(version, None)
            try:
                self.metrics.refused.remove(self.name, version)
            except KeyError:
                pass
            log.info("%s: v%s is no longer refused", self.name, version)

    def _resolve(self, version: str | None, alias: str, errors: list[str]) -> LoadedModel | None:
        if version is None:
            return None
        if version in self._models:
            return self._models[version]
        known = self.refusals.get(version)
        if known is not None and known.lasting:
            return None
        try:
            loaded = self.loader(version)
        except ModelRefused as exc:
            self._refuse(version, alias, exc)
            return None
        except Exception as exc:  # noqa: BLE001 - transient: retried on the next poll
            errors.append(f"loading v{version}: {type(exc).__name__}: {exc}")
            log.warning("%s: could not load v%s (will retry): %s", self.name, version, exc)
            return None
        k = len(loaded.classes)
        if (k > 2) != self.multiclass:
            self._refuse(
                version,
                alias,
                ModelRefused(
                    f"the checkpoint has {k} classes but model {self.name!r} is {self.task}",
                    RefusalReason.WRONG_TASK,
                ),
            )
            return None
        try:
            warm_up(loaded)
        except Exception as exc:  # noqa: BLE001 - a model that cannot score a plain row is refused
            self._refuse(
                version,
                alias,
                ModelRefused(
                    f"warm-up scoring failed: {type(exc).__name__}: {exc}",
                    RefusalReason.WARM_UP_FAILED,
                ),
            )
            return None
        self._unrefuse(version)
        self._models[version] = loaded
        log.info("%s: loaded v%s (manifest %s)", self.name, version, loaded.manifest_sha256[:12])
        return loaded

    def _slot(self, alias: str, model: LoadedModel) -> Slot:
        key = (alias, model.version)
        if key not in self._slots or self._slots[key].model is not model:
            self._slots[key] = Slot(
                alias, model, self.metrics.slot(self.name, alias, model.version)
            )
        return self._slots[key]

    def _publish(self, old: RoutingTable, new: RoutingTable) -> None:
        info = self.metrics.info
        for s in (old.champion, old.canary):
            if s is not None:
                try:
                    info.remove(self.name, s.alias, s.model.version, s.model.manifest_sha256)
                except KeyError:
                    pass
        for s in (new.champion, new.canary):
            if s is not None:
                info.labels(self.name, s.alias, s.model.version, s.model.manifest_sha256).set(1)
        self.metrics.weight.labels(self.name).set(new.weight)
        log.info(
            "%s: serving champion=%s canary=%s weight=%g",
            self.name,
            new.champion and new.champion.model.version,
            new.canary and new.canary.model.version,
            new.weight,
        )

    # -- feedback ---------------------------------------------------------------------

    def record_labels(
        self, items: list[tuple[str, list[Any]]]
    ) -> tuple[dict[str, int], list[tuple[int, str, str]]]:
        """(request id, labels of its rows) pairs, all or nothing: (counts by result,
        refusals ``(index, result, message)``). Nothing is recorded when any item is
        refused (see :meth:`FeedbackStore.claim`)."""
        counts = {"matched": 0, "unknown": 0, "mismatched": 0}
        claimed, refused = self.feedback.claim(items)
        if refused:
            self.count_refused(items, refused)
            for _, result, _ in refused:
                counts[result] = counts.get(result, 0) + 1
            return counts, refused
        touched: set[tuple[str, str]] = set()
        hist = self.metrics.labelled
        for alias, version, scores, labels in claimed:
            if scores.ndim == 2:  # multiclass: one-vs-rest, a pair per class of each row
                classes = self._classes_of(version, scores.shape[1])
                flat = scores.reshape(-1).tolist()
                positive = [int(_same_label(lbl, c)) for lbl in labels for c in classes]
            else:
                pos_label = self._positive_label(version)
                flat = scores.tolist()
                positive = [int(_same_label(lbl, pos_label)) for lbl in labels]
            self.feedback.add_labels(alias, version, flat, positive)
            for s, p in zip(flat, positive, strict=True):
                hist.labels(self.name, alias, version, str(p)).observe(s)
            counts["matched"] += len(labels)
            touched.add((alias, version))
        for alias, version in touched:
            auc = self.feedback.auc(alias, version)
            if auc is not None:
                self.metrics.auc.labels(self.name, alias, version).set(auc)
        if counts["matched"]:
            self.metrics.feedback.labels(self.name, "matched").inc(counts["matched"])
        return counts, []

    def count_refused(
        self, items: list[tuple[str, list[Any]]], refused: list[tuple[int, str, str]]
    ) -> None:
        """``scoring_feedback_total``: each refused item's rows under its result, the rest
        of its batch (not recorded either) under ``held_back``."""
        bad = {i for i, _, _ in refused}
        for i, result, _ in refused:
            self.metrics.feedback.labels(self.name, result).inc(len(items[i][1]) or 1)
        held = sum(len(labels) or 1 for i, (_, labels) in enumerate(items) if i not in bad)
        if held:
            self.metrics.feedback.labels(self.name, "held_back").inc(held)

    def _loaded(self, version: str) -> LoadedModel | None:
        for s in (self.table.champion, self.table.canary):
            if s is not None and s.model.version == version:
                return s.model
        return self._models.get(version)

    def _positive_label(self, version: str) -> Any:
        m = self._loaded(version)
        return m.classes[m.positive_index] if m is not None else self.positive_label

    def _classes_of(self, version: str, k: int) -> list[Any]:
        m = self._loaded(version)
        classes = m.classes if m is not None else list(self.contract_classes)
        return classes if len(classes) == k else list(range(k))

    # -- what /readyz says --------------------------------------------------------------

    def readiness(self) -> dict[str, Any]:
        t, st = self.table, self.status
        desired = st.desired
        out: dict[str, Any] = {
            "model": self.name,
            "registered_model": self.registered_model,
            "task": self.task,
            "ready": t.champion is not None,
            "champion": t.champion.model.describe() if t.champion else None,
            "canary": t.canary.model.describe() if t.canary else None,
            "canary_weight": t.weight,
            "registry": {
                "champion": desired.champion,
                "canary": desired.canary,
                "canary_weight": desired.weight,
            }
            if desired
            else None,
            "refused": dict(self.refused),
            "refusals": {v: r.to_dict() for v, r in sorted(self.refusals.items())},
            "last_poll": {
                "ok": st.ok,
                "age_s": None if st.at is None else round(time.time() - st.at, 3),
                "error": st.error,
                "polls": st.polls,
            },
            "faults": self.faults.for_model(self.name),
        }
        notes = []
        if (
            desired
            and desired.champion
            and t.champion
            and desired.champion != t.champion.model.version
        ):
            why = self._why(desired.champion)
            notes.append(
                f"registry champion v{desired.champion} is not served ({why}); "
                f"serving the last good champion v{t.champion.model.version}"
            )
        if (
            desired
            and desired.canary
            and (t.canary is None or t.canary.model.version != desired.canary)
        ):
            why = self._why(desired.canary)
            notes.append(
                f"registry canary v{desired.canary} is not served ({why}); "
                "all traffic goes to the champion"
            )
        if t.champion is None:
            if desired is not None and desired.champion is None:
                notes.append(
                    f"registered model {self.registered_model!r} has no champion: not ready"
                )
            elif desired is not None and desired.champion in self.refusals:
                notes.append(
                    f"registry champion v{desired.champion} is not served "
                    f"({self._why(desired.champion)}) and no earlier good champion was "
                    "served by this process: not ready"
                )
            else:
                notes.append("no verified champion loaded: not ready")
        out["notes"] = notes
        return out

    def _why(self, version: str) -> str:
        r = self.refusals.get(version)
        if r is None:
            return self.refused.get(version, "not loaded yet")
        return f"refused, {r.reason.value}: {r.message}"

    @property
    def settled(self) -> bool:
        """Nothing more to wait for: ready, or its registry names no champion, or the one
        it names was refused (either changes only when the registry does)."""
        desired = self.status.desired
        if self.ready:
            return True
        if desired is None:
            return False
        return desired.champion is None or desired.champion in self.refused


class ScoringService:
    """Every served model, the poller over them, and what the routes share. ``default``:
    the model ``/predict`` and ``/feedback`` serve (``PIPELINE_MODEL``; None: the first);
    ``broken``: spec files that could not be used (path -> error), reported by ``/readyz``."""

    def __init__(
        self,
        models: Iterable[ServedModel],
        *,
        default: str | None = None,
        poll_seconds: float = 2.0,
        max_rows: int = 10_000,
        metrics: ServiceMetrics | None = None,
        faults: FaultSwitch | None = None,
        broken: dict[str, str] | None = None,
    ) -> None:
        if poll_seconds <= 0:
            raise ValueError(f"poll_seconds must be > 0, got {poll_seconds}")
        self.poll_seconds, self.max_rows = poll_seconds, max_rows
        self.metrics = metrics or ServiceMetrics()
        self.faults = faults or FaultSwitch()
        self.broken = dict(broken or {})
        self.models: dict[str, ServedModel] = {}
        for mdl in models:
            if mdl.name in self.models:
                raise ValueError(f"model {mdl.name!r} is served twice")
            self.models[mdl.name] = mdl
            if mdl.metrics is not self.metrics:  # one registry of series for the whole service
                mdl.metrics = self.metrics
                self.metrics.weight.labels(mdl.name).set(0)
            mdl.faults = self.faults
        self.default = default if default is not None else next(iter(self.models), None)
        self._by_registered = {m.registered_model: m for m in self.models.values()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lookup -------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return sorted(self.models)

    def model(self, name: str | None = None) -> ServedModel | None:
        """A served model by spec name or registered-model name; None: the default one."""
        name = self.default if name is None else name
        if name is None:
            return None
        return self.models.get(name) or self._by_registered.get(name)

    # -- the poller -------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="registry-poller", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def poller_alive(self) -> bool:
        return self._thread is None or self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self.poll_once()

    def poll_once(self) -> dict[str, RoutingTable]:
        """Poll every model; one model's failure never stops the others' polls."""
        out: dict[str, RoutingTable] = {}
        for name, mdl in list(self.models.items()):
            try:
                out[name] = mdl.poll_once()
            except Exception:  # noqa: BLE001 - the poller must outlive any one bad poll
                log.exception("registry poll of %s failed", name)
                out[name] = mdl.table
        return out

    # -- readiness ----------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Server readiness (``/v2/health/ready``): at least one model serves a verified
        champion and no model is still loading the champion its registry names."""
        ms = list(self.models.values())
        return any(m.ready for m in ms) and all(m.settled for m in ms)

    def readiness(self) -> dict[str, Any]:
        """``/readyz``: the default model's detail, every model's readiness, broken specs."""
        default = self.model()
        if default is not None:
            out = default.readiness()
        else:
            out = {
                "model": self.default,
                "ready": False,
                "champion": None,
                "canary": None,
                "canary_weight": 0.0,
                "registry": None,
                "refused": {},
                "refusals": {},
                "last_poll": None,
                "faults": {},
                "notes": [
                    f"the default model {self.default!r} is not served; served: {self.names}"
                ],
            }
        out["default_model"] = self.default
        out["models"] = {
            n: {
                "ready": m.ready,
                "champion": m.table.champion and m.table.champion.model.version,
                "canary": m.table.canary and m.table.canary.model.version,
                "canary_weight": m.table.weight,
            }
            for n, m in sorted(self.models.items())
        }
        out["server_ready"] = self.ready
        out["broken_specs"] = dict(self.broken)
        return out
