"""The promotion ledger: every move of ``champion``, write-once, in storage.

MLflow keeps no history of an alias (mlflow/mlflow#2169): once ``champion`` moved, the
registry no longer says where it pointed before, who moved it or why. On call, the first
question is "what changed, and when?" — so every move (a promotion, a canary promotion,
an automatic rollback by the canary's bake, a manual rollback) appends one entry here,
right after its compare-and-set succeeded and under the same lock
(``registry.promote_champion``).

Layout, per model (the spec's name), under the storage root::

    ledger/<model>/entries/00000001.json    one object per entry, seq from 1, never rewritten
    ledger/<model>/decisions/<sha256>.json  a decision record too large to keep inline

Each entry object is an envelope ``{"ledger": 1, "entry": {...}, "prev_sha256": ...,
"sha256": ...}``: ``sha256`` is the SHA-256 of the canonical JSON of ``entry`` and
``prev_sha256`` (which is the previous entry's ``sha256``, None for the first). Objects are
created with :func:`pipeline.storage.write_bytes` — create-if-absent on both backends
(``os.link`` on a local folder, ``If-None-Match: *`` on S3) — so two writers never overwrite
each other: the loser of a sequence number re-reads the ledger and takes the next one.

Reading (:func:`entries`) treats the files as hostile: an entry whose body does not match its
digest, whose name is not its ``seq``, whose ``prev_sha256`` is not its predecessor's (an
entry removed or replaced in the middle), or whose fields are not of the right types is
refused with an error naming the object. Stated limit: the digests are not a signature —
someone who can write storage can rewrite the newest entries consistently, or drop the
newest ones; the chain makes any change to an older entry visible.

Idempotence: a retried move — the newest entry already records the same ``run_key`` moving
``champion`` to the same version — returns that entry instead of writing a second one.

Health (for a rollback with no target, :func:`last_healthy`): ``healthy`` on an entry says
its ``to_version`` was judged fit when the move was made (the gate or the canary passed, or a
rollback target verified). Entries never change, so later evidence is read at the time of
asking: a version some later entry rolled back *from*, or one the registry tags
``rolled_back`` / ``rejected`` (the caller's ``unhealthy``), is not healthy. Only the
ledger's unbroken tail counts: where an entry's ``from_version`` is not its predecessor's
``to_version``, ``champion`` was moved outside the pipeline (the MLflow UI) and the ledger
cannot vouch for what came before.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pipeline import storage
from pipeline.errors import PipelineRejection
from pipeline.settings import get_settings

FORMAT = 1
INLINE_DECISION_BYTES = 8192  # a larger decision record is stored beside, named by its digest
DECISION_REF = "ledger.decision_ref"
_ENTRY_NAME = re.compile(r"^([0-9]{8})\.json$")
_APPEND_ATTEMPTS = 20


class Action(StrEnum):
    PROMOTE = "promote"
    CANARY_PROMOTE = "canary_promote"
    ROLLBACK = "rollback"  # automatic: the canary's bake window
    MANUAL_ROLLBACK = "manual_rollback"  # a person: the rollback DAG, the CLI


ROLLBACKS = frozenset({Action.ROLLBACK, Action.MANUAL_ROLLBACK})


class LedgerError(PipelineRejection):
    """The ledger in storage is not what the pipeline wrote: retrying cannot fix it."""


@dataclass(frozen=True)
class LedgerEntry:
    seq: int
    model: str
    from_version: str | None
    to_version: str
    action: str
    who: str
    why: str
    decision: dict[str, Any] | None
    at: str
    run_key: str | None
    healthy: bool

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Move:
    """What a caller of ``registry.promote_champion`` says about the move it asks for."""

    action: Action = Action.PROMOTE
    who: str = "unknown"
    why: str = ""
    decision: dict[str, Any] | None = None
    run_key: str | None = None
    healthy: bool = True


@dataclass(frozen=True)
class Pick:
    """A rollback target read from the ledger, or None, and a sentence saying why."""

    entry: LedgerEntry | None
    note: str


# -- where ------------------------------------------------------------------------------------


def folder(model: str) -> str:
    return storage.join(get_settings().storage_root, "ledger", model)


def entry_uri(model: str, seq: int) -> str:
    return storage.join(folder(model), "entries", f"{seq:08d}.json")


# -- bytes ------------------------------------------------------------------------------------


def _canonical(obj: Any) -> bytes:
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
    ).encode()


def _digest(entry: dict[str, Any], prev: str | None) -> str:
    return storage.sha256_bytes(_canonical({"entry": entry, "prev_sha256": prev}))


def _refuse(uri: str, what: str) -> LedgerError:
    return LedgerError(
        f"ledger entry {uri}: {what}. Ledger entries are write-once, so it was changed, "
        "removed or added outside the pipeline: find out who did, and restore the object "
        "from your backup (or the bucket's versioning); until then champion cannot move "
        "through the pipeline (a move would append to it)"
    )


def _str_or_none(d: dict[str, Any], key: str) -> bool:
    return d.get(key) is None or isinstance(d.get(key), str)


def _parse(uri: str, raw: bytes, model: str, seq: int) -> tuple[LedgerEntry, str, str | None]:
    """The entry in ``raw`` (the object at ``uri``), its digest and its predecessor's."""
    try:
        env = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _refuse(uri, f"not JSON ({exc})") from None
    if not isinstance(env, dict) or env.get("ledger") != FORMAT:
        raise _refuse(uri, f"not a ledger entry of format {FORMAT}")
    body, digest, prev = env.get("entry"), env.get("sha256"), env.get("prev_sha256")
    if (
        not isinstance(body, dict)
        or not isinstance(digest, str)
        or not _str_or_none(env, "prev_sha256")
    ):
        raise _refuse(uri, "no entry, sha256 or prev_sha256 of the right type")
    actual = _digest(body, prev)
    if actual != digest:
        raise _refuse(uri, f"its content has sha256 {actual}, not the {digest} written with it")
    fields = set(LedgerEntry.__dataclass_fields__)
    if set(body) != fields:
        raise _refuse(uri, f"fields {sorted(set(body) ^ fields)} differ from an entry's")
    ok = (
        isinstance(body["seq"], int)
        and not isinstance(body["seq"], bool)
        and isinstance(body["model"], str)
        and _str_or_none(body, "from_version")
        and isinstance(body["to_version"], str)
        and body["action"] in {a.value for a in Action}
        and isinstance(body["who"], str)
        and isinstance(body["why"], str)
        and (body["decision"] is None or isinstance(body["decision"], dict))
        and isinstance(body["at"], str)
        and _str_or_none(body, "run_key")
        and isinstance(body["healthy"], bool)
    )
    if not ok:
        raise _refuse(uri, "a field has the wrong type or value")
    if body["seq"] != seq:
        raise _refuse(uri, f"it says seq {body['seq']} but is stored as entry {seq}")
    if body["model"] != model:
        raise _refuse(uri, f"it is an entry of model {body['model']!r}, not {model!r}")
    try:
        datetime.fromisoformat(body["at"])
    except ValueError:
        raise _refuse(uri, f"its time {body['at']!r} is not ISO 8601") from None
    return LedgerEntry(**body), digest, prev


