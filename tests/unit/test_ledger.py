"""The promotion ledger on a real MLflow SQLite registry and a real storage folder: one entry
per move of ``champion`` (promotion, canary path, rollback), write-once under concurrent
writers, a retry is not a second entry, a tampered entry is refused, a rollback with no
target goes to the last healthy version, and ``python -m pipeline history`` prints it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _records import gated_record

from pipeline import ledger, registry, stages, storage
from pipeline.rollback import RollbackRefused, rollback_champion
from tests.unit._ledger import write_concurrently
from tests.unit._serving import gated_tags, publish_checkpoint

MODEL = "card_fraud"  # the default spec: the ledger is named by the spec, not the MLflow name


pytestmark = pytest.mark.usefixtures("mlflow_store")  # each test its own migrated store


@pytest.fixture(scope="module")
def small_model(contract):
    from pipeline.data.generate import WorldSpec, generate
    from pipeline.train.features import fit_features
    from pipeline.train.model import MLP, ModelConfig

    df = generate(WorldSpec(rows=400, seed=3))
    features = fit_features(df, contract)
    torch.manual_seed(0)
    return MLP(ModelConfig(features.width, len(features.classes))).eval(), features, df.head(32)


@pytest.fixture
def versions(pipeline_home, small_model):
    """``make(n)``: n registered versions the gate accepted, on one signed checkpoint that
    verifies (a rollback restores only a version whose checkpoint does)."""
    model, features, probe = small_model
    uri = publish_checkpoint(pipeline_home, "ck", model, features, probe)

    def make(n: int) -> list[str]:
        out = []
        for i in range(n):
            key = f"retrain_card_fraud__train{i}"
            rid = registry.get_or_create_run(key)
            out.append(registry.register_version(rid, key, uri, gated_tags(uri), ""))
        return out

    return make


def _champion() -> str | None:
    c = registry.alias_version(registry.CHAMPION)
    return str(c.version) if c else None


def _promote(version: str, champion: str | None, run: str) -> stages.Promoted:
    """What the DAG's promote_champion task does for a version the gate accepted."""
    rid = registry.get_or_create_run(f"retrain_card_fraud__{run}")
    gated = gated_record(version, rid, champion_version=champion, message=f"v{version} wins")
    ctx = stages.RunContext(dag_id="retrain_card_fraud", run_id=run)
    return stages.promote_champion(ctx, gated)


def _moves() -> list[tuple[str, str | None, str]]:
    return [(e.action, e.from_version, e.to_version) for e in ledger.entries(MODEL)]


# -- one entry per move --------------------------------------------------------------------------


def test_every_move_of_champion_is_one_entry_and_a_retry_is_not_a_second(versions):
    from pipeline.canary import run_canary_rollout

    v1, v2, v3 = versions(3)
    # the canary path with no champion to compare against promotes directly
    out = run_canary_rollout(v1, None, run_key="retrain_card_fraud__c1", actor="dag/c1")
    assert out["verdict"] == "promoted"
    _promote(v2, v1, "r2")
    _promote(v2, v1, "r2")  # the task retried: the same move, not a second entry
    rec = rollback_champion("scores look wrong", who="alice", run_key="rollback__1")
    rollback_champion("scores look wrong", who="alice", run_key="rollback__1")  # retried
    registry.promote_champion(v3, v1)  # a caller that says nothing about the move
    assert _moves() == [
        ("promote", None, v1),
        ("promote", v1, v2),
        ("manual_rollback", v2, v1),
        ("promote", v1, v3),
    ]
    e = ledger.entries(MODEL)
    assert [x.seq for x in e] == [1, 2, 3, 4]
    assert (e[0].who, e[0].run_key) == ("dag/c1", "retrain_card_fraud__c1")
    assert "no champion" in e[0].why and e[0].decision["kind"] == "canary_rollout"
    assert (e[1].who, e[1].why) == ("retrain_card_fraud/r2", f"v{v2} wins")
    assert e[1].decision["kind"] == "promotion_gate"
    assert e[1].decision["record_uri"].endswith("promotion_gate_decision.json")
    assert (e[2].who, e[2].why, e[2].run_key) == ("alice", "scores look wrong", "rollback__1")
    assert e[2].decision["mlflow_run_id"] == rec["mlflow_run_id"]
    assert (e[3].who, e[3].action) == ("unknown", "promote")
    assert all(x.healthy and x.model == MODEL for x in e)
    assert all(x.at.endswith("+00:00") for x in e)


