"""Validation + drift at scale: our streaming statistics against Evidently's DataDriftPreset.

Data: a synthetic contract of 32 columns (string id, event time, binary label, 17
numeric and 12 categorical features), generated with numpy straight into Parquet row
groups (page checksums on): a 1M-row reference, a 1M-row current batch with known
drifted columns (numeric f00-f03, categorical c00-c01; f04/f05 move a little, below the
thresholds), and a 10M-row current batch from the same world written row group by row
group, never held in memory. ``bench_contract`` / ``write_parquet`` take the feature names,
so ``benchmarks.wide_data`` builds its 200-feature world from the same generator.

Phases, each in its own subprocess so its peak RSS (the child's own
``getrusage(RUSAGE_SELF).ru_maxrss``) is its own:

- ``ours_1m``: contract validation (:func:`pipeline.validate.validate_uri`: exact
  streaming pass + GX on a 20k-row sample) and the drift decision
  (:func:`pipeline.drift.detect_drift_uris`, no HTML) on the 1M batch vs the reference;
- ``evidently_1m``: Evidently's DataDriftPreset on the full 1M frames (methods and
  thresholds by its defaults, same column typing), computing, not rendering;
- ``ours_10m``: the same as ``ours_1m`` on the 10M batch.

Timings exclude imports and, for Evidently, reading the Parquet files into pandas (ours
include reading Parquet). ``seconds_*`` are wall-clock; ``cpu_seconds_*`` are the process's
CPU time (all threads), which a busy shared machine inflates less. ``speedup_vs_evidently``
is Evidently's drift time over our validation *and* drift time (``speedup_drift_only``:
over our drift time alone). ``verdict_agreement`` is the share of the 30 compared columns
(29 features + label) whose drift verdict is the same as Evidently's. The machine is
shared: the numbers are what was measured, on whatever else was running. Targets:
``speedup_vs_evidently`` >= 20, ``verdict_agreement`` >= 0.99, the planted drift found.

    python -m benchmarks.validation_drift [--rows 1000000] [--big-rows 10000000] [--skip-10m]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._targets import finish, target

NUMERIC = [f"f{i:02d}" for i in range(17)]
CATEGORICAL = [f"c{i:02d}" for i in range(12)]
DRIFTED = {"f00", "f01", "f02", "f03", "c00", "c01"}
NOW = "2026-06-01T00:00:00Z"
ROW_GROUP = 500_000
EVIDENTLY_NAMES = {
    "Wasserstein distance (normed)": "wasserstein",
    "Jensen-Shannon distance": "jensenshannon",
    "K-S p_value": "ks",
    "chi-square p_value": "chisquare",
    "Z-test p_value": "z",
    "PSI": "psi",
}


def bench_contract(
    numeric: Sequence[str] = tuple(NUMERIC), categorical: Sequence[str] = tuple(CATEGORICAL)
) -> Any:
    """The synthetic contract; ``numeric`` / ``categorical`` name its feature columns (the
    wide benchmark, ``benchmarks.wide_data``, asks for 200)."""
    from pipeline.contract import Column, ColumnType, DataContract

    cols = [
        Column("id", "string", unique=True),
        Column("ts", "timestamp"),
        Column("label", "int", min=0, max=1),
    ]
    for i, name in enumerate(numeric):
        kind: ColumnType = "int" if i % 4 == 3 else "float"
        cols.append(Column(name, kind, min=-1e9, max=1e9, nullable=True, max_null_fraction=0.05))
    for i, name in enumerate(categorical):
        cols.append(Column(name, "category", categories=tuple(f"v{j}" for j in range(3 + i))))
    return DataContract(
        name="bench",
        id_column="id",
        time_column="ts",
        target="label",
        target_values=(0, 1),
        positive_label=1,
        columns=tuple(cols),
        min_rows=1,
        max_rows=20_000_000,
    )


def _chunk(
    rows: int,
    start: int,
    seed: int,
    drift: bool,
    numeric: Sequence[str] = tuple(NUMERIC),
    categorical: Sequence[str] = tuple(CATEGORICAL),
) -> Any:
    """One Arrow record batch of the synthetic world (ids ``start``..``start+rows-1``)."""
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng([seed, start])
    arrays: dict[str, Any] = {}
    digits = (
        np.arange(start, start + rows, dtype=np.int64)[:, None]
        // 10 ** np.arange(11, -1, -1, dtype=np.int64)
    ) % 10
    data = np.concatenate([np.full((rows, 1), ord("r")), digits + ord("0")], axis=1).astype(
        np.uint8
    )
    offsets = np.arange(0, 13 * (rows + 1), 13, dtype=np.int32)
    arrays["id"] = pa.StringArray.from_buffers(
        rows, pa.py_buffer(offsets), pa.py_buffer(data.tobytes())
    )
    t0 = 1_767_225_600_000_000  # 2026-01-01 in µs
    arrays["ts"] = pa.array(
        t0 + rng.integers(0, 86_400_000_000 * 30, rows), pa.timestamp("us", tz="UTC")
    )
    shift = (
        {"f00": 0.5, "f01": 0.3, "f02": 0.25, "f03": 0.6, "f04": 0.03, "f05": 0.05} if drift else {}
    )
    for i, name in enumerate(numeric):
        s = shift.get(name, 0.0)
        kind = i % 4
        if kind == 0:
            x = rng.normal(10 * i + s, 1.0, rows)
        elif kind == 1:
            x = rng.lognormal(1.0 + s, 0.8, rows)
        elif kind == 2:
            x = rng.gamma(2.0, 3.0 * (1 + s), rows)
        else:
            x = rng.poisson(4.0 * (1 + s), rows).astype(np.float64)
        missing = rng.random(rows) < 0.01 if i % 5 == 1 else None  # a few missing values
        arrays[name] = pa.array(x.astype(np.int64) if kind == 3 else x, mask=missing)
    for i, name in enumerate(categorical):
        k = 3 + i
        p = np.linspace(1.0, 2.0, k)
        if drift and name in DRIFTED:
            p = p[::-1] ** 2
        codes = rng.choice(k, rows, p=p / p.sum()).astype(np.int32)
        arrays[name] = pa.DictionaryArray.from_arrays(
            pa.array(codes), pa.array([f"v{j}" for j in range(k)])
        )
    f0 = arrays["f00"].to_numpy(zero_copy_only=False)
    logit = 0.8 * (f0 - f0.mean()) - 2.5 + rng.normal(0, 1, rows)
    arrays["label"] = pa.array((logit > 0).astype(np.int64))
    order = ["id", "ts", "label", *numeric, *categorical]
    return pa.RecordBatch.from_arrays([arrays[c] for c in order], names=order)


def write_parquet(
    path: Path,
    rows: int,
    seed: int,
    drift: bool,
    numeric: Sequence[str] = tuple(NUMERIC),
    categorical: Sequence[str] = tuple(CATEGORICAL),
) -> None:
    import pyarrow.parquet as pq

    writer = None
    for start in range(0, rows, ROW_GROUP):
        batch = _chunk(min(ROW_GROUP, rows - start), start, seed, drift, numeric, categorical)
        if writer is None:
            writer = pq.ParquetWriter(str(path), batch.schema, write_page_checksum=True)
        writer.write_batch(batch, row_group_size=ROW_GROUP)
    assert writer is not None
    writer.close()


# ----------------------------------------------------------------------------- phases


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def phase_generate(folder: Path, rows: int, big_rows: int) -> dict[str, Any]:
    t = time.perf_counter()
    write_parquet(folder / "reference.parquet", rows, seed=1, drift=False)
    write_parquet(folder / "current.parquet", rows, seed=2, drift=True)
    if big_rows:
        write_parquet(folder / "current_big.parquet", big_rows, seed=3, drift=True)
    return {"seconds": time.perf_counter() - t, "peak_rss_gb": _rss_gb()}


def phase_ours(
    folder: Path, current: str, contract: Any = None, stats_folder: Path | None = None
) -> dict[str, Any]:
    """Validation + the drift decision on ``folder/current`` against
    ``folder/reference.parquet``, or (``stats_folder``) against the reference statistics
    cached there (``pipeline.reference_stats`` files, verified and decoded inside the timing):
    then only the batch is read."""
    import great_expectations  # noqa: F401 - imports are not what we time
    import pandas as pd
    import scipy.stats  # noqa: F401

    from pipeline import reference_stats, storage
    from pipeline.drift import detect_drift_uris
    from pipeline.validate import validate_uri

    contract = contract or bench_contract()
    now = pd.Timestamp(NOW)
    t, cpu = time.perf_counter(), time.process_time()
    report = validate_uri(str(folder / current), contract, now)
    t_validate = time.perf_counter() - t
    reference: Any = str(folder / "reference.parquet")
    if stats_folder is not None:
        digest = storage.sha256_bytes((stats_folder / reference_stats.STATS_FILE).read_bytes())
        reference = reference_stats.decode(
            lambda name: (stats_folder / name).read_bytes(), contract, expected_sha256=digest
        )
        reference.source_uri = str(folder / "reference.parquet")  # the rare exact fallbacks
    drift, _ = detect_drift_uris(reference, str(folder / current), contract, html=False)
    seconds = time.perf_counter() - t
    return {
        "seconds": seconds,
        "validate_seconds": t_validate,
        "drift_seconds": seconds - t_validate,
        "cpu_seconds": time.process_time() - cpu,
        "peak_rss_gb": _rss_gb(),
        "valid": report.success,
        "rows": report.rows,
        "validation_summary": report.summary()[:300],
        "drift_summary": drift.summary()[:400],
        "verdicts": {c.column: c.drifted for c in drift.columns},
        "methods": {c.column: c.method for c in drift.columns},
        "inexact_scores": sum(not c.exact for c in drift.columns),
        "reference_columns_read": list(getattr(reference, "reads", [])),
    }


def phase_evidently(folder: Path) -> dict[str, Any]:
    import evidently  # noqa: F401
    import pandas as pd

    from pipeline.drift import evidently_verdicts

    contract = bench_contract()
    reference = pd.read_parquet(folder / "reference.parquet")
    current = pd.read_parquet(folder / "current.parquet")
    t, cpu = time.perf_counter(), time.process_time()
    verdicts, _ = evidently_verdicts(reference, current, contract)
    seconds = time.perf_counter() - t
    return {
        "seconds": seconds,
        "cpu_seconds": time.process_time() - cpu,
        "peak_rss_gb": _rss_gb(),
        "verdicts": {k: v.drifted for k, v in verdicts.items()},
        "methods": {k: v.method for k, v in verdicts.items()},
    }


def phase_html(folder: Path) -> dict[str, Any]:
    import evidently  # noqa: F401

    from pipeline.drift import detect_drift_uris

    t = time.perf_counter()
    _, page = detect_drift_uris(
        str(folder / "reference.parquet"),
        str(folder / "current.parquet"),
        bench_contract(),
        html=True,
    )
    return {"seconds": time.perf_counter() - t, "peak_rss_gb": _rss_gb(), "html_bytes": len(page)}


def _child(phase: str, folder: Path, *args: str) -> dict[str, Any]:
    out = folder / f"{phase}.json"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.validation_drift",
        "--phase",
        phase,
        "--folder",
        str(folder),
        *args,
    ]
    subprocess.run(
        cmd,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    result = json.loads(out.read_text())
    print(
        f"[{phase}] "
        + json.dumps({k: v for k, v in result.items() if k not in ("verdicts", "methods")}),
        flush=True,
    )
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--big-rows", type=int, default=10_000_000)
    p.add_argument("--skip-10m", action="store_true")
    p.add_argument("--phase", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.phase:  # inside a child process
        folder = Path(args.folder)
        if args.phase == "generate":
            result = phase_generate(folder, args.rows, 0 if args.skip_10m else args.big_rows)
        elif args.phase == "ours_1m":
            result = phase_ours(folder, "current.parquet")
        elif args.phase == "ours_10m":
            result = phase_ours(folder, "current_big.parquet")
        elif args.phase == "evidently_1m":
            result = phase_evidently(folder)
        elif args.phase == "html_1m":
            result = phase_html(folder)
        else:
            raise SystemExit(f"unknown phase {args.phase}")
        (folder / f"{args.phase}.json").write_text(json.dumps(result))
        return 0

    with tempfile.TemporaryDirectory(prefix="bench_validation_drift_") as tmp:
        folder = Path(tmp)
        sizes = ["--rows", str(args.rows), "--big-rows", str(args.big_rows)]
        _child("generate", folder, *sizes, *(["--skip-10m"] if args.skip_10m else []))
        ours = _child("ours_1m", folder)
        theirs = _child("evidently_1m", folder)
        html = _child("html_1m", folder)
        big = None if args.skip_10m else _child("ours_10m", folder)

    columns = sorted(theirs["verdicts"])
    agree = sum(ours["verdicts"][c] == theirs["verdicts"][c] for c in columns) / len(columns)
    found = {c for c, d in ours["verdicts"].items() if d}
    same_methods = all(
        ours["methods"][c] == EVIDENTLY_NAMES.get(theirs["methods"][c]) for c in columns
    )
    print(
        f"drifted (ours): {sorted(found)}; planted: {sorted(DRIFTED)}; "
        f"same methods as Evidently: {same_methods}; "
        f"Evidently HTML on 20k-row samples: {html['seconds']:.2f}s"
    )
    result = {
        "bench": "validation_drift",
        "rows_1m": args.rows,
        "seconds_1m": round(ours["seconds"], 3),
        "validate_seconds_1m": round(ours["validate_seconds"], 3),
        "drift_seconds_1m": round(ours["drift_seconds"], 3),
        "evidently_seconds_1m": round(theirs["seconds"], 3),
        "speedup_vs_evidently": round(theirs["seconds"] / ours["seconds"], 2),
        "speedup_drift_only": round(theirs["seconds"] / ours["drift_seconds"], 2),
        "verdict_agreement": round(agree, 4),
        "planted_drift_found": found == DRIFTED,
        "peak_rss_gb_1m": round(ours["peak_rss_gb"], 3),
        "evidently_peak_rss_gb_1m": round(theirs["peak_rss_gb"], 3),
        "rows_10m": None if big is None else args.big_rows,
        "seconds_10m": None if big is None else round(big["seconds"], 3),
        "peak_rss_gb_10m": None if big is None else round(big["peak_rss_gb"], 3),
        "cpu_seconds_1m": round(ours["cpu_seconds"], 3),
        "evidently_cpu_seconds_1m": round(theirs["cpu_seconds"], 3),
        "cpu_seconds_10m": None if big is None else round(big["cpu_seconds"], 3),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    targets = [
        target("speedup_vs_evidently", result["speedup_vs_evidently"], ">=", 20),
        target("verdict_agreement", result["verdict_agreement"], ">=", 0.99),
        target("planted_drift_found", result["planted_drift_found"], "==", True),
    ]
    print(finish(result, targets))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
