"""The data contract: the shipped file loads, extensions parse, bad contracts are refused."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline.contract import DRIFT_METHODS, ContractError, DataContract, load_contract
from pipeline.validate import contract_checks

CONTRACT_PATH = Path(__file__).resolve().parents[2] / "models" / "card_fraud" / "contract.yaml"


def raw() -> dict:
    return yaml.safe_load(CONTRACT_PATH.read_text())


def write(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "contract.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_shipped_contract_loads(contract: DataContract) -> None:
    assert contract.target == "is_fraud" and contract.target_values == (0, 1)
    assert contract.drift_share == 0.3 and contract.leakage_max_auc == 0.999
    assert contract.id_column not in [c.name for c in contract.features]
    assert contract.column("amount").drift_method is None  # Evidently's default choice
    assert set(contract.categorical_features) == {"merchant_category", "channel", "country"}


def test_column_drift_settings_parse(tmp_path: Path) -> None:
    doc = raw()
    amount = next(c for c in doc["columns"] if c["name"] == "amount")
    amount["drift"] = {"method": "psi", "threshold": 0.2}
    doc["drift"] = {"share": 0.5}
    doc["leakage"] = {"max_auc": 0.97, "min_rows": 50, "reference_auc": 0.9, "max_rise": 0.2}
    c = load_contract(write(tmp_path, doc))
    assert (c.column("amount").drift_method, c.column("amount").drift_threshold) == ("psi", 0.2)
    assert c.drift_share == 0.5 and c.leakage_max_auc == 0.97
    assert (c.leakage_min_rows, c.leakage_reference_auc, c.leakage_max_rise) == (50, 0.9, 0.2)


@pytest.mark.parametrize("leakage", [None, {}, {"max_auc": 0.999}])
def test_contract_without_new_sections_keeps_defaults(tmp_path: Path, leakage) -> None:
    doc = raw()
    doc.pop("drift"), doc.pop("leakage")
    if leakage is not None:
        doc["leakage"] = leakage
    c = load_contract(write(tmp_path, doc))
    # leakage without a reference: AUC >= 0.999 on >= 1000 rows; with one: AUC >= 0.95 and
    # more than 0.10 above the reference's
    assert c.drift_share == 0.3 and c.leakage_max_auc == 0.999 and c.leakage_min_rows == 1000
    assert c.leakage_reference_auc == 0.95 and c.leakage_max_rise == 0.10


@pytest.mark.parametrize("how", ["absent", "null"])
def test_time_column_is_optional(tmp_path: Path, how: str) -> None:
    doc = raw()
    if how == "absent":
        doc.pop("time_column")
    else:
        doc["time_column"] = None
    c = load_contract(write(tmp_path, doc))
    assert c.time_column is None
    # still declared, so now an ordinary (non-feature: not numeric, not categorical) column
    assert "event_time" in c.column_names
    checks = contract_checks(c, pd.Timestamp("2026-06-01", tz="UTC"))
    assert not any(isinstance(k.kwargs.get("max_value"), pd.Timestamp) for k in checks)


def test_time_column_when_present_is_not_a_feature(contract: DataContract) -> None:
    assert contract.time_column == "event_time"
    assert contract.time_column not in [c.name for c in contract.features]
    checks = contract_checks(contract, pd.Timestamp("2026-06-01", tz="UTC"))
    (future,) = [k for k in checks if isinstance(k.kwargs.get("max_value"), pd.Timestamp)]
    assert future.column == "event_time"


def _set(doc: dict, column: str, **fields) -> dict:
    next(c for c in doc["columns"] if c["name"] == column).update(fields)
    return doc


def test_a_contract_without_an_id_column_loads(tmp_path: Path) -> None:
    c = load_contract(write(tmp_path, {k: v for k, v in raw().items() if k != "id_column"}))
    assert c.id_column is None and c.target not in [f.name for f in c.features]


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: _set(d, "amount", drift={"method": "magic"}), "drift method 'magic'"),
        (
            lambda d: _set(d, "amount", drift={"method": "psi", "threshold": -1}),
            "threshold must be > 0",
        ),
        (lambda d: _set(d, "amount", min=10, max=1), "min 10 > max 1"),
        (lambda d: _set(d, "amount", max_null_fraction=1.5), "max_null_fraction"),
        (lambda d: _set(d, "channel", categories=[]), "lists no categories"),
        (lambda d: _set(d, "amount", type="decimal"), "unknown type"),
        (lambda d: {**d, "columns": d["columns"] + [d["columns"][2]]}, "more than once"),
        (lambda d: {**d, "drift": {"share": 0}}, "drift.share"),
        (lambda d: {**d, "leakage": {"max_auc": 0.4}}, "leakage.max_auc"),
        (lambda d: {**d, "leakage": {"max_auc": "high"}}, "leakage.max_auc must be a number"),
        (lambda d: {**d, "leakage": {"min_rows": 1}}, "leakage.min_rows"),
        (lambda d: {**d, "leakage": {"min_rows": 10.5}}, "leakage.min_rows must be an integer"),
        (lambda d: {**d, "leakage": {"reference_auc": 1.5}}, "leakage.reference_auc"),
        (lambda d: {**d, "leakage": {"max_rise": -0.1}}, "leakage.max_rise"),
        (lambda d: {**d, "leakage": {"max_rise": True}}, "leakage.max_rise must be a number"),
        (lambda d: {**d, "leakage": {"max_auk": 0.9}}, "unknown keys \\['max_auk'\\]"),
        (lambda d: {**d, "leakage": [0.9]}, "leakage must be a mapping"),
        (lambda d: {**d, "time_column": "nope"}, "'nope' is named but not declared"),
        (lambda d: {**d, "time_column": "amount"}, "must be declared with type timestamp"),
        (lambda d: {**d, "time_column": ""}, "time_column must name a column"),
        (lambda d: {**d, "id_column": ""}, "id_column must name a column or be left out"),
        (lambda d: {**d, "id_column": "nope"}, "'nope' is named but not declared"),
        (lambda d: {**d, "row_count": {"min": 10, "max": 5}}, "below min"),
        (
            lambda d: {**d, "target": {"name": "nope", "values": [0, 1]}},
            "'nope' is named but not declared",
        ),
        (lambda d: {k: v for k, v in d.items() if k != "target"}, "missing or bad field"),
    ],
)
def test_bad_contracts_are_refused(tmp_path: Path, mutate, match: str) -> None:
    with pytest.raises(ContractError, match=match):
        load_contract(write(tmp_path, mutate(raw())))


def test_missing_contract_names_the_spec_field(tmp_path: Path) -> None:
    with pytest.raises(ContractError, match="not found at .*contract field"):
        load_contract(tmp_path / "absent.yaml")


def test_every_column_gets_its_checks(contract: DataContract) -> None:
    checks = contract_checks(contract, pd.Timestamp("2026-06-01", tz="UTC"))
    kinds = {(c.expectation, c.column) for c in checks}
    for col in contract.columns:
        assert ("expect_column_to_exist", col.name) in kinds
        assert ("expect_column_values_to_be_in_type_list", col.name) in kinds
    for col in contract.features:
        assert ("expect_column_unique_value_count_to_be_between", col.name) in kinds
        assert ("expect_column_to_not_predict_target_alone", col.name) in kinds
    assert ("expect_column_values_to_be_unique", contract.id_column) in kinds
    assert ("expect_column_values_to_be_in_set", contract.target) in kinds
    assert set(DRIFT_METHODS) == {"wasserstein", "jensenshannon", "psi", "ks", "chisquare", "z"}