def test_an_approved_promotion_names_the_approver(versions):
    (v1,) = versions(1)
    rid = registry.get_or_create_run("retrain_card_fraud__a1")
    approval = {
        "chosen_options": ["Approve"],
        "params_input": {},
        "responded_by_user": {"id": "7", "name": "bob"},
        "responded_at": "2026-01-02T03:04:05+00:00",
    }
    ctx = stages.RunContext(dag_id="retrain_card_fraud", run_id="a1")
    assert stages.promote_champion(ctx, gated_record(v1, rid), approval=approval).verdict == (
        "promoted"
    )
    (e,) = ledger.entries(MODEL)
    assert e.who == "retrain_card_fraud/a1 (approved by bob)"
    assert e.decision["approval"]["by"] == "bob"


def test_a_move_whose_entry_was_not_written_is_recorded_by_its_retry(versions):
    v1, v2 = versions(2)
    _promote(v1, None, "r1")
    registry.set_alias(registry.CHAMPION, v2)  # the first attempt moved the alias, then died
    _promote(v2, v1, "r2")  # Airflow retries the task: the no-op path writes the entry
    _promote(v2, v1, "r2")  # and a further retry adds nothing
    assert _moves() == [("promote", None, v1), ("promote", v1, v2)]


def test_a_refused_or_conflicting_move_writes_nothing(versions):
    v1, v2 = versions(2)
    _promote(v1, None, "r1")
    with pytest.raises(registry.RegistryConflict):
        _promote(v2, None, "r2")  # the gate saw no champion: stale
    with pytest.raises(RollbackRefused):
        rollback_champion("no target anywhere", who="alice")
    assert _moves() == [("promote", None, v1)]


# -- write-once, concurrent writers -------------------------------------------------------------


def test_concurrent_writers_never_overwrite_each_other(pipeline_home):
    write_concurrently(MODEL, writers=6, moves=4)
    got = ledger.entries(MODEL)  # verifies every entry and the chain between them
    assert [e.seq for e in got] == list(range(1, 25))
    assert sorted(e.run_key for e in got) == sorted(f"w{w}-{i}" for w in range(6) for i in range(4))


def test_a_second_writer_with_the_same_seq_does_not_overwrite(pipeline_home):
    first = ledger.append(
        MODEL, from_version=None, to_version="1", action="promote", who="a", why="x"
    )
    uri = ledger.entry_uri(MODEL, 1)
    before = storage.read_bytes(uri)
    forged = json.loads(before)
    forged["entry"]["who"] = "mallory"
    with pytest.raises(storage.ObjectExistsError):
        storage.write_bytes(uri, json.dumps(forged).encode())
    assert storage.read_bytes(uri) == before
    # a writer that lost seq 1 takes seq 2
    second = ledger.append(
        MODEL, from_version="1", to_version="2", action="promote", who="b", why="y"
    )
    assert (first.seq, second.seq) == (1, 2)
    assert [e.who for e in ledger.entries(MODEL)] == ["a", "b"]


def test_a_retry_of_the_same_move_returns_the_first_entry(pipeline_home):
    kw = {"from_version": "1", "to_version": "2", "action": "promote", "who": "a", "why": "x"}
    a = ledger.append(MODEL, run_key="dag__r1", **kw)
    b = ledger.append(MODEL, run_key="dag__r1", **kw)
    assert a == b and len(ledger.entries(MODEL)) == 1
    ledger.append(MODEL, run_key="dag__r2", **kw)  # another run making the same move is one
    assert len(ledger.entries(MODEL)) == 2


def test_a_large_decision_is_stored_beside_and_named_by_digest(pipeline_home):
    big = {"kind": "promotion_gate", "verdict": "promote", "rows": list(range(5000))}
    e = ledger.append(
        MODEL, from_version=None, to_version="1", action="promote", who="a", why="x", decision=big
    )
    ref = e.decision[ledger.DECISION_REF]
    assert ref["uri"].endswith(f"/ledger/{MODEL}/decisions/{ref['sha256']}.json")
    assert e.decision["kind"] == "promotion_gate"
    assert ledger.decision_of(ledger.entries(MODEL)[0]) == big


