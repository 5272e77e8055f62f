"""Training states mirrored to object storage: a retry on another host resumes from them.

"Host A" and "host B" are two local state directories (two workers' PIPELINE_HOME) over one
storage root: a local folder (``file://``) or a real S3 API (moto's server on loopback).
Remote files are hostile input: a tampered state is refused and training starts over.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import torch

from pipeline import storage
from pipeline.data.generate import WorldSpec, generate
from pipeline.train import state as train_state
from pipeline.train.loop import TrainConfig, iter_train, train
from pipeline.train.state import MANIFEST, STATE, TENSORS, TrainingStateStore
from tests.integration.moto import free_port, moto_server, use_s3

CFG = TrainConfig(
    max_epochs=4, seed=3, state_every=7, check_every=5, snapshot_every=6, batch_size=256
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def df():
    return generate(WorldSpec(rows=4000, seed=21))


@pytest.fixture(scope="module")
def uninterrupted(df, contract, tmp_path_factory):
    return train(df, contract, CFG, state_dir=tmp_path_factory.mktemp("uninterrupted"))


@pytest.fixture(scope="module")
def s3_endpoint():
    with moto_server() as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(params=["file", "s3"])
def remote(request, pipeline_home, tmp_path, monkeypatch) -> str:
    """``<storage root>/train-state/<run key>`` on a local folder or on a fresh S3 bucket."""
    if request.param == "file":
        return storage.file_uri(tmp_path / "shared-storage" / "train-state" / "run-1")
    import boto3

    endpoint = request.getfixturevalue("s3_endpoint")
    use_s3(monkeypatch, endpoint)
    bucket = f"b{time.time_ns()}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    return f"s3://{bucket}/storage/train-state/run-1"


def interrupted_on_host_a(df, contract, host_a: Path, remote: str, epochs: int = 2) -> None:
    """Train ``epochs`` of CFG's four on host A, then stop as a killed worker would (its
    local states stay on host A's disk)."""
    run = iter_train(df, contract, CFG, state_dir=host_a, state_remote=remote)
    for _ in range(epochs):
        next(run)
    run.close()


def remote_names(remote: str) -> list[str]:
    return sorted(train_state.RemoteStates(remote)._listing())


def test_a_state_written_on_host_a_resumes_on_host_b_exactly(
    df, contract, uninterrupted, remote, tmp_path, caplog
):
    host_a, host_b = tmp_path / "host-a" / "train-state", tmp_path / "host-b" / "train-state"
    interrupted_on_host_a(df, contract, host_a, remote)
    local = sorted(p.name for p in host_a.iterdir() if p.name.startswith("step-"))
    assert remote_names(remote) == local and len(local) == 2  # the last two, as locally
    for name in local:  # every remote state is complete: the three files
        assert set(train_state.RemoteStates(remote)._listing()[name]) == {
            TENSORS,
            STATE,
            MANIFEST,
        }
    step = int(local[-1].split("-")[1])
    assert 0 < step < uninterrupted.steps

    with caplog.at_level(logging.INFO, logger="pipeline.train.state"):
        again = train(df, contract, CFG, state_dir=host_b, state_remote=remote)
    assert again.resumed_from is not None and again.resumed_from["step"] == step
    assert f"downloaded from {storage.join(remote, local[-1])}" in caplog.text
    assert again.steps == uninterrupted.steps
    assert again.stop_reason == uninterrupted.stop_reason
    for k, v in uninterrupted.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k]), k
    # host B's states went to the remote too: the final one is the newest there
    assert remote_names(remote)[-1] == f"step-{again.steps:012d}-final"

    train_state.clear_remote(remote)  # what the training stage does once it has published
    assert storage.list_uris(remote + "/") == []


def test_a_newer_remote_state_wins_over_an_older_local_one(
    df, contract, uninterrupted, remote, tmp_path
):
    """Host A trained one epoch and died; host B went on to three epochs and died; the
    retry lands on host A again: it resumes from host B's state, not its own older one."""
    host_a, host_b = tmp_path / "a", tmp_path / "b"
    interrupted_on_host_a(df, contract, host_a, remote, epochs=1)
    own = max(int(p.name.split("-")[1]) for p in host_a.glob("step-*"))
    interrupted_on_host_a(df, contract, host_b, remote, epochs=3)
    newest = int(remote_names(remote)[-1].split("-")[1])
    assert newest > own
    again = train(df, contract, CFG, state_dir=host_a, state_remote=remote)
    assert again.resumed_from["step"] == newest
    assert again.steps == uninterrupted.steps
    for k, v in uninterrupted.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k]), k


def _put(uri: str, data: bytes, *, keep_digest: bool) -> None:
    """Replace an object behind the pipeline's back (what a hostile writer could do):
    ``keep_digest`` also rewrites its recorded SHA-256 to match the new bytes, else the old
    one stays recorded."""
    if uri.startswith("s3://"):
        import boto3

        from pipeline.settings import get_settings

        bucket, key = uri[5:].split("/", 1)
        meta = {"sha256": storage.sha256_bytes(data) if keep_digest else storage.digest_of(uri)}
        boto3.client("s3", endpoint_url=get_settings().s3_endpoint_url).put_object(
            Bucket=bucket, Key=key, Body=data, Metadata=meta
        )
        return
    path = storage.local_path(uri)
    path.write_bytes(data)
    side = path.with_name(path.name + storage.SIDECAR)
    if keep_digest:
        side.write_text(storage.sha256_bytes(data))