def _listing(model: str) -> list[tuple[int, str]]:
    """(seq, uri) of every entry object, by seq; refuses an object that is not one."""
    prefix = storage.join(folder(model), "entries")
    out = []
    for uri in storage.list_uris(prefix + "/"):
        name = uri.rsplit("/", 1)[-1]
        m = _ENTRY_NAME.match(name)
        if m is None or not uri.endswith(f"/entries/{name}"):
            raise _refuse(uri, "its name is not an entry's (8 digits .json, directly in entries/)")
        out.append((int(m.group(1)), uri))
    return sorted(out)


def _read(model: str, seq: int, uri: str) -> tuple[LedgerEntry, str, str | None]:
    try:
        raw = storage.read_bytes(uri)
    except storage.IntegrityError as exc:
        raise _refuse(uri, str(exc)) from None
    return _parse(uri, raw, model, seq)


# -- reading ----------------------------------------------------------------------------------


def entries(model: str) -> list[LedgerEntry]:
    """Every entry of ``model``'s ledger, oldest first, each verified (see the module)."""
    out: list[LedgerEntry] = []
    prev: str | None = None
    for i, (seq, uri) in enumerate(_listing(model), 1):
        if seq != i:
            raise _refuse(uri, f"it is entry {seq} but entry {i} is missing before it")
        entry, digest, said_prev = _read(model, seq, uri)
        if said_prev != prev:
            raise _refuse(
                uri,
                f"it follows an entry with sha256 {said_prev}, but entry {seq - 1} has {prev}",
            )
        out.append(entry)
        prev = digest
    return out


