"""Roll the champion back: to the last healthy version the promotion ledger records (else
``previous_champion``) or a named version, recorded with who and why.

Used by the ``rollback_<model>`` DAGs (a human, from the trigger form), by the canary's bake
window (``who="canary-bake"``) and by ``python -m pipeline rollback --reason …``.

Order of events, each step safe to retry:

1. refuse early, changing nothing: no champion; no target; a target that is not a number,
   does not exist, was rejected by the gate, or whose checkpoint fails verification (never
   roll back onto a broken model). With no target named, the target is the newest version
   in the model's promotion ledger (``pipeline.ledger.pick_healthy``) that was champion and
   is still healthy — not rolled back from later, not tagged ``rolled_back`` or
   ``rejected`` — in the ledger's unbroken tail ending at the current champion; when the
   ledger has none (empty, or champion was moved outside the pipeline), ``previous_champion``,
   and the log and the record say so (``target_was``, ``target_note``);
2. take any canary out of traffic (weight 0, alias removed) — a rollback is an
   emergency stop, and a running rollout notices and stops (its champion moved);
3. ``registry.promote_champion(target, expected_champion=current)`` — the same
   compare-and-set and storage lock as a promotion: if the champion moved meanwhile,
   RegistryConflict and nothing changes; the move is appended to the ledger (action
   ``rollback`` for the canary's bake, ``manual_rollback`` otherwise);
4. ``previous_champion`` never keeps pointing at the version just rolled back from: it
   becomes the target's own predecessor when recorded (tag ``promoted.previous_champion``
   written by the canary), else it is removed;
5. tags on both versions (``rolled_back``, ``rollback.*`` / ``restored.*``) and a JSON
   record on a run of its own (``records/rollback.json``) and on the rolled-back
   version's run. The scoring service follows through its poller.

Each rollback has its own MLflow run, found again by ``run_key`` (the DAG run): a retry
reads the plan (from, to) the first attempt wrote there before moving anything, so it
finishes that rollback instead of rolling back one version further.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime
from typing import Any

from pipeline.errors import PipelineRejection
from pipeline.names import safe_key

log = logging.getLogger(__name__)

VERSION_PATTERN = re.compile(r"^[0-9]+$")


class RollbackRefused(PipelineRejection):
    """The rollback cannot be done as asked; nothing was changed."""


def _check_args(reason: str, target_version: str | None) -> tuple[str, str | None]:
    reason = (reason or "").strip()
    if len(reason) < 3:
        raise RollbackRefused("a reason of at least 3 characters is required")
    target = (target_version or "").strip() or None
    if target is not None and not VERSION_PATTERN.match(target):
        raise RollbackRefused(f"target_version must be digits, got {target_version!r}")
    return reason, target


def rollback_champion(
    reason: str,
    *,
    target_version: str | None = None,
    who: str = "unknown",
    expected_champion: str | None = None,
    run_key: str | None = None,
    source: str = "rollback_dag",
    decision: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Move ``champion`` back; returns the rollback record (also logged to MLflow).

    ``run_key`` names this rollback (the DAG run); None makes a fresh one, so only a
    caller that retries passes the same key twice. ``decision``: the record of the decision
    that asked for it (the bake's analysis), kept in the ledger entry."""
    from mlflow.exceptions import MlflowException

    from pipeline import checkpoint, ledger, locks, registry
    from pipeline.serving import traffic

    reason, target = _check_args(reason, target_version)
    if run_key is None:
        import uuid

        run_key = f"rollback__{datetime.now(UTC):%Y%m%dT%H%M%S}__{uuid.uuid4().hex[:8]}"
    run_key = safe_key(run_key)
    who = (who or "").strip() or "unknown"
    name = registry.model_name()
    c = registry.client()
    model = _spec_name()
    action = ledger.Action.ROLLBACK if source == "canary_bake" else ledger.Action.MANUAL_ROLLBACK

    def move(target_was: str, stopped: str | None) -> ledger.Move:
        said: dict[str, Any] = {"kind": "rollback", "source": source, "target_was": target_was}
        said.update({"stopped_canary": stopped, "mlflow_run_id": run_id})
        if decision is not None:
            said["decision"] = decision
        return ledger.Move(action, who, reason, said, run_key)

    current = registry.alias_version(registry.CHAMPION)
    if current is None:
        raise RollbackRefused("there is no champion to roll back")
    current_v = str(current.version)
    # One MLflow run per rollback (run_key): a retry finds the plan of the first attempt,
    # so it never recomputes "previous_champion" after the aliases already moved.
    run_id = registry.get_or_create_run(run_key, {"rollback.requested_by": who})
    planned = c.get_run(run_id).data.tags
    if planned.get("rollback.to"):
        p_from, p_to = planned["rollback.from"], planned["rollback.to"]
        target_was = planned.get("rollback.target_was") or (
            "named" if target else "previous_champion"
        )
        target_note = planned.get("rollback.target_note", "")
        if current_v == p_to:  # moved by the first attempt: make sure the ledger says so
            stopped = planned.get("rollback.stopped_canary") or None
            registry.promote_champion(p_to, p_from, move=move(target_was, stopped))
            return _record(
                run_id,
                p_from,
                p_to,
                reason,
                who,
                source,
                run_key,
                target_version,
                stopped_canary=stopped,
                current_run_id=None,
                retried=True,
                target_was=target_was,
                target_note=target_note,
            )
        if current_v != p_from:
            raise registry.RegistryConflict(
                f"this rollback ({run_key}) planned v{p_from} -> v{p_to}, but champion is now "
                f"v{current_v}; nothing changed"
            )
        target = p_to
    elif target is not None:
        target_was, target_note = "named", ""
    else:
        target, target_was, target_note = _no_target(model, current_v)
    if expected_champion is not None and current_v != str(expected_champion):
        raise registry.RegistryConflict(
            f"champion is v{current_v}, not v{expected_champion} as expected; nothing changed"
        )
    if target is None:
        prev = registry.alias_version(registry.PREVIOUS)
        if prev is None:
            raise RollbackRefused(
                f"champion v{current_v} has no previous_champion and no "
                f"target_version was given, and {target_note}; nothing changed"
            )
        target = str(prev.version)
        log.warning(
            "rollback of v%s: %s; using previous_champion v%s", current_v, target_note, target
        )
    if target == current_v:
        raise RollbackRefused(f"v{target} is already champion; nothing to roll back")
    try:
        tv = c.get_model_version(name, target)
    except MlflowException:
        raise RollbackRefused(f"target v{target} does not exist in {name}") from None
    if tv.tags.get("rejected") == "true":
        raise RollbackRefused(
            f"target v{target} was rejected by the gate "
            f"({tv.tags.get('rejection_reason', '')}); not restoring it"
        )
    uri = tv.tags.get("checkpoint.uri")
    if not uri:
        raise RollbackRefused(f"target v{target} has no checkpoint.uri tag")
    try:
        checkpoint.load_for_inference(uri)
    except checkpoint.CheckpointError as exc:
        raise RollbackRefused(
            f"target v{target} fails its integrity check, not restored: {exc}"
        ) from None

    registry.set_tags(
        run_id,
        {
            "rollback.from": current_v,
            "rollback.to": target,
            "rollback.target_was": target_was,
            "rollback.target_note": target_note[:4000],
        },
    )
    state = traffic.read_state()
    stopped_canary = None
    if state.canary is not None or state.weight > 0:
        traffic.set_canary_weight(0.0)
        registry.delete_alias(traffic.CANARY)
        stopped_canary = state.canary
        if state.canary is not None:
            registry.set_tags(run_id, {"rollback.stopped_canary": state.canary})
            registry.tag_version(
                state.canary,
                {
                    "canary.status": "aborted",
                    "canary.reason": "aborted",
                    "canary.summary": f"stopped by a rollback of v{current_v} ({who}: {reason})"[
                        :4000
                    ],
                },
            )

    registry.promote_champion(target, current_v, move=move(target_was, stopped_canary))
    predecessor = tv.tags.get("promoted.previous_champion")
    with locks.storage_lock(registry.champion_lock_uri(), purpose=f"rollback to v{target}"):
        now_champ = registry.alias_version(registry.CHAMPION)
        if now_champ is not None and str(now_champ.version) == target:
            if (
                predecessor
                and predecessor not in ("none", current_v, target)
                and not _rolled_back(predecessor)
            ):
                registry.set_alias(registry.PREVIOUS, predecessor)
            else:
                registry.delete_alias(registry.PREVIOUS)
    return _record(
        run_id,
        current_v,
        target,
        reason,
        who,
        source,
        run_key,
        target_version,
        stopped_canary=stopped_canary,
        current_run_id=current.run_id,
        retried=False,
        target_was=target_was,
        target_note=target_note,
    )


