"""Does the gradient-plateau stopper save steps without costing accuracy?

Three stopping rules train the same model with the same optimizer, schedule and seed on
the reference data (``pipeline.data.generate``), each scored by ROC AUC on a separate
held-out batch of the same world:

* **fixed**: the full budget of 50 epochs, the last weights;
* **val_patience**: validation-loss patience 5, min_delta 1e-4 (absolute), best weights;
* **ours**: ``GradientPlateauStopper`` with the pipeline defaults (EB criterion, log
  gradient-norm plateau, relative validation-loss plateau), best weights.

Steps are optimizer steps, summed over the seeds; AUC deltas are means over the seeds
(ours minus baseline). Targets: steps_ratio_vs_fixed <= 0.6 with auc_delta_vs_fixed >=
-0.005; steps_ratio_vs_val_patience <= 1.0 with auc_delta_vs_val_patience >= -0.005.

    python -m benchmarks.plateau_stopping [--seeds 1 2 3] [--rows 20000] [--epochs 50]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections import Counter


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import torch

    torch.set_num_threads(args.threads)
    from pipeline.contract import load_contract
    from pipeline.data.generate import WorldSpec, generate
    from pipeline.evaluate import evaluate_model
    from pipeline.settings import PROJECT_ROOT
    from pipeline.train.loop import (
        TrainConfig,
        default_stopper,
        no_stopper,
        train,
        val_patience_stopper,
    )

    contract = load_contract(PROJECT_ROOT / "models" / "card_fraud" / "contract.yaml")
    rules = {
        "fixed": {"stopper": no_stopper(), "restore_best": False},
        "val_patience": {"stopper": val_patience_stopper(patience=5, min_delta=1e-4)},
        "ours": {"stopper": default_stopper()},
    }
    rows: dict[str, list[dict[str, float]]] = {k: [] for k in rules}
    reasons: dict[str, Counter[str]] = {k: Counter() for k in rules}
    for seed in args.seeds:
        df = generate(WorldSpec(rows=args.rows, seed=seed))
        holdout = generate(WorldSpec(rows=args.rows, seed=10_000 + seed))
        for name, kw in rules.items():
            t0 = time.perf_counter()
            cfg = TrainConfig(
                max_epochs=args.epochs, seed=seed, telemetry=False, state_every=0, **kw
            )
            r = train(df, contract, cfg)
            auc = evaluate_model(r.model, r.features, holdout)["roc_auc"]
            rows[name].append({"steps": r.steps, "auc": auc})
            reasons[name][r.stop_reason] += 1
            print(
                f"seed {seed} {name:<13} steps {r.steps:>5} epochs {len(r.history):>3} "
                f"stop={r.stop_reason:<18} best_epoch {r.best_epoch:>3} holdout_auc {auc:.4f} "
                f"({time.perf_counter() - t0:.1f}s)",
                file=sys.stderr,
            )

    def steps(name: str) -> int:
        return sum(int(x["steps"]) for x in rows[name])

    def auc_delta(base: str) -> float:
        return statistics.mean(
            o["auc"] - b["auc"] for o, b in zip(rows["ours"], rows[base], strict=True)
        )

    print(
        json.dumps(
            {
                "info": "plateau_stopping details",
                "seeds": args.seeds,
                "rows": args.rows,
                "steps": {k: steps(k) for k in rules},
                "mean_auc": {
                    k: round(statistics.mean(x["auc"] for x in v), 4) for k, v in rows.items()
                },
                "stop_reasons": {k: dict(v) for k, v in reasons.items()},
            }
        )
    )
    print(
        json.dumps(
            {
                "bench": "plateau_stopping",
                "steps_ratio_vs_fixed": round(steps("ours") / steps("fixed"), 4),
                "auc_delta_vs_fixed": round(auc_delta("fixed"), 4),
                "steps_ratio_vs_val_patience": round(steps("ours") / steps("val_patience"), 4),
                "auc_delta_vs_val_patience": round(auc_delta("val_patience"), 4),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
