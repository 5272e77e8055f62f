"""The data contract: the one place that knows what the dataset looks like."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

ColumnType = Literal["float", "int", "category", "string", "timestamp", "bool"]
NUMERIC: tuple[str, ...] = ("float", "int", "bool")


class ContractError(ValueError):
    pass


@dataclass(frozen=True)
class Column:
    name: str
    type: ColumnType
    nullable: bool = False
    max_null_fraction: float = 0.0
    min: float | None = None
    max: float | None = None
    categories: tuple[str, ...] = ()
    unique: bool = False

    @property
    def is_numeric(self) -> bool:
        return self.type in NUMERIC

    @property
    def is_categorical(self) -> bool:
        return self.type == "category"


@dataclass(frozen=True)
class DataContract:
    name: str
    id_column: str
    time_column: str
    target: str
    target_values: tuple[int, ...]
    positive_label: int
    columns: tuple[Column, ...]
    min_rows: int = 1
    max_rows: int | None = None
    extra_expectations: tuple[dict[str, Any], ...] = field(default_factory=tuple)

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)

    @property
    def features(self) -> list[Column]:
        skip = {self.id_column, self.time_column, self.target}
        return [c for c in self.columns if c.name not in skip]

    @property
    def numeric_features(self) -> list[str]:
        return [c.name for c in self.features if c.is_numeric]

    @property
    def categorical_features(self) -> list[str]:
        return [c.name for c in self.features if c.is_categorical]

    @property
    def num_classes(self) -> int:
        return len(self.target_values)


def load_contract(path: str | Path) -> DataContract:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ContractError(f"data contract not found at {path}; set PIPELINE_CONTRACT_PATH") from None
    try:
        columns = tuple(
            Column(
                name=c["name"],
                type=c["type"],
                nullable=bool(c.get("nullable", c.get("max_null_fraction", 0) > 0)),
                max_null_fraction=float(c.get("max_null_fraction", 0.0)),
                min=c.get("min"),
                max=c.get("max"),
                categories=tuple(c.get("categories", ())),
                unique=bool(c.get("unique", False)),
            )
            for c in raw["columns"]
        )
        contract = DataContract(
            name=raw["name"],
            id_column=raw["id_column"],
            time_column=raw["time_column"],
            target=raw["target"]["name"],
            target_values=tuple(raw["target"]["values"]),
            positive_label=raw["target"].get("positive", raw["target"]["values"][-1]),
            columns=columns,
            min_rows=int(raw.get("row_count", {}).get("min", 1)),
            max_rows=raw.get("row_count", {}).get("max"),
            extra_expectations=tuple(raw.get("expectations", ())),
        )
    except (KeyError, TypeError) as exc:
        raise ContractError(f"{path}: malformed data contract, missing or bad field {exc}") from None
    names = contract.column_names
    for required in (contract.id_column, contract.time_column, contract.target):
        if required not in names:
            raise ContractError(f"{path}: column {required!r} is named but not declared")
    for c in columns:
        if c.type not in ("float", "int", "category", "string", "timestamp", "bool"):
            raise ContractError(f"{path}: column {c.name!r} has unknown type {c.type!r}")
        if c.is_categorical and not c.categories:
            raise ContractError(f"{path}: categorical column {c.name!r} lists no categories")
    return contract


def default_contract() -> DataContract:
    from pipeline.settings import get_settings

    return load_contract(get_settings().contract_path)
