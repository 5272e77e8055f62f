"""The Retraining view's on-call part: SLOs (pipeline.slo), open alerts (pipeline.alerts) and
the promotion ledger (pipeline.ledger), read from a real MLflow store, a real alerts file and
real ledger objects — and everything they carry escaped."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pipeline.names import RunTag, Task

ROOT = Path(__file__).resolve().parents[2]
PLUGINS_DIR = ROOT / "plugins"
if str(PLUGINS_DIR) not in sys.path:  # as Airflow does for the plugins folder
    sys.path.append(str(PLUGINS_DIR))

HOSTILE = '<script>alert("x")</script>'


@pytest.fixture(scope="module")
def view():
    import retraining_view

    return retraining_view


@pytest.fixture
def spec(pipeline_home, mlflow_store, monkeypatch, view):
    """card_fraud active on an empty store; no scoring service (a closed port); no cache."""
    from pipeline import settings
    from pipeline.spec import active

    monkeypatch.setenv("PIPELINE_SERVING_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("PIPELINE_MLFLOW_UI_URL", "http://ui")
    settings.get_settings.cache_clear()
    view._slo_cache.clear()
    yield active()
    view._slo_cache.clear()


def _run(spec, run_id: str, verdicts: dict[Task, str]) -> str:
    """A run as ingest_batch creates it, verdicts written by the stages' own function."""
    from pipeline import registry, stages

    ctx = stages.RunContext(spec.retrain_dag_id, run_id)
    rid = registry.get_or_create_run(
        ctx.run_key, {RunTag.DAG_ID: ctx.dag_id, RunTag.RUN_ID: ctx.run_id, RunTag.MODEL: spec.name}
    )
    for stage, verdict in {Task.INGEST_BATCH: "ok", **verdicts}.items():
        stages.context.write_stage(rid, stage, verdict, verdict, {"stage": stage})
    registry.end_run(rid)
    return rid


def _page(view, monkeypatch):
    monkeypatch.setattr(view, "airflow_runs", lambda dag_id, limit: [])  # the Airflow DB
    page = view.collect(5, "/af")
    return page, view.render_page(page, airflow_base="/af")


def test_page_shows_slos_open_alerts_and_the_ledger_escaped(view, spec, monkeypatch):
    from pipeline import alerts, ledger

    _run(spec, "manual__ok", {Task.DECIDE_RETRAIN: "train", Task.TRAIN_MODEL: "trained"})
    _run(spec, f"manual__{HOSTILE}", {Task.DECIDE_RETRAIN: "train", Task.TRAIN_MODEL: "diverged"})
    sent = alerts.raise_alert(
        kind=alerts.AlertKind.TRAINING_DIVERGED,
        model=spec.name,
        subject="ab12cd",
        summary=f"gradient norm 1e9 > 1000x the lowest {HOSTILE}",
        value=1e9,
        threshold=1000,
        links={"mlflow_run": "javascript:alert(1)", "airflow_task": "http://af/dags/x/runs/y"},
    )
    assert sent is not None
    alerts.raise_alert(
        kind=alerts.AlertKind.GATE_REJECTED, model="digits", subject="4", summary="not ours"
    )
    for i in range(12):
        ledger.append(
            spec.name,
            from_version=str(i) if i else None,
            to_version=str(i + 1),
            action="promote" if i % 3 else "rollback",
            who="retrain_card_fraud/manual",
            why=f"move {i + 1} <img src=x onerror=alert(1)>",
            healthy=i % 3 != 0,
        )

    page, html = _page(view, monkeypatch)
    card = page.model(spec.name)
    oc = card.oncall
    assert oc is not None and not (oc.slo_problem or oc.alerts_problem or oc.ledger_problem)
    # SLOs: the diverged run burns the training budget; nothing served: no data, shown as such
    statuses = {r.name: r.status.value for r in oc.slo.rows}
    assert statuses["training_success"] == "burning"
    assert statuses["serving_error_rate"] == statuses["champion_freshness"] == "no_data"
    assert 'data-slo="training_success" data-status="burning"' in html
    assert 'data-slo="serving_latency_p99" data-status="no_data"' in html
    assert f"python -m pipeline slo --model {spec.name}" in html
    # the open alert of this model only, with its runbook; the digits one is in its own section
    assert [a["dedup_key"] for a in oc.alerts] == [sent.dedup_key]
    assert [a["kind"] for a in page.model("digits").oncall.alerts] == ["gate_rejected"]
    assert f"<code>{sent.runbook}</code>" in html
    assert 'href="http://af/dags/x/runs/y"' in html
    # a javascript: link is text, never an href
    assert 'href="javascript:' not in html and "mlflow_run: javascript:alert(1)" in html
    # the ledger: the last 10, newest first
    assert [e["seq"] for e in oc.ledger] == list(range(12, 2, -1))
    assert 'data-seq="12"' in html and 'data-seq="2"' not in html
    # nothing from a tag, an alert or a ledger entry reaches the page unescaped
    assert "<script>" not in html and "<img" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html  # alert + run id
    assert "&lt;img src=x onerror=alert(1)&gt;" in html


def test_unreadable_alerts_and_ledger_are_problem_lines_not_a_failed_page(
    view, spec, monkeypatch, pipeline_home
):
    """The alert file and the ledger are state on disk: when they cannot be read, a line
    says what failed; the SLOs and the rest of the page are still shown."""
    from pipeline import ledger

    (pipeline_home / "alerts").mkdir(exist_ok=True)
    (pipeline_home / "alerts" / "alerts.jsonl").mkdir()  # a folder where the file should be

    def damaged(model: str) -> list:
        raise ledger.LedgerError(f"ledger of {model}: entry 3 does not chain")

    monkeypatch.setattr(ledger, "entries", damaged)
    page, html = _page(view, monkeypatch)
    oc = page.model(spec.name).oncall
    assert oc.alerts_problem.startswith("Alerts: IsADirectoryError") and oc.alerts == []
    assert "entry 3 does not chain" in oc.ledger_problem and oc.ledger == []
    assert oc.slo is not None and "Alerts: IsADirectoryError" in html
    assert "Who serves" in html and 'data-slo="training_success"' in html


def test_an_empty_model_says_no_alerts_no_moves(view, spec, monkeypatch):
    _, html = _page(view, monkeypatch)
    assert "No open alerts." in html and "No champion moves recorded." in html
    assert html.count('data-status="no_data"') == 2 * 5  # two models, five SLOs each


def test_slo_reports_are_reused_within_their_ttl(view, spec):
    t = [100.0]
    first = view.cached_slo(spec, clock=lambda: t[0])
    t[0] += view.SLO_CACHE_SECONDS - 1
    assert view.cached_slo(spec, clock=lambda: t[0]) is first
    t[0] += 2
    assert view.cached_slo(spec, clock=lambda: t[0]) is not first


@pytest.mark.parametrize(
    ("url", "safe"),
    [
        ("http://af/x", "http://af/x"),
        ("https://mlflow/#/runs/1", "https://mlflow/#/runs/1"),
        ("/dags/x", "/dags/x"),
        ("//evil.example/x", ""),
        ("javascript:alert(1)", ""),
        (" JavaScript:alert(1)", ""),
        ("data:text/html,x", ""),
        ("http:/x", ""),
        (None, ""),
    ],
)
def test_safe_url(view, url, safe):
    assert view.safe_url(url) == safe
