"""The scoring service as it ships: started with exactly the environment that
``docker-compose.yaml``'s ``scoring`` service, and separately ``infra/k8s/serving.yaml``'s
Deployment, give it, against the stack's real servers (moto S3, MLflow with basic-auth on
PostgreSQL, the champion of the first ``retrain_card_fraud`` run). It must become ready
(``/readyz`` 200), score with pickle disabled, take a label, and be measured by the canary
analysis configured as the shipped workers are (one step's measurement of
``pipeline/canary/rollout.py``), holding only its own least-privilege credentials.

How a shipped file becomes this process's environment (nothing else is added but ``PATH``):

* compose: the image's ``ENV`` (``infra/serving/Dockerfile``), then the service's
  ``environment``, ``${VAR:?…}`` / ``${VAR:-default}`` substituted from the ``dotenv`` fixture (the
  test's ``.env``: a variable it lacks fails the test, so the service needs no other secret);
* Kubernetes: the image's ``ENV``, then the container's ``env`` in order (``$(VAR)`` expanded
  from earlier entries, as the kubelet does), ``secretKeyRef`` / ``configMapKeyRef`` read from
  :func:`k8s_objects` (the Secret and ConfigMap ``infra/README.md`` has you create),
  ``fieldRef: status.podIP`` = 127.0.0.1; no ``envFrom`` is allowed.

Then the addresses, and only they, are mapped to the stack (:func:`mapping`): ``minio`` /
``minio.retrain.svc.cluster.local:9000`` -> moto, ``mlflow`` /
``mlflow.retrain.svc.cluster.local:5000`` -> the MLflow server, ``scoring:8000`` /
``retrain-scoring.retrain.svc.cluster.local`` / the headless Service / the pod's
``:8000`` -> this test's port, bucket ``retrain-pipeline`` -> the stack's ``pipeline``,
``/tmp/pipeline`` -> a temporary folder, ``/app`` (the image's code) -> the repository.

What "read-only" means here: moto enforces no IAM and has no MinIO admin API, so the
service's S3 key is just a distinct key pair. What is checked instead: moto's request
recorder shows every call made with that key is a ``GET``/``HEAD`` under
``data/checkpoints/``, i.e. inside the ``scoring-read`` policy compose's ``minio-init``
creates (a MinIO refusal itself is not exercised). The MLflow side is real: the service's
user is made by the very ``mlflow-init`` script (``infra/mlflow/ensure_user.py``), is no
admin, and is refused a registry write.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from tests.stack.conftest import HOST, MODEL, ROOT, free_port, http, spawn, stop, wait_for

SCORING_S3_KEY = "scoring-readonly"
VAR_RE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}")


@pytest.fixture(scope="module")
def dotenv(mlflow_server, airflow) -> dict[str, str]:
    """The test's .env (compose): only what the scoring service, mlflow-init and the workers'
    serving settings read. The stack's own secrets come from its fixtures (conftest's
    module-level values are per import, so not the servers' when imported from here)."""
    return {
        "PIPELINE_BUCKET": "pipeline",
        "AWS_REGION": "us-east-1",
        "PIPELINE_MODEL": "card_fraud",
        "SCORING_S3_ACCESS_KEY": SCORING_S3_KEY,
        "SCORING_S3_SECRET_KEY": "scoring-s3-" + secrets.token_hex(12),
        "MLFLOW_ADMIN_USERNAME": mlflow_server.admin[0],
        "MLFLOW_ADMIN_PASSWORD": mlflow_server.admin[1],
        "MLFLOW_SCORING_USERNAME": "scoring",
        "MLFLOW_SCORING_PASSWORD": "scoring-mlflow-" + secrets.token_hex(12),
        # the keyring that trusts the trainer's key (the champion was signed with it)
        "PIPELINE_SIGNING_PUBLIC_KEYS": airflow.env["PIPELINE_SIGNING_PUBLIC_KEYS"],
        "PIPELINE_SERVING_FEEDBACK_TOKEN": "feedback-" + secrets.token_hex(20),
    }


