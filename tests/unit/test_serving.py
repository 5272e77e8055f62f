"""The scoring service in-process: contract validation, routing, refusals, faults, metrics,
and every model served at once (Open Inference Protocol routes).

Most tests replace the registry by a plain function returning the desired state and the
loader by one that returns a real model (or refuses), so they run in seconds. The last
ones build the service the way ``python -m pipeline serve`` does (``build_service``):
model specs in a temporary models root, signed checkpoints, the real MLflow SQLite
registry. tests/integration/test_serving_canary.py runs the service over HTTP.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient

from pipeline.contract import load_contract
from pipeline.data.generate import WorldSpec, generate
from pipeline.serving import traffic
from pipeline.serving.access import AccessPolicy
from pipeline.serving.app import create_app
from pipeline.serving.metrics import parse_snapshot
from pipeline.serving.schema import RowValidator
from pipeline.serving.service import LoadedModel, ModelRefused, ScoringService, ServedModel
from pipeline.train.features import fit_features
from pipeline.train.model import MLP, ModelConfig
from tests.unit._serving import gated_tags, records
from tests.unit._serving import publish_checkpoint as _publish

ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = ("127.0.0.1", 50000)
FRAUD, SHAPES = "card_fraud", "shapes"
ADMIN_TOKEN, FEEDBACK_TOKEN = (
    "a" * 16 + "dmin-token-for-tests",
    "f" * 16 + "eedback-token-for-tests",
)
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
FEEDBACK = {"Authorization": f"Bearer {FEEDBACK_TOKEN}"}
ACCESS = AccessPolicy(admin_token=ADMIN_TOKEN, feedback_token=FEEDBACK_TOKEN)

# A small three-class contract (no time column), to serve a multiclass model beside fraud.
SHAPES_CONTRACT = """
name: shapes
id_column: shape_id
target: {name: kind, values: [0, 1, 2]}
columns:
  - {name: shape_id, type: string, unique: true}
  - {name: width, type: float, min: 0.0, max: 100.0}
  - {name: height, type: float, min: 0.0, max: 100.0}
  - {name: corners, type: int, min: 0, max: 12}
  - {name: colour, type: category, categories: [red, green, blue]}
  - {name: kind, type: int, min: 0, max: 2}
