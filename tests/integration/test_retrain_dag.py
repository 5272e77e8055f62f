"""The retrain_model DAG, run for real by Airflow on the embedded default.

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


def land(root: str, name: str, spec: WorldSpec) -> str:
    return storage.write_bytes(f"{root}/{name}.parquet", to_parquet_bytes(generate(spec))).uri


def test_champion_then_poisoned_rejection_then_quarantine(airflow_home, monkeypatch):
    airflow_home.use(monkeypatch)
    root = (airflow_home.home / "storage").as_uri()
    eval_uri = land(root + "/trusted", "eval", WorldSpec(rows=6000, seed=101))
    good = land(root + "/landing", "good", WorldSpec(rows=10_000, seed=1))
    poisoned = land(root + "/landing", "poisoned", WorldSpec(rows=10_000, seed=2, label_poison=0.8))
    clean = land(root + "/landing", "clean", WorldSpec(rows=10_000, seed=4))
    broken = land(root + "/landing", "broken",
                  WorldSpec(rows=3000, seed=3, schema_fault="out_of_range"))  # fmt: skip

    # 1. first batch: the first champion, with lineage
    r1 = airflow_home.dags_test("retrain_model", {"batch_uri": good, "eval_uri": eval_uri})
    assert r1.returncode == 0, r1.stdout[-4000:] + r1.stderr[-4000:]
    champ = registry.alias_version(registry.CHAMPION)
    assert champ is not None and str(champ.version) == "1"
    tags = champ.tags
    assert tags["data.batch_uri"] == good
    assert tags["data.snapshot_sha256"] == storage.digest_of(good)
    assert tags["data.snapshot_uri"].endswith("/data.parquet")
    assert tags["airflow.dag_id"] == "retrain_model"
    assert tags["airflow.run_id"].startswith("manual__")
    assert len(tags["checkpoint.manifest_sha256"]) == 64
    assert tags["gate.verdict"] == "promote"

    # 1b. a clean batch of the same world: retraining is skipped, and the skip is a success
    rs = airflow_home.dags_test("retrain_model", {"batch_uri": clean, "eval_uri": eval_uri})
    assert rs.returncode == 0, rs.stdout[-4000:] + rs.stderr[-4000:]
    assert "no challenger in this run: retraining was skipped" in rs.stdout + rs.stderr
    assert "nothing_changed" in rs.stdout + rs.stderr  # the summary says why

    # 2. poisoned labels: the champion decays on them, so it retrains; the gate rejects
    r2 = airflow_home.dags_test("retrain_model", {"batch_uri": poisoned, "eval_uri": eval_uri})
    assert r2.returncode == 0, r2.stdout[-4000:] + r2.stderr[-4000:]
    c = registry.client()
    from pipeline.settings import get_settings

    v2 = c.get_model_version(get_settings().model_name, "2")
    assert v2.tags["gate.verdict"] == "reject"
    assert v2.tags["rejected"] == "true"
    assert "roc_auc" in v2.tags["rejection_reason"]  # names the metric that failed
    assert "champion" not in v2.aliases
    assert str(registry.alias_version(registry.CHAMPION).version) == "1"

    # 3. broken contract: quarantined, the run fails and says why; nothing registered
    r3 = airflow_home.dags_test("retrain_model", {"batch_uri": broken, "eval_uri": eval_uri})
    assert r3.returncode != 0
    out = r3.stdout + r3.stderr
    assert "rejected by the data contract" in out and "hour" in out
    assert not storage.exists(broken)  # moved, not copied
    quarantined = storage.list_uris(root + "/quarantine")
    assert any(u.endswith("/batch.parquet") for u in quarantined)
    assert any(u.endswith("/reason.txt") for u in quarantined)
    assert len(c.search_model_versions(f"name = '{get_settings().model_name}'")) == 2
    assert str(registry.alias_version(registry.CHAMPION).version) == "1"