def k8s_objects(
    dotenv: dict[str, str],
) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, str]]]:
    """(Secrets, ConfigMaps) by name, as infra/README.md step 3 creates them."""
    secret = {
        "AWS_ACCESS_KEY_ID": SCORING_S3_KEY,
        "AWS_SECRET_ACCESS_KEY": dotenv["SCORING_S3_SECRET_KEY"],
        "MLFLOW_TRACKING_USERNAME": dotenv["MLFLOW_SCORING_USERNAME"],
        "MLFLOW_TRACKING_PASSWORD": dotenv["MLFLOW_SCORING_PASSWORD"],
        "PIPELINE_SERVING_FEEDBACK_TOKEN": dotenv["PIPELINE_SERVING_FEEDBACK_TOKEN"],
        "PIPELINE_SERVING_REQUEST_ID_KEY": secrets.token_hex(32),
    }
    public = {"PIPELINE_SIGNING_PUBLIC_KEYS": dotenv["PIPELINE_SIGNING_PUBLIC_KEYS"]}
    return {"retrain-scoring-env": secret}, {"retrain-signing-public-keys": public}


def interpolate(value: str, dotenv: dict[str, str]) -> str:
    """Compose's ``${VAR…}`` substitution from ``dotenv``."""

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if dotenv.get(name):
            return dotenv[name]
        if op in (":-", "-"):
            return arg or ""
        raise AssertionError(f"the test's .env lacks {name} ({m.group(0)})")

    return VAR_RE.sub(sub, value).replace("$$", "$")


def image_env() -> dict[str, str]:
    text = re.sub(r"\\\n", " ", (ROOT / "infra" / "serving" / "Dockerfile").read_text())
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(kv.split("=", 1) for kv in line[4:].split())
    return env


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yaml").read_text())


def compose_env(service: str, dotenv: dict[str, str]) -> dict[str, str]:
    env = compose()["services"][service]["environment"]
    return {k: interpolate(str(v), dotenv) for k, v in env.items()}


def k8s_container() -> dict[str, Any]:
    docs = yaml.safe_load_all((ROOT / "infra" / "k8s" / "serving.yaml").read_text())
    deploy = next(d for d in docs if d and d["kind"] == "Deployment")
    return deploy["spec"]["template"]["spec"]["containers"][0]


def k8s_env(dotenv: dict[str, str]) -> dict[str, str]:
    secret_objs, config_maps = k8s_objects(dotenv)
    c = k8s_container()
    assert "envFrom" not in c, "every variable of the scoring pod must be named in its env"
    env: dict[str, str] = {}
    for e in c["env"]:
        if "value" in e:
            value = re.sub(
                r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), str(e["value"])
            )
        else:
            ref = e["valueFrom"]
            if "secretKeyRef" in ref:
                value = secret_objs[ref["secretKeyRef"]["name"]][ref["secretKeyRef"]["key"]]
            elif "configMapKeyRef" in ref:
                value = config_maps[ref["configMapKeyRef"]["name"]][ref["configMapKeyRef"]["key"]]
            else:
                assert ref["fieldRef"]["fieldPath"] == "status.podIP", ref
                value = HOST
        env[e["name"]] = value
    return env


def helm_env() -> dict[str, str]:
    values = yaml.safe_load((ROOT / "infra" / "helm" / "values.yaml").read_text())
    return {e["name"]: str(e["value"]) for e in values["env"]}


def mapping(s3, mlflow_server, port: int, home: Path) -> dict[str, list[tuple[str, str]]]:
    """Shipped address -> the stack's: ``urls`` replaced wherever they occur, ``paths`` only
    as a whole value or its leading folder."""
    me = f"http://{HOST}:{port}"
    return {
        "urls": [
            ("http://minio.retrain.svc.cluster.local:9000", s3.endpoint),
            ("http://minio:9000", s3.endpoint),
            ("http://mlflow.retrain.svc.cluster.local:5000", mlflow_server.url),
            ("http://mlflow:5000", mlflow_server.url),
            ("retrain-scoring-replicas.retrain.svc.cluster.local:8000", f"{HOST}:{port}"),
            ("http://retrain-scoring.retrain.svc.cluster.local", me),
            ("http://scoring:8000", me),
            (f"http://{HOST}:8000", me),  # the pod's own address, $(POD_IP):8000
            ("s3://retrain-pipeline/", "s3://pipeline/"),
        ],
        "paths": [("/tmp/pipeline", str(home)), ("/app", str(ROOT))],
    }


