"""The promotion gate: floors, budgets, and challenger vs champion on a paired bootstrap.

Everything is judged on the same trusted evaluation set, from per-row predictions:

* **Floors** — an absolute bound per metric (``roc_auc >= 0.7``; for a lower-is-better
  metric such as ``log_loss`` the floor is a ceiling). Always applied.
* **Budgets** — checkpoint bytes and p95 prediction latency per batch, when set.
  Missing evidence for a set budget fails the check; nothing is assumed.
* **Champion** — the difference ``challenger - champion`` in the primary metric gets a
  seeded, paired bootstrap CI (default 1000 resamples, 95 %). The challenger passes if
  the *lower* bound clears the required improvement (absolute, or relative to the
  champion's value) — or, when a non-inferiority margin is set, if the lower bound
  is above ``-margin``. An interval that straddles zero therefore never passes on
  improvement: a noisy tie keeps the champion.
* **Slices** — for each categorical column named in the config, each value with
  enough rows and both classes: a slice regresses when the challenger is worse by
  more than ``slice_tolerance`` *and* the slice's CI lies wholly below zero (material
  and not noise). Any regressing slice rejects.
* **No champion** — stated, never treated as "champion scored 0": floors and budgets
  only.

``decide`` is pure: inputs in, decision out. The decision record holds the gate's
thresholds and every input (labels, both models' probabilities, slice columns, size,
latency), so ``replay(record)`` recomputes the same decision bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Literal

import numpy as np

from pipeline import decisions
from pipeline.metrics import (
    BOOTSTRAP_METRICS,
    DIRECTION,
    bootstrap_counts,
    classification_metrics,
    paired_bootstrap,
)
from pipeline.names import GateVerdict

RECORD_KIND = "promotion_gate_decision"
RECORD_VERSION = 2  # 2: the shared decision record (pipeline.decisions); 1 replays too


class GateReason(StrEnum):
    # promote
    NO_CHAMPION_FLOORS_MET = "no_champion_floors_met"
    IMPROVES_ON_CHAMPION = "improves_on_champion"
    NON_INFERIOR_TO_CHAMPION = "non_inferior_to_champion"
    # reject
    METRIC_MISSING = "metric_missing"
    BELOW_FLOOR = "below_floor"
    NOT_BETTER_THAN_CHAMPION = "not_better_than_champion"
    SLICE_REGRESSION = "slice_regression"
    OVER_SIZE_BUDGET = "over_size_budget"
    OVER_LATENCY_BUDGET = "over_latency_budget"
    HUMAN_REJECTED = "human_rejected"


@dataclass(frozen=True)
class GateInputs:
    """What the gate sees: per-row evidence on the trusted evaluation set, and budgets' inputs.

    ``labels`` are class indices 0..K-1; the probability matrices are rows x K, in the
    same row order. ``slices`` maps a column name to that column's values (as text).
    """

    labels: np.ndarray
    challenger_proba: np.ndarray
    champion_proba: np.ndarray | None = None
    champion_version: str | None = None
    slices: dict[str, np.ndarray] = field(default_factory=dict)
    checkpoint_bytes: int | None = None
    latency_p95_ms: float | None = None

    def __post_init__(self) -> None:
        # float64 throughout, so a replay from JSON computes exactly the same numbers
        object.__setattr__(self, "labels", np.asarray(self.labels, dtype=np.int64))
        object.__setattr__(self, "challenger_proba", _matrix(self.challenger_proba))
        if self.champion_proba is not None:
            object.__setattr__(self, "champion_proba", _matrix(self.champion_proba))
        object.__setattr__(
            self, "slices", {str(k): np.asarray(v, dtype=str) for k, v in self.slices.items()}
        )
        n = len(self.labels)
        if self.challenger_proba.shape[0] != n:
            raise ValueError(f"challenger has {self.challenger_proba.shape[0]} rows, labels {n}")
        if (
            self.champion_proba is not None
            and self.champion_proba.shape != self.challenger_proba.shape
        ):
            raise ValueError(
                f"champion predictions {self.champion_proba.shape} do not match the "
                f"challenger's {self.challenger_proba.shape}: not the same rows/classes"
            )
        if self.champion_proba is not None and self.champion_version is None:
            raise ValueError("champion predictions given without the champion's version")
        for col, values in self.slices.items():
            if len(values) != n:
                raise ValueError(f"slice column {col!r} has {len(values)} values, labels {n}")
        if n and (self.labels.min() < 0 or self.labels.max() >= self.challenger_proba.shape[1]):
            raise ValueError("labels must be class indices 0..K-1")

    def to_dict(self) -> dict[str, Any]:
        return {
            "labels": self.labels.tolist(),
            "challenger_proba": self.challenger_proba.tolist(),
            "champion_proba": None if self.champion_proba is None else self.champion_proba.tolist(),
            "champion_version": self.champion_version,
            "slices": {k: v.tolist() for k, v in self.slices.items()},
            "checkpoint_bytes": self.checkpoint_bytes,
            "latency_p95_ms": self.latency_p95_ms,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GateInputs:
        return cls(
            labels=np.asarray(d["labels"]),
            challenger_proba=np.asarray(d["challenger_proba"]),
            champion_proba=None
            if d.get("champion_proba") is None
            else np.asarray(d["champion_proba"]),
            champion_version=d.get("champion_version"),
            slices={k: np.asarray(v) for k, v in (d.get("slices") or {}).items()},
            checkpoint_bytes=d.get("checkpoint_bytes"),
            latency_p95_ms=d.get("latency_p95_ms"),
        )

    # -- the record: per-row arrays in a compressed side file, named by its digest ----------

    def rows_npz(self) -> bytes:
        """The per-row arrays (labels, both models' probabilities, slice values) as a
        compressed ``.npz`` — numbers and text only, loaded back without pickle."""
        import io

        arrays: dict[str, np.ndarray] = {
            "labels": self.labels,
            "challenger_proba": self.challenger_proba,
        }
        if self.champion_proba is not None:
            arrays["champion_proba"] = self.champion_proba
        for k, v in self.slices.items():
            arrays[f"slice:{k}"] = np.asarray(v, dtype=str)
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]
        return buf.getvalue()

    def to_record(self, rows_uri: str, rows_sha256: str) -> dict[str, Any]:
        """The record's ``inputs``: the scalars, and where the per-row arrays are (with
        their SHA-256) instead of the arrays themselves (~0.1 MB per 1,000 rows as JSON)."""
        return {
            "rows": {"uri": rows_uri, "sha256": rows_sha256, "count": int(len(self.labels))},
            "champion_version": self.champion_version,
            "slices": sorted(self.slices),
            "checkpoint_bytes": self.checkpoint_bytes,
            "latency_p95_ms": self.latency_p95_ms,
        }

    @classmethod
    def from_record(cls, d: dict[str, Any], load: Any = None) -> GateInputs:
        """Inputs from a record: inline arrays (records written before the side file), or
        the side file read with ``load(uri) -> bytes`` and checked against its digest."""
        if "rows" not in d:
            return cls.from_dict(d)
        import hashlib
        import io

        ref = d["rows"]
        if load is None:
            raise ValueError(
                f"this gate record keeps its per-row inputs in {ref['uri']}: replay it with "
                "load=<a function reading that URI's bytes> (pipeline.registry.read_artifact)"
            )
        data = load(ref["uri"])
        if hashlib.sha256(data).hexdigest() != ref["sha256"]:
            raise ValueError(f"{ref['uri']} is not the file the gate recorded (sha256 differs)")
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return cls(
                labels=z["labels"],
                challenger_proba=z["challenger_proba"],
                champion_proba=z["champion_proba"] if "champion_proba" in z.files else None,
                champion_version=d.get("champion_version"),
                slices={k: z[f"slice:{k}"] for k in d.get("slices") or ()},
                checkpoint_bytes=d.get("checkpoint_bytes"),
                latency_p95_ms=d.get("latency_p95_ms"),
            )


def _matrix(a: Any) -> np.ndarray:
    m = np.asarray(a, dtype=np.float64)
    if m.ndim != 2 or m.shape[1] < 2:
        raise ValueError(f"probabilities must be rows x classes (>= 2), got shape {m.shape}")
    return m


@dataclass(frozen=True)
class GateCheck:
    """One line of the gate report. ``passed`` is None for information and not-applicable."""

    kind: str  # floor | champion | slice | size | latency | info
    metric: str
    challenger: float | None
    champion: float | None = None
    difference: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    threshold: str = ""
    passed: bool | None = None
    reason: GateReason | None = None
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["reason"] = self.reason.value if self.reason else None
        return d


@dataclass(frozen=True)
class GateDecision:
    KIND: ClassVar[str] = RECORD_KIND
    RECORD_VERSION: ClassVar[int] = RECORD_VERSION

    promote: bool
    reason: GateReason
    reasons: list[GateReason]
    metric: str
    challenger: float | None
    champion: float | None
    champion_version: str | None
    checks: list[GateCheck]
    challenger_metrics: dict[str, float]
    champion_metrics: dict[str, float] | None
    gate: dict[str, Any]
    message: str

    @property
    def verdict(self) -> GateVerdict:
        return GateVerdict.PROMOTE if self.promote else GateVerdict.REJECT

    @property
    def failed(self) -> list[GateCheck]:
        return [c for c in self.checks if c.passed is False]

    def to_dict(self) -> dict[str, Any]:
        evidence = {"challenger": self.challenger, "champion": self.champion}
        return {
            **decisions.common(self, evidence),
            "promote": self.promote,
            "metric": self.metric,
            "challenger": self.challenger,
            "champion": self.champion,
            "champion_version": self.champion_version,
            "checks": [c.to_dict() for c in self.checks],
            "challenger_metrics": self.challenger_metrics,
            "champion_metrics": self.champion_metrics,
            "gate": self.gate,
        }


@dataclass(frozen=True)
class PromotionGate:
    metric: str = "roc_auc"
    floors: dict[str, float] = field(default_factory=lambda: {"roc_auc": 0.7})
    margin: float = 0.005  # the spec's gate.margin: the required improvement
    improvement: Literal["absolute", "relative"] = "absolute"
    non_inferiority_margin: float | None = None
    slices: tuple[str, ...] = ()
    slice_tolerance: float = 0.01
    min_slice_rows: int = 200
    max_checkpoint_bytes: int | None = None
    max_latency_p95_ms: float | None = None
    resamples: int = 1000
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if self.metric not in BOOTSTRAP_METRICS:
            raise ValueError(f"gate metric must be one of {BOOTSTRAP_METRICS}, got {self.metric!r}")
        for m, v in self.floors.items():
            if m not in DIRECTION:
                raise ValueError(f"floor for unknown metric {m!r}; known: {sorted(DIRECTION)}")
            if not math.isfinite(v):
                raise ValueError(f"floor for {m} must be finite, got {v}")
        if not 0 <= self.margin < 1:
            raise ValueError(f"gate margin must be in [0, 1), got {self.margin}")
        if self.improvement not in ("absolute", "relative"):
            raise ValueError(
                f"improvement must be 'absolute' or 'relative', got {self.improvement!r}"
            )
        if self.non_inferiority_margin is not None and not 0 <= self.non_inferiority_margin < 1:
            raise ValueError(
                "non_inferiority_margin must be None or in [0, 1), got "
                f"{self.non_inferiority_margin}"
            )
        if self.slice_tolerance < 0 or self.min_slice_rows < 1:
            raise ValueError("slice_tolerance must be >= 0 and min_slice_rows >= 1")
        if self.max_checkpoint_bytes is not None and self.max_checkpoint_bytes <= 0:
            raise ValueError(f"max_checkpoint_bytes must be > 0, got {self.max_checkpoint_bytes}")
        if self.max_latency_p95_ms is not None and self.max_latency_p95_ms <= 0:
            raise ValueError(f"max_latency_p95_ms must be > 0, got {self.max_latency_p95_ms}")
        if self.resamples < 100:
            raise ValueError(f"resamples must be >= 100, got {self.resamples}")
        if not 0.5 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0.5, 1), got {self.confidence}")
        object.__setattr__(self, "floors", {str(k): float(v) for k, v in self.floors.items()})
        object.__setattr__(self, "slices", tuple(self.slices))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["slices"] = list(self.slices)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PromotionGate:
        return cls(**{**d, "slices": tuple(d.get("slices", ()))})

    # -- the pure core ---------------------------------------------------------------

    def decide(self, inputs: GateInputs) -> GateDecision:
        y, chal_p, champ_p = inputs.labels, inputs.challenger_proba, inputs.champion_proba
        m = self.metric
        chal = classification_metrics(y, chal_p)
        champ = classification_metrics(y, champ_p) if champ_p is not None else None
        checks: list[GateCheck] = []

        for fm, floor in self.floors.items():
            value = chal.get(fm)
            op = ">=" if DIRECTION[fm] > 0 else "<="
            if value is None or not math.isfinite(value):
                checks.append(
                    GateCheck(
                        "floor",
                        fm,
                        None,
                        threshold=f"{op} {floor:.4f}",
                        passed=False,
                        reason=GateReason.METRIC_MISSING,
                        detail=f"challenger has no {fm} on the evaluation set",
                    )
                )
                continue
            ok = DIRECTION[fm] * (value - floor) >= 0
            checks.append(
                GateCheck(
                    "floor",
                    fm,
                    value,
                    champ.get(fm) if champ else None,
                    threshold=f"{op} {floor:.4f} (floor)",
                    passed=ok,
                    reason=None if ok else GateReason.BELOW_FLOOR,
                    detail=""
                    if ok
                    else f"challenger {fm}={value:.4f} is below the floor {floor:.4f}",
                )
            )

        checks += self._budgets(inputs)

        if champ_p is not None:
            counts = bootstrap_counts(len(y), self.resamples, self.seed)
            checks.append(
                self._versus_champion(y, chal_p, champ_p, counts, inputs.champion_version)
            )
            for info in BOOTSTRAP_METRICS:
                if info != m:
                    bs = paired_bootstrap(
                        info,
                        y,
                        chal_p,
                        champ_p,
                        counts=counts,
                        confidence=self.confidence,
                        seed=self.seed,
                    )
                    checks.append(
                        GateCheck(
                            "info",
                            info,
                            bs["a"],
                            bs["b"],
                            bs["diff"],
                            bs["ci_low"],
                            bs["ci_high"],
                            threshold="(reported, not gated)",
                        )
                    )
            for col in self.slices:
                checks += self._slice_checks(col, inputs)
        elif self.slices:
            checks.append(
                GateCheck(
                    "slice",
                    f"{m} [{', '.join(self.slices)}]",
                    None,
                    threshold="no regression per slice",
                    detail="no champion: nothing to regress against",
                )
            )

        failed = [c for c in checks if c.passed is False]
        if failed:
            reasons = list(dict.fromkeys(c.reason for c in failed if c.reason))
        elif champ_p is None:
            reasons = [GateReason.NO_CHAMPION_FLOORS_MET]
        else:
            vs = next(c for c in checks if c.kind == "champion")
            reasons = [vs.reason] if vs.reason else [GateReason.IMPROVES_ON_CHAMPION]
        promote = not failed
        cv = inputs.champion_version
        if promote and champ_p is None:
            msg = (
                "no champion; challenger clears every floor ("
                + ", ".join(f"{c.metric}={c.challenger:.4f}" for c in checks if c.kind == "floor")
                + ") and every budget set"
            )
        elif promote:
            msg = next(c.detail for c in checks if c.kind == "champion")
        else:
            msg = "; ".join(c.detail for c in failed) + (
                f"; champion v{cv} stays" if cv else "; no champion, nothing promoted"
            )
        return GateDecision(
            promote=promote,
            reason=reasons[0],
            reasons=reasons,
            metric=m,
            challenger=chal.get(m),
            champion=champ.get(m) if champ else None,
            champion_version=cv,
            checks=checks,
            challenger_metrics=chal,
            champion_metrics=champ,
            gate=self.to_dict(),
            message=msg,
        )

    def _versus_champion(
        self,
        y: np.ndarray,
        chal_p: np.ndarray,
        champ_p: np.ndarray,
        counts: np.ndarray,
        champion_version: str | None,
    ) -> GateCheck:
        m, sign, pct = self.metric, DIRECTION[self.metric], f"{self.confidence:.0%}"
        bs = paired_bootstrap(
            m, y, chal_p, champ_p, counts=counts, confidence=self.confidence, seed=self.seed
        )
        base: dict[str, Any] = {
            "kind": "champion",
            "metric": m,
            "challenger": bs["a"],
            "champion": bs["b"],
            "difference": bs["diff"],
            "ci_low": bs["ci_low"],
            "ci_high": bs["ci_high"],
        }
        if not all(math.isfinite(bs[k]) for k in ("a", "b", "ci_low", "ci_high")):
            return GateCheck(
                **base,
                threshold="defined on the evaluation set",
                passed=False,
                reason=GateReason.METRIC_MISSING,
                detail=f"{m} is undefined for challenger or champion on the evaluation set",
            )
        # improvement oriented so that positive is better
        lo = sign * (bs["ci_low"] if sign > 0 else bs["ci_high"])
        required = self.margin * (abs(bs["b"]) if self.improvement == "relative" else 1.0)
        ci = f"{pct} CI [{bs['ci_low']:+.4f}, {bs['ci_high']:+.4f}]"
        vs = (
            f"challenger {m}={bs['a']:.4f} vs champion v{champion_version} {bs['b']:.4f}: "
            f"{bs['diff']:+.4f}, {ci}"
        )
        word = "gain" if sign > 0 else "reduction"
        threshold = (
            f"CI lower bound of the {word} >= {required:.4f}"
            + (f" ({self.margin:.2%} relative)" if self.improvement == "relative" else "")
            + (
                f", or > -{self.non_inferiority_margin:.4f} (non-inferiority)"
                if self.non_inferiority_margin is not None
                else ""
            )
        )
        if lo >= required:
            return GateCheck(
                **base,
                threshold=threshold,
                passed=True,
                reason=GateReason.IMPROVES_ON_CHAMPION,
                detail=f"{vs}: the whole interval clears the required {word} {required:.4f}",
            )
        if self.non_inferiority_margin is not None and lo > -self.non_inferiority_margin:
            return GateCheck(
                **base,
                threshold=threshold,
                passed=True,
                reason=GateReason.NON_INFERIOR_TO_CHAMPION,
                detail=f"{vs}: non-inferior within margin {self.non_inferiority_margin:.4f}",
            )
        why = (
            "the interval straddles zero (a tie within noise)"
            if lo < 0 < sign * (bs["ci_high"] if sign > 0 else bs["ci_low"])
            else "not better by the margin"
        )
        return GateCheck(
            **base,
            threshold=threshold,
            passed=False,
            reason=GateReason.NOT_BETTER_THAN_CHAMPION,
            detail=f"{vs}: {why}; needs the CI lower bound >= {required:.4f}"
            + (
                f" or > -{self.non_inferiority_margin:.4f}"
                if self.non_inferiority_margin is not None
                else ""
            ),
        )

    def _budgets(self, inputs: GateInputs) -> list[GateCheck]:
        out = []
        if self.max_checkpoint_bytes is not None:
            b, cap = inputs.checkpoint_bytes, self.max_checkpoint_bytes
            if b is None:
                out.append(
                    GateCheck(
                        "size",
                        "checkpoint_bytes",
                        None,
                        threshold=f"<= {cap:,} bytes",
                        passed=False,
                        reason=GateReason.METRIC_MISSING,
                        detail="checkpoint size not measured",
                    )
                )
            else:
                ok = b <= cap
                out.append(
                    GateCheck(
                        "size",
                        "checkpoint_bytes",
                        float(b),
                        threshold=f"<= {cap:,} bytes",
                        passed=ok,
                        reason=None if ok else GateReason.OVER_SIZE_BUDGET,
                        detail="" if ok else f"checkpoint is {b} bytes, over the budget of {cap}",
                    )
                )
        if self.max_latency_p95_ms is not None:
            t, cap_ms = inputs.latency_p95_ms, self.max_latency_p95_ms
            if t is None:
                out.append(
                    GateCheck(
                        "latency",
                        "latency_p95_ms",
                        None,
                        threshold=f"<= {cap_ms:g} ms",
                        passed=False,
                        reason=GateReason.METRIC_MISSING,
                        detail="prediction latency not measured",
                    )
                )
            else:
                ok = t <= cap_ms
                out.append(
                    GateCheck(
                        "latency",
                        "latency_p95_ms",
                        float(t),
                        threshold=f"<= {cap_ms:g} ms",
                        passed=ok,
                        reason=None if ok else GateReason.OVER_LATENCY_BUDGET,
                        detail=""
                        if ok
                        else f"p95 latency {t:.1f} ms per batch is over "
                        f"the budget of {cap_ms:g} ms",
                    )
                )
        return out

    def _slice_checks(self, col: str, inputs: GateInputs) -> list[GateCheck]:
        m, sign = self.metric, DIRECTION[self.metric]
        if col not in inputs.slices:
            return [
                GateCheck(
                    "slice",
                    m,
                    None,
                    threshold="no regression per slice",
                    passed=False,
                    reason=GateReason.METRIC_MISSING,
                    detail=f"slice column {col!r} is not in the evaluation inputs",
                )
            ]
        values = inputs.slices[col]
        y = inputs.labels
        assert inputs.champion_proba is not None
        out = []
        threshold = f"not worse by > {self.slice_tolerance:.4f} with CI below 0"
        for i, value in enumerate(sorted(set(values.tolist()))):
            mask = values == value
            name = f"{m} [{col}={value}]"
            n = int(mask.sum())
            classes = len(np.unique(y[mask]))
            if n < self.min_slice_rows or (m == "roc_auc" and classes < 2):
                out.append(
                    GateCheck(
                        "slice",
                        name,
                        None,
                        threshold=threshold,
                        detail=f"not judged: {n} rows, {classes} class(es) "
                        f"(needs >= {self.min_slice_rows} rows and both classes)",
                    )
                )
                continue
            bs = paired_bootstrap(
                m,
                y[mask],
                inputs.challenger_proba[mask],
                inputs.champion_proba[mask],
                resamples=self.resamples,
                seed=self.seed + 1 + i,
                confidence=self.confidence,
            )
            improvement_hi = sign * (bs["ci_high"] if sign > 0 else bs["ci_low"])
            regressed = sign * bs["diff"] < -self.slice_tolerance and improvement_hi < 0
            out.append(
                GateCheck(
                    "slice",
                    name,
                    bs["a"],
                    bs["b"],
                    bs["diff"],
                    bs["ci_low"],
                    bs["ci_high"],
                    threshold=threshold,
                    passed=not regressed,
                    reason=GateReason.SLICE_REGRESSION if regressed else None,
                    detail=(
                        f"slice {col}={value} ({n} rows) regresses: {m} {bs['a']:.4f} vs "
                        f"champion {bs['b']:.4f} ({bs['diff']:+.4f}, CI [{bs['ci_low']:+.4f}, "
                        f"{bs['ci_high']:+.4f}])"
                    )
                    if regressed
                    else f"{n} rows",
                )
            )
        return out


# -- the record and replay ------------------------------------------------------


def decision_record(
    gate: PromotionGate,
    inputs: GateInputs,
    decision: GateDecision,
    context: dict[str, Any] | None = None,
    rows: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """Everything needed to audit and replay the decision (logged as an MLflow artifact):
    ``pipeline.decisions``' record, with the gate's thresholds as the rule. ``rows``:
    (URI, SHA-256) of the per-row arrays' side file (``GateInputs.rows_npz``); without it
    the arrays are inline."""
    recorded = inputs.to_record(*rows) if rows else inputs.to_dict()
    rec = decisions.record(decision, gate.to_dict(), recorded, context)
    rec["champion_version"] = inputs.champion_version
    return rec


def replay(record: dict[str, Any], load: Any = None) -> GateDecision:
    """Recompute a recorded decision from its own thresholds and inputs (``load`` reads the
    per-row side file, when the record has one). Version 1 records (before the shared
    decision record) kept the thresholds under ``gate``."""
    version = decisions.check_version(record, RECORD_KIND, [1, RECORD_VERSION], "promotion gate")
    rule = dict(record["gate"]) if version == 1 else dict(record["rule"])
    if "min_improvement" in rule:  # version 1's name for the margin
        rule["margin"] = rule.pop("min_improvement")
    return PromotionGate.from_dict(rule).decide(GateInputs.from_record(record["inputs"], load))
