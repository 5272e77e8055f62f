"""The scoring service's fast paths answer exactly what the reference paths answer.

Each fast path (``benchmarks/serving_vs_mlflow.py`` measures why they exist) has a
reference it must agree with: the row encoder with ``features.transform`` on the rows'
DataFrame, the column-wise validity check with the cell-by-cell walk that names
problems, the C-scanner parse with the checked parse, and the bulk histogram update with
``observe`` per value.
"""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pandas as pd
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from pipeline.data.generate import WorldSpec, generate
from pipeline.serving.encode import RowEncoder, probe_rows
from pipeline.serving.metrics import SCORE_BUCKETS, observe_many
from pipeline.serving.schema import BadRequest, RowsInvalid, RowValidator, parse_json
from pipeline.train.features import fit_features, transform
from tests.unit._serving import records


@pytest.fixture(scope="module")
def world(contract):
    df = generate(WorldSpec(rows=3000, seed=21))
    spec = fit_features(df, contract)
    columns = [c.name for c in contract.features]
    return spec, records(df, columns), contract


def reference(spec, rows):
    return transform(pd.DataFrame.from_records(rows, columns=spec.input_columns), spec)


def test_row_encoder_equals_transform_on_generated_rows(world):
    spec, rows, _ = world
    enc = RowEncoder.for_spec(spec)
    assert enc is not None
    for n in (1, 2, 7, 256, len(rows)):
        assert np.array_equal(enc.encode(rows[:n]), reference(spec, rows[:n]), equal_nan=True)


def test_row_encoder_equals_transform_on_nulls_unknowns_and_extremes(world):
    spec, rows, _ = world
    enc = RowEncoder(spec)
    rng = random.Random(4)
    odd = []
    for r in rows[:200]:
        r = dict(r)
        for c in spec.numeric:
            r[c] = rng.choice([r[c], None, 0, -1.5, 1e12, 2**60, True])
        for c, cats in spec.categorical:
            r[c] = rng.choice([r[c], None, "never-seen", cats[-1]])
        odd.append(r)
    odd += probe_rows(spec)
    got = enc.encode(odd)
    assert got.dtype == np.float32 and got.shape == (len(odd), spec.width)
    assert np.array_equal(got, reference(spec, odd), equal_nan=True)


def test_loaded_model_scores_like_the_dataframe_path(world):
    import torch

    from pipeline.evaluate import score_model
    from pipeline.serving.service import LoadedModel
    from pipeline.train.model import MLP, ModelConfig

    spec, rows, _ = world
    torch.manual_seed(3)
    model = MLP(ModelConfig(spec.width, len(spec.classes))).eval()
    loaded = LoadedModel("1", "file:///ck/1", "ab" * 32, model, spec, 1)
    assert loaded.encoder is not None
    df = pd.DataFrame.from_records(rows[:300], columns=spec.input_columns)
    assert np.array_equal(loaded.proba(rows[:300]), score_model(model, spec, df))


def mutations(contract):
    """(column, a bad value for it) for each kind of problem the contract can have."""
    out = []
    for col in contract.features:
        out.append((col.name, "\x00missing"))
        out.append((col.name, [1]))
        if not col.nullable:
            out.append((col.name, None))
        if col.is_categorical:
            out += [(col.name, "no-such-category"), (col.name, 3)]
        elif col.is_numeric:
            out += [(col.name, "12"), (col.name, True), (col.name, 2**53 + 1)]
            out += [(col.name, 0.5 if col.type == "int" else math.inf)]
            if col.min is not None:
                out.append((col.name, col.min - 1))
            if col.max is not None:
                out.append((col.name, col.max + 1))
    return out