def _record(
    run_id: str,
    from_v: str,
    to_v: str,
    reason: str,
    who: str,
    source: str,
    run_key: str,
    target_version: str | None,
    *,
    stopped_canary: str | None,
    current_run_id: str | None,
    retried: bool,
    target_was: str,
    target_note: str,
) -> dict[str, Any]:
    """Tags on both versions and the JSON records (idempotent: a retry writes the same)."""
    from pipeline import registry

    prev_after = registry.alias_version(registry.PREVIOUS)
    at = datetime.now(UTC).isoformat(timespec="seconds")
    registry.tag_version(
        from_v,
        {
            "rolled_back": "true",
            "rollback_reason": reason[:4000],
            "rollback.reason": reason[:4000],
            "rollback.by": who,
            "rollback.at": at,
            "rollback.to": to_v,
            "rollback.source": source,
        },
    )
    registry.tag_version(
        to_v,
        {
            "restored.at": at,
            "restored.by": who,
            "restored.reason": reason[:4000],
            "restored.from": from_v,
        },
    )
    summary = f"champion v{from_v} -> v{to_v} by {who}: {reason}"
    rec: dict[str, Any] = {
        "kind": "rollback",
        "verdict": "rolled_back",
        "from_version": from_v,
        "to_version": to_v,
        "reason": reason,
        "who": who,
        "at": at,
        "source": source,
        "target_was": target_was,  # named | ledger | previous_champion
        "target_note": target_note,
        "previous_champion_now": str(prev_after.version) if prev_after else None,
        "stopped_canary": stopped_canary,
        "run_key": run_key,
        "mlflow_run_id": run_id,
        "retried": retried,
        "summary": summary,
    }
    registry.set_tags(
        run_id,
        {
            "stage.rollback.verdict": "rolled_back",
            "stage.rollback.summary": summary[:4000],
            "rollback.by": who,
        },
    )
    registry.log_record(run_id, "rollback", rec)
    if current_run_id:
        try:
            registry.log_record(current_run_id, f"rollback-{run_key}"[:200], rec)
        except Exception:  # noqa: BLE001 - the version tags carry the outcome already
            log.exception("could not log the rollback record on run %s", current_run_id)
    try:
        registry.end_run(run_id)
    except Exception:  # noqa: BLE001 - already ended by an earlier attempt
        pass
    log.warning("%s", rec["summary"])
    return rec


