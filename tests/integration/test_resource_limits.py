"""Memory and disk: validating a 10M-row batch under an address-space cap, on ``file://`` and
on ``s3://``; a real disk-full (and a file-size limit) during a snapshot and a checkpoint
write.

Each case runs in a child process (this file, run as a script) so that the limit is the
child's alone: ``prlimit --as`` for memory, a small tmpfs mounted in a private mount
namespace (``unshare --user --map-root-user --mount``: a real ENOSPC, no root needed where
user namespaces are allowed) or ``RLIMIT_FSIZE`` (EFBIG, with SIGXFSZ ignored) for disk.

The address-space cap counts reserved address space, not memory: pyarrow's bundled
mimalloc reserves a 1 GiB arena up front (VmPeak 2.0 GB for a 0.55 GB peak RSS), so a
process capped with ``--as`` sets ``MIMALLOC_ARENA_RESERVE`` (mimalloc's own option), as
a deployment that caps address space would. Peak RSS is reported either way.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.moto import moto_server

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ROWS = 10_000_000
ROW_GROUP = 1_000_000
FEATURES = 6
AS_LIMIT = 1_600_000_000
CHILD_ENV = {"MIMALLOC_ARENA_RESERVE": "64MiB", "PYTHONPATH": str(ROOT)}
FEATURE_LINES = "\n".join(
    f"  - {{name: x{i}, type: float, min: -1.0, max: 1.0}}" for i in range(FEATURES)
)
CONTRACT = f"""\
# A generic numeric batch (not the reference dataset): an id, six bounded features, a
# small integer and a binary label.
name: wide_numeric
id_column: row_id
target: {{name: label, values: [0, 1], positive: 1}}
row_count: {{min: 1000, max: 20000000}}
columns:
  - {{name: row_id, type: int, unique: true}}
{FEATURE_LINES}
  - {{name: bucket, type: int, min: 0, max: 999}}
  - {{name: label, type: int, min: 0, max: 1}}
