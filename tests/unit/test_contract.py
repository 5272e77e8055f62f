"""The data contract: the shipped file loads, extensions parse, bad contracts are refused."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline.contract import DRIFT_METHODS, ContractError, DataContract, load_contract
from pipeline.validate import contract_checks

CONTRACT_PATH = Path(__file__).resolve().parents[2] / "contracts" / "transactions.yaml"


def raw() -> dict:
    return yaml.safe_load(CONTRACT_PATH.read_text())


def write(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "contract.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_shipped_contract_loads(contract: DataContract) -> None:
    assert contract.target == "is_fraud" and contract.target_values == (0, 1)
    assert contract.drift_share == 0.3 and contract.leakage_max_auc == 0.99
    assert contract.id_column not in [c.name for c in contract.features]
    assert contract.column("amount").drift_method is None  # Evidently's default choice
    assert set(contract.categorical_features) == {"merchant_category", "channel", "country"}


def test_column_drift_settings_parse(tmp_path: Path) -> None:
    doc = raw()
    amount = next(c for c in doc["columns"] if c["name"] == "amount")
    amount["drift"] = {"method": "psi", "threshold": 0.2}
    doc["drift"] = {"share": 0.5}
    doc["leakage"] = {"max_auc": 0.97}
    c = load_contract(write(tmp_path, doc))
    assert (c.column("amount").drift_method, c.column("amount").drift_threshold) == ("psi", 0.2)
    assert c.drift_share == 0.5 and c.leakage_max_auc == 0.97


def test_contract_without_new_sections_keeps_defaults(tmp_path: Path) -> None:
    doc = raw()
    doc.pop("drift"), doc.pop("leakage")
    c = load_contract(write(tmp_path, doc))
    assert c.drift_share == 0.3 and c.leakage_max_auc == 0.99


def _set(doc: dict, column: str, **fields) -> dict:
    next(c for c in doc["columns"] if c["name"] == column).update(fields)
    return doc


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: _set(d, "amount", drift={"method": "magic"}), "drift method 'magic'"),
        (lambda d: _set(d, "amount", drift={"method": "psi", "threshold": -1}), "threshold must be > 0"),
        (lambda d: _set(d, "amount", min=10, max=1), "min 10 > max 1"),
        (lambda d: _set(d, "amount", max_null_fraction=1.5), "max_null_fraction"),
        (lambda d: _set(d, "channel", categories=[]), "lists no categories"),
        (lambda d: _set(d, "amount", type="decimal"), "unknown type"),
        (lambda d: {**d, "columns": d["columns"] + [d["columns"][2]]}, "more than once"),
        (lambda d: {**d, "drift": {"share": 0}}, "drift.share"),
        (lambda d: {**d, "leakage": {"max_auc": 0.4}}, "leakage.max_auc"),
        (lambda d: {**d, "row_count": {"min": 10, "max": 5}}, "below min"),
        (lambda d: {**d, "target": {"name": "nope", "values": [0, 1]}}, "'nope' is named but not declared"),
        (lambda d: {k: v for k, v in d.items() if k != "id_column"}, "missing or bad field"),
    ],
)  # fmt: skip
def test_bad_contracts_are_refused(tmp_path: Path, mutate, match: str) -> None:
    with pytest.raises(ContractError, match=match):
        load_contract(write(tmp_path, mutate(raw())))


def test_missing_contract_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ContractError, match="PIPELINE_CONTRACT_PATH"):
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
