"""``python -m pipeline <stage> …``: every stage of the DAG, runnable without Airflow.

Stage commands read the upstream records (JSON files written by earlier stages, or
the task's XCom copied from the Airflow UI) and print their own record as JSON.
``python -m pipeline run --batch URI`` runs all stages in order, in-process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("pipeline")


def _load(path: str) -> dict[str, Any]:
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    return json.loads(text)


def _ctx(args: argparse.Namespace):
    from pipeline.stages import RunContext

    return RunContext(dag_id=args.dag_id, run_id=args.run_id, run_after=args.run_after)


def _use_spec(args: argparse.Namespace) -> Any:
    """Activate the model the command acts on: ``--spec PATH``, else ``--model NAME``, else
    the settings' default (``PIPELINE_MODEL``). A bad spec fails here, before any data."""
    from pipeline import spec

    chosen = getattr(args, "spec", None) or getattr(args, "model", None)
    s = spec.get_spec(chosen) if chosen else spec.active()
    spec.activate(s)
    if getattr(args, "dag_id", None) is None:
        args.dag_id = f"cli_{s.name}"
    return s


def _policy(args: argparse.Namespace) -> Any:
    """The run's policy: the spec's, tightened by the flags given (a loosening is refused).
    Each flag is its Param's name (``--gate-margin`` is the Param ``gate_margin``, the spec's
    ``gate.margin``, the version's tag ``gate.margin``)."""
    from pipeline import stages
    from pipeline.spec import KNOBS

    requested = {}
    for knob in KNOBS:
        value = getattr(args, knob.param, None)
        if value is None or value is False:  # not given (0 and 0.0 are values: `0.0 == False`)
            continue
        requested[knob.param] = value
    return stages.run_policy(requested)


def _print(rec: Any) -> None:
    print(json.dumps(rec, indent=2, default=str))


def cmd_generate(args: argparse.Namespace) -> int:
    from pipeline import storage
    from pipeline.data.generate import WorldSpec, generate, positive_rate, to_parquet_bytes

    spec = WorldSpec(
        rows=args.rows,
        seed=args.seed,
        start=args.start,
        covariate_shift=args.covariate_shift,
        label_prior=args.label_prior,
        concept_drift=args.concept_drift,
        label_poison=args.label_poison,
        schema_fault=args.schema_fault,
    )
    df = generate(spec)
    obj = storage.write_bytes(args.out, to_parquet_bytes(df))
    _print(
        {"uri": obj.uri, "sha256": obj.sha256, "rows": len(df), "positive_rate": positive_rate(df)}
    )
    return 0


def cmd_land(args: argparse.Namespace) -> int:
    from pipeline.land import land_batch, land_eval
    from pipeline.spec import get_spec

    spec = get_spec(args.model)
    if args.as_eval:
        rec = land_eval(spec, args.file)
    else:
        rec = land_batch(
            spec, args.file, name=args.name, emit=not args.no_event, airflow_url=args.airflow_url
        )
    _print(rec)
    return 0