"""


def _child(args: list[str], env: dict[str, str], prefix: list[str] | None = None) -> dict[str, Any]:
    """Run this file as a child (no PIPELINE_* settings but ``env``'s); its last stdout
    line is its JSON result."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    out = subprocess.run(
        [*(prefix or []), sys.executable, __file__, *args],
        env={**inherited, **CHILD_ENV, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


# ----------------------------------------------------------------------------- memory


def write_batch(path: Path, row_group: int) -> None:
    """10M rows in row groups of ``row_group`` rows, written group by group (a batch is
    held whole only when it is one group)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = ["row_id", *(f"x{i}" for i in range(FEATURES)), "bucket", "label"]
    types = [pa.int64(), *([pa.float64()] * FEATURES), pa.int16(), pa.int8()]
    schema = pa.schema(list(zip(names, types, strict=True)))
    with pq.ParquetWriter(
        path,
        schema,
        compression="none",
        use_dictionary=["bucket", "label"],
        write_page_checksum=True,
    ) as writer:
        for start in range(0, ROWS, row_group):
            rng = np.random.default_rng(start)
            x = rng.random((FEATURES, row_group)) * 2 - 1
            arrays = [
                pa.array(np.arange(start, start + row_group, dtype=np.int64)),
                *(pa.array(x[i]) for i in range(FEATURES)),
                pa.array(rng.integers(0, 1000, row_group, dtype=np.int16)),
                pa.array(rng.integers(0, 2, row_group, dtype=np.int8)),
            ]
            batch = pa.RecordBatch.from_arrays(arrays, schema=schema)
            writer.write_batch(batch, row_group_size=row_group)


@pytest.fixture(scope="module")
def big_batch(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The 10M-row batch with row groups of ``rows`` rows (made once per layout), and the
    contract."""
    folder = tmp_path_factory.mktemp("big")
    (folder / "contract.yaml").write_text(CONTRACT)
    made: dict[int, Path] = {}

    def make(rows: int) -> tuple[Path, Path]:
        if rows not in made:
            path = folder / f"batch-{rows}.parquet"
            started = time.perf_counter()
            write_batch(path, rows)
            print(
                f"\n[10M-row batch, row groups of {rows}] {path.stat().st_size / 1e6:.0f} MB "
                f"written in {time.perf_counter() - started:.1f} s"
            )
            made[rows] = path
        return made[rows], folder / "contract.yaml"

    return make


@pytest.fixture(scope="module")
def moto_big() -> Any:
    """moto's server, keeping objects in memory (a ranged GET slices the value instead of
    spooling the whole object from a temporary file)."""
    with moto_server({"MOTO_S3_DEFAULT_KEY_BUFFER_SIZE": str(4 << 30)}) as port:
        yield f"http://127.0.0.1:{port}"


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_DEFAULT_REGION": "us-east-1",
}
_measured: dict[str, dict[str, Any]] = {}


@pytest.mark.parametrize(
    ("where", "row_group"),
    [("file", ROW_GROUP), ("s3", ROW_GROUP), ("file", ROWS)],
    ids=["file", "s3", "file-one-row-group"],
)
def test_validating_10m_rows_fits_under_an_address_space_cap(
    big_batch: Any, where: str, row_group: int, request: pytest.FixtureRequest
) -> None:
    """Row groups of 1M rows on a local file and on S3 (streamed), and one row group of
    10M rows (column chunks of 80 MB, read through a bounded buffer)."""
    batch, contract = big_batch(row_group)
    env = {"PIPELINE_HOME": str(batch.parent / "home")}
    if where == "file":
        uri = "file://" + str(batch)
    else:
        import boto3

        endpoint = request.getfixturevalue("moto_big")
        env.update(S3_ENV, PIPELINE_S3_ENDPOINT_URL=endpoint)
        client = boto3.client("s3", endpoint_url=endpoint, **_client_kwargs())
        client.create_bucket(Bucket="big")
        client.upload_file(str(batch), "big", "snapshots/big/data.parquet")
        uri = "s3://big/snapshots/big/data.parquet"
    started = time.perf_counter()
    result = _child(
        ["validate", uri, str(contract)], env, prefix=["prlimit", f"--as={AS_LIMIT}", "--"]
    )
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    result["object_mb"] = round(batch.stat().st_size / 1e6)
    _measured[request.node.callspec.id] = result
    print(
        f"\n[validate 10M rows, {request.node.callspec.id}, --as={AS_LIMIT}] {json.dumps(result)}"
    )
    assert result["success"], result["summary"]
    assert result["rows"] == ROWS
    if where == "s3" and "file" in _measured:
        # streamed: no more memory than reading the same batch from a local file (plus the
        # HTTP stack), far less than the object itself on top
        assert result["peak_rss_mb"] < _measured["file"]["peak_rss_mb"] + 200, _measured


def _client_kwargs() -> dict[str, str]:
    return {
        "aws_access_key_id": "test",
        "aws_secret_access_key": "test",
        "region_name": "us-east-1",
    }


def _validate_child(uri: str, contract_path: str) -> dict[str, Any]:
    import resource

    import pandas as pd

    from pipeline.contract import load_contract
    from pipeline.validate import validate_uri

    started = time.perf_counter()
    report = validate_uri(uri, load_contract(contract_path), pd.Timestamp("2026-06-01", tz="UTC"))
    status = dict(
        line.split(":", 1)
        for line in Path("/proc/self/status").read_text().splitlines()
        if ":" in line
    )
    return {
        "success": report.success,
        "rows": report.rows,
        "summary": report.summary()[:400],
        "validate_seconds": round(time.perf_counter() - started, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "vm_peak_mb": round(int(status["VmPeak"].split()[0]) / 1024),
    }


# ----------------------------------------------------------------------------- disk full

TMPFS_BYTES = 64 << 20


def _tmpfs_prefix(mount_point: Path) -> list[str]:
    return [
        "unshare",
        "--user",
        "--map-root-user",
        "--mount",
        "--",
        "sh",
        "-c",
        f'mount -t tmpfs -o size={TMPFS_BYTES} tmpfs "{mount_point}" && exec "$@"',
        "sh",
    ]


def _tmpfs_available(tmp_path: Path) -> bool:
    probe = tmp_path / "probe"
    probe.mkdir()
    if shutil.which("unshare") is None:
        return False
    ok = subprocess.run([*_tmpfs_prefix(probe), "true"], capture_output=True, timeout=30)
    return ok.returncode == 0


@pytest.fixture(params=["tmpfs", "fsize"])
def mechanism(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "tmpfs" and not _tmpfs_available(tmp_path):
        pytest.skip("no private tmpfs here (unshare --user --mount refused): fsize covers it")
    return str(request.param)


def _run_disk_full(mechanism: str, scenario: str, work: Path) -> dict[str, Any]:
    limited = work / "limited"
    limited.mkdir(parents=True)
    prefix = _tmpfs_prefix(limited) if mechanism == "tmpfs" else []
    env = {"PIPELINE_HOME": str(work / "home"), "OMP_NUM_THREADS": "1"}
    return _child(["disk-full", mechanism, scenario, str(work)], env, prefix=prefix)


def _no_temporaries(files: dict[str, str]) -> list[str]:
    return [f for f in files if f.endswith(".tmp") or ".tmp-" in f]


@pytest.mark.parametrize("scenario", ["data", "sidecar"])
def test_a_full_disk_during_a_snapshot_leaves_nothing_half_written(
    mechanism: str, scenario: str, tmp_path: Path
) -> None:
    """``data``: the batch does not fit. ``sidecar`` (tmpfs only): the batch fits to the
    page and its digest sidecar does not — once, the data was already linked in place."""
    if scenario == "sidecar" and mechanism != "tmpfs":
        pytest.skip("the file-size limit is per file: only a full disk stops the sidecar")
    r = _run_disk_full(mechanism, scenario, tmp_path)
    assert r["error_type"] == "StorageFullError", r
    message = r["error"]
    assert r["target_uri"] in message and "Free space" in message and "retry the task" in message
    assert r["after_failure"] == r["before"], "the failed write changed what is stored"
    assert _no_temporaries(r["after_failure"]) == []
    assert r["first_intact"]
    # once there is room, the same call succeeds
    assert r["target"] in r["after_retry"] and r["target"] + ".sha256" in r["after_retry"]
    assert r["retry_reads_back"]


def test_a_full_disk_during_a_checkpoint_write_leaves_nothing_half_written(
    mechanism: str, tmp_path: Path
) -> None:
    """``save_checkpoint`` (a local directory, renamed into place) and ``publish`` (object
    by object to storage, the signature last), each on a disk with room for the small
    checkpoint written before and not for the big one."""
    r = _run_disk_full(mechanism, "checkpoint", tmp_path)
    # save_checkpoint: a clear storage error naming the checkpoint; its temporary directory
    # is gone
    assert r["save_error_type"] == "StorageFullError", r
    assert "ck/b not written" in r["save_error"] and "Free space" in r["save_error"], r
    assert not any(f.startswith("ck/b/") for f in r["after_failure"])
    assert _no_temporaries(r["after_failure"]) == []
    # publish: a clear storage error, no partial object, no signature (so no checkpoint)
    assert r["publish_error_type"] == "StorageFullError", r
    assert "model.safetensors" in r["publish_error"] and "Free space" in r["publish_error"]
    published = {
        f: d for f, d in r["after_failure"].items() if f.startswith("storage/checkpoints/b/")
    }
    for name, digest in published.items():
        if not name.endswith(".sha256"):
            assert r["local_big"][name.rsplit("/", 1)[1]] == digest, name  # whole, or absent
    assert "storage/checkpoints/b/model.safetensors" not in published
    assert "storage/checkpoints/b/manifest.sig" not in published
    assert not r["partial_verifies"]
    # what was there before is intact; once there is room, publishing again succeeds
    assert r["before"] == {f: d for f, d in r["after_failure"].items() if f in r["before"]}
    assert r["first_intact"] and r["retry_intact"]


# ----------------------------------------------------------------------------- the child


class _Limit:
    """Room for ``n`` more bytes: a ballast file on the tmpfs, or RLIMIT_FSIZE."""

    def __init__(self, mechanism: str, folder: Path) -> None:
        self.mechanism, self.folder = mechanism, folder
        self.ballast = folder / "ballast"

    def room(self, n: int) -> None:
        import resource

        if self.mechanism == "fsize":
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG
            resource.setrlimit(
                resource.RLIMIT_FSIZE, (n, resource.getrlimit(resource.RLIMIT_FSIZE)[1])
            )
            return
        page = os.statvfs(self.folder).f_frsize
        want = -(-n // page) * page
        st = os.statvfs(self.folder)
        fd = os.open(self.ballast, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, st.f_bavail * st.f_frsize - want)
        finally:
            os.close(fd)
        st = os.statvfs(self.folder)
        assert st.f_bavail * st.f_frsize == want, (st.f_bavail * st.f_frsize, want)

    def lift(self) -> None:
        import resource

        if self.mechanism == "fsize":
            hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
            resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
        else:
            self.ballast.unlink()


def _files(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too), by relative path: its SHA-256."""
    from pipeline import storage

    return {
        str(p.relative_to(folder)): storage.sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "ballast"
    }


def _attempt(fn: Any) -> tuple[str | None, str]:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which asserts
        return type(exc).__name__, str(exc)
    return None, ""


def _snapshot_child(limit: _Limit, scenario: str, work: Path, limited: Path) -> dict[str, Any]:
    import numpy as np
    import pandas as pd

    from pipeline import ingest, storage

    def batch(rows: int, name: str) -> tuple[str, bytes]:
        rng = np.random.default_rng(rows)
        data = ingest.parquet_bytes(
            pd.DataFrame({"a": rng.random(rows), "b": rng.integers(0, 9, rows)})
        )
        (work / name).write_bytes(data)
        return storage.file_uri(work / name), data

    small_uri, small = batch(1_000, "small.parquet")
    big_uri, big = batch(300_000, "big.parquet")
    first, _ = ingest.snapshot(small_uri)
    target_uri = ingest.snapshot_uri_for(storage.sha256_bytes(big))
    before = _files(limited)
    limit.room(len(big) if scenario == "sidecar" else len(big) // 2)
    error_type, error = _attempt(lambda: ingest.snapshot(big_uri))
    after_failure = _files(limited)
    limit.lift()
    second, _ = ingest.snapshot(big_uri)
    return {
        "error_type": error_type,
        "error": error,
        "target_uri": target_uri,
        "target": str(storage.local_path(target_uri).relative_to(limited)),
        "before": before,
        "after_failure": after_failure,
        "after_retry": _files(limited),
        "first_intact": storage.read_bytes(first.uri) == small,
        "retry_reads_back": storage.read_bytes(second.uri) == big,
    }


def _checkpoint_child(limit: _Limit, work: Path, limited: Path) -> dict[str, Any]:
    from pipeline import checkpoint, storage
    from pipeline.contract import load_contract
    from pipeline.data.generate import WorldSpec, generate
    from pipeline.train.loop import TrainConfig, train
    from pipeline.train.model import MLP, ModelConfig

    df = generate(WorldSpec(rows=1500, seed=5))
    result = train(
        df,
        load_contract(ROOT / "models" / "card_fraud" / "contract.yaml"),
        TrainConfig(max_epochs=1),
    )
    f = result.features
    big = MLP(ModelConfig(f.width, len(f.classes), (1024, 1024), 0.1))  # ~4.4 MB of weights
    root = storage.file_uri(limited / "storage")

    def save(directory: Path, model: Any) -> None:
        checkpoint.save_checkpoint(directory, model, f, df.head(16), data_snapshot={}, training={})

    save(limited / "ck" / "a", result.model)
    checkpoint.publish(limited / "ck" / "a", f"{root}/checkpoints/a")
    local_big = work / "big-local"
    save(local_big, big)  # outside the limited folder, before the limit
    before = _files(limited)
    limit.room(1 << 20)
    save_error_type, save_error = _attempt(lambda: save(limited / "ck" / "b", big))
    publish_error_type, publish_error = _attempt(
        lambda: checkpoint.publish(local_big, f"{root}/checkpoints/b")
    )
    after_failure = _files(limited)
    partial = checkpoint.verify_checkpoint(
        checkpoint.fetch(f"{root}/checkpoints/b", work / "fetched-b")
    )
    limit.lift()
    checkpoint.publish(local_big, f"{root}/checkpoints/b")
    _, _, retried = checkpoint.load_for_inference(f"{root}/checkpoints/b")
    _, _, first = checkpoint.load_for_inference(f"{root}/checkpoints/a")
    return {
        "save_error_type": save_error_type,
        "save_error": save_error,
        "publish_error_type": publish_error_type,
        "publish_error": publish_error,
        "before": before,
        "after_failure": after_failure,
        "local_big": _files(local_big),
        "partial_verifies": partial.intact,
        "first_intact": checkpoint.verify_checkpoint(limited / "ck" / "a").intact and first.intact,
        "retry_intact": retried.intact,
    }


def _disk_full_child(mechanism: str, scenario: str, work: Path) -> dict[str, Any]:
    from pipeline import settings, storage

    limited = work / "limited"
    os.environ["PIPELINE_STORAGE_URI"] = storage.file_uri(limited / "storage")
    settings.get_settings.cache_clear()
    limit = _Limit(mechanism, limited)
    if scenario == "checkpoint":
        return _checkpoint_child(limit, work, limited)
    return _snapshot_child(limit, scenario, work, limited)


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    if command == "validate":
        out = _validate_child(*rest)
    elif command == "disk-full":
        out = _disk_full_child(rest[0], rest[1], Path(rest[2]))
    else:
        raise SystemExit(f"unknown command {command}")
    print(json.dumps(out))
