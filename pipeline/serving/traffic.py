"""Who serves, as the registry says: aliases and the canary traffic weight.

The weight lives on each registered model as the tag ``canary.weight`` (a number in
[0, 1]), beside the aliases it qualifies, so one ``get_registered_model`` call gives
the service a consistent view of both — per model: every function takes the registered
model's name (default: the active spec's, ``pipeline.registry.model_name()``). Only the canary rollout, a rollback and an
operator write it. These helpers sit beside ``pipeline.registry`` (which owns the
compare-and-set of ``champion``) and use its client.

Routing is a pure function of the weight and a bucket in [0, 1): a request with a
routing key gets the bucket of the key's hash, so the same key always lands on the
same side and, as the weight grows, a key on the canary stays there.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

CANARY = "canary"
WEIGHT_TAG = "canary.weight"


@dataclass(frozen=True)
class ServingState:
    """What the registry says should serve."""

    champion: str | None
    canary: str | None
    weight: float


def parse_weight(raw: str | None) -> float:
    """A stored weight; anything unreadable or out of range reads as 0 (no canary traffic)."""
    try:
        w = float(raw) if raw is not None else 0.0
    except ValueError:
        return 0.0
    return w if 0.0 <= w <= 1.0 else 0.0


def _name(model_name: str | None) -> str:
    if model_name:
        return model_name
    from pipeline.registry import model_name as active_model_name

    return active_model_name()


def read_state(model_name: str | None = None) -> ServingState:
    """What should serve ``model_name`` (a registered model; default: the active spec's).
    A registered model that does not exist yet has nothing to serve (not an error)."""
    from mlflow.exceptions import MlflowException

    from pipeline.registry import CHAMPION, client

    try:
        rm = client().get_registered_model(_name(model_name))
    except MlflowException as exc:
        if getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
            return ServingState(None, None, 0.0)
        raise
    aliases = {str(k): str(v) for k, v in (rm.aliases or {}).items()}
    return ServingState(
        aliases.get(CHAMPION), aliases.get(CANARY), parse_weight(rm.tags.get(WEIGHT_TAG))
    )


def set_canary_weight(weight: float, model_name: str | None = None) -> None:
    from pipeline.registry import client

    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"canary weight must be in [0, 1], got {weight}")
    client().set_registered_model_tag(_name(model_name), WEIGHT_TAG, f"{weight:g}")


def canary_weight(model_name: str | None = None) -> float:
    from pipeline.registry import client

    return parse_weight(client().get_registered_model(_name(model_name)).tags.get(WEIGHT_TAG))


def bucket(key: str | None) -> float:
    """[0, 1): from the key's hash when given (sticky), else random."""
    if not key:
        return random.random()
    h = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


def goes_to_canary(weight: float, key: str | None) -> bool:
    if weight <= 0.0:
        return False
    if weight >= 1.0:
        return True
    return bucket(key) < weight
