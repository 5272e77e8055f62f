"""Contract validation (Great Expectations) on generated batches."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest

from pipeline.contract import DataContract, load_contract
from pipeline.data.generate import WorldSpec, generate
from pipeline.validate import ValidationReport, build_suite, render_html, validate_frame

CONTRACT_PATH = Path(__file__).resolve().parents[2] / "contracts" / "transactions.yaml"
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
    extra = {"type": "expect_column_mean_to_be_between",
             "kwargs": {"column": "amount", "min_value": 0, "max_value": 1e6}}  # fmt: skip
    report = validate_frame(df, dataclasses.replace(contract, extra_expectations=(extra,)), NOW,
                            sample_rows=300)  # fmt: skip
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


def test_unreadable_bytes_are_a_report_not_an_exception(contract: DataContract, tmp_path: Path) -> None:
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

    a = pa.array(["a", "bb", "", None, "bb", "ccc", "a" * 300])
    h = validate.hash_values(a)
    assert h[1] == h[4] and len({h[0], h[1], h[2], h[5], h[6]}) == 5
    assert (validate.hash_values(a.slice(1, 4)) == h[1:5]).all()
    fixed = pa.array(["abc", "abd", "abc"])
    assert validate.hash_values(fixed)[0] == validate.hash_values(fixed)[2]
    assert validate.hash_values(pa.array([5, 7, 5])).tolist()[0] == 5
    # every id collides: the second pass on the values still counts only true duplicates
    monkeypatch.setattr(validate, "hash_values", lambda arr: np.zeros(len(arr), dtype=np.uint64))
    report = validate_frame(batch("duplicate_ids"), contract, NOW)
    ids = next(r for r in report.results if r.expectation == "expect_column_values_to_be_unique")
    assert ids.observed["unexpected_count"] == 100