def _newest(model: str) -> tuple[LedgerEntry, str] | None:
    listing = _listing(model)
    if not listing:
        return None
    seq, uri = listing[-1]
    if seq != len(listing):
        raise _refuse(uri, f"it is entry {seq} but the ledger holds {len(listing)} entries")
    entry, digest, _ = _read(model, seq, uri)
    return entry, digest


def newest(model: str) -> LedgerEntry | None:
    """The newest entry (verified on its own), or None when the ledger is empty."""
    found = _newest(model)
    return found[0] if found else None


def decision_of(entry: LedgerEntry) -> dict[str, Any] | None:
    """The entry's decision record; one stored beside it is read and checked by its digest."""
    d = entry.decision
    if not d or DECISION_REF not in d:
        return d
    ref = d[DECISION_REF]
    raw = storage.read_bytes(ref["uri"])
    if storage.sha256_bytes(raw) != ref["sha256"]:
        raise LedgerError(
            f"decision record {ref['uri']} of ledger entry {entry.seq} ({entry.model}) has "
            f"sha256 {storage.sha256_bytes(raw)}, not the {ref['sha256']} the entry names"
        )
    out: dict[str, Any] = json.loads(raw)
    return out


# -- writing ----------------------------------------------------------------------------------


def _stored_decision(model: str, decision: dict[str, Any] | None) -> dict[str, Any] | None:
    """Inline when small; else written beside (content-addressed) and named by digest + URI."""
    if decision is None:
        return None
    data = _canonical(decision)
    if len(data) <= INLINE_DECISION_BYTES:
        parsed: dict[str, Any] = json.loads(data)
        return parsed
    digest = storage.sha256_bytes(data)
    uri = storage.join(folder(model), "decisions", f"{digest}.json")
    storage.write_bytes(uri, data)
    return {
        DECISION_REF: {"uri": uri, "sha256": digest, "bytes": len(data)},
        **{
            k: decision[k]
            for k in ("kind", "verdict", "reason")
            if isinstance(decision.get(k), str)
        },
    }


def append(
    model: str,
    *,
    from_version: str | None,
    to_version: str,
    action: Action | str,
    who: str,
    why: str,
    decision: dict[str, Any] | None = None,
    run_key: str | None = None,
    healthy: bool = True,
    at: str | None = None,
) -> LedgerEntry:
    """Append one entry (write-once, next seq) and return it; a retry returns the first."""
    action = Action(action)
    to_version = str(to_version)
    from_version = None if from_version is None else str(from_version)
    stored = _stored_decision(model, decision)
    for _ in range(_APPEND_ATTEMPTS):
        found = _newest(model)
        last, prev = found if found else (None, None)
        if last is not None and run_key is not None:
            if (last.run_key, last.to_version) == (run_key, to_version):
                return last  # the same move, retried
        body = LedgerEntry(
            seq=(last.seq if last else 0) + 1,
            model=model,
            from_version=from_version,
            to_version=to_version,
            action=action.value,
            who=who or "unknown",
            why=why or "",
            decision=stored,
            at=at or datetime.now(UTC).isoformat(timespec="seconds"),
            run_key=run_key,
            healthy=bool(healthy),
        ).to_json()
        envelope = {"ledger": FORMAT, "entry": body, "prev_sha256": prev}
        envelope["sha256"] = _digest(body, prev)
        uri = entry_uri(model, body["seq"])
        try:
            storage.write_bytes(uri, json.dumps(envelope, indent=1, sort_keys=True).encode())
        except storage.ObjectExistsError:
            continue  # another writer took this seq: read again, take the next
        return LedgerEntry(**body)
    raise RuntimeError(  # contention, not corruption: a retry of the task may succeed
        f"could not append to the ledger of {model} at {folder(model)}: its newest sequence "
        f"number was taken {_APPEND_ATTEMPTS} times in a row by other writers; retry the task"
    )


