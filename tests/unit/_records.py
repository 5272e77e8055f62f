"""Stage records as tests build them by hand: every required field, real types."""

from __future__ import annotations

from typing import Any


def gated_record(version: str, run_id: str, **fields: Any) -> Any:
    """A gate_promotion record that passed (what approval, promotion and canary read of it)."""
    from pipeline import registry, stages

    base: dict[str, Any] = {
        "verdict": "promote",
        "promote": True,
        "reason": "no_champion_floors_met",
        "reasons": ["no_champion_floors_met"],
        "message": "floors met",
        "metric": "roc_auc",
        "challenger": 0.9,
        "champion": None,
        "champion_version": None,
        "model_name": registry.model_name(),
        "model_version": version,
        "eval_uri": "file:///trusted/eval.parquet",
        "eval_sha256": "0" * 64,
        "latency_p95_ms": 1.0,
        "record_uri": f"runs:/{run_id}/records/decisions/promotion_gate_decision.json",
        "model_url": "",
        "report_table": "",
        "report_markdown": "",
        "mlflow_run_id": run_id,
    }
    return stages.Gated(**{**base, **fields})