"""


def shapes_frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    kind = rng.integers(0, 3, n)
    return pd.DataFrame(
        {
            "shape_id": [f"s{seed}-{i}" for i in range(n)],
            "width": rng.uniform(1, 99, n),
            "height": rng.uniform(1, 99, n),
            "corners": np.choose(kind, [0, 3, 4]) + rng.integers(0, 2, n),
            "colour": rng.choice(["red", "green", "blue"], n),
            "kind": kind,
        }
    )


@pytest.fixture(scope="module")
def shapes_contract(tmp_path_factory):
    path = tmp_path_factory.mktemp("shapes") / "contract.yaml"
    path.write_text(SHAPES_CONTRACT)
    return load_contract(path)


@pytest.fixture(scope="module")
def trained(contract):
    """A real (seeded, untrained) model over contract features: serving does not care how
    good it is, and building it takes milliseconds."""
    df = generate(WorldSpec(rows=2000, seed=5))
    spec = fit_features(df, contract)
    torch.manual_seed(1)
    return SimpleNamespace(
        model=MLP(ModelConfig(spec.width, len(spec.classes))).eval(), features=spec
    ), df


@pytest.fixture(scope="module")
def trained_shapes(shapes_contract):
    df = shapes_frame(600, 3)
    spec = fit_features(df, shapes_contract)
    torch.manual_seed(2)
    return SimpleNamespace(
        model=MLP(ModelConfig(spec.width, len(spec.classes))).eval(), features=spec
    ), df


@pytest.fixture
def world(trained, trained_shapes, contract, shapes_contract):
    """A service of two models whose 'registries' are dicts the test edits."""
    result, df = trained
    shapes, sdf = trained_shapes
    desired = {
        FRAUD: traffic.ServingState("1", None, 0.0),
        SHAPES: traffic.ServingState("1", None, 0.0),
    }
    bad = {"9"}

    def loader(name, result):
        def load(version: str) -> LoadedModel:
            if version in bad:
                raise ModelRefused(
                    f"checkpoint of v{version} failed verification: signature does not verify"
                )
            return LoadedModel(
                version,
                f"file:///ckpt/{name}/{version}",
                "ab" * 32,
                result.model,
                result.features,
                len(result.features.classes) - 1,
            )

        return load

    fraud = ServedModel(
        FRAUD,
        validator=RowValidator(contract),
        loader=loader(FRAUD, result),
        read_state=lambda: desired[FRAUD],
        registered_model="card-fraud",
    )
    multi = ServedModel(
        SHAPES,
        validator=RowValidator(shapes_contract),
        loader=loader(SHAPES, shapes),
        read_state=lambda: desired[SHAPES],
        task="multiclass",
        classes=(0, 1, 2),
    )
    service = ScoringService([fraud, multi], default=FRAUD, poll_seconds=60)
    app = create_app(service, access=ACCESS, poll=False)
    service.poll_once()
    rows = records(df.head(20), [c.name for c in contract.features])
    srows = records(sdf.head(20), [c.name for c in shapes_contract.features])
    with TestClient(app, client=LOOPBACK) as client:
        yield SimpleNamespace(
            service=service,
            client=client,
            desired=desired,
            rows=rows,
            srows=srows,
            fraud=fraud,
            shapes=multi,
        )


def tensors(rows: list[dict], types: dict[str, str]) -> list[dict]:
    """OIP inputs: one per column."""
    dtype = {"float": "FP64", "int": "INT64", "category": "BYTES", "bool": "BOOL"}
    return [
        {"name": c, "datatype": dtype[t], "shape": [len(rows)], "data": [r[c] for r in rows]}
        for c, t in types.items()
    ]


# -- the default model's routes (/predict, /feedback), as before ------------------------------


def test_one_row_many_rows_and_wrapped_rows_are_scored(world):
    for body, n in ((world.rows[0], 1), (world.rows[:5], 5), ({"rows": world.rows[:3]}, 3)):
        r = world.client.post("/predict", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["version"] == "1" and out["alias"] == "champion" and out["model"] == FRAUD
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
)
def test_contract_violations_are_422_naming_row_and_field(world, mutate, field, words):
    batch = [dict(r) for r in world.rows[:3]]
    mutate(batch[2])
    r = world.client.post("/predict", json=batch)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail[0]["row"] == 2 and detail[0]["field"] == field
    assert words in detail[0]["error"]
    assert "row 2" in r.json()["message"]


def test_nullable_feature_may_be_null_and_extra_fields_are_ignored(world):
    row = dict(world.rows[0], distance_from_home_km=None, transaction_id="t-1", is_fraud=1)
    assert world.client.post("/predict", json=row).status_code == 200


@pytest.mark.parametrize("body", [b"{not json", b'"a string"', b"[]", b'{"rows": 3}'])
def test_malformed_bodies_are_400(world, body):
    r = world.client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["detail"]


def test_bad_input_is_never_counted_against_a_model(world):
    client = world.client
    client.post("/predict", json=dict(world.rows[0], hour=99))
    snap = parse_snapshot(client.get("/metrics").text, FRAUD)
    assert snap.stats("1").requests == 0
    assert (
        'scoring_rejected_requests_total{model="card_fraud",status="422"} 1.0'
        in client.get("/metrics").text
    )


def test_weight_routes_and_routing_keys_are_sticky(world):
    service, client, desired, rows = world.service, world.client, world.desired, world.rows
    desired[FRAUD] = traffic.ServingState("1", "2", 0.3)
    service.poll_once()
    seen = {}
    for i in range(300):
        key = f"card-{i % 30}"
        v = client.post("/predict", json=rows[i % 20], headers={"x-routing-key": key}).json()[
            "version"
        ]
        assert seen.setdefault(key, v) == v  # a key always lands on the same side
    share = sum(v == "2" for v in seen.values()) / len(seen)
    assert 0.05 < share < 0.6
    # growing the weight keeps every canary key on the canary (monotone buckets)
    desired[FRAUD] = traffic.ServingState("1", "2", 0.8)
    service.poll_once()
    for key, v in seen.items():
        if v == "2":
            assert (
                client.post("/predict", json=rows[0], headers={"x-routing-key": key}).json()[
                    "version"
                ]
                == "2"
            )


def test_refused_champion_keeps_the_last_good_one_and_says_so(world):
    service, client, desired, rows = world.service, world.client, world.desired, world.rows
    desired[FRAUD] = traffic.ServingState("9", None, 0.0)
    service.poll_once()
    r = client.get("/readyz")
    assert r.status_code == 200
    detail = r.json()
    assert detail["champion"]["version"] == "1"
    assert "signature does not verify" in detail["refused"]["9"]
    assert any("v9 is not served" in n for n in detail["notes"])
    assert client.post("/predict", json=rows[0]).json()["version"] == "1"
    assert parse_snapshot(client.get("/metrics").text, FRAUD).refused == {"9"}
    assert parse_snapshot(client.get("/metrics").text, SHAPES).refused == frozenset()


def test_refused_canary_gets_no_traffic(world):
    desired, service = world.desired, world.service
    desired[FRAUD] = traffic.ServingState("1", "9", 1.0)
    service.poll_once()
    assert world.fraud.table.canary is None and world.fraud.table.weight == 0
    assert {
        world.client.post("/predict", json=world.rows[0]).json()["version"] for _ in range(10)
    } == {"1"}


def test_not_ready_without_a_verified_champion(contract):
    served = ServedModel(
        FRAUD,
        validator=RowValidator(contract),
        loader=lambda v: (_ for _ in ()).throw(ModelRefused("broken")),
        read_state=lambda: traffic.ServingState("3", None, 0.0),
    )
    service = ScoringService([served], default=FRAUD)
    with TestClient(create_app(service, poll=False)) as client:
        service.poll_once()
        assert client.get("/readyz").status_code == 503
        assert client.get("/healthz").status_code == 200
        assert client.get("/v2/health/live").status_code == 200
        assert client.get(f"/v2/models/{FRAUD}/ready").status_code == 503
        r = client.post("/predict", json={"amount": 1})
        assert r.status_code in (422, 503)


def test_registry_outage_keeps_serving(world):
    def down():
        raise ConnectionError("registry unreachable")

    world.fraud.read_state = down
    world.service.poll_once()
    assert world.client.post("/predict", json=world.rows[0]).status_code == 200
    detail = world.client.get("/readyz").json()
    assert detail["ready"] and "registry unreachable" in detail["last_poll"]["error"]
    # the other model's poll is not affected
    assert world.shapes.status.ok and world.shapes.status.error is None


def test_fault_switch_needs_the_admin_token_and_is_visible(world):
    client, rows = world.client, world.rows
    r = client.post(
        "/admin/faults",
        json={"version": "1", "error_rate": 1.0, "score_shift": 0.2},
        headers=ADMIN,
    )
    assert r.status_code == 200 and r.json()[FRAUD]["1"]["error_rate"] == 1.0
    assert client.post("/predict", json=rows[0]).status_code == 500
    # the fault is card_fraud's v1, not every model's v1
    infer = {"inputs": world.srows[:2]}
    assert client.post(f"/v2/models/{SHAPES}/infer", json=infer).status_code == 200
    snap = parse_snapshot(client.get("/metrics").text, FRAUD)
    assert snap.faults == {"1"} and snap.stats("1").errors == 1
    assert parse_snapshot(client.get("/metrics").text, SHAPES).faults == frozenset()
    client.post("/admin/faults", json={"version": "1", "score_shift": 0.5}, headers=ADMIN)
    shifted = client.post("/predict", json=rows[0]).json()["scores"][0]
    assert shifted >= 0.5
    assert (
        client.post(
            "/admin/faults",
            json={"model": "nope", "version": "1", "error_rate": 1},
            headers=ADMIN,
        ).status_code
        == 404
    )
    assert client.delete("/admin/faults", headers=ADMIN).json() == {}
    bad = {"version": "x", "error_rate": 2}
    assert client.post("/admin/faults", json=bad, headers=ADMIN).status_code == 422
    # loopback is no credential: without the token (or with another one) nothing changes
    assert client.get("/admin/faults").status_code == 401
    wrong = {"Authorization": "Bearer " + "x" * 40}
    assert (
        client.post(
            "/admin/faults", json={"version": "1", "error_rate": 1}, headers=wrong
        ).status_code
        == 403
    )
    assert client.get("/admin/faults", headers=ADMIN).json() == {}


def test_fault_on_a_multiclass_model_is_its_own(world):
    client = world.client
    r = client.post(
        "/admin/faults", json={"model": SHAPES, "version": "1", "score_shift": 0.9}, headers=ADMIN
    )
    assert r.status_code == 200 and set(r.json()) == {SHAPES}
    out = client.post(f"/v2/models/{SHAPES}/infer", json={"inputs": world.srows[:4]}).json()
    probs = np.array([o["data"] for o in out["outputs"]])  # classes x rows
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    np.testing.assert_allclose(probs, 1 / 3, atol=0.02)  # shifted almost flat
    assert client.post("/predict", json=world.rows[0]).status_code == 200  # fraud untouched
    assert client.delete(f"/admin/faults/1?model={SHAPES}", headers=ADMIN).json() == {}
    assert client.get("/readyz").json()["faults"] == {}


def test_feedback_feeds_labelled_histograms_and_auc(world):
    client, rows = world.client, world.rows
    ids = [client.post("/predict", json=rows[i]).json()["request_id"] for i in range(20)]
    labels = [i % 2 for i in range(20)]
    items = [{"request_id": rid, "labels": [y]} for rid, y in zip(ids, labels, strict=True)]
    # one id the service never issued refuses the batch: nothing is recorded
    r = client.post(
        "/feedback",
        json={"feedback": [*items, {"request_id": "nope", "label": 1}]},
        headers=FEEDBACK,
    )
    assert r.status_code == 404 and r.json()["refused"][0]["result"] == "forged"
    r = client.post("/feedback", json={"feedback": items}, headers=FEEDBACK)
    assert r.json() == {"matched": 20, "unknown": 0, "mismatched": 0}
    text = client.get("/metrics").text
    snap = parse_snapshot(text, FRAUD)
    assert snap.stats("1").labelled_pos.total == 10 and snap.stats("1").labelled_neg.total == 10
    assert 'scoring_labelled_roc_auc{alias="champion",model="card_fraud",version="1"}' in text
    # labels are taken once: a repeat is a conflict, never a second label
    again = client.post("/feedback", json={"request_id": ids[0], "label": 1}, headers=FEEDBACK)
    assert again.status_code == 409 and again.json()["refused"][0]["result"] == "duplicate"
    assert parse_snapshot(client.get("/metrics").text, FRAUD).stats("1").labelled_pos.total == 10


def test_swap_is_atomic_for_requests_in_flight(world):
    old = world.fraud.table
    world.desired[FRAUD] = traffic.ServingState("2", None, 0.0)
    new = world.service.poll_once()[FRAUD]
    assert new is world.fraud.table and new is not old
    assert old.champion.model.version == "1"  # a request holding the old table finishes on v1
    assert world.client.post("/predict", json=world.rows[0]).json()["version"] == "2"


# -- many models: Open Inference Protocol routes ----------------------------------------------


def test_oip_infer_one_input_per_column_and_one_output_per_class(world, contract):
    client, rows = world.client, world.rows[:3]
    types = {c.name: c.type for c in contract.features}
    body = {"id": "req-42", "inputs": tensors(rows, types)}
    r = client.post(f"/v2/models/{FRAUD}/infer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["model_name"], out["model_version"], out["id"]) == (FRAUD, "1", "req-42")
    assert out["parameters"]["alias"] == "champion"
    assert [o["name"] for o in out["outputs"]] == ["probability_0", "probability_1"]
    for o in out["outputs"]:
        assert o["datatype"] == "FP32" and o["shape"] == [3] and len(o["data"]) == 3
    p0, p1 = (np.array(o["data"]) for o in out["outputs"])
    np.testing.assert_allclose(p0 + p1, 1.0, atol=1e-5)
    # the same rows through /predict: the positive class's probability
    legacy = client.post("/predict", json=rows).json()["scores"]
    np.testing.assert_allclose(legacy, p1, atol=1e-6)
    # the registered model's name works too; [N, 1] shapes, nested data, picked outputs
    nested = [
        {**t, "shape": [3, 1], "data": [[v] for v in t["data"]]} for t in tensors(rows, types)
    ]
    r = client.post(
        "/v2/models/card-fraud/infer",
        json={"inputs": nested, "outputs": [{"name": "probability_1"}]},
    )
    assert r.status_code == 200 and [o["name"] for o in r.json()["outputs"]] == ["probability_1"]
    # feedback refers to the id the service issued, never the caller's
    fb = client.post(
        f"/v2/models/{FRAUD}/feedback",
        json={"request_id": "req-42", "labels": [0, 1, 0]},
        headers=FEEDBACK,
    )
    assert fb.status_code == 404
    fb = client.post(
        f"/v2/models/{FRAUD}/feedback",
        json={"request_id": out["parameters"]["request_id"], "labels": [0, 1, 0]},
        headers=FEEDBACK,
    )
    assert fb.json()["matched"] == 3


def test_oip_multiclass_scores_every_class(world, shapes_contract):
    client, srows = world.client, world.srows[:5]
    types = {c.name: c.type for c in shapes_contract.features}
    r = client.post(f"/v2/models/{SHAPES}/infer", json={"inputs": tensors(srows, types)})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model_name"] == SHAPES
    assert [o["name"] for o in out["outputs"]] == [
        "probability_0",
        "probability_1",
        "probability_2",
    ]
    probs = np.array([o["data"] for o in out["outputs"]])
    assert probs.shape == (3, 5)
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    # the simple form (row objects) gives the same answer
    simple = client.post(f"/v2/models/{SHAPES}/infer", json={"inputs": srows}).json()
    np.testing.assert_allclose(np.array([o["data"] for o in simple["outputs"]]), probs, atol=1e-6)
    # labels per row feed the one-vs-rest labelled metric (3 pairs a row)
    labels = [0, 1, 2, 1, 0]
    fb = client.post(
        f"/v2/models/{SHAPES}/feedback",
        json={"request_id": out["parameters"]["request_id"], "labels": labels},
        headers=FEEDBACK,
    )
    assert fb.json() == {"matched": 5, "unknown": 0, "mismatched": 0}
    snap = parse_snapshot(client.get("/metrics").text, SHAPES)
    assert snap.stats("1").labelled_pos.total == 5 and snap.stats("1").labelled_neg.total == 10
    assert (
        snap.stats("1").rows == 10 and snap.stats("1").score.total == 30
    )  # every class's probability
    # feedback for another model through /feedback's "model" field
    rid = client.post(f"/v2/models/{SHAPES}/infer", json={"inputs": srows[:1]}).json()["id"]
    fb = client.post(
        "/feedback", json={"model": SHAPES, "request_id": rid, "label": 2}, headers=FEEDBACK
    )
    assert fb.json()["matched"] == 1


def test_oip_contract_and_tensor_errors(world, shapes_contract):
    client = world.client
    types = {c.name: c.type for c in shapes_contract.features}
    good = tensors(world.srows[:2], types)

    def post(inputs, **kw):
        return client.post(f"/v2/models/{SHAPES}/infer", json={"inputs": inputs, **kw})

    bad_value = [dict(t, data=["purple", "red"]) if t["name"] == "colour" else t for t in good]
    r = post(bad_value)
    assert r.status_code == 422
    assert r.json()["detail"][0] == {
        "row": 0,
        "field": "colour",
        "error": "unknown category 'purple'; expected one of ['red', 'green', 'blue']",
    }
    r = post([t for t in good if t["name"] != "corners"])
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "corners"
    for inputs, words in (
        ([dict(good[0], shape=[3])] + good[1:], "shape [3] but 2 values"),
        ([dict(good[0], data=[1.0], shape=[1])] + good[1:], "the others"),
        ([dict(good[0], datatype="BYTES")] + good[1:], "use FP64"),
        ([dict(good[0], datatype="FP128")] + good[1:], "unknown datatype"),
        ([dict(good[0], shape=[2, 2])] + good[1:], "[N] or [N, 1]"),
        (good + [good[0]], "given twice"),
        ([], "no rows"),
    ):
        r = post(inputs)
        assert r.status_code == 400 and words in r.json()["error"], (words, r.json())
    assert post(good, outputs=[{"name": "probability_7"}]).status_code == 400
    r = client.post(
        f"/v2/models/{SHAPES}/infer", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]


def test_unknown_model_is_404_naming_the_known_ones(world):
    client = world.client
    for method, path in (
        ("post", "/v2/models/nope/infer"),
        ("get", "/v2/models/nope"),
        ("get", "/v2/models/nope/ready"),
        ("post", "/v2/models/nope/feedback"),
    ):
        body = (
            {"inputs": world.srows[:1], "request_id": "x", "label": 1} if method == "post" else None
        )
        r = client.request(method.upper(), path, json=body, headers=FEEDBACK)
        assert r.status_code == 404, path
        assert r.json()["known_models"] == [FRAUD, SHAPES]
        assert "unknown model 'nope'" in r.json()["error"] and "card_fraud" in r.json()["error"]
    assert 'scoring_rejected_requests_total{model="",status="404"}' in client.get("/metrics").text


def test_metadata_and_readiness_per_model(world, contract):
    client = world.client
    world.desired[FRAUD] = traffic.ServingState("1", "2", 0.25)
    world.service.poll_once()
    meta = client.get(f"/v2/models/{FRAUD}").json()
    assert meta["name"] == FRAUD and meta["versions"] == ["1", "2"]
    assert (
        meta["parameters"]["registered_model"] == "card-fraud"
        and meta["parameters"]["canary_weight"] == 0.25
    )
    inputs = {i["name"]: i for i in meta["inputs"]}
    assert list(inputs) == world.fraud.table.champion.model.spec.input_columns
    assert inputs["amount"]["datatype"] == "FP64" and inputs["hour"]["datatype"] == "INT64"
    assert (
        inputs["channel"]["datatype"] == "BYTES"
        and "online" in inputs["channel"]["parameters"]["categories"]
    )
    assert inputs["hour"]["parameters"]["max"] == 23 and inputs["amount"]["shape"] == [-1]
    assert [o["name"] for o in meta["outputs"]] == ["probability_0", "probability_1"]
    smeta = client.get(f"/v2/models/{SHAPES}").json()
    assert smeta["versions"] == ["1"] and len(smeta["outputs"]) == 3
    assert smeta["parameters"]["task"] == "multiclass"
    assert client.get(f"/v2/models/{SHAPES}/ready").json() == {"name": SHAPES, "ready": True}
    assert client.get("/v2/health/ready").status_code == 200
    listed = client.get("/v2/models").json()
    assert [m["name"] for m in listed["models"]] == [FRAUD, SHAPES] and listed[
        "default_model"
    ] == FRAUD
    # a pinned version that is serving answers; one that is not is 404
    r = client.post(f"/v2/models/{FRAUD}/versions/2/infer", json={"inputs": world.rows[:2]})
    assert (
        r.status_code == 200
        and r.json()["model_version"] == "2"
        and r.json()["parameters"]["alias"] == "canary"
    )
    r = client.post(f"/v2/models/{FRAUD}/versions/7/infer", json={"inputs": world.rows[:2]})
    assert r.status_code == 404 and r.json()["versions"] == ["1", "2"]
    ready = client.get("/readyz").json()
    assert ready["models"][SHAPES]["champion"] == "1" and ready["models"][FRAUD]["canary"] == "2"


def test_two_models_each_route_to_their_own_champion_and_canary_weight(world):
    """Same version numbers, separate registries: each model's table follows its own."""
    client, desired, service = world.client, world.desired, world.service
    desired[FRAUD] = traffic.ServingState("2", None, 0.0)
    desired[SHAPES] = traffic.ServingState("1", "3", 1.0)  # shapes' canary takes all its traffic
    service.poll_once()
    assert client.post("/predict", json=world.rows[0]).json()["version"] == "2"
    for _ in range(5):
        out = client.post(f"/v2/models/{SHAPES}/infer", json={"inputs": world.srows[:1]}).json()
        assert (out["model_version"], out["parameters"]["alias"]) == ("3", "canary")
        out = client.post(f"/v2/models/{FRAUD}/infer", json={"inputs": world.rows[:1]}).json()
        assert (out["model_version"], out["parameters"]["alias"]) == ("2", "champion")
    text = client.get("/metrics").text
    assert 'scoring_canary_weight{model="shapes"} 1.0' in text
    assert 'scoring_canary_weight{model="card_fraud"} 0.0' in text
    fraud, shapes = parse_snapshot(text, FRAUD), parse_snapshot(text, SHAPES)
    assert fraud.serving == {"champion": "2"} and shapes.serving == {"champion": "1", "canary": "3"}
    assert fraud.stats("2").requests == 6 and shapes.stats("3").requests == 5
    assert fraud.stats("3").requests == 0 and shapes.stats("2").requests == 0


