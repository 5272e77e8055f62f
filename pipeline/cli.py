"""``python -m pipeline <stage> …``: every stage of the DAG, runnable without Airflow.

Stage commands read the upstream records (JSON files written by earlier stages, or
the task's XCom copied from the Airflow UI) and print their own record as JSON.
``python -m pipeline run --batch URI`` runs all stages in order, in-process.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("pipeline")


def _load(path: str) -> dict[str, Any]:
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    return json.loads(text)


def _ctx(args: argparse.Namespace):
    from pipeline.steps import RunContext

    return RunContext(dag_id=args.dag_id, run_id=args.run_id, run_after=args.run_after)


def _print(rec: Any) -> None:
    print(json.dumps(rec, indent=2, default=str))


def cmd_generate(args: argparse.Namespace) -> int:
    from pipeline import storage
    from pipeline.data.generate import WorldSpec, generate, to_parquet_bytes

    spec = WorldSpec(rows=args.rows, seed=args.seed, start=args.start,
                     covariate_shift=args.covariate_shift, label_prior=args.label_prior,
                     concept_drift=args.concept_drift, label_poison=args.label_poison,
                     schema_fault=args.schema_fault)  # fmt: skip
    df = generate(spec)
    obj = storage.write_bytes(args.out, to_parquet_bytes(df))
    _print({"uri": obj.uri, "sha256": obj.sha256, "rows": len(df),
            "positive_rate": float(df["is_fraud"].mean()) if "is_fraud" in df else None})  # fmt: skip
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    import tempfile

    from pipeline import checkpoint

    target = args.path
    if "://" in target and not target.startswith("file://"):
        tmp = tempfile.mkdtemp()
        local = checkpoint.fetch(target, Path(tmp) / "ckpt")
    else:
        local = Path(target.removeprefix("file://"))
    v = checkpoint.verify_checkpoint(local)
    if v.intact:
        print(f"OK {target} manifest sha256 {v.manifest_sha256}")
        return 0
    for p in v.problems:
        print(f"FAIL {target}: {p}")
    return 1


def cmd_stage(args: argparse.Namespace) -> int:
    from pipeline import steps

    ctx = _ctx(args)
    ins = [_load(p) for p in (args.inputs or [])]
    stage = args.stage
    if stage == "ingest":
        rec = steps.ingest_batch(ctx, args.batch)
    elif stage == "validate":
        rec = steps.validate_batch(ctx, *ins)
    elif stage == "drift":
        rec = steps.detect_drift(ctx, *ins)
    elif stage == "decide":
        rec = steps.decide_retrain(ctx, *ins, force=args.force, decay_margin=args.decay_margin)
    elif stage == "train":
        rec = steps.train_model(ctx, *ins, max_epochs=args.max_epochs,
                                learning_rate=args.learning_rate, seed=args.seed)  # fmt: skip
    elif stage == "verify":
        rec = steps.verify_checkpoint(ctx, *ins)
    elif stage == "register":
        rec = steps.register_challenger(ctx, *ins)
    elif stage == "gate":
        rec = steps.gate_promotion(ctx, *ins, margin=args.margin, floor=args.floor,
                                   eval_uri=args.eval_uri)  # fmt: skip
    elif stage == "promote":
        rec = steps.promote_champion(ctx, *ins)
    elif stage == "summary":
        rec = steps.publish_summary(ctx)
        print(steps.format_summary(rec), file=sys.stderr)
    else:  # pragma: no cover - argparse restricts choices
        raise SystemExit(f"unknown stage {stage}")
    _print(rec)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """All stages in order, in-process: the DAG's path without Airflow."""
    from pipeline import steps

    ctx = _ctx(args)
    ing = steps.ingest_batch(ctx, args.batch)
    try:
        steps.validate_batch(ctx, ing)
        drifted = steps.detect_drift(ctx, ing)
        decision = steps.decide_retrain(ctx, drifted, force=args.force,
                                        decay_margin=args.decay_margin)  # fmt: skip
        if decision["verdict"] == "train":
            trained = steps.train_model(ctx, ing, max_epochs=args.max_epochs,
                                        learning_rate=args.learning_rate, seed=args.seed)  # fmt: skip
            verified = steps.verify_checkpoint(ctx, trained)
            reg = steps.register_challenger(ctx, ing, trained, verified)
            gated = steps.gate_promotion(ctx, reg, margin=args.margin, floor=args.floor,
                                         eval_uri=args.eval_uri)  # fmt: skip
            steps.promote_champion(ctx, gated)
    finally:
        print(steps.format_summary(steps.publish_summary(ctx)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="reference data").add_subparsers(dest="data_cmd", required=True)
    g = data.add_parser("generate", help="write a seeded batch of card transactions as Parquet")
    g.add_argument("--out", required=True, help="file:// or s3:// URI to write")
    g.add_argument("--rows", type=int, default=20_000)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--start", default="2026-01-01T00:00:00Z", help="first event time")
    g.add_argument("--covariate-shift", type=float, default=0.0)
    g.add_argument("--label-prior", type=float, default=1.0, help="fraud-rate multiplier")
    g.add_argument("--concept-drift", type=float, default=0.0)
    g.add_argument("--label-poison", type=float, default=0.0)
    g.add_argument("--schema-fault", default="none")
    g.set_defaults(func=cmd_generate)

    ck = sub.add_parser("checkpoint", help="checkpoint tools").add_subparsers(dest="ck_cmd", required=True)
    v = ck.add_parser("verify", help="verify a checkpoint; exit 0 when intact")
    v.add_argument("path", help="local directory, file:// or s3:// prefix")
    v.set_defaults(func=cmd_verify)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--dag-id", default="cli")
        sp.add_argument("--run-id", default="manual", help="same id = same MLflow run (idempotent)")
        sp.add_argument("--run-after", default=None, help="ISO time used as 'now' for checks")
        sp.add_argument("--force", action="store_true", help="retrain even without drift")
        sp.add_argument("--decay-margin", type=float, default=0.03)
        sp.add_argument("--max-epochs", type=int, default=30)
        sp.add_argument("--learning-rate", type=float, default=3e-3)
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--margin", type=float, default=0.005, help="gate margin")
        sp.add_argument("--floor", type=float, default=0.7, help="gate floor")
        sp.add_argument("--eval-uri", default="", help="trusted evaluation set")

    stages = ["ingest", "validate", "drift", "decide", "train", "verify", "register", "gate",
              "promote", "summary"]  # fmt: skip
    for name in stages:
        sp = sub.add_parser(name, help=f"run the {name} stage")
        common(sp)
        if name == "ingest":
            sp.add_argument("--batch", required=True)
        sp.add_argument("--in", dest="inputs", action="append",
                        help="upstream record JSON file ('-' for stdin); repeat in order")  # fmt: skip
        sp.set_defaults(func=cmd_stage, stage=name)
    r = sub.add_parser("run", help="all stages in order, without Airflow")
    common(r)
    r.add_argument("--batch", required=True)
    r.set_defaults(func=cmd_run)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    from pipeline.errors import PipelineRejection

    try:
        return int(args.func(args))
    except PipelineRejection as exc:
        print(f"rejected: {exc}", file=sys.stderr)
        return 2
