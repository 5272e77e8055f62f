"""Validation memory on S3: streaming ranged GETs against holding the whole object.

Data: a generic numeric batch (an int64 id, six float64 features, a small integer, a binary
label; ``--rows`` rows in row groups of 1M, about 57 bytes a row), on local disk and on
moto's S3 server (objects kept in memory).

Phases, each in its own subprocess so its peak RSS (the child's own
``getrusage(RUSAGE_SELF).ru_maxrss``) is its own:

- ``file``: :func:`pipeline.validate.validate_uri` on the ``file://`` copy (the baseline
  for what reading the batch costs at all);
- ``stream``: the same on the ``s3://`` object (footer, then column chunks by ranged GET);
- ``whole``: the object read whole first (``storage.read_bytes``, as validation did
  before), then the same validation on the bytes in memory.

Reported as ratios: ``rss_stream_over_file`` (near 1: streaming from S3 costs what a
local read costs), ``rss_whole_over_stream`` (what holding the object cost), and
``rss_growth_whole_over_object`` (the whole read's peak above the file baseline, in
object sizes: about 1 when the object is held once). Times are not
compared: moto reads its whole stored value for every ranged GET, so its time per request
grows with the object (real S3 does not).

    python -m benchmarks.s3_streaming [--rows 4000000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._targets import finish, target

FEATURES = 6
ROW_GROUP = 1_000_000
BUCKET = "bench"
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def bench_contract() -> Any:
    from pipeline.contract import Column, DataContract

    cols = [Column("row_id", "int", unique=True)]
    cols += [Column(f"x{i}", "float", min=-1.0, max=1.0) for i in range(FEATURES)]
    cols += [Column("bucket", "int", min=0, max=999), Column("label", "int", min=0, max=1)]
    return DataContract(
        name="bench_numeric",
        id_column="row_id",
        time_column=None,
        target="label",
        target_values=(0, 1),
        positive_label=1,
        columns=tuple(cols),
        max_rows=None,
    )


def write_batch(path: Path, rows: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = ["row_id", *(f"x{i}" for i in range(FEATURES)), "bucket", "label"]
    types = [pa.int64(), *([pa.float64()] * FEATURES), pa.int16(), pa.int8()]
    schema = pa.schema(list(zip(names, types, strict=True)))
    with pq.ParquetWriter(
        path, schema, compression="none", use_dictionary=["bucket", "label"]
    ) as writer:
        for start in range(0, rows, ROW_GROUP):
            n = min(ROW_GROUP, rows - start)
            rng = np.random.default_rng(start)
            x = rng.random((FEATURES, n)) * 2 - 1
            arrays = [
                pa.array(np.arange(start, start + n, dtype=np.int64)),
                *(pa.array(x[i]) for i in range(FEATURES)),
                pa.array(rng.integers(0, 1000, n, dtype=np.int16)),
                pa.array(rng.integers(0, 2, n, dtype=np.int8)),
            ]
            writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=schema))


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def phase(name: str, uri: str) -> dict[str, Any]:
    import pandas as pd

    from pipeline.validate import validate_uri

    now = pd.Timestamp("2026-06-01", tz="UTC")
    t = time.perf_counter()
    if name == "whole":
        import pyarrow as pa
        import pyarrow.parquet as pq

        from pipeline import storage
        from pipeline.ingest import TableSource
        from pipeline.validate import validate_source

        data = storage.read_bytes(uri)
        pf = pq.ParquetFile(pa.BufferReader(data), page_checksum_verification=True)
        report = validate_source(TableSource(parquet=pf), bench_contract(), now)
    else:
        report = validate_uri(uri, bench_contract(), now)
    return {
        "seconds": time.perf_counter() - t,
        "peak_rss_gb": _rss_gb(),
        "valid": report.success,
        "rows": report.rows,
    }


def _child(name: str, uri: str, env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.s3_streaming", "--phase", name, "--uri", uri],
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, **env, "PYTHONWARNINGS": "ignore"},
    )
    result = dict(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"[{name}] {json.dumps(result)}", flush=True)
    return result


def _moto(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "MOTO_S3_DEFAULT_KEY_BUFFER_SIZE": str(4 << 30)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc
        except OSError:
            if time.time() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                raise SystemExit("moto_server did not start") from None
            time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rows", type=int, default=4_000_000)
    p.add_argument("--phase", help=argparse.SUPPRESS)
    p.add_argument("--uri", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.phase:  # inside a child process
        print(json.dumps(phase(args.phase, args.uri)))
        return 0

    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    proc = _moto(port)
    try:
        with tempfile.TemporaryDirectory(prefix="bench_s3_streaming_") as tmp:
            path = Path(tmp) / "batch.parquet"
            write_batch(path, args.rows)
            client = boto3.client(
                "s3",
                endpoint_url=endpoint,
                aws_access_key_id="bench",
                aws_secret_access_key="bench",
                region_name="us-east-1",
            )
            client.create_bucket(Bucket=BUCKET)
            client.upload_file(str(path), BUCKET, "batch.parquet")
            env = {**S3_ENV, "PIPELINE_S3_ENDPOINT_URL": endpoint, "PIPELINE_HOME": tmp}
            s3_uri = f"s3://{BUCKET}/batch.parquet"
            local = _child("file", f"file://{path}", env)
            stream = _child("stream", s3_uri, env)
            whole = _child("whole", s3_uri, env)
            object_gb = path.stat().st_size / 1024**3
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    assert local["valid"] and stream["valid"] and whole["valid"]
    base = local["peak_rss_gb"]
    result = {
        "bench": "s3_streaming",
        "rows": args.rows,
        "object_gb": round(object_gb, 3),
        "rss_stream_over_file": round(stream["peak_rss_gb"] / base, 3),
        "rss_whole_over_stream": round(whole["peak_rss_gb"] / stream["peak_rss_gb"], 3),
        "rss_growth_whole_over_object": round((whole["peak_rss_gb"] - base) / object_gb, 2),
        "peak_rss_gb": {
            k: round(v["peak_rss_gb"], 3)
            for k, v in {"file": local, "stream": stream, "whole": whole}.items()
        },
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    # streaming from S3 costs about what a local read costs; the whole read holds the object
    targets = [target("rss_stream_over_file", result["rss_stream_over_file"], "<=", 1.25)]
    print(finish(result, targets))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
