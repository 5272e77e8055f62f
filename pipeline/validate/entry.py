"""The entry points: validate a frame, a Parquet object or an open table source.

``pipeline.ingest`` (storage) is imported inside the functions that read, so importing the
package reads nothing and loads no storage backend.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import pandas as pd

from pipeline.contract import DataContract
from pipeline.validate.checks import ContractCheck, contract_checks
from pipeline.validate.leakage import Reference, reference_from_frame, reference_from_uri
from pipeline.validate.report import (
    NO_LEAKAGE,
    NO_TIME_COLUMN_NOTE,
    READABLE,
    SET_PREVIEW,
    ExpectationResult,
    ValidationReport,
    display_name,
    leak_text,
    with_changes,
)
from pipeline.validate.scan import Scan
from pipeline.validate.suite import run_gx

if TYPE_CHECKING:
    from pipeline.ingest import TableSource

SAMPLE_ROWS = 20_000
# Generated expectations GX re-runs on the sample, at most. Their verdicts are the exact
# counts; GX only cross-checks them, at ~10 ms of fixed cost per expectation whatever the
# rows — 15 s on a 200-column contract. Beyond this many, every failing one and each kind
# (expectation x column type) on its first columns, in turn, are cross-checked (see
# :func:`gx_cross_checks`); user expectations always run (GX is their verdict).
GX_CROSS_CHECKS = 256
# What pyarrow raises on bytes that are not (valid) Parquet: ArrowInvalid is a ValueError,
# a failed page checksum or a short read an OSError. A storage service that does not answer
# is not among them: botocore's timeouts are OSErrors too, so each caught error is asked
# first (:func:`_raise_if_transient`) and a transient one propagates, never a report.
_READ_ERRORS = (OSError, ValueError, EOFError)


def validate_frame(
    df: pd.DataFrame,
    contract: DataContract,
    now: pd.Timestamp,
    *,
    sample_rows: int = SAMPLE_ROWS,
    seed: int = 0,
    reference: pd.DataFrame | None = None,
) -> ValidationReport:
    """Validate ``df`` against ``contract``; never raises on bad data, only reports it.

    ``reference``: the champion's training data (same contract), for the leakage check;
    a seeded sample of at most ``sample_rows`` of its rows is used."""
    from pipeline.ingest import TableSource

    source, untyped = TableSource.from_frame(df)
    ref = (
        None if reference is None else reference_from_frame(reference, contract, sample_rows, seed)
    )
    return validate_source(
        source, contract, now, sample_rows=sample_rows, seed=seed, untyped=untyped, reference=ref
    )


def validate_uri(
    uri: str,
    contract: DataContract,
    now: pd.Timestamp,
    *,
    sample_rows: int = SAMPLE_ROWS,
    seed: int = 0,
    reference_uri: str | None = None,
) -> ValidationReport:
    """Validate the Parquet object at ``uri``, streaming; an unreadable file is a report.

    Only the content is judged: a storage service that times out, drops the connection or
    answers 5xx raises :class:`pipeline.storage.TransientStorageError` (retry the task),
    and the batch is neither reported unreadable nor rejected.

    ``reference_uri``: the champion's training snapshot (Parquet, same contract); the
    leakage check compares each feature's AUC with its AUC on a seeded sample of at most
    ``sample_rows`` reference rows. ``None`` (no champion yet), or a reference that cannot
    be read (the report says so): the stricter no-reference rule applies."""
    from pipeline.ingest import open_source

    try:
        source = open_source(uri, dictionary_columns=contract.categorical_features)
    except _READ_ERRORS as exc:
        _raise_if_transient(exc)
        return _unreadable(exc, contract, now)
    ref = (
        None
        if reference_uri is None
        else reference_from_uri(reference_uri, contract, sample_rows, seed)
    )
    return validate_source(source, contract, now, sample_rows=sample_rows, seed=seed, reference=ref)


def validate_source(
    source: TableSource,
    contract: DataContract,
    now: pd.Timestamp,
    *,
    sample_rows: int = SAMPLE_ROWS,
    seed: int = 0,
    untyped: dict[str, str] | None = None,
    reference: Reference | None = None,
) -> ValidationReport:
    """Validate an open table source: the exact pass, then GX on the sample."""
    now = _utc(now)
    checks = contract_checks(contract, now)
    try:
        scan = Scan(source, contract, now, untyped or {}, sample_rows, seed, reference)
        scan.run()
    except _READ_ERRORS as exc:  # a corrupted page, a truncated row group
        _raise_if_transient(exc)
        return _unreadable(exc, contract, now, rows=source.num_rows)
    sample = scan.sample_frame()
    exact = scan.results(checks, sample)
    gx_checks, skipped = gx_cross_checks(checks, exact, contract)
    gx_results = run_gx(gx_checks, sample, now, contract.name)
    results = _merge(checks, exact, gx_results, len(sample), scan.sample_is_everything)
    order = {c.name: i for i, c in enumerate(contract.columns)}
    results.sort(
        key=lambda r: (
            -1 if r.column is None else order.get(r.column, len(order)),
            r.column or "",
            r.expectation,
            repr(r.expected),
        )
    )
    return ValidationReport(
        success=all(r.success for r in results),
        rows=scan.rows,
        results=results,
        extra_columns=[display_name(n) for n in scan.extra_columns],
        sample_rows=len(sample),
        notes=_notes(contract, results, reference)
        + (
            [
                f"Great Expectations cross-checked {sum(c.gx and c.exact for c in gx_checks)} "
                f"of {sum(c.gx and c.exact for c in checks)} generated expectations on the "
                "sample (every failing one, each kind on its first columns); the exact counts "
                "are the verdicts of all"
            ]
            if skipped
            else []
        ),
    )


def gx_cross_checks(
    checks: list[ContractCheck], exact: dict[int, ExpectationResult], contract: DataContract
) -> tuple[list[ContractCheck], int]:
    """``checks`` with the generated expectations GX cross-checks limited to
    ``GX_CROSS_CHECKS`` (the others get ``gx=False``), and how many were left out. Kept, in
    this order: every one whose exact verdict failed (a rejection carries GX's view), then
    round-robin over the kinds (expectation, column type): each kind's first column, then
    each kind's second, ... so every kind is cross-checked on as many columns as fit."""
    generated = [i for i, c in enumerate(checks) if c.gx and c.exact]
    if len(generated) <= GX_CROSS_CHECKS:
        return checks, 0
    types = {c.name: c.type for c in contract.columns}
    seen: dict[tuple[str, str], int] = {}
    rank: dict[int, int] = {}
    for i in generated:
        kind = (checks[i].expectation, types.get(checks[i].column or "", ""))
        rank[i] = seen.get(kind, 0)
        seen[kind] = rank[i] + 1
    failed = [i for i in generated if i in exact and not exact[i].success]
    order = failed + sorted(
        (i for i in generated if i not in set(failed)), key=lambda i: (rank[i], i)
    )
    keep = set(order[:GX_CROSS_CHECKS])
    out = [
        c if not (c.gx and c.exact) or i in keep else replace(c, gx=False)
        for i, c in enumerate(checks)
    ]
    return out, len(generated) - len(keep)


def _merge(
    checks: list[ContractCheck],
    exact: dict[int, ExpectationResult],
    gx_results: dict[int, ExpectationResult],
    sample_rows: int,
    full: bool,
) -> list[ExpectationResult]:
    """One result per check, in check order: the exact verdict (with GX's view of the
    sample) for a generated check, GX's verdict for a user expectation."""
    results: list[ExpectationResult] = []
    for i, check in enumerate(checks):
        gx_res = gx_results.get(i)
        if check.exact:
            r = exact[i]
            if gx_res is not None:
                r = with_changes(r, observed={**r.observed, "gx_sample_success": gx_res.success})
            results.append(r)
        elif gx_res is not None:
            observed = gx_res.observed if full else {**gx_res.observed, "sample_rows": sample_rows}
            results.append(
                with_changes(gx_res, source="gx" if full else "gx-sample", observed=observed)
            )
    return results


def _notes(
    contract: DataContract, results: list[ExpectationResult], reference: Reference | None
) -> list[str]:
    """What a reviewer should know beyond pass/fail: skipped checks and near misses."""
    notes = []
    if contract.time_column is None:
        notes.append(NO_TIME_COLUMN_NOTE)
    leak = [r for r in results if r.expectation == NO_LEAKAGE and isinstance(r.observed, dict)]
    if reference is not None and reference.error is not None:
        notes.append(
            f"leakage reference not used ({reference.error}): features judged on the batch alone"
        )
    skipped = [r for r in leak if r.observed.get("too_few_rows")]
    if skipped:
        notes.append(
            f"leakage check skipped for {len(skipped)} features: {skipped[0].observed['skipped']}"
        )
    near = sorted(
        (r for r in leak if r.observed.get("near")),
        key=lambda r: -(r.observed.get("observed_value") or 0.0),
    )
    if near:
        shown = ", ".join(
            f"{display_name(r.column or '')} {leak_text(r.observed)}" for r in near[:SET_PREVIEW]
        )
        more = len(near) - SET_PREVIEW
        notes.append(
            "strong features, came close to the leakage bar (passed): "
            + shown
            + (f" and {more} more" if more > 0 else "")
        )
    return notes


def _raise_if_transient(exc: BaseException) -> None:
    """Re-raise a storage or network failure that reached a Parquet error handler as what
    it is (:class:`~pipeline.storage.TransientStorageError`): it says nothing of the bytes."""
    from pipeline import storage

    if storage.is_transient(exc):
        raise storage.TransientStorageError(
            f"reading the batch failed on the storage service, not on its content "
            f"({type(exc).__name__}: {exc}); the task is retried"
        ) from exc


def _unreadable(
    exc: BaseException, contract: DataContract, now: pd.Timestamp, rows: int = 0
) -> ValidationReport:
    message = f"batch is not readable as Parquet: {type(exc).__name__}: {exc}"
    result = ExpectationResult(READABLE, None, False, {"error": message}, {}, "exact")
    return ValidationReport(success=False, rows=rows, results=[result], error=message)


def _utc(now: pd.Timestamp) -> pd.Timestamp:
    now = pd.Timestamp(now)
    return now.tz_localize("UTC") if now.tzinfo is None else now.tz_convert("UTC")
