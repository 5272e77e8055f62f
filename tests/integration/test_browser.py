"""A new user's path through the UIs, in headless Chromium (Debian's; no browser download).

Airflow standalone and the MLflow UI run on a fresh home holding one real DAG run (see
``ui_stack.py``). The user opens the Retraining view, is sent to log in and comes back; opens
retrain_card_fraud's trigger form; submits a bad value and reads the refusal; submits a good one;
finds the runs in the Retraining view (one section per model spec: card_fraud with its runs,
digits with none yet); follows the run's "Model version" extra link to MLflow
and finds the version with its gate report. Each page is saved as a PNG under the test's tmp
folder and copied to ``.local/screenshots/``.
"""

from __future__ import annotations

import shutil
import time
import urllib.parse
from pathlib import Path

import pytest
from cdp import Browser, Page, find_chromium
from ui_stack import DAG_ID, ROOT, Stack, shared_stack

MODEL = DAG_ID.removeprefix("retrain_")  # the spec whose DAG the stack ran: card_fraud

pytestmark = [
    pytest.mark.browser,
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(
        find_chromium() is None,
        reason="chromium is not installed (apt-get install chromium; .ci/run does it)",
    ),
]

COPY_TO = ROOT / ".local" / "screenshots"


def button(text: str, scope: str = "document") -> str:
    return f"[...{scope}.querySelectorAll('button')].find(b => b.innerText.trim() === {text!r})"


def dialog_button(text: str) -> str:
    return (
        "[...document.querySelectorAll('[role=dialog] button')]"
        f".find(b => b.innerText.trim() === {text!r})"
    )


def field(name: str) -> str:
    return f"document.querySelector('[name=element_{name}]')"


class Shots:
    def __init__(self, page: Page, folder: Path) -> None:
        self.page, self.folder, self.n, self.paths = page, folder, 0, []

    def __call__(self, name: str, full_page: bool = False) -> Path:
        self.n += 1
        path = self.page.screenshot(self.folder / f"{self.n:02d}-{name}.png", full_page=full_page)
        self.paths.append(path)
        return path


@pytest.fixture(scope="module")
def stack(request, tmp_path_factory) -> Stack:
    return shared_stack(request, tmp_path_factory)


@pytest.fixture
def page(tmp_path):
    browser = Browser.launch()
    try:
        yield browser.new_page(1440, 900)
    finally:
        browser.close()