def _spec_name() -> str:
    from pipeline.spec import active

    return active().name


def _no_target(model: str, champion: str) -> tuple[str | None, str, str]:
    """No target named: ``(version, "ledger", why)`` from the promotion ledger, else
    ``(None, "previous_champion", why the ledger had none)``."""
    from pipeline import ledger

    try:
        pick = ledger.pick_healthy(model, champion=champion, unhealthy=_unfit)
    except ledger.LedgerError as exc:  # a damaged ledger never blocks a rollback
        return None, "previous_champion", f"the promotion ledger cannot be trusted ({exc})"
    if pick.entry is not None:
        log.info("rollback of v%s: target from the ledger, %s", champion, pick.note)
        return pick.entry.to_version, "ledger", pick.note
    return None, "previous_champion", pick.note


def _unfit(version: str) -> bool:
    """Not a version to restore: unreadable, rolled back from, or rejected by a gate/human."""
    from pipeline import registry

    try:
        mv = registry.client().get_model_version(registry.model_name(), version)
    except Exception:  # noqa: BLE001 - a version we cannot read is not a safe target
        return True
    return mv.tags.get("rolled_back") == "true" or mv.tags.get("rejected") == "true"


def _rolled_back(version: str) -> bool:
    from pipeline import registry

    try:
        mv = registry.client().get_model_version(registry.model_name(), version)
    except Exception:  # noqa: BLE001 - a version we cannot read is not a safe predecessor
        return True
    return mv.tags.get("rolled_back") == "true"
