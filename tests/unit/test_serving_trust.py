"""Trust boundaries of the scoring service (issue 14): it serves only what the gate allowed,
builds models only with the spec's code in git, and exposes nothing to a stranger.

* Registry side: real signed checkpoints in the embedded storage, the real MLflow SQLite
  registry, versions moved by hand with ``MlflowClient.set_registered_model_alias`` (what
  the MLflow UI does), the service built as ``python -m pipeline serve`` builds it.
* HTTP side: ``TestClient`` for the routes, and a real ``uvicorn`` process (``--proxy-headers
  --forwarded-allow-ips '*'``) on 127.0.0.1 for what only a real server shows: proxy-header
  rewriting and chunked bodies.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
import yaml
from fastapi.testclient import TestClient

from pipeline.data.generate import WorldSpec, generate
from pipeline.serving import traffic
from pipeline.serving.access import AccessPolicy, RequestIds, ServingConfigError
from pipeline.serving.app import create_app
from pipeline.serving.metrics import parse_snapshot
from pipeline.serving.schema import RowValidator
from pipeline.serving.service import LoadedModel, ScoringService, ServedModel
from pipeline.train.features import fit_features
from pipeline.train.model import MLP, ModelConfig
from tests.unit._serving import gated_tags as gated
from tests.unit._serving import publish_checkpoint as _publish
from tests.unit._serving import records

ROOT = Path(__file__).resolve().parents[2]
FRAUD, SHAPES = "card_fraud", "shapes"
ADMIN_TOKEN = "admin-" + "a1" * 20
FEEDBACK_TOKEN = "feedback-" + "f2" * 20
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
FEEDBACK = {"Authorization": f"Bearer {FEEDBACK_TOKEN}"}

SHAPES_CONTRACT = """
name: shapes
id_column: shape_id
target: {name: kind, values: [0, 1, 2]}
columns:
  - {name: shape_id, type: string, unique: true}
  - {name: width, type: float, min: 0.0, max: 100.0}
  - {name: height, type: float, min: 0.0, max: 100.0}
  - {name: colour, type: category, categories: [red, green, blue]}
  - {name: kind, type: int, min: 0, max: 2}
"""
# A spec-local factory that says where it was imported from, when asked to.
NET_PY = """
import os

from torch import nn

_MARK = os.environ.get("SERVING_TRUST_MARKER")
if _MARK:
    with open(_MARK, "a") as fh:
        fh.write(__file__ + "\\n")


def build(inputs, width=8):
    return nn.Sequential(
        nn.Linear(inputs.input_width, width), nn.ReLU(), nn.Linear(width, inputs.num_classes)
    )
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local(uri: str) -> Path:
    assert uri.startswith("file://"), uri
    return Path(uri.removeprefix("file://"))


# -- the registry side -----------------------------------------------------------------------


def _manifest_sha(uri: str) -> str:
    from pipeline import checkpoint, storage

    data = storage.read_bytes(storage.join(uri, checkpoint.MANIFEST), verify=False)
    return hashlib.sha256(data).hexdigest()


def _register(spec_name: str, uri: str, tags: dict[str, str]) -> str:
    from pipeline import registry
    from pipeline.spec import get_spec, use_spec

    key = f"trust-{uuid.uuid4().hex[:8]}"
    with use_spec(get_spec(spec_name)):
        return registry.register_version(
            registry.get_or_create_run(key), key, uri, tags, description="trust test"
        )


def _by_hand(registered_model: str, alias: str, version: str) -> None:
    """What a user with registry write access does in the MLflow UI: no gate, no CAS."""
    from pipeline import registry

    registry.client().set_registered_model_alias(registered_model, alias, version)


def _tag(spec_name: str, version: str, tags: dict[str, str]) -> None:
    from pipeline import registry
    from pipeline.spec import get_spec, use_spec

    with use_spec(get_spec(spec_name)):
        registry.tag_version(version, tags)


