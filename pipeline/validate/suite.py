"""The Great Expectations side: the suite built from the contract's checks, and its run on
the bounded sample.

The only module of the package that imports ``great_expectations``, and only inside the
functions: it takes seconds to import.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import pandas as pd

from pipeline.contract import DataContract
from pipeline.validate.checks import ContractCheck, contract_checks
from pipeline.validate.report import PARTIAL_UNEXPECTED, ExpectationResult, jsonable, with_changes

if TYPE_CHECKING:
    from great_expectations.core.expectation_suite import ExpectationSuite


def _expectation(name: str, meta: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    from great_expectations.expectations.registry import get_expectation_impl

    try:
        cls = get_expectation_impl(name)
    except Exception as exc:  # ExpectationNotFoundError
        raise ValueError(f"unknown Great Expectations expectation {name!r}") from exc
    try:
        return cls(**kwargs, meta=meta)
    except Exception as exc:  # pydantic validation error on bad kwargs
        raise ValueError(f"bad arguments for {name} {kwargs!r}: {exc}") from exc


def _suite(checks: list[ContractCheck], name: str) -> ExpectationSuite:
    import great_expectations as gx

    expectations = []
    for i, c in enumerate(checks):
        if not c.gx:
            continue
        kwargs = {k: v for k, v in c.kwargs.items() if v is not None}
        if c.column is not None:
            kwargs["column"] = c.column
        expectations.append(_expectation(c.expectation, meta={"check": i}, **kwargs))
    # Passed to the constructor, not via suite.add_expectation(), which needs an active context.
    return gx.ExpectationSuite(name=name, expectations=expectations)


def build_suite(contract: DataContract, now: pd.Timestamp) -> ExpectationSuite:
    """The GX expectation suite a batch must satisfy under ``contract``.

    ``now`` bounds the time column from above (no events in the future); it is a
    parameter so validation is deterministic. Extra columns in a batch are allowed.
    """
    return _suite(contract_checks(contract, now), f"{contract.name}_contract")


def run_gx(
    checks: list[ContractCheck], sample: pd.DataFrame, now: pd.Timestamp, name: str
) -> dict[int, ExpectationResult]:
    """GX results on ``sample`` by check index; a GX crash becomes failed checks.

    Generated expectations run with ``BOOLEAN_ONLY`` results (their counts come from the
    exact pass; GX only cross-checks), user expectations with ``SUMMARY``."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    gx_checks = [
        ContractCheck(c.expectation, c.column, _gx_kwargs(c, now), c.gx, c.exact) if c.gx else c
        for c in checks
    ]
    out: dict[int, ExpectationResult] = {}
    try:
        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        asset = context.data_sources.add_pandas("contract_batch").add_dataframe_asset("frame")
        batch = asset.add_batch_definition_whole_dataframe("whole").get_batch(
            batch_parameters={"dataframe": sample}
        )
        for exact, result_format in (
            (True, {"result_format": "BOOLEAN_ONLY"}),
            (False, {"result_format": "SUMMARY", "partial_unexpected_count": PARTIAL_UNEXPECTED}),
        ):
            part = [c if c.exact == exact else dataclasses.replace(c, gx=False) for c in gx_checks]
            if not any(c.gx for c in part):
                continue
            gx_result = batch.validate(
                _suite(part, f"{name}_contract"), result_format=result_format
            )
            for r in gx_result.results:
                i = ((r.expectation_config and r.expectation_config.meta) or {}).get("check")
                if i is not None:
                    expected = {k: v for k, v in checks[int(i)].kwargs.items() if v is not None}
                    out[int(i)] = with_changes(_convert(r), expected=jsonable(expected))
    except Exception as exc:  # noqa: BLE001 - reported, never raised
        message = f"Great Expectations failed: {type(exc).__name__}: {exc}"
        return {
            i: ExpectationResult(
                c.expectation, c.column, False, {"error": message}, jsonable(c.kwargs), "gx"
            )
            for i, c in enumerate(checks)
            if c.gx
        }
    return out


def _gx_kwargs(check: ContractCheck, now: pd.Timestamp) -> dict[str, Any]:
    """GX sees naive UTC times (it cannot type tz-aware columns), so ``now`` is made naive."""
    kw = dict(check.kwargs)
    for k, v in kw.items():
        if isinstance(v, pd.Timestamp) and v.tzinfo is not None:
            kw[k] = v.tz_convert("UTC").tz_localize(None)
    return kw


def _convert(result: Any) -> ExpectationResult:
    config = result.expectation_config
    kwargs = {k: v for k, v in dict(config.kwargs).items() if k != "batch_id" and v is not None}
    column = kwargs.pop("column", None)
    return ExpectationResult(
        expectation=str(config.type),
        column=column,
        success=bool(result.success),
        observed=_observed(result),
        expected=jsonable(kwargs),
    )


def _exception_message(info: Any) -> str | None:
    if not isinstance(info, dict):
        return None
    if info.get("raised_exception"):
        return str(info.get("exception_message"))
    for value in info.values():
        if isinstance(value, dict) and value.get("raised_exception"):
            return str(value.get("exception_message"))
    return None


def _observed(result: Any) -> dict[str, Any]:
    error = _exception_message(getattr(result, "exception_info", None))
    if error is not None:
        return {"error": error}
    res = dict(result.result or {})
    out: dict[str, Any] = {}
    if "observed_value" in res:
        out["observed_value"] = res["observed_value"]
    for key in ("element_count", "unexpected_count", "unexpected_percent", "missing_count"):
        if key in res:
            out[key] = res[key]
    if "partial_unexpected_list" in res:
        out["partial_unexpected_list"] = list(res["partial_unexpected_list"])[:PARTIAL_UNEXPECTED]
    if str(result.expectation_config.type) == "expect_column_to_exist":
        out["exists"] = bool(result.success)
    return jsonable(out)
