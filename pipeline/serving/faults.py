"""The fault switch: injected latency, errors and score shifts per model version.

An operational feature for chaos testing and demos — proving that the canary analysis
catches what it claims to catch, against the real service and real traffic::

    curl -X POST 127.0.0.1:8000/admin/faults -H 'content-type: application/json' \\
         -d '{"version": "3", "latency_ms": 200, "error_rate": 0.5, "score_shift": 0.3}'
    curl 127.0.0.1:8000/admin/faults              # what is active
    curl -X DELETE 127.0.0.1:8000/admin/faults/3  # clear one version
    curl -X DELETE 127.0.0.1:8000/admin/faults    # clear all

``latency_ms`` is added to every request the version answers (an ``asyncio`` sleep:
the event loop keeps serving others); ``error_rate`` is the share of its requests that
fail with 500 (counted as the version's errors); ``score_shift`` is added to its
positive-class probability (clipped to [0, 1]). A fault lives in the process only
(a restart clears it) and is visible as ``scoring_fault_active{version}``, so an
injected fault is never mistaken for a real one.

Guard rails: the ``/admin`` routes answer only clients on the loopback interface (a
pod's own shell, or the tests and demo on one host) with 403 for anyone else, and
``PIPELINE_SERVING_ADMIN_ENABLED=false`` removes them (404).
"""

from __future__ import annotations

import random
import threading
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class FaultSpec(BaseModel):
    """One version's injected fault (all parts optional; zero means off)."""

    model_config = ConfigDict(extra="forbid")

    version: str = Field(pattern=r"^[0-9]+$", description="Model version the fault applies to.")
    latency_ms: float = Field(default=0.0, ge=0, le=60_000)
    error_rate: float = Field(default=0.0, ge=0, le=1)
    score_shift: float = Field(default=0.0, ge=-1, le=1)

    @property
    def active(self) -> bool:
        return bool(self.latency_ms or self.error_rate or self.score_shift)


class FaultSwitch:
    """Faults by version; reads are lock-free (a dict replaced whole on each change)."""

    def __init__(self, seed: int | None = None) -> None:
        self._faults: dict[str, FaultSpec] = {}
        self._lock = threading.Lock()
        self._rng = random.Random(seed)

    def get(self, version: str) -> FaultSpec | None:
        return self._faults.get(version)

    def set(self, spec: FaultSpec) -> None:
        with self._lock:
            faults = dict(self._faults)
            if spec.active:
                faults[spec.version] = spec
            else:
                faults.pop(spec.version, None)
            self._faults = faults

    def clear(self, version: str | None = None) -> list[str]:
        with self._lock:
            cleared = list(self._faults) if version is None else [v for v in self._faults if v == version]
            self._faults = {} if version is None else {k: v for k, v in self._faults.items() if k != version}
        return cleared

    def fails(self, spec: FaultSpec) -> bool:
        return spec.error_rate > 0 and self._rng.random() < spec.error_rate

    def to_dict(self) -> dict[str, Any]:
        return {v: s.model_dump() for v, s in sorted(self._faults.items())}
