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


# -- confined URIs: a trigger (Param, asset event, CLI) reads only under the model's roots ----------


@pytest.fixture
def roots(pipeline_home, tmp_path):
    """A landed batch, a trusted set, and a secret outside both, with links leading out."""
    storage_dir = pipeline_home / "storage"
    land = storage_dir / "landing" / "card_fraud"
    trusted = storage_dir / "trusted"
    for folder in (land, trusted / "card_fraud"):
        folder.mkdir(parents=True)
    data = to_parquet_bytes(generate(WorldSpec(rows=300, seed=1)))
    (land / "b.parquet").write_bytes(data)
    (trusted / "card_fraud" / "eval.parquet").write_bytes(data)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.parquet").write_bytes(data)  # readable Parquet: only the check stops it
    for folder in (land, trusted):
        (folder / "link.parquet").symlink_to(outside / "secret.parquet")
        (folder / "linkdir").symlink_to(outside)  # a symlinked parent folder
    return {"storage": storage_dir, "land": land, "trusted": trusted, "outside": outside}


def _state(*folders):
    """Every file under the folders, with its bytes' digest and mtime (links not followed)."""
    out = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            st = p.lstat()
            digest = storage.sha256_bytes(p.read_bytes()) if p.is_file() else None
            out[str(p)] = (digest, st.st_mtime_ns, p.is_symlink())
    return out


HOSTILE_BATCHES = [
    "file:///proc/self/environ",
    "/etc/passwd",
    "{storage}/checkpoints/x/model.safetensors",
    "{storage}/landing/digits/b.parquet",
    "{storage}/landing/card_fraud_other/b.parquet",  # shares the prefix's first characters
    "{storage}/landing/card_fraud",  # the root itself is no batch
    "{land}/../../keys/k",
    "{land}/./b.parquet",
    "{land}/%2e%2e/%2e%2e/keys/k",
    "{land}/%2E%2E%2Foutside/secret.parquet",
    "{land}/a%2fb.parquet",
    "{land}//../b.parquet",
    "{land}//b.parquet",
    "{storage}/landing//card_fraud/b.parquet",
    "{land}/b.parquet/",
    "{land}\\..\\..\\keys",
    "{land}/link.parquet",
    "{land}/linkdir/secret.parquet",
    "file://evilhost{land}/b.parquet",
    "file://localhost{land}/b.parquet",
    "{land}/b.parquet?versionId=1",
    "{land}/b.parquet#frag",
    "FILE://{land_path}/b.parquet",
    "File://{land_path}/b.parquet",
    "file:{land_path}/b.parquet",
    "s3://someone-elses-bucket/b.parquet",
    "http://169.254.169.254/latest/meta-data",
    "relative/b.parquet",
    "{land}/b.parquet\nfile:///etc/passwd",
]


def _fill(where: str, roots) -> str:
    return where.format(
        storage=roots["storage"].as_uri(),
        land=roots["land"].as_uri(),
        land_path=roots["land"],
    )


@pytest.mark.parametrize("where", HOSTILE_BATCHES)
def test_a_batch_outside_the_landing_prefix_is_refused_before_it_is_read(roots, where):
    """A trigger (Param, asset event, CLI) can point only inside the model's own landing
    prefix: nothing is read, copied or moved, and the refusal names the root and what to do."""
    from pipeline.uris import UriRefused

    uri = _fill(where, roots)
    before = _state(roots["storage"], roots["outside"])
    with pytest.raises(UriRefused) as refused:
        stages.resolve_batch_uri(uri, [], "2026-03-05T03:00:00+00:00")
    message = str(refused.value)
    assert roots["land"].as_uri() in message and "data land --model card_fraud" in message
    with pytest.raises(UriRefused):  # an asset event's extra is checked the same way
        stages.resolve_batch_uri("", [{"batch_uri": uri}], "2026-03-05T03:00:00+00:00")
    with pytest.raises(UriRefused):
        stages.ingest_batch(stages.RunContext("dag", "r"), uri)
    assert _state(roots["storage"], roots["outside"]) == before  # nothing read, copied, moved
    assert not (roots["storage"] / "snapshots").exists()
    assert not (roots["storage"] / "quarantine").exists()


