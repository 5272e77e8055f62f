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
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.serving import traffic
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

    @property
    def classes(self) -> list[Any]:
        return list(self.spec.classes)

    def proba(self, rows: list[dict[str, Any]]) -> np.ndarray:
        """Class probabilities (rows x classes) per raw row (features from the checkpoint)."""
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


class ModelRefused(RuntimeError):
    """The version's checkpoint failed verification (or names none): never served."""


def load_version(registered_model: str, version: str, positive_label: Any = None) -> LoadedModel:
    """Registry version of ``registered_model`` -> verified model. ModelRefused on
    integrity failure; any other exception (registry or storage unreachable) is
    transient and retried next poll."""
    from pipeline.checkpoint import CheckpointError, load_for_inference
    from pipeline.registry import client

    mv = client().get_model_version(registered_model, version)
    uri = mv.tags.get("checkpoint.uri")
    if not uri:
        raise ModelRefused(f"v{version} has no checkpoint.uri tag")
    try:
        model, spec, verification = load_for_inference(uri)
    except CheckpointError as exc:
        raise ModelRefused(str(exc)) from None
    classes = list(spec.classes)
    idx = classes.index(positive_label) if positive_label in classes else len(classes) - 1
    return LoadedModel(str(version), uri, verification.manifest_sha256, model, spec, idx)


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
    """One model's scores of recent requests by id, until their labels arrive (bounded,
    oldest first out), and the most recent (score, is-positive) pairs per (alias,
    version) for the AUC (multiclass: one pair per class of each row, one-vs-rest)."""

    def __init__(self, capacity: int = 100_000, auc_window: int = 20_000) -> None:
        self._pending: OrderedDict[str, tuple[str, str, np.ndarray]] = OrderedDict()
        self._labelled: dict[tuple[str, str], deque[tuple[float, int]]] = {}
        self.capacity, self.auc_window = capacity, auc_window
        self._lock = threading.Lock()

    def remember(self, request_id: str, alias: str, version: str, scores: np.ndarray) -> None:
        with self._lock:
            self._pending[request_id] = (alias, version, scores)
            while len(self._pending) > self.capacity:
                self._pending.popitem(last=False)

    def take(self, request_id: str) -> tuple[str, str, np.ndarray] | None:
        with self._lock:
            return self._pending.pop(request_id, None)

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
        self.refused: dict[str, str] = {}
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
            "loader", partial(load_version, spec.model_name, positive_label=contract.positive_label)
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
            champ = self._resolve(state.champion, errors)
            canary = self._resolve(state.canary, errors)
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

    def _refuse(self, version: str, why: str) -> None:
        self.refused[version] = why
        self.metrics.refused.labels(self.name, version).set(1)
        log.error("%s: refusing v%s: %s", self.name, version, why)

    def _resolve(self, version: str | None, errors: list[str]) -> LoadedModel | None:
        if version is None:
            return None
        if version in self._models:
            return self._models[version]
        if version in self.refused:
            return None
        try:
            loaded = self.loader(version)
        except ModelRefused as exc:
            self._refuse(version, str(exc))
            return None
        except Exception as exc:  # noqa: BLE001 - transient: retried on the next poll
            errors.append(f"loading v{version}: {type(exc).__name__}: {exc}")
            log.warning("%s: could not load v%s (will retry): %s", self.name, version, exc)
            return None
        k = len(loaded.classes)
        if (k > 2) != self.multiclass:
            self._refuse(
                version, f"the checkpoint has {k} classes but model {self.name!r} is {self.task}"
            )
            return None
        try:
            warm_up(loaded)
        except Exception as exc:  # noqa: BLE001 - a model that cannot score a plain row is refused
            self._refuse(version, f"warm-up scoring failed: {type(exc).__name__}: {exc}")
            return None
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

    def record_labels(self, items: list[tuple[str, list[Any]]]) -> dict[str, int]:
        """(request id, labels of its rows) pairs; returns counts by result."""
        counts = {"matched": 0, "unknown": 0, "mismatched": 0}
        touched: set[tuple[str, str]] = set()
        hist = self.metrics.labelled
        for request_id, labels in items:
            found = self.feedback.take(request_id)
            if found is None:
                counts["unknown"] += len(labels) or 1
                continue
            alias, version, scores = found
            if len(labels) != len(scores):
                counts["mismatched"] += len(labels)
                continue
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
        for result, n in counts.items():
            if n:
                self.metrics.feedback.labels(self.name, result).inc(n)
        return counts

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
            why = self.refused.get(desired.champion, "not loaded yet")
            notes.append(
                f"registry champion v{desired.champion} is not served ({why}); "
                f"serving the last good champion v{t.champion.model.version}"
            )
        if (
            desired
            and desired.canary
            and (t.canary is None or t.canary.model.version != desired.canary)
        ):
            why = self.refused.get(desired.canary, "not loaded yet")
            notes.append(
                f"registry canary v{desired.canary} is not served ({why}); "
                "all traffic goes to the champion"
            )
        if t.champion is None:
            if desired is not None and desired.champion is None:
                notes.append(
                    f"registered model {self.registered_model!r} has no champion: not ready"
                )
            else:
                notes.append("no verified champion loaded: not ready")
        out["notes"] = notes
        return out

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
