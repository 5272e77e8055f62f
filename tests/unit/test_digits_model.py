"""The ``digits`` example model: its residual-net factory, its data split, its spec."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from models.digits import data
from pipeline.contract import load_contract
from pipeline.spec import load_spec
from pipeline.storage import ObjectExistsError, read_bytes
from pipeline.train.features import FeatureSpec, fit_features, labels, transform
from pipeline.train.model import FactoryError, ModelInputs, ModelRef, build_model, file_sha256

ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / "models" / "digits"
NET = FOLDER / "net.py"
KWARGS = {"width": 128, "blocks": 2, "dropout": 0.1}


def _build():
    from pipeline.train.model import resolve_factory

    return resolve_factory("net:build", NET)


def _inputs(numeric: int, classes: int) -> ModelInputs:
    cols = [f"x{i}" for i in range(numeric)]
    fs = FeatureSpec(cols, [0.0] * numeric, [1.0] * numeric, [], [], "y", list(range(classes)))
    return ModelInputs(fs.width, classes, fs, "multiclass" if classes > 2 else "binary")


@pytest.fixture(scope="module")
def contract():
    return load_contract(FOLDER / "contract.yaml")


@pytest.fixture(scope="module")
def parts():
    return data.split(0)


@pytest.fixture(scope="module")
def digits_inputs(contract, parts):
    fs = fit_features(parts["batch-1"], contract)
    return ModelInputs(fs.width, len(fs.classes), fs, "multiclass")


# -- the factory ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("numeric", "classes", "kwargs"),
    [
        (50, 10, {}),
        (7, 3, {}),
        (1, 2, {"width": 4, "blocks": 1, "dropout": 0.0}),
        (13, 5, {"width": 16, "blocks": 4, "dropout": 0.5}),
    ],
)
def test_factory_maps_any_width_to_num_classes_logits(numeric, classes, kwargs):
    inputs = _inputs(numeric, classes)
    model = _build()(inputs, **kwargs)
    assert isinstance(model, nn.Module)
    model.eval()
    out = model(torch.randn(11, inputs.input_width))
    assert out.shape == (11, classes)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_factory_is_a_residual_stack_of_linear_layers():
    inputs = _inputs(7, 3)
    for blocks in (1, 3):
        model = _build()(inputs, width=8, blocks=blocks)
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        # stem + two per block + head: the gradient stopper hooks nn.Linear
        assert len(linears) == 2 + 2 * blocks
        assert linears[0].in_features == inputs.input_width and linears[0].out_features == 8
        assert linears[-1].out_features == 3
        assert sum(isinstance(m, nn.LayerNorm) for m in model.modules()) == blocks + 1


def test_blocks_add_a_skip_connection():
    """Zeroing a block's output layer leaves the block an identity map."""
    model = _build()(_inputs(7, 3), width=8, blocks=2, dropout=0.0).eval()
    block = model.blocks[0]
    with torch.no_grad():
        block.fc2.weight.zero_()
        block.fc2.bias.zero_()
    h = torch.randn(5, 8)
    assert torch.equal(block(h), h)


def test_gradients_reach_every_parameter():
    model = _build()(_inputs(7, 3), width=8, blocks=2)
    model(torch.randn(4, 14)).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"width": 0}, "width"),
        ({"width": -3}, "width"),
        ({"width": 1.5}, "width"),
        ({"width": True}, "width"),
        ({"width": "128"}, "width"),
        ({"blocks": 0}, "blocks"),
        ({"blocks": 2.0}, "blocks"),
        ({"blocks": None}, "blocks"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"dropout": "0.1"}, "dropout"),
        ({"dropout": True}, "dropout"),
    ],
)
def test_bad_kwargs_raise_a_value_error_naming_the_kwarg(kwargs, field):
    with pytest.raises(ValueError, match=rf"model\.kwargs\.{field}"):
        _build()(_inputs(7, 3), **kwargs)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="num_classes"):
        _build()(ModelInputs(14, 1, _inputs(7, 3).features))
    with pytest.raises(ValueError, match="input_width"):
        _build()(ModelInputs(0, 3, _inputs(7, 3).features))


def test_build_model_checks_the_code_digest(digits_inputs):
    sha = file_sha256(NET)
    model = build_model(ModelRef("net:build", dict(KWARGS), sha), digits_inputs, code_file=NET)
    assert model(torch.zeros(3, digits_inputs.input_width)).shape == (3, 10)
    with pytest.raises(FactoryError, match="the model's code changed"):
        build_model(ModelRef("net:build", dict(KWARGS), "0" * 64), digits_inputs, code_file=NET)
    with pytest.raises(FactoryError, match="needs its module file"):
        build_model(ModelRef("net:build", dict(KWARGS), sha), digits_inputs)


def test_build_model_reports_bad_and_unknown_kwargs(digits_inputs):
    sha = file_sha256(NET)
    with pytest.raises(ValueError, match="model.kwargs.width"):
        build_model(ModelRef("net:build", {"width": 0}, sha), digits_inputs, code_file=NET)
    with pytest.raises(FactoryError, match="hidden"):
        build_model(ModelRef("net:build", {"hidden": [64]}, sha), digits_inputs, code_file=NET)