def record_move(model: str, from_version: str | None, to_version: str, move: Move) -> LedgerEntry:
    """``append`` with what a ``Move`` says (the registry's compare-and-set calls this)."""
    return append(
        model,
        from_version=from_version,
        to_version=to_version,
        action=move.action,
        who=move.who,
        why=move.why,
        decision=move.decision,
        run_key=move.run_key,
        healthy=move.healthy,
    )


# -- health -----------------------------------------------------------------------------------


def pick_healthy(
    model: str,
    *,
    exclude_version: str | None = None,
    champion: str | None = None,
    unhealthy: Callable[[str], bool] | None = None,
) -> Pick:
    """The newest entry whose ``to_version`` is healthy (see the module), other than
    ``exclude_version`` and ``champion``. With ``champion`` given (the registry's), a ledger
    whose newest entry names another version is not used: the champion moved without it."""
    es = entries(model)
    if not es:
        return Pick(None, f"the ledger of {model} has no entries")
    if champion is not None and es[-1].to_version != str(champion):
        return Pick(
            None,
            f"the ledger of {model} ends with champion v{es[-1].to_version} (entry "
            f"{es[-1].seq}), but the registry's champion is v{champion}: it was moved outside "
            "the pipeline, so the ledger cannot say which version before it was healthy",
        )
    start = len(es) - 1
    while start > 0 and es[start].from_version == es[start - 1].to_version:
        start -= 1
    tail = es[start:]
    skip = {str(v) for v in (exclude_version, champion) if v is not None}
    for i in range(len(tail) - 1, -1, -1):
        e = tail[i]
        v = e.to_version
        if v in skip or not e.healthy:
            continue
        if any(later.action in ROLLBACKS and later.from_version == v for later in tail[i + 1 :]):
            continue  # rolled back from, later
        if unhealthy is not None and unhealthy(v):
            continue
        return Pick(e, f"ledger entry {e.seq} ({e.action} at {e.at}): v{v} was champion, healthy")
    where = f"entries {tail[0].seq}-{tail[-1].seq}" if len(tail) > 1 else f"entry {tail[0].seq}"
    cut = f" (entry {tail[0].seq} follows a move made outside the pipeline)" if start else ""
    return Pick(None, f"no other healthy version in the ledger of {model}, {where}{cut}")


def last_healthy(model: str, exclude_version: str | None = None) -> LedgerEntry | None:
    """The newest entry of ``model`` whose version was healthy (not later rolled back from),
    other than ``exclude_version``; None when there is none."""
    return pick_healthy(model, exclude_version=exclude_version).entry


# -- python -m pipeline history ---------------------------------------------------------------


def format_table(rows: list[LedgerEntry]) -> str:
    """seq, at, action, from -> to, who, why: one line per entry, oldest first."""
    head = ("seq", "at", "action", "from -> to", "who", "why")
    lines = [
        (
            str(e.seq),
            e.at,
            e.action,
            f"{'v' + e.from_version if e.from_version else '-'} -> v{e.to_version}",
            e.who,
            " ".join(e.why.split())[:100],
        )
        for e in rows
    ]
    widths = [max(len(r[i]) for r in [head, *lines]) for i in range(len(head) - 1)]
    out = []
    for r in [head, *lines]:
        out.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    return "\n".join(line.rstrip() for line in out)


def cmd_history(args: argparse.Namespace) -> int:
    """``python -m pipeline history --model NAME [--json]``."""
    from pipeline.spec import active

    model = active().name
    rows = entries(model)
    if args.json:
        print(json.dumps([e.to_json() for e in rows], indent=2))
    elif not rows:
        print(f"the ledger of {model} has no entries yet ({folder(model)})")
    else:
        print(format_table(rows))
    return 0