@pytest.fixture
def fraud(pipeline_home, tmp_path, monkeypatch):
    """card_fraud's v1 gated and champion, served by the service ``build_service`` makes."""
    from pipeline import settings
    from pipeline.serving.app import build_service

    root = tmp_path / "models"
    (root / FRAUD).mkdir(parents=True)
    for f in ("model.yaml", "contract.yaml"):
        shutil.copy(ROOT / "models" / FRAUD / f, root / FRAUD / f)
    monkeypatch.setenv("PIPELINE_MODELS_ROOT", str(root))
    monkeypatch.setenv("PIPELINE_MODEL", FRAUD)
    settings.get_settings.cache_clear()
    from pipeline.spec import get_spec

    contract = get_spec(FRAUD).contract_obj()
    df = generate(WorldSpec(rows=1500, seed=5))
    features = fit_features(df, contract)
    torch.manual_seed(1)
    model = MLP(ModelConfig(features.width, len(features.classes))).eval()
    uri = _publish(pipeline_home, "fraud-v1", model, features, df.head(64))
    v1 = _register(FRAUD, uri, gated(uri))
    _by_hand("card-fraud", "champion", v1)
    service = build_service(poll_seconds=60)
    with TestClient(create_app(service, poll=False)) as client:
        service.poll_once()
        assert service.model(FRAUD).table.champion.model.version == v1
        yield SimpleNamespace(
            home=pipeline_home,
            service=service,
            served=service.model(FRAUD),
            client=client,
            uri=uri,
            v1=v1,
            rows=records(df.head(3), features.input_columns),
            model=model,
            features=features,
            probe=df.head(64),
        )


def _refusal_count(text: str, alias: str, version: str, reason: str) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "scoring_refusals_total" and s.labels == {
                "model": FRAUD,
                "alias": alias,
                "version": version,
                "reason": reason,
            }:
                return s.value
    return None


def _assert_refused_and_v1_serves(f, version: str, reason: str, alias: str = "champion") -> dict:
    f.service.poll_once()
    r = f.client.get("/readyz")
    assert r.status_code == 200, r.text
    detail = r.json()
    assert detail["champion"]["version"] == f.v1
    assert detail["refusals"][version]["reason"] == reason, detail["refusals"]
    assert detail["refusals"][version]["alias"] == alias
    assert any(f"v{version} is not served" in n and reason in n for n in detail["notes"]), detail
    for _ in range(5):
        out = f.client.post("/predict", json=f.rows).json()
        assert (out["version"], out["alias"]) == (f.v1, "champion")
    text = f.client.get("/metrics").text
    assert _refusal_count(text, alias, version, reason) == 1.0
    assert version in parse_snapshot(text, FRAUD).refused
    f.service.poll_once()  # the same refusal again is not a second count
    assert _refusal_count(f.client.get("/metrics").text, alias, version, reason) == 1.0
    return detail


@pytest.mark.parametrize(
    ("reason", "tags"),
    [
        ("rejected", {"rejected": "true", "rejection_reason": "gate: roc_auc below the floor"}),
        ("rolled_back", {"rolled_back": "true", "rollback_reason": "canary error_rate: 0.5"}),
    ],
)
def test_a_rejected_or_rolled_back_version_aliased_by_hand_is_never_served(fraud, reason, tags):
    f = fraud
    v2 = _register(FRAUD, f.uri, gated(f.uri, **tags))  # a good checkpoint, but judged bad
    _by_hand("card-fraud", "champion", v2)
    detail = _assert_refused_and_v1_serves(f, v2, reason)
    assert tags.get("rejection_reason", tags.get("rollback_reason")) in detail["refused"][v2]
    # as canary at full weight it gets no traffic either
    _by_hand("card-fraud", "champion", f.v1)
    _by_hand("card-fraud", "canary", v2)
    traffic.set_canary_weight(1.0, "card-fraud")
    f.service.poll_once()
    assert f.served.table.canary is None and f.served.table.weight == 0.0
    assert {f.client.post("/predict", json=f.rows[0]).json()["version"] for _ in range(5)} == {f.v1}
    assert _refusal_count(f.client.get("/metrics").text, "canary", v2, reason) == 1.0


def test_a_version_the_gate_never_accepted_is_refused_until_it_is(fraud):
    f = fraud
    v2 = _register(
        FRAUD,
        f.uri,
        {"checkpoint.uri": f.uri, "checkpoint.manifest_sha256": _manifest_sha(f.uri)},
    )
    _by_hand("card-fraud", "champion", v2)
    detail = _assert_refused_and_v1_serves(f, v2, "not_gated")
    assert "never accepted by the promotion gate" in detail["refused"][v2]
    # the gate's verdict (a tag) is re-read on the next poll: no restart needed
    _tag(FRAUD, v2, {"gate.verdict": "promote"})
    f.service.poll_once()
    ready = f.client.get("/readyz").json()
    assert ready["champion"]["version"] == v2 and ready["refusals"] == {}
    assert f.client.post("/predict", json=f.rows[0]).json()["version"] == v2
    assert parse_snapshot(f.client.get("/metrics").text, FRAUD).refused == frozenset()