# -- hostile files ------------------------------------------------------------------------------


def _three(pipeline_home) -> list[Path]:
    for v in ("1", "2", "3"):
        prev = None if v == "1" else str(int(v) - 1)
        ledger.append(MODEL, from_version=prev, to_version=v, action="promote", who="a", why="w")
    return [storage.local_path(ledger.entry_uri(MODEL, s)) for s in (1, 2, 3)]


def _rewrite(path: Path, text: str) -> None:
    """What an editor with write access does: new content and a matching storage sidecar."""
    path.write_text(text)
    path.with_name(path.name + storage.SIDECAR).write_text(storage.sha256_bytes(text.encode()))


def test_an_edited_entry_is_refused_naming_it(pipeline_home):
    paths = _three(pipeline_home)
    _rewrite(paths[1], paths[1].read_text().replace('"who": "a"', '"who": "b"'))
    with pytest.raises(ledger.LedgerError, match=f"{paths[1].name}: its content has sha256"):
        ledger.entries(MODEL)


def test_an_edited_entry_with_its_digest_recomputed_breaks_the_chain(pipeline_home):
    paths = _three(pipeline_home)
    env = json.loads(paths[1].read_text())
    env["entry"]["to_version"] = "9"
    env["sha256"] = ledger._digest(env["entry"], env["prev_sha256"])
    _rewrite(paths[1], json.dumps(env))
    with pytest.raises(ledger.LedgerError, match=f"{paths[2].name}: it follows an entry"):
        ledger.entries(MODEL)


def test_a_removed_entry_or_a_stray_object_is_refused(pipeline_home):
    paths = _three(pipeline_home)
    stray = paths[0].with_name("notes.txt")
    stray.write_text("hello")
    with pytest.raises(ledger.LedgerError, match="notes.txt: its name is not an entry's"):
        ledger.entries(MODEL)
    stray.unlink()
    paths[1].unlink()
    with pytest.raises(ledger.LedgerError, match=f"{paths[2].name}: it is entry 3 but entry 2"):
        ledger.entries(MODEL)


def test_content_not_matching_its_storage_digest_is_refused(pipeline_home):
    paths = _three(pipeline_home)
    paths[0].write_text(paths[0].read_text().replace('"why": "w"', '"why": "v"'))  # no sidecar
    with pytest.raises(ledger.LedgerError, match=paths[0].name):
        ledger.entries(MODEL)


def test_a_tampered_ledger_refuses_a_promotion_before_champion_moves(versions):
    v1, v2 = versions(2)
    _promote(v1, None, "r1")
    path = storage.local_path(ledger.entry_uri(MODEL, 1))
    _rewrite(path, path.read_text().replace('"healthy": true', '"healthy": false'))
    with pytest.raises(ledger.LedgerError, match=path.name):
        _promote(v2, v1, "r2")
    assert _champion() == v1


def test_a_tampered_ledger_never_blocks_a_rollback(versions):
    """On call must be able to stop the bleeding while the ledger is repaired: the rollback
    goes to previous_champion, says the ledger could not be trusted, and logs the move as
    unrecorded."""
    v1, v2 = versions(2)
    _promote(v1, None, "r1")
    _promote(v2, v1, "r2")
    path = storage.local_path(ledger.entry_uri(MODEL, 1))
    _rewrite(path, path.read_text().replace('"healthy": true', '"healthy": false'))
    out = rollback_champion("v2 misbehaves", who="oncall", run_key="rollback__t")
    assert (out["from_version"], out["to_version"]) == (v2, v1) and _champion() == v1
    assert out["target_was"] == "previous_champion"
    assert "cannot be trusted" in out["target_note"] and path.name in out["target_note"]
    assert storage.exists(ledger.entry_uri(MODEL, 3))  # the move is still written down


# -- a rollback with no target ------------------------------------------------------------------


