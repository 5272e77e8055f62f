"""Models: the factory contract, the built-in MLP, and loading a factory from a spec or checkpoint.

**The factory contract.** A model spec names ``model.factory: module:callable`` and
``model.kwargs``. The callable is called as ``factory(inputs, **kwargs)`` with a
:class:`ModelInputs` (input width, number of classes, the fitted feature spec, the task)
and must return an ``nn.Module`` that maps a float32 batch ``(rows, input_width)`` to
logits ``(rows, num_classes)``. The pipeline does the rest: featurisation, training,
stopping, telemetry, checkpoints, gate, canary, serving.

The module is a single Python file next to the spec (``net:build`` is
``models/<name>/net.py``) or an importable module (``pipeline.train.model:mlp``). A
spec-local file is copied into every checkpoint (``model_code.py``, with its SHA-256 in
the signed manifest), so a version is reloaded with the exact code it was trained with,
and only after the checkpoint's digests and signature verified.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from pipeline.train.features import FeatureSpec

BUILTIN_MLP = "pipeline.train.model:mlp"
CODE_FILE = "model_code.py"  # the user's factory module, as stored inside a checkpoint


class FactoryError(ValueError):
    """The factory cannot be imported, or what it built breaks the contract."""


@dataclass(frozen=True)
class ModelInputs:
    """What the data gives a factory."""

    input_width: int
    num_classes: int
    features: FeatureSpec
    task: str = "multiclass"

    @property
    def numeric_columns(self) -> list[str]:
        return list(self.features.numeric)

    @property
    def categorical_columns(self) -> list[tuple[str, int]]:
        """(column, slots) per categorical block: its categories plus one 'unknown' slot."""
        return [(c, len(v) + 1) for c, v in self.features.categorical]

    @property
    def layout(self) -> list[tuple[str, int, int]]:
        """(column, first index, width) of each column's block in the feature vector: two
        slots per numeric (standardised value, missing flag), then a one-hot block per
        categorical (categories + unknown)."""
        out, i = [], 0
        for c in self.features.numeric:
            out.append((c, i, 2))
            i += 2
        for c, slots in self.categorical_columns:
            out.append((c, i, slots))
            i += slots
        return out


@dataclass(frozen=True)
class ModelRef:
    """How to rebuild a model: the factory, its kwargs, and the digest of a spec-local module."""

    factory: str = BUILTIN_MLP
    kwargs: dict[str, Any] = field(default_factory=dict)
    code_sha256: str | None = None  # set when the factory is a file carried in the checkpoint

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelRef:
        return cls(
            factory=str(d["factory"]),
            kwargs=dict(d.get("kwargs") or {}),
            code_sha256=d.get("code_sha256"),
        )


# -- the built-in factory ------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    input_dim: int
    num_classes: int
    hidden: tuple[int, ...] = (64, 32)
    dropout: float = 0.1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return cls(
            input_dim=int(d["input_dim"]),
            num_classes=int(d["num_classes"]),
            hidden=tuple(int(h) for h in d["hidden"]),
            dropout=float(d["dropout"]),
        )


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = config.input_dim
        for h in config.hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(config.dropout)]
            width = h
        layers.append(nn.Linear(width, config.num_classes))
        self.net = nn.Sequential(*layers)
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def mlp(
    inputs: ModelInputs, hidden: list[int] | tuple[int, ...] = (64, 32), dropout: float = 0.1
) -> MLP:
    """The built-in factory: ReLU MLP with dropout."""
    if not all(isinstance(h, int) and h > 0 for h in hidden):
        raise FactoryError(f"model.kwargs.hidden must be positive integers, got {list(hidden)}")
    if not 0 <= float(dropout) < 1:
        raise FactoryError(f"model.kwargs.dropout must be in [0, 1), got {dropout}")
    return MLP(ModelConfig(inputs.input_width, inputs.num_classes, tuple(hidden), float(dropout)))


# -- resolving and checking a factory ---------------------------------------------------------------


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _import_file(path: Path, digest: str) -> Any:
    """Import a single-file module under a name unique to its content, so two versions of a
    user's module live side by side in one process (the scoring service)."""
    name = f"pipeline_user_models.m{digest[:16]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise FactoryError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise FactoryError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
    return module