def test_new_user_triggers_a_run_and_reviews_it(stack, page, tmp_path):
    t0 = time.perf_counter()
    steps: list[str] = []

    def step(name: str) -> None:
        steps.append(f"{time.perf_counter() - t0:6.1f}s {name}")

    shot = Shots(page, tmp_path / "screenshots")
    af, seed = stack.airflow_url, stack.seed_run_id
    try:
        # 1. the Retraining view needs an Airflow login, and comes back after it
        page.goto(f"{af}/retraining/")
        page.wait_for("document.querySelector('input[name=username]')", 60)
        assert "/auth/login" in page.url() and "retraining" in urllib.parse.unquote(page.url())
        shot("login")
        page.type_into("document.querySelector('input[name=username]')", stack.username)
        page.type_into("document.querySelector('input[name=password]')", stack.password)
        page.click(button("Sign in"))
        page.wait_for("location.pathname === '/retraining/' && document.querySelector('table')", 60)
        step("logged in, back on /retraining/")

        # 2. the DAG page; the view is listed under Browse and opens in its own tab
        page.goto(f"{af}/dags/{DAG_ID}")
        page.wait_for(button("Trigger"), 60)
        page.click(button("Browse"))
        nav = page.wait_for(
            "(() => { const a = [...document.querySelectorAll('a')].find(a => "
            "a.innerText.trim() === 'Retraining'); return a && [a.getAttribute('href'), a.target]; })()"
        )
        assert nav == ["/retraining/", "_blank"], nav
        shot("dag-page-browse-menu")
        page.send("Input.dispatchKeyEvent", {"type": "keyDown", "key": "Escape", "code": "Escape"})
        page.send("Input.dispatchKeyEvent", {"type": "keyUp", "key": "Escape", "code": "Escape"})
        step("DAG page")

        # 3. the trigger form: typed, titled, described fields
        page.click(button("Trigger"))
        page.wait_for(field("max_epochs"), 30)
        form = page.text()
        for title in (
            "Batch URI",
            "Max epochs",
            "Learning rate",
            "Gate margin",
            "Gate floor",
            "Require approval",
            "Upper bound on training epochs",
        ):
            assert title in form, title
        # keep the DAG paused: the run triggered below is queued, not executed
        unpause = (
            "[...document.querySelectorAll('[role=dialog] label')]"
            ".find(l => l.innerText.includes('Unpause'))?.querySelector('input')"
        )
        page.wait_for(
            f"(() => {{ const box = {unpause}; if (!box) return true;"
            " if (box.checked) box.click(); return !box.checked; })()",
            10,
        )
        shot("trigger-form")
        step("trigger form")

        # 4. a bad value is refused by the API server, naming the field
        page.type_into(field("batch_uri"), "ftp://elsewhere/batch.parquet")
        page.click(dialog_button("Trigger"))
        page.wait_for(
            "[...document.querySelectorAll('[role=dialog]')]"
            ".some(d => d.innerText.includes('Invalid input for param batch_uri'))",
            30,
        )
        page.eval(
            "[...document.querySelectorAll('[role=dialog] *')].find(e => e.childElementCount === 0 && "
            "e.textContent.includes('Invalid input for param batch_uri')).scrollIntoView({block: 'center'})"
        )
        time.sleep(0.5)
        shot("trigger-refused")
        step("bad value refused")

        # 5. a good value is accepted
        before = {
            r["dag_run_id"]
            for r in stack.api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns")[1]["dag_runs"]
        }
        page.type_into(field("batch_uri"), "")
        page.type_into(field("max_epochs"), "7")
        page.click(dialog_button("Trigger"))
        page.wait_for(
            "document.body.innerText.includes('Dag Run Triggered') || "
            "document.body.innerText.includes('successfully triggered')",
            30,
        )
        shot("trigger-accepted")
        runs = stack.api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns")[1]["dag_runs"]
        (new,) = [r for r in runs if r["dag_run_id"] not in before]
        assert new["conf"]["max_epochs"] == 7 and new["conf"]["batch_uri"] is None
        assert new["state"] == "queued"
        step("good value accepted")

        # 6. the Retraining view: a section per model spec; this model's runs, verdicts,
        #    sparkline, gate (named by the spec's metric), promotion and aliases
        page.goto(f"{af}/retraining/")
        sec = f"document.querySelector('section[data-model={MODEL}]')"
        row = f"{sec}.querySelector('tr[data-run-id=\"{seed}\"]')"
        page.wait_for(row, 30)
        sections = page.eval(
            "[...document.querySelectorAll('section.model')].map(s => s.dataset.model)"
        )
        assert MODEL in sections and "digits" in sections, sections
        cells = page.eval(f"[...{row}.querySelectorAll('td')].map(td => td.innerText.trim())")
        assert cells[1] == "success" and cells[2] == "pass" and cells[4] == "train", cells
        assert page.eval(f"!!{row}.querySelector('svg.spark polyline')"), (
            "no gradient-norm sparkline"
        )
        assert cells[7].split()[0] in ("promote", "reject"), cells
        assert "roc_auc" in cells[7], cells  # the gate's evidence, in the spec's primary metric
        assert cells[8].split()[0] == (
            "promoted" if cells[7].startswith("promote") else "not_promoted"
        ), cells
        assert f"v{stack.seed_version}" in cells[9], cells
        assert page.eval(f"!!{sec}.querySelector('tr[data-run-id=\"{new['dag_run_id']}\"]')")
        assert page.eval(f"{sec}.querySelector('[data-alias=champion] .ver').innerText.trim()") in (
            f"v{stack.seed_version}",
            "—",
        )
        policy = {
            m: page.eval(
                f"document.querySelector('section[data-model={m}] [data-policy]').innerText"
            )
            for m in (MODEL, "digits")
        }
        assert (
            "primary metric roc_auc" in policy[MODEL]
            and "primary metric accuracy" in policy["digits"]
        ), policy
        digits = page.eval("document.querySelector('section[data-model=digits]').innerText")
        assert "No runs of retrain_digits yet" in digits and "ROC AUC" not in page.text()
        shot("retraining-view", full_page=True)
        step("Retraining view")

        # 7. from the view to the Airflow run, to the task's extra links
        page.click(f"{row}.querySelector('td a')")
        page.wait_for(f"location.pathname.startsWith('/dags/{DAG_ID}/runs/')", 30)
        assert urllib.parse.unquote(page.url()).rstrip("/").endswith(seed)
        page.goto(
            f"{af}/dags/{DAG_ID}/runs/{urllib.parse.quote(seed, safe='')}/tasks/register_challenger/details"
        )
        link = (
            "[...document.querySelectorAll('a')].find(a => a.innerText.trim() === 'Model version')"
        )
        href = page.wait_for(f"{link} && {link}.href", 60)
        for name in ("MLflow run", "Model version"):
            assert page.eval(
                f"!![...document.querySelectorAll('a')].find(a => a.innerText.trim() === {name!r})"
            )
        shot("task-extra-links")
        assert href == f"{stack.mlflow_url}/#/models/card-fraud/versions/{stack.seed_version}", href
        step("extra links")

        # 8. MLflow: the model version with its gate report and tags
        page.goto(href)
        page.wait_for("document.body.innerText.includes('Gate:')", 90)
        close = "document.querySelector('button[aria-label=Close]')"
        if page.eval(f"!!{close}"):
            page.click(close)  # MLflow 3's assistant side panel takes a third of the width
        text = page.text()
        assert f"Version {stack.seed_version}" in text
        assert "Paired bootstrap" in text and "gate.verdict" in text, text[:2000]
        shot("mlflow-model-version")
        page.eval(
            "[...document.querySelectorAll('.du-bois-light-collapse-header')]"
            ".find(e => e.innerText.trim() === 'Tags').scrollIntoView()"
        )
        time.sleep(0.5)
        shot("mlflow-version-tags")
        step("MLflow model version")

        # 9. the validation report behind validate_batch's extra link
        page.goto(
            f"{af}/dags/{DAG_ID}/runs/{urllib.parse.quote(seed, safe='')}/tasks/validate_batch/details"
        )
        link = "[...document.querySelectorAll('a')].find(a => a.innerText.trim() === 'Validation report')"
        href = page.wait_for(f"{link} && {link}.href", 60)
        assert href.endswith("/artifacts/validation/report.html"), href
        page.goto(href)
        page.wait_for("document.body.innerText.includes('report.html')", 60)
        time.sleep(2)
        shot("mlflow-validation-report")
        step("validation report")
    finally:
        COPY_TO.mkdir(parents=True, exist_ok=True)
        for path in shot.paths:
            shutil.copy2(path, COPY_TO / path.name)
        print("\n".join(steps), f"\nstack: {stack.timings}", f"\nscreenshots: {COPY_TO}")
    assert time.perf_counter() - t0 < 180, steps
