"""What the instrumentation costs: instrumented vs bare training throughput, same data, same steps.

*Bare*: the training loop with the stopper reduced to its per-step non-finite check, no
telemetry, no training-state checkpoints. *Instrumented*: everything the pipeline runs —
the gradient stopper (checks every ``check_every`` steps, exact per-sample statistics for
the EB criterion every ``eb_every`` steps, log-norm and validation plateaus; configured
never to stop, so both do the same steps), gradient telemetry sent to a real MLflow run
(embedded SQLite store) by the background thread, and atomic training-state checkpoints.
The telemetry cadence is the pipeline's own (``TrainConfig`` defaults: derived from the
budget by ``pipeline.train.loop.telemetry_cadence``: first every budget/256 steps, at most
64 kept, thinned by halves — 137 snapshots taken over 960 steps, 41 kept —, all of them
as run metrics); the details line reports the cadence the run used and the snapshots
taken and kept.

Robust on a shared, noisy machine:

* the two trainings run in the same process *interleaved epoch by epoch* (``iter_train``),
  alternating which goes first, so a change in machine load hits both alike;
* cost is CPU time — the training thread's CPU time in the step loop, plus, for the
  instrumented run, the CPU time its telemetry thread spent sending during the epochs
  (an upper bound on what that thread can take from training through the GIL) — so
  time spent waiting for a core taken by someone else counts for neither;
* the ratio is the median over several such paired runs.

Excluded from both: the per-epoch validation pass (identical in both) and the
once-per-run end-of-training work (the stop snapshot and its send — reported on the line
before the result —, plots, npz, final state). Rows per second are wall-clock
throughput of the step loop.
Torch uses one intra-op thread (``--threads``).

    python -m benchmarks.training_overhead [--pairs 5] [--epochs 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

from benchmarks._targets import finish, target


def paired_configs(epochs: int, **common: Any) -> tuple[Any, Any]:
    """(bare, instrumented) TrainConfigs doing the same steps: *bare* keeps only the per-step
    non-finite check (no telemetry, no training states, no stopper checks); *instrumented*
    is the pipeline's defaults with a stopper that never stops."""
    from pipeline.train.loop import TrainConfig, default_stopper, no_stopper

    bare = TrainConfig(
        max_epochs=epochs,
        stopper=no_stopper(),
        telemetry=False,
        state_every=0,
        check_every=10**9,
        **common,
    )
    instrumented = TrainConfig(
        max_epochs=epochs, stopper={**default_stopper(), "min_steps": 10**9}, **common
    )
    return bare, instrumented


