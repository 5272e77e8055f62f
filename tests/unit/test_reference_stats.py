"""Reference statistics cached with a model version (pipeline.reference_stats): written at
registration through a real SQLite MLflow registry, verified before a drift check trusts
them, and giving the same report as statistics computed from the reference."""

from __future__ import annotations

import io
import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import drift, reference_stats, registry, storage
from pipeline.contract import Column, DataContract
from pipeline.ingest import TableSource
from pipeline.names import REFERENCE_STATS_DIR, RunTag, VersionTag

# -- datasets that are not the reference one ------------------------------------------------


def _breast_cancer() -> tuple[pd.DataFrame, pd.DataFrame, DataContract]:
    """sklearn's breast_cancer (569 rows: the small-reference path, KS / chi-square on raw
    values), its column names with spaces, a derived categorical band; the current half
    has two features scaled."""
    from sklearn.datasets import load_breast_cancer

    df = load_breast_cancer(as_frame=True).frame
    df["size band"] = pd.cut(df["mean radius"], [0, 12, 15, 100], labels=["s", "m", "l"]).astype(
        str
    )
    features = [c for c in df.columns if c not in ("target", "size band")]
    cols = [Column("target", "int", min=0, max=1)]
    cols += [Column(c, "float", nullable=True, max_null_fraction=1.0) for c in features]
    cols.append(Column("size band", "category", categories=("s", "m", "l")))
    contract = DataContract(
        name="breast_cancer",
        id_column=None,
        time_column=None,
        target="target",
        target_values=(0, 1),
        positive_label=1,
        columns=tuple(cols),
    )
    rng = np.random.default_rng(0)
    order = rng.permutation(len(df))
    ref, cur = df.iloc[order[:300]].copy(), df.iloc[order[300:]].copy()
    for c in features[:3]:
        cur[c] = cur[c] * 1.3
    return ref.reset_index(drop=True), cur.reset_index(drop=True), contract


def _synthetic(rows: int = 5000) -> tuple[pd.DataFrame, pd.DataFrame, DataContract]:
    """A contract with other columns and every path of the large-reference decision:
    Wasserstein, few-valued integers and booleans (value counts), NaN/inf dropped,
    strings and integer categories, a contract-named PSI on a many-valued column (read in
    full) and KS on a large reference (read in full)."""

    def world(seed: int, shift: float) -> pd.DataFrame:
        rng = np.random.default_rng(seed)
        x = rng.normal(shift, 1.0, rows)
        x[rng.random(rows) < 0.02] = np.nan
        x[:3] = np.inf
        return pd.DataFrame(
            {
                "y": (rng.random(rows) < 0.2 + 0.1 * shift).astype(np.int64),
                "w": x,
                "few": rng.poisson(1.5 + shift, rows) % 4,
                "flag": rng.random(rows) < 0.3 + 0.2 * shift,
                "amount": rng.lognormal(1 + shift / 4, 0.5, rows),
                "psi_col": rng.gamma(2 + shift, 1.0, rows),
                "ks_col": rng.uniform(0, 1 + shift / 10, rows),
                "colour": pd.Categorical(
                    rng.choice(["red", "green", "blue"], rows, p=[0.5, 0.3, 0.2])
                ),
                "tier": rng.choice([1, 2, 3], rows),
            }
        )

    contract = DataContract(
        name="synthetic",
        id_column=None,
        time_column=None,
        target="y",
        target_values=(0, 1),
        positive_label=1,
        columns=(
            Column("y", "int", min=0, max=1),
            Column("w", "float", nullable=True, max_null_fraction=0.1),
            Column("few", "int"),
            Column("flag", "bool"),
            Column("amount", "float"),
            Column("psi_col", "float", drift_method="psi"),
            Column("ks_col", "float", drift_method="ks"),
            Column("colour", "category", categories=("red", "green", "blue")),
            Column("tier", "category", categories=("1", "2", "3")),
        ),
        drift_share=0.5,
    )
    return world(1, 0.0), world(2, 0.4), contract


def _parquet(df: pd.DataFrame, path: Path) -> str:
    df.to_parquet(path, row_group_size=1500)
    return path.as_uri()


def _roundtrip(stats: drift.ReferenceStats, contract: DataContract) -> drift.ReferenceStats:
    files = reference_stats.encode(stats, contract, snapshot_uri="file:///x", snapshot_sha256="a")
    return reference_stats.decode(
        files, contract, expected_sha256=storage.sha256_bytes(files["stats.json"])
    )