def cmd_spec_check(args: argparse.Namespace) -> int:
    """``OK <name> …`` per usable spec, ``FAIL <file>: …`` per broken one; exit 1 on any."""
    from pipeline import spec as specs
    from pipeline.train.model import FactoryError, check_factory

    if args.paths:
        found: list[tuple[str, Any]] = []
        for p in args.paths:
            try:
                found.append((p, specs.load_spec(p)))
            except specs.SpecError as exc:
                found.append((p, exc))
    else:
        d = specs.discover()
        found = [(str(s.path), s) for s in d.specs] + [
            (str(p), specs.SpecError(m)) for p, m in d.errors
        ]
    failed = 0
    for path, s in found:
        if isinstance(s, Exception):
            print(f"FAIL {path}: {s}")
            failed += 1
            continue
        try:
            model = check_factory(s)
        except FactoryError as exc:
            print(f"FAIL {path}: {exc}")
            failed += 1
            continue
        params = sum(p.numel() for p in model.parameters())
        print(
            f"OK {s.name}: registered as {s.model_name}, task {s.task.type}, metric "
            f"{s.primary_metric}, factory {s.model.factory} ({params} parameters), "
            f"landing {s.landing_prefix}, trusted set {s.eval_location}"
        )
    return 1 if failed else 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Verify a checkpoint: ``OK …`` and exit 0, or one ``FAIL …`` line per problem and exit 1."""
    import tempfile

    from pipeline import checkpoint

    target = args.path
    with tempfile.TemporaryDirectory() as tmp:
        if "://" in target and not target.startswith("file://"):
            local = checkpoint.fetch(target, Path(tmp) / "ckpt")
        else:
            local = Path(target.removeprefix("file://"))
        v = checkpoint.verify_checkpoint(local)
    if v.intact:
        print(f"OK {target} manifest sha256 {v.manifest_sha256}")
        return 0
    for p in v.problems:
        print(f"FAIL {target}: {' '.join(p.split())}")
    return 1


def cmd_resign(args: argparse.Namespace) -> int:
    """Re-sign one checkpoint (see ``checkpoint.resign``): one line, exit 0; or ``FAIL …``."""
    from pipeline import checkpoint

    try:
        done = checkpoint.resign(args.path)
    except checkpoint.CheckpointError as exc:
        print(f"FAIL {args.path}: {' '.join(str(exc).split())}")
        return 1
    kept = (
        f"; previous signature kept at {done['previous_signature']}"
        if "previous_signature" in done
        else ""
    )
    print(f"{done['status'].upper()} {args.path}: {done['was']} -> {done['now']}{kept}")
    return 0


def cmd_keys_generate(args: argparse.Namespace) -> int:
    """Write an Ed25519 pair and say where each half goes (the private key is not printed)."""
    from pipeline import signing

    private, public, entry = signing.generate_key_pair(args.out, args.key_id)
    print(
        f"private key: {private} (mode 0600): the trainer only, as {signing.KEY} (the file's "
        f"text, or its base64 line) with {signing.KEY_ID}={args.key_id}, or the Airflow "
        f"Connection checkpoint_signing (password = the key, login = {args.key_id})\n"
        f"public key:  {public}\n"
        f"every verifier (workers, scoring service), added to the keyring:\n"
        f"  {signing.PUBLIC_KEYS}={entry}"
    )
    return 0


def _record_out(args: argparse.Namespace, rec: dict[str, Any]) -> None:
    """``--record-out``: rank 0 (or the only process) writes the stage's record there."""
    if getattr(args, "record_out", None) and os.environ.get("RANK", "0") == "0":
        Path(args.record_out).write_text(json.dumps(rec, indent=2, default=str))


def _inputs(args: argparse.Namespace, *kinds: Any) -> list[Any]:
    """The upstream records (``--in``, in the task's order) as the stage's record types."""
    given = list(args.inputs or [])
    if len(given) != len(kinds):
        names_ = ", ".join(k.STAGE.value for k in kinds)
        raise SystemExit(
            f"{args.stage} needs {len(kinds)} upstream record(s) with --in, in order: {names_} "
            f"(got {len(given)})"
        )
    return [kind.from_xcom(_load(path)) for kind, path in zip(kinds, given, strict=True)]


