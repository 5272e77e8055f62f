"""The scoring service in-process: contract validation, routing, refusals, faults, metrics.

The registry is replaced by a plain function returning the desired state and the
loader by one that returns a real trained model (or refuses), so these run in seconds;
tests/integration/test_serving_canary.py runs the same service over HTTP on the real
registry and checkpoints.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from fastapi.testclient import TestClient

from pipeline.data.generate import WorldSpec, generate
from pipeline.serving import traffic
from pipeline.serving.app import create_app
from pipeline.serving.metrics import parse_snapshot
from pipeline.serving.schema import RowValidator
from pipeline.serving.service import LoadedModel, ModelRefused, ScoringService
from pipeline.train.features import fit_features
from pipeline.train.model import MLP, ModelConfig

LOOPBACK = ("127.0.0.1", 50000)


@pytest.fixture(scope="module")
def trained(contract):
    """A real (seeded, untrained) model over contract features: serving does not care how
    good it is, and building it takes milliseconds."""
    df = generate(WorldSpec(rows=2000, seed=5))
    spec = fit_features(df, contract)
    torch.manual_seed(1)
    return SimpleNamespace(model=MLP(ModelConfig(spec.width, len(spec.classes))).eval(), features=spec), df


@pytest.fixture
def world(trained, contract):
    """A service whose 'registry' is a dict the test edits."""
    result, df = trained
    desired = {"state": traffic.ServingState("1", None, 0.0)}
    bad = {"9"}

    def loader(version: str) -> LoadedModel:
        if version in bad:
            raise ModelRefused(f"checkpoint of v{version} failed verification: signature does not verify")
        return LoadedModel(version, f"file:///ckpt/{version}", "ab" * 32, result.model,
                           result.features, 1)  # fmt: skip

    service = ScoringService(validator=RowValidator(contract), poll_seconds=60, loader=loader,
                             read_state=lambda: desired["state"])  # fmt: skip
    app = create_app(service, poll=False)
    service.poll_once()
    rows = df[[c.name for c in contract.features]].head(20)
    rows = rows.astype(object).where(rows.notna(), None).to_dict(orient="records")
    with TestClient(app, client=LOOPBACK) as client:
        yield service, client, desired, rows


def test_one_row_many_rows_and_wrapped_rows_are_scored(world):
    _, client, _, rows = world
    for body, n in ((rows[0], 1), (rows[:5], 5), ({"rows": rows[:3]}, 3)):
        r = client.post("/predict", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["version"] == "1" and out["alias"] == "champion"
        assert len(out["scores"]) == n and all(0 <= s <= 1 for s in out["scores"])
        assert out["request_id"]


@pytest.mark.parametrize(
    ("mutate", "field", "words"),
    [
        (lambda r: r.pop("amount"), "amount", "required field is missing"),
        (lambda r: r.update(hour=27), "hour", "above the maximum 23"),
        (lambda r: r.update(hour=3.5), "hour", "expected an integer"),
        (lambda r: r.update(amount="12.5"), "amount", "expected a number"),
        (lambda r: r.update(channel="crypto_atm"), "channel", "unknown category 'crypto_atm'"),
        (lambda r: r.update(country=None), "country", "null is not allowed"),
        (lambda r: r.update(card_age_days=True), "card_age_days", "expected a number"),
    ],
)  # fmt: skip
def test_contract_violations_are_422_naming_row_and_field(world, mutate, field, words):
    _, client, _, rows = world
    batch = [dict(r) for r in rows[:3]]
    mutate(batch[2])
    r = client.post("/predict", json=batch)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail[0]["row"] == 2 and detail[0]["field"] == field
    assert words in detail[0]["error"]
    assert "row 2" in r.json()["message"]


def test_nullable_feature_may_be_null_and_extra_fields_are_ignored(world):
    _, client, _, rows = world
    row = dict(rows[0], distance_from_home_km=None, transaction_id="t-1", is_fraud=1)
    assert client.post("/predict", json=row).status_code == 200


@pytest.mark.parametrize("body", [b"{not json", b'"a string"', b"[]", b'{"rows": 3}'])
def test_malformed_bodies_are_400(world, body):
    _, client, _, _ = world
    r = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["detail"]


def test_bad_input_is_never_counted_against_a_model(world):
    service, client, _, rows = world
    client.post("/predict", json=dict(rows[0], hour=99))
    snap = parse_snapshot(client.get("/metrics").text)
    assert snap.stats("1").requests == 0
    assert 'scoring_rejected_requests_total{status="422"} 1.0' in client.get("/metrics").text


def test_weight_routes_and_routing_keys_are_sticky(world):
    service, client, desired, rows = world
    desired["state"] = traffic.ServingState("1", "2", 0.3)
    service.poll_once()
    seen = {}
    for i in range(300):
        key = f"card-{i % 30}"
        v = client.post("/predict", json=rows[i % 20], headers={"x-routing-key": key}).json()["version"]
        assert seen.setdefault(key, v) == v  # a key always lands on the same side
    share = sum(v == "2" for v in seen.values()) / len(seen)
    assert 0.05 < share < 0.6
    # growing the weight keeps every canary key on the canary (monotone buckets)
    desired["state"] = traffic.ServingState("1", "2", 0.8)
    service.poll_once()
    for key, v in seen.items():
        if v == "2":
            assert client.post("/predict", json=rows[0], headers={"x-routing-key": key}).json()["version"] == "2"


def test_refused_champion_keeps_the_last_good_one_and_says_so(world):
    service, client, desired, rows = world
    desired["state"] = traffic.ServingState("9", None, 0.0)
    service.poll_once()
    r = client.get("/readyz")
    assert r.status_code == 200
    detail = r.json()
    assert detail["champion"]["version"] == "1"
    assert "signature does not verify" in detail["refused"]["9"]
    assert any("v9 is not served" in n for n in detail["notes"])
    assert client.post("/predict", json=rows[0]).json()["version"] == "1"
    assert parse_snapshot(client.get("/metrics").text).refused == {"9"}


def test_refused_canary_gets_no_traffic(world):
    service, client, desired, rows = world
    desired["state"] = traffic.ServingState("1", "9", 1.0)
    service.poll_once()
    assert service.table.canary is None and service.table.weight == 0
    assert {client.post("/predict", json=rows[0]).json()["version"] for _ in range(10)} == {"1"}


def test_not_ready_without_a_verified_champion(contract):
    service = ScoringService(validator=RowValidator(contract), loader=lambda v: (_ for _ in ()).throw(
        ModelRefused("broken")), read_state=lambda: traffic.ServingState("3", None, 0.0))  # fmt: skip
    with TestClient(create_app(service, poll=False)) as client:
        service.poll_once()
        assert client.get("/readyz").status_code == 503
        assert client.get("/healthz").status_code == 200
        r = client.post("/predict", json={"amount": 1})
        assert r.status_code in (422, 503)


def test_registry_outage_keeps_serving(world):
    service, client, desired, rows = world

    def down():
        raise ConnectionError("registry unreachable")

    service.read_state = down
    service.poll_once()
    assert client.post("/predict", json=rows[0]).status_code == 200
    detail = client.get("/readyz").json()
    assert detail["ready"] and "registry unreachable" in detail["last_poll"]["error"]


def test_fault_switch_is_loopback_only_and_visible(world, trained, contract):
    service, client, desired, rows = world
    r = client.post("/admin/faults", json={"version": "1", "error_rate": 1.0, "score_shift": 0.2})
    assert r.status_code == 200 and r.json()["1"]["error_rate"] == 1.0
    assert client.post("/predict", json=rows[0]).status_code == 500
    snap = parse_snapshot(client.get("/metrics").text)
    assert snap.faults == {"1"} and snap.stats("1").errors == 1
    client.post("/admin/faults", json={"version": "1", "score_shift": 0.5})
    shifted = client.post("/predict", json=rows[0]).json()["scores"][0]
    assert shifted >= 0.5
    assert client.delete("/admin/faults").json() == {}
    assert client.post("/admin/faults", json={"version": "x", "error_rate": 2}).status_code == 422
    with TestClient(client.app, client=("10.0.0.8", 5000)) as outsider:
        assert outsider.get("/admin/faults").status_code == 403


def test_feedback_feeds_labelled_histograms_and_auc(world):
    service, client, _, rows = world
    ids = [client.post("/predict", json=rows[i]).json()["request_id"] for i in range(20)]
    labels = [i % 2 for i in range(20)]
    r = client.post("/feedback", json={"feedback": [{"request_id": rid, "labels": [y]}
                                                    for rid, y in zip(ids, labels, strict=True)]
                                       + [{"request_id": "nope", "label": 1}]})  # fmt: skip
    assert r.json() == {"matched": 20, "unknown": 1, "mismatched": 0}
    text = client.get("/metrics").text
    snap = parse_snapshot(text)
    assert snap.stats("1").labelled_pos.total == 10 and snap.stats("1").labelled_neg.total == 10
    assert 'scoring_labelled_roc_auc{alias="champion",version="1"}' in text
    # labels are taken once: a repeat is unknown
    again = client.post("/feedback", json={"request_id": ids[0], "label": 1}).json()
    assert again["unknown"] == 1


def test_swap_is_atomic_for_requests_in_flight(world):
    service, client, desired, rows = world
    old = service.table
    desired["state"] = traffic.ServingState("2", None, 0.0)
    new = service.poll_once()
    assert new is service.table and new is not old
    assert old.champion.model.version == "1"  # a request holding the old table finishes on v1
    assert client.post("/predict", json=rows[0]).json()["version"] == "2"
