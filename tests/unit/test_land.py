"""`python -m pipeline data land`: the copy into the landing prefix, and the asset event
through Airflow's REST API — here against a local HTTP server that implements just the three
endpoints the contract needs (tests/stack/test_stack_assets.py proves it against Airflow)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import pytest

from pipeline import airflow_api, land, quarantine, stages, storage
from pipeline.data.generate import WorldSpec, generate, to_parquet_bytes
from pipeline.spec import get_spec, use_spec

ASSET_URI = "pipeline://models/card_fraud/batch"


@dataclass
class FakeAirflow:
    """/auth/token, /api/v2/assets and /api/v2/assets/events; ``script[path]`` is a list of
    statuses answered first (then the normal answer), ``seen`` every request received."""

    url: str = ""
    password: str = "s3cret"
    assets: list[dict[str, Any]] = field(
        default_factory=lambda: [
            {
                "id": 7,
                "name": "card_fraud_batch_v0",
                "uri": "pipeline://models/card_fraud/batch_v0",
            },
            {"id": 3, "name": "card_fraud_batch", "uri": ASSET_URI},
        ]
    )
    script: dict[str, list[int]] = field(default_factory=dict)
    seen: list[dict[str, Any]] = field(default_factory=list)

    def handle(
        self,
        method: str,
        path: str,
        query: dict[str, list[str]],
        headers: dict[str, str],
        body: Any,
    ) -> tuple[int, Any]:
        self.seen.append(
            {"method": method, "path": path, "query": query, "headers": headers, "body": body}
        )
        if self.script.get(path):
            return self.script[path].pop(0), {"detail": "scripted"}
        if path == "/auth/token" and method == "POST":
            if body != {"username": "admin", "password": self.password}:
                return 401, {"detail": "Invalid credentials"}
            return 201, {"access_token": "tok-123"}
        if headers.get("authorization") != "Bearer tok-123":
            return 401, {"detail": "Not authenticated"}
        if path == "/api/v2/assets" and method == "GET":
            pat = query.get("uri_pattern", [""])[0]
            found = [a for a in self.assets if pat in a["uri"]]
            return 200, {"assets": found, "total_entries": len(found)}
        if path == "/api/v2/assets/events" and method == "POST":
            if body["asset_id"] not in [a["id"] for a in self.assets]:
                return 404, {"detail": f"Asset with ID: `{body['asset_id']}` was not found"}
            return 200, {
                "id": 41,
                "asset_id": body["asset_id"],
                "extra": {**body["extra"], "from_rest_api": True},
                "timestamp": "2026-03-01T00:00:00Z",
                "created_dagruns": [],
            }
        return 404, {"detail": "Not Found"}

    def events(self) -> list[dict[str, Any]]:
        return [s for s in self.seen if s["path"] == "/api/v2/assets/events"]


@pytest.fixture
def fake_airflow(pipeline_home, monkeypatch) -> Iterator[FakeAirflow]:
    fake = FakeAirflow()

    class Handler(BaseHTTPRequestHandler):
        def _do(self) -> None:
            u = urlparse(self.path)
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n) if n else b""
            status, out = fake.handle(
                self.command,
                u.path,
                parse_qs(u.query),
                {k.lower(): v for k, v in self.headers.items()},
                json.loads(raw) if raw else None,
            )
            data = json.dumps(out).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _do  # noqa: N815

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    for k, v in {
        "PIPELINE_AIRFLOW_API_URL": fake.url,
        "PIPELINE_AIRFLOW_USERNAME": "admin",
        "PIPELINE_AIRFLOW_PASSWORD": fake.password,
    }.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("PIPELINE_AIRFLOW_TOKEN", raising=False)
    monkeypatch.setattr(airflow_api, "BACKOFF_S", 0.01)
    from pipeline.settings import get_settings

    get_settings.cache_clear()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        get_settings.cache_clear()


@pytest.fixture
def batch(tmp_path: Path) -> Path:
    p = tmp_path / "in" / "batch.parquet"
    p.parent.mkdir()
    p.write_bytes(to_parquet_bytes(generate(WorldSpec(rows=60, seed=3))))
    return p


def test_lands_under_the_landing_prefix_without_an_event(pipeline_home, batch):
    spec = get_spec("card_fraud")
    rec = land.land_batch(spec, batch, emit=False)
    prefix = quarantine.landing_prefix_uri(spec)
    assert rec["uri"].startswith(prefix + "/date=") and rec["uri"].endswith("-batch.parquet")
    assert rec["uri"].rsplit("/", 1)[1].startswith(rec["sha256"][:12])
    assert (rec["model"], rec["rows"], rec["event"]) == ("card_fraud", 60, None)
    assert storage.read_bytes(rec["uri"]) == batch.read_bytes()
    assert rec["sha256"] == storage.sha256_bytes(batch.read_bytes())
    assert quarantine.check_batch_source(rec["uri"], spec) == storage.norm(
        rec["uri"]
    )  # a run may read it


def test_relanding_is_idempotent_and_other_bytes_never_overwrite(pipeline_home, batch, tmp_path):
    spec = get_spec("card_fraud")
    first = land.land_batch(spec, batch, emit=False)
    again = land.land_batch(spec, batch.as_uri(), emit=False)  # file:// spelling, same key
    assert again == first
    listed = [
        unquote(u) for u in storage.list_uris(quarantine.landing_prefix_uri(spec))
    ]  # as_uri() quotes
    assert listed == [first["uri"]]

    other = tmp_path / "in" / "other.parquet"
    other.write_bytes(to_parquet_bytes(generate(WorldSpec(rows=61, seed=4))))
    named = land.land_batch(spec, batch, name="manual/b.parquet", emit=False)
    assert named["uri"] == quarantine.landing_prefix_uri(spec) + "/manual/b.parquet"
    with pytest.raises(land.LandingRejected, match="already exists with different content"):
        land.land_batch(spec, other, name="manual/b.parquet", emit=False)
    assert storage.read_bytes(named["uri"]) == batch.read_bytes()


def test_a_non_parquet_file_is_refused_and_nothing_lands(pipeline_home, tmp_path):
    spec = get_spec("card_fraud")
    bad = tmp_path / "batch.parquet"
    bad.write_text("id,amount\n1,2\n")
    with pytest.raises(land.LandingRejected, match="not a readable Parquet file"):
        land.land_batch(spec, bad, emit=False)
    assert storage.list_uris(quarantine.landing_prefix_uri(spec)) == []
    with pytest.raises(land.LandingRejected, match="cannot read"):
        land.land_batch(spec, tmp_path / "missing.parquet", emit=False)


@pytest.mark.parametrize("name", ["../escape.parquet", "/abs/x.parquet", "a/./b", "s3://other/x"])
def test_an_unsafe_name_is_refused(pipeline_home, batch, name):
    spec = get_spec("card_fraud")
    with pytest.raises(land.LandingRejected, match="--name"):
        land.land_batch(spec, batch, name=name, emit=False)
    assert storage.list_uris(storage.join(storage.norm(str(pipeline_home)), "storage")) == []


def test_the_event_carries_the_landed_uri(fake_airflow, batch):
    spec = get_spec("card_fraud")
    rec = land.land_batch(spec, batch)
    assert rec["event"] == {"asset_id": 3, "id": 41, "timestamp": "2026-03-01T00:00:00Z"}
    token, lookup, post = fake_airflow.seen
    assert (token["path"], token["body"]) == (
        "/auth/token",
        {"username": "admin", "password": "s3cret"},
    )
    assert lookup["query"]["uri_pattern"] == [ASSET_URI]  # the exact uri was picked, not batch_v0
    assert post["headers"]["authorization"] == "Bearer tok-123"
    assert post["body"] == {
        "asset_id": 3,
        "extra": {"batch_uri": rec["uri"], "model": "card_fraud", "sha256": rec["sha256"]},
    }
    assert quarantine.check_batch_source(
        post["body"]["extra"]["batch_uri"], spec
    )  # inside the prefix


def test_a_landed_local_batch_is_what_the_run_reads(pipeline_home, batch):
    """The event's batch_uri, through resolve_batch_uri and ingest_batch's own check, still
    names the landed file (``date=`` in the key: storage.norm must not percent-encode it)."""
    spec = get_spec("card_fraud")
    rec = land.land_batch(spec, batch, emit=False)
    with use_spec(spec):
        resolved = stages.resolve_batch_uri(
            "", [{"batch_uri": rec["uri"]}], "2026-03-01T00:00:00+00:00"
        )
        assert storage.exists(resolved), resolved
        assert storage.exists(quarantine.check_batch_source(resolved)), (
            resolved
        )  # ingest_batch's check


def test_a_token_from_settings_skips_the_login(fake_airflow, batch, monkeypatch):
    from pipeline.settings import get_settings

    monkeypatch.setenv("PIPELINE_AIRFLOW_TOKEN", "tok-123")
    get_settings.cache_clear()
    land.land_batch(get_spec("card_fraud"), batch)
    assert [s["path"] for s in fake_airflow.seen] == ["/api/v2/assets", "/api/v2/assets/events"]


def test_401_is_reported_as_a_credentials_error(fake_airflow, batch):
    fake_airflow.password = "rotated"
    with pytest.raises(land.AirflowAPIError) as exc:
        land.land_batch(get_spec("card_fraud"), batch)
    msg = str(exc.value)
    assert "HTTP 401" in msg and "credentials" in msg and f"{fake_airflow.url}/auth/token" in msg
    assert "s3cret" not in msg
    assert len(fake_airflow.seen) == 1  # a 4xx is not retried
    assert storage.list_uris(
        quarantine.landing_prefix_uri(get_spec("card_fraud"))
    )  # the copy stays


def test_503_then_success_is_retried(fake_airflow, batch):
    fake_airflow.script["/api/v2/assets/events"] = [503]
    rec = land.land_batch(get_spec("card_fraud"), batch)
    assert rec["event"]["id"] == 41
    assert [e["body"]["extra"]["batch_uri"] for e in fake_airflow.events()] == [rec["uri"]] * 2


def test_5xx_on_every_try_gives_up_after_three(fake_airflow, batch):
    fake_airflow.script["/api/v2/assets"] = [502, 502, 502]
    with pytest.raises(land.AirflowAPIError, match=r"/api/v2/assets\?.*HTTP 502"):
        land.land_batch(get_spec("card_fraud"), batch)
    assert len([s for s in fake_airflow.seen if s["path"] == "/api/v2/assets"]) == 3
    assert fake_airflow.events() == []


def test_a_missing_asset_names_the_dag(fake_airflow, batch):
    fake_airflow.assets = [a for a in fake_airflow.assets if a["uri"] != ASSET_URI]
    with pytest.raises(
        land.AirflowAPIError, match="is the DAG retrain_card_fraud for model 'card_fraud' parsed"
    ):
        land.land_batch(get_spec("card_fraud"), batch)
    assert fake_airflow.events() == []


def test_unreachable_airflow_fails_after_three_tries_naming_the_url(
    pipeline_home, batch, monkeypatch
):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(airflow_api, "BACKOFF_S", 0.01)
    monkeypatch.setenv("PIPELINE_AIRFLOW_TOKEN", "t")
    from pipeline.settings import get_settings

    get_settings.cache_clear()
    with pytest.raises(
        land.AirflowAPIError, match=rf"127.0.0.1:{port}/api/v2/assets.*after 3 tries"
    ):
        land.land_batch(get_spec("card_fraud"), batch, airflow_url=f"http://127.0.0.1:{port}/")


def test_cli_prints_the_record(fake_airflow, batch, capsys):
    from pipeline.cli import main

    assert main(["data", "land", "--model", "card_fraud", "--file", str(batch)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["event"]["id"] == 41 and out["uri"].startswith(
        quarantine.landing_prefix_uri(get_spec("card_fraud"))
    )
    fake_airflow.password = "wrong"
    assert main(["data", "land", "--model", "card_fraud", "--file", str(batch)]) == 2
    assert "HTTP 401" in capsys.readouterr().err


def test_a_trusted_set_goes_to_the_spec_location_once(pipeline_home, tmp_path):
    """``data land --as-eval``: the spec's evaluation location, never overwritten."""
    import io
    import subprocess
    import sys

    import pandas as pd

    from pipeline.settings import get_settings

    spec = get_spec("card_fraud")
    first, other = tmp_path / "eval.parquet", tmp_path / "eval2.parquet"
    for path, n in ((first, 3), (other, 4)):
        buf = io.BytesIO()
        pd.DataFrame({"x": range(n)}).to_parquet(buf)
        path.write_bytes(buf.getvalue())
    rec = land.land_eval(spec, first)
    assert rec["uri"] == get_settings().resolve(spec.eval_location) and rec["rows"] == 3
    assert land.land_eval(spec, first)["sha256"] == rec["sha256"]  # same bytes: a no-op
    with pytest.raises(land.LandingRejected, match="never overwritten"):
        land.land_eval(spec, other)
    assert storage.read_bytes(rec["uri"]) == first.read_bytes()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "data",
            "land",
            "--model",
            "card_fraud",
            "--file",
            str(first),
            "--as-eval",
        ],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "PIPELINE_HOME": str(pipeline_home)},
        timeout=120,
    )
    assert out.returncode == 0 and json.loads(out.stdout)["uri"] == rec["uri"], out.stderr