def cmd_stage(args: argparse.Namespace) -> int:
    """One DAG task, ``python -m pipeline <task id>``: the same function with that task's
    options, records in (``--in``) and out (stdout) as the task's XCom."""
    from pipeline import stages
    from pipeline.errors import PipelineRejection
    from pipeline.names import Task
    from pipeline.spec import PolicyViolation

    _use_spec(args)
    policy = _policy(args)
    ctx = _ctx(args)
    stage = Task(args.stage)
    rec: Any
    if stage is Task.INGEST_BATCH:
        rec = stages.ingest_batch(ctx, args.batch, policy=policy)
    elif stage is Task.VALIDATE_BATCH:
        rec = stages.validate_batch(ctx, *_inputs(args, stages.Ingested))
    elif stage is Task.DETECT_DRIFT:
        rec = stages.detect_drift(ctx, *_inputs(args, stages.Ingested))
    elif stage is Task.DECIDE_RETRAIN:
        (drifted,) = _inputs(args, stages.Drifted)
        rec = stages.decide_retrain(ctx, drifted, force=args.force_retrain, policy=policy)
    elif stage is Task.TRAIN_MODEL:
        try:
            rec = stages.train_model(
                ctx,
                *_inputs(args, stages.Ingested),
                max_epochs=args.max_epochs,
                learning_rate=args.learning_rate,
                seed=args.seed,
                batch_size=args.batch_size,
                optimizer=args.optimizer,
                state_every=args.state_every,
            )
        except PipelineRejection as exc:
            _record_out(args, {"rejected": str(exc)})
            raise
        _record_out(args, rec.to_xcom())
    elif stage is Task.VERIFY_CHECKPOINT:
        rec = stages.verify_checkpoint(ctx, *_inputs(args, stages.Trained))
    elif stage is Task.REGISTER_CHALLENGER:
        kinds = (stages.Ingested, stages.Trained, stages.Verified)
        rec = stages.register_challenger(ctx, *_inputs(args, *kinds))
    elif stage is Task.GATE_PROMOTION:
        rec = stages.gate_promotion(ctx, *_inputs(args, stages.Registered), policy=policy)
    elif stage is Task.APPROVE_PROMOTION:
        (gated,) = _inputs(args, stages.Gated)
        answer = {
            "chosen_options": ["Approve" if args.approve else "Reject"],
            "responded_by_user": {"id": args.who, "name": args.who},
            "responded_at": _ctx(args).now.isoformat(),
            "params_input": {"comment": args.comment or ""},
        }
        rec = stages.approve_promotion(ctx, gated, answer)
    elif stage is Task.PROMOTE_CHAMPION:
        ins = list(args.inputs or [])
        if not ins or len(ins) > 2:
            raise SystemExit(
                "promote_champion needs --in gate_promotion.json [--in approve_promotion.json]"
            )
        if policy.require_approval and len(ins) < 2:
            raise PolicyViolation(
                "this model's policy requires a human approval before promotion; "
                "approve it in Airflow (approve_promotion), which records who did, or record "
                "one with `python -m pipeline approve_promotion --in gated.json --approve --who NAME`"
            )
        gated = stages.Gated.from_xcom(_load(ins[0]))
        approval = stages.Approved.from_xcom(_load(ins[1])) if len(ins) > 1 else None
        if policy.canary:
            rec = stages.canary_rollout(ctx, gated, approval)
        else:
            rec = stages.promote_champion(ctx, gated, approval)
    elif stage is Task.PUBLISH_SUMMARY:
        rec = stages.publish_summary(ctx)
        print(stages.format_summary(rec), file=sys.stderr)
    else:  # pragma: no cover - argparse restricts choices
        raise SystemExit(f"unknown stage {stage}")
    _print(rec.to_xcom())
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """All stages in order, in-process: the DAG's path without Airflow."""
    from pipeline import stages
    from pipeline.quarantine import check_batch_source

    _use_spec(args)
    policy = _policy(args)  # a loosening is refused here, before any data is read
    check_batch_source(args.batch)  # and a batch outside the model's roots, before the imports
    stages.train_config(max_epochs=args.max_epochs, learning_rate=args.learning_rate)  # budget
    ctx = _ctx(args)
    ing = stages.ingest_batch(ctx, args.batch, policy=policy)
    try:
        stages.validate_batch(ctx, ing)
        drifted = stages.detect_drift(ctx, ing)
        decision = stages.decide_retrain(ctx, drifted, force=args.force_retrain, policy=policy)
        if decision.retrain:
            trained = stages.train_model(
                ctx,
                ing,
                max_epochs=args.max_epochs,
                learning_rate=args.learning_rate,
                seed=args.seed,
            )
            verified = stages.verify_checkpoint(ctx, trained)
            reg = stages.register_challenger(ctx, ing, trained, verified)
            gated = stages.gate_promotion(ctx, reg, policy=policy)
            if policy.require_approval and gated.promote:
                # the CLI has no one to ask: the version waits as challenger for a human
                name = _use_spec(args).name
                log.warning(
                    "v%s passed the gate; model %s requires approval: it stays challenger "
                    "until approved (approve_promotion in Airflow's retrain_%s)",
                    gated.model_version,
                    name,
                    name,
                )
            elif policy.canary:
                stages.canary_rollout(ctx, gated)
            else:
                stages.promote_champion(ctx, gated)
    finally:
        print(stages.format_summary(stages.publish_summary(ctx)))
    return 0


