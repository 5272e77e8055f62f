"""Classification metrics shared by training, evaluation and the gates."""

from __future__ import annotations

import numpy as np


def classification_metrics(y: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """Log loss and accuracy always; ROC AUC and PR AUC (binary: last class positive;
    multi-class: one-vs-rest macro) when every class is present."""
    from sklearn.metrics import average_precision_score, log_loss, roc_auc_score

    k = proba.shape[1]
    out = {
        "log_loss": float(log_loss(y, np.clip(proba, 1e-7, 1.0), labels=list(range(k)))),
        "accuracy": float((proba.argmax(axis=1) == y).mean()) if len(y) else float("nan"),
        "rows": float(len(y)),
    }
    if len(np.unique(y)) == k:
        if k == 2:
            out["roc_auc"] = float(roc_auc_score(y, proba[:, 1]))
            out["pr_auc"] = float(average_precision_score(y, proba[:, 1]))
        else:
            out["roc_auc"] = float(roc_auc_score(y, proba, multi_class="ovr"))
    return out