def test_every_series_carries_the_model_label(world):
    client = world.client
    client.post("/predict", json=world.rows[:2])
    client.post(f"/v2/models/{SHAPES}/infer", json={"inputs": world.srows[:2]})
    client.post("/predict", json=[{"amount": "x"}])
    from prometheus_client.parser import text_string_to_metric_families

    seen = set()
    for fam in text_string_to_metric_families(client.get("/metrics").text):
        for s in fam.samples:
            if s.name.startswith("scoring_"):
                assert "model" in s.labels, s
                seen.add((fam.name, s.labels["model"]))
    for fam in (
        "scoring_requests",
        "scoring_rows",
        "scoring_request_latency_seconds",
        "scoring_predicted_score",
        "scoring_model_info",
        "scoring_canary_weight",
        "scoring_registry_polls",
    ):
        assert {(fam, FRAUD), (fam, SHAPES)} <= seen, fam


# -- build_service: the real registry, specs on disk, a broken one among them ------------------


def _write_specs(root: Path) -> None:
    (root / FRAUD).mkdir(parents=True)
    for f in ("model.yaml", "contract.yaml"):
        shutil.copy(ROOT / "models" / FRAUD / f, root / FRAUD / f)
    (root / SHAPES).mkdir()
    (root / SHAPES / "contract.yaml").write_text(SHAPES_CONTRACT)
    (root / SHAPES / "model.yaml").write_text("contract: contract.yaml\ntask: multiclass\n")
    (root / "broken").mkdir()  # binary task on a 3-class contract: refused by the spec loader
    (root / "broken" / "contract.yaml").write_text(SHAPES_CONTRACT)
    (root / "broken" / "model.yaml").write_text("contract: contract.yaml\ntask: binary\n")
    (root / "garbled").mkdir()
    (root / "garbled" / "model.yaml").write_text("contract: [unclosed\n")


