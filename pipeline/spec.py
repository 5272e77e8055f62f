"""Model specs: one YAML file per model (``models/<name>/model.yaml``), owned by its team.

A spec names the registered model, the data contract, the task, the ``nn.Module``
factory and the training budget, the primary metric, and the whole policy: retrain
triggers, gate floors and margins, slices, budgets, approval, canary, schedule, landing
prefix, allowed sources and the trusted evaluation set. It is the single source of every
threshold: DAG Params and CLI flags take their defaults and bounds from it
(:func:`param_schema`) and may only tighten it (:func:`resolve_policy`).

Only PyYAML and pydantic are imported here, so ``dags/`` can build one DAG per spec at
parse time without torch, pandas or MLflow. Nothing touches the file system on import.

The smallest spec::

    contract: contract.yaml      # relative to this file
    task: multiclass             # or binary

Everything else has a default that makes sense for a contract never seen before (the
built-in MLP, the primary metric ``roc_auc`` for binary and ``accuracy`` for multiclass,
no slices, no approval, no canary, the model's asset as schedule).
"""

from __future__ import annotations

import contextvars
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import PipelineRejection

if TYPE_CHECKING:
    from pipeline.contract import DataContract

SPEC_FILE = "model.yaml"
NAME_PATTERN = r"^[a-z][a-z0-9_]{0,47}$"
#: metric -> +1 higher is better, -1 lower is better (same table as pipeline.metrics.DIRECTION,
#: repeated here so reading a spec imports no numpy).
METRICS: dict[str, int] = {"roc_auc": 1, "pr_auc": 1, "accuracy": 1, "log_loss": -1, "brier": -1}
#: what each task can be judged on (regression adds its own row: rmse, mae, ...)
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "binary": ("roc_auc", "pr_auc", "accuracy", "log_loss", "brier"),
    "multiclass": ("roc_auc", "accuracy", "log_loss", "brier"),
}
#: metrics the paired bootstrap can compare (the gate's primary metric must be one)
GATE_METRICS = ("roc_auc", "accuracy", "log_loss", "brier")
DEFAULT_PRIMARY = {"binary": "roc_auc", "multiclass": "accuracy"}


class SpecError(ValueError):
    """A spec that cannot be used; the message names the file, the field, the value and
    what is allowed."""


