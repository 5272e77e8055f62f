"""The trigger form's Params, enforced by a real API server: a bad conf is refused, naming the field.

The same schema drives the UI form (``test_browser.py`` submits it through Chromium); here the
public REST API is called directly, as a script or another system would.
"""

from __future__ import annotations

import urllib.parse

import pytest
from ui_stack import DAG_ID, Stack, shared_stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TRIGGER_DAGS = [DAG_ID, "rollback_card_fraud", "retrain_digits", "rollback_digits"]


@pytest.fixture(scope="module")
def stack(request, tmp_path_factory) -> Stack:
    return shared_stack(request, tmp_path_factory)


@pytest.fixture(scope="module")
def token(stack) -> str:
    return stack.token()


def _params(stack: Stack, token: str, dag_id: str) -> dict:
    status, body = stack.api("GET", f"/api/v2/dags/{dag_id}/details", token=token)
    assert status == 200, f"{dag_id}: every spec's DAGs must be served ({status}: {body})"
    return body["params"]


@pytest.mark.parametrize("dag_id", TRIGGER_DAGS)
def test_every_param_is_typed_titled_described_and_bounded(stack, token, dag_id):
    params = _params(stack, token, dag_id)
    assert params, f"{dag_id} has no Params: its trigger form would be a raw JSON box"
    problems = []
    for name, p in params.items():
        schema = p.get("schema", {})
        types = schema.get("type")
        types = set(types if isinstance(types, list) else [types])
        if not schema.get("title"):
            problems.append(f"{name}: no title")
        if not p.get("description") and not schema.get("description"):
            problems.append(f"{name}: no description")
        if types <= {None}:
            problems.append(f"{name}: no type")
        bounded = (
            "enum" in schema
            or types & {"boolean"}
            or (
                types & {"integer", "number"}
                and {"minimum", "exclusiveMinimum"} & schema.keys()
                and {"maximum", "exclusiveMaximum"} & schema.keys()
            )
            or (types & {"string"} and {"maxLength", "pattern", "format"} & schema.keys())
            or (types & {"array"} and "maxItems" in schema and "items" in schema)
        )
        if not bounded:
            problems.append(f"{name}: no bounds or enum ({schema})")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("conf", "field"),
    [
        ({"max_epochs": 0}, "max_epochs"),
        ({"max_epochs": "thirty"}, "max_epochs"),
        ({"learning_rate": 0}, "learning_rate"),
        ({"gate_floor": 1.5}, "gate_floor"),
        ({"batch_uri": "ftp://elsewhere/batch.parquet"}, "batch_uri"),
        ({"gate_slices": ["channel; drop table"]}, "gate_slices"),
        # looser than the card_fraud spec: refused at trigger time, before any run exists
        ({"gate_floor": 0.5}, "gate_floor"),
        ({"gate_margin": 0.0}, "gate_margin"),
        ({"gate_slices": []}, "gate_slices"),
        ({"decay_margin": 0.4}, "decay_margin"),
        ({"max_epochs": 31}, "max_epochs"),
    ],
)
def test_invalid_conf_is_refused_naming_the_field(stack, token, conf, field):
    status, body = stack.api(
        "POST", f"/api/v2/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": conf}, token=token
    )
    assert 400 <= status < 500, (status, body)
    detail = body.get("detail") if isinstance(body, dict) else body
    assert field in str(detail), detail


def test_valid_conf_is_accepted_and_queued(stack, token):
    # tighter than the spec (a higher floor, a larger margin, one more slice): accepted
    conf = {
        "max_epochs": 5,
        "learning_rate": 0.01,
        "force_retrain": True,
        "batch_uri": None,
        "gate_floor": 0.75,
        "gate_margin": 0.01,
        "gate_slices": ["channel", "country"],
    }
    status, run = stack.api(
        "POST",
        f"/api/v2/dags/{DAG_ID}/dagRuns",
        {"logical_date": None, "conf": conf, "note": "test_trigger_form"},
        token=token,
    )
    assert status == 200, run
    assert run["conf"]["max_epochs"] == 5 and run["state"] in ("queued", "running")
    # the DAG stays paused in this stack: the run is not executed; remove it again
    run_id = urllib.parse.quote(run["dag_run_id"], safe="")
    status, _ = stack.api("DELETE", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}", token=token)
    assert status == 204
