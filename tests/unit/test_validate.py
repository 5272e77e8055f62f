"""Contract validation (Great Expectations) on generated batches."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.contract import DataContract, load_contract
from pipeline.data.generate import WorldSpec, generate
from pipeline.validate import (
    NO_TIME_COLUMN_NOTE,
    ValidationReport,
    build_suite,
    contract_checks,
    render_html,
    validate_frame,
)

CONTRACT_PATH = Path(__file__).resolve().parents[2] / "models" / "card_fraud" / "contract.yaml"
NOW = pd.Timestamp("2026-06-01T00:00:00Z")
ROWS = 3000


@pytest.fixture(scope="module")
def contract() -> DataContract:
    return load_contract(CONTRACT_PATH)


def batch(fault: str = "none", rows: int = ROWS, seed: int = 7) -> pd.DataFrame:
    return generate(WorldSpec(rows=rows, seed=seed, schema_fault=fault))


def failed(report: ValidationReport) -> set[tuple[str, str | None]]:
    return {(r.expectation, r.column) for r in report.failures()}


def test_clean_batch_passes(contract: DataContract) -> None:
    report = validate_frame(batch(), contract, NOW)
    assert report.success, report.summary()
    assert report.failures() == []
    assert report.rows == ROWS
    assert report.summary().startswith("all ")
    kinds = {r.expectation for r in report.results}
    assert {
        "expect_table_row_count_to_be_between",
        "expect_column_to_exist",
        "expect_column_values_to_not_be_null",
        "expect_column_values_to_be_between",
        "expect_column_values_to_be_in_set",
        "expect_column_values_to_be_unique",
    } <= kinds
    # every declared column is checked for existence
    exists = {r.column for r in report.results if r.expectation == "expect_column_to_exist"}
    assert exists == set(contract.column_names)
    # real features are far from leaking the label
    aucs = [r.observed["observed_value"] for r in report.results if r.expectation.endswith("alone")]
    assert len(aucs) == len(contract.numeric_features + contract.categorical_features)
    assert max(aucs) < 0.9
    for r in report.results:  # GX on the same rows agrees with every exact count
        if "gx_sample_success" in r.observed:
            assert r.observed["gx_sample_success"] is True, r


def test_extra_columns_are_allowed(contract: DataContract) -> None:
    df = batch().assign(debug_note="x")
    assert validate_frame(df, contract, NOW).success


@pytest.mark.parametrize(
    ("fault", "expectation", "column"),
    [
        ("missing_column", "expect_column_to_exist", "merchant_risk_score"),
        ("renamed_column", "expect_column_to_exist", "amount"),
        ("null_storm", "expect_column_values_to_not_be_null", "amount"),
        ("out_of_range", "expect_column_values_to_be_between", "hour"),
        ("unknown_category", "expect_column_values_to_be_in_set", "channel"),
        ("duplicate_ids", "expect_column_values_to_be_unique", "transaction_id"),
    ],
)
def test_schema_fault_fails_on_the_right_column(
    contract: DataContract, fault: str, expectation: str, column: str
) -> None:
    report = validate_frame(batch(fault), contract, NOW)
    assert not report.success
    assert (expectation, column) in failed(report), report.summary()
    # the fault is pinned on its column, nothing else fails
    assert {c for _, c in failed(report)} == {column}
    assert column in report.summary()
    # the exact streaming counts and GX (here on every row) agree on every check
    for r in report.results:
        if "gx_sample_success" in r.observed:
            assert r.observed["gx_sample_success"] == r.success, r


def test_missing_column_fails_clearly_for_each_column_expectation(contract: DataContract) -> None:
    report = validate_frame(batch("missing_column"), contract, NOW)
    col = "merchant_risk_score"
    assert failed(report) == {
        ("expect_column_to_exist", col),
        ("expect_column_values_to_be_in_type_list", col),
        ("expect_column_values_to_not_be_null", col),
        ("expect_column_values_to_be_between", col),
        ("expect_column_unique_value_count_to_be_between", col),
        ("expect_column_to_not_predict_target_alone", col),
    }
    for r in report.failures():
        if r.expectation == "expect_column_to_exist":
            continue
        assert "does not exist" in r.observed["error"] or "missing" in r.observed["error"]
    # the summary names the cause, not the checks that could not run because of it
    assert report.summary().startswith("6 of ")
    assert "column merchant_risk_score exists (missing)" in report.summary()
    assert report.summary().count("merchant_risk_score") == 1


def test_out_of_range_reports_the_bad_values(contract: DataContract) -> None:
    report = validate_frame(batch("out_of_range"), contract, NOW)
    (failure,) = report.failures()
    assert failure.expected == {"min_value": 0, "max_value": 23}
    assert failure.observed["unexpected_count"] == 50
    assert failure.observed["partial_unexpected_list"] == [27] * 10
    assert "hour in [0, 23]" in report.summary()
    assert "e.g. [27]" in report.summary()


def test_null_fraction_within_tolerance_passes(contract: DataContract) -> None:
    df = batch()
    df.loc[df.index[:30], "merchant_risk_score"] = float("nan")  # 1% <= max_null_fraction 2%
    assert validate_frame(df, contract, NOW).success
    df.loc[df.index[:150], "merchant_risk_score"] = float("nan")  # 5%
    report = validate_frame(df, contract, NOW)
    assert failed(report) == {("expect_column_values_to_not_be_null", "merchant_risk_score")}


def test_future_event_time_fails_relative_to_now(contract: DataContract) -> None:
    df = batch()
    df.loc[df.index[:10], "event_time"] = NOW + pd.Timedelta(hours=1)
    report = validate_frame(df, contract, NOW)
    assert failed(report) == {("expect_column_values_to_be_between", "event_time")}
    # exactly "now" is not the future; and the verdict depends only on the `now` given
    df.loc[df.index[:10], "event_time"] = NOW
    assert validate_frame(df, contract, NOW).success
    assert not validate_frame(batch(), contract, pd.Timestamp("2025-12-31T00:00:00Z")).success


def test_naive_now_is_read_as_utc(contract: DataContract) -> None:
    df = batch()
    df.loc[df.index[:10], "event_time"] = NOW + pd.Timedelta(hours=1)
    assert not validate_frame(df, contract, NOW.tz_localize(None)).success
    assert validate_frame(batch(), contract, NOW.tz_localize(None)).success


def test_label_outside_target_values_fails(contract: DataContract) -> None:
    df = batch()
    df.loc[df.index[:5], "is_fraud"] = 2
    assert ("expect_column_values_to_be_in_set", "is_fraud") in failed(
        validate_frame(df, contract, NOW)
    )


@pytest.mark.parametrize("kind", ["no_rows", "no_columns"])
def test_empty_frame_fails(contract: DataContract, kind: str) -> None:
    df = batch().iloc[:0] if kind == "no_rows" else pd.DataFrame()
    report = validate_frame(df, contract, NOW)
    assert not report.success
    assert report.rows == 0
    row_count = [r for r in report.failures() if r.expectation.startswith("expect_table_row_count")]
    assert row_count and row_count[0].observed["observed_value"] == 0
    assert report.summary().startswith("empty batch (0 rows)")
    assert "row count" in report.summary()


def test_too_few_rows_fails(contract: DataContract) -> None:
    report = validate_frame(batch(rows=500), contract, NOW)
    assert failed(report) == {("expect_table_row_count_to_be_between", None)}


def test_extra_expectations_from_contract(contract: DataContract) -> None:
    extra = {
        "type": "expect_column_mean_to_be_between",
        "kwargs": {"column": "amount", "min_value": 1000, "max_value": 2000},
    }
    strict = dataclasses.replace(contract, extra_expectations=(extra,))
    report = validate_frame(batch(), strict, NOW)
    assert failed(report) == {("expect_column_mean_to_be_between", "amount")}
    assert isinstance(report.failures()[0].observed["observed_value"], float)

    bogus = dataclasses.replace(contract, extra_expectations=({"type": "expect_magic"},))
    with pytest.raises(ValueError, match="expect_magic"):
        build_suite(bogus, NOW)


@pytest.mark.parametrize("fault", ["none", "null_storm", "missing_column", "duplicate_ids"])
def test_to_dict_is_strict_json(contract: DataContract, fault: str) -> None:
    report = validate_frame(batch(fault), contract, NOW)
    payload = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert payload["success"] is report.success
    assert payload["rows"] == ROWS
    assert payload["failed"] == len(report.failures())
    assert len(payload["results"]) == len(report.results)


def test_html_lists_failures_first_and_is_self_contained(contract: DataContract) -> None:
    report = validate_frame(batch("unknown_category"), contract, NOW)
    page = render_html(report, title="batch <2026-06-01>")
    assert page.lstrip().startswith("<!DOCTYPE html>")
    assert "batch &lt;2026-06-01&gt;" in page
    first_row = page.index("<tbody>")
    assert page.index("FAIL", first_row) < page.index("PASS", first_row)
    assert "channel" in page and "crypto_atm" in page
    assert "src=" not in page and "href=" not in page


# ----------------------------------------------------------------------------- exact at scale


def test_counts_stay_exact_when_gx_sees_a_sample(contract: DataContract) -> None:
    df = batch("out_of_range")
    df.loc[df.index[2000:2100], "transaction_id"] = df["transaction_id"].iloc[:100].to_numpy()
    extra = {
        "type": "expect_column_mean_to_be_between",
        "kwargs": {"column": "amount", "min_value": 0, "max_value": 1e6},
    }
    report = validate_frame(
        df, dataclasses.replace(contract, extra_expectations=(extra,)), NOW, sample_rows=300
    )
    assert report.sample_rows == 300
    by = {(r.expectation, r.column): r for r in report.results}
    hour = by[("expect_column_values_to_be_between", "hour")]
    assert hour.source == "exact" and hour.observed["unexpected_count"] == 50
    ids = by[("expect_column_values_to_be_unique", "transaction_id")]
    assert ids.observed["unexpected_count"] == 200  # both copies of each repeated id
    rows = by[("expect_table_row_count_to_be_between", None)]
    assert rows.observed["observed_value"] == ROWS  # the batch, not the sample
    mean = by[("expect_column_mean_to_be_between", "amount")]
    assert mean.source == "gx-sample" and mean.observed["sample_rows"] == 300


def test_streaming_parquet_equals_frame(contract: DataContract, tmp_path: Path) -> None:
    from pipeline.ingest import parquet_bytes
    from pipeline.validate import validate_uri

    df = batch("unknown_category")
    path = tmp_path / "b.parquet"
    path.write_bytes(parquet_bytes(df, row_group_size=700))  # several row groups
    streamed = validate_uri(path.as_uri(), contract, NOW)
    framed = validate_frame(df, contract, NOW)
    assert streamed.to_dict() == framed.to_dict()


def test_numbers_as_strings_and_mixed_objects_fail_the_type_check(contract: DataContract) -> None:
    df = batch().assign(amount=lambda d: d["amount"].astype(str))
    df["card_age_days"] = df["card_age_days"].astype(object)
    df.loc[df.index[0], "card_age_days"] = "old"
    report = validate_frame(df, contract, NOW)
    types = {r.column: r for r in report.failures() if r.expectation.endswith("in_type_list")}
    assert set(types) == {"amount", "card_age_days"}
    assert types["amount"].observed["observed_value"] == "string"
    assert "mixed Python types" in types["card_age_days"].observed["observed_value"]
    assert "amount of contract type float (observed string)" in report.summary()


def test_constant_feature_and_label_leakage_fail(contract: DataContract) -> None:
    df = batch().assign(channel="pos", merchant_risk_score=lambda d: d["is_fraud"] * 0.9)
    report = validate_frame(df, contract, NOW)
    assert failed(report) == {
        ("expect_column_unique_value_count_to_be_between", "channel"),
        ("expect_column_to_not_predict_target_alone", "merchant_risk_score"),
    }
    leak = next(r for r in report.failures() if r.column == "merchant_risk_score")
    assert leak.observed["observed_value"] == 1.0 and 0 < leak.observed["error_bound_99"] < 0.2


def test_hostile_column_names_are_reported_not_used(contract: DataContract) -> None:
    df = batch().assign(**{"../../x": 1, "a\nb": 2, "y" * 10_000: 3})
    report = validate_frame(df, contract, NOW)
    (bad,) = report.failures()
    assert bad.expectation == "expect_column_names_to_be_safe_and_unique"
    assert bad.observed["unexpected_count"] == 3
    text = report.summary()
    assert "\n" not in text and "y" * 100 not in text and "(10000 chars)" in text
    assert all(len(n) <= 60 for n in report.extra_columns)


def test_unreadable_bytes_are_a_report_not_an_exception(
    contract: DataContract, tmp_path: Path
) -> None:
    from pipeline.validate import validate_uri

    path = tmp_path / "x.parquet"
    path.write_bytes(b"PAR1 not really")
    report = validate_uri(path.as_uri(), contract, NOW)
    assert not report.success and report.error and "not readable as Parquet" in report.summary()
    assert json.loads(json.dumps(report.to_dict(), allow_nan=False))["error"] == report.error


def test_id_hashes_are_equal_for_equal_values_and_collisions_are_resolved(
    contract: DataContract, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np
    import pyarrow as pa

    from pipeline import validate
    from pipeline.validate import scan

    a = pa.array(["a", "bb", "", None, "bb", "ccc", "a" * 300])
    h = validate.hash_values(a)
    assert h[1] == h[4] and len({h[0], h[1], h[2], h[5], h[6]}) == 5
    assert (validate.hash_values(a.slice(1, 4)) == h[1:5]).all()
    fixed = pa.array(["abc", "abd", "abc"])
    assert validate.hash_values(fixed)[0] == validate.hash_values(fixed)[2]
    assert validate.hash_values(pa.array([5, 7, 5])).tolist()[0] == 5
    # every id collides: the second pass on the values still counts only true duplicates
    monkeypatch.setattr(scan, "hash_values", lambda arr: np.zeros(len(arr), dtype=np.uint64))
    report = validate_frame(batch("duplicate_ids"), contract, NOW)
    ids = next(r for r in report.results if r.expectation == "expect_column_values_to_be_unique")
    assert ids.observed["unexpected_count"] == 100


# ----------------------------------------------------------------------------- leakage: new power

IRIS_FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def tabular_contract(
    tmp_path: Path, features: list[str], classes: list[int], extra: tuple[dict, ...] = (), **top
) -> DataContract:
    """A small contract written as YAML: an int id, float features, an int label (and the
    ``extra`` column declarations); no time column unless ``top`` names one."""
    doc = {
        "name": "tabular",
        "id_column": "id",
        "target": {"name": "label", "values": classes, "positive": classes[-1]},
        "row_count": {"min": 1},
        "columns": [
            {"name": "id", "type": "int", "unique": True},
            *({"name": f, "type": "float"} for f in features),
            {"name": "label", "type": "int", "min": min(classes), "max": max(classes)},
            *extra,
        ],
        **top,
    }
    path = tmp_path / "tabular.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_contract(path)


def iris() -> pd.DataFrame:
    from sklearn.datasets import load_iris

    df = load_iris(as_frame=True).frame
    df.columns = [*IRIS_FEATURES, "label"]
    return df.assign(label=df["label"].astype("int64")).rename_axis("id").reset_index()


def iris_batch() -> pd.DataFrame:
    """The 120-row 3-class training set that was wrongly quarantined."""
    return iris().sample(120, random_state=0).reset_index(drop=True)


def synthetic(rows: int, classes: int, seed: int = 0, **features) -> pd.DataFrame:
    """``rows`` rows with a balanced label in ``range(classes)``; each feature is a function
    of (label, rng) -> values."""
    rng = np.random.default_rng(seed)
    label = rng.permutation(np.arange(rows) % classes)
    cols = {name: fn(label, rng) for name, fn in features.items()}
    return pd.DataFrame({"id": np.arange(rows), **cols, "label": label.astype("int64")})


def _univariate_auc(df: pd.DataFrame, feature: str, cls: int) -> float:
    """An independent computation (sklearn) of the one-vs-rest univariate AUC."""
    from sklearn.metrics import roc_auc_score

    score = roc_auc_score(df["label"] == cls, df[feature])
    return max(score, 1 - score)


def _shuffled(df: pd.DataFrame, column: str) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    return df.assign(**{column: rng.permutation(df[column].to_numpy())})


def leak_result(report: ValidationReport, column: str):
    return next(
        r
        for r in report.results
        if r.expectation == "expect_column_to_not_predict_target_alone" and r.column == column
    )


NOISE = lambda y, rng: rng.normal(size=len(y))  # noqa: E731
COPY = lambda y, rng: y.astype(float)  # noqa: E731
STRONG = lambda y, rng: (y > 0) * 3.3 + rng.normal(size=len(y))  # noqa: E731  binary AUC ~0.99
ONE_CLASS = lambda y, rng: (y == 1) * 10.0 + rng.normal(size=len(y)) * 0.1  # noqa: E731


@pytest.mark.parametrize(
    ("case", "make", "feature", "passes", "mode", "in_summary"),
    [
        # iris, the champion's data had the same strong petal feature: passes, named as strong
        (
            "iris_reference_equally_strong",
            lambda: (iris_batch(), iris()),
            "petal_width",
            True,
            "reference",
            "came close",
        ),
        # the same feature carried no signal in the reference: new power, rejected
        (
            "iris_feature_weak_in_reference",
            lambda: (iris_batch(), _shuffled(iris(), "petal_width")),
            "petal_width",
            False,
            "reference",
            "gains no new power",
        ),
        # the feature did not exist in the reference: new power, rejected
        (
            "iris_feature_absent_from_reference",
            lambda: (iris_batch(), iris().drop(columns="petal_width")),
            "petal_width",
            False,
            "reference",
            "column absent from the reference",
        ),
        # no champion yet, 120 rows: too few to judge alone; skipped, and the report says why
        (
            "iris_no_reference_few_rows",
            lambda: (iris_batch(), None),
            "petal_length",
            True,
            "no reference",
            "leakage.min_rows",
        ),
        # no champion, enough rows, a copy of the label: rejected
        (
            "label_copy_no_reference",
            lambda: (synthetic(1200, 2, noise=NOISE, leak=COPY), None),
            "leak",
            False,
            "no reference",
            "does not predict label alone",
        ),
        # no champion, enough rows, strong (AUC ~0.99) but below the 0.999 bar: passes, named
        (
            "strong_feature_no_reference",
            lambda: (synthetic(1200, 2, noise=NOISE, leak=STRONG), None),
            "leak",
            True,
            "no reference",
            "came close",
        ),
        # 3 classes: the feature separates class 1 only (weak for the positive class 2)
        (
            "multiclass_one_vs_rest",
            lambda: (synthetic(1200, 3, noise=NOISE, leak=ONE_CLASS), None),
            "leak",
            False,
            "no reference",
            "class 1 vs rest",
        ),
    ],
)
def test_leakage_is_new_predictive_power(
    tmp_path: Path, case: str, make, feature: str, passes: bool, mode: str, in_summary: str
) -> None:
    batch_df, reference = make()
    features = [c for c in batch_df.columns if c not in ("id", "label")]
    classes = sorted(int(v) for v in batch_df["label"].unique())
    contract = tabular_contract(tmp_path, features, classes)
    report = validate_frame(batch_df, contract, NOW, reference=reference)
    leak = leak_result(report, feature)
    assert leak.success is passes, (case, report.summary())
    assert leak.observed["mode"] == mode
    # the code's AUC agrees with sklearn's on the same rows (every row: no sampling here), for
    # the class it names (one-vs-rest); without a reference that is the worst class
    cls = leak.observed.get("class", contract.positive_label)
    assert leak.observed["observed_value"] == pytest.approx(
        _univariate_auc(batch_df, feature, cls), abs=1e-6
    )
    if mode == "no reference":
        worst = max(_univariate_auc(batch_df, feature, k) for k in classes)
        assert leak.observed["observed_value"] == pytest.approx(worst, abs=1e-6)
    assert in_summary in report.summary(), report.summary()
    # only the feature under test can be the one that fails
    assert {c for _, c in failed(report)} <= {feature}
    assert report.success is passes
    if len(classes) > 2:
        assert leak.observed["class"] in classes
    if not passes:
        assert feature in report.summary()
    if mode == "reference":
        assert leak.observed["reference_rows"] == len(reference)
        assert leak.observed["rise"] == pytest.approx(
            leak.observed["observed_value"] - (leak.observed["reference_value"] or 0.5), abs=1e-5
        )
    json.loads(json.dumps(report.to_dict(), allow_nan=False))


def test_passing_strong_features_are_named_for_a_reviewer(tmp_path: Path) -> None:
    contract = tabular_contract(tmp_path, IRIS_FEATURES, [0, 1, 2])
    report = validate_frame(iris_batch(), contract, NOW, reference=iris())
    assert report.success, report.summary()
    near = [r.column for r in report.results if r.observed.get("near")]
    assert "petal_length" in near and "petal_width" in near
    assert all(
        r.observed["observed_value"] >= 0.9 for r in report.results if r.observed.get("near")
    )
    (note,) = [n for n in report.notes if "came close" in n]
    assert "petal_length" in note and "reference" in note
    assert note in report.summary() and note in report.to_dict()["notes"]
    assert "came close" in render_html(report, title="iris")


def test_no_reference_few_rows_is_skipped_with_the_reason(tmp_path: Path) -> None:
    contract = tabular_contract(tmp_path, IRIS_FEATURES, [0, 1, 2])
    report = validate_frame(iris_batch(), contract, NOW)
    assert report.success
    leak = leak_result(report, "petal_length")
    assert "120 rows < leakage.min_rows 1000" in leak.observed["skipped"]
    assert "not evaluated" in leak.describe()
    assert any("leakage check skipped for 4 features" in n for n in report.notes)


@pytest.mark.parametrize(
    ("leakage", "rows", "passes"),
    [
        ({}, 1200, False),  # defaults: max_auc 0.999, min_rows 1000
        ({"min_rows": 2000}, 1200, True),  # below min_rows: skipped
        ({"max_auc": 0.98}, 1200, False),
        ({"min_rows": 100}, 200, False),
    ],
)
def test_no_reference_rule_follows_the_contract(
    tmp_path: Path, leakage: dict, rows: int, passes: bool
) -> None:
    contract = tabular_contract(tmp_path, ["noise", "leak"], [0, 1], leakage=leakage)
    report = validate_frame(synthetic(rows, 2, noise=NOISE, leak=COPY), contract, NOW)
    assert leak_result(report, "leak").success is passes
    assert leak_result(report, "noise").success


@pytest.mark.parametrize(
    ("leakage", "passes"),
    [
        ({}, False),  # new power: AUC ~0.99 now, ~0.5 in the reference
        ({"max_rise": 0.49}, True),  # a rise that big is allowed
        ({"reference_auc": 0.999}, True),  # the bar is not reached
    ],
)
def test_reference_rule_follows_the_contract(tmp_path: Path, leakage: dict, passes: bool) -> None:
    contract = tabular_contract(tmp_path, ["noise", "leak"], [0, 1], leakage=leakage)
    batch_df = synthetic(1200, 2, noise=NOISE, leak=STRONG)
    reference = synthetic(1500, 2, seed=3, noise=NOISE, leak=NOISE)
    report = validate_frame(batch_df, contract, NOW, reference=reference)
    assert leak_result(report, "leak").success is passes, report.summary()


def test_reference_uri_matches_reference_frame_and_a_bad_reference_is_reported(
    tmp_path: Path,
) -> None:
    from pipeline.ingest import parquet_bytes
    from pipeline.validate import validate_uri

    contract = tabular_contract(tmp_path, IRIS_FEATURES, [0, 1, 2])
    batch_path, ref_path = tmp_path / "batch.parquet", tmp_path / "ref.parquet"
    batch_path.write_bytes(parquet_bytes(iris_batch()))
    weak = _shuffled(iris(), "petal_width")
    ref_path.write_bytes(parquet_bytes(weak, row_group_size=40))
    streamed = validate_uri(batch_path.as_uri(), contract, NOW, reference_uri=ref_path.as_uri())
    framed = validate_frame(iris_batch(), contract, NOW, reference=weak)
    assert streamed.to_dict() == framed.to_dict()
    assert failed(streamed) == {("expect_column_to_not_predict_target_alone", "petal_width")}
    # the reference is sampled, bounded by sample_rows
    small = validate_uri(
        batch_path.as_uri(), contract, NOW, reference_uri=ref_path.as_uri(), sample_rows=100
    )
    assert leak_result(small, "petal_width").observed["reference_rows"] == 100
    # an unreadable reference: reported, and the no-reference rule applies
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 not really")
    report = validate_uri(batch_path.as_uri(), contract, NOW, reference_uri=bad.as_uri())
    assert report.success
    assert leak_result(report, "petal_width").observed["mode"] == "no reference"
    assert any("leakage reference not used" in n for n in report.notes)
    assert "leakage reference not used" in report.summary()
    # no reference_uri at all: the existing call shape still works
    assert validate_uri(batch_path.as_uri(), contract, NOW).success


# ----------------------------------------------------------------------------- no time column


def test_contract_without_time_column_skips_time_checks(tmp_path: Path) -> None:
    contract = tabular_contract(tmp_path, IRIS_FEATURES, [0, 1, 2])
    assert contract.time_column is None
    report = validate_frame(iris_batch(), contract, NOW)
    assert report.success, report.summary()
    assert NO_TIME_COLUMN_NOTE in report.notes
    assert "no time column in the contract: time checks skipped" in report.summary()
    assert NO_TIME_COLUMN_NOTE in report.to_dict()["summary"]
    checks = contract_checks(contract, NOW)
    assert not any(isinstance(c.kwargs.get("max_value"), pd.Timestamp) for c in checks)


def test_contract_with_time_column_still_checks_future_times(tmp_path: Path) -> None:
    df = iris_batch().assign(ts=NOW - pd.Timedelta(days=1))
    contract = tabular_contract(
        tmp_path, IRIS_FEATURES, [0, 1, 2], ({"name": "ts", "type": "timestamp"},), time_column="ts"
    )
    assert "ts" not in [c.name for c in contract.features]
    report = validate_frame(df, contract, NOW)
    assert report.success and NO_TIME_COLUMN_NOTE not in report.notes
    df.loc[df.index[:3], "ts"] = NOW + pd.Timedelta(hours=1)
    assert failed(validate_frame(df, contract, NOW)) == {
        ("expect_column_values_to_be_between", "ts")
    }


# ----------------------------------------------------------------------------- import cost


def test_pure_modules_import_no_gx_mlflow_or_storage() -> None:
    """The report, checks and exact-mapping modules (and the package itself) load neither
    Great Expectations (seconds to import) nor MLflow, boto3 or the storage layer."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import pipeline.validate.report, pipeline.validate.checks, pipeline.validate.exact\n"
        "import pipeline.validate\n"
        "heavy = ['great_expectations', 'mlflow', 'boto3', 'pipeline.storage']\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
