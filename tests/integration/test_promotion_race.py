"""Two processes promote different versions at the same moment against the same expected
champion: exactly one wins, the other gets a clean RegistryConflict, and champion /
previous_champion stay consistent — never a lost update. Five rounds, on one MLflow store.

Each worker widens the race window on purpose: it sleeps 200 ms between reading
``champion`` and writing it, so without the storage lock both check-then-set sequences
would interleave and both would "succeed".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import registry, storage

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 5

WORKER = """
import json, sys, time
sys.path.insert(0, {root!r})
from pipeline import registry

real = registry.alias_version
def slow_read(alias):
    mv = real(alias)
    if alias == registry.CHAMPION:
        time.sleep(0.2)  # read ... (another process may act here) ... then write
    return mv
registry.alias_version = slow_read
for line in iter(sys.stdin.readline, ""):
    job = json.loads(line)
    if job.get("warmup"):  # the store exists now: open it
        registry.client()
        print(json.dumps({{"ready": True}}), flush=True)
        continue
    time.sleep(max(0.0, job["go_at"] - time.time() - 0.005))
    while time.time() < job["go_at"]:  # both start within microseconds of each other
        pass
    try:
        prev = registry.promote_champion(job["version"], job["expected"], lock_timeout=60)
        out = {{"version": job["version"], "ok": True, "previous": prev}}
    except registry.RegistryConflict as exc:
        out = {{"version": job["version"], "ok": False, "error": type(exc).__name__,
               "message": str(exc)}}
    print(json.dumps(out), flush=True)
"""


def _start_worker() -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WORKER.format(root=str(ROOT))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )


def _read(worker: subprocess.Popen, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = worker.stdout.readline()
        if line.startswith("{"):
            return json.loads(line)
        if not line and worker.poll() is not None:
            raise RuntimeError(f"worker exited with {worker.returncode}")
    raise TimeoutError("worker did not answer")


def _register(key: str) -> str:
    rid = registry.get_or_create_run(key)
    return registry.register_version(rid, key, f"file:///ck/{key}", {}, "")


def _alias(name: str) -> str | None:
    mv = registry.alias_version(name)
    return str(mv.version) if mv else None


@pytest.fixture
def workers(pipeline_home):
    ws = [_start_worker(), _start_worker()]  # they import while this process makes the store
    try:
        registry.get_or_create_run("race__setup")
        for w in ws:
            w.stdin.write(json.dumps({"warmup": True}) + "\n")
            w.stdin.flush()
        for w in ws:
            assert _read(w)["ready"]
        yield ws
    finally:
        for w in ws:
            w.stdin.close()
            w.wait(timeout=30)


def test_concurrent_promotions_have_exactly_one_winner(workers):
    base = _register("race__base")
    assert registry.promote_champion(base, None) is None
    history = [base]
    for rnd in range(ROUNDS):
        a, b = _register(f"race__{rnd}a"), _register(f"race__{rnd}b")
        go_at = time.time() + 0.3
        jobs = [
            {"version": a, "expected": base, "go_at": go_at},
            {"version": b, "expected": base, "go_at": go_at},
        ]
        if rnd % 2:
            jobs.reverse()  # alternate which process promotes which version
        for w, job in zip(workers, jobs, strict=True):
            w.stdin.write(json.dumps(job) + "\n")
            w.stdin.flush()
        results = [_read(w) for w in workers]

        winners = [r for r in results if r["ok"]]
        losers = [r for r in results if not r["ok"]]
        assert len(winners) == 1 and len(losers) == 1, f"round {rnd}: {results}"
        win, lose = winners[0], losers[0]
        assert win["previous"] == base
        assert lose["error"] == "RegistryConflict"
        assert f"champion is v{win['version']}" in lose["message"]
        assert f"against v{base}" in lose["message"]
        # consistent aliases: champion = the winner, previous_champion = what it replaced
        assert _alias(registry.CHAMPION) == win["version"]
        assert _alias(registry.PREVIOUS) == base
        loser_mv = registry.client().get_model_version(registry.model_name(), lose["version"])
        assert not ({"champion", "previous_champion"} & set(loser_mv.aliases))
        assert not storage.exists(registry.champion_lock_uri())  # released by the winner
        base = win["version"]
        history.append(base)
    assert len(set(history)) == ROUNDS + 1  # the champion moved every round, to a new version