def test_a_version_that_needed_an_approval_it_never_got_is_refused_until_approved(fraud):
    """The gate passed it, but its policy required a human approval (approval.required, which
    gate_promotion writes): aliased by hand before anyone approved, it is not served."""
    f = fraud
    v2 = _register(FRAUD, f.uri, gated(f.uri, **{"approval.required": "true"}))
    _by_hand("card-fraud", "champion", v2)
    detail = _assert_refused_and_v1_serves(f, v2, "not_approved")
    assert "required a human approval" in detail["refused"][v2]
    _tag(FRAUD, v2, {"approval.verdict": "rejected"})  # a reviewer said no: still refused
    f.service.poll_once()
    assert f.client.get("/readyz").json()["champion"]["version"] == f.v1
    _tag(FRAUD, v2, {"approval.verdict": "approved"})  # approved: served on the next poll
    f.service.poll_once()
    assert f.client.get("/readyz").json()["champion"]["version"] == v2


def test_a_fresh_service_whose_champion_is_refused_is_not_ready_and_says_why(fraud):
    from pipeline.serving.app import build_service

    f = fraud
    v2 = _register(FRAUD, f.uri, gated(f.uri, rejected="true", rejection_reason="human: no"))
    _by_hand("card-fraud", "champion", v2)
    service = build_service(poll_seconds=60)  # a restart: no last good model to fall back on
    with TestClient(create_app(service, poll=False)) as client:
        service.poll_once()
        r = client.get("/readyz")
        assert r.status_code == 503
        assert any("rejected" in n and "not ready" in n for n in r.json()["notes"])
        assert client.post("/predict", json=f.rows[0]).status_code == 503


def _resign_edited_manifest(uri: str) -> None:
    """Someone with storage write access and the signing key rewrites the manifest in place:
    every digest and the signature still verify — only the registered digest differs."""
    from pipeline import checkpoint, storage

    folder = _local(uri)
    manifest = json.loads((folder / checkpoint.MANIFEST).read_text())
    manifest["training"]["stop_reason"] = "edited in storage after registration"
    data = json.dumps(manifest, indent=2, sort_keys=True).encode()
    for name, content in ((checkpoint.MANIFEST, data), (checkpoint.SIGNATURE, None)):
        content = content if content is not None else checkpoint.sign(data).encode()
        (folder / name).write_bytes(
            content
        )  # the object and its digest sidecar, as storage has them
        (folder / (name + storage.SIDECAR)).write_text(hashlib.sha256(content).hexdigest())


@pytest.mark.parametrize("how", ["manifest_rewritten_and_resigned", "digest_tag_tampered"])
def test_a_checkpoint_whose_manifest_is_not_the_registered_one_is_refused(fraud, how):
    from pipeline import checkpoint

    f = fraud
    uri = _publish(f.home, f"fraud-{how}", f.model, f.features, f.probe)
    tags = gated(uri)
    if how == "digest_tag_tampered":
        tags["checkpoint.manifest_sha256"] = hashlib.sha256(b"another manifest").hexdigest()
    v2 = _register(FRAUD, uri, tags)
    if how == "manifest_rewritten_and_resigned":
        _resign_edited_manifest(uri)
        # the checkpoint on its own is intact: only the registered digest catches it
        checkpoint.load_for_inference(uri)
    _by_hand("card-fraud", "champion", v2)
    detail = _assert_refused_and_v1_serves(f, v2, "manifest_mismatch")
    assert "recorded at registration" in detail["refused"][v2]


def test_a_pickle_in_the_checkpoint_is_refused_and_never_unpickled(fraud, tmp_path):
    f = fraud
    uri = _publish(f.home, "fraud-pickled", f.model, f.features, f.probe)
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (_local(uri) / "weights.pt").write_bytes(pickle.dumps(Payload()))
    v2 = _register(FRAUD, uri, gated(uri))
    _by_hand("card-fraud", "champion", v2)
    detail = _assert_refused_and_v1_serves(f, v2, "verification_failed")
    assert "pickle-based file(s) ['weights.pt'] refused" in detail["refused"][v2]
    assert not marker.exists()


