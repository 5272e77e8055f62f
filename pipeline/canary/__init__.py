"""Canary rollout: traffic steps, canary-vs-champion analysis, and the outcome.

* :mod:`pipeline.canary.analysis` — the pure part: the statistics (PSI, binned ROC AUC,
  the binomial tail), :class:`CanaryThresholds`, :class:`CanaryCheck`,
  :class:`CanaryDecision` (a ``decisions.Decision`` of kind ``canary_analysis``, which
  :func:`replay` recomputes from its record), :class:`CanaryAnalysis`, the Argo-style
  :class:`AnalysisRun` and the :class:`CanaryPlan`. No I/O.
* :mod:`pipeline.canary.rollout` — the loop that moves the weight in the registry, reads
  the scoring service's ``/metrics`` over HTTP and promotes or rolls back
  (:func:`run_canary_rollout`, :func:`abort_canary`).

Importing this package is light: the rollout imports ``httpx``, MLflow (the registry) and
the settings only inside the functions that use them, and both modules read the service's
metrics through :mod:`pipeline.serving.metrics` without FastAPI or torch.
"""

from __future__ import annotations

from pipeline.canary.analysis import (
    KIND,
    RECORD_VERSION,
    AnalysisPolicy,
    AnalysisRun,
    CanaryAnalysis,
    CanaryCheck,
    CanaryDecision,
    CanaryPlan,
    CanaryReason,
    CanaryStep,
    CanaryThresholds,
    RunStatus,
    auc_se,
    binned_auc,
    binomial_sf,
    decision_record,
    error_rate,
    psi,
    psi_noise,
    replay,
)
from pipeline.canary.rollout import RECORD_KIND, abort_canary, run_canary_rollout
from pipeline.names import CanaryVerdict

__all__ = [
    "KIND",
    "RECORD_KIND",
    "RECORD_VERSION",
    "AnalysisPolicy",
    "AnalysisRun",
    "CanaryAnalysis",
    "CanaryCheck",
    "CanaryDecision",
    "CanaryPlan",
    "CanaryReason",
    "CanaryStep",
    "CanaryThresholds",
    "CanaryVerdict",
    "RunStatus",
    "abort_canary",
    "auc_se",
    "binned_auc",
    "binomial_sf",
    "decision_record",
    "error_rate",
    "psi",
    "psi_noise",
    "replay",
    "run_canary_rollout",
]