def mapped(env: dict[str, str], pairs: dict[str, list[tuple[str, str]]]) -> dict[str, str]:
    out = {}
    for k, v in env.items():
        for shipped, here in pairs["urls"]:
            v = v.replace(shipped, here)
        for shipped, here in pairs["paths"]:
            if v == shipped or v.startswith(shipped + "/"):
                v = here + v[len(shipped) :]
        out[k] = v
    for k, v in out.items():  # every address now points at the stack
        for url in re.findall(r"https?://[^\s,]+", v):
            assert url.startswith(f"http://{HOST}:"), f"{k}={v}: {url} is not mapped"
    return out


def run_mlflow_init(pairs: dict[str, list[tuple[str, str]]], dotenv: dict[str, str]) -> str:
    """compose's one-shot ``mlflow-init``: its entrypoint, its file mount, its environment."""
    svc = compose()["services"]["mlflow-init"]
    mounts = dict(reversed(v.split(":")[:2]) for v in svc["volumes"])
    argv = [mounts.get(a, a) for a in svc["entrypoint"]]
    assert argv[0] == "python"
    script = ROOT / argv[1].removeprefix("./")
    env = {"PATH": os.environ["PATH"], **mapped(compose_env("mlflow-init", dotenv), pairs)}
    proc = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc.stdout


def moto(s3, action: str) -> str:
    status, body = http(
        "POST" if action != "download" else "GET",
        f"{s3.endpoint}/moto-api/recorder/{action}-recording",
    )
    assert status == 200, (action, status, body)
    return body if isinstance(body, str) else json.dumps(body)


def scoring_requests(s3) -> list[dict[str, Any]]:
    text = moto(s3, "download")
    calls = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [
        c
        for c in calls
        if f"Credential={SCORING_S3_KEY}/" in str(c["headers"].get("Authorization", ""))
    ]