def test_build_service_serves_every_spec_from_the_registry_and_skips_broken_ones(
    pipeline_home, tmp_path, monkeypatch, trained, trained_shapes
):
    from pipeline import registry, settings
    from pipeline.serving.app import build_service
    from pipeline.spec import get_spec, use_spec

    root = tmp_path / "models"
    _write_specs(root)
    monkeypatch.setenv("PIPELINE_MODELS_ROOT", str(root))
    monkeypatch.setenv("PIPELINE_MODEL", FRAUD)
    settings.get_settings.cache_clear()
    (result, df), (shapes, sdf) = trained, trained_shapes
    fraud_uri = _publish(pipeline_home, "fraud", result.model, result.features, df.head(64))
    shapes_uri = _publish(pipeline_home, "shapes", shapes.model, shapes.features, sdf.head(64))
    versions: dict[str, list[str]] = {}
    for name, uri, n in ((FRAUD, fraud_uri, 2), (SHAPES, shapes_uri, 1)):
        with use_spec(get_spec(name)):
            for i in range(n):
                run_id = registry.get_or_create_run(f"{name}-{i}")
                versions.setdefault(name, []).append(
                    registry.register_version(
                        run_id, f"{name}-{i}", uri, gated_tags(uri), description="test"
                    )
                )
            registry.set_alias(registry.CHAMPION, versions[name][-1])
    assert versions == {FRAUD: ["1", "2"], SHAPES: ["1"]}
    # shapes gets a canary at full weight; the weight tag is shapes' own
    traffic.set_canary_weight(1.0, "shapes")
    with use_spec(get_spec(SHAPES)):
        registry.set_alias(traffic.CANARY, "1")

    service = build_service(poll_seconds=60)
    assert service.names == [FRAUD, SHAPES] and service.default == FRAUD
    assert set(service.broken) == {
        str(root / "broken" / "model.yaml"),
        str(root / "garbled" / "model.yaml"),
    }
    assert "use task: multiclass" in service.broken[str(root / "broken" / "model.yaml")]
    with TestClient(create_app(service, poll=False), client=LOOPBACK) as client:
        service.poll_once()
        assert service.model(FRAUD).refusals == {} and service.model(SHAPES).refusals == {}
        assert traffic.read_state("card-fraud") == traffic.ServingState("2", None, 0.0)
        assert traffic.read_state("shapes") == traffic.ServingState("1", "1", 1.0)
        out = client.post(
            f"/v2/models/{FRAUD}/infer",
            json={"inputs": records(df.head(3), result.features.input_columns)},
        )
        assert out.status_code == 200, out.text
        assert (out.json()["model_version"], out.json()["parameters"]["alias"]) == ("2", "champion")
        assert (
            client.post(
                "/predict", json=records(df.head(1), result.features.input_columns)[0]
            ).json()["version"]
            == "2"
        )
        out = client.post(
            f"/v2/models/{SHAPES}/infer",
            json={"inputs": records(sdf.head(2), shapes.features.input_columns)},
        )
        assert out.status_code == 200, out.text
        assert (out.json()["model_version"], out.json()["parameters"]["alias"]) == ("1", "canary")
        assert len(out.json()["outputs"]) == 3
        ready = client.get("/readyz").json()
        assert ready["ready"] and ready["champion"]["version"] == "2" and ready["server_ready"]
        assert set(ready["broken_specs"]) == set(service.broken)
        r = client.post("/v2/models/broken/infer", json={"inputs": []})
        assert r.status_code == 404 and r.json()["known_models"] == [FRAUD, SHAPES]
        assert client.get("/v2/health/ready").status_code == 200
        # the checkpoints were verified on load (digests, signature): a real manifest digest
        assert len(service.model(FRAUD).table.champion.model.manifest_sha256) == 64


