"""Bad batches through the real stages: ``stages.ingest_batch`` then ``stages.validate_batch``.

Every bad input is rejected with an error that names the problem, moved (never deleted)
to the quarantine with its report and a reason file, byte for byte; accepted and
rejected batches are counted in the ledger and on the MLflow run.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline import quarantine, registry, stages, storage
from pipeline.data.generate import WorldSpec, generate
from pipeline.errors import DataRejected
from pipeline.ingest import parquet_bytes

NOW = "2026-06-01T00:00:00Z"
ROWS = 3000


@pytest.fixture(scope="module")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated, empty MLflow SQLite store: a fresh one costs ~1.5 s of migrations."""
    from pipeline import settings

    home = tmp_path_factory.mktemp("template")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PIPELINE_HOME", str(home))
        mp.delenv("PIPELINE_MLFLOW_TRACKING_URI", raising=False)
        settings.get_settings.cache_clear()
        registry.client.cache_clear()
        registry.client().search_experiments()
    settings.get_settings.cache_clear()
    registry.client.cache_clear()
    return home / "mlflow" / "mlflow.db"


@pytest.fixture
def home(pipeline_home: Path, mlflow_template: Path) -> Path:
    (pipeline_home / "mlflow").mkdir(parents=True)
    shutil.copy(mlflow_template, pipeline_home / "mlflow" / "mlflow.db")
    return pipeline_home


def clean() -> pd.DataFrame:
    return generate(WorldSpec(rows=ROWS, seed=11))


def land(home: Path, name: str, data: bytes) -> str:
    return storage.write_bytes(
        (home / "storage" / "landing" / "card_fraud" / f"{name}.parquet").as_uri(), data
    ).uri


def run_stages(uri: str, run_id: str = "r1") -> tuple[dict, dict]:
    ctx = stages.RunContext(dag_id="test", run_id=run_id, run_after=NOW)
    ingested = stages.ingest_batch(ctx, uri)
    return ingested, stages.validate_batch(ctx, ingested)


def reject(home: Path, name: str, data: bytes, *fragments: str) -> tuple[str, str]:
    """Land ``data``, run the stages, expect a rejection naming ``fragments``; check the
    quarantine holds the exact bytes, the report and the reason. Returns (message, root)."""
    uri = land(home, name, data)
    sha = storage.sha256_bytes(data)
    with pytest.raises(DataRejected) as err:
        run_stages(uri, run_id=name)
    message = str(err.value)
    for fragment in fragments:
        assert fragment in message, message
    assert "rejected by the data contract" in message and "Report: " in message
    root = quarantine.quarantine_root(sha)
    assert root in message
    assert not storage.exists(uri)  # moved, not copied
    kept = storage.read_bytes(storage.join(root, "batch.parquet"))
    assert storage.sha256_bytes(kept) == sha  # nothing lost
    report = json.loads(storage.read_text(storage.join(root, "validation.json")))
    assert report["success"] is False and report["failed"] >= 1
    assert storage.read_text(storage.join(root, "reason.txt")).strip() == report["summary"]
    assert storage.exists(storage.join(root, "validation.html"))
    ledger = storage.list_uris(
        storage.join(
            storage.join(str(home.as_uri()), "storage"), "ledger", "card_fraud", "rejected"
        )
    )
    assert any(u.endswith(f"/{sha}.json") for u in ledger)
    return message, root


def frame_bytes(mutate: Callable[[pd.DataFrame], pd.DataFrame | None]) -> bytes:
    df = clean()
    out = mutate(df)
    return parquet_bytes(df if out is None else out)


# ----------------------------------------------------------------------------- files


def test_empty_file(home: Path) -> None:
    reject(home, "empty", b"", "not readable as Parquet", "0 bytes")


