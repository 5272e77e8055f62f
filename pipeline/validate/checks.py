"""The contract → checks translation: one list of checks, in report order, that both the
exact streaming pass and the Great Expectations suite are built from.

Pure: pandas and the contract only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from pipeline.contract import Column, DataContract
from pipeline.validate.report import MAX_NAME_CHARS, NO_LEAKAGE, SAFE_NAMES, TYPE_CHECK

_INTS = [
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "Int8Dtype",
    "Int16Dtype",
    "Int32Dtype",
    "Int64Dtype",
]
_GX_TYPES: dict[str, list[str]] = {
    "int": _INTS,
    "float": ["float16", "float32", "float64", "Float32Dtype", "Float64Dtype", *_INTS],
    "bool": ["bool", "BooleanDtype"],
    "category": ["str"],
    "string": ["str"],
    "timestamp": ["datetime64[ns]", "datetime64[us]", "datetime64[ms]", "datetime64[s]"],
}


@dataclass(frozen=True)
class ContractCheck:
    """One expectation of the contract: a GX expectation type (or one of ours) and kwargs."""

    expectation: str
    column: str | None
    kwargs: dict[str, Any]
    gx: bool = True  # part of the GX suite
    exact: bool = True  # computed exactly by the streaming pass


def contract_checks(contract: DataContract, now: pd.Timestamp) -> list[ContractCheck]:
    """Every check ``contract`` implies, in report order; ``now`` bounds event times."""
    checks = [
        # never below 1: map expectations pass vacuously on an empty batch
        ContractCheck(
            "expect_table_row_count_to_be_between",
            None,
            {"min_value": max(1, contract.min_rows), "max_value": contract.max_rows},
        ),
        ContractCheck(SAFE_NAMES, None, {"max_chars": MAX_NAME_CHARS}, gx=False),
    ]
    features = {c.name for c in contract.features}
    for col in contract.columns:
        checks += _column_checks(col, is_feature=col.name in features)
    checks.append(
        ContractCheck(
            "expect_column_values_to_be_in_set",
            contract.target,
            {"value_set": list(contract.target_values)},
        )
    )
    if contract.time_column is not None:  # else no time checks (the report says so)
        checks.append(
            ContractCheck(
                "expect_column_values_to_be_between",
                contract.time_column,
                {"max_value": pd.Timestamp(now)},
            )
        )
    checks += _leakage_checks(contract)
    checks += _user_checks(contract)
    return checks


def _column_checks(col: Column, is_feature: bool) -> list[ContractCheck]:
    """What the contract says about one declared column."""
    name = col.name
    checks = [
        ContractCheck("expect_column_to_exist", name, {}),
        ContractCheck(TYPE_CHECK, name, {"type_list": _GX_TYPES[col.type]}),
    ]
    if col.max_null_fraction > 0:
        mostly = round(1.0 - col.max_null_fraction, 10)
        checks.append(
            ContractCheck("expect_column_values_to_not_be_null", name, {"mostly": mostly})
        )
    elif not col.nullable:
        checks.append(ContractCheck("expect_column_values_to_not_be_null", name, {}))
    if col.is_numeric and (col.min is not None or col.max is not None):
        checks.append(
            ContractCheck(
                "expect_column_values_to_be_between",
                name,
                {"min_value": col.min, "max_value": col.max},
            )
        )
    if col.is_categorical:
        checks.append(
            ContractCheck(
                "expect_column_values_to_be_in_set", name, {"value_set": list(col.categories)}
            )
        )
    if col.unique:
        checks.append(ContractCheck("expect_column_values_to_be_unique", name, {}))
    if is_feature:
        checks.append(
            ContractCheck("expect_column_unique_value_count_to_be_between", name, {"min_value": 2})
        )
    return checks


def _leakage_checks(contract: DataContract) -> list[ContractCheck]:
    """One leakage check per numeric or categorical feature (computed, not part of GX)."""
    leakage = {
        "target": contract.target,
        "max_auc": contract.leakage_max_auc,
        "min_rows": contract.leakage_min_rows,
        "reference_auc": contract.leakage_reference_auc,
        "max_rise": contract.leakage_max_rise,
    }
    return [
        ContractCheck(NO_LEAKAGE, col.name, dict(leakage), gx=False)
        for col in contract.features
        if col.is_numeric or col.is_categorical
    ]


def _user_checks(contract: DataContract) -> list[ContractCheck]:
    """The contract's own ``expectations``: GX only (no exact twin)."""
    checks = []
    for i, spec in enumerate(contract.extra_expectations):
        try:
            name, kwargs = spec["type"], dict(spec.get("kwargs", {}))
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"contract expectation #{i} must look like {{type: ..., kwargs: {{...}}}}, "
                f"got {spec!r}"
            ) from None
        checks.append(ContractCheck(name, kwargs.get("column"), kwargs, gx=True, exact=False))
    return checks
