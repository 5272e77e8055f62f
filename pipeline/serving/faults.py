"""The fault switch: injected latency, errors and score shifts per model and version.

An operational feature for chaos testing and demos — proving that the canary analysis
catches what it claims to catch, against the real service and real traffic. Off unless
the service runs with ``PIPELINE_SERVING_ADMIN_ENABLED=true`` and
``PIPELINE_SERVING_ADMIN_TOKEN`` (``A="Authorization: Bearer $TOKEN"`` below)::

    curl -X POST 127.0.0.1:8000/admin/faults -H "$A" -H 'content-type: application/json' \\
         -d '{"version": "3", "latency_ms": 200, "error_rate": 0.5, "score_shift": 0.3}'
    curl -X POST 127.0.0.1:8000/admin/faults -H "$A" -H 'content-type: application/json' \\
         -d '{"model": "digits", "version": "2", "error_rate": 1}'
    curl -H "$A" 127.0.0.1:8000/admin/faults                 # what is active, by model
    curl -H "$A" -X DELETE 127.0.0.1:8000/admin/faults/3     # one version (default model)
    curl -H "$A" -X DELETE '127.0.0.1:8000/admin/faults/2?model=digits'
    curl -H "$A" -X DELETE 127.0.0.1:8000/admin/faults       # clear all

``model`` is a model spec's name; left out, the service's default model
(``PIPELINE_MODEL``).

``latency_ms`` is added to every request the version answers (an ``asyncio`` sleep:
the event loop keeps serving others); ``error_rate`` is the share of its requests that
fail with 500 (counted as the version's errors); ``score_shift`` is added to its
positive-class probability (clipped to [0, 1]; multiclass: to every class's, then
renormalised). A fault lives in the process only (a restart clears it) and is visible
as ``scoring_fault_active{model, version}``, so an injected fault is never mistaken for
a real one.

Guard rails: the ``/admin`` routes do not exist unless enabled (404; off by default and
in every shipped config), and then answer only the admin bearer token (401 without it,
403 with another) — whatever the client's address or proxy headers say (see
:mod:`pipeline.serving.access`). The service refuses to start with admin on and no
strong token.
"""

from __future__ import annotations

import random
import threading
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class FaultSpec(BaseModel):
    """One version's injected fault (all parts optional; zero means off)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        default=None,
        pattern=r"^[a-z][a-z0-9_]{0,47}$",
        description="Model spec name; None: the service's default model.",
    )
    version: str = Field(pattern=r"^[0-9]+$", description="Model version the fault applies to.")
    latency_ms: float = Field(default=0.0, ge=0, le=60_000)
    error_rate: float = Field(default=0.0, ge=0, le=1)
    score_shift: float = Field(default=0.0, ge=-1, le=1)

    @property
    def active(self) -> bool:
        return bool(self.latency_ms or self.error_rate or self.score_shift)


class FaultSwitch:
    """Faults by (model, version); reads are lock-free (a dict replaced whole on each
    change). ``set`` needs the spec's ``model`` resolved (the service does that)."""

    def __init__(self, seed: int | None = None) -> None:
        self._faults: dict[tuple[str, str], FaultSpec] = {}
        self._lock = threading.Lock()
        self._rng = random.Random(seed)

    def get(self, model: str, version: str) -> FaultSpec | None:
        return self._faults.get((model, version))

    def set(self, spec: FaultSpec) -> None:
        if spec.model is None:
            raise ValueError("a fault needs its model")
        with self._lock:
            faults = dict(self._faults)
            if spec.active:
                faults[(spec.model, spec.version)] = spec
            else:
                faults.pop((spec.model, spec.version), None)
            self._faults = faults

    def clear(self, model: str | None = None, version: str | None = None) -> list[tuple[str, str]]:
        """Every fault (no arguments), a model's, or one version's of a model."""

        def hit(k: tuple[str, str]) -> bool:
            return (model is None or k[0] == model) and (version is None or k[1] == version)

        with self._lock:
            cleared = [k for k in self._faults if hit(k)]
            self._faults = {k: v for k, v in self._faults.items() if not hit(k)}
        return cleared

    def fails(self, spec: FaultSpec) -> bool:
        return spec.error_rate > 0 and self._rng.random() < spec.error_rate

    def keys(self) -> list[tuple[str, str]]:
        return sorted(self._faults)

    def for_model(self, model: str) -> dict[str, Any]:
        """``{version: fault}`` of one model."""
        return {v: s.model_dump() for (m, v), s in sorted(self._faults.items()) if m == model}

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """``{model: {version: fault}}``."""
        out: dict[str, dict[str, Any]] = {}
        for (m, v), s in sorted(self._faults.items()):
            out.setdefault(m, {})[v] = s.model_dump()
        return out