@pytest.mark.parametrize("where", ["{land}/b.parquet", "{land_path}/b.parquet"])
def test_a_batch_in_the_landing_prefix_is_read_by_its_canonical_uri(roots, where):
    uri = _fill(where, roots)
    assert stages.resolve_batch_uri(uri, [], "2026-03-05T03:00:00+00:00") == (
        roots["land"].resolve().as_uri() + "/b.parquet"
    )


def test_a_symlink_out_of_the_landing_prefix_is_refused(pipeline_home, tmp_path):
    from pipeline.spec import PolicyViolation

    land = pipeline_home / "storage" / "landing" / "card_fraud"
    land.mkdir(parents=True)
    secret = tmp_path / "secret.parquet"
    secret.write_bytes(b"PAR1 not yours")
    (land / "link.parquet").symlink_to(secret)
    with pytest.raises(PolicyViolation, match="outside model 'card_fraud'.*resolves to"):
        stages.ingest_batch(stages.RunContext("dag", "r"), (land / "link.parquet").as_uri())


@pytest.mark.parametrize(
    "where",
    [
        "s3://pipeline-evil/data/landing/card_fraud/b.parquet",  # a bucket that starts alike
        "s3://pipelin/data/landing/card_fraud/b.parquet",
        "s3://pipeline/data/landing/card_fraud_other/b.parquet",
        "s3://pipeline/data/landing/card_fraud/../../keys/k",
        "s3://pipeline//data/landing/card_fraud/b.parquet",
        "s3://pipeline/data/landing/card_fraud//b.parquet",
        "s3://pipeline/data/landing/card_fraud/%2e%2e/k",
        "s3://pipeline/data/landing/card_fraud/b.parquet?versionId=1",
        "s3://user@pipeline/data/landing/card_fraud/b.parquet",
        "s3://pipeline:9000/data/landing/card_fraud/b.parquet",
        "S3://pipeline/data/landing/card_fraud/b.parquet",
        "s3:/pipeline/data/landing/card_fraud/b.parquet",
        "s3://pipeline/data/trusted/card_fraud/eval.parquet",
        "file:///proc/self/environ",
    ],
)
def test_on_s3_a_batch_outside_the_landing_prefix_is_refused_before_any_request(
    pipeline_home, monkeypatch, where
):
    """With S3 storage the roots are bucket + whole key segments; the endpoint here answers
    nothing, so a request would fail differently than the refusal."""
    from pipeline.settings import get_settings
    from pipeline.uris import UriRefused

    monkeypatch.setenv("PIPELINE_STORAGE_URI", "s3://pipeline/data")
    monkeypatch.setenv("PIPELINE_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    get_settings.cache_clear()
    with pytest.raises(UriRefused, match="s3://pipeline/data/landing/card_fraud"):
        stages.ingest_batch(stages.RunContext("dag", "r"), where)
    ok = "s3://pipeline/data/landing/card_fraud/date=2026-03-05/b.parquet"
    assert stages.resolve_batch_uri(ok, [], "2026-03-05T03:00:00+00:00") == ok


def test_an_allowed_source_is_a_folder_not_a_name_prefix(roots, tmp_path):
    from pipeline import quarantine
    from pipeline import spec as specs
    from pipeline.uris import UriRefused

    producer = tmp_path / "producer"
    evil = tmp_path / "producer-evil"
    for folder in (producer, evil):
        folder.mkdir()
        (folder / "b.parquet").write_bytes(b"PAR1")
    card = specs.get_spec("card_fraud")
    mine = card.model_copy(
        update={"landing": specs.LandingSpec(allowed_sources=[str(producer) + "/"])}
    )
    assert quarantine.check_batch_source(str(producer / "b.parquet"), mine).endswith(
        "/producer/b.parquet"
    )
    with pytest.raises(UriRefused, match="allowed_sources"):
        quarantine.check_batch_source(str(evil / "b.parquet"), mine)


@pytest.mark.parametrize(
    "where",
    [
        "{land}/link.parquet",  # in the landing folder, but a link to a file outside it
        "{land}/linkdir/secret.parquet",
        "{land}/../../../outside/secret.parquet",
    ],
)
def test_quarantine_never_moves_what_only_seems_to_be_in_the_landing_prefix(roots, where):
    """A record whose source looks like the pipeline's own (a forged ``--in`` record, an
    XCom) is copied to quarantine; the file it leads to is not moved away."""
    from pipeline import quarantine

    source = _fill(where, roots)
    secret = roots["outside"] / "secret.parquet"
    before = _state(roots["outside"], roots["land"])
    snap = storage.write_bytes(
        (roots["storage"] / "snapshots" / "s" / "data.parquet").as_uri(), secret.read_bytes()
    )
    rec = stages.Ingested(
        verdict="ok", uri=snap.uri, sha256=snap.sha256, rows=300, source_uri=source, model="x"
    )
    folder, how = quarantine.quarantine(rec, "{}", "<html/>", "rejected")
    assert how == "copied"
    assert _state(roots["outside"], roots["land"]) == before  # the target and the link stay
    assert storage.read_bytes(storage.join(folder, "batch.parquet")) == secret.read_bytes()


HOSTILE_EVAL_SETS = [
    "/etc/passwd",
    "file:///proc/self/environ",
    "{storage}/landing/card_fraud/b.parquet",  # a landing batch never vouches for itself
    "{storage}/keys/signing.key",
    "{storage}/trusted_other/eval.parquet",
    "{storage}/trusted",
    "trusted/../keys/k",
    "{storage}/trusted/../keys/k",
    "{storage}/trusted/%2e%2e/keys/k",
    "{storage}/trusted//card_fraud/eval.parquet",
    "{storage}/trusted\\card_fraud\\eval.parquet",
    "{storage}/trusted/link.parquet",
    "{storage}/trusted/linkdir/secret.parquet",
    "file://host{storage_path}/trusted/card_fraud/eval.parquet",
    "FILE://{storage_path}/trusted/card_fraud/eval.parquet",
    "{storage}/trusted/card_fraud/eval.parquet?x=1",
    "s3://pipeline-evil/trusted/card_fraud/eval.parquet",
]


def _fill_eval(where: str, roots) -> str:
    return where.format(storage=roots["storage"].as_uri(), storage_path=roots["storage"])


@pytest.mark.parametrize("where", HOSTILE_EVAL_SETS)
def test_an_evaluation_set_outside_the_trusted_prefix_is_refused_before_it_is_read(roots, where):
    """card_fraud's spec lets a run name another set (overrides.allow: evaluation.uri), but
    only under its trusted prefix: refused by the first task's policy, and by the gate again
    for a record that skipped it — before the set (or the model version) is read."""
    from pipeline.spec import Policy
    from pipeline.uris import UriRefused

    uri = _fill_eval(where, roots)
    before = _state(roots["storage"], roots["outside"])
    with pytest.raises(UriRefused, match="trusted prefix.*as-eval") as refused:
        stages.run_policy({"eval_uri": uri, "gate_margin": 0.01})
    assert (roots["storage"] / "trusted").as_uri() in str(refused.value)
    forged = Policy.from_dict({**stages.run_policy().to_dict(), "eval_uri": uri})
    registered = stages.Registered(
        verdict="registered", model_name="card-fraud", model_version="1", mlflow_run_id="x"
    )
    with pytest.raises(UriRefused):
        stages.gate_promotion(stages.RunContext("dag", "r"), registered, policy=forged)
    assert _state(roots["storage"], roots["outside"]) == before


@pytest.mark.parametrize(
    "where",
    [
        "",
        "trusted/card_fraud/eval.parquet",
        "trusted/world-b.parquet",
        "{storage}/trusted/card_fraud/eval.parquet",
        "{storage_path}/trusted/card_fraud/eval.parquet",
    ],
)
def test_an_evaluation_set_under_the_trusted_prefix_is_accepted(roots, where):
    from pipeline.stages.context import eval_uri

    policy = stages.run_policy({"eval_uri": _fill_eval(where, roots)})
    assert eval_uri(policy).startswith(roots["storage"].resolve().as_uri() + "/trusted/")


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