def cmd_decision_replay(args: argparse.Namespace) -> int:
    """Recompute a recorded decision (any of the five kinds) from its record alone; exit 0
    when it gives back the recorded decision, 1 when it does not."""
    from pipeline import decisions, registry

    where = args.record
    if where.startswith("runs:/"):
        record = json.loads(registry.read_artifact(where))
    else:
        record = _load(where)
    again = decisions.replay(record, load=registry.read_artifact)
    same = decisions.replays(record, load=registry.read_artifact)
    _print(
        {
            "kind": record.get("kind"),
            "record_version": record.get("record_version"),
            "recorded": record["decision"].get("verdict"),
            "replayed": again.verdict.value,
            "message": again.message,
            "replays": same,
        }
    )
    return 0 if same else 1


def cmd_serve(args: argparse.Namespace) -> int:
    """The scoring service (see pipeline/serving): loopback unless --host says otherwise."""
    from pipeline.serving.app import serve

    serve(args.host, args.port, poll_seconds=args.poll_seconds, torch_threads=args.torch_threads)
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from pipeline.serving.replay import ReplayConfig, replay_batch

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one log line per request
    cfg = ReplayConfig(
        url=args.url,
        rate=args.rate,
        duration_s=args.duration,
        labels_after_s=args.labels_after,
        rows_per_request=args.rows_per_request,
        max_requests=args.max_requests,
        concurrency=args.concurrency,
        key_column=args.key_column,
    )
    report = replay_batch(cfg, args.batch)
    _print(report.to_dict())
    return 0 if report.sent and report.answered_2xx == report.sent else 1


def cmd_canary(args: argparse.Namespace) -> int:
    from pipeline import canary

    if args.abort:
        _print(canary.abort_canary(args.version, args.reason or "", who=args.who))
        return 0
    plan = canary.CanaryPlan.from_settings(
        **({"analysis_interval_s": args.analysis_interval} if args.analysis_interval else {}),
        **({"bake_s": args.bake} if args.bake is not None else {}),
    )
    rec = canary.run_canary_rollout(
        args.version,
        args.expected_champion or None,
        plan=plan,
        service_url=args.url or None,
        run_key=args.run_key,
        actor=args.who,
        resume=args.resume,
    )
    _print(rec)
    return 0 if rec["verdict"] == "promoted" else 3