@pytest.mark.parametrize("shipped", ["compose", "k8s"])
def test_the_scoring_service_runs_with_exactly_its_shipped_environment(
    shipped, first_run, dotenv, airflow, s3, mlflow_server, workdir, monkeypatch
):
    from pipeline.canary import rollout
    from pipeline.canary.analysis import CanaryPlan
    from pipeline.contract import default_contract
    from pipeline.data.generate import WorldSpec, generate
    from pipeline.serving.replicas import ReplicaSet
    from pipeline.settings import get_settings

    port = free_port()
    home = workdir / f"scoring-home-{shipped}"
    pairs = mapping(s3, mlflow_server, port, home)
    # its MLflow user, made the way compose makes it (twice: the init step is idempotent)
    assert "created" in run_mlflow_init(pairs, dotenv) or shipped == "k8s"
    assert "password set" in run_mlflow_init(pairs, dotenv)
    shipped_env = compose_env("scoring", dotenv) if shipped == "compose" else k8s_env(dotenv)
    env = {"PATH": os.environ["PATH"], **mapped({**image_env(), **shipped_env}, pairs)}
    # nothing of the pipeline's own credentials is in it
    for name, value in {
        "the pipeline's S3 secret": s3.env["AWS_SECRET_ACCESS_KEY"],
        "the MLflow admin's password": mlflow_server.admin[1],
        "the signing private key": airflow.env["PIPELINE_SIGNING_KEY"].splitlines()[1],
    }.items():
        assert not any(value in v for v in env.values()), f"{name} reached the scoring service"
    assert env["MLFLOW_TRACKING_USERNAME"] != mlflow_server.admin[0]
    assert env["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false"

    moto(s3, "reset")
    moto(s3, "start")
    log = workdir / f"scoring-{shipped}.log"
    proc = spawn(
        [sys.executable, "-m", "pipeline", "serve", "--host", HOST, "--port", str(port)], env, log
    )
    url = f"http://{HOST}:{port}"
    try:
        wait_for(
            lambda: http("GET", f"{url}/readyz", timeout=3)[0] == 200,
            f"the scoring service ({shipped} config)",
            180,
            proc,
            log,
        )
        _, out = mlflow_server.api("GET", f"registered-models/alias?name={MODEL}&alias=champion")
        champion = out["model_version"]["version"]
        _, ready = http("GET", f"{url}/readyz")
        assert ready["champion"]["version"] == champion, ready

        # it scores, with pickle disabled in its environment
        features = [c.name for c in default_contract().features]
        rows = json.loads(generate(WorldSpec(rows=5, seed=77))[features].to_json(orient="records"))
        status, body = http("POST", f"{url}/predict", {"rows": rows})
        assert status == 200, body
        assert (body["alias"], body["version"]) == ("champion", champion)
        assert len(body["scores"]) == 5 and all(0.0 <= x <= 1.0 for x in body["scores"])
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
        assert b"MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false" in environ
        assert {e.split(b"=", 1)[0].decode() for e in environ if e} == set(env)

        # a label feed with the shipped token is taken (on Kubernetes the id names this pod)
        feedback = {"Authorization": f"Bearer {env['PIPELINE_SERVING_FEEDBACK_TOKEN']}"}
        rid = body["request_id"]
        if shipped == "k8s":
            from pipeline.serving.access import RequestIds

            key = env["PIPELINE_SERVING_REQUEST_ID_KEY"]
            assert RequestIds(key).verify(rid).owner == url
        status, out = http(
            "POST", f"{url}/feedback", {"request_id": rid, "labels": [0] * 5}, headers=feedback
        )
        assert status == 200 and out["matched"] == 5, out

        # one canary step's measurement, configured as the shipped workers are
        workers = (
            {
                k: interpolate(str(v), dotenv)
                for k, v in compose()["services"]["airflow-worker"]["environment"].items()
                if k.startswith("PIPELINE_SERVING")
            }
            if shipped == "compose"
            else {k: v for k, v in helm_env().items() if k.startswith("PIPELINE_SERVING")}
        )
        assert "PIPELINE_SERVING_URL" in workers
        for k, v in mapped(workers, pairs).items():
            monkeypatch.setenv(k, v)
        get_settings.cache_clear()
        replicas = ReplicaSet.for_analysis()  # what run_canary_rollout reads
        assert replicas.targets() == [url]
        plan = CanaryPlan(analysis_interval_s=1.0)
        ro = rollout._Rollout(champion, champion, plan, url, "stack", "test", replicas=replicas)
        try:
            ro.phase_start = ro._wait_for(
                "serve the champion", lambda s: s.serving.get("champion") == champion
            )
            for _ in range(12):
                assert http("POST", f"{url}/predict", rows[0])[0] == 200
            snap = ro._scrape()
            assert snap is not None
            decision, inputs = ro._decide(snap, ro.phase_start)
        finally:
            ro.http.close()
        assert inputs["canary"].requests == 12 and inputs["canary"].errors == 0
        assert decision.verdict.value in ("pass", "inconclusive"), decision
    finally:
        get_settings.cache_clear()
        stop(proc)
        moto(s3, "stop")

    # storage: every call made with its key is a read, of the checkpoints only
    calls = scoring_requests(s3)
    assert calls, "the service made no S3 call with its key (did it read the checkpoint?)"
    for c in calls:
        assert c["method"] in ("GET", "HEAD"), c["method"] + " " + c["url"]
        parts = urlsplit(c["url"])
        listed = parse_qs(parts.query).get("prefix", [""])[0]
        assert parts.path.startswith("/pipeline/data/checkpoints/") or (
            parts.path in ("/pipeline", "/pipeline/") and listed.startswith("data/checkpoints/")
        ), c["url"]
    # the registry: its user reads, and is refused a write
    user = (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"])
    assert mlflow_server.api("GET", f"registered-models/get?name={MODEL}", auth=user)[0] == 200
    status, out = mlflow_server.api(
        "POST",
        "registered-models/set-tag",
        {"name": MODEL, "key": "scoring.wrote", "value": "1"},
        auth=user,
    )
    assert status == 403, (status, out)
    status, out = mlflow_server.api(
        "POST",
        "registered-models/alias",
        {"name": MODEL, "alias": "champion", "version": "1"},
        auth=user,
    )
    assert status == 403, (status, out)
