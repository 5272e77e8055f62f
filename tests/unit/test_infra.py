"""Static checks of infra/: Dockerfiles, Kubernetes manifests, Helm values (no Docker/kubectl).

Images are pinned (no `latest`, no untagged base), nothing runs as root, manifests parse and
reference images that are built from a Dockerfile here, GPU resources are where training runs,
serving never unpickles (MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false everywhere it runs), and no
image carries the dev tooling (requirements-dev.txt: pytest, moto, ruff, mypy, pre-commit).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
DOCKERFILES = sorted(INFRA.glob("*/Dockerfile"))
MANIFESTS = sorted(INFRA.glob("k8s/*.yaml"))
# image repository in manifests -> Dockerfile that builds it
BUILT = {"retrain-airflow": "airflow", "retrain-trainer": "trainer", "retrain-serving": "serving"}


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _pod_specs(doc: dict) -> list[dict]:
    if doc["kind"] == "Pod":
        return [doc["spec"]]
    if doc["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
        return [doc["spec"]["template"]["spec"]]
    return []


def test_there_are_the_three_images():
    assert {p.parent.name for p in DOCKERFILES} == set(BUILT.values())


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_base_images_are_pinned(dockerfile):
    froms = [args.split()[0] for word, args in _instructions(dockerfile) if word == "FROM"]
    assert froms, "no FROM"
    for image in froms:
        name, _, tag = image.partition("@")[0].rpartition(":")
        assert name and tag, f"{image}: untagged base image"
        assert tag != "latest" and "latest" not in tag, f"{image}: pin a version, not latest"
        assert re.search(r"\d", tag), f"{image}: tag {tag!r} names no version"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_images_do_not_run_as_root(dockerfile):
    users = [args for word, args in _instructions(dockerfile) if word == "USER"]
    assert users, "no USER: the image would run as whatever the base leaves (often root)"
    final = users[-1].split(":")[0]
    assert final not in ("root", "0"), f"final USER is {users[-1]}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_pip_installs_use_the_lock(dockerfile):
    for word, args in _instructions(dockerfile):
        if word == "RUN" and "pip install" in args and "-r " in args:
            assert "-c " in args and "constraints.txt" in args, args


# --- production images carry no dev tooling ---------------------------------------------------

# Test and tooling packages: pinned in requirements-dev.txt only, never installed in an image.
DEV_TOOLS = frozenset({"pytest", "pytest-timeout", "ruff", "mypy", "moto", "pre-commit"})
# pip install options that take a value (the value is not a requirement)
_PIP_VALUE_OPTIONS = frozenset(
    "-r --requirement -c --constraint -e --editable -i --index-url --extra-index-url -f"
    " --find-links -t --target --prefix --root --trusted-host --platform --python-version"
    " --implementation --abi --src --upgrade-strategy --cache-dir --log --timeout --retries"
    " --progress-bar --config-settings -C --global-option --report".split()
)


def _pip_installs(shell: str) -> list[tuple[list[str], list[str]]]:
    """Each `pip install` in a shell command: (requirement files, package names)."""
    out = []
    for command in re.split(r"&&|\|\||;|\|", shell):
        words = shlex.split(command, comments=True)
        at = next(
            (
                i
                for i in range(len(words) - 1)
                if words[i].endswith(("pip", "pip3")) and words[i + 1] == "install"
            ),
            None,
        )
        if at is None:
            continue
        files, names, args = [], [], iter(words[at + 2 :])
        for word in args:
            option, eq, value = word.partition("=")
            if option in _PIP_VALUE_OPTIONS:
                value = value if eq else next(args, "")
                if option in ("-r", "--requirement"):
                    files.append(value)
            elif not word.startswith("-") and not word.startswith((".", "/")):
                names.append(canonicalize_name(Requirement(word).name))
        out.append((files, names))
    return out


def _requirement_names(path: Path) -> set[str]:
    """Package names a requirements file installs, following its `-r` includes."""
    names: set[str] = set()
    for line in path.read_text().splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(("-r ", "--requirement ")):
            names |= _requirement_names(path.parent / line.split(None, 1)[1])
        elif not line.startswith("-"):
            names.add(canonicalize_name(Requirement(line).name))
    return names


@pytest.mark.parametrize(
    "shell, bad",
    [
        ("pip install -r requirements.txt -c constraints.txt", False),
        ('pip install --no-deps --index-url https://x/whl/cpu "torch==2.13.0"', False),
        ('pip install -r /opt/req/requirements.txt "mlflow[auth]==3.17.2"', False),
        ("pip install -r requirements-dev.txt -c constraints.txt", True),
        ("apt-get update && python -m pip install --no-cache-dir pytest==9.2.0", True),
        ("pip3 install -c constraints.txt 'moto[server]==5.2.5'", True),
        ("pip install --requirement=requirements-dev.txt", True),
        ("pip install ruff mypy pre_commit", True),
    ],
)
def test_the_dev_tooling_check_catches_what_it_should(shell, bad):
    installs = _pip_installs(shell)
    assert installs
    found = any(
        any(Path(f).name != "requirements.txt" for f in files) or DEV_TOOLS & set(names)
        for files, names in installs
    )
    assert found is bad


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_images_install_no_dev_tooling(dockerfile):
    instructions = _instructions(dockerfile)
    assert not [a for w, a in instructions if "requirements-dev" in a], (
        "requirements-dev.txt (test and tooling pins) must not reach an image"
    )
    runs = [args for word, args in instructions if word == "RUN"]
    installs = [i for args in runs for i in _pip_installs(args)]
    assert installs, "no pip install found: the parser no longer reads this Dockerfile"
    for files, names in installs:
        for f in files:
            assert Path(f).name == "requirements.txt", f"installs {f}: production pins only"
        assert not DEV_TOOLS & set(names), f"installs dev tooling {sorted(DEV_TOOLS & set(names))}"


def test_compose_installs_no_dev_tooling():
    text = (ROOT / "docker-compose.yaml").read_text()
    assert "requirements-dev" not in text
    for files, names in _pip_installs(text) if "pip install" in text else []:
        assert all(Path(f).name == "requirements.txt" for f in files), files
        assert not DEV_TOOLS & set(names), names


def test_requirements_split_production_from_dev():
    prod = _requirement_names(ROOT / "requirements.txt")
    assert {"apache-airflow", "mlflow", "torch"} <= prod
    assert not DEV_TOOLS & prod, f"dev tooling in requirements.txt: {sorted(DEV_TOOLS & prod)}"
    dev_file = ROOT / "requirements-dev.txt"
    assert "-r requirements.txt" in dev_file.read_text().splitlines()
    assert DEV_TOOLS <= _requirement_names(dev_file)
    # every direct pin, production and dev, is in the lock at the same version
    lock = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            lock[canonicalize_name(name)] = version
    for path in (ROOT / "requirements.txt", dev_file):
        for line in path.read_text().splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith(("#", "-")):
                req = Requirement(line)
                pinned = str(req.specifier).removeprefix("==")
                assert lock.get(canonicalize_name(req.name)) == pinned, f"{path.name}: {line}"


def test_serving_image_refuses_pickle():
    env = " ".join(
        args for word, args in _instructions(INFRA / "serving" / "Dockerfile") if word == "ENV"
    )
    assert "MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false" in env


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_manifests_parse_and_pods_are_hardened(manifest):
    docs = _docs(manifest)
    assert docs and all({"apiVersion", "kind", "metadata"} <= set(d) for d in docs)
    specs = [s for d in docs for s in _pod_specs(d)]
    assert specs, f"{manifest.name} has no pod spec"
    for spec in specs:
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"].get("runAsUser", 1) != 0
        assert spec.get("automountServiceAccountToken") is False
        for c in spec["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert "ALL" in c["securityContext"]["capabilities"]["drop"]
            assert c["resources"]["limits"].get("memory"), c["name"]


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_manifest_images_are_pinned_and_built_here(manifest):
    for doc in _docs(manifest):
        for spec in _pod_specs(doc):
            for c in spec["containers"]:
                repo, _, tag = c["image"].rpartition(":")
                assert tag and tag != "latest" and re.search(r"\d", tag), c["image"]
                name = repo.rsplit("/", 1)[-1]
                assert name in BUILT, f"{c['image']} is not built by a Dockerfile in infra/"
                assert (INFRA / BUILT[name] / "Dockerfile").is_file()


def test_training_pod_gets_a_gpu_and_tolerates_the_taint():
    pod = _docs(INFRA / "k8s" / "training-pod-template.yaml")[0]
    base = pod["spec"]["containers"][0]
    assert base["name"] == "base"
    assert base["image"].rpartition(":")[0].endswith("retrain-trainer")
    assert base["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert base["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["spec"][
        "tolerations"
    ]
    env = {e["name"]: e.get("value") for e in base["env"]}
    assert env["PIPELINE_DEVICE"] == "cuda"
    assert not any(re.search(r"PASSWORD|SECRET|_KEY$", n) for n in env), (
        "secrets come from the Secret"
    )


def test_serving_deployment_refuses_pickle_and_has_no_gpu():
    deploy = next(d for d in _docs(INFRA / "k8s" / "serving.yaml") if d["kind"] == "Deployment")
    c = deploy["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false"
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    assert c["securityContext"]["readOnlyRootFilesystem"] is True


def test_compose_serving_refuses_pickle():
    compose = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
    assert (
        compose["services"]["scoring"]["environment"]["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"]
        == "false"
    )


def test_helm_values_reference_the_built_image_and_settings():
    values = yaml.safe_load((INFRA / "helm" / "values.yaml").read_text())
    assert values["defaultAirflowRepository"].rsplit("/", 1)[-1] == "retrain-airflow"
    tag = str(values["defaultAirflowTag"])
    assert tag != "latest" and re.search(r"\d", tag)
    env = {e["name"]: e["value"] for e in values["env"]}
    assert env["PIPELINE_EXECUTION_MODE"] in ("auto", "inprocess", "celery", "kubernetes")
    assert env["PIPELINE_K8S_POD_TEMPLATE_FILE"].endswith(".yaml")
    assert env["PIPELINE_STORAGE_URI"].startswith("s3://")
    assert int(values["config"]["core"]["parallelism"]) <= 32
    assert values["webserver"]["defaultUser"]["enabled"] is False
    assert "secretRef" in values["extraEnvFrom"]


def test_mlflow_artifact_uris_never_name_a_host():
    """The pipeline appends '/<experiment>' to PIPELINE_MLFLOW_ARTIFACT_URI; 'mlflow-artifacts:/'
    alone would become 'mlflow-artifacts://<experiment>', a host the MLflow server refuses."""
    from urllib.parse import urlparse

    compose = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
    pod = _docs(INFRA / "k8s" / "training-pod-template.yaml")[0]["spec"]["containers"][0]
    helm = yaml.safe_load((INFRA / "helm" / "values.yaml").read_text())
    found = [
        compose["x-airflow-common"]["environment"]["PIPELINE_MLFLOW_ARTIFACT_URI"],
        *(e["value"] for e in pod["env"] if e["name"] == "PIPELINE_MLFLOW_ARTIFACT_URI"),
        *(e["value"] for e in helm["env"] if e["name"] == "PIPELINE_MLFLOW_ARTIFACT_URI"),
    ]
    assert len(found) == 3
    for v in found:
        assert not urlparse(v.rstrip("/") + "/retrain_model").netloc, v


# --- the scoring Deployment: its own credentials, every replica read -----------------------


def _serving() -> tuple[dict, list[dict]]:
    docs = _docs(INFRA / "k8s" / "serving.yaml")
    return next(d for d in docs if d["kind"] == "Deployment"), [
        d for d in docs if d["kind"] == "Service"
    ]


def _helm_env() -> dict[str, str]:
    values = yaml.safe_load((INFRA / "helm" / "values.yaml").read_text())
    return {e["name"]: e["value"] for e in values["env"]}


# Variables the scoring container may get; each from where it must come.
SCORING_FROM_SECRET = {
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "PIPELINE_SERVING_FEEDBACK_TOKEN",
    "PIPELINE_SERVING_REQUEST_ID_KEY",
}


def test_serving_deployment_gets_no_write_credential_and_no_private_key():
    deploy, _ = _serving()
    c = deploy["spec"]["template"]["spec"]["containers"][0]
    # every variable is named: a whole Secret (envFrom) could carry a write key or the
    # signing private key without anyone seeing it here
    assert "envFrom" not in c
    env = {e["name"]: e for e in c["env"]}
    for name in ("PIPELINE_SIGNING_KEY", "PIPELINE_SIGNING_LEGACY_HMAC_KEY"):
        assert name not in env, f"the scoring service must not hold {name}"
    assert "configMapKeyRef" in env["PIPELINE_SIGNING_PUBLIC_KEYS"]["valueFrom"]
    secret_refs = {
        n: e["valueFrom"]["secretKeyRef"]
        for n, e in env.items()
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert set(secret_refs) == SCORING_FROM_SECRET
    assert {r["name"] for r in secret_refs.values()} == {"retrain-scoring-env"}
    assert all(r["key"] == n for n, r in secret_refs.items())
    for name, e in env.items():  # no literal secret
        if re.search(r"PASSWORD|SECRET|TOKEN|_KEY$", name):
            assert "value" not in e, name
    # the checkpoints' storage and the registry: the same the pipeline writes
    helm = _helm_env()
    for name in (
        "PIPELINE_STORAGE_URI",
        "PIPELINE_S3_ENDPOINT_URL",
        "PIPELINE_MLFLOW_TRACKING_URI",
    ):
        assert env[name]["value"] == helm[name], name
    assert env["PIPELINE_SERVING_ADMIN_ENABLED"]["value"] == "false"


def test_several_replicas_are_each_read_and_feedback_reaches_the_one_that_scored():
    from pipeline.serving.access import AccessPolicy
    from pipeline.serving.replicas import ReplicaSet
    from pipeline.settings import Settings

    deploy, services = _serving()
    assert deploy["spec"]["replicas"] >= 2
    c = deploy["spec"]["template"]["spec"]["containers"][0]
    port = c["ports"][0]["containerPort"]
    names = [e["name"] for e in c["env"]]
    env = {e["name"]: e for e in c["env"]}
    # the analysis: a headless Service over the same pods, on the pods' own port
    headless = [s for s in services if s["spec"].get("clusterIP") == "None"]
    assert len(headless) == 1
    h = headless[0]
    assert h["spec"]["selector"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
    assert h["spec"]["ports"][0]["port"] == port and not h["spec"].get("publishNotReadyAddresses")
    helm = _helm_env()
    dns = f"{h['metadata']['name']}.retrain.svc.cluster.local:{port}"
    assert helm["PIPELINE_SERVING_REPLICAS_DNS"] == dns
    lb = next(s for s in services if s is not h)
    assert (
        helm["PIPELINE_SERVING_URL"] == f"http://{lb['metadata']['name']}.retrain.svc.cluster.local"
    )
    analysis = ReplicaSet.for_analysis(
        settings=Settings(serving_replicas_dns=helm["PIPELINE_SERVING_REPLICAS_DNS"])
    )
    assert analysis.dns == (dns.rsplit(":", 1)[0], port)
    # feedback: each pod names itself (Downward API), under a key no client holds
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert names.index("POD_IP") < names.index("PIPELINE_SERVING_ADVERTISE_URL")  # $(POD_IP)
    advertise = env["PIPELINE_SERVING_ADVERTISE_URL"]["value"]
    assert advertise == f"http://$(POD_IP):{port}"
    policy = AccessPolicy.from_settings(
        Settings(
            serving_feedback_token="f" * 40,
            serving_request_id_key="k" * 40,
            serving_advertise_url=advertise.replace("$(POD_IP)", "10.1.2.3"),
        )
    )
    assert policy.advertise_url == f"http://10.1.2.3:{port}"
