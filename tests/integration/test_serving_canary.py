"""The scoring service and canary rollouts, for real: uvicorn over HTTP on 127.0.0.1 (a
subprocess, ``python -m pipeline serve``), the embedded MLflow SQLite registry, signed
checkpoints trained here in seconds, traffic from the replayer, faults from the service's
own fault switch (``/admin``, enabled here with a bearer token; labels go to ``/feedback``
with the feedback token). Short intervals (0.5 s analysis, 0.2 s registry poll) keep it
quick. Versions are registered with what the gate records on an accepted one (checkpoint
URI, manifest digest, ``gate.verdict=promote``): the service serves nothing else.

The service serves every model spec under models/ (card_fraud, digits, ...); these tests
drive card_fraud (the default model: ``/predict``, ``/feedback``, the canary's series
``model="card_fraud"``); the others have no registered versions here and stay not ready
without disturbing it.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from pipeline.data.generate import WorldSpec, generate

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
INTERVAL = 0.5
# Sized for a busy 2-core machine (the replayer may get only ~40 requests/s through):
# a step's window must hold min_requests canary requests even then.
THRESHOLDS = {
    "min_requests": 15,
    "min_requests_fail_fast": 6,
    "min_scores": 300,
    "min_labels_per_class": 15,
    "max_metric_drop": 0.05,
}
ROWS_PER_REQUEST = 16
ADMIN_TOKEN, FEEDBACK_TOKEN = secrets.token_hex(32), secrets.token_hex(32)
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


LAUNCH = """
import os, sys, time
import mlflow, pipeline.checkpoint, pipeline.serving.app  # the slow imports, done early
deadline = time.monotonic() + 300
while not os.path.exists(sys.argv[1]) and time.monotonic() < deadline:
    time.sleep(0.05)