@pytest.mark.parametrize("dataset", [_breast_cancer, _synthetic])
def test_cached_statistics_give_the_same_report_as_recomputed(dataset, tmp_path):
    ref_df, cur_df, contract = dataset()
    cats = contract.categorical_features
    ref_uri = _parquet(ref_df, tmp_path / "ref.parquet")
    cur_uri = _parquet(cur_df, tmp_path / "cur.parquet")
    recomputed, _ = drift.detect_drift_uris(ref_uri, cur_uri, contract, html=False)

    built = drift.reference_statistics(TableSource.from_uri(ref_uri, cats), contract)
    cached = _roundtrip(built, contract)
    cached.source_uri = ref_uri  # where the rare exact fallbacks read from
    report, _ = drift.detect_drift_uris(cached, cur_uri, contract, html=False)

    assert report.to_dict() == recomputed.to_dict()
    assert report.drifted_columns(), "the datasets were built to drift"
    methods = {c.column: c.method for c in report.columns}
    if dataset is _breast_cancer:  # small reference: p-value tests on stored raw values
        assert set(methods.values()) >= {"ks", "z"} and cached.reads == []
        assert set(cached.raw) == set(contract.numeric_features)
    else:  # large: distances; the named PSI / KS columns read the reference column
        assert {"wasserstein", "jensenshannon", "psi", "ks"} <= set(methods.values())
        assert sorted(cached.reads) == ["ks_col", "psi_col"] and cached.raw == {}
    # the HTML page's reference sample is the stored one, equal to the snapshot's
    columns = drift._plan(contract).columns
    source = TableSource.from_uri(ref_uri, cats)
    stored = _roundtrip(built, contract)
    assert stored.sample(columns, drift.SAMPLE_ROWS, 0).equals(
        source.sample(columns, drift.SAMPLE_ROWS, 0)
    )


# -- hostile or stale files ----------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_files(tmp_path_factory):
    ref_df, _, contract = _synthetic(3000)
    uri = _parquet(ref_df, tmp_path_factory.mktemp("ref") / "ref.parquet")
    stats = drift.reference_statistics(
        TableSource.from_uri(uri, contract.categorical_features), contract
    )
    files = reference_stats.encode(stats, contract, snapshot_uri=uri, snapshot_sha256="s" * 64)
    return files, contract


def _with_doc(files: dict[str, bytes], edit) -> dict[str, bytes]:
    doc = json.loads(files["stats.json"])
    edit(doc)
    return {**files, "stats.json": json.dumps(doc).encode()}


