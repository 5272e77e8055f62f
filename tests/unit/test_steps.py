"""Stage functions: idempotent by run key, which batch a run reads, records stay small."""

from __future__ import annotations

import json

import pytest

from pipeline import registry, steps, storage
from pipeline.data.generate import WorldSpec, generate, to_parquet_bytes


@pytest.fixture
def batch(pipeline_home):
    root = (pipeline_home / "storage").as_uri()
    return storage.write_bytes(
        f"{root}/landing/card_fraud/b.parquet",
        to_parquet_bytes(generate(WorldSpec(rows=2000, seed=1))),
    ).uri


def test_ingest_is_idempotent_per_run(batch):
    ctx = steps.RunContext("dag", "run-1", "2026-03-01T00:00:00Z")
    first = steps.ingest_batch(ctx, batch)
    again = steps.ingest_batch(ctx, batch)
    assert first == again  # same snapshot, same MLflow run
    assert first["sha256"] == storage.digest_of(batch)
    other = steps.ingest_batch(steps.RunContext("dag", "run-2"), batch)
    assert other["uri"] == first["uri"]  # content-addressed snapshot
    assert other["mlflow_run_id"] != first["mlflow_run_id"]


def test_records_are_small_json(batch):
    rec = steps.ingest_batch(steps.RunContext("dag", "r"), batch)
    assert len(json.dumps(rec)) < 2000


def test_missing_batch_says_where_to_look(pipeline_home):
    missing = (pipeline_home / "storage" / "landing" / "card_fraud" / "nope.parquet").as_uri()
    with pytest.raises(FileNotFoundError, match="check the batch_uri param"):
        steps.ingest_batch(steps.RunContext("dag", "r"), missing)


LANDING = "/storage/landing/card_fraud"


@pytest.mark.parametrize(
    ("param", "extras", "expected_suffix"),
    [
        ("{land}/a.parquet", [{"batch_uri": "{land}/b.parquet"}], f"{LANDING}/a.parquet"),
        ("", [{"batch_uri": "{land}/b.parquet"}], f"{LANDING}/b.parquet"),
        ("", [{}], f"{LANDING}/date=2026-03-05/batch.parquet"),
        ("", [], f"{LANDING}/date=2026-03-05/batch.parquet"),
    ],
)
def test_resolve_batch_uri(pipeline_home, param, extras, expected_suffix):
    land = (pipeline_home / "storage" / "landing" / "card_fraud").as_uri()
    extras = [{k: v.format(land=land) for k, v in e.items()} for e in extras]
    uri = steps.resolve_batch_uri(param.format(land=land), extras, "2026-03-05T03:00:00+00:00")
    assert uri.endswith(expected_suffix)


@pytest.mark.parametrize(
    "where",
    [
        "file:///proc/self/environ",
        "/etc/passwd",
        "{storage}/checkpoints/x/model.safetensors",
        "{storage}/landing/digits/b.parquet",
        "{storage}/landing/card_fraud/../../keys/k",
        "{storage}/landing/card_fraud_other/b.parquet",
        "s3://someone-elses-bucket/b.parquet",
        "relative/b.parquet",
    ],
)
def test_a_batch_outside_the_landing_prefix_is_refused_before_it_is_read(pipeline_home, where):
    """A trigger (Param, asset event, CLI) can point only at the model's own landing prefix."""
    from pipeline.spec import PolicyViolation
    from pipeline.storage import UnsafePathError

    uri = where.format(storage=(pipeline_home / "storage").as_uri())
    with pytest.raises((PolicyViolation, UnsafePathError)):
        steps.resolve_batch_uri(uri, [], "2026-03-05T03:00:00+00:00")
    with pytest.raises((PolicyViolation, UnsafePathError)):
        steps.ingest_batch(steps.RunContext("dag", "r"), uri)
    assert not (pipeline_home / "storage" / "snapshots").exists()  # nothing was read or copied


def test_a_symlink_out_of_the_landing_prefix_is_refused(pipeline_home, tmp_path):
    from pipeline.spec import PolicyViolation

    land = pipeline_home / "storage" / "landing" / "card_fraud"
    land.mkdir(parents=True)
    secret = tmp_path / "secret.parquet"
    secret.write_bytes(b"PAR1 not yours")
    (land / "link.parquet").symlink_to(secret)
    with pytest.raises(PolicyViolation, match="outside model 'card_fraud'"):
        steps.ingest_batch(steps.RunContext("dag", "r"), (land / "link.parquet").as_uri())


def test_run_key_is_safe_for_paths_and_filters():
    ctx = steps.RunContext("retrain_model", "manual__2026-03-01T00:00:00+00:00")
    assert ctx.run_key == "retrain_model__manual__2026-03-01T00_00_00_00_00"


def test_summary_reads_verdicts_back_from_mlflow(batch):
    ctx = steps.RunContext("dag", "r-sum")
    steps.ingest_batch(ctx, batch)
    summary = steps.publish_summary(ctx)
    assert summary["stages"]["ingest_batch"]["verdict"] == "ok"
    assert summary["stages"]["train_model"]["verdict"] == "not_run"
    assert summary["champion_version"] is None
    assert registry.client().get_run(summary["mlflow_run_id"]).info.status == "FINISHED"


def test_a_missing_trusted_set_fails_the_gate_at_once_saying_what_to_do(pipeline_home):
    """Not retried as if transient, and never replaced by the landing batch."""
    from pipeline.errors import DataRejected

    with pytest.raises(
        DataRejected,
        match="no trusted evaluation set at .*trusted/card_fraud/eval.parquet"
        ".*data land --model card_fraud --file eval.parquet --as-eval",
    ):
        steps.gate_promotion(
            steps.RunContext("dag", "r"), {"mlflow_run_id": "x", "model_version": "1"}
        )
