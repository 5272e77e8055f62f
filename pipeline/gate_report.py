"""The gate's report: the Markdown table and the version description a reviewer reads.

Rendering only — the decision is ``pipeline.gates``; this turns a :class:`GateDecision`
(and the gate stage's record) into text for the MLflow version's description, the run's
``gate/report.md`` and the Airflow approval form.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.gates import GateDecision


def _f(v: float | None, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:+.4f}" if signed else f"{v:.4f}"


def report_table(decision: GateDecision) -> str:
    """Markdown table: metric, champion, challenger, difference, CI, threshold, pass/fail."""
    cv = decision.champion_version
    pct = f"{decision.gate.get('confidence', 0.95):.0%}"
    head = (
        f"| metric | champion {'v' + cv if cv else '(none)'} | challenger | difference "
        f"| {pct} CI | threshold | result |\n|---|---|---|---|---|---|---|"
    )
    rows = []
    for c in decision.checks:
        ci = (
            f"[{_f(c.ci_low, True)}, {_f(c.ci_high, True)}]"
            if c.ci_low is not None and c.ci_high is not None
            else "—"
        )
        if c.kind in ("size", "latency"):
            unit = " bytes" if c.kind == "size" else " ms"
            value = (
                "—"
                if c.challenger is None
                else (
                    f"{c.challenger:,.0f}{unit}"
                    if c.kind == "size"
                    else f"{c.challenger:.2f}{unit}"
                )
            )
            rows.append(
                f"| {c.metric} | — | {value} | — | — | {c.threshold} | "
                f"{'pass' if c.passed else '**FAIL**'} |"
            )
            continue
        result = {True: "pass", False: "**FAIL**", None: "—"}[c.passed]
        if c.passed is None and c.detail:
            result = c.detail
        rows.append(
            f"| {c.metric} | {_f(c.champion)} | {_f(c.challenger)} | "
            f"{_f(c.difference, True)} | {ci} | {c.threshold} | {result} |"
        )
    return head + "\n" + "\n".join(rows)


def gradient_health_line(summary: dict[str, Any] | None, run_id: str) -> str:
    """One line on how training went, from the run's ``telemetry/final/summary.json``
    (``pipeline.train.telemetry.load_summary``): the stop rule and step, spikes, vanishing
    layers, dead units, the final update ratio, and where the pictures are."""
    if not summary:
        return "- gradient health: no telemetry summary on the training run"
    events = summary.get("events") or []

    def of(kind: str) -> str:
        hit = [e for e in events if e.get("kind") == kind]
        return (
            ", ".join(f"`{e['tensor']}` at step {e['step']}" for e in hit[:3])
            + (f" (+{len(hit) - 3})" if len(hit) > 3 else "")
            if hit
            else "none"
        )

    ratio = summary.get("final_update_ratio")
    base = f"runs:/{run_id}/telemetry/final"
    return (
        f"- gradient health: stop `{summary.get('stop_reason') or '?'}` at step "
        f"{summary.get('step', summary.get('last_step', '?'))} · {summary.get('kept', 0)} "
        f"snapshots (every {summary.get('snapshot_every', '?')} steps) · spikes: {of('spike')}"
        f" · vanishing: {of('vanishing')} · dead units: {of('dead_units')} · final update "
        f"ratio {'—' if ratio is None else f'{ratio:.2g}'} (median ‖Δw‖/‖w‖ over tensors) · "
        f"pictures: [norms.png]({base}/norms.png), [histograms.png]({base}/histograms.png)"
    )


def gate_markdown(
    *,
    verdict: str,
    reason: str,
    message: str,
    table: str,
    gate: dict[str, Any],
    model_version: str,
    champion_version: str | None,
    eval_uri: str,
    eval_sha256: str,
    record_uri: str,
    dag_id: str,
    run_id: str,
    gradient_health: str | None = None,
) -> str:
    """The version's description: the gate's verdict and its table, readable in the MLflow UI
    (and ``gradient_health``, a ``gradient_health_line``, when given)."""
    ni = gate.get("non_inferiority_margin")
    reasons = "\n".join(f"- {part}" for part in str(message).split("; ") if part)
    required = f"{gate['improvement']} improvement {gate['margin']}" + (
        f", or non-inferiority within {ni}" if ni is not None else ""
    )
    cv = champion_version
    return (
        f"### Gate: {verdict.upper()} — `{reason}`\n\n{reasons}\n\n"
        f"{table}\n\n"
        f"- compared: challenger v{model_version} vs "
        f"{'champion v' + cv if cv else 'no champion (floors and budgets only)'}\n"
        f"- trusted evaluation set: `{eval_uri}` (sha256 `{eval_sha256[:12]}`)\n"
        f"- Paired bootstrap: {gate['resamples']} resamples, seed {gate['seed']}; required {required}\n"
        f"- decision record (replayable): `{record_uri}`\n"
        + (f"{gradient_health}\n" if gradient_health else "")
        + f"- Airflow: {dag_id} / {run_id}"
    )