def _tamper(remote: str, name: str, how: str) -> str:
    """Damage the remote state ``name``; returns what the refusal must say."""
    at = storage.join(remote, name)
    manifest = json.loads(storage.read_bytes(storage.join(at, MANIFEST)))
    if how == "tensor-bytes":  # consistent storage digest, but not the manifest's
        data = bytearray(storage.read_bytes(storage.join(at, TENSORS)))
        data[-1] ^= 0xFF
        _put(storage.join(at, TENSORS), bytes(data), keep_digest=True)
        return "does not match its manifest"
    if how == "manifest-digest":
        manifest["files"][TENSORS]["sha256"] = "0" * 64
        _put(storage.join(at, MANIFEST), json.dumps(manifest).encode(), keep_digest=True)
        return "does not match its manifest"
    if how == "manifest-format":
        manifest["format"] = "something-else/9"
        _put(storage.join(at, MANIFEST), json.dumps(manifest).encode(), keep_digest=True)
        return "has format 'something-else/9'"
    if how == "manifest-understates-size":  # the download stops at the declared size
        manifest["files"][TENSORS]["size"] = 100
        _put(storage.join(at, MANIFEST), json.dumps(manifest).encode(), keep_digest=True)
        return "more than the 100 expected"
    if how == "manifest-fingerprint":  # another run's fingerprint over this state
        manifest["fingerprint"] = "f" * 64
        _put(storage.join(at, MANIFEST), json.dumps(manifest).encode(), keep_digest=True)
        return "its manifest says ffffffffffff"
    if how == "manifest-unrecorded-edit":  # bytes changed, the recorded digest not
        manifest["step"] = 1
        _put(storage.join(at, MANIFEST), json.dumps(manifest).encode(), keep_digest=False)
        return "does not match recorded"
    raise AssertionError(how)


TAMPERING = [  # (backend, how): every kind on a local folder, the byte-level ones on S3 too
    *(
        ("file", how)
        for how in (
            "tensor-bytes",
            "manifest-digest",
            "manifest-format",
            "manifest-understates-size",
            "manifest-fingerprint",
            "manifest-unrecorded-edit",
        )
    ),
    ("s3", "tensor-bytes"),
    ("s3", "manifest-understates-size"),
    ("s3", "manifest-unrecorded-edit"),
]


@pytest.mark.parametrize(("remote", "how"), TAMPERING, indirect=["remote"])
def test_a_tampered_remote_state_is_refused_and_training_starts_over(
    df, contract, uninterrupted, remote, tmp_path, caplog, how
):
    host_a, host_b = tmp_path / "a", tmp_path / "b"
    interrupted_on_host_a(df, contract, host_a, remote)
    for name in remote_names(remote):  # both kept states: nothing usable is left
        expected = _tamper(remote, name, how)
    with caplog.at_level(logging.WARNING, logger="pipeline.train.state"):
        again = train(df, contract, CFG, state_dir=host_b, state_remote=remote)
    assert again.resumed_from is None
    refusals = [r.getMessage() for r in caplog.records if "is not usable" in r.getMessage()]
    assert len(refusals) == 2 and all(expected in m for m in refusals), refusals
    assert "training starts over" in caplog.text
    assert not list(host_b.glob(".tmp-*"))  # nothing half-downloaded is left
    # starting over gives the uninterrupted run's weights all the same
    assert again.steps == uninterrupted.steps
    for k, v in uninterrupted.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k]), k


def test_an_upload_failure_does_not_stop_training(df, contract, uninterrupted, tmp_path, caplog):
    """Object storage refusing every write (here: a path under a regular file): each state
    is logged as not uploaded, the local copy is kept, training finishes as usual."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    remote = storage.file_uri(blocker / "train-state" / "run-1")
    with caplog.at_level(logging.WARNING, logger="pipeline.train.state"):
        r = train(df, contract, CFG, state_dir=tmp_path / "b", state_remote=remote)
    assert r.steps == uninterrupted.steps
    assert "not uploaded to" in caplog.text and "the local copy is kept" in caplog.text
    assert any(p.name.endswith("-final") for p in (tmp_path / "b").iterdir())


def test_a_remote_state_of_the_same_step_is_replaced(tmp_path):
    """A state saved again at a step the remote already has (an attempt that started over
    after its remote states were refused) replaces it instead of failing the upload."""
    remote = storage.file_uri(tmp_path / "remote")
    store = TrainingStateStore(tmp_path / "a", remote=remote)
    t = {"w": torch.zeros(3)}
    fp = "a" * 64
    store.save(5, t, {"fingerprint": fp, "epoch_seconds": 1.0})
    store.save(5, t, {"fingerprint": fp, "epoch_seconds": 2.0})
    back = TrainingStateStore(tmp_path / "b", remote=remote).load_latest()
    assert back is not None and back.state["epoch_seconds"] == 2.0
    assert back.origin == storage.join(remote, "step-000000000005")


def test_storage_away_fails_the_resume_instead_of_starting_over(
    df, contract, pipeline_home, tmp_path, monkeypatch
):
    """An S3 endpoint that does not answer is a transient failure: the training fails (its
    task is retried) rather than starting over and then pruning the remote states it is
    behind."""
    from pipeline.settings import get_settings

    nobody = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    use_s3(monkeypatch, nobody, PIPELINE_S3_CONNECT_TIMEOUT_S="1")
    try:
        with pytest.raises(storage.TransientStorageError):
            train(df, contract, CFG, state_dir=tmp_path / "a", state_remote="s3://b/train-state/r")
        assert not (tmp_path / "a").exists() or not any((tmp_path / "a").glob("step-*"))
    finally:
        get_settings.cache_clear()
