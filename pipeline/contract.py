"""The data contract: the one place that knows what the dataset looks like."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

ColumnType = Literal["float", "int", "category", "string", "timestamp", "bool"]
NUMERIC: tuple[str, ...] = ("float", "int", "bool")
#: Drift methods a column may name in its ``drift: {method: ..., threshold: ...}`` entry
#: (Evidently's names; see :mod:`pipeline.drift`). Distances drift when the score is >= the
#: threshold; p-value tests (``ks``, ``chisquare``, ``z``) when p is below it.
DRIFT_METHODS: tuple[str, ...] = ("wasserstein", "jensenshannon", "psi", "ks", "chisquare", "z")
#: Keys of the contract's ``leakage:`` section (see :class:`DataContract`).
LEAKAGE_KEYS: tuple[str, ...] = ("max_auc", "min_rows", "reference_auc", "max_rise")


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
    drift_method: str | None = None  # None: Evidently's default choice for the column
    drift_threshold: float | None = None  # None: the method's default threshold

    @property
    def is_numeric(self) -> bool:
        return self.type in NUMERIC

    @property
    def is_categorical(self) -> bool:
        return self.type == "category"


@dataclass(frozen=True)
class DataContract:
    name: str
    id_column: str | None  # None: rows have no id; the holdout split hashes each row's values
    time_column: str | None  # None: the data has no event time; time checks are skipped
    target: str
    target_values: tuple[int, ...]
    positive_label: int
    columns: tuple[Column, ...]
    min_rows: int = 1
    max_rows: int | None = None
    extra_expectations: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    drift_share: float = 0.3  # dataset drift when the share of drifted features reaches this
    # Label leakage (pipeline.validate): "new predictive power that was not there".
    # With a reference (the champion's training snapshot): a feature leaks when its
    # univariate AUC on the batch reaches ``leakage_reference_auc`` AND rose by more than
    # ``leakage_max_rise`` above its AUC on the reference.
    leakage_reference_auc: float = 0.95
    leakage_max_rise: float = 0.10
    # Without a reference (no champion yet): a feature leaks when its AUC reaches
    # ``leakage_max_auc`` on a sample of at least ``leakage_min_rows`` rows (fewer: skipped).
    leakage_max_auc: float = 0.999
    leakage_min_rows: int = 1000

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
        skip = {c for c in (self.id_column, self.target) if c is not None}
        if self.time_column is not None:
            skip.add(self.time_column)
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
        raise ContractError(
            f"data contract not found at {path}; check the model spec's contract field"
        ) from None
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
                drift_method=(c.get("drift") or {}).get("method"),
                drift_threshold=_opt_float((c.get("drift") or {}).get("threshold")),
            )
            for c in raw["columns"]
        )
        leakage = raw.get("leakage") or {}
        if not isinstance(leakage, dict):
            raise ContractError(f"{path}: leakage must be a mapping, got {leakage!r}")
        unknown = sorted(set(leakage) - set(LEAKAGE_KEYS))
        if unknown:
            raise ContractError(
                f"{path}: leakage has unknown keys {unknown}; known: {list(LEAKAGE_KEYS)}"
            )
        contract = DataContract(
            name=raw["name"],
            id_column=raw.get("id_column"),
            time_column=raw.get("time_column"),
            target=raw["target"]["name"],
            target_values=tuple(raw["target"]["values"]),
            positive_label=raw["target"].get("positive", raw["target"]["values"][-1]),
            columns=columns,
            min_rows=int(raw.get("row_count", {}).get("min", 1)),
            max_rows=raw.get("row_count", {}).get("max"),
            extra_expectations=tuple(raw.get("expectations", ())),
            drift_share=float((raw.get("drift") or {}).get("share", 0.3)),
            leakage_reference_auc=_leak_float(path, leakage, "reference_auc", 0.95),
            leakage_max_rise=_leak_float(path, leakage, "max_rise", 0.10),
            leakage_max_auc=_leak_float(path, leakage, "max_auc", 0.999),
            leakage_min_rows=_leak_int(path, leakage, "min_rows", 1000),
        )
    except ContractError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ContractError(
            f"{path}: malformed data contract, missing or bad field {exc}"
        ) from None
    names = contract.column_names
    if contract.id_column is not None and (
        not isinstance(contract.id_column, str) or not contract.id_column
    ):
        raise ContractError(
            f"{path}: id_column must name a column or be left out, got {contract.id_column!r}"
        )
    if contract.time_column is not None and (
        not isinstance(contract.time_column, str) or not contract.time_column
    ):
        raise ContractError(
            f"{path}: time_column must name a column or be left out, got {contract.time_column!r}"
        )
    for required in (contract.id_column, contract.time_column, contract.target):
        if required is not None and required not in names:
            raise ContractError(f"{path}: column {required!r} is named but not declared")
    if (
        contract.time_column is not None
        and contract.column(contract.time_column).type != "timestamp"
    ):
        raise ContractError(
            f"{path}: time_column {contract.time_column!r} must be declared with type timestamp, "
            f"got {contract.column(contract.time_column).type!r}"
        )
    for c in columns:
        if c.type not in ("float", "int", "category", "string", "timestamp", "bool"):
            raise ContractError(f"{path}: column {c.name!r} has unknown type {c.type!r}")
        if c.is_categorical and not c.categories:
            raise ContractError(f"{path}: categorical column {c.name!r} lists no categories")
        if not 0.0 <= c.max_null_fraction < 1.0:
            raise ContractError(
                f"{path}: column {c.name!r} max_null_fraction must be in [0, 1), "
                f"got {c.max_null_fraction}"
            )
        if c.min is not None and c.max is not None and c.min > c.max:
            raise ContractError(f"{path}: column {c.name!r} has min {c.min} > max {c.max}")
        if c.drift_method is not None and c.drift_method not in DRIFT_METHODS:
            raise ContractError(
                f"{path}: column {c.name!r} drift method {c.drift_method!r} is not one of "
                f"{list(DRIFT_METHODS)}"
            )
        if c.drift_threshold is not None and not c.drift_threshold > 0:
            raise ContractError(
                f"{path}: column {c.name!r} drift threshold must be > 0, got {c.drift_threshold}"
            )
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise ContractError(f"{path}: columns declared more than once: {dupes}")
    if not 0.0 < contract.drift_share <= 1.0:
        raise ContractError(f"{path}: drift.share must be in (0, 1], got {contract.drift_share}")
    if not 0.5 < contract.leakage_max_auc <= 1.0:
        raise ContractError(
            f"{path}: leakage.max_auc must be in (0.5, 1], got {contract.leakage_max_auc}"
        )
    if not 0.5 < contract.leakage_reference_auc <= 1.0:
        raise ContractError(
            f"{path}: leakage.reference_auc must be in (0.5, 1], got {contract.leakage_reference_auc}"
        )
    if not 0.0 <= contract.leakage_max_rise < 0.5:
        raise ContractError(
            f"{path}: leakage.max_rise must be in [0, 0.5), got {contract.leakage_max_rise}"
        )
    if contract.leakage_min_rows < 2:
        raise ContractError(
            f"{path}: leakage.min_rows must be an integer >= 2, got {contract.leakage_min_rows}"
        )
    if contract.max_rows is not None and contract.max_rows < contract.min_rows:
        raise ContractError(
            f"{path}: row_count max {contract.max_rows} is below min {contract.min_rows}"
        )
    return contract


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _leak_float(path: Path, section: dict[str, Any], key: str, default: float) -> float:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ContractError(f"{path}: leakage.{key} must be a number, got {value!r}")
    return float(value)


def _leak_int(path: Path, section: dict[str, Any], key: str, default: int) -> int:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ContractError(f"{path}: leakage.{key} must be an integer, got {value!r}")
    return value


def default_contract() -> DataContract:
    """The active model's contract (``pipeline.spec.active``: the spec a task or command
    acts on, else ``PIPELINE_MODEL``)."""
    from pipeline.spec import active

    return active().contract_obj()
