"""The model specs, read at DAG-parse time: YAML and pydantic only, no I/O beyond the spec
files (``pipeline.spec``). One ``retrain_<name>`` and ``rollback_<name>`` per good spec;
``model_specs.py`` turns the broken ones into import errors that name file and field, so
one team's typo never hides another team's DAGs.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def _discovered() -> Any:
    from pipeline.spec import discover

    return discover()


def good_specs() -> list[Any]:
    found = _discovered()
    for path, message in found.errors:
        log.error("model spec %s is broken, its DAGs are not built: %s", path, message)
    return list(found.specs)


def spec_errors() -> list[tuple[Any, str]]:
    return list(_discovered().errors)


def POLICY_PARAMS(spec: Any) -> dict[str, dict[str, Any]]:  # noqa: N802 - reads as a table
    """Each policy/training Param's JSON schema: defaults and bounds from the spec."""
    from pipeline.spec import param_schema

    return param_schema(spec)


def policy_request(params: dict[str, Any]) -> dict[str, Any]:
    """The policy knobs a run set, as ``pipeline.spec.resolve_policy`` takes them."""
    from pipeline.spec import KNOBS

    return {k.param: params[k.param] for k in KNOBS if k.param in params}
