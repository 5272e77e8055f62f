"""Stage functions: idempotent by run key, which batch a run reads, typed records stay small."""

from __future__ import annotations

import json

import pytest

from pipeline import registry, stages, storage
from pipeline.data.generate import WorldSpec, generate, to_parquet_bytes


@pytest.fixture
def batch(pipeline_home):
    root = (pipeline_home / "storage").as_uri()
    return storage.write_bytes(
        f"{root}/landing/card_fraud/b.parquet",
        to_parquet_bytes(generate(WorldSpec(rows=2000, seed=1))),
    ).uri


def test_ingest_is_idempotent_per_run(batch):
    ctx = stages.RunContext("dag", "run-1", "2026-03-01T00:00:00Z")
    first = stages.ingest_batch(ctx, batch)
    again = stages.ingest_batch(ctx, batch)
    assert first == again  # same snapshot, same MLflow run
    assert first.sha256 == storage.digest_of(batch)
    other = stages.ingest_batch(stages.RunContext("dag", "run-2"), batch)
    assert other.uri == first.uri  # content-addressed snapshot
    assert other.mlflow_run_id != first.mlflow_run_id


def test_records_are_small_json(batch):
    rec = stages.ingest_batch(stages.RunContext("dag", "r"), batch)
    assert len(json.dumps(rec.to_xcom())) < 2000


def test_missing_batch_says_where_to_look(pipeline_home):
    missing = (pipeline_home / "storage" / "landing" / "card_fraud" / "nope.parquet").as_uri()
    with pytest.raises(FileNotFoundError, match="check the batch_uri param"):
        stages.ingest_batch(stages.RunContext("dag", "r"), missing)


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
    uri = stages.resolve_batch_uri(param.format(land=land), extras, "2026-03-05T03:00:00+00:00")
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
        stages.resolve_batch_uri(uri, [], "2026-03-05T03:00:00+00:00")
    with pytest.raises((PolicyViolation, UnsafePathError)):
        stages.ingest_batch(stages.RunContext("dag", "r"), uri)
    assert not (pipeline_home / "storage" / "snapshots").exists()  # nothing was read or copied


def test_a_symlink_out_of_the_landing_prefix_is_refused(pipeline_home, tmp_path):
    from pipeline.spec import PolicyViolation

    land = pipeline_home / "storage" / "landing" / "card_fraud"
    land.mkdir(parents=True)
    secret = tmp_path / "secret.parquet"
    secret.write_bytes(b"PAR1 not yours")
    (land / "link.parquet").symlink_to(secret)
    with pytest.raises(PolicyViolation, match="outside model 'card_fraud'"):
        stages.ingest_batch(stages.RunContext("dag", "r"), (land / "link.parquet").as_uri())


def test_run_key_is_safe_for_paths_and_filters():
    ctx = stages.RunContext("retrain_model", "manual__2026-03-01T00:00:00+00:00")
    assert ctx.run_key == "retrain_model__manual__2026-03-01T00_00_00_00_00"


def test_summary_reads_verdicts_back_from_mlflow(batch):
    ctx = stages.RunContext("dag", "r-sum")
    stages.ingest_batch(ctx, batch)
    summary = stages.publish_summary(ctx)
    assert summary.stages["ingest_batch"]["verdict"] == "ok"
    assert summary.stages["train_model"]["verdict"] == "not_run"
    assert summary.champion_version is None
    assert registry.client().get_run(summary.mlflow_run_id).info.status == "FINISHED"


def test_a_missing_trusted_set_fails_the_gate_at_once_saying_what_to_do(pipeline_home):
    """Not retried as if transient, and never replaced by the landing batch."""
    from pipeline.errors import DataRejected

    with pytest.raises(
        DataRejected,
        match="no trusted evaluation set at .*trusted/card_fraud/eval.parquet"
        ".*data land --model card_fraud --file eval.parquet --as-eval",
    ):
        stages.gate_promotion(
            stages.RunContext("dag", "r"),
            stages.Registered(
                verdict="registered", model_name="card-fraud", model_version="1", mlflow_run_id="x"
            ),
        )


# -- typed records --------------------------------------------------------------------------


def test_a_record_crosses_xcom_and_back_unchanged(batch):
    rec = stages.ingest_batch(stages.RunContext("dag", "rt"), batch)
    wire = json.loads(json.dumps(rec.to_xcom()))  # what XCom and --in carry
    assert wire["stage"] == "ingest_batch" and stages.Ingested.from_xcom(wire) == rec
    from pipeline.stages.records import from_xcom

    assert from_xcom(wire) == rec


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"snapshot_uri": "x"}, "unknown key\\(s\\) \\['snapshot_uri'\\]"),  # a renamed field
        ({"stage": "train_model"}, "expected the ingest_batch record, got the train_model"),
    ],
)
def test_a_record_with_a_renamed_or_foreign_key_is_refused(batch, change, says):
    from pipeline.stages.records import RecordError

    wire = stages.ingest_batch(stages.RunContext("dag", "rk"), batch).to_xcom()
    with pytest.raises(RecordError, match=says):
        stages.Ingested.from_xcom({**wire, **change})
    del wire["sha256"]
    with pytest.raises(RecordError, match="sha256"):
        stages.Ingested.from_xcom(wire)


def test_the_vocabulary_is_the_one_the_stages_write(batch):
    """The stage tags on a real run are the vocabulary's names (pipeline.names)."""
    from pipeline import names

    ctx = stages.RunContext("dag", "voc")
    rec = stages.ingest_batch(ctx, batch)
    tags = registry.client().get_run(rec.mlflow_run_id).data.tags
    assert tags[names.stage_verdict_tag(names.Task.INGEST_BATCH)] == rec.verdict
    assert tags[names.RunTag.RUN_KEY] == ctx.run_key == names.run_key("dag", "voc")
    assert tags[names.RunTag.SNAPSHOT_SHA256] == rec.sha256
    assert names.safe_key("a/b c") == "a_b_c"