def resolve_factory(factory: str, code_file: Path | None = None) -> Callable[..., Any]:
    """The callable ``module:callable`` names: from ``code_file`` when given (a spec-local
    module, or the copy inside a verified checkpoint), else an importable module."""
    module_name, _, attr = factory.partition(":")
    if not attr:
        raise FactoryError(f"model.factory {factory!r} must look like 'module:callable'")
    if code_file is not None:
        module = _import_file(code_file, file_sha256(code_file))
    else:
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # noqa: BLE001 - any import failure is the same user error
            raise FactoryError(
                f"model.factory {factory!r}: cannot import {module_name!r}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise FactoryError(f"model.factory {factory!r}: {module_name!r} has no callable {attr!r}")
    return fn  # type: ignore[no-any-return]


def build_model(ref: ModelRef, inputs: ModelInputs, code_file: Path | None = None) -> nn.Module:
    """Call the factory and check what it returned against the contract (an ``nn.Module``
    whose output on a float batch of ``input_width`` is ``(rows, num_classes)`` logits)."""
    if ref.code_sha256 is not None:
        if code_file is None:
            raise FactoryError(
                f"model.factory {ref.factory!r} needs its module file (sha256 "
                f"{ref.code_sha256[:12]}), and none was given"
            )
        got = file_sha256(code_file)
        if got != ref.code_sha256:
            raise FactoryError(
                f"{code_file}: sha256 {got[:12]} is not the recorded "
                f"{ref.code_sha256[:12]}: the model's code changed"
            )
    fn = resolve_factory(ref.factory, code_file)
    try:
        model = fn(inputs, **ref.kwargs)
    except FactoryError:
        raise
    except TypeError as exc:
        raise FactoryError(
            f"model.factory {ref.factory!r} with kwargs {ref.kwargs}: {exc}"
        ) from exc
    if not isinstance(model, nn.Module):
        raise FactoryError(
            f"model.factory {ref.factory!r} returned {type(model).__name__}, not a torch.nn.Module"
        )
    check_output(model, inputs, ref.factory)
    return model


def check_output(model: nn.Module, inputs: ModelInputs, factory: str = "the factory") -> None:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, inputs.input_width))
    except Exception as exc:  # noqa: BLE001 - the user's forward failed: say so
        raise FactoryError(
            f"{factory}: forward on a (2, {inputs.input_width}) float batch failed: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, inputs.num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise FactoryError(
            f"{factory}: output {shape} for a (2, {inputs.input_width}) batch; the "
            f"contract is (rows, num_classes) = (2, {inputs.num_classes}) logits"
        )


def model_ref_for(factory: str, kwargs: dict[str, Any], code_file: Path | None) -> ModelRef:
    return ModelRef(
        factory, dict(kwargs), file_sha256(code_file) if code_file is not None else None
    )


def pick_device(preference: str = "auto") -> torch.device:
    """CUDA, then MPS, then CPU — unless a device is named explicitly."""
    if preference != "auto":
        return torch.device(preference)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor, batch_size: int = 65_536) -> torch.Tensor:
    model.eval()
    outs = [
        torch.softmax(model(x[i : i + batch_size]).float(), dim=1)
        for i in range(0, len(x), batch_size)
    ]
    return torch.cat(outs) if outs else torch.empty(0, 0)


def check_factory(spec: Any) -> nn.Module:
    """Import and call a model spec's factory on the shape its contract implies, and check
    the result against the contract — before any data is read (a run's first step, and
    ``python -m pipeline spec check``). Raises FactoryError naming the factory and what broke."""
    from pipeline.train.features import FeatureSpec

    contract = spec.contract_obj()
    numeric = contract.numeric_features
    features = FeatureSpec(
        numeric,
        [0.0] * len(numeric),
        [1.0] * len(numeric),
        [],
        [(c, list(contract.column(c).categories)) for c in contract.categorical_features],
        contract.target,
        list(contract.target_values),
    )
    code_file = spec.factory_module_file
    inputs = ModelInputs(features.width, len(features.classes), features, spec.task.type)
    try:
        return build_model(
            model_ref_for(spec.model.factory, spec.model.kwargs, code_file), inputs, code_file
        )
    except FactoryError as exc:
        raise FactoryError(f"{spec.path}: field 'model': {exc}") from None