# -- the model's code comes from the spec in git, never from the checkpoint -------------------


@pytest.fixture
def shapes(pipeline_home, tmp_path, monkeypatch):
    """A spec whose factory is a file next to it (net.py), a version trained with it."""
    from pipeline import settings
    from pipeline.spec import get_spec
    from pipeline.train.model import ModelInputs, build_model, model_ref_for

    root = tmp_path / "models"
    folder = root / SHAPES
    folder.mkdir(parents=True)
    (folder / "contract.yaml").write_text(SHAPES_CONTRACT)
    (folder / "model.yaml").write_text(
        "contract: contract.yaml\ntask: multiclass\nmodel:\n"
        '  factory: "net:build"\n  kwargs: {width: 8}\n'
    )
    net = folder / "net.py"
    net.write_text(NET_PY + f"# {uuid.uuid4().hex}: a digest of this test's own\n")
    monkeypatch.setenv("PIPELINE_MODELS_ROOT", str(root))
    monkeypatch.setenv("PIPELINE_MODEL", SHAPES)
    settings.get_settings.cache_clear()
    spec = get_spec(SHAPES)
    rng = np.random.default_rng(3)
    n = 300
    import pandas as pd

    df = pd.DataFrame(
        {
            "shape_id": [f"s{i}" for i in range(n)],
            "width": rng.uniform(1, 99, n),
            "height": rng.uniform(1, 99, n),
            "colour": rng.choice(["red", "green", "blue"], n),
            "kind": rng.integers(0, 3, n),
        }
    )
    features = fit_features(df, spec.contract_obj())
    ref = model_ref_for(spec.model.factory, spec.model.kwargs, net)
    inputs = ModelInputs(features.width, 3, features, "multiclass")
    model = build_model(ref, inputs, net)
    uri = _publish(
        pipeline_home, "shapes-v1", model, features, df.head(32), model_ref=ref, code_file=net
    )
    # The training process imported the module (the checkpoint's copy, at save time); the
    # service runs in a process of its own, which has imported nothing yet.
    name = f"pipeline_user_models.m{hashlib.sha256(net.read_bytes()).hexdigest()[:16]}"
    sys.modules.pop(name, None)
    marker = tmp_path / "imported-from"
    monkeypatch.setenv("SERVING_TRUST_MARKER", str(marker))
    v1 = _register(SHAPES, uri, gated(uri))
    _by_hand(SHAPES, "champion", v1)
    yield SimpleNamespace(
        net=net, uri=uri, v1=v1, marker=marker, rows=records(df.head(2), features.input_columns)
    )
    sys.modules.pop(name, None)


def test_the_model_is_built_with_the_spec_code_in_git_not_the_checkpoints_copy(shapes):
    from pipeline.serving.app import build_service

    service = build_service(poll_seconds=60)
    service.poll_once()
    served = service.model(SHAPES)
    # imported once, from models/shapes/net.py — the checkpoint's model_code.py never ran
    assert shapes.marker.read_text().splitlines() == [str(shapes.net)]
    assert served.refusals == {} and served.table.champion.model.version == shapes.v1
    built_by = sys.modules[
        f"pipeline_user_models.m{hashlib.sha256(shapes.net.read_bytes()).hexdigest()[:16]}"
    ]
    assert Path(built_by.__file__) == shapes.net
    with TestClient(create_app(service, poll=False)) as client:
        out = client.post(f"/v2/models/{SHAPES}/infer", json={"inputs": shapes.rows})
        assert out.status_code == 200 and len(out.json()["outputs"]) == 3


def test_a_version_trained_with_other_code_than_the_spec_in_git_is_refused_unexecuted(shapes):
    from pipeline.serving.app import build_service

    shapes.net.write_text(shapes.net.read_text() + "# reviewed and changed in git since\n")
    service = build_service(poll_seconds=60)
    service.poll_once()
    served = service.model(SHAPES)
    assert served.table.champion is None
    refusal = served.refusals[shapes.v1]
    assert refusal.reason == "model_code" and "never executed" in refusal.message
    assert not shapes.marker.exists()  # neither the checkpoint's code nor git's was run