def interleave(
    runs: dict[str, Generator[dict[str, float], None, Any]],
    order: list[str],
    on_row: Callable[[str, dict[str, float]], None],
) -> dict[str, Any]:
    """Drive ``iter_train`` generators one epoch each in turn, ``order`` first and reversed
    after every round, so a change of machine load hits them alike; ``on_row(name, row)``
    sees each epoch's history row. Returns each run's TrainResult."""
    results: dict[str, Any] = {}
    while len(results) < len(runs):
        for k in order:
            if k in results:
                continue
            try:
                on_row(k, next(runs[k]))
            except StopIteration as done:
                results[k] = done.value
        order = order[::-1]
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import torch

    torch.set_num_threads(args.threads)
    from mlflow import MlflowClient

    from pipeline.contract import load_contract
    from pipeline.data.generate import WorldSpec, generate
    from pipeline.settings import PROJECT_ROOT
    from pipeline.train.loop import iter_train
    from pipeline.train.model import pick_device
    from pipeline.train.telemetry import MlflowRunSink

    contract = load_contract(PROJECT_ROOT / "models" / "card_fraud" / "contract.yaml")
    df = generate(WorldSpec(rows=args.rows, seed=1))
    work = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    exp = client.create_experiment("overhead", artifact_location=(work / "artifacts").as_uri())

    bare, instrumented = paired_configs(args.epochs)

    def paired(i: int) -> dict[str, Any]:
        runs = {
            "bare": iter_train(df, contract, bare),
            "inst": iter_train(
                df,
                contract,
                instrumented,
                state_dir=work / f"state-{i}",
                sink=MlflowRunSink(client, client.create_run(exp).info.run_id),
            ),
        }
        rows: dict[str, list[dict[str, float]]] = {"bare": [], "inst": []}
        order = ["bare", "inst"] if i % 2 == 0 else ["inst", "bare"]
        results = interleave(runs, order, lambda k, row: rows[k].append(row))
        out: dict[str, Any] = {}
        for k in ("bare", "inst"):
            r = results[k]
            out[k] = {
                "cpu_s": sum(h["cpu_seconds"] for h in rows[k]),
                "wall_s": sum(h["seconds"] for h in rows[k]),
                "sender_cpu_s": sum(h["telemetry_cpu_seconds"] for h in rows[k]),
                "sender_total_cpu_s": r.telemetry.get("sender_cpu_s", 0.0) if r.telemetry else 0.0,
                "rows": r.train_rows * len(rows[k]),
                "steps": r.steps,
                "spilled": r.telemetry.get("spilled", 0) if r.telemetry else 0,
                "health": r.telemetry.get("health", {}) if r.telemetry else {},
                "snapshots_taken": r.telemetry.get("snapshots", 0) if r.telemetry else 0,
            }
        assert out["bare"]["steps"] == out["inst"]["steps"] and out["inst"]["spilled"] == 0, out
        out["ratio"] = (out["inst"]["cpu_s"] + out["inst"]["sender_cpu_s"]) / out["bare"]["cpu_s"]
        return out

    paired(-1)  # warm up: allocator, sklearn, matplotlib imports, first MLflow writes
    pairs = []
    for i in range(args.pairs):
        res = paired(i)
        pairs.append(res)
        print(
            f"pair {i}: cpu bare {res['bare']['cpu_s']:.3f}s instrumented {res['inst']['cpu_s']:.3f}s "
            f"+ sender {res['inst']['sender_cpu_s']:.3f}s  ratio {res['ratio']:.4f}  "
            f"(wall ratio {res['inst']['wall_s'] / res['bare']['wall_s']:.3f})",
            file=sys.stderr,
        )

    def med(f):  # type: ignore[no-untyped-def]
        return statistics.median(f(p) for p in pairs)

    ratios = [p["ratio"] for p in pairs]
    print(
        json.dumps(
            {
                "info": "training_overhead details",
                "steps_per_run": pairs[0]["bare"]["steps"],
                "pairs": len(pairs),
                "torch_threads": args.threads,
                "ratio_min": round(min(ratios), 4),
                "ratio_max": round(max(ratios), 4),
                "ratio_basis": "step-loop CPU time of the training thread (+ telemetry sender CPU), "
                "epochs interleaved",
                "wall_ratio_median": round(
                    med(lambda p: p["inst"]["wall_s"] / p["bare"]["wall_s"]), 4
                ),
                "sender_cpu_s_median": round(med(lambda p: p["inst"]["sender_cpu_s"]), 4),
                "sender_cpu_s_incl_end_of_run_median": round(
                    med(lambda p: p["inst"]["sender_total_cpu_s"]), 4
                ),
                "check_every": instrumented.check_every,
                "eb_every": instrumented.eb_every,
                # the cadence the pipeline derives (loop.telemetry_cadence), as the run used it
                "snapshot_every": pairs[0]["inst"]["health"].get("snapshot_every"),
                "snapshots_taken": pairs[0]["inst"]["snapshots_taken"],
                "snapshots_kept": pairs[0]["inst"]["health"].get("kept"),
                "metric_points": pairs[0]["inst"]["health"].get("metric_points"),
                "state_every": instrumented.state_every,
            }
        )
    )
    result = {
        "bench": "training_overhead",
        "ratio": round(statistics.median(ratios), 4),
        "rows_per_s": round(med(lambda p: p["inst"]["rows"] / p["inst"]["wall_s"]), 1),
        "bare_rows_per_s": round(med(lambda p: p["bare"]["rows"] / p["bare"]["wall_s"]), 1),
        "device": str(pick_device(instrumented.device)),
    }
    print(finish(result, [target("ratio", result["ratio"], "<=", 1.03)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
