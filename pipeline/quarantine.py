"""Where a batch may come from, where a rejected one goes, and the count of both.

* **Sources** — a batch is read only from its model's landing prefix or a source the spec
  lists (``landing.allowed_sources``); anything else is refused before it is read
  (``pipeline.uris.confine``: literal URIs, symlinks resolved, whole segments).
* **Quarantine** — ``quarantine/<model>/<sha>/``: the rejected bytes beside their report and
  a reason file, written once. A batch inside the landing prefix (the pipeline's own) is
  moved there; one from anywhere else is copied and left where it was.
* **Ledger** — ``ledger/<model>/accepted|rejected/<sha256>.json``: each batch counted once
  per content.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from pipeline import storage, uris
from pipeline.settings import get_settings
from pipeline.spec import ModelSpec, active

if TYPE_CHECKING:
    from pipeline.stages.records import Ingested


def write_once(uri: str, text: str) -> None:
    """Write unless the object exists: the first record stands, nothing is overwritten."""
    try:
        storage.write_text(uri, text)
    except storage.ObjectExistsError:
        pass


def landing_prefix_uri(spec: ModelSpec | None = None) -> str:
    return uris.landing_root(spec)


def under(uri: str, prefix: str) -> bool:
    """``uri`` inside the folder ``prefix``, by whole segments and after resolving symlinks
    (``pipeline.uris``: the same rules as the source check)."""
    return uris.within(uri, prefix)


def check_batch_source(uri: str, spec: ModelSpec | None = None) -> str:
    """A batch may be read only from the model's landing prefix or a source its spec lists
    (``landing.allowed_sources``); anything else is refused before it is read. Returns the
    canonical URI (symlinks resolved), the one to read. The rules: :func:`pipeline.uris.confine`."""
    return uris.batch_source(uri, spec)


def quarantine_root(snapshot_sha: str) -> str:
    """``quarantine/<model>/<sha>``: each model's rejections apart (one model's contract may
    accept what another's rejects)."""
    return storage.join(get_settings().storage_root, "quarantine", active().name, snapshot_sha[:24])


def index_uri(source_uri: str) -> str:
    """Where the quarantine remembers a source URI it took a batch from."""
    key = storage.sha256_bytes(source_uri.encode())[:24]
    return storage.join(
        get_settings().storage_root, "quarantine", active().name, "by-source", f"{key}.json"
    )


def rejected_before(source_uri: str) -> str | None:
    """The quarantine folder of a batch that was moved away from ``source_uri``, if any."""
    if storage.exists(source_uri) or not storage.exists(index_uri(source_uri)):
        return None
    return str(json.loads(storage.read_text(index_uri(source_uri)))["quarantine_uri"])


def quarantine(ingested: Ingested, report_text: str, html: str, summary: str) -> tuple[str, str]:
    """Put the rejected batch beside its report and a reason file; return (folder, how).

    A batch inside the model's landing prefix (the pipeline's own) is *moved* there — never
    deleted — so the next run does not pick it up again. A batch from anywhere else (an
    allowed source: a producer's own bucket or folder) is *copied* and left where it was:
    the pipeline never moves or deletes what it does not own.

    Keyed by the batch's content: a re-run of the same bytes lands in the same folder and
    the first rejection's reason and report stand (written once, never overwritten)."""
    root = quarantine_root(ingested.sha256)
    write_once(storage.join(root, "reason.txt"), summary + "\n")
    write_once(storage.join(root, "validation.json"), report_text)
    write_once(storage.join(root, "validation.html"), html)
    write_once(
        storage.join(root, "source.json"),
        json.dumps(
            {
                "source_uri": ingested.source_uri,
                "snapshot_uri": ingested.uri,
                "sha256": ingested.sha256,
            },
            indent=2,
        ),
    )
    src = ingested.source_uri
    write_once(index_uri(src), json.dumps({"quarantine_uri": root}))
    dest = storage.join(root, "batch.parquet")
    # Only the bytes that were validated are moved; a different file re-landed under the
    # same name stays where it is. Never a move onto itself.
    owned = under(src, landing_prefix_uri()) and storage.norm(src) != storage.norm(dest)
    if owned and storage.exists(src) and storage.digest_of(src) == ingested.sha256:
        storage.move(src, dest)
        return root, "moved"
    if owned and not storage.exists(src) and storage.exists(dest):
        return root, "moved"  # a retry of the task that moved it
    if not storage.exists(dest):  # from the immutable snapshot: the validated bytes
        storage.write_bytes(dest, storage.read_bytes(ingested.uri))
    return root, "copied"


def ledger(run_key: str, ingested: Ingested, verdict: str, summary: str) -> dict[str, int]:
    """Count the batch once per content (``ledger/accepted|rejected/<sha256>.json``, written
    once) and return the totals."""
    root = storage.join(get_settings().storage_root, "ledger", active().name)
    folder = "accepted" if verdict == "pass" else "rejected"
    entry = {
        "sha256": ingested.sha256,
        "source_uri": ingested.source_uri,
        "snapshot_uri": ingested.uri,
        "verdict": verdict,
        "first_run_key": run_key,
        "summary": summary[:2000],
    }
    write_once(
        storage.join(root, folder, f"{ingested.sha256}.json"),
        json.dumps(entry, indent=2, sort_keys=True),
    )
    return {k: len(storage.list_uris(storage.join(root, k))) for k in ("accepted", "rejected")}