class PolicyViolation(PipelineRejection):
    """A run asked for a looser policy than its spec allows (deterministic: not retried)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskSpec(_Strict):
    type: Literal["binary", "multiclass"]  # "regression" slots in here with its own metrics


class FactorySpec(_Strict):
    """``module:callable`` returning an ``nn.Module`` (float batch -> logits), and its kwargs.

    The module is a file next to the spec (``net:build`` is ``models/<name>/net.py``) or an
    importable module (``pipeline.train.model:mlp``, the built-in MLP)."""

    factory: str = Field(
        default="pipeline.train.model:mlp",
        pattern=r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$",
    )
    kwargs: dict[str, Any] = Field(default_factory=dict)


class StopperSpec(_Strict):
    """Which stopping rule, and keyword overrides for ``GradientPlateauStopper``."""

    preset: Literal["gradient_plateau", "val_patience", "none"] = "gradient_plateau"
    options: dict[str, float | int | bool | str | None] = Field(default_factory=dict)


class TrainingSpec(_Strict):
    optimizer: Literal["adamw", "sgd"] = "adamw"
    learning_rate: float = Field(default=3e-3, gt=0, le=1)
    batch_size: int = Field(default=512, ge=2, le=1_000_000)
    max_epochs: int = Field(
        default=30, ge=1, le=10_000, description="the budget: a run may ask fewer"
    )
    weight_decay: float = Field(default=1e-4, ge=0, le=1)
    val_fraction: float = Field(default=0.2, gt=0, lt=0.9)
    seed: int = 0
    stopper: StopperSpec = Field(default_factory=StopperSpec)


class MetricsSpec(_Strict):
    primary: str | None = None  # None: roc_auc (binary) / accuracy (multiclass)
    report: list[str] = Field(default_factory=list)

    @field_validator("primary")
    @classmethod
    def _known(cls, v: str | None) -> str | None:
        if v is not None and v not in METRICS:
            raise ValueError(f"unknown metric {v!r}; allowed: {sorted(METRICS)}")
        return v


class RetrainSpec(_Strict):
    drift_share: float | None = Field(
        default=None, gt=0, le=1, description="None: the contract's drift.share"
    )
    decay_margin: float = Field(default=0.03, ge=0, le=1)
    max_model_age_days: float = Field(default=30.0, gt=0)


class GateSpec(_Strict):
    floors: dict[str, float] = Field(
        default_factory=dict, description="per metric; empty: the primary metric's default floor"
    )
    margin: float = Field(default=0.005, ge=0, le=1)
    improvement: Literal["absolute", "relative"] = "absolute"
    non_inferiority_margin: float | None = Field(default=None, ge=0, le=0.5)
    slices: list[str] = Field(default_factory=list, max_length=20)
    max_checkpoint_mb: float | None = Field(default=50.0, gt=0, le=100_000)
    max_latency_p95_ms: float | None = Field(default=250.0, gt=0, le=600_000)
    require_approval: bool = False
    approval_timeout_hours: float = Field(
        default=72.0,
        gt=0,
        le=24 * 30,
        description="no answer to the approval within this many hours counts as Reject",
    )
    resamples: int = Field(default=1000, ge=100, le=100_000)

    @field_validator("floors")
    @classmethod
    def _floor_metrics(cls, v: dict[str, float]) -> dict[str, float]:
        for k in v:
            if k not in METRICS:
                raise ValueError(f"floor for unknown metric {k!r}; allowed: {sorted(METRICS)}")
        return v


class CanarySpec(_Strict):
    """The canary plan. Timings left empty come from the deployment's settings
    (``PIPELINE_CANARY_*``), which differ between a laptop demo and production."""

    enabled: bool = False
    steps: list[float] | None = None
    step_seconds: float | None = Field(default=None, gt=0)
    analysis_interval_seconds: float | None = Field(default=None, gt=0)
    bake_seconds: float | None = Field(default=None, ge=0)


class ScheduleSpec(_Strict):
    cron: str | None = Field(default=None, description="e.g. '0 3 * * *'; None: asset events only")
    asset: bool = True


class LandingSpec(_Strict):
    prefix: str | None = Field(
        default=None, description="under the storage root; None: landing/<name>"
    )
    allowed_sources: list[str] = Field(
        default_factory=list,
        description="URI prefixes outside the landing prefix a run may read a batch from "
        "(a producer's own bucket or folder): such a batch is copied, never moved",
    )


class EvaluationSpec(_Strict):
    uri: str | None = Field(
        default=None,
        description="trusted labelled set; relative to the "
        "storage root or a URI; None: trusted/<name>/eval.parquet",
    )
    trusted_prefix: str | None = Field(
        default=None,
        description="the folder a run may name another set under (only when "
        "overrides.allow lists evaluation.uri); relative to the storage root or a URI; "
        "None: trusted/ under the storage root",
    )

    @field_validator("trusted_prefix")
    @classmethod
    def _a_plain_folder(cls, v: str | None) -> str | None:
        if v is None:
            return v
        body = v.split("://", 1)[-1].strip("/")
        if (
            not body
            or any(seg in ("", ".", "..") for seg in body.split("/"))
            or re.search(r"[\\%?#\s]", v)
        ):
            raise ValueError(
                f"{v!r} is not a plain folder: give one relative to the storage root "
                "(trusted/<name>) or an s3:// / file:// URI, without '.', '..', empty "
                "segments, backslashes, '%', '?', '#' or spaces"
            )
        return v


class AlertsSpec(_Strict):
    """Who is told, and how often. An alert is one record per (model, kind, subject): retries
    and re-runs of the same failure never raise a second one (``pipeline.alerts``)."""

    suppress_minutes: float = Field(
        default=60.0,
        ge=0,
        le=7 * 24 * 60,
        description="an alert that resolved and fires again within this window is "
        "recorded but not sent again (a flapping condition pages once)",
    )
    sinks: list[str] = Field(
        default_factory=list,
        max_length=10,
        description="Airflow Connection ids to deliver to (smtp or slackwebhook); empty: "
        "the deployment's PIPELINE_ALERT_SINKS; the JSON-lines file always",
    )
    min_severity: Literal["info", "warning", "critical"] = Field(
        default="warning", description="alerts below this severity go to the file only"
    )


class SloSpec(_Strict):
    """Service-level objectives (``python -m pipeline slo --model NAME``). Defaults suit a
    model retrained daily; a team tightens or loosens them in review."""

    window_days: float = Field(default=28.0, gt=0, le=366)
    training_success: float = Field(
        default=0.99,
        gt=0,
        lt=1,
        description="share of training runs that finish without divergence",
    )
    decision_minutes: float = Field(
        default=120.0, gt=0, description="from a batch landing to its retrain/promote decision"
    )
    decision_target: float = Field(
        default=0.95, gt=0, lt=1, description="share of batches decided within decision_minutes"
    )
    champion_max_age_days: float = Field(
        default=35.0, gt=0, description="champion freshness: age of the serving version"
    )
    serving_error_rate: float = Field(
        default=0.001, gt=0, lt=1, description="5xx share of scoring requests"
    )
    serving_p99_ms: float = Field(default=250.0, gt=0, description="scoring latency, p99")


class MonitorSpec(_Strict):
    """The champion watched after release: ``monitor_<name>`` reads the scoring service's
    live metrics and the delayed labels it received, and judges decay and prediction drift."""

    enabled: bool = True
    cron: str = Field(default="*/30 * * * *", description="how often monitor_<name> runs")
    min_labels: int = Field(
        default=200, ge=1, description="fewer delayed labels than this: no decay verdict"
    )
    decay_margin: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="live primary metric this far below the champion's gated value is "
        "decay; None: retrain.decay_margin",
    )
    score_drift_psi: float = Field(
        default=0.25, gt=0, description="PSI of live scores vs the gate's scores that is drift"
    )
    retrain_on_decay: bool = Field(
        default=True,
        description="on decay, emit the model's retrain asset (production "
        "decay -> retrain -> gate -> canary, without a human)",
    )


LOOSENABLE = (
    "gate.floors",
    "gate.margin",
    "gate.non_inferiority_margin",
    "gate.slices",
    "gate.max_checkpoint_mb",
    "gate.max_latency_p95_ms",
    "gate.require_approval",
    "retrain.decay_margin",
    "canary.enabled",
    "evaluation.uri",
)


class OverridesSpec(_Strict):
    """What a run may loosen (each use is recorded on the model version). Default: nothing."""

    allow: list[Literal[LOOSENABLE]] = Field(default_factory=list)  # type: ignore[valid-type]


class ModelSpec(_Strict):
    name: str = Field(pattern=NAME_PATTERN, description="default: the folder name")
    registered_model: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
    )
    description: str = ""
    owner: str = ""
    contract: Path
    task: TaskSpec
    model: FactorySpec = Field(default_factory=FactorySpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    metrics: MetricsSpec = Field(default_factory=MetricsSpec)
    retrain: RetrainSpec = Field(default_factory=RetrainSpec)
    gate: GateSpec = Field(default_factory=GateSpec)
    canary: CanarySpec = Field(default_factory=CanarySpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    landing: LandingSpec = Field(default_factory=LandingSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    overrides: OverridesSpec = Field(default_factory=OverridesSpec)
    alerts: AlertsSpec = Field(default_factory=AlertsSpec)
    slo: SloSpec = Field(default_factory=SloSpec)
    monitor: MonitorSpec = Field(default_factory=MonitorSpec)
    path: Path = Field(default=Path("."), exclude=True)  # the spec file (set by load_spec)

    @field_validator("task", mode="before")
    @classmethod
    def _task_shorthand(cls, v: Any) -> Any:
        return {"type": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _metrics_fit_task(self) -> ModelSpec:
        allowed = TASK_METRICS[self.task.type]
        for where, names in (
            ("metrics.primary", [self.primary_metric]),
            ("metrics.report", self.metrics.report),
            ("gate.floors", list(self.gate.floors)),
        ):
            for m in names:
                if m not in allowed:
                    raise ValueError(
                        f"{where}: metric {m!r} is not supported for task "
                        f"{self.task.type!r}; allowed: {list(allowed)}"
                    )
        if self.primary_metric not in GATE_METRICS:
            raise ValueError(
                f"metrics.primary: {self.primary_metric!r} cannot be compared by the "
                f"gate's paired bootstrap; allowed: {list(GATE_METRICS)}"
            )
        return self

    # -- derived ---------------------------------------------------------------------------

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def model_name(self) -> str:
        """The registered model's name in MLflow."""
        return self.registered_model or self.name.replace("_", "-")

    @property
    def experiment_name(self) -> str:
        return f"retrain_{self.name}"

    @property
    def retrain_dag_id(self) -> str:
        return f"retrain_{self.name}"

    @property
    def rollback_dag_id(self) -> str:
        return f"rollback_{self.name}"

    @property
    def monitor_dag_id(self) -> str:
        return f"monitor_{self.name}"

    @property
    def asset_uri(self) -> str:
        return f"pipeline://models/{self.name}/batch"

    @property
    def primary_metric(self) -> str:
        return self.metrics.primary or DEFAULT_PRIMARY[self.task.type]

    @property
    def direction(self) -> int:
        return METRICS[self.primary_metric]

    @property
    def report_metrics(self) -> list[str]:
        out = [self.primary_metric] + [m for m in self.metrics.report if m != self.primary_metric]
        return (
            out
            if self.metrics.report
            else [
                self.primary_metric,
                *(m for m in ("accuracy", "log_loss") if m != self.primary_metric),
            ]
        )

    @property
    def floors(self) -> dict[str, float]:
        """Every floor; the primary metric always has one (default: chance level plus a
        little for higher-is-better metrics, none binding for lower-is-better ones)."""
        if self.primary_metric in self.gate.floors:
            return dict(self.gate.floors)
        default = {"roc_auc": 0.6, "pr_auc": 0.0, "accuracy": 0.0, "log_loss": 1e9, "brier": 2.0}
        return {self.primary_metric: default[self.primary_metric], **self.gate.floors}

    @property
    def landing_prefix(self) -> str:
        return (self.landing.prefix or f"landing/{self.name}").strip("/")

    @property
    def eval_location(self) -> str:
        return self.evaluation.uri or f"trusted/{self.name}/eval.parquet"

    @property
    def trusted_prefix(self) -> str:
        """The folder a run may name another evaluation set under (``pipeline.uris``)."""
        return (self.evaluation.trusted_prefix or "trusted").rstrip("/")

    @property
    def factory_module_file(self) -> Path | None:
        """The spec-local module file of the factory, if the factory is one."""
        module = self.model.factory.split(":", 1)[0]
        candidate = self.folder / (module.replace(".", "/") + ".py")
        return candidate if candidate.is_file() else None

    def contract_obj(self) -> DataContract:
        return _load_contract_cached(str(self.contract))


