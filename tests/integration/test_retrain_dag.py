"""The retrain_<model> DAGs, run for real by Airflow on the embedded default.

Three runs on one Airflow + MLflow home: a first batch makes a champion (with lineage
tags); a batch with poisoned labels is retrained on and rejected by the gate, tagged with
the reason, champion untouched; a batch that breaks the contract is quarantined and the
run fails, naming the broken expectation.
"""

from __future__ import annotations

import pytest

from pipeline import registry, storage
from pipeline.data.generate import WorldSpec, generate, to_parquet_bytes

pytestmark = [pytest.mark.integration, pytest.mark.slow]
DAG = "retrain_card_fraud"


def land(root: str, name: str, spec: WorldSpec) -> str:
    return storage.write_bytes(f"{root}/{name}.parquet", to_parquet_bytes(generate(spec))).uri


def test_champion_then_poisoned_rejection_then_quarantine(airflow_home, monkeypatch):
    airflow_home.use(monkeypatch)
    root = (airflow_home.home / "storage").as_uri()
    land(root + "/trusted/card_fraud", "eval", WorldSpec(rows=6000, seed=101))  # the spec's set
    good = land(root + "/landing/card_fraud", "good", WorldSpec(rows=10_000, seed=1))
    poisoned = land(
        root + "/landing/card_fraud", "poisoned", WorldSpec(rows=10_000, seed=2, label_poison=0.8)
    )
    clean = land(root + "/landing/card_fraud", "clean", WorldSpec(rows=10_000, seed=4))
    broken = land(
        root + "/landing/card_fraud",
        "broken",
        WorldSpec(rows=3000, seed=3, schema_fault="out_of_range"),
    )

    # 1. first batch: the first champion, with lineage
    r1 = airflow_home.dags_test(DAG, {"batch_uri": good})
    assert r1.returncode == 0, r1.stdout[-4000:] + r1.stderr[-4000:]
    champ = registry.alias_version(registry.CHAMPION)
    assert champ is not None and str(champ.version) == "1"
    tags = champ.tags
    assert tags["data.batch_uri"] == good
    assert tags["data.snapshot_sha256"] == storage.digest_of(good)
    assert tags["data.snapshot_uri"].endswith("/data.parquet")
    assert tags["airflow.dag_id"] == DAG
    assert tags["airflow.run_id"].startswith("manual__")
    assert len(tags["checkpoint.manifest_sha256"]) == 64
    assert tags["gate.verdict"] == "promote"

    # 1b. a clean batch of the same world: retraining is skipped, and the skip is a success
    rs = airflow_home.dags_test(DAG, {"batch_uri": clean})
    assert rs.returncode == 0, rs.stdout[-4000:] + rs.stderr[-4000:]
    assert "no challenger in this run: retraining was skipped" in rs.stdout + rs.stderr
    assert "nothing_changed" in rs.stdout + rs.stderr  # the summary says why

    # 2. poisoned labels: the champion decays on them, so it retrains; the gate rejects
    r2 = airflow_home.dags_test(DAG, {"batch_uri": poisoned})
    assert r2.returncode == 0, r2.stdout[-4000:] + r2.stderr[-4000:]
    c = registry.client()
    v2 = c.get_model_version(registry.model_name(), "2")
    assert v2.tags["gate.verdict"] == "reject"
    assert v2.tags["rejected"] == "true"
    assert "roc_auc" in v2.tags["rejection_reason"]  # names the metric that failed
    assert "champion" not in v2.aliases
    assert str(registry.alias_version(registry.CHAMPION).version) == "1"

    # 3. broken contract: quarantined, the run fails and says why; nothing registered
    r3 = airflow_home.dags_test(DAG, {"batch_uri": broken})
    assert r3.returncode != 0
    out = r3.stdout + r3.stderr
    assert "rejected by the data contract" in out and "hour" in out
    assert not storage.exists(broken)  # moved, not copied
    quarantined = storage.list_uris(root + "/quarantine")
    assert any(u.endswith("/batch.parquet") for u in quarantined)
    assert any(u.endswith("/reason.txt") for u in quarantined)
    assert len(c.search_model_versions(f"name = '{registry.model_name()}'")) == 2
    assert str(registry.alias_version(registry.CHAMPION).version) == "1"


def test_a_model_the_project_never_saw_gets_a_champion_then_a_better_one(airflow_home, monkeypatch):
    """models/digits: scikit-learn's handwritten digits (10 classes, no time column, no
    categoricals) and a residual network from the spec's own module — through the same DAG
    code: a first champion from a small batch, then a forced retrain on a larger one whose
    challenger beats it on the trusted set and is promoted. Its version carries the code."""
    import json

    from models.digits import data
    from pipeline import spec as specs

    airflow_home.use(monkeypatch)
    root = (airflow_home.home / "storage").as_uri()
    files = data.write_batches(f"{root}/landing/digits", seed=0)
    storage.write_bytes(f"{root}/trusted/digits/eval.parquet", storage.read_bytes(files["eval"]))
    r1 = airflow_home.dags_test("retrain_digits", {"batch_uri": files["batch-1"]})
    assert r1.returncode == 0, r1.stdout[-4000:] + r1.stderr[-4000:]
    with specs.use_spec(specs.get_spec("digits")):
        first = registry.alias_version(registry.CHAMPION)
        assert first is not None, r1.stdout[-6000:]
        assert first.tags["gate.metric"] == "accuracy"
        r2 = airflow_home.dags_test(
            "retrain_digits", {"batch_uri": files["batch-2"], "force_retrain": True}
        )
        assert r2.returncode == 0, r2.stdout[-4000:] + r2.stderr[-4000:]
        second = registry.alias_version(registry.CHAMPION)
        assert int(second.version) == int(first.version) + 1, second.tags.get("rejection_reason")
        assert second.tags["gate.reason"] == "improves_on_champion"
        assert float(second.tags["eval.accuracy"]) > float(first.tags["eval.accuracy"])
        assert registry.model_name() == "digits"
    # the card_fraud model's registry and aliases are untouched by the digits runs
    assert registry.alias_version(registry.CHAMPION) is None
    manifest = json.loads(storage.read_text(second.tags["checkpoint.uri"] + "/manifest.json"))
    assert manifest["model"]["factory"] == "net:build" and "model_code.py" in manifest["files"]
    from pipeline.train.model import file_sha256

    code_digest = file_sha256(specs.get_spec("digits").factory_module_file)
    assert manifest["model"]["code_sha256"] == code_digest == second.tags["model.code_sha256"]
    assert second.tags["model.factory"] == "net:build"