def test_nothing_on_the_serving_path_unpickles_or_imports_code_by_itself():
    """The serving package and the checkpoint loader: no pickle-family import, no
    ``torch.load``, no MLflow model loading, no ``exec``/``eval``/``__import__``/importlib.
    (A spec's factory is imported by ``pipeline.train.model`` — from git, as tested above.)"""
    banned_modules = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
    banned_modules |= {"importlib", "importlib.util", "importlib.machinery", "runpy"}
    banned_modules |= {"importlib.import_module", "mlflow.pyfunc", "mlflow.pytorch"}
    pickles = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
    banned_calls = {"exec", "eval", "__import__", "load_model", "torch.load", "pickle.loads"}
    files = sorted((ROOT / "pipeline" / "serving").glob("*.py")) + [ROOT / "pipeline/checkpoint.py"]
    for path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                names = {node.module or ""} | {f"{node.module}.{a.name}" for a in node.names}
            else:
                names = set()
            hits = {n for n in names if n in banned_modules or n.split(".")[0] in pickles}
            assert not hits, (path, hits)
            if isinstance(node, ast.Call):
                f = node.func
                called = (
                    f.id
                    if isinstance(f, ast.Name)
                    else f"{ast.unparse(f.value)}.{f.attr}"
                    if isinstance(f, ast.Attribute)
                    else ""
                )
                short = called.rsplit(".", 1)[-1]
                assert called not in banned_calls and short not in {"load_model", "__import__"}, (
                    path,
                    called,
                )


# -- admin -------------------------------------------------------------------------------------


def _fake_world(access: AccessPolicy | None, contract, capacity: int = 100_000):
    df = generate(WorldSpec(rows=1500, seed=5))
    features = fit_features(df, contract)
    torch.manual_seed(1)
    model = MLP(ModelConfig(features.width, len(features.classes))).eval()
    served = ServedModel(
        FRAUD,
        validator=RowValidator(contract),
        loader=lambda v: LoadedModel(v, f"file:///ckpt/{v}", "ab" * 32, model, features, 1),
        read_state=lambda: traffic.ServingState("1", None, 0.0),
        registered_model="card-fraud",
        feedback_capacity=capacity,
    )
    service = ScoringService([served], default=FRAUD, poll_seconds=60)
    service.poll_once()
    return (
        service,
        create_app(service, access=access, poll=False),
        records(df.head(8), features.input_columns),
    )