def _with_arrays(files: dict[str, bytes], edit) -> dict[str, bytes]:
    with np.load(io.BytesIO(files["numeric.npz"]), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    edit(arrays)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    npz = buf.getvalue()

    def rename(doc):
        doc["files"]["numeric.npz"] = storage.sha256_bytes(npz)

    return _with_doc({**files, "numeric.npz": npz}, rename)


def _drop_edge(a):
    a["1.edges"] = a["1.edges"][:-1]


def _pickled(a):
    a["1.edges"] = np.array([{"x": 1}], dtype=object)


def _bad_cdf(a):
    a["1.le"] = a["1.le"] * 3


def _version(doc):
    doc["format_version"] = 0


def _params(doc):
    doc["parameters"]["quantile_edges"] = 512


def _kind(doc):
    doc["columns"][1]["kind"] = "categorical"


def _counts(doc):
    colour = next(c for c in doc["columns"] if c["name"] == "colour")
    colour["counts"].append(["x", -5])


def _missing(doc):
    del doc["columns"][2]


CASES = {
    "stats.json changed after the tag": (
        lambda f, c: {**f, "stats.json": f["stats.json"] + b" "},
        "sha256",
    ),
    "format version": (lambda f, c: _with_doc(f, _version), "format version 0"),
    "parameters": (lambda f, c: _with_doc(f, _params), "parameters"),
    "column kind": (lambda f, c: _with_doc(f, _kind), "stored as 'categorical'"),
    "malformed counts": (lambda f, c: _with_doc(f, _counts), "malformed count"),
    "column missing": (
        lambda f, c: _with_doc(f, _missing),
        "no statistics for contract column flag",
    ),
    "npz swapped": (
        lambda f, c: {**f, "numeric.npz": f["numeric.npz"][::-1]},
        "numeric.npz has sha256",
    ),
    "edges shortened": (lambda f, c: _with_arrays(f, _drop_edge), "differ in length"),
    "an object (pickle) array": (lambda f, c: _with_arrays(f, _pickled), "unreadable"),
    "CDF out of range": (lambda f, c: _with_arrays(f, _bad_cdf), "out of range"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_untrusted_or_stale_files_are_rejected_with_a_reason(case, synthetic_files):
    files, contract = synthetic_files
    change, reason = CASES[case]
    bad = change(files, contract)
    # a tamperer who can rewrite stats.json can rewrite its tag too: only the first case
    # keeps the old digest; the others pass it and must fail a later check
    digest = storage.sha256_bytes(
        files["stats.json"] if case.startswith("stats.json") else bad["stats.json"]
    )
    with pytest.raises(reference_stats.StatsRejected, match=reason):
        reference_stats.decode(bad, contract, expected_sha256=digest)


def test_a_contract_that_changed_a_column_type_rejects_the_cache(synthetic_files):
    files, contract = synthetic_files
    digest = storage.sha256_bytes(files["stats.json"])
    changed = replace(
        contract,
        columns=tuple(replace(c, type="float") if c.name == "few" else c for c in contract.columns),
    )
    with pytest.raises(
        reference_stats.StatsRejected, match="few was 'int', the contract says 'float'"
    ):
        reference_stats.decode(files, changed, expected_sha256=digest)
    with pytest.raises(reference_stats.StatsRejected, match="built from snapshot"):
        reference_stats.decode(files, contract, expected_sha256=digest, snapshot_sha256="t" * 64)
    assert reference_stats.decode(files, contract, expected_sha256=digest).rows == 3000


# -- through registration and the drift stage on a real MLflow store ------------------------


@pytest.fixture
def registered(mlflow_store, pipeline_home, contract, tmp_path):
    """A champion registered by ``register_challenger`` from a checkpoint trained on a
    reference snapshot, and a later batch to check for drift."""
    import torch

    from pipeline import checkpoint, stages
    from pipeline.data.generate import WorldSpec, generate, to_parquet_bytes
    from pipeline.settings import get_settings
    from pipeline.train.features import fit_features
    from pipeline.train.model import MLP, ModelConfig

    root = get_settings().storage_root
    ref = generate(WorldSpec(rows=3000, seed=5))
    data = to_parquet_bytes(ref)
    sha = storage.sha256_bytes(data)
    ref_uri = storage.write_bytes(f"{root}/snapshots/{sha[:24]}/data.parquet", data).uri
    cur = generate(WorldSpec(rows=3000, seed=6, covariate_shift=1.0))
    cur_uri = storage.write_bytes(
        f"{root}/snapshots/current/data.parquet", to_parquet_bytes(cur)
    ).uri
    spec = fit_features(ref, contract)
    torch.manual_seed(0)
    local = tmp_path / "ck"
    checkpoint.save_checkpoint(
        local,
        MLP(ModelConfig(spec.width, 2)),
        spec,
        ref.head(32),
        data_snapshot={"uri": ref_uri, "sha256": sha},
        training={"stop_reason": "max_epochs"},
    )
    digest = checkpoint.manifest_digest(local)
    ck_uri = storage.join(root, "checkpoints", digest[:24])
    checkpoint.publish(local, ck_uri)
    ctx = stages.RunContext(dag_id="retrain_model", run_id="manual__ref")
    rid = registry.get_or_create_run(ctx.run_key)
    ingested = {
        "verdict": "ok",
        "mlflow_run_id": rid,
        "uri": ref_uri,
        "sha256": sha,
        "source_uri": ref_uri,
        "rows": len(ref),
    }
    trained = {
        "verdict": "trained",
        "steps": 1,
        "checkpoint_uri": ck_uri,
        "manifest_sha256": digest,
        "stop_reason": "max_epochs",
        "epochs": 1,
        "best_epoch": 1,
        "device": "cpu",
        "final_grad_norm": 0.25,
    }
    verified = {"verdict": "intact", "checkpoint_uri": ck_uri, "manifest_sha256": digest}
    reg = stages.register_challenger(ctx, ingested, trained, verified)
    registry.set_alias(registry.CHAMPION, reg.model_version)
    return {"version": reg.model_version, "run_id": rid, "ref_uri": ref_uri, "cur_uri": cur_uri}


def _champion():
    return registry.alias_version(registry.CHAMPION)


def _drift_stage(world, n: int):
    from pipeline import stages

    ctx = stages.RunContext(dag_id="retrain_model", run_id=f"manual__drift{n}")
    rid = registry.get_or_create_run(ctx.run_key)
    ingested = {
        "verdict": "ok",
        "mlflow_run_id": rid,
        "uri": world["cur_uri"],
        "sha256": "c" * 64,
        "source_uri": world["cur_uri"],
        "rows": 3000,
    }
    rec = stages.detect_drift(ctx, ingested)
    return rec, registry.client().get_run(rid).data.tags[RunTag.DRIFT_REFERENCE]


def test_registration_caches_and_drift_then_reads_only_the_batch(registered, contract):
    mv = _champion()
    tags = mv.tags
    assert tags[VersionTag.REFERENCE_STATS_URI] == (
        f"runs:/{registered['run_id']}/{REFERENCE_STATS_DIR}/stats.json"
    )
    text = registry.read_artifact(tags[VersionTag.REFERENCE_STATS_URI])
    assert storage.sha256_bytes(text) == tags[VersionTag.REFERENCE_STATS_SHA256]
    doc = json.loads(text)
    assert (doc["format"], doc["format_version"]) == ("pipeline.reference_stats", 1)
    assert doc["rows"] == 3000 and doc["snapshot_sha256"] == tags[VersionTag.SNAPSHOT_SHA256]
    names = {
        a.path for a in registry.client().list_artifacts(registered["run_id"], REFERENCE_STATS_DIR)
    }
    assert names == {
        f"{REFERENCE_STATS_DIR}/{f}" for f in ("stats.json", "numeric.npz", "sample.parquet")
    }

    recomputed, _ = drift.detect_drift_uris(
        registered["ref_uri"], registered["cur_uri"], contract, html=False
    )
    # the reference snapshot is gone: a drift check with a verified cache does not need it
    storage.delete(registered["ref_uri"])
    rec, how = _drift_stage(registered, 1)
    assert how.startswith(f"cached: v{registered['version']}'s cached reference statistics")
    assert rec.report["columns"] == recomputed.to_dict()["columns"]
    assert rec.dataset_drift == recomputed.dataset_drift is True


def test_a_tampered_cache_falls_back_to_the_snapshot_and_says_why(registered, contract, caplog):
    mv = _champion()
    uri = mv.tags[VersionTag.REFERENCE_STATS_URI]
    doc = json.loads(registry.read_artifact(uri))
    doc["columns"][0]["std"] = 1e9  # a poisoned statistic, its tag left as it was
    registry.log_bytes(
        registered["run_id"], json.dumps(doc).encode(), f"{REFERENCE_STATS_DIR}/stats.json"
    )
    stats, why = reference_stats.load_for_version(_champion(), contract)
    assert stats is None and "rejected: stats.json has sha256" in why

    recomputed, _ = drift.detect_drift_uris(
        registered["ref_uri"], registered["cur_uri"], contract, html=False
    )
    with caplog.at_level(logging.WARNING, logger="pipeline.stages.data"):
        rec, how = _drift_stage(registered, 2)
    assert how.startswith("recomputed: ") and "stats.json has sha256" in how
    assert any("stats.json has sha256" in r.getMessage() for r in caplog.records)
    assert rec.report["columns"] == recomputed.to_dict()["columns"]


def test_a_stale_format_or_no_cache_falls_back(registered, contract):
    mv = _champion()
    uri = mv.tags[VersionTag.REFERENCE_STATS_URI]
    doc = json.loads(registry.read_artifact(uri))
    doc["format_version"] = 99  # written by a newer pipeline; its tag updated to match
    text = json.dumps(doc).encode()
    registry.log_bytes(registered["run_id"], text, f"{REFERENCE_STATS_DIR}/stats.json")
    registry.tag_version(
        mv.version, {VersionTag.REFERENCE_STATS_SHA256: storage.sha256_bytes(text)}
    )
    stats, why = reference_stats.load_for_version(_champion(), contract)
    assert stats is None and "format version 99, this code reads 1" in why
    rec, how = _drift_stage(registered, 3)
    assert how.startswith("recomputed: ") and rec.verdict == "drift"

    # a version registered before the cache existed
    registry.client().delete_model_version_tag(
        registry.model_name(), mv.version, VersionTag.REFERENCE_STATS_URI
    )
    stats, why = reference_stats.load_for_version(_champion(), contract)
    assert stats is None and "has no cached reference statistics" in why
    rec, how = _drift_stage(registered, 4)
    assert how.startswith("recomputed: ") and rec.verdict == "drift"
