"""Training on CUDA: rows/s, and what the stopper and telemetry cost there, fp32 and bf16.

Runs when CUDA is present; otherwise its last line says it skipped (``"skipped": …``), and
``make bench``'s table lists it as skipped. ``--device cpu`` runs the same measurement on
the CPU (to check the benchmark itself on a machine without a GPU; its figures are then
the CPU's).

Per precision (``fp32``; ``bf16``: autocast, what ``precision: auto`` picks on CUDA):

* *bare*: the training loop with the stopper reduced to its non-finite check, no
  telemetry, no training-state checkpoints;
* *instrumented*: everything the pipeline runs (gradient stopper configured never to stop,
  so both do the same steps; telemetry at the pipeline's own cadence to a real MLflow run
  in an embedded SQLite store; training-state checkpoints).

The two run in one process, interleaved epoch by epoch, alternating which goes first; each
epoch is timed wall-clock between ``torch.cuda.synchronize()`` calls (GPU work is
asynchronous: CPU time says nothing about it). Reported per precision: rows/s of each,
``overhead`` = instrumented / bare step-loop seconds (the loop's own per-epoch timing, as
``benchmarks.training_overhead`` uses; median over ``--pairs``), ``overhead_whole_epochs``
(the synced wall time of whole epochs, validation included; the once-per-run end-of-training
work is left out of both), and
``bf16_speedup`` = fp32 bare seconds / bf16 bare seconds. Target: overhead ≤ 1.03 in each
precision (the CPU target of ``benchmarks.training_overhead``).

    python -m benchmarks.gpu_training [--rows 200000] [--epochs 4] [--pairs 3] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

from benchmarks._targets import finish, target
from benchmarks.training_overhead import interleave, paired_configs

TARGET_OVERHEAD = 1.03


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"bench": "gpu_training", "skipped": "no CUDA device on this machine"}))
        return 0

    from mlflow import MlflowClient

    from pipeline.contract import load_contract
    from pipeline.data.generate import WorldSpec, generate
    from pipeline.settings import PROJECT_ROOT
    from pipeline.train.loop import iter_train

    def sync() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()

    contract = load_contract(PROJECT_ROOT / "models" / "card_fraud" / "contract.yaml")
    df = generate(WorldSpec(rows=args.rows, seed=1))
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    exp = client.create_experiment("gpu", artifact_location=(work / "artifacts").as_uri())
    common = {"batch_size": args.batch_size, "device": args.device}

    def paired(i: int, precision: str) -> dict[str, Any]:
        from pipeline.train.telemetry import MlflowRunSink

        bare, inst = paired_configs(args.epochs, **common, precision=precision)
        loop = {"bare": 0.0, "inst": 0.0}  # the step loop's own time (history "seconds")
        epoch = {"bare": 0.0, "inst": 0.0}  # whole epochs, validation included, synced

        def synced(k: str, run: Generator[dict[str, float], None, Any]) -> Any:
            """``run``'s epochs, each timed between device syncs into ``epoch[k]``."""
            while True:
                sync()
                t0 = time.perf_counter()
                try:
                    row = next(run)
                except StopIteration as done:  # end-of-run work (plots, npz): not timed
                    return done.value
                sync()
                epoch[k] += time.perf_counter() - t0
                yield row

        runs = {
            "bare": synced("bare", iter_train(df, contract, bare)),
            "inst": synced(
                "inst",
                iter_train(
                    df,
                    contract,
                    inst,
                    state_dir=work / f"state-{precision}-{i}",
                    sink=MlflowRunSink(client, client.create_run(exp).info.run_id),
                ),
            ),
        }
        order = ["bare", "inst"] if i % 2 == 0 else ["inst", "bare"]

        def add(k: str, row: dict[str, float]) -> None:
            loop[k] += row["seconds"]

        results = interleave(runs, order, add)
        assert results["bare"].steps == results["inst"].steps, "both must do the same steps"
        rows = results["bare"].train_rows * args.epochs
        return {
            "overhead": loop["inst"] / loop["bare"],
            "overhead_whole_epochs": epoch["inst"] / epoch["bare"],
            "bare_s": loop["bare"],
            "bare_rows_per_s": rows / loop["bare"],
            "inst_rows_per_s": rows / loop["inst"],
            "device": results["inst"].device,
            "precision": results["inst"].precision,
        }

    out: dict[str, Any] = {"bench": "gpu_training", "rows": args.rows, "device": args.device}
    if args.device == "cuda":
        out["gpu"] = torch.cuda.get_device_name(0)
    targets = []
    for precision in ("fp32", "bf16"):
        paired(-1, precision)  # warm-up: kernels, allocator, first MLflow writes
        pairs = [paired(i, precision) for i in range(args.pairs)]
        for i, r in enumerate(pairs):
            print(f"{precision} pair {i}: {json.dumps(r)}", file=sys.stderr)

        def med(key: str, pairs: list[dict[str, Any]] = pairs) -> float:
            return float(statistics.median(r[key] for r in pairs))

        out[precision] = {
            "overhead": round(med("overhead"), 4),
            "overhead_whole_epochs": round(med("overhead_whole_epochs"), 4),
            "bare_rows_per_s": round(med("bare_rows_per_s")),
            "instrumented_rows_per_s": round(med("inst_rows_per_s")),
            "bare_seconds": round(med("bare_s"), 3),
            "ran_as": f"{pairs[0]['device']}/{pairs[0]['precision']}",
        }
        targets.append(
            target(f"overhead_{precision}", out[precision]["overhead"], "<=", TARGET_OVERHEAD)
        )
    out["bf16_speedup"] = round(out["fp32"]["bare_seconds"] / out["bf16"]["bare_seconds"], 3)
    print(finish(out, targets))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
