"""Static checks of docker-compose.yaml, .env.example and the infra/ manifests.

No Docker daemon is needed: the files are parsed with yaml.safe_load and checked for the
properties the stack relies on (health-gated start order, no public ports, no default
secrets, GPU routing).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yaml"
ENV_EXAMPLE = ROOT / ".env.example"
INFRA = ROOT / "infra"

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?msg}, ${VAR?msg}, ${VAR:+alt}; not $${...}
VAR_RE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}")
SECRET_NAME_RE = re.compile(r"(PASSWORD|SECRET|TOKEN|_KEY)$")
# Credentials that do not look like secrets by name but are.
EXTRA_SECRET_VARS = {"MINIO_ROOT_USER"}


def _is_secret(name: str) -> bool:
    return bool(SECRET_NAME_RE.search(name)) or name in EXTRA_SECRET_VARS


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


def _strings(node: Any):
    """Every string in the parsed document (keys and values), i.e. what Compose interpolates.

    Comments are gone after parsing, so a ${VAR} mentioned in a comment is not counted.
    """
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)


@pytest.fixture(scope="module")
def compose_vars(compose: dict[str, Any]) -> list[re.Match[str]]:
    return [m for text in _strings(compose) for m in VAR_RE.finditer(text)]


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    values: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=value: {line!r}"
        values[key.strip()] = value.strip()
    return values


def _one_shots(services: dict[str, dict[str, Any]]) -> set[str]:
    return {name for name, svc in services.items() if svc.get("restart") == "no"}


def _command(svc: dict[str, Any]) -> list[str]:
    cmd = svc.get("command", [])
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def _resolve(value: str, env: dict[str, str]) -> str:
    """Compose-style interpolation with the .env.example values."""

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if name in env and env[name] != "":
            return env[name]
        if op in (":-", "-"):
            return arg or ""
        raise AssertionError(f"{name} has no value")

    return VAR_RE.sub(sub, value).replace("$$", "$")


def _workers_by_queue(services: dict[str, dict[str, Any]]) -> dict[str, str]:
    found = {}
    for name, svc in services.items():
        cmd = _command(svc)
        if cmd[:2] == ["celery", "worker"] and "--queues" in cmd:
            found[cmd[cmd.index("--queues") + 1]] = name
    return found


# --- structure ----------------------------------------------------------------------------


def test_expected_services_present(services):
    expected = {
        "postgres",
        "redis",
        "minio",
        "minio-init",
        "mlflow",
        "mlflow-init",
        "airflow-init",
        "airflow-apiserver",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-triggerer",
        "airflow-worker",
        "airflow-worker-gpu",
        "scoring",
    }
    assert expected <= set(services)


def test_one_shots_are_the_init_jobs(services):
    assert _one_shots(services) == {"minio-init", "mlflow-init", "airflow-init"}


def test_every_long_running_service_has_a_healthcheck(services):
    for name, svc in services.items():
        if name in _one_shots(services):
            continue
        hc = svc.get("healthcheck")
        assert hc and hc.get("test") and not hc.get("disable"), f"{name} lacks a healthcheck"
        assert hc["test"][0] in ("CMD", "CMD-SHELL"), name


def test_every_depends_on_uses_the_right_condition(services):
    one_shots = _one_shots(services)
    for name, svc in services.items():
        deps = svc.get("depends_on")
        if deps is None:
            continue
        assert isinstance(deps, dict), f"{name}: depends_on must be a mapping with conditions"
        for dep, spec in deps.items():
            assert dep in services, f"{name} depends on unknown {dep}"
            assert isinstance(spec, dict) and "condition" in spec, f"{name} -> {dep}"
            expected = "service_completed_successfully" if dep in one_shots else "service_healthy"
            assert spec["condition"] == expected, f"{name} -> {dep}"


def test_nothing_depends_on_an_optional_profile_service(services):
    profiled = {name for name, svc in services.items() if svc.get("profiles")}
    for name, svc in services.items():
        assert not profiled & set(svc.get("depends_on") or {}), name


def test_airflow_services_wait_for_init_and_backing_services(services):
    for name in (
        "airflow-apiserver",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-triggerer",
        "airflow-worker",
        "airflow-worker-gpu",
    ):
        deps = services[name]["depends_on"]
        assert {"postgres", "redis", "airflow-init"} <= set(deps), name
    assert {"postgres", "minio-init"} <= set(services["mlflow"]["depends_on"])
    assert "mlflow" in services["scoring"]["depends_on"]


def test_ports_bound_to_localhost_only(services):
    published = 0
    for name, svc in services.items():
        for port in svc.get("ports", []):
            published += 1
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", f"{name}: {port}"
            else:
                assert str(port).startswith("127.0.0.1:"), f"{name}: {port}"
    assert published >= 5


def test_published_ports(services):
    def container_ports(name):
        return {str(p).rsplit(":", 1)[-1] for p in services[name].get("ports", [])}

    assert container_ports("airflow-apiserver") == {"8080"}
    assert container_ports("mlflow") == {"5000"}
    assert container_ports("scoring") == {"8000"}
    for internal in ("postgres", "redis", "airflow-worker", "airflow-scheduler"):
        assert not services[internal].get("ports"), internal


def test_referenced_files_exist(services):
    for name, svc in services.items():
        build = svc.get("build")
        if build:
            assert (ROOT / build["context"] / build["dockerfile"]).is_file(), name
        for volume in svc.get("volumes", []):
            source = str(volume).split(":", 1)[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: {volume}"


# --- variables and secrets ------------------------------------------------------------------


def test_every_compose_variable_is_documented_in_env_example(compose_vars, env_example):
    used = {m.group(1) for m in compose_vars}
    assert used, "no ${VAR} found: regex broken?"
    missing = sorted(used - set(env_example))
    assert not missing, f"add to .env.example: {missing}"


def test_secrets_are_required_never_defaulted(compose_vars):
    secrets = 0
    for m in compose_vars:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if not _is_secret(name):
            continue
        secrets += 1
        assert op == ":?", f"{name} must use ${{{name}:?...}}, found {m.group(0)}"
        assert arg == f"set {name} in .env", m.group(0)
    assert secrets >= 10


def test_no_literal_secret_values_in_service_environments(services):
    for name, svc in services.items():
        env = svc.get("environment") or {}
        assert isinstance(env, dict), f"{name}: use mapping-style environment"
        for key, value in env.items():
            if _is_secret(key):
                assert "${" in str(value), f"{name}.{key} holds a literal secret"


def test_env_example_secrets_are_placeholders(env_example):
    secret_vars = [k for k in env_example if _is_secret(k)]
    assert len(secret_vars) >= 10
    for key in secret_vars:
        assert "change-me" in env_example[key], f"{key} must be a change-me placeholder"


def test_airflow_connections_are_valid_json(services, env_example):
    env = services["airflow-scheduler"]["environment"]
    aws = json.loads(_resolve(env["AIRFLOW_CONN_AWS_DEFAULT"], env_example))
    assert aws["conn_type"] == "aws"
    assert aws["extra"]["endpoint_url"] == "http://minio:9000"
    assert aws["login"] == env_example["MINIO_ROOT_USER"]
    mlflow = json.loads(_resolve(env["AIRFLOW_CONN_MLFLOW_DEFAULT"], env_example))
    assert (mlflow["host"], mlflow["port"]) == ("mlflow", 5000)
    assert env["PIPELINE_MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    # artifacts must go through the MLflow server (shared S3), not a worker's local disk
    assert env["PIPELINE_MLFLOW_ARTIFACT_URI"].startswith("mlflow-artifacts:")
    # the pipeline appends "/<experiment>": the result must not name a host (the server refuses
    # host-addressed mlflow-artifacts URIs), i.e. "mlflow-artifacts:/path", not ":/" alone
    from urllib.parse import urlparse

    assert not urlparse(env["PIPELINE_MLFLOW_ARTIFACT_URI"].rstrip("/") + "/retrain_model").netloc
    assert _resolve(env["PIPELINE_STORAGE_URI"], env_example).startswith("s3://")
    assert env["PIPELINE_S3_ENDPOINT_URL"] == "http://minio:9000"


# --- Airflow ----------------------------------------------------------------------------------


def test_airflow_common_anchor_shared(compose, services):
    common = compose["x-airflow-common"]
    assert common["build"]["dockerfile"] == "infra/airflow/Dockerfile"
    for name in (
        "airflow-init",
        "airflow-apiserver",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-triggerer",
        "airflow-worker",
        "airflow-worker-gpu",
    ):
        env = services[name]["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        assert services[name]["image"] == common["image"], name


def test_parallelism_and_concurrency_are_bounded(compose, env_example):
    env = compose["x-airflow-common"]["environment"]
    parallelism = int(_resolve(str(env["AIRFLOW__CORE__PARALLELISM"]), env_example))
    concurrency = int(_resolve(str(env["AIRFLOW__CELERY__WORKER_CONCURRENCY"]), env_example))
    assert 1 <= concurrency <= parallelism <= 32


def test_airflow_components_run_their_commands(services):
    assert _command(services["airflow-apiserver"]) == ["api-server"]
    assert _command(services["airflow-scheduler"]) == ["scheduler"]
    assert _command(services["airflow-dag-processor"]) == ["dag-processor"]
    assert _command(services["airflow-triggerer"]) == ["triggerer"]
    init_env = services["airflow-init"]["environment"]
    assert init_env["_AIRFLOW_DB_MIGRATE"] == "true"


def test_cpu_and_gpu_workers_listen_on_their_queues(services):
    queues = _workers_by_queue(services)
    assert queues == {"default": "airflow-worker", "gpu": "airflow-worker-gpu"}
    assert "deploy" not in services["airflow-worker"]


def test_gpu_worker_reserves_one_nvidia_gpu(services):
    gpu = services["airflow-worker-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    device = devices[0]
    assert device["driver"] == "nvidia"
    assert device["count"] == 1
    assert "gpu" in device["capabilities"]
    cmd = _command(gpu)
    assert cmd[cmd.index("--concurrency") + 1] == "1"
    assert gpu["environment"]["PIPELINE_DEVICE"] == "cuda"


# --- MLflow -----------------------------------------------------------------------------------


def _flags(cmd: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for i, tok in enumerate(cmd):
        if tok.startswith("--"):
            nxt = cmd[i + 1] if i + 1 < len(cmd) else None
            out[tok] = None if nxt is None or nxt.startswith("--") else nxt
    return out


def test_mlflow_server_configuration(services):
    svc = services["mlflow"]
    assert svc["entrypoint"] == ["mlflow"]
    cmd = _command(svc)
    assert cmd[0] == "server"
    flags = _flags(cmd)
    assert flags["--app-name"] == "basic-auth"
    assert flags["--artifacts-destination"].startswith("s3://")
    assert flags["--host"] == "0.0.0.0"
    env = svc["environment"]
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://mlflow:")
    assert env["MLFLOW_BACKEND_STORE_URI"].endswith("@postgres:5432/mlflow")
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"].startswith("${MLFLOW_ADMIN_PASSWORD:?")
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    target = svc["configs"][0]["target"]
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == target


def test_mlflow_flags_exist_in_installed_cli(services):
    """No invented flags: every --flag is an option of the installed `mlflow server`."""
    mlflow_cli = pytest.importorskip("mlflow.cli")
    known = {opt for param in mlflow_cli.server.params for opt in param.opts}
    used = set(_flags(_command(services["mlflow"])))
    assert used <= known, sorted(used - known)
    by_env = {p.envvar for p in mlflow_cli.server.params if p.envvar}
    assert "MLFLOW_BACKEND_STORE_URI" in by_env


def test_mlflow_basic_auth_config(compose):
    content = compose["configs"]["mlflow_basic_auth"]["content"]
    import configparser

    parser = configparser.ConfigParser()
    parser.read_string(content)
    section = parser["mlflow"]
    assert section["database_uri"].startswith("postgresql+psycopg2://mlflow:")
    assert "admin_password" not in section
    # the scoring service's own user is a plain user: it reads the registry through this
    assert section["default_permission"] == "READ"


# --- other services ---------------------------------------------------------------------------


def test_postgres_init_creates_both_databases(services):
    svc = services["postgres"]
    assert svc["image"].startswith("postgres:15")
    assert any("init.sql:/docker-entrypoint-initdb.d/" in str(v) for v in svc["volumes"])
    sql = (INFRA / "postgres" / "init.sql").read_text()
    for db in ("airflow", "mlflow"):
        assert re.search(rf"CREATE DATABASE {db} OWNER {db};", sql)
        assert re.search(rf"CREATE ROLE {db} LOGIN PASSWORD :'{db}_db_password';", sql)
    assert set(re.findall(r"\\getenv \w+ (\w+)", sql)) <= set(svc["environment"])


def test_minio_init_creates_buckets(services):
    svc = services["minio-init"]
    assert svc["image"].startswith("minio/mc")
    script = "\n".join(_command(svc)) if isinstance(svc["command"], str) else svc["command"][0]
    assert "mc mb --ignore-existing" in script
    assert "MLFLOW_BUCKET" in script and "PIPELINE_BUCKET" in script


def test_scoring_service(services):
    svc = services["scoring"]
    assert svc["build"]["dockerfile"] == "infra/serving/Dockerfile"
    assert "/healthz" in " ".join(svc["healthcheck"]["test"])


# --- infra manifests --------------------------------------------------------------------------


def test_dockerfiles(services):
    airflow = (INFRA / "airflow" / "Dockerfile").read_text()
    assert "FROM apache/airflow:3.3.2-python3.11" in airflow
    assert "-r /opt/airflow/requirements/requirements.txt" in airflow
    assert "-c /opt/airflow/requirements/constraints.txt" in airflow
    for directory in ("dags", "pipeline", "plugins", "models"):
        assert re.search(rf"^COPY .*\b{directory}/ ", airflow, re.M), directory
    trainer = (INFRA / "trainer" / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+-runtime-", trainer, re.M)
    assert 'ENTRYPOINT ["python", "-m", "pipeline"]' in trainer
    serving = (INFRA / "serving" / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", serving, re.M)
    # in a container the service must listen beyond loopback to be reachable at all
    assert 'CMD ["python", "-m", "pipeline", "serve", "--host", "0.0.0.0"]' in serving


def test_training_pod_template_requests_a_gpu():
    pod = yaml.safe_load((INFRA / "k8s" / "training-pod-template.yaml").read_text())
    assert pod["kind"] == "Pod"
    base = pod["spec"]["containers"][0]
    assert base["name"] == "base"  # required by KubernetesExecutor / KubernetesPodOperator
    assert base["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["spec"]["tolerations"])
    assert any("secretRef" in src for src in base["envFrom"])


def test_serving_manifest_probes():
    docs = list(yaml.safe_load_all((INFRA / "k8s" / "serving.yaml").read_text()))
    assert sorted(d["kind"] for d in docs) == ["Deployment", "Service", "Service"]
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["ports"][0]["containerPort"] == 8000
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    for service in (d for d in docs if d["kind"] == "Service"):
        assert service["spec"]["selector"].items() <= labels.items(), service["metadata"]["name"]


def test_helm_values():
    text = (INFRA / "helm" / "values.yaml").read_text()
    values = yaml.safe_load(text)
    assert values["executor"] == "CeleryExecutor"
    assert values["airflowVersion"] == "3.3.2"
    assert "KubernetesExecutor" in text and "pod_template_file" in text
    # secrets are referenced by name, never inlined
    for key in ("fernetKey", "apiSecretKey", "jwtSecret", "webserverSecretKey"):
        assert key not in values
    assert values["data"]["metadataSecretName"]


# --- the scoring service's trust boundary -----------------------------------------------------

# What may never reach the scoring service: write-capable storage keys, the MLflow admin, the
# signing private key (or the legacy HMAC secret), Airflow's secrets.
FORBIDDEN_FOR_SCORING = {
    "MINIO_ROOT_USER",
    "MINIO_ROOT_PASSWORD",
    "MLFLOW_ADMIN_PASSWORD",
    "PIPELINE_SIGNING_KEY",
    "PIPELINE_SIGNING_LEGACY_HMAC_KEY",
    "AIRFLOW_FERNET_KEY",
    "AIRFLOW_API_SECRET_KEY",
    "AIRFLOW_JWT_SECRET",
    "POSTGRES_PASSWORD",
    "MLFLOW_DB_PASSWORD",
    "AIRFLOW_DB_PASSWORD",
    "REDIS_PASSWORD",
}
# The only secrets it holds: its own.
SCORING_SECRETS = {
    "SCORING_S3_ACCESS_KEY",
    "SCORING_S3_SECRET_KEY",
    "MLFLOW_SCORING_PASSWORD",
    "PIPELINE_SERVING_FEEDBACK_TOKEN",
}


def _vars_in(node: Any) -> set[str]:
    return {m.group(1) for text in _strings(node) for m in VAR_RE.finditer(text)}


def _script(svc: dict[str, Any]) -> str:
    return svc["command"] if isinstance(svc["command"], str) else "\n".join(svc["command"])


def test_scoring_gets_no_write_credential_no_private_key_no_admin_password(services):
    svc = services["scoring"]
    env = svc["environment"]
    used = _vars_in(svc)
    assert not used & FORBIDDEN_FOR_SCORING, sorted(used & FORBIDDEN_FOR_SCORING)
    assert {v for v in used if _is_secret(v)} <= SCORING_SECRETS
    for name in ("PIPELINE_SIGNING_KEY", "PIPELINE_SIGNING_LEGACY_HMAC_KEY"):
        assert name not in env, f"scoring must not hold {name}: it verifies with public keys"
    assert "PIPELINE_SIGNING_PUBLIC_KEYS" in env
    assert not any(k.startswith(("AIRFLOW", "_AIRFLOW")) for k in env)
    # not built from the Airflow anchor (which carries the pipeline's admin credentials)
    assert svc["image"] != services["airflow-worker"]["image"]


def test_scoring_reads_the_checkpoints_where_the_workers_write_them(services, env_example):
    scoring, worker = services["scoring"]["environment"], services["airflow-worker"]["environment"]
    for name in (
        "PIPELINE_STORAGE_URI",
        "PIPELINE_S3_ENDPOINT_URL",
        "PIPELINE_MLFLOW_TRACKING_URI",
    ):
        assert name in scoring, f"scoring lacks {name}"
        assert _resolve(str(scoring[name]), env_example) == _resolve(
            str(worker[name]), env_example
        ), name
    assert _resolve(scoring["PIPELINE_STORAGE_URI"], env_example).startswith("s3://")
    assert scoring["AWS_ACCESS_KEY_ID"].startswith("${SCORING_S3_ACCESS_KEY:?")
    assert scoring["AWS_SECRET_ACCESS_KEY"].startswith("${SCORING_S3_SECRET_KEY:?")
    user = _resolve(scoring["MLFLOW_TRACKING_USERNAME"], env_example)
    admin = _resolve(worker["MLFLOW_TRACKING_USERNAME"], env_example)
    assert user != admin, "scoring must have its own MLflow user, not the admin"
    assert scoring["MLFLOW_TRACKING_PASSWORD"].startswith("${MLFLOW_SCORING_PASSWORD:?")


def _scoring_policy(services, env_example) -> dict[str, Any]:
    script = _script(services["minio-init"])
    body = script.split("<<EOF", 1)[1].split("\nEOF", 1)[0]
    bucket = _resolve(services["minio-init"]["environment"]["PIPELINE_BUCKET"], env_example)
    return json.loads(body.replace("$${PIPELINE_BUCKET}", bucket))


def test_minio_init_makes_the_read_only_scoring_user(services, env_example):
    svc = services["minio-init"]
    script = _script(svc)
    env = svc["environment"]
    assert env["SCORING_S3_ACCESS_KEY"] == services["scoring"]["environment"]["AWS_ACCESS_KEY_ID"]
    assert (
        env["SCORING_S3_SECRET_KEY"] == services["scoring"]["environment"]["AWS_SECRET_ACCESS_KEY"]
    )
    assert 'mc admin user add local "$${SCORING_S3_ACCESS_KEY}" "$${SCORING_S3_SECRET_KEY}"' in (
        script
    )
    assert "mc admin policy create local scoring-read /tmp/scoring-read.json" in script
    assert 'mc admin policy attach local scoring-read --user "$${SCORING_S3_ACCESS_KEY}"' in script
    policy = _scoring_policy(services, env_example)
    storage = _resolve(services["scoring"]["environment"]["PIPELINE_STORAGE_URI"], env_example)
    bucket, _, prefix = storage.removeprefix("s3://").partition("/")
    checkpoints = f"{prefix}/checkpoints/"
    actions: set[str] = set()
    for st in policy["Statement"]:
        assert st["Effect"] == "Allow"
        actions |= set(st["Action"])
        for resource in st["Resource"]:
            assert resource in (
                f"arn:aws:s3:::{bucket}",
                f"arn:aws:s3:::{bucket}/{checkpoints}*",
            ), resource
        if "s3:ListBucket" in st["Action"]:
            assert st["Condition"] == {"StringLike": {"s3:prefix": [f"{checkpoints}*"]}}
    # reads only: no Put/Delete/multipart/ACL action, no wildcard
    assert actions == {"s3:GetObject", "s3:ListBucket", "s3:GetBucketLocation"}


def test_mlflow_init_makes_the_scoring_users_login(services, env_example):
    svc, scoring = services["mlflow-init"], services["scoring"]["environment"]
    env = svc["environment"]
    assert svc["entrypoint"] == ["python", "/opt/retrain/ensure_user.py"]
    assert "./infra/mlflow/ensure_user.py:/opt/retrain/ensure_user.py:ro" in svc["volumes"]
    assert env["MLFLOW_URL"] == scoring["PIPELINE_MLFLOW_TRACKING_URI"]
    assert env["MLFLOW_NEW_USERNAME"] == scoring["MLFLOW_TRACKING_USERNAME"]
    assert env["MLFLOW_NEW_PASSWORD"] == scoring["MLFLOW_TRACKING_PASSWORD"]
    assert _resolve(env["MLFLOW_NEW_USERNAME"], env_example) != _resolve(
        env["MLFLOW_ADMIN_USERNAME"], env_example
    )
    assert svc["depends_on"] == {"mlflow": {"condition": "service_healthy"}}
    deps = services["scoring"]["depends_on"]
    for init in ("mlflow-init", "minio-init"):
        assert deps[init] == {"condition": "service_completed_successfully"}, init


def test_every_worker_has_the_scoring_services_url(services):
    port = next(str(p).rsplit(":", 1)[-1] for p in services["scoring"]["ports"])
    workers = _workers_by_queue(services).values()
    assert workers
    for name in workers:
        url = services[name]["environment"].get("PIPELINE_SERVING_URL")
        assert url == f"http://scoring:{port}", f"{name}: PIPELINE_SERVING_URL={url!r}"