def cmd_rollback(args: argparse.Namespace) -> int:
    from pipeline.rollback import rollback_champion

    _print(
        rollback_champion(
            args.reason,
            target_version=args.target_version,
            who=args.who,
            run_key=args.run_key,
            source="cli",
        )
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="reference data").add_subparsers(
        dest="data_cmd", required=True
    )
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

    ld = data.add_parser(
        "land",
        help="copy a batch into a model's landing prefix and emit its "
        "asset event through Airflow's REST API",
    )
    ld.add_argument("--model", required=True, help="model name (models/<name>/model.yaml)")
    ld.add_argument("--file", required=True, help="local Parquet file (or file:// / s3:// URI)")
    ld.add_argument(
        "--name",
        default=None,
        help="object name in the landing prefix (default: <date>/<sha256 prefix>-<file name>)",
    )
    ld.add_argument("--no-event", action="store_true", help="copy only; emit no asset event")
    ld.add_argument(
        "--as-eval",
        action="store_true",
        help="put the file at the spec's trusted "
        "evaluation location instead (never a landing batch; no event)",
    )
    ld.add_argument("--airflow-url", default=None, help="default: PIPELINE_AIRFLOW_API_URL")
    ld.set_defaults(func=cmd_land)

    sc = sub.add_parser("spec", help="model spec tools").add_subparsers(
        dest="spec_cmd", required=True
    )
    chk = sc.add_parser(
        "check",
        help="validate model specs and build their factories (for a "
        "model team's CI); exit 0 when every one is usable",
    )
    chk.add_argument("paths", nargs="*", help="spec files (default: every models/*/model.yaml)")
    chk.set_defaults(func=cmd_spec_check)

    dc = sub.add_parser("decision", help="decision records").add_subparsers(
        dest="decision_cmd", required=True
    )
    dr = dc.add_parser(
        "replay",
        help="recompute a decision from its record (runs:/… URI or a file); exit 0 when it "
        "gives back the recorded decision",
    )
    dr.add_argument("record", help="e.g. runs:/<run id>/records/decisions/retrain.json")
    dr.set_defaults(func=cmd_decision_replay)

    ck = sub.add_parser("checkpoint", help="checkpoint tools").add_subparsers(
        dest="ck_cmd", required=True
    )
    v = ck.add_parser("verify", help="verify a checkpoint; exit 0 when intact")
    v.add_argument("path", help="local directory, file:// or s3:// prefix")
    v.set_defaults(func=cmd_verify)
    rs = ck.add_parser(
        "resign",
        help="verify a checkpoint (an HMAC one with PIPELINE_SIGNING_LEGACY_HMAC_KEY set), then "
        "replace its signature by this process's Ed25519 one; weights and manifest untouched",
    )
    rs.add_argument("path", help="local directory, file:// or s3:// prefix")
    rs.set_defaults(func=cmd_resign)

    keys = sub.add_parser("keys", help="checkpoint signing keys").add_subparsers(
        dest="keys_cmd", required=True
    )
    kg = keys.add_parser(
        "generate", help="make an Ed25519 key pair: ID.key (private, 0600) and ID.pub"
    )
    kg.add_argument("--out", required=True, type=Path, help="folder for the two files")
    kg.add_argument("--key-id", required=True, help="the id signatures will name, e.g. prod-1")
    kg.set_defaults(func=cmd_keys_generate)

    def model_args(sp: argparse.ArgumentParser) -> None:
        which = sp.add_mutually_exclusive_group()
        which.add_argument(
            "--spec", default=None, help="the model's spec file (models/<name>/model.yaml)"
        )
        which.add_argument(
            "--model",
            default=None,
            help="a model name under PIPELINE_MODELS_ROOT (default: PIPELINE_MODEL, card_fraud)",
        )

    def run_args(sp: argparse.ArgumentParser) -> None:
        model_args(sp)
        sp.add_argument("--dag-id", default=None, help="default: cli_<model>")
        sp.add_argument("--run-id", default="manual", help="same id = same MLflow run (idempotent)")
        sp.add_argument("--run-after", default=None, help="ISO time used as 'now' for checks")

    # Each option is its trigger Param's name with dashes (pipeline.spec.param_schema): its
    # default is the spec's (None here), and a policy flag may only tighten the spec.
    def gate_flags(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--gate-floor", type=float, default=None, help="only stricter")
        sp.add_argument("--gate-margin", type=float, default=None, help="only larger")
        sp.add_argument(
            "--gate-non-inferiority-margin",
            type=float,
            default=None,
            help="also accept a challenger whose CI lower bound is above -MARGIN "
            "(only where the spec allows gate.non_inferiority_margin)",
        )
        sp.add_argument(
            "--gate-slices",
            nargs="*",
            default=None,
            help="categorical columns whose values must not regress (added to the spec's)",
        )
        sp.add_argument("--gate-max-checkpoint-mb", type=float, default=None, help="only smaller")
        sp.add_argument("--gate-max-latency-p95-ms", type=float, default=None, help="only smaller")
        sp.add_argument(
            "--eval-uri", default=None, help="another trusted set (only if the spec allows)"
        )

    def retrain_flags(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--force-retrain", action="store_true", help="retrain even without drift or decay"
        )
        sp.add_argument(
            "--decay-margin", type=float, default=None, help="default: the spec's (only smaller)"
        )

    def promotion_flags(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--require-approval",
            action="store_true",
            help="a human approval first (approve_promotion); the CLI never waits for one",
        )
        sp.add_argument("--canary", action="store_true", help="promote through a canary")

    def train_flags(sp: argparse.ArgumentParser, everything: bool) -> None:
        sp.add_argument(
            "--max-epochs", type=int, default=None, help="default: the spec's budget (only fewer)"
        )
        sp.add_argument("--learning-rate", type=float, default=None, help="default: the spec's")
        sp.add_argument("--seed", type=int, default=None, help="default: the spec's")
        if not everything:
            return
        sp.add_argument("--batch-size", type=int, default=None, help="default: the spec's")
        sp.add_argument(
            "--optimizer", choices=["adamw", "sgd"], default=None, help="default: the spec's"
        )
        sp.add_argument(
            "--state-every",
            type=int,
            default=None,
            help="steps between training-state checkpoints (resume after a crash)",
        )
        sp.add_argument(
            "--record-out",
            default=None,
            help="also write the record to this file (rank 0 under torchrun)",
        )

    def inputs(sp: argparse.ArgumentParser, what: str) -> None:
        sp.add_argument(
            "--in",
            dest="inputs",
            action="append",
            help=f"upstream record JSON file ('-' for stdin): {what}",
        )

    def all_policy(sp: argparse.ArgumentParser) -> None:
        gate_flags(sp)
        sp.add_argument(
            "--decay-margin", type=float, default=None, help="default: the spec's (only smaller)"
        )
        promotion_flags(sp)

    # One command per DAG task, named by its task id, with exactly that task's options; the
    # short names of earlier versions stay as aliases.
    tasks: list[tuple[str, str, str, Any]] = [
        ("ingest_batch", "ingest", "snapshot a landed batch", all_policy),
        ("validate_batch", "validate", "validate the snapshot (--in ingest_batch)", None),
        ("detect_drift", "drift", "drift and champion decay (--in ingest_batch)", None),
        ("decide_retrain", "decide", "the retrain decision (--in detect_drift)", retrain_flags),
        ("train_model", "train", "train and publish a checkpoint (--in ingest_batch)", None),
        ("verify_checkpoint", "verify", "prove the checkpoint intact (--in train_model)", None),
        (
            "register_challenger",
            "register",
            "register the version (--in ingest_batch --in train_model --in verify_checkpoint)",
            None,
        ),
        ("gate_promotion", "gate", "the promotion gate (--in register_challenger)", gate_flags),
        ("approve_promotion", "approve", "record a human approval (--in gate_promotion)", None),
        (
            "promote_champion",
            "promote",
            "move champion (--in gate_promotion [--in approve_promotion])",
            promotion_flags,
        ),
        ("publish_summary", "summary", "every stage's verdict, from the run", None),
    ]
    for task_id, alias, text, flags in tasks:
        sp = sub.add_parser(task_id, aliases=[alias], help=text)
        run_args(sp)
        if flags is not None:
            flags(sp)
        if task_id == "ingest_batch":
            sp.add_argument("--batch", required=True, help="the batch URI (Param batch_uri)")
        if task_id == "train_model":
            train_flags(sp, everything=True)
        if task_id == "approve_promotion":
            answer = sp.add_mutually_exclusive_group(required=True)
            answer.add_argument("--approve", action="store_true")
            answer.add_argument("--reject", action="store_true")
            sp.add_argument("--who", required=True, help="who answers (recorded)")
            sp.add_argument("--comment", default="", help="why (recorded)")
        if task_id not in ("ingest_batch", "publish_summary"):
            inputs(sp, text.split("(")[-1].rstrip(")"))
        sp.set_defaults(func=cmd_stage, stage=task_id)
    r = sub.add_parser("run", help="all stages in order, without Airflow")
    run_args(r)
    all_policy(r)
    r.add_argument("--force-retrain", action="store_true", help="retrain even without drift")
    train_flags(r, everything=False)
    r.add_argument("--batch", required=True)
    r.set_defaults(func=cmd_run)

    sv = sub.add_parser("serve", help="the scoring service (champion + canary, /metrics)")
    sv.add_argument("--host", default="127.0.0.1", help="0.0.0.0 only when asked (containers)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--poll-seconds", type=float, default=None, help="default: settings")
    sv.add_argument("--torch-threads", type=int, default=1)
    sv.set_defaults(func=cmd_serve)
    rp = sub.add_parser("replay", help="replay a batch as HTTP traffic, then its labels")
    model_args(rp)
    rp.add_argument("--url", default="http://127.0.0.1:8000")
    rp.add_argument("--batch", required=True, help="file:// or s3:// Parquet batch")
    rp.add_argument("--rate", type=float, required=True, help="requests per second")
    rp.add_argument("--duration", type=float, required=True, help="seconds")
    rp.add_argument(
        "--labels-after",
        type=float,
        default=None,
        help="post each request's labels to /feedback this many seconds later",
    )
    rp.add_argument("--rows-per-request", type=int, default=1)
    rp.add_argument("--max-requests", type=int, default=None)
    rp.add_argument("--concurrency", type=int, default=16)
    rp.add_argument("--key-column", default=None, help="column sent as X-Routing-Key (sticky)")
    rp.set_defaults(func=cmd_replay)
    cn = sub.add_parser("canary", help="canary a version against the champion (or resume/abort)")
    model_args(cn)
    cn.add_argument("--version", required=True)
    cn.add_argument(
        "--expected-champion", default="", help="the champion the gate compared against"
    )
    cn.add_argument("--url", default="", help="scoring service URL (default: settings)")
    cn.add_argument("--analysis-interval", type=float, default=None)
    cn.add_argument("--bake", type=float, default=None, help="bake seconds (default: settings)")
    cn.add_argument("--resume", action="store_true", help="continue a paused canary")
    cn.add_argument("--abort", action="store_true", help="take the canary out of traffic")
    cn.add_argument("--reason", default="", help="why (with --abort)")
    cn.add_argument("--who", default="cli")
    cn.add_argument("--run-key", default="cli__canary")
    cn.set_defaults(func=cmd_canary)
    rb = sub.add_parser(
        "rollback",
        help="champion back to the last healthy version in the ledger (else "
        "previous_champion), or --target-version",
    )
    model_args(rb)
    rb.add_argument("--reason", required=True)
    rb.add_argument("--target-version", default=None)
    rb.add_argument("--who", default="cli")
    rb.add_argument("--run-key", default=None, help="same key = same rollback (retry-safe)")
    rb.set_defaults(func=cmd_rollback)
    # -- on call: alerts --
    from pipeline.alerts import cmd_alerts  # stdlib + settings only: cheap

    al = sub.add_parser("alerts", help="open alerts (dedup key, kind, summary, runbook)")
    al.add_argument("--model", default=None, help="one model's alerts (default: every model)")
    al.add_argument("--all", action="store_true", help="resolved ones too (current state)")
    al.add_argument("--json", action="store_true", help="the alerts as a JSON list")
    al.add_argument(
        "--resolve", default=None, metavar="DEDUP_KEY", help="close an open alert by its key"
    )
    al.add_argument(
        "--overdue",
        action="store_true",
        help="raise/resolve run_overdue from Airflow's REST API (needs --model)",
    )
    al.set_defaults(func=cmd_alerts)
    # -- on call: history --
    from pipeline.ledger import cmd_history  # storage + settings only: cheap

    hs = sub.add_parser(
        "history", help="the promotion ledger: every move of champion, oldest first"
    )
    model_args(hs)
    hs.add_argument("--json", action="store_true", help="the entries as a JSON list")
    hs.set_defaults(func=cmd_history)
    # -- on call: slo --
    from pipeline.slo import cmd_slo  # stdlib + names only: cheap

    slo = sub.add_parser("slo", help="the model's SLOs and what is left of each error budget")
    model_args(slo)
    slo.add_argument("--json", action="store_true", help="print the report as JSON")
    slo.add_argument(
        "--check", action="store_true", help="exit 3 when any error budget is exhausted"
    )
    slo.add_argument("--url", default="", help="scoring service URL (default: settings)")
    slo.set_defaults(func=cmd_slo)
    # -- on call: monitor --
    from pipeline.monitor import cmd_monitor

    mo = sub.add_parser("monitor", help="judge the served champion: decay on labels, score drift")
    model_args(mo)
    mo.add_argument("--url", default="", help="scoring service URL (default: PIPELINE_SERVING_URL)")
    mo.add_argument("--json", action="store_true", help="print the replayable decision record")
    mo.set_defaults(func=cmd_monitor)
    return p


class RunKeyFilter(logging.Filter):
    """Stamps every record with the run key (``dag__run``: the MLflow run's ``pipeline.run_key``),
    so each line of a command's log says which run it belongs to."""

    def __init__(self, run_key: str) -> None:
        super().__init__()
        self.run_key = run_key

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "run_key", None):
            record.run_key = self.run_key
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line (``PIPELINE_LOG_FORMAT=json``): for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "run_key": getattr(record, "run_key", ""),
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class ProgressHandler(logging.StreamHandler):
    """On a terminal, records logged with ``extra={"progress": True}`` (training epochs) rewrite
    one status line in place; any other record, and every record when the stream is not a TTY
    (CI, Airflow, a pipe), is a plain line."""

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream or sys.stderr)
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._open = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            if self.tty and getattr(record, "progress", False):
                import shutil

                width = shutil.get_terminal_size((120, 24)).columns
                self.stream.write("\r\033[K" + msg[: max(width - 1, 20)])
                self._open = True
            else:
                self.stream.write(("\n" if self._open else "") + msg + self.terminator)
                self._open = False
            self.flush()
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def setup_logging(args: argparse.Namespace, stream: Any = None) -> logging.Handler:
    """Root logging for ``python -m pipeline``: run key on every line, progress on a terminal."""
    import os

    from pipeline.names import run_key as key_of

    run_key = "-"  # commands outside a run (data generate, checkpoint verify)
    if hasattr(args, "run_id"):  # the same key as stages.RunContext.run_key
        run_key = key_of(args.dag_id or "cli", args.run_id)
    handler = ProgressHandler(stream)
    handler.addFilter(RunKeyFilter(run_key))
    if os.environ.get("PIPELINE_LOG_FORMAT", "").lower() == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s run=%(run_key)s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, ProgressHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if getattr(args, "verbose", False) else logging.INFO)
    if not getattr(args, "verbose", False):  # library chatter at INFO buries the stage lines
        for noisy in ("great_expectations", "evidently", "urllib3", "botocore", "alembic"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    return handler


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.errors import PipelineRejection
    from pipeline.spec import SpecError

    try:
        if hasattr(args, "spec"):  # commands that act on one model
            _use_spec(args)
        setup_logging(args)
        return int(args.func(args))
    except SpecError as exc:
        print(f"bad model spec: {exc}", file=sys.stderr)
        return 2
    except PipelineRejection as exc:
        print(f"rejected: {exc}", file=sys.stderr)
        return 2
