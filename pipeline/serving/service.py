"""The scoring service's state: verified models, the routing table, the registry poller,
and the labels fed back for earlier requests. No HTTP here (see ``app.py``).

The routing table is one immutable object; the poller builds a new one and replaces the
reference in a single assignment, so a request reads either the old table or the new
one, never a mix, and finishes on the model it started with. Models are loaded only by
the poller, never on the request path.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.serving import traffic
from pipeline.serving.faults import FaultSwitch
from pipeline.serving.metrics import ServiceMetrics, SlotMetrics
from pipeline.serving.schema import RowValidator

log = logging.getLogger(__name__)

CHAMPION, CANARY = "champion", traffic.CANARY


@dataclass(frozen=True)
class LoadedModel:
    """A verified model: the checkpoint passed ``checkpoint.load_for_inference``."""

    version: str
    checkpoint_uri: str
    manifest_sha256: str
    model: Any  # pipeline.train.model.MLP
    spec: Any  # pipeline.train.features.FeatureSpec
    positive_index: int

    def score(self, rows: list[dict[str, Any]]) -> np.ndarray:
        """Positive-class probability per raw row (features from the checkpoint's spec)."""
        import pandas as pd

        from pipeline.evaluate import score_model

        df = pd.DataFrame.from_records(rows, columns=self.spec.input_columns)
        return score_model(self.model, self.spec, df)[:, self.positive_index]

    def describe(self) -> dict[str, str]:
        return {"version": self.version, "checkpoint_uri": self.checkpoint_uri,
                "manifest_sha256": self.manifest_sha256}  # fmt: skip


def warm_up(model: LoadedModel, rounds: int = 3) -> None:
    """Score a few plain rows before the model takes traffic, so its first live requests
    do not pay for cold caches and lazy initialisation (seen as a canary latency spike)."""
    spec = model.spec
    row: dict[str, Any] = dict.fromkeys(spec.numeric, 0.0)
    row.update({c: cats[0] for c, cats in spec.categorical})
    for _ in range(rounds):
        for n in (1, 8, 64):
            model.score([row] * n)


class ModelRefused(RuntimeError):
    """The version's checkpoint failed verification (or names none): never served."""


def load_version(version: str) -> LoadedModel:
    """Registry version -> verified model. ModelRefused on integrity failure; any other
    exception (registry or storage unreachable) is transient and retried next poll."""
    from pipeline.checkpoint import CheckpointError, load_for_inference
    from pipeline.contract import default_contract
    from pipeline.registry import client
    from pipeline.settings import get_settings

    mv = client().get_model_version(get_settings().model_name, version)
    uri = mv.tags.get("checkpoint.uri")
    if not uri:
        raise ModelRefused(f"v{version} has no checkpoint.uri tag")
    try:
        model, spec, verification = load_for_inference(uri)
    except CheckpointError as exc:
        raise ModelRefused(str(exc)) from None
    positive = default_contract().positive_label
    idx = spec.classes.index(positive) if positive in spec.classes else len(spec.classes) - 1
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
    """Scores of recent requests by id, until their labels arrive (bounded, oldest first
    out), and the most recent (score, label) pairs per (alias, version) for the AUC."""

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

    def add_labels(self, alias: str, version: str, scores: np.ndarray, positive: list[int]) -> None:
        with self._lock:
            d = self._labelled.setdefault((alias, version), deque(maxlen=self.auc_window))
            d.extend(zip(scores.tolist(), positive, strict=True))

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


@dataclass
class ScoringService:
    """Everything ``/predict`` and the poller share."""

    validator: RowValidator
    poll_seconds: float = 2.0
    loader: Callable[[str], LoadedModel] = load_version
    read_state: Callable[[], traffic.ServingState] = traffic.read_state
    max_rows: int = 10_000
    feedback_capacity: int = 100_000
    metrics: ServiceMetrics = field(default_factory=ServiceMetrics)
    faults: FaultSwitch = field(default_factory=FaultSwitch)

    def __post_init__(self) -> None:
        if self.poll_seconds <= 0:
            raise ValueError(f"poll_seconds must be > 0, got {self.poll_seconds}")
        self.table = RoutingTable()
        self.refused: dict[str, str] = {}
        self.status = PollStatus()
        self.feedback = FeedbackStore(self.feedback_capacity)
        self._models: dict[str, LoadedModel] = {}
        self._slots: dict[tuple[str, str], Slot] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._poll_lock = threading.Lock()
        self.metrics.weight.set(0)

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
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - the poller must outlive any one bad poll
                log.exception("registry poll failed")

    def poll_once(self) -> RoutingTable:
        """Read the registry, load (verify) what is new, swap the table. Never raises for
        registry or storage trouble: the current table keeps serving."""
        with self._poll_lock:
            try:
                state = self.read_state()
            except Exception as exc:  # noqa: BLE001 - registry down: keep serving
                self.metrics.polls.labels("error").inc()
                self.status = PollStatus(False, time.time(), f"{type(exc).__name__}: {exc}",
                                         self.status.desired, self.status.polls + 1)  # fmt: skip
                log.warning("registry poll failed: %s", exc)
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
            self._models = {v: m for v, m in self._models.items() if v in keep}
            self._slots = {k: s for k, s in self._slots.items() if k[1] in keep}
            self.metrics.polls.labels("ok" if not errors else "load_error").inc()
            self.status = PollStatus(not errors, time.time(), "; ".join(errors) or None, state,
                                     self.status.polls + 1)  # fmt: skip
            return new

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
            self.refused[version] = str(exc)
            self.metrics.refused.labels(version).set(1)
            log.error("refusing v%s: %s", version, exc)
            return None
        except Exception as exc:  # noqa: BLE001 - transient: retried on the next poll
            errors.append(f"loading v{version}: {type(exc).__name__}: {exc}")
            log.warning("could not load v%s (will retry): %s", version, exc)
            return None
        try:
            warm_up(loaded)
        except Exception as exc:  # noqa: BLE001 - a model that cannot score a plain row is refused
            self.refused[version] = f"warm-up scoring failed: {type(exc).__name__}: {exc}"
            self.metrics.refused.labels(version).set(1)
            log.error("refusing v%s: %s", version, self.refused[version])
            return None
        self._models[version] = loaded
        log.info("loaded v%s (manifest %s)", version, loaded.manifest_sha256[:12])
        return loaded

    def _slot(self, alias: str, model: LoadedModel) -> Slot:
        key = (alias, model.version)
        if key not in self._slots or self._slots[key].model is not model:
            self._slots[key] = Slot(alias, model, self.metrics.slot(alias, model.version))
        return self._slots[key]

    def _publish(self, old: RoutingTable, new: RoutingTable) -> None:
        for s in (old.champion, old.canary):
            if s is not None:
                try:
                    self.metrics.info.remove(s.alias, s.model.version, s.model.manifest_sha256)
                except KeyError:
                    pass
        for s in (new.champion, new.canary):
            if s is not None:
                self.metrics.info.labels(s.alias, s.model.version, s.model.manifest_sha256).set(1)
        self.metrics.weight.set(new.weight)
        log.info("serving champion=%s canary=%s weight=%g",
                 new.champion and new.champion.model.version,
                 new.canary and new.canary.model.version, new.weight)  # fmt: skip

    # -- feedback ---------------------------------------------------------------------

    def record_labels(self, items: list[tuple[str, list[Any]]]) -> dict[str, int]:
        """(request id, labels of its rows) pairs; returns counts by result."""
        counts = {"matched": 0, "unknown": 0, "mismatched": 0}
        touched: set[tuple[str, str]] = set()
        for request_id, labels in items:
            found = self.feedback.take(request_id)
            if found is None:
                counts["unknown"] += len(labels) or 1
                continue
            alias, version, scores = found
            if len(labels) != len(scores):
                counts["mismatched"] += len(labels)
                continue
            positive = [int(lbl == self._positive_label(version, alias)) for lbl in labels]
            self.feedback.add_labels(alias, version, scores, positive)
            hist = self.metrics.labelled
            for s, p in zip(scores.tolist(), positive, strict=True):
                hist.labels(alias, version, str(p)).observe(s)
            counts["matched"] += len(labels)
            touched.add((alias, version))
        for alias, version in touched:
            auc = self.feedback.auc(alias, version)
            if auc is not None:
                self.metrics.auc.labels(alias, version).set(auc)
        for result, n in counts.items():
            if n:
                self.metrics.feedback.labels(result).inc(n)
        return counts

    def _positive_label(self, version: str, alias: str) -> Any:
        for s in (self.table.champion, self.table.canary):
            if s is not None and s.model.version == version:
                return s.model.spec.classes[s.model.positive_index]
        return 1

    # -- what /readyz says --------------------------------------------------------------

    def readiness(self) -> dict[str, Any]:
        t, st = self.table, self.status
        desired = st.desired
        out: dict[str, Any] = {
            "ready": t.champion is not None,
            "champion": t.champion.model.describe() if t.champion else None,
            "canary": t.canary.model.describe() if t.canary else None,
            "canary_weight": t.weight,
            "registry": {"champion": desired.champion, "canary": desired.canary,
                         "canary_weight": desired.weight} if desired else None,
            "refused": dict(self.refused),
            "last_poll": {"ok": st.ok, "age_s": None if st.at is None else round(time.time() - st.at, 3),
                          "error": st.error, "polls": st.polls},
            "faults": self.faults.to_dict(),
        }  # fmt: skip
        notes = []
        if desired and desired.champion and t.champion and desired.champion != t.champion.model.version:
            why = self.refused.get(desired.champion, "not loaded yet")
            notes.append(f"registry champion v{desired.champion} is not served ({why}); "
                         f"serving the last good champion v{t.champion.model.version}")  # fmt: skip
        if desired and desired.canary and (t.canary is None or t.canary.model.version != desired.canary):
            why = self.refused.get(desired.canary, "not loaded yet")
            notes.append(f"registry canary v{desired.canary} is not served ({why}); "
                         "all traffic goes to the champion")  # fmt: skip
        if t.champion is None:
            notes.append("no verified champion loaded: not ready")
        out["notes"] = notes
        return out