@lru_cache(maxsize=64)
def _load_contract_cached(path: str) -> DataContract:
    from pipeline.contract import load_contract

    return load_contract(path)


# -- loading ------------------------------------------------------------------------------------


def _format_error(path: Path, err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ())) or "(top level)"
    msg = err.get("msg", "invalid")
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        known = _known_fields(err.get("loc", ()))
        import difflib

        close = difflib.get_close_matches(str(err.get("loc", ("",))[-1]), known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return (
            f"{path}: unknown field {loc!r}: {hint}fields allowed here: {known} "
            "(README, 'Model specs'; the schema is pipeline/spec.py)"
        )
    if kind == "missing":
        return f"{path}: field {loc!r} is required"
    got = err.get("input")
    shown = repr(got) if not isinstance(got, dict) else "{…}"
    return f"{path}: field {loc!r} = {shown[:200]}: {msg}"


def _known_fields(loc: tuple[Any, ...]) -> list[str]:
    """The field names of the schema section that ``loc`` (an error location) points into."""
    model: Any = ModelSpec
    for part in loc[:-1]:
        field_info = getattr(model, "model_fields", {}).get(part)
        ann = getattr(field_info, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return [n for n in getattr(model, "model_fields", {}) if n != "path"]


def load_spec(path: str | Path) -> ModelSpec:
    """Read and validate one spec; raise SpecError naming the file, field, value, allowed."""
    path = Path(path).resolve()
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: model spec not found") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a model spec is a mapping of fields, got {type(raw).__name__}")
    raw.setdefault("name", path.parent.name)
    try:
        spec = ModelSpec.model_validate({**raw, "path": path})
    except ValidationError as exc:
        raise SpecError("; ".join(_format_error(path, dict(e)) for e in exc.errors())) from None
    contract_path = spec.contract if spec.contract.is_absolute() else (path.parent / spec.contract)
    contract_path = contract_path.resolve()
    if not contract_path.is_file():
        raise SpecError(
            f"{path}: field 'contract' = {str(spec.contract)!r}: no file at "
            f"{contract_path} (a path relative to the spec file)"
        )
    spec = spec.model_copy(update={"contract": contract_path})
    _check_against_contract(spec)
    _check_factory_reference(spec)
    return spec


def _check_against_contract(spec: ModelSpec) -> None:
    from pipeline.contract import ContractError

    try:
        contract = spec.contract_obj()
    except ContractError as exc:
        raise SpecError(f"{spec.path}: field 'contract': {exc}") from None
    k = contract.num_classes
    if spec.task.type == "binary" and k != 2:
        raise SpecError(
            f"{spec.path}: field 'task' = 'binary', but the contract's target "
            f"{contract.target!r} has {k} values {list(contract.target_values)}; "
            "use task: multiclass"
        )
    if spec.task.type == "multiclass" and k < 3:
        raise SpecError(
            f"{spec.path}: field 'task' = 'multiclass', but the contract's target "
            f"{contract.target!r} has {k} values; use task: binary"
        )
    categorical = contract.categorical_features
    for s in spec.gate.slices:
        if s not in categorical:
            raise SpecError(
                f"{spec.path}: field 'gate.slices' names {s!r}, which is not a "
                f"categorical feature of the contract; allowed: {categorical}"
            )


def _check_factory_reference(spec: ModelSpec) -> None:
    """Cheap checks only (no import: this runs at DAG-parse time); the factory itself is
    imported and called by :func:`pipeline.train.model.check_factory`."""
    module = spec.model.factory.split(":", 1)[0]
    if spec.factory_module_file is None and not module.startswith("pipeline."):
        import importlib.util

        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise SpecError(
                f"{spec.path}: field 'model.factory' = {spec.model.factory!r}: module "
                f"{module!r} is neither a file next to the spec "
                f"({spec.folder / (module + '.py')}) nor importable"
            )


def models_root() -> Path:
    from pipeline.settings import get_settings

    return get_settings().models_root


@dataclass(frozen=True)
class Discovered:
    """Every spec file under the models root: the good ones, and the errors of the others."""

    specs: tuple[ModelSpec, ...] = ()
    errors: tuple[tuple[Path, str], ...] = field(default_factory=tuple)


def discover(root: Path | None = None) -> Discovered:
    root = root or models_root()
    specs, errors, names = [], [], set()
    for path in sorted(Path(root).glob(f"*/{SPEC_FILE}")):
        try:
            spec = load_spec(path)
        except SpecError as exc:
            errors.append((path, str(exc)))
            continue
        if spec.name in names:
            errors.append(
                (path, f"{path}: field 'name' = {spec.name!r} is already used by another spec")
            )
            continue
        names.add(spec.name)
        specs.append(spec)
    return Discovered(tuple(specs), tuple(errors))


def load_all(root: Path | None = None) -> list[ModelSpec]:
    """Every spec; raise SpecError listing every broken one."""
    found = discover(root)
    if found.errors:
        raise SpecError("; ".join(msg for _, msg in found.errors))
    return list(found.specs)


def get_spec(name_or_path: str | Path) -> ModelSpec:
    """A spec by model name (``card_fraud``) or by path to its YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        return load_spec(p)
    if not re.match(NAME_PATTERN, str(name_or_path)):
        raise SpecError(
            f"model {str(name_or_path)!r}: not a model name ({NAME_PATTERN}) nor a spec file"
        )
    path = models_root() / str(name_or_path) / SPEC_FILE
    if not path.is_file():
        known = [s.name for s in discover().specs]
        raise SpecError(
            f"no model {str(name_or_path)!r}: {path} does not exist; known models: {known}"
        )
    return load_spec(path)


# -- the active spec (set once at each entry point: a DAG task, a CLI command) --------------------

_ACTIVE: contextvars.ContextVar[ModelSpec | None] = contextvars.ContextVar(
    "pipeline_spec", default=None
)


@contextmanager
def use_spec(spec: ModelSpec) -> Iterator[ModelSpec]:
    """Make ``spec`` the model every stage, registry call and storage path refers to."""
    token = _ACTIVE.set(spec)
    try:
        yield spec
    finally:
        _ACTIVE.reset(token)


def activate(spec: ModelSpec) -> None:
    """``use_spec`` for a whole process (a CLI command, a torchrun rank)."""
    _ACTIVE.set(spec)


def active() -> ModelSpec:
    """The active spec; else the settings' default model (``PIPELINE_MODEL``)."""
    spec = _ACTIVE.get()
    if spec is not None:
        return spec
    from pipeline.settings import get_settings

    return get_spec(get_settings().model)


# -- the policy a run may use: defaults and bounds from the spec, tightening only -----------------


@dataclass(frozen=True)
class Knob:
    """One run-time override: its Param/flag name, the spec field it overrides, and which
    way is tighter (``up``: larger is stricter, ``down``: smaller, ``true``: on is stricter,
    ``superset``: more items, ``same``: any change loosens)."""

    param: str
    field: str
    tighter: Literal["up", "down", "true", "superset", "same", "none_or_down"]


KNOBS: tuple[Knob, ...] = (
    Knob("gate_floor", "gate.floors", "up"),  # the primary metric's; flipped for lower-is-better
    Knob("gate_margin", "gate.margin", "up"),
    Knob("gate_non_inferiority_margin", "gate.non_inferiority_margin", "none_or_down"),
    Knob("gate_slices", "gate.slices", "superset"),
    Knob("gate_max_checkpoint_mb", "gate.max_checkpoint_mb", "down"),
    Knob("gate_max_latency_p95_ms", "gate.max_latency_p95_ms", "down"),
    Knob("require_approval", "gate.require_approval", "true"),
    Knob("decay_margin", "retrain.decay_margin", "down"),  # smaller: retrains sooner
    Knob("canary", "canary.enabled", "true"),
    Knob("eval_uri", "evaluation.uri", "same"),
)


@dataclass(frozen=True)
class Policy:
    """The policy one run uses: the spec's, tightened by the run, and what was overridden."""

    floor: float
    floors: dict[str, float]
    margin: float
    improvement: str
    non_inferiority_margin: float | None
    slices: tuple[str, ...]
    max_checkpoint_mb: float | None
    max_latency_p95_ms: float | None
    require_approval: bool
    decay_margin: float
    max_model_age_days: float
    canary: bool
    eval_uri: str  # the spec's trusted set, or an override the spec allows (a spec location)
    resamples: int
    overrides: tuple[dict[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        d = asdict(self)
        d["slices"] = list(self.slices)
        d["overrides"] = [dict(o) for o in self.overrides]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Policy:
        return cls(
            **{
                **d,
                "slices": tuple(d.get("slices") or ()),
                "overrides": tuple(d.get("overrides") or ()),
            }
        )


def spec_value(spec: ModelSpec, knob: Knob) -> Any:
    g = spec.gate
    return {
        "gate.floors": spec.floors[spec.primary_metric],
        "gate.margin": g.margin,
        "gate.non_inferiority_margin": g.non_inferiority_margin,
        "gate.slices": list(g.slices),
        "gate.max_checkpoint_mb": g.max_checkpoint_mb,
        "gate.max_latency_p95_ms": g.max_latency_p95_ms,
        "gate.require_approval": g.require_approval,
        "retrain.decay_margin": spec.retrain.decay_margin,
        "canary.enabled": spec.canary.enabled,
        "evaluation.uri": spec.eval_location,
    }[knob.field]


def _is_tighter(knob: Knob, spec_v: Any, run_v: Any, direction: int) -> bool:
    kind = knob.tighter
    if knob.param == "gate_floor" and direction < 0:
        kind = "down"  # a ceiling on a lower-is-better metric tightens downwards
    if kind == "up":
        return float(run_v) >= float(spec_v)
    if kind == "down":  # None (no budget) is the loosest
        return run_v is not None and (spec_v is None or float(run_v) <= float(spec_v))
    if kind == "none_or_down":  # None (off: must improve) is the tightest
        return run_v is None or (spec_v is not None and float(run_v) <= float(spec_v))
    if kind == "true":
        return bool(run_v) or not bool(spec_v)
    if kind == "superset":
        return set(spec_v) <= set(run_v)
    return run_v in (None, "", spec_v)


def resolve_policy(spec: ModelSpec, requested: dict[str, Any] | None = None) -> Policy:
    """The spec's policy with the run's overrides applied — each one tighter than the spec,
    or loosening a field the spec lists under ``overrides.allow``. Anything else raises
    PolicyViolation naming the Param, the spec's value, the requested value and what to do.
    Missing / None values keep the spec's (except ``gate_non_inferiority_margin``, whose
    None means off; pass the key only when the run sets it)."""
    requested = dict(requested or {})
    unknown = sorted(set(requested) - {k.param for k in KNOBS})
    if unknown:
        raise PolicyViolation(
            f"unknown policy override(s) {unknown}; known: {[k.param for k in KNOBS]}"
        )
    values: dict[str, Any] = {}
    used: list[dict[str, Any]] = []
    for knob in KNOBS:
        spec_v = spec_value(spec, knob)
        if knob.param not in requested:
            values[knob.field] = spec_v
            continue
        run_v = requested[knob.param]
        if run_v is None and knob.tighter not in ("none_or_down", "same"):
            values[knob.field] = spec_v
            continue
        if knob.param == "gate_slices":
            run_v = list(run_v or [])
            bad = [s for s in run_v if s not in spec.contract_obj().categorical_features]
            if bad:
                raise PolicyViolation(
                    f"gate_slices {bad}: not categorical features of model "
                    f"{spec.name}'s contract; allowed: "
                    f"{spec.contract_obj().categorical_features}"
                )
        if knob.param == "eval_uri" and run_v in ("", None):
            values[knob.field] = spec_v
            continue
        if _same(spec_v, run_v):
            values[knob.field] = spec_v
            continue
        tighter = _is_tighter(knob, spec_v, run_v, spec.direction)
        if not tighter and knob.field not in spec.overrides.allow:
            what = (
                "points the gate at another evaluation set"
                if knob.param == "eval_uri"
                else "loosens the policy"
            )
            raise PolicyViolation(
                f"{knob.param}={run_v!r} {what} of model {spec.name!r} ({knob.field} is "
                f"{spec_v!r} in {spec.path}); a run may only tighten it. To allow this, the "
                f"model's owner adds {knob.field!r} to overrides.allow in the spec"
            )
        if knob.param == "eval_uri":  # and it must lie under the spec's trusted prefix
            from pipeline.uris import eval_source

            eval_source(str(run_v), spec)
        values[knob.field] = run_v
        used.append(
            {
                "param": knob.param,
                "field": knob.field,
                "spec": spec_v,
                "run": run_v,
                "kind": "tighten" if tighter else "loosen_allowed",
            }
        )
    floors = dict(spec.floors)
    floors[spec.primary_metric] = float(values["gate.floors"])
    return Policy(
        floor=float(values["gate.floors"]),
        floors=floors,
        margin=float(values["gate.margin"]),
        improvement=spec.gate.improvement,
        non_inferiority_margin=values["gate.non_inferiority_margin"],
        slices=tuple(values["gate.slices"]),
        max_checkpoint_mb=values["gate.max_checkpoint_mb"],
        max_latency_p95_ms=values["gate.max_latency_p95_ms"],
        require_approval=bool(values["gate.require_approval"]),
        decay_margin=float(values["retrain.decay_margin"]),
        max_model_age_days=spec.retrain.max_model_age_days,
        canary=bool(values["canary.enabled"]),
        eval_uri=values["evaluation.uri"],
        resamples=spec.gate.resamples,
        overrides=tuple(used),
    )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list) or isinstance(b, list):
        return sorted(a or []) == sorted(b or [])
    if isinstance(a, bool) or isinstance(b, bool):
        return bool(a) == bool(b)
    if isinstance(a, int | float) and isinstance(b, int | float):
        return abs(float(a) - float(b)) <= 1e-12
    return bool(a == b)


def check_training_budget(
    spec: ModelSpec, max_epochs: int | None, learning_rate: float | None
) -> None:
    """Training knobs a run may set: fewer epochs than the spec's budget, any sane rate."""
    if max_epochs is not None and not 1 <= int(max_epochs) <= spec.training.max_epochs:
        raise PolicyViolation(
            f"max_epochs={max_epochs} is outside model {spec.name!r}'s budget "
            f"1..{spec.training.max_epochs} (training.max_epochs in {spec.path})"
        )
    if learning_rate is not None and not 0 < float(learning_rate) <= 100:
        raise PolicyViolation(f"learning_rate={learning_rate} must be in (0, 100]")


def param_schema(spec: ModelSpec) -> dict[str, dict[str, Any]]:
    """JSON-schema keyword arguments of each trigger Param, defaults and bounds from the spec.

    The bound that matters is the spec's value: a Param cannot be set looser than the spec
    (unless ``overrides.allow`` names its field), so the UI form refuses it before a run
    starts; :func:`resolve_policy` refuses it again in the task (REST, CLI)."""
    metric, d = spec.primary_metric, spec.direction
    allow = set(spec.overrides.allow)
    floor = spec.floors[metric]
    g = spec.gate

    def loose(fieldname: str) -> bool:
        return fieldname in allow

    floor_bounds: dict[str, Any] = {}
    if not loose("gate.floors"):
        floor_bounds = {"minimum": floor} if d > 0 else {"maximum": floor}
    floor_bounds.setdefault("maximum" if d > 0 else "minimum", 1.0 if d > 0 else 0.0)
    budget = lambda v, f: {} if loose(f) or v is None else {"maximum": v}  # noqa: E731
    out: dict[str, dict[str, Any]] = {
        "force_retrain": {
            "default": False,
            "type": "boolean",
            "title": "Force retrain",
            "description": "Train even if there is no drift or decay.",
        },
        "max_epochs": {
            "default": spec.training.max_epochs,
            "type": "integer",
            "minimum": 1,
            "maximum": spec.training.max_epochs,
            "title": "Max epochs",
            "description": f"Upper bound on training epochs (1-{spec.training.max_epochs}, "
            "the spec's budget); training usually stops earlier, on a plateau.",
        },
        "learning_rate": {
            "default": spec.training.learning_rate,
            "type": "number",
            "exclusiveMinimum": 0,
            "maximum": 1,
            "title": "Learning rate",
            "description": f"{spec.training.optimizer} learning rate.",
        },
        "gate_floor": {
            "default": floor,
            "type": "number",
            **floor_bounds,
            "title": f"Gate floor ({metric})",
            "description": f"{'Minimum' if d > 0 else 'Maximum'} {metric} for any promotion; "
            f"the spec's is {floor}, a run may only make it stricter.",
        },
        "gate_margin": {
            "default": g.margin,
            "type": "number",
            **({} if loose("gate.margin") else {"minimum": g.margin}),
            "maximum": 1,
            "title": f"Gate margin ({metric})",
            "description": f"{g.improvement.capitalize()} {metric} improvement the challenger "
            f"must show over the champion (spec: {g.margin}; only larger).",
        },
        "gate_non_inferiority_margin": {
            "default": g.non_inferiority_margin,
            "type": ["null", "number"],
            "minimum": 0,
            **(
                {"maximum": g.non_inferiority_margin}
                if g.non_inferiority_margin is not None and not loose("gate.non_inferiority_margin")
                else {"maximum": 0.5}
            ),
            "title": "Non-inferiority margin",
            "description": "Empty: the challenger must improve. Set: also promote a challenger whose "
            f"95% CI lower bound of the {metric} difference is above -margin"
            + (
                ""
                if loose("gate.non_inferiority_margin") or g.non_inferiority_margin is not None
                else " (this model's spec does not allow setting it)"
            )
            + ".",
        },
        "gate_slices": {
            "default": list(g.slices),
            "type": "array",
            "maxItems": 20,
            "uniqueItems": True,
            **(
                {"allOf": [{"contains": {"const": c}} for c in g.slices]}
                if g.slices and not loose("gate.slices")
                else {}
            ),
            "items": {"type": "string", "enum": spec.contract_obj().categorical_features}
            if spec.contract_obj().categorical_features
            else {"type": "string"},
            "title": "Gate slices",
            "description": "Categorical columns whose every value must not regress; "
            "a run may add columns to the spec's, not remove them.",
        },
        "gate_max_checkpoint_mb": {
            "default": g.max_checkpoint_mb,
            "type": ["null", "number"],
            "exclusiveMinimum": 0,
            **budget(g.max_checkpoint_mb, "gate.max_checkpoint_mb"),
            "title": "Checkpoint size budget (MB)",
            "description": "A larger challenger is rejected (only smaller).",
        },
        "gate_max_latency_p95_ms": {
            "default": g.max_latency_p95_ms,
            "type": ["null", "number"],
            "exclusiveMinimum": 0,
            **budget(g.max_latency_p95_ms, "gate.max_latency_p95_ms"),
            "title": "Latency budget (p95 ms per 256-row batch)",
            "description": "A slower challenger is rejected (only smaller).",
        },
        "require_approval": {
            "default": g.require_approval,
            "type": "boolean",
            **(
                {"const": True} if g.require_approval and not loose("gate.require_approval") else {}
            ),
            "title": "Require approval",
            "description": "Wait for a human to approve a promotion the gate passed.",
        },
        "decay_margin": {
            "default": spec.retrain.decay_margin,
            "type": "number",
            "minimum": 0,
            "maximum": 1 if loose("retrain.decay_margin") else spec.retrain.decay_margin,
            "title": f"Decay margin ({metric})",
            "description": f"Champion {metric} drop on new labels that retrains (only smaller).",
        },
        "canary": {
            "default": spec.canary.enabled,
            "type": "boolean",
            **({"const": True} if spec.canary.enabled and not loose("canary.enabled") else {}),
            "title": "Canary rollout",
            "description": "Promote through a canary on the scoring service, then promote or roll back.",
        },
        "eval_uri": {
            "default": None,
            "type": ["null", "string"],
            "maxLength": 2048,
            **({} if loose("evaluation.uri") else {"maxLength": 0}),
            **({"pattern": eval_uri_pattern(spec)} if loose("evaluation.uri") else {}),
            "title": "Evaluation set URI",
            "description": f"Empty: the spec's trusted set ({spec.eval_location})."
            + (
                f" Another one must lie under the trusted prefix `{spec.trusted_prefix}`."
                if loose("evaluation.uri")
                else " This model's spec does not allow another."
            ),
        },
    }
    return out


# -- the trigger form's first line against hostile URIs ------------------------------------------
#
# A loose pattern, checked by the UI form and the REST API before a run exists: it refuses
# what is obviously outside the model's roots (``/proc/self/environ``, ``/etc/passwd``,
# another scheme, ``..``, ``%2e``, backslashes, ``?``/``#``, ``//``). The storage root is the
# deployment's (not known when the DAG is parsed), so a relative root matches wherever it
# appears as whole segments; the stage's check (``pipeline.uris.confine``) is the authority.

#: one path segment: no separator, backslash, percent, query, fragment or space; not . or ..
_SEG = r"(?!\.\.?(?:/|$))[^/\\%?#\s]+"


def _rx(text: str) -> str:
    """``text`` literally, in a regex that both Python and ECMAScript (``u`` flag) read."""
    return re.sub(r"[\\^$.*+?()[\]{}|/]", lambda m: "\\" + m.group(0), text)


def _location_rx(location: str, *, inside: bool, relative_ok: bool) -> str:
    """URIs at (``inside``: under) a spec location: an absolute one exactly; a relative one
    after any storage root, or as written when the run may give it relative."""
    tail = rf"(?:/{_SEG})+" if inside else ""
    loc = location.rstrip("/") if inside else location
    if loc.startswith("s3://"):
        return _rx(loc) + tail
    if loc.startswith("file://"):
        loc = loc[len("file://") :]
    if loc.startswith("/"):
        return rf"(?:file://)?{_rx(loc)}{tail}"
    rel = _rx(loc.strip("/"))
    anywhere = rf"(?:file://|s3://{_SEG})?(?:/{_SEG})*/{rel}{tail}"
    return rf"{rel}{tail}|{anywhere}" if relative_ok else anywhere


def batch_uri_pattern(spec: ModelSpec) -> str:
    """The ``batch_uri`` Param's pattern: empty, or a URI under the landing prefix or an
    allowed source."""
    alts = [
        _location_rx(r, inside=True, relative_ok=False)
        for r in [spec.landing_prefix, *spec.landing.allowed_sources]
    ]
    return "^(|" + "|".join(alts) + ")$"


def eval_uri_pattern(spec: ModelSpec) -> str:
    """The ``eval_uri`` Param's pattern: empty, the spec's own set, or one under its trusted
    prefix (relative to the storage root, or a URI)."""
    alts = [
        _location_rx(spec.trusted_prefix, inside=True, relative_ok=True),
        _location_rx(spec.eval_location, inside=False, relative_ok=True),
    ]
    return "^(|" + "|".join(alts) + ")$"
