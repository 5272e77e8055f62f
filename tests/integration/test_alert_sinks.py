"""dags/alerting.send against real sinks: a local SMTP server (aiosmtpd) and a local HTTP
receiver standing in for a Slack-compatible webhook, both configured as Airflow
Connections through ``AIRFLOW_CONN_<ID>`` as a deployment would; a sink that is down or
missing never raises, and the alert is in the file either way."""

from __future__ import annotations

import json
import socket
import sys
import threading
from email import message_from_bytes, policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "dags"))  # as Airflow does

import alerting  # noqa: E402
from pipeline import alerts  # noqa: E402
from pipeline.alerts import AlertKind  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def smtp_server():
    from aiosmtpd.controller import Controller

    class Inbox:
        def __init__(self):
            self.messages: list[tuple[list[str], bytes]] = []

        async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's name
            self.messages.append((list(envelope.rcpt_tos), envelope.content))
            return "250 OK"

    inbox = Inbox()
    ctl = Controller(inbox, hostname="127.0.0.1", port=_free_port())
    ctl.start()
    try:
        yield SimpleNamespace(port=ctl.port, inbox=inbox)
    finally:
        ctl.stop()


@pytest.fixture
def webhook_receiver():
    got: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            got.append({"path": self.path, "body": json.loads(body)})
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(b"ok")  # what Slack answers

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{srv.server_port}", got=got)
    finally:
        srv.shutdown()
        srv.server_close()


def _spec(sinks, min_severity="warning"):
    """The fields of a model spec that ``send`` reads (``spec.alerts``)."""
    return SimpleNamespace(
        name="card_fraud",
        alerts=SimpleNamespace(sinks=sinks, min_severity=min_severity, suppress_minutes=60),
    )


def _alert(kind=AlertKind.CANARY_ROLLED_BACK, subject="v7"):
    return alerts.raise_alert(
        kind=kind,
        model="card_fraud",
        subject=subject,
        summary="v7 canary rolled back (error_rate): canary 0.5 vs threshold 0.05",
        value=0.5,
        threshold=0.05,
        links={"mlflow_version": "http://127.0.0.1:5000/#/models/card-fraud/versions/7"},
        suppress_minutes=60,
    )


def _connections(monkeypatch, smtp_port: int, hook_url: str) -> None:
    monkeypatch.setenv(
        "AIRFLOW_CONN_ONCALL_EMAIL",
        json.dumps(
            {
                "conn_type": "smtp",
                "host": "127.0.0.1",
                "port": smtp_port,
                "extra": {
                    "from_email": "airflow@example.com",
                    "to": "oncall@example.com,ml@example.com",
                    "disable_ssl": True,
                    "disable_tls": True,
                    "timeout": 5,
                    "retry_limit": 0,
                },
            }
        ),
    )
    # URI form, as a user would write it: the webhook URL is the password
    from urllib.parse import quote

    monkeypatch.setenv(
        "AIRFLOW_CONN_ONCALL_CHAT",
        f"slackwebhook://:{quote(hook_url + '/services/T0/B0/XYZ', safe='')}@",
    )


def test_alert_reaches_a_real_smtp_server_and_a_webhook(
    pipeline_home, monkeypatch, smtp_server, webhook_receiver
):
    _connections(monkeypatch, smtp_server.port, webhook_receiver.url)
    a = _alert()
    alerting.send(a, _spec(["oncall_email", "oncall_chat"]))

    (rcpts, raw), *_ = smtp_server.inbox.messages
    assert sorted(rcpts) == ["ml@example.com", "oncall@example.com"]
    msg = message_from_bytes(raw, policy=policy.default)
    assert "canary_rolled_back" in msg["Subject"] and "[WARNING]" in msg["Subject"]
    body = "".join(p.get_content() for p in msg.walk() if p.get_content_type() == "text/html")
    assert "docs/runbooks/canary_rolled_back.md" in body and "versions/7" in body

    (post,) = webhook_receiver.got
    assert post["path"] == "/services/T0/B0/XYZ"
    assert "canary_rolled_back" in post["body"]["text"]
    assert "threshold: 0.05" in post["body"]["text"]
    assert "docs/runbooks/canary_rolled_back.md" in post["body"]["text"]
    (cur,) = alerts.open_alerts()
    assert [d["ok"] for d in cur.deliveries] == [True, True]


def test_sinks_from_the_deployment_env_and_min_severity(
    pipeline_home, monkeypatch, smtp_server, webhook_receiver
):
    _connections(monkeypatch, smtp_server.port, webhook_receiver.url)
    monkeypatch.setenv("PIPELINE_ALERT_SINKS", "oncall_chat")
    info = _alert(kind=AlertKind.GATE_REJECTED, subject="v8")  # info < warning: file only
    alerting.send(info, _spec([]))
    assert webhook_receiver.got == [] and smtp_server.inbox.messages == []
    alerting.send(_alert(), _spec([]))  # spec names none: the deployment's sinks
    assert len(webhook_receiver.got) == 1 and smtp_server.inbox.messages == []
    alerting.send(None, _spec([]))  # a deduplicated alert: nothing to send
    assert len(webhook_receiver.got) == 1


def test_a_dead_or_missing_sink_does_not_raise_and_the_file_has_the_alert(
    pipeline_home, monkeypatch, webhook_receiver, caplog
):
    dead = _free_port()  # nothing listens there
    _connections(monkeypatch, dead, f"http://127.0.0.1:{_free_port()}")
    a = _alert()
    alerting.send(a, _spec(["oncall_email", "oncall_chat", "no_such_conn"]))  # must not raise
    (cur,) = alerts.open_alerts()
    assert cur.dedup_key == "card_fraud/canary_rolled_back/v7"
    assert [d["sink"] for d in cur.deliveries] == ["oncall_email", "oncall_chat", "no_such_conn"]
    assert not any(d["ok"] for d in cur.deliveries)
    assert "not delivered to sink 'oncall_email'" in caplog.text
    line = json.loads((pipeline_home / "alerts" / "alerts.jsonl").read_text().splitlines()[-1])
    assert line["runbook"] == "docs/runbooks/canary_rolled_back.md" and line["state"] == "open"