def test_the_net_learns_the_first_batch(contract, parts, digits_inputs):
    torch.manual_seed(0)
    model = _build()(digits_inputs, **KWARGS)
    fs = digits_inputs.features
    x = torch.from_numpy(transform(parts["batch-1"], fs))
    y = torch.from_numpy(labels(parts["batch-1"], fs))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        ev = parts["eval"]
        acc = (
            model(torch.from_numpy(transform(ev, fs))).argmax(1).numpy() == labels(ev, fs)
        ).mean()
    assert acc > 0.6  # chance is 0.1


# -- the spec and the contract --------------------------------------------------------------


def test_spec_loads_with_the_local_factory(contract):
    spec = load_spec(FOLDER / "model.yaml")
    assert spec.name == "digits"
    assert spec.task.type == "multiclass"
    assert spec.factory_module_file == NET
    assert spec.primary_metric == "accuracy"
    assert spec.gate.slices == []
    assert spec.contract_obj().time_column is None
    assert spec.contract_obj().num_classes == 10


def test_contract_declares_exactly_the_columns_data_writes(contract, parts):
    assert contract.id_column == data.ID_COLUMN and contract.target == data.TARGET
    assert contract.time_column is None
    assert contract.column_names == list(parts["eval"].columns)
    assert contract.numeric_features == list(data.PIXELS)
    assert contract.categorical_features == []
    assert tuple(contract.target_values) == data.CLASSES
    for p in data.PIXELS:
        col = contract.column(p)
        assert (col.type, col.min, col.max) == ("int", 0, 16)
    assert contract.min_rows <= min(len(df) for df in parts.values())


def test_dropped_pixels_are_the_rarely_inked_ones():
    assert data.rarely_inked() == data.DROPPED_PIXELS
    assert set(data.PIXELS) | set(data.DROPPED_PIXELS) == set(data.ALL_PIXELS)
    assert len(data.ALL_PIXELS) == 64 and len(data.PIXELS) == 50


def test_frame():
    df = data.frame()
    assert len(df) == 1797
    assert df[data.ID_COLUMN].is_unique
    assert df[data.ID_COLUMN].iloc[0] == "img-00000" and df[data.ID_COLUMN].iloc[-1] == "img-01796"
    px = df[list(data.PIXELS)]
    assert (px.dtypes == np.int64).all() and px.min().min() == 0 and px.max().max() == 16
    assert sorted(df[data.TARGET].unique()) == list(data.CLASSES)


# -- the split ------------------------------------------------------------------------------


def test_split_is_deterministic(parts):
    again = data.split(0)
    for name in data.FILES:
        pd.testing.assert_frame_equal(parts[name], again[name])
    other = data.split(1)
    assert set(other["eval"][data.ID_COLUMN]) != set(parts["eval"][data.ID_COLUMN])


def test_split_is_disjoint_and_complete(parts):
    ids = [set(df[data.ID_COLUMN]) for df in parts.values()]
    assert sum(len(s) for s in ids) == 1797 == len(set().union(*ids))
    assert sum(len(df) for df in parts.values()) == 1797


def test_split_sizes(parts):
    assert len(parts["eval"]) == 450
    assert len(parts["batch-1"]) == 120
    assert len(parts["batch-2"]) == 1797 - 450 - 120
    assert len(parts["batch-2"]) > 5 * len(parts["batch-1"])


def test_split_is_stratified(parts):
    full = data.frame()[data.TARGET].value_counts().sort_index()
    share = full / full.sum()
    for df in parts.values():
        counts = df[data.TARGET].value_counts().reindex(full.index, fill_value=0)
        assert (abs(counts - share * len(df)) <= 1).all(), counts.tolist()


def test_no_feature_is_constant_in_any_part(parts):
    """Validation rejects a constant feature: every file must pass it."""
    for name, df in parts.items():
        flat = [p for p in data.PIXELS if df[p].nunique() < 2]
        assert not flat, f"{name}: constant {flat}"


def test_write_batches_writes_the_split_once(tmp_path, parts):
    out = tmp_path / "out"
    written = data.write_batches(out, seed=0)
    assert set(written) == set(data.FILES)
    for name, uri in written.items():
        assert Path(uri) == out / data.FILES[name]
        pd.testing.assert_frame_equal(pd.read_parquet(io.BytesIO(read_bytes(uri))), parts[name])
    before = {name: read_bytes(uri) for name, uri in written.items()}
    assert data.write_batches(out, seed=0) == written  # the same bytes again: a no-op
    assert {name: read_bytes(uri) for name, uri in written.items()} == before
    with pytest.raises(ObjectExistsError):
        data.write_batches(out, seed=1)  # never overwritten


def test_cli(tmp_path, capsys):
    assert data.main(["--out", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert "batch-1" in out and "1227 rows" in out
    assert sorted(p.name for p in (tmp_path / "cli").glob("*.parquet")) == [
        "batch-1.parquet",
        "batch-2.parquet",
        "eval.parquet",
    ]