def test_a_model_never_registered_is_not_ready_and_does_not_block_the_others(
    pipeline_home, tmp_path, monkeypatch, trained
):
    from pipeline import registry, settings
    from pipeline.serving.app import build_service
    from pipeline.spec import get_spec, use_spec

    root = tmp_path / "models"
    _write_specs(root)
    monkeypatch.setenv("PIPELINE_MODELS_ROOT", str(root))
    settings.get_settings.cache_clear()
    result, df = trained
    uri = _publish(pipeline_home, "fraud", result.model, result.features, df.head(64))
    with use_spec(get_spec(FRAUD)):
        v = registry.register_version(
            registry.get_or_create_run("k"), "k", uri, gated_tags(uri), description="test"
        )
        registry.set_alias(registry.CHAMPION, v)
    service = build_service(poll_seconds=60)
    with TestClient(create_app(service, poll=False)) as client:
        service.poll_once()
        shapes = service.model(SHAPES)
        assert shapes.status.ok and shapes.status.desired == traffic.ServingState(None, None, 0.0)
        assert client.get(f"/v2/models/{SHAPES}/ready").status_code == 503
        assert (
            client.post(f"/v2/models/{SHAPES}/infer", json={"inputs": [{"width": 1.0}]}).status_code
            == 422
        )
        assert client.get(f"/v2/models/{FRAUD}/ready").status_code == 200
        # nothing to wait for (shapes' registry names no champion): the server is ready
        assert client.get("/v2/health/ready").status_code == 200
        assert client.get("/readyz").json()["models"][SHAPES]["ready"] is False
        assert any("has no champion" in n for n in shapes.readiness()["notes"])