def test_truncated_parquet(home: Path) -> None:
    data = parquet_bytes(clean())
    reject(home, "truncated", data[: len(data) // 2], "not readable as Parquet")


def test_corrupted_data_page_is_caught_by_its_checksum(home: Path) -> None:
    data = bytearray(parquet_bytes(clean()))
    meta = pq.ParquetFile(io.BytesIO(bytes(data))).metadata
    names = [meta.schema.column(i).name for i in range(meta.num_columns)]
    chunk = meta.row_group(0).column(names.index("amount"))
    data[chunk.data_page_offset + chunk.total_compressed_size // 2] ^= 0xFF
    message, _ = reject(home, "corrupt", bytes(data), "not readable as Parquet")
    assert "checksum" in message.lower() or "crc" in message.lower()


def test_zero_rows(home: Path) -> None:
    reject(home, "zero_rows", parquet_bytes(clean().iloc[:0]), "empty batch (0 rows)", "row count")


# ----------------------------------------------------------------------------- schema


def test_missing_column(home: Path) -> None:
    reject(
        home,
        "missing",
        frame_bytes(lambda df: df.drop(columns=["merchant_risk_score"])),
        "column merchant_risk_score exists (missing)",
    )


def test_renamed_column_names_both_sides(home: Path) -> None:
    message, _ = reject(
        home,
        "renamed",
        frame_bytes(lambda df: df.rename(columns={"amount": "amount_usd"})),
        "column amount exists (missing)",
    )
    assert "amount_usd" in message  # the extra column is reported


def test_extra_column_is_allowed_and_reported(home: Path) -> None:
    uri = land(home, "extra", frame_bytes(lambda df: df.assign(debug_note="x")))
    _, validated = run_stages(uri)
    assert validated.verdict == "pass"
    assert validated.extra_columns == ["debug_note"]
    assert "debug_note" in validated.summary
    assert validated.ledger == {"accepted": 1, "rejected": 0}
    assert storage.exists(uri)  # accepted batches stay where they landed


def test_numbers_as_strings_fail_the_type_check(home: Path) -> None:
    reject(
        home,
        "strings",
        frame_bytes(lambda df: df.assign(amount=df["amount"].astype(str))),
        "amount of contract type float (observed string)",
    )


def test_nan_and_inf_in_a_feature(home: Path) -> None:
    def mutate(df: pd.DataFrame) -> None:
        rng = np.random.default_rng(0)
        col = "distance_from_home_km"
        df.loc[rng.uniform(size=len(df)) < 0.3, col] = np.nan
        df.loc[df.index[:5], col] = np.inf
        df.loc[df.index[5:10], col] = -np.inf

    message, root = reject(home, "nan_inf", frame_bytes(mutate), "distance_from_home_km not null")
    report = json.loads(storage.read_text(storage.join(root, "validation.json")))
    between = next(
        r
        for r in report["results"]
        if r["column"] == "distance_from_home_km"
        and r["expectation"] == "expect_column_values_to_be_between"
    )
    assert between["success"] is False and between["observed"]["unexpected_count"] == 10


def test_constant_column(home: Path) -> None:
    reject(
        home,
        "constant",
        frame_bytes(lambda df: df.assign(merchant_risk_score=0.5)),
        "merchant_risk_score not constant",
        "1 distinct",
    )


def test_duplicated_ids(home: Path) -> None:
    def mutate(df: pd.DataFrame) -> None:
        df.loc[df.index[1000:1100], "transaction_id"] = df["transaction_id"].iloc[:100].to_numpy()

    message, root = reject(home, "dupes", frame_bytes(mutate), "transaction_id unique", "200 rows")
    assert "t00011-00000000" in message


def test_extreme_values(home: Path) -> None:
    def mutate(df: pd.DataFrame) -> None:
        df.loc[df.index[:3], "amount"] = 1e308
        df.loc[df.index[3:6], "amount"] = -12.5

    reject(
        home, "extreme", frame_bytes(mutate), "amount in [0, 100000]", "6 rows", "1e+308", "-12.5"
    )


def test_unknown_categories(home: Path) -> None:
    def mutate(df: pd.DataFrame) -> None:
        df.loc[df.index[:40], "channel"] = "crypto_atm"

    reject(home, "unknown_cat", frame_bytes(mutate), "channel in set", "'crypto_atm'")


def test_label_outside_the_contract(home: Path) -> None:
    def mutate(df: pd.DataFrame) -> None:
        df.loc[df.index[:7], "is_fraud"] = 2

    reject(home, "bad_label", frame_bytes(mutate), "is_fraud in set", "7 rows")


def test_label_copied_into_a_feature_is_leakage(home: Path) -> None:
    reject(
        home,
        "leak",
        frame_bytes(lambda df: df.assign(merchant_risk_score=df["is_fraud"].astype(float))),
        "merchant_risk_score does not predict is_fraud alone",
        "AUC 1.0000",
    )


def test_hostile_column_names_are_data(home: Path) -> None:
    evil = ["../../escape", "line\nbreak", "x" * 10_000]
    message, root = reject(
        home,
        "names",
        frame_bytes(lambda df: df.assign(**dict.fromkeys(evil, 1.0))),
        "column names printable",
        "3 bad",
    )
    assert "x" * 100 not in message and "\n" not in message.split("Report:")[0].split(": ", 1)[1]
    # nothing was written outside the storage root, and no path holds a column name
    everything = list(home.parent.rglob("*"))
    assert not any(
        "escape" in p.name or "break" in p.name or "xxxxxxxxxx" in p.name for p in everything
    )
    # MLflow keys are fixed names: tags and metrics never carry a column name
    run = registry.client().search_runs([registry.experiment_id()])[0]
    for key in [*run.data.tags, *run.data.metrics]:
        assert "escape" not in key and "\n" not in key and len(key) < 100


# ----------------------------------------------------------------------------- reruns


def test_rerun_gives_the_same_verdict_and_counts_once(home: Path) -> None:
    good = land(home, "good", parquet_bytes(clean()))
    bad_bytes = frame_bytes(lambda df: df.assign(hour=27))
    bad = land(home, "bad", bad_bytes)
    _, first = run_stages(good, run_id="a")
    assert first.verdict == "pass"
    ctx = stages.RunContext(dag_id="test", run_id="b", run_after=NOW)
    ingested = stages.ingest_batch(ctx, bad)
    with pytest.raises(DataRejected) as once:
        stages.validate_batch(ctx, ingested)
    with pytest.raises(DataRejected) as twice:  # a retry of the task: same record, same bytes
        stages.validate_batch(ctx, ingested)
    assert str(once.value) == str(twice.value)
    with pytest.raises(DataRejected, match="already rejected"):  # a re-run of the DAG
        stages.ingest_batch(stages.RunContext(dag_id="test", run_id="c", run_after=NOW), bad)
    # the same bytes landed again under another name: rejected again, counted once
    again = land(home, "bad_again", bad_bytes)
    with pytest.raises(DataRejected, match="hour in \\[0, 23\\]"):
        run_stages(again, run_id="d")
    _, second = run_stages(
        land(home, "good2", parquet_bytes(generate(WorldSpec(rows=ROWS, seed=12)))), "e"
    )
    assert second.ledger == {"accepted": 2, "rejected": 1}
    run = registry.client().get_run(second.mlflow_run_id)
    assert run.data.metrics["batches.accepted_total"] == 2
    assert run.data.metrics["batches.rejected_total"] == 1


# ------------------------------------------------------------- who owns a rejected batch


def test_a_batch_from_an_allowed_source_is_copied_to_quarantine_and_left_in_place(
    home: Path, tmp_path: Path
) -> None:
    """The pipeline moves only what it owns (its landing prefix): a producer's own folder,
    listed in the spec's landing.allowed_sources, keeps its file when the batch is rejected."""
    from pipeline import spec as specs

    producer = tmp_path / "producer-folder"
    card = specs.get_spec("card_fraud")
    mine = card.model_copy(
        update={
            "landing": specs.LandingSpec(
                prefix=card.landing_prefix, allowed_sources=[str(producer)]
            )
        }
    )
    data = frame_bytes(lambda df: df.assign(hour=99))  # out of range: rejected
    src = producer / "batch.parquet"
    producer.mkdir()
    src.write_bytes(data)
    with specs.use_spec(mine), pytest.raises(DataRejected, match="copied to"):
        run_stages(src.as_uri(), run_id="outside")
    assert src.read_bytes() == data  # the producer's file is untouched
    root = quarantine.quarantine_root(storage.sha256_bytes(data))
    assert storage.read_bytes(storage.join(root, "batch.parquet")) == data  # and quarantined
    # the same file is still refused by a re-run, from the quarantine index, not moved again
    with specs.use_spec(mine), pytest.raises(DataRejected):
        run_stages(src.as_uri(), run_id="outside-again")
    assert src.read_bytes() == data
    # without the allowed source, the same path is refused before it is read
    with pytest.raises(specs.PolicyViolation, match="allowed_sources"):
        run_stages(src.as_uri(), run_id="not-allowed")