def test_admin_is_off_by_default_and_in_every_shipped_config(contract, monkeypatch):
    from pipeline.settings import Settings

    for var in ("PIPELINE_SERVING_ADMIN_ENABLED", "PIPELINE_SERVING_ADMIN_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    assert Settings().serving_admin_enabled is False
    assert AccessPolicy.from_settings(Settings()).admin is False
    _, app, _ = _fake_world(None, contract)
    with TestClient(app) as client:
        assert client.get("/admin/faults").status_code == 404
        assert client.post("/admin/poll").status_code == 404
        assert (
            client.post("/admin/faults", json={"version": "1", "error_rate": 1}).status_code == 404
        )
    compose = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
    assert (
        compose["services"]["scoring"]["environment"]["PIPELINE_SERVING_ADMIN_ENABLED"] == "false"
    )
    k8s = next(yaml.safe_load_all((ROOT / "infra" / "k8s" / "serving.yaml").read_text()))
    env = {
        e["name"]: e.get("value") for e in k8s["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["PIPELINE_SERVING_ADMIN_ENABLED"] == "false"
    helm = yaml.safe_load((ROOT / "infra" / "helm" / "values.yaml").read_text())
    assert {"name": "PIPELINE_SERVING_ADMIN_ENABLED", "value": "false"} in helm["env"]


@pytest.mark.parametrize(
    ("token", "words"),
    [
        (None, "needs PIPELINE_SERVING_ADMIN_TOKEN"),
        ("short-token", "fewer than 32"),
        ("change-me-scoring-admin-token-please-replace", "placeholder"),
    ],
)
def test_admin_enabled_without_a_strong_token_is_refused_at_start(token, words):
    from pipeline.settings import Settings

    kw = {"serving_admin_enabled": True}
    if token is not None:
        kw["serving_admin_token"] = token
    with pytest.raises(ServingConfigError, match=words):
        AccessPolicy.from_settings(Settings(**kw))


def test_the_service_process_refuses_to_start_with_admin_on_and_no_token(tmp_path):
    env = {
        **os.environ,
        "PIPELINE_HOME": str(tmp_path / "home"),
        "PIPELINE_SERVING_ADMIN_ENABLED": "true",
    }
    env.pop("PIPELINE_SERVING_ADMIN_TOKEN", None)
    port = _free_port()
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "serve", "--port", str(port)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "PIPELINE_SERVING_ADMIN_TOKEN" in proc.stderr


def test_admin_needs_its_token_through_test_client(contract):
    _, app, _ = _fake_world(AccessPolicy(admin_token=ADMIN_TOKEN), contract)
    with TestClient(app, client=("127.0.0.1", 40000)) as client:  # loopback is no credential
        assert client.get("/admin/faults").status_code == 401
        assert client.get("/admin/faults").headers["www-authenticate"] == "Bearer"
        assert (
            client.get("/admin/faults", headers={"Authorization": "Basic eDp5"}).status_code == 401
        )
        wrong = {"Authorization": "Bearer " + "0" * 40}
        assert client.post("/admin/poll", headers=wrong).status_code == 403
        assert client.get("/admin/faults", headers=ADMIN).json() == {}
        assert client.post("/admin/poll", headers=ADMIN).status_code == 200
        text = client.get("/metrics").text
        assert 'scoring_rejected_requests_total{model="",status="401"} 3.0' in text
        assert 'scoring_rejected_requests_total{model="",status="403"} 1.0' in text


@pytest.fixture(scope="module")
def uvicorn_server(tmp_path_factory):
    """The service under uvicorn's own CLI, trusting proxy headers from anyone: what a
    deployment behind a proxy or sidecar (or FORWARDED_ALLOW_IPS=*) runs."""
    tmp = tmp_path_factory.mktemp("uvicorn")
    (tmp / "models").mkdir()  # no model specs: the access rules do not depend on models
    port = _free_port()
    env = {
        **os.environ,
        "PIPELINE_HOME": str(tmp / "home"),
        "PIPELINE_MODELS_ROOT": str(tmp / "models"),
        "PIPELINE_SERVING_ADMIN_ENABLED": "true",
        "PIPELINE_SERVING_ADMIN_TOKEN": ADMIN_TOKEN,
        "PIPELINE_SERVING_FEEDBACK_TOKEN": FEEDBACK_TOKEN,
    }
    env.pop("PIPELINE_SERVING_MAX_BODY_BYTES", None)
    log = (tmp / "uvicorn.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "pipeline.serving.app:app_from_settings",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--proxy-headers",
            "--forwarded-allow-ips",
            "*",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, (tmp / "uvicorn.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.mark.parametrize(
    "forwarded",
    [
        {"X-Forwarded-For": "127.0.0.1"},
        {"X-Forwarded-For": "127.0.0.1, 127.0.0.1", "X-Forwarded-Proto": "http"},
        {"X-Forwarded-For": "203.0.113.7"},  # a proxy relaying a real outside client
        {},
    ],
    ids=["spoofed-loopback", "spoofed-chain", "outside-client", "no-header"],
)
def test_admin_behind_a_loopback_proxy_needs_the_token_whatever_the_headers(
    uvicorn_server, forwarded
):
    url = uvicorn_server
    with httpx.Client(base_url=url, timeout=10) as http:
        fault = {"version": "1", "error_rate": 1.0}
        assert http.post("/admin/faults", json=fault, headers=forwarded).status_code == 401
        assert http.post("/admin/poll", headers=forwarded).status_code == 401
        wrong = {**forwarded, "Authorization": "Bearer " + "x" * 48}
        assert http.get("/admin/faults", headers=wrong).status_code == 403
        assert http.get("/admin/faults", headers={**forwarded, **ADMIN}).json() == {}


def test_body_limit_over_real_http_also_for_chunked_bodies(uvicorn_server):
    big = b'{"rows": [' + b'{"amount": 1.0},' * (2 * (1 << 20) // 16) + b'{"amount": 1.0}]}'
    assert len(big) > 2 * (1 << 20)

    def chunks():
        for i in range(0, len(big), 64 * 1024):
            yield big[i : i + 64 * 1024]

    with httpx.Client(base_url=uvicorn_server, timeout=30) as http:
        before = http.get("/metrics").text.count('status="413"')
        r = http.post("/predict", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and "1048576-byte request limit" in r.json()["error"]
    with httpx.Client(base_url=uvicorn_server, timeout=30) as http:
        r = http.post(
            "/feedback", content=chunks(), headers={**FEEDBACK, "content-type": "application/json"}
        )
        assert r.request.headers.get("transfer-encoding") == "chunked"
        assert "content-length" not in r.request.headers
        assert r.status_code == 413
    with httpx.Client(base_url=uvicorn_server, timeout=30) as http:
        text = http.get("/metrics").text
        assert before == 0 and 'scoring_rejected_requests_total{model="",status="413"} 2.0' in text
        # a body under the limit reaches the app (no default model here: 404)
        assert http.post("/predict", json={"amount": 1.0}).status_code == 404


# -- feedback ----------------------------------------------------------------------------------


def test_feedback_needs_its_token(contract):
    _, app, rows = _fake_world(AccessPolicy(feedback_token=FEEDBACK_TOKEN), contract)
    with TestClient(app) as client:
        rid = client.post("/predict", json=rows[0]).json()["request_id"]
        item = {"request_id": rid, "label": 1}
        for path in ("/feedback", f"/v2/models/{FRAUD}/feedback"):
            r = client.post(path, json=item)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            wrong = {"Authorization": "Bearer " + "z" * 40}
            assert client.post(path, json=item, headers=wrong).status_code == 403
        assert client.post("/feedback", json=item, headers=FEEDBACK).json()["matched"] == 1
        text = client.get("/metrics").text
        assert 'scoring_rejected_requests_total{model="card_fraud",status="401"} 2.0' in text
    # a service without a feedback token takes no feedback at all
    _, app, rows = _fake_world(None, contract)
    with TestClient(app) as client:
        rid = client.post("/predict", json=rows[0]).json()["request_id"]
        r = client.post("/feedback", json={"request_id": rid, "label": 1}, headers=FEEDBACK)
        assert r.status_code == 403 and "PIPELINE_SERVING_FEEDBACK_TOKEN" in r.json()["error"]


def test_feedback_takes_only_ids_the_service_issued_and_each_once(contract):
    service, app, rows = _fake_world(AccessPolicy(feedback_token=FEEDBACK_TOKEN), contract)
    with TestClient(app) as client:
        # the victim's request, then someone reusing its id as theirs (header and OIP id)
        victim = client.post("/predict", json=rows[0]).json()["request_id"]
        mine = client.post("/predict", json=rows[1:6], headers={"X-Request-Id": victim})
        assert mine.json()["request_id"] != victim
        oip = client.post(f"/v2/models/{FRAUD}/infer", json={"id": victim, "inputs": rows[1:6]})
        assert oip.json()["id"] == victim  # the caller's correlation id is echoed ...
        assert oip.json()["parameters"]["request_id"] != victim  # ... but is not the key
        # a client-chosen id is refused, and so is a well-formed one never issued here
        for forged in ("req-42", "my-own-id", RequestIds("another-service-" + "k" * 32).issue()):
            r = client.post("/feedback", json={"request_id": forged, "label": 1}, headers=FEEDBACK)
            assert r.status_code == 404, r.text
            assert r.json()["refused"][0]["result"] == "forged"
        # the victim's labels still meet the victim's one score: nothing was overwritten
        r = client.post("/feedback", json={"request_id": victim, "label": 1}, headers=FEEDBACK)
        assert r.status_code == 200 and r.json() == {"matched": 1, "unknown": 0, "mismatched": 0}
        # a second label for the same request never replaces the first
        again = client.post("/feedback", json={"request_id": victim, "label": 0}, headers=FEEDBACK)
        assert again.status_code == 409 and again.json()["refused"][0]["result"] == "duplicate"
        snap = parse_snapshot(client.get("/metrics").text, FRAUD)
        assert snap.stats("1").labelled_pos.total == 1 and snap.stats("1").labelled_neg.total == 0
        # a batch with one bad item records nothing, and says which item it was
        good = mine.json()["request_id"]
        r = client.post(
            "/feedback",
            json={
                "feedback": [
                    {"request_id": good, "labels": [0] * 5},
                    {"request_id": "x", "label": 1},
                ]
            },
            headers=FEEDBACK,
        )
        assert r.status_code == 404 and [i["index"] for i in r.json()["refused"]] == [1]
        r = client.post("/feedback", json={"request_id": good, "labels": [0, 1]}, headers=FEEDBACK)
        assert r.status_code == 422 and r.json()["refused"][0]["result"] == "mismatched"
        r = client.post("/feedback", json={"request_id": good, "labels": [0] * 5}, headers=FEEDBACK)
        assert r.json()["matched"] == 5
        text = client.get("/metrics").text
        for result in ("forged", "duplicate", "mismatched", "held_back"):
            assert f'scoring_feedback_total{{model="card_fraud",result="{result}"}}' in text


def test_feedback_for_an_issued_id_no_longer_held_is_unknown(contract):
    _, app, rows = _fake_world(AccessPolicy(feedback_token=FEEDBACK_TOKEN), contract, capacity=1)
    with TestClient(app) as client:
        first = client.post("/predict", json=rows[0]).json()["request_id"]
        client.post("/predict", json=rows[1])  # the bounded store lets the first go
        r = client.post("/feedback", json={"request_id": first, "label": 1}, headers=FEEDBACK)
        assert r.status_code == 404 and r.json()["refused"][0]["result"] == "unknown"


# -- what may come in --------------------------------------------------------------------------


def _row_with(rows, field: str, raw: str) -> bytes:
    """A row whose ``field`` holds ``raw`` verbatim (JSON that json.dumps would not write)."""
    body = json.dumps({**rows[0], field: "__RAW__"})
    return body.replace('"__RAW__"', raw).encode()


@pytest.mark.parametrize(
    "raw",
    ["9" * 400, "-" + "9" * 400, "NaN", "Infinity", "-Infinity", "1e400", "18446744073709551616"],
    ids=["400-digits", "minus-400-digits", "nan", "inf", "minus-inf", "1e400", "2**64"],
)
def test_out_of_range_numbers_are_400_and_counted_never_500(contract, raw):
    _, app, rows = _fake_world(AccessPolicy(feedback_token=FEEDBACK_TOKEN), contract)
    headers = {"content-type": "application/json"}
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.post("/predict", content=_row_with(rows, "amount", raw), headers=headers)
        assert r.status_code == 400, r.text
        assert any(w in r.json()["detail"] for w in ("out of range", "not a JSON number"))
        oip = (
            b'{"inputs": [{"name": "amount", "datatype": "FP64", "shape": [1], "data": [%s]}]}'
            % raw.encode()
        )
        r = client.post(f"/v2/models/{FRAUD}/infer", content=oip, headers=headers)
        assert r.status_code == 400, r.text
        shape = b'{"inputs": [{"name": "amount", "shape": [%s], "data": [1.0]}]}' % raw.encode()
        assert (
            client.post(f"/v2/models/{FRAUD}/infer", content=shape, headers=headers).status_code
            == 400
        )
        rid = client.post("/predict", json=rows[0]).json()["request_id"]
        label = b'{"request_id": "%s", "label": %s}' % (rid.encode(), raw.encode())
        r = client.post("/feedback", content=label, headers={**headers, **FEEDBACK})
        assert r.status_code == 400, r.text
        text = client.get("/metrics").text
        assert 'scoring_rejected_requests_total{model="card_fraud",status="400"} 4.0' in text
        assert parse_snapshot(text, FRAUD).stats("1").errors == 0


def test_a_body_over_the_limit_is_413_before_it_is_parsed(contract):
    _, app, rows = _fake_world(AccessPolicy(max_body_bytes=1 << 20), contract)
    with TestClient(app) as client:
        big = json.dumps({"rows": rows * 20_000}).encode()
        assert len(big) > 2 * (1 << 20)
        r = client.post("/predict", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413
        # not even JSON: refused by size before anyone tries to parse it
        r = client.post(f"/v2/models/{FRAUD}/infer", content=b"{" * (2 << 20))
        assert r.status_code == 413
        text = client.get("/metrics").text
        assert 'scoring_rejected_requests_total{model="card_fraud",status="413"} 2.0' in text
        assert client.post("/predict", json=rows[:2]).status_code == 200