def test_column_check_agrees_with_the_cell_walk(world):
    _, rows, contract = world
    v = RowValidator(contract)
    batch = [dict(r) for r in rows[:64]]
    assert v.plainly_valid(batch) and v.problems(batch) == []
    v.check(batch)
    for name, bad in mutations(contract):
        for at in (0, 37):
            rows_ = [dict(r) for r in batch]
            if bad == "\x00missing":
                rows_[at].pop(name)
            else:
                rows_[at][name] = bad
            found = v.problems(rows_)
            assert not v.plainly_valid(rows_) or not found, (name, bad)
            if found:
                with pytest.raises(RowsInvalid) as exc:
                    v.check(rows_)
                assert exc.value.problems == found
                assert (found[0].row, found[0].field) == (at, name)
            else:
                v.check(rows_)
    assert not v.plainly_valid([*batch[:3], ["not", "a", "row"]])
    assert not v.plainly_valid([])


@pytest.mark.parametrize(
    "body",
    [
        b'[{"a": 1.5, "b": 12, "c": "x"}]',
        b'{"a": 18446744073709551615}',
        b'{"a": 12345678901234567890123}',
        b'{"a": -12345678901234567890123}',
        b'{"a": 1e400}',
        b'{"a": -1E+400}',
        b'{"a": 1e-400}',
        b'{"a": 1e99, "b": 1.7976931348623157e308}',
        b'{"a": "12345678901234567890123 in a string", "b": "e000"}',
        b'{"a": NaN}',
        b'{"a": Infinity}',
        b'{"a": 0.12345678901234567, "b": -9223372036854775808}',
        b"{not json",
    ],
)
def test_parse_json_answers_as_the_checked_parse(body):
    from pipeline.serving.schema import _constant, _float, _int

    def checked(raw):
        try:
            return json.loads(raw, parse_constant=_constant, parse_float=_float, parse_int=_int)
        except BadRequest as exc:
            return ("refused", str(exc))
        except ValueError:
            return ("invalid",)

    try:
        got = parse_json(body)
    except BadRequest as exc:
        got = ("invalid",) if "not valid JSON" in str(exc) else ("refused", str(exc))
    assert got == checked(body)


def _histogram():
    reg = CollectorRegistry(auto_describe=False)
    h = Histogram("s", "scores", ["model"], buckets=SCORE_BUCKETS, registry=reg)
    return reg, h.labels("m")


def _buckets(reg):
    return [
        line
        for line in generate_latest(reg).decode().splitlines()
        if line.startswith(("s_bucket", "s_count"))
    ]


@pytest.mark.parametrize("n", [0, 1, 256])
def test_observe_many_fills_the_buckets_observe_fills(n):
    rng = np.random.default_rng(n)
    values = np.concatenate([rng.random(n).astype(np.float32), np.array(SCORE_BUCKETS[:n])])
    bulk_reg, bulk = _histogram()
    one_reg, one = _histogram()
    observe_many(bulk, values)
    for x in values.tolist():
        one.observe(x)
    assert _buckets(bulk_reg) == _buckets(one_reg)
    sums = [bulk_reg.get_sample_value("s_sum", {"model": "m"})]
    sums.append(one_reg.get_sample_value("s_sum", {"model": "m"}))
    assert sums[0] == pytest.approx(sums[1], rel=1e-12, abs=1e-12)


def test_a_cell_the_encoder_cannot_take_is_scored_the_reference_way(world):
    """A checkpoint whose numeric column the contract now types otherwise: the string
    reaches the model as a missing value, as through the DataFrame."""
    import torch

    from pipeline.evaluate import score_model
    from pipeline.serving.service import LoadedModel
    from pipeline.train.model import MLP, ModelConfig

    spec, rows, _ = world
    torch.manual_seed(3)
    model = MLP(ModelConfig(spec.width, len(spec.classes))).eval()
    loaded = LoadedModel("1", "file:///ck/1", "ab" * 32, model, spec, 1)
    odd = [dict(r) for r in rows[:5]]
    odd[2][spec.numeric[0]] = "not a number"
    df = pd.DataFrame.from_records(odd, columns=spec.input_columns)
    assert np.array_equal(loaded.proba(odd), score_model(model, spec, df))