from pipeline.cli import main
raise SystemExit(main(sys.argv[2:]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Env:
    """One embedded home, registry, service and traffic set for the module."""

    def __init__(self, home: Path, url: str, uris: dict[str, str], traffic, proc) -> None:
        self.home, self.url, self.uris, self.traffic, self.proc = home, url, uris, traffic, proc
        self.http = httpx.Client(base_url=url, timeout=10)
        self._n = 0

    def register(self, kind: str) -> str:
        from pipeline import checkpoint, registry, storage

        self._n += 1
        key = f"test-{kind}-{self._n}"
        run_id = registry.get_or_create_run(key)
        uri = self.uris[kind]
        manifest = storage.read_bytes(storage.join(uri, checkpoint.MANIFEST), verify=False)
        return registry.register_version(
            run_id,
            key,
            uri,
            {  # what register_challenger and an accepting gate_promotion record
                "checkpoint.uri": uri,
                "checkpoint.manifest_sha256": hashlib.sha256(manifest).hexdigest(),
                "gate.verdict": "promote",
            },
            description=f"{kind} model for the canary tests",
        )

    def wait_serving(self, champion: str, canary: str | None = None, timeout: float = 15) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            d = self.http.get("/readyz").json()
            ok = (d["champion"] or {}).get("version") == champion and (d["canary"] or {}).get(
                "version"
            ) == canary
            if ok or time.monotonic() > deadline:
                assert ok, d
                return d
            time.sleep(0.05)

    def plan(self, steps, bake=0.0, **thresholds):
        from pipeline.canary import CanaryPlan, CanaryThresholds

        return CanaryPlan(
            steps=steps,
            analysis_interval_s=INTERVAL,
            bake_s=bake,
            load_timeout_s=15,
            thresholds=CanaryThresholds(**{**THRESHOLDS, **thresholds}),
        )


def _fit(model, spec, df, lr: float, steps: int):
    """Plain AdamW steps on ``df`` (batches of 256): the base model from scratch, and the
    others as warm-started retrains of it — real training, in well under a second each."""
    import copy

    from pipeline.train.features import labels, transform

    torch.manual_seed(7)
    model = copy.deepcopy(model).train()
    x, y = torch.from_numpy(transform(df, spec)), torch.from_numpy(labels(df, spec))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(7)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (256,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from pipeline import checkpoint, registry, settings, storage
    from pipeline.serving.replay import prepare
    from pipeline.spec import active
    from pipeline.train.features import fit_features
    from pipeline.train.model import MLP, ModelConfig

    home = tmp_path_factory.mktemp("serving") / "home"
    threads = torch.get_num_threads()
    mp = pytest.MonkeyPatch()
    mp.setenv("PIPELINE_HOME", str(home))
    for var in (
        "PIPELINE_STORAGE_URI",
        "PIPELINE_MLFLOW_TRACKING_URI",
        "PIPELINE_SIGNING_KEY",
        "PIPELINE_EVAL_URI",
        "PIPELINE_S3_ENDPOINT_URL",
        "PIPELINE_SERVING_URL",
        "PIPELINE_MODEL",
        "PIPELINE_MODELS_ROOT",
    ):
        mp.delenv(var, raising=False)
    settings.get_settings.cache_clear()
    registry.client.cache_clear()
    contract = active().contract_obj()  # card_fraud, the default model
    root = settings.get_settings().storage_root
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc_env = {
        **os.environ,
        "PIPELINE_HOME": str(home),
        "PIPELINE_SERVING_POLL_SECONDS": "0.2",
        "PIPELINE_SERVING_ADMIN_ENABLED": "true",
        "PIPELINE_SERVING_ADMIN_TOKEN": ADMIN_TOKEN,
        "PIPELINE_SERVING_FEEDBACK_TOKEN": FEEDBACK_TOKEN,
    }
    home.mkdir(parents=True)
    log = (home / "serve.log").open("w")
    # The service process starts first and imports (seconds) while this one creates the
    # MLflow database and trains; it runs `python -m pipeline serve` (cli.main) once the
    # database exists, so the two never race to create it. Until a champion is registered
    # its polls find nothing and it is not ready.
    go = home / "go"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            LAUNCH,
            str(go),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=ROOT,
        env=proc_env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def make_checkpoints() -> dict[str, str]:
        # a base model trained from scratch; the others are warm-started retrains of it: on
        # fresh clean data (a good canary that behaves like the champion), and on poisoned
        # labels (worse ROC AUC, and its scores shift too)
        base_df = generate(WorldSpec(rows=3000, seed=11))
        spec = fit_features(base_df, contract)
        torch.manual_seed(1)
        fresh_mlp = MLP(ModelConfig(input_dim=spec.width, num_classes=len(spec.classes)))
        base = _fit(fresh_mlp, spec, base_df, 1e-2, 80)
        models = {
            "good": base,
            "good_b": _fit(base, spec, generate(WorldSpec(rows=3000, seed=12)), 5e-4, 20),
            "poisoned": _fit(
                base, spec, generate(WorldSpec(rows=3000, seed=13, label_poison=0.95)), 1e-2, 150
            ),
        }
        uris = {}
        for kind, model in models.items():
            local = home / "ckpt" / kind
            checkpoint.save_checkpoint(
                local,
                model,
                spec,
                base_df.head(64),
                data_snapshot={"uri": "test", "sha256": kind},
                training={"stop_reason": "max_steps"},
            )
            uris[kind] = storage.join(root, "checkpoints", kind)
            checkpoint.publish(local, uris[kind])
        # a tampered copy: the manifest edited after signing
        tampered = home / "ckpt" / "tampered"
        shutil.copytree(home / "ckpt" / "good_b", tampered)
        manifest = json.loads((tampered / "manifest.json").read_text())
        manifest["code_version"] = "edited-after-signing"
        (tampered / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        uris["tampered"] = storage.join(root, "checkpoints", "tampered")
        checkpoint.publish(tampered, uris["tampered"])
        return uris

    e = None
    pool = ThreadPoolExecutor(1)
    try:
        torch.set_num_threads(1)
        made = pool.submit(make_checkpoints)  # training overlaps the database creation
        registry.experiment_id()  # creates the MLflow database while the service imports
        go.touch()
        uris = made.result()
        traffic_df = generate(WorldSpec(rows=8000, seed=99, label_prior=4))
        e = Env(home, url, uris, prepare(traffic_df, ROWS_PER_REQUEST), proc)
        e.champion = e.register("good")
        registry.set_alias(registry.CHAMPION, e.champion)
        deadline = time.monotonic() + 90
        while True:
            try:
                if e.http.get("/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, (home / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "service did not become ready"
            time.sleep(0.2)
        yield e
    finally:
        pool.shutdown()
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        if e is not None:
            e.http.close()
        mp.undo()
        torch.set_num_threads(threads)
        settings.get_settings.cache_clear()
        registry.client.cache_clear()


@pytest.fixture
def fresh(env):
    """Champion = the first good version, no canary, weight 0, no faults."""
    from pipeline import registry
    from pipeline.serving import traffic

    traffic.set_canary_weight(0.0)
    registry.delete_alias(traffic.CANARY)
    registry.delete_alias(registry.PREVIOUS)
    registry.set_alias(registry.CHAMPION, env.champion)
    assert env.http.delete("/admin/faults", headers=ADMIN).status_code == 200
    env.wait_serving(env.champion, None)
    return env


class Traffic:
    """The replayer in a thread, for as long as the test needs (bounded anyway)."""

    def __init__(
        self, env: Env, rate: float = 50, labels_after: float | None = None, duration: float = 60
    ) -> None:
        from pipeline.serving.replay import ReplayConfig

        self.cfg = ReplayConfig(
            url=env.url,
            rate=rate,
            duration_s=duration,
            labels_after_s=labels_after,
            rows_per_request=ROWS_PER_REQUEST,
            feedback_token=FEEDBACK_TOKEN,
        )
        self.env, self.stop, self.report = env, threading.Event(), None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from pipeline.serving.replay import replay

        self.report = replay(self.cfg, self.env.traffic, self.stop)

    def __enter__(self) -> Traffic:
        self.thread.start()
        time.sleep(0.3)
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(30)


def _version(v: str):
    from pipeline import registry

    return registry.client().get_model_version(registry.model_name(), v)


def _record(mv) -> dict:
    from pipeline import registry

    path = registry.client().download_artifacts(mv.run_id, "records/canary_rollout.json")
    return json.loads(Path(path).read_text())


def _assert_rolled_back(env: Env, version: str, out: dict, reason: str) -> None:
    from pipeline import registry
    from pipeline.serving import traffic

    assert out["verdict"] == "rolled_back", out["summary"]
    assert out["reason"] == reason, out["summary"]
    state = traffic.read_state()
    assert state.champion == env.champion and state.canary is None and state.weight == 0.0
    assert registry.alias_version(registry.PREVIOUS) is None
    tags = _version(version).tags
    assert tags["rolled_back"] == "true" and tags["canary.status"] == "rolled_back"
    assert reason in tags["rollback_reason"]
    assert _record(_version(version))["verdict"] == "rolled_back"
    env.wait_serving(env.champion, None)


# -- the tests ---------------------------------------------------------------------------


def test_good_canary_is_promoted_and_baked(fresh):
    """Through ``stages.canary_rollout``: what the DAG's promote task runs with canary=true."""
    from pipeline import registry, stages
    from pipeline.serving import traffic

    env = fresh
    v = env.register("good_b")
    plan = env.plan(((0.25, 2.5), (0.5, 2.5), (1.0, 1.5)), bake=1.0)
    mv = _version(v)
    gated = stages.Gated(
        verdict="promote",
        promote=True,
        reason="non_inferior_to_champion",
        reasons=["non_inferior_to_champion"],
        message="non-inferior",
        metric="roc_auc",
        challenger=None,
        champion=None,
        champion_version=env.champion,
        model_name=registry.model_name(),
        model_version=v,
        eval_uri="",
        eval_sha256="",
        latency_p95_ms=0.0,
        record_uri="",
        model_url="",
        report_table="",
        report_markdown="",
        mlflow_run_id=mv.run_id,
    )  # what gate_promotion hands the DAG's promote task
    with Traffic(env, labels_after=0.2) as t:
        rec = stages.canary_rollout(
            stages.RunContext("retrain_model", "run-good", "2026-03-05T03:00:00+00:00"),
            gated,
            plan=plan,
            service_url=env.url,
        )
    assert rec.path == "canary" and rec.verdict == "promoted", rec.summary
    assert (
        registry.client().get_run(mv.run_id).data.tags["stage.promote_champion.verdict"]
        == "promoted"
    )
    out = _record(_version(v))
    assert [m["weight"] for m in out["measurements"] if m["kind"] == "step"] == [0.25, 0.5, 1.0]
    assert out["bake"]["verdict"] in ("pass", "inconclusive")
    state = traffic.read_state()
    assert state.champion == v and state.canary is None and state.weight == 0.0
    assert str(registry.alias_version(registry.PREVIOUS).version) == env.champion
    tags = _version(v).tags
    assert (
        tags["canary.status"] == "promoted" and tags["promoted.previous_champion"] == env.champion
    )
    assert tags["promoted_at"] == "2026-03-05T03:00:00+00:00"  # the run's "now", as direct
    assert out["baseline"]["stats"]["requests"] > 0 and out["actor"] == "retrain_model/run-good"
    assert t.report.answered_2xx == t.report.sent and t.report.labels_sent > 0
    env.wait_serving(v, None)
    metrics = env.http.get("/metrics").text
    assert f'scoring_labelled_roc_auc{{alias="canary",model="card_fraud",version="{v}"}}' in metrics


@pytest.mark.parametrize(
    ("fault", "reason", "steps_bound"),
    [
        ({"error_rate": 0.5}, "error_rate", 0),
        ({"latency_ms": 150}, "latency_p95", 0),
        ({"score_shift": 0.3}, "score_psi", 0),
    ],
    ids=["errors", "latency", "score_shift"],
)
def test_injected_fault_is_rolled_back_within_its_step(fresh, fault, reason, steps_bound):
    from pipeline.canary import run_canary_rollout

    env = fresh
    v = env.register("good_b")
    fault_set = env.http.post("/admin/faults", json={"version": v, **fault}, headers=ADMIN)
    assert fault_set.status_code == 200
    plan = env.plan(((0.5, 2.5), (1.0, 2.0)))
    with Traffic(env):
        out = run_canary_rollout(
            v, env.champion, plan=plan, service_url=env.url, run_key=f"t-{reason}"
        )
    _assert_rolled_back(env, v, out, reason)
    assert out["step_reached"] <= steps_bound
    # within its step (first weight), and the traffic weight is 0 again at once
    assert out["seconds"] <= 2.5 + 3 * INTERVAL + 5, out["measurements"]


def test_worse_labelled_metric_is_rolled_back(fresh):
    """A canary trained on poisoned labels; PSI is switched off here (max_psi high) so the
    labelled ROC AUC, fed back by the replayer 0.2 s after each answer, is what fails."""
    from pipeline.canary import run_canary_rollout

    env = fresh
    v = env.register("poisoned")
    plan = env.plan(((0.5, 6.0), (1.0, 1.0)), max_psi=50)
    with Traffic(env, labels_after=0.2):
        out = run_canary_rollout(v, env.champion, plan=plan, service_url=env.url, run_key="t-auc")
    _assert_rolled_back(env, v, out, "labelled_roc_auc")
    assert out["step_reached"] == 0
    # someone moves champion to the rolled-back version by hand (the MLflow UI's alias
    # edit): the service refuses it and keeps serving the last good champion
    from pipeline import registry

    registry.client().set_registered_model_alias(registry.model_name(), "champion", v)
    deadline = time.monotonic() + 10
    while v not in env.http.get("/readyz").json()["refusals"] and time.monotonic() < deadline:
        time.sleep(0.1)
    ready = env.http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["champion"]["version"] == env.champion
    assert ready.json()["refusals"][v]["reason"] == "rolled_back"
    answer = env.http.post(
        "/predict", content=env.traffic.bodies[0], headers={"content-type": "application/json"}
    )
    assert answer.json()["version"] == env.champion
    metrics = env.http.get("/metrics").text
    assert (
        f'scoring_refusals_total{{alias="champion",model="card_fraud",reason="rolled_back",'
        f'version="{v}"}} 1.0' in metrics
    )


def test_too_little_traffic_pauses_for_a_human_then_resumes(fresh):
    from pipeline.canary import run_canary_rollout
    from pipeline.serving import traffic

    env = fresh
    v = env.register("good_b")
    plan = env.plan(((0.5, 2.5), (1.0, 1.5)))
    out = run_canary_rollout(v, env.champion, plan=plan, service_url=env.url, run_key="t-pause")
    assert out["verdict"] == "paused" and out["reason"] == "too_little_traffic", out["summary"]
    state = traffic.read_state()
    assert state.canary == v and state.weight == 0.5 and state.champion == env.champion
    tags = _version(v).tags
    assert tags["canary.status"] == "paused" and json.loads(tags["canary.state"])["step"] == 0
    with Traffic(env):  # a human looked, traffic flows again: resume from the paused step
        again = run_canary_rollout(
            v, None, plan=plan, service_url=env.url, run_key="t-pause", resume=True
        )
    assert again["verdict"] == "promoted", again["summary"]
    assert traffic.read_state().champion == v


def test_unmeasurable_canary_is_aborted_not_judged(fresh):
    """Metrics that cannot be read (here: nothing listens) exceed the consecutive-error
    limit: out of traffic at once, champion untouched, and not tagged rolled_back."""
    from pipeline.canary import run_canary_rollout
    from pipeline.serving import traffic

    env = fresh
    v = env.register("good_b")
    out = run_canary_rollout(
        v,
        env.champion,
        plan=env.plan(((0.5, 1.0), (1.0, 1.0))),
        service_url=f"http://127.0.0.1:{_free_port()}",
        run_key="t-down",
    )
    assert (out["verdict"], out["reason"]) == ("aborted", "measurement_errors"), out["summary"]
    assert out["analysis_run"]["consecutive_errors"] == 5
    state = traffic.read_state()
    assert state.canary is None and state.weight == 0.0 and state.champion == env.champion
    tags = _version(v).tags
    assert tags["canary.status"] == "aborted" and "rolled_back" not in tags


def test_version_failing_integrity_is_refused_by_the_service(fresh):
    from pipeline import registry
    from pipeline.canary import run_canary_rollout

    env = fresh
    v = env.register("tampered")
    with Traffic(env):
        out = run_canary_rollout(
            v,
            env.champion,
            plan=env.plan(((0.5, 1.0), (1.0, 1.0))),
            service_url=env.url,
            run_key="t-tampered",
        )
    _assert_rolled_back(env, v, out, "canary_refused_by_service")
    ready = env.http.get("/readyz").json()
    assert "signature does not verify" in ready["refused"][v]
    assert ready["refusals"][v]["reason"] == "verification_failed"
    assert (
        f'scoring_model_refused{{model="card_fraud",version="{v}"}} 1.0'
        in env.http.get("/metrics").text
    )
    # even as champion it is never served: the last good champion keeps serving
    registry.set_alias(registry.CHAMPION, v)
    time.sleep(0.6)
    r = env.http.get("/readyz")
    assert r.status_code == 200 and r.json()["champion"]["version"] == env.champion
    assert any(f"v{v} is not served" in n for n in r.json()["notes"])
    assert env.http.post("/predict", json=[]).status_code == 400


def test_bake_regression_rolls_back_to_previous_champion(fresh):
    from pipeline import registry
    from pipeline.canary import run_canary_rollout
    from pipeline.serving import traffic

    env = fresh
    v = env.register("good_b")

    def break_new_champion_when_promoted() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if traffic.read_state().champion == v:
                env.http.post(
                    "/admin/faults", json={"version": v, "error_rate": 0.6}, headers=ADMIN
                )
                return
            time.sleep(0.05)

    saboteur = threading.Thread(target=break_new_champion_when_promoted, daemon=True)
    saboteur.start()
    with Traffic(env):
        out = run_canary_rollout(
            v,
            env.champion,
            plan=env.plan(((0.5, 2.5), (1.0, 1.5)), bake=3.0),
            service_url=env.url,
            run_key="t-bake",
        )
    saboteur.join(5)
    assert out["verdict"] == "rolled_back_after_bake", out["summary"]
    assert out["reason"] == "error_rate"
    assert traffic.read_state().champion == env.champion
    assert registry.alias_version(registry.PREVIOUS) is None  # never the version rolled back from
    tags = _version(v).tags
    assert tags["rolled_back"] == "true" and tags["rollback.by"].startswith("canary-bake")
    assert tags["canary.status"] == "rolled_back" and tags["bake.verdict"] == "fail"
    assert "rolled back in the bake" in tags["canary.summary"]
    env.wait_serving(env.champion, None)


def test_rollback_logic_who_why_idempotent_and_followed_by_the_service(fresh):
    from pipeline import registry
    from pipeline.rollback import RollbackRefused, rollback_champion

    env = fresh
    with pytest.raises(RollbackRefused, match="no previous_champion"):
        rollback_champion("bad scores", who="alice")
    v = env.register("good_b")
    registry.promote_champion(v, env.champion)
    env.wait_serving(v, None)
    bad = env.register("tampered")
    with pytest.raises(RollbackRefused, match="integrity"):
        rollback_champion("try a broken one", target_version=bad, who="alice")
    with pytest.raises(RollbackRefused, match="digits"):
        rollback_champion("bad target", target_version="v1")
    with pytest.raises(RollbackRefused, match="reason"):
        rollback_champion("  ")
    rec = rollback_champion("complaints from fraud ops", who="alice", run_key="dag__run-1")
    assert (rec["from_version"], rec["to_version"], rec["who"]) == (v, env.champion, "alice")
    assert str(registry.alias_version(registry.CHAMPION).version) == env.champion
    assert registry.alias_version(registry.PREVIOUS) is None
    tags = _version(v).tags
    assert tags["rolled_back"] == "true" and tags["rollback.by"] == "alice"
    assert tags["rollback.reason"] == "complaints from fraud ops"
    assert _version(env.champion).tags["restored.from"] == v
    again = rollback_champion("complaints from fraud ops", who="alice", run_key="dag__run-1")
    assert (
        again["retried"] and str(registry.alias_version(registry.CHAMPION).version) == env.champion
    )
    env.wait_serving(env.champion, None)  # the service followed through its poller


def test_alias_flips_under_load_drop_no_request(fresh):
    from pipeline import registry
    from pipeline.serving import traffic

    env = fresh
    v = env.register("good_b")
    with Traffic(env, rate=80, duration=4.0) as t:
        for i in range(8):
            time.sleep(0.35)
            if i % 2 == 0:
                registry.set_alias(traffic.CANARY, v)
                traffic.set_canary_weight(0.5)
                registry.set_alias(registry.CHAMPION, v if i % 4 == 0 else env.champion)
            else:
                traffic.set_canary_weight(0.0)
                registry.delete_alias(traffic.CANARY)
        t.thread.join(20)
    r = t.report
    assert r.sent >= 150 and r.transport_errors == 0
    assert r.answered_2xx == r.sent, r.status
    assert set(r.by_version) == {env.champion, v}


def test_rollback_dag_params(env):
    from airflow.dag_processing.dagbag import DagBag

    sys.path.insert(0, str(ROOT / "dags"))
    bag = DagBag(dag_folder=str(ROOT / "dags" / "rollback_model.py"))
    assert bag.import_errors == {}
    dag = bag.dags["rollback_card_fraud"]  # one rollback DAG per model spec
    assert [t.task_id for t in dag.tasks] == ["rollback_champion"]
    import copy

    for values, ok in (
        ({"reason": "bad canary"}, True),
        ({"reason": "x"}, False),
        ({}, False),
        ({"reason": "bad canary", "target_version": "12"}, True),
        ({"reason": "bad canary", "target_version": "v12"}, False),
    ):
        params = copy.deepcopy(dag.params)
        try:
            for k, val in values.items():
                params[k] = val
            params.validate()
            valid = True
        except Exception:  # noqa: BLE001 - ParamValidationError
            valid = False
        assert valid is ok, values