def test_a_rollback_with_no_target_goes_to_the_last_healthy_entry(versions):
    v1, v2, v3, v4 = versions(4)
    _promote(v1, None, "r1")
    _promote(v2, v1, "r2")
    _promote(v3, v2, "r3")
    first = rollback_champion("v3 misbehaves", who="alice", run_key="rollback__a")
    assert (first["to_version"], first["target_was"]) == (v2, "ledger")
    _promote(v4, v2, "r4")  # v3's successor
    second = rollback_champion("v4 misbehaves", who="bob", run_key="rollback__b")
    assert (second["to_version"], second["target_was"]) == (v2, "ledger")
    assert registry.alias_version(registry.PREVIOUS) is None  # v2's predecessor was not tagged
    # someone points previous_champion at the version rolled back first (the MLflow UI):
    # previous_champion alone would restore v3; the ledger knows v3 and v4 were rolled back
    registry.set_alias(registry.PREVIOUS, v3)
    third = rollback_champion("v2 is stale too", who="carol", run_key="rollback__c")
    assert (third["from_version"], third["to_version"]) == (v2, v1)
    assert third["target_was"] == "ledger" and "ledger entry 1" in third["target_note"]
    assert _champion() == v1
    assert _moves()[-1] == ("manual_rollback", v2, v1)
    assert ledger.last_healthy(MODEL, exclude_version=v1) is None  # v2, v3, v4 rolled back from


def test_a_version_rejected_or_tagged_rolled_back_is_not_healthy(versions):
    v1, v2, v3 = versions(3)
    _promote(v1, None, "r1")
    _promote(v2, v1, "r2")
    _promote(v3, v2, "r3")
    registry.tag_version(v2, {"rolled_back": "true"})  # by the canary, or by hand
    rec = rollback_champion("v3 misbehaves", who="alice", run_key="rollback__a")
    assert rec["to_version"] == v1  # not v2, although previous_champion says v2


def test_without_a_usable_ledger_the_rollback_uses_previous_champion_and_says_so(versions, caplog):
    v1, v2, v3 = versions(3)
    registry.set_alias(registry.CHAMPION, v2)  # champions from before the ledger existed
    registry.set_alias(registry.PREVIOUS, v1)
    rec = rollback_champion("v2 misbehaves", who="alice", run_key="rollback__a")
    assert (rec["to_version"], rec["target_was"]) == (v1, "previous_champion")
    assert "has no entries" in rec["target_note"]
    assert "using previous_champion v1" in caplog.text
    assert _moves() == [("manual_rollback", v2, v1)]
    # champion moved outside the pipeline: the ledger's newest entry no longer says who serves
    registry.set_alias(registry.CHAMPION, v3)
    registry.set_alias(registry.PREVIOUS, v2)
    rec = rollback_champion("v3 misbehaves", who="alice", run_key="rollback__b")
    assert (rec["to_version"], rec["target_was"]) == (v2, "previous_champion")
    assert "moved outside the pipeline" in rec["target_note"]


# -- python -m pipeline history -----------------------------------------------------------------


def test_history_prints_the_ledger(versions, capsys):
    from pipeline.cli import main

    assert main(["history", "--model", MODEL]) == 0
    assert "no entries yet" in capsys.readouterr().out
    v1, v2 = versions(2)
    _promote(v1, None, "r1")
    _promote(v2, v1, "r2")
    rollback_champion("complaints from fraud ops", who="alice", run_key="rollback__a")
    assert main(["history", "--model", MODEL]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["seq", "at", "action", "from", "->", "to", "who", "why"]
    assert lines[1].split()[:6] == ["1", lines[1].split()[1], "promote", "-", "->", f"v{v1}"]
    assert "retrain_card_fraud/r1" in lines[1]
    assert lines[3].split()[2:7] == ["manual_rollback", f"v{v2}", "->", f"v{v1}", "alice"]
    assert lines[3].endswith("complaints from fraud ops")
    assert main(["history", "--model", MODEL, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [(e["seq"], e["action"], e["to_version"]) for e in got] == [
        (1, "promote", v1),
        (2, "promote", v2),
        (3, "manual_rollback", v1),
    ]


def test_history_of_a_tampered_ledger_fails_naming_the_object(pipeline_home, capsys):
    from pipeline.cli import main

    paths = _three(pipeline_home)
    _rewrite(paths[2], paths[2].read_text().replace('"why": "w"', '"why": "v"'))
    assert main(["history", "--model", MODEL]) == 2
    assert f"{paths[2].name}: its content has sha256" in capsys.readouterr().err
