"""The canary rollout (I/O: the registry, the scoring service's ``/metrics``).

**Plan** (:class:`~pipeline.canary.analysis.CanaryPlan`): traffic weights in steps
(default 5 %, 25 %, 50 %, 100 %), each held for an interval; a measurement every
``analysis_interval_s``; after full promotion a *bake* window. The weight is written to
the registry (tag ``canary.weight``, see :mod:`pipeline.serving.traffic`); the scoring
service follows it.

**Measurements** are read from the service's ``/metrics`` over HTTP (Prometheus text,
parsed with ``prometheus_client.parser``): in production real traffic flows and this
code only reads. The service serves every model: a rollout reads only the series
labelled with its own model (``model`` = the active spec's name). A window is the
difference of two scrapes, per version, judged by
:class:`~pipeline.canary.analysis.CanaryAnalysis`. With several replicas every one is
read at each measurement and they are summed
(:class:`~pipeline.serving.replicas.ReplicaSet`: ``PIPELINE_SERVING_METRICS_URLS`` or
``PIPELINE_SERVING_REPLICAS_DNS``; by default ``PIPELINE_SERVING_URL`` alone): a
replica that does not answer is a measurement error, never a smaller sample, and a
weight or alias counts as applied once every replica applied it.

**Run semantics** (:class:`~pipeline.canary.analysis.AnalysisRun`): a failure rolls back;
an unmeasurable canary (consecutive measurement errors over the limit) is *aborted*: out
of traffic, but not tagged ``rolled_back`` — the model was not judged bad, and a retry may
run it again; an INCONCLUSIVE step over the limit **pauses** the rollout for a human
rather than guessing — weight and alias stay where they are, the state is recorded on
the version (``canary.state``) and ``python -m pipeline canary --version V --resume``
(or ``--abort``) continues. Mid-step measurements use the window since the previous
one (fresh faults are seen at once); the end of a step judges the whole step.

**Outcome** (tags ``canary.*`` on the version, the JSON record
``records/canary_rollout.json`` on its run, and the returned dict):

* pass — ``registry.promote_champion`` (compare-and-set) moves ``champion``; the old one
  becomes ``previous_champion``; the promotion ledger gets a ``canary_promote`` entry (the
  last window's decision record in it); weight back to 0; alias ``canary`` removed. Then the
  *bake*: the new champion is compared with the previous champion's behaviour recorded
  during the canary (score distribution, error rate, latency, labelled metric); a
  regression rolls back to ``previous_champion`` (:mod:`pipeline.rollback`).
* fail — weight 0 at once, alias ``canary`` removed, version tagged ``rolled_back`` with
  the failed analysis; champion untouched.

Beside the outcome record, every analysis window's decision record
(:func:`~pipeline.canary.analysis.decision_record`: thresholds, the window's stats, the
decision) is logged on the same run as ``records/decisions/canary_analysis-step<n>.json``
(``decisions.record_path``; ``n`` numbers the windows of the rollout, steps and bake
alike, from 0; each record's ``context`` names its step, weight and phase). Any of them
replays with ``decisions.replay``. Failing to log them is a warning, never a different
outcome.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from pipeline import decisions
from pipeline.canary.analysis import (
    KIND,
    AnalysisRun,
    CanaryAnalysis,
    CanaryDecision,
    CanaryPlan,
    CanaryReason,
    RunStatus,
    decision_record,
)
from pipeline.ledger import Action, Move
from pipeline.names import CanaryVerdict
from pipeline.serving.metrics import MeasurementError, Snapshot, VersionStats
from pipeline.serving.replicas import ReplicaSet

log = logging.getLogger(__name__)

RECORD_KIND = "canary_rollout"
_RECORD_PATH = f"records/{RECORD_KIND}.json"  # registry.log_record's path for it


class _Stop(Exception):  # noqa: N818 - control flow inside the rollout
    def __init__(self, verdict: str, reason: CanaryReason, message: str) -> None:
        super().__init__(message)
        self.verdict, self.reason, self.message = verdict, reason, message


class _Rollout:
    def __init__(
        self,
        version: str,
        champion: str,
        plan: CanaryPlan,
        url: str,
        run_key: str,
        actor: str,
        replicas: ReplicaSet | None = None,
    ) -> None:
        import httpx

        from pipeline.spec import active

        self.version, self.champion, self.plan, self.url = version, champion, plan, url
        self.replicas = replicas or ReplicaSet.fixed([url])
        self.run_key, self.actor = run_key, actor
        self.model = active().name  # the service serves many models: read this one's series
        self.analysis = CanaryAnalysis(plan.thresholds)
        self.run = AnalysisRun(plan.policy)
        # a busy service answers /metrics behind its queue of requests: be patient
        self.http = httpx.Client(timeout=max(5.0, min(30.0, plan.analysis_interval_s * 2)))
        self.history: list[dict[str, Any]] = []
        self.step_index = -1
        self.weight = 0.0
        self.phase_start: Snapshot | None = None
        self.last_snapshot: Snapshot | None = None
        self.started = time.monotonic()
        self.started_at = _now()
        # every analysis window's decision record, in order (logged beside the outcome)
        self.decision_records: list[dict[str, Any]] = []
        self.windows = 0  # the next window's number (records/decisions/...-step<n>.json)

    # measurements
    def _scrape(self) -> Snapshot | None:
        """One measurement: every replica's series of this model, summed."""
        try:
            snap = self.replicas.scrape(
                client=self.http, timeout=self.http.timeout.read or 10.0, model=self.model
            )
        except MeasurementError as exc:
            status = self.run.record_error(str(exc))
            self._note("error", message=str(exc))
            log.warning("canary v%s: measurement error: %s", self.version, exc)
            if status is RunStatus.ERROR:
                raise _Stop(
                    "aborted",
                    CanaryReason.MEASUREMENT_ERRORS,
                    f"{self.run.consecutive_errors} consecutive measurements could not be "
                    f"taken (limit {self.plan.policy.consecutive_error_limit}); last: {exc}",
                ) from None
            return None
        if self.version in snap.refused:
            raise _Stop(
                "rolled_back",
                CanaryReason.CANARY_REFUSED,
                f"the scoring service refused v{self.version} (see /readyz `refusals` for "
                "the reason)",
            )
        self.last_snapshot = snap
        return snap

    def _note(self, kind: str, **kw: Any) -> None:
        entry = {
            "t": round(time.monotonic() - self.started, 3),
            "kind": kind,
            "step": self.step_index,
            "weight": self.weight,
            **kw,
        }
        self.history.append(entry)
        del self.history[:-200]

    def _wait_for(self, what: str, ok) -> Snapshot:  # noqa: ANN001
        deadline = time.monotonic() + self.plan.load_timeout_s
        pause = min(0.1, self.plan.analysis_interval_s / 4)
        while True:
            snap = self._scrape()
            if snap is not None and ok(snap):
                return snap
            if time.monotonic() > deadline:
                raise _Stop(
                    "aborted",
                    CanaryReason.MEASUREMENT_ERRORS,
                    f"the scoring service ({self.replicas.describe()}) did not {what} "
                    f"within {self.plan.load_timeout_s:g}s",
                )
            time.sleep(pause)

    def _check_registry(self) -> None:
        from pipeline.serving import traffic

        state = traffic.read_state()
        if state.canary != self.version:
            raise _Stop(
                "aborted",
                CanaryReason.ABORTED,
                f"alias canary moved to {state.canary!r} outside this rollout",
            )
        if state.champion != self.champion:
            raise _Stop(
                "aborted",
                CanaryReason.ABORTED,
                f"champion moved to v{state.champion} outside this rollout",
            )

    def _analyse(self, **inputs: Any) -> tuple[CanaryDecision, dict[str, Any]]:
        """``CanaryAnalysis.decide(**inputs)``, and the inputs (for the decision record)."""
        return self.analysis.decide(**inputs), inputs

    def _keep(self, d: CanaryDecision, inputs: dict[str, Any], *, phase: str, final: bool) -> None:
        """The window's decision record, kept for logging beside the outcome; a failure
        here is a warning: it never changes what the rollout does."""
        try:
            self.decision_records.append(
                decision_record(
                    d,
                    self.plan.thresholds,
                    **inputs,
                    context={
                        "model": self.model,
                        "model_version": self.version,
                        "champion_version": self.champion,
                        "run_key": self.run_key,
                        "rollout_started_at": self.started_at,
                        "window": self.windows,
                        "phase": phase,
                        "step": self.step_index,
                        "weight": self.weight,
                        "final": final,
                        "t": round(time.monotonic() - self.started, 3),
                    },
                )
            )
        except Exception as exc:  # noqa: BLE001 - the record is the audit trail, not the outcome
            log.warning(
                "canary v%s: could not keep window %d's record: %s", self.version, self.windows, exc
            )
        self.windows += 1

    def _decide(self, snap: Snapshot, since: Snapshot) -> tuple[CanaryDecision, dict[str, Any]]:
        assert self.phase_start is not None
        base = snap.since(since, self.champion)
        kind = "same window"
        if base.requests < self.plan.thresholds.min_requests:
            base, kind = snap.since(self.phase_start, self.champion), "champion since canary start"
        return self._analyse(
            baseline=base,
            canary=snap.since(since, self.version),
            baseline_kind=kind,
            labelled_baseline=snap.since(self.phase_start, self.champion),
            labelled_canary=snap.since(self.phase_start, self.version),
        )

    def _record(self, window: tuple[CanaryDecision, dict[str, Any]], *, final: bool) -> RunStatus:
        d, inputs = window
        status = self.run.record(d, final=final)
        self._keep(d, inputs, phase="step" if final else "interval", final=final)
        self._note(
            "step" if final else "interval",
            verdict=d.verdict.value,
            reason=d.reason.value,
            message=d.message,
        )
        log.info(
            "canary v%s step %d (%g): %s %s — %s",
            self.version,
            self.step_index,
            self.weight,
            "step" if final else "interval",
            d.verdict.value,
            d.message,
        )
        if status is RunStatus.FAILED:
            raise _Stop("rolled_back", d.reason, d.message)
        if status is RunStatus.PAUSED:
            raise _Stop("paused", d.reason, f"paused for a human at {self.weight:.0%}: {d.message}")
        return status

    def steps(self, start: int) -> None:
        from pipeline.serving import traffic

        for idx in range(start, len(self.plan.steps)):
            step = self.plan.steps[idx]
            self.step_index, self.weight = idx, step.weight
            traffic.set_canary_weight(step.weight)
            snap = self._wait_for(
                f"apply weight {step.weight:g}",
                lambda s, w=step.weight: (
                    s.serving.get("canary") == self.version
                    and s.canary_weight is not None
                    and abs(s.canary_weight - w) < 1e-9
                ),
            )
            self._note("weight", message=f"weight {step.weight:g} applied")
            step_start = last = snap
            deadline = time.monotonic() + step.seconds
            # measurements on a fixed cadence (scrape and registry time are not added to it)
            next_at = time.monotonic() + self.plan.analysis_interval_s
            while True:
                time.sleep(max(0.0, min(next_at, deadline) - time.monotonic()))
                next_at = max(
                    next_at + self.plan.analysis_interval_s,
                    time.monotonic() + self.plan.analysis_interval_s / 4,
                )
                snap2 = self._scrape()
                final = time.monotonic() >= deadline - 1e-3
                if snap2 is None:
                    if final:  # the step cannot be judged without a measurement: extend it
                        deadline = time.monotonic() + self.plan.analysis_interval_s
                    continue
                try:
                    interval = self._decide(snap2, last)
                    whole = self._decide(snap2, step_start) if final else None
                except MeasurementError as exc:  # counters reset: the service restarted
                    if self.run.record_error(str(exc)) is RunStatus.ERROR:
                        raise _Stop("aborted", CanaryReason.MEASUREMENT_ERRORS, str(exc)) from None
                    step_start = last = snap2
                    deadline = max(deadline, time.monotonic() + step.seconds)
                    continue
                self._record(interval, final=False)  # raises on failure: rollback at once
                last = snap2
                if whole is not None:
                    self._record(whole, final=True)
                self._check_registry()  # nobody else moved the aliases meanwhile
                if whole is not None:
                    break

    def bake(
        self, baseline: VersionStats, baseline_labelled: VersionStats
    ) -> CanaryDecision | None:
        """New champion vs the previous champion's recorded canary-phase behaviour."""
        if self.plan.bake_s <= 0:
            return None
        self.step_index, self.weight = len(self.plan.steps), 1.0
        run = AnalysisRun(self.plan.policy)
        self.run = run
        try:
            start = self._scrape() or self.last_snapshot
        except _Stop as stop:
            return CanaryDecision(
                CanaryVerdict.INCONCLUSIVE, stop.reason, f"bake not judged: {stop.message}"
            )
        assert start is not None and self.phase_start is not None
        last, deadline = start, time.monotonic() + self.plan.bake_s
        decision: CanaryDecision | None = None
        next_at = time.monotonic() + self.plan.analysis_interval_s
        while time.monotonic() < deadline - 1e-3:
            time.sleep(max(0.0, min(next_at, deadline) - time.monotonic()))
            next_at = max(
                next_at + self.plan.analysis_interval_s,
                time.monotonic() + self.plan.analysis_interval_s / 4,
            )
            try:
                snap = self._scrape()
            except _Stop as stop:  # measurement errors in the bake: keep the champion, say so
                return CanaryDecision(
                    CanaryVerdict.INCONCLUSIVE, stop.reason, f"bake not judged: {stop.message}"
                )
            if snap is None:
                continue
            final = time.monotonic() >= deadline - 1e-3
            try:
                windows = [(snap.since(last, self.version), False)]
                if final:
                    windows.append((snap.since(start, self.version), True))
                labelled = snap.since(self.phase_start, self.version)
            except MeasurementError as exc:
                run.record_error(str(exc))
                last = start = snap
                continue
            for window, is_final in windows:
                decision, inputs = self._analyse(
                    baseline=baseline,
                    canary=window,
                    labelled_baseline=baseline_labelled,
                    labelled_canary=labelled,
                    baseline_kind="previous champion, recorded in the canary",
                )
                run.record(decision, final=is_final)
                self._keep(decision, inputs, phase="bake", final=is_final)
                self._note(
                    "bake",
                    verdict=decision.verdict.value,
                    reason=decision.reason.value,
                    message=decision.message,
                    final=is_final,
                )
                if run.status is RunStatus.FAILED:
                    return decision
            last = snap
        return decision


def run_canary_rollout(
    version: str,
    expected_champion: str | None,
    *,
    plan: CanaryPlan | None = None,
    service_url: str | None = None,
    run_key: str = "cli",
    actor: str | None = None,
    resume: bool = False,
    promoted_at: str | None = None,
) -> dict[str, Any]:
    """Canary ``version`` against ``expected_champion`` (the version the gate compared
    against) and promote it or roll it back. Returns the outcome record.

    ``promoted_at``: the time tagged on a promoted version — a DAG run's "now" (its
    ``run_after``), as the direct promotion tags it; the wall clock when not given (CLI).

    Raises ``RegistryConflict`` (nothing changed) when the champion is no longer the
    expected one — before any traffic moves, or at the final compare-and-set (then the
    canary is first taken out of traffic)."""
    from pipeline import registry
    from pipeline.serving import traffic
    from pipeline.settings import get_settings
    from pipeline.spec import active

    version = str(version)
    plan = plan or CanaryPlan.from_spec(active())
    url = service_url or get_settings().serving_url
    replicas = ReplicaSet.for_analysis(service_url)  # who each measurement reads
    actor = actor or "unknown"
    mv = registry.client().get_model_version(registry.model_name(), version)
    champ = registry.alias_version(registry.CHAMPION)
    champ_v = str(champ.version) if champ else None
    base: dict[str, Any] = {
        "kind": RECORD_KIND,
        "model_version": version,
        "champion_version": expected_champion,
        "service_url": url,
        "replicas": replicas.describe(),
        "plan": plan.to_dict(),
        "run_key": run_key,
        "actor": actor,
    }
    status = mv.tags.get("canary.status")
    if resume and expected_champion is None:
        expected_champion = mv.tags.get("canary.champion_version")
        base["champion_version"] = expected_champion
    if champ_v == version:
        return {
            **base,
            "verdict": "promoted",
            "reason": status or "already champion",
            "summary": f"v{version} is already champion",
            "idempotent": True,
        }
    if status == "rolled_back" and not resume:
        return {
            **base,
            "verdict": "rolled_back",
            "reason": mv.tags.get("canary.reason", ""),
            "summary": mv.tags.get("canary.summary", "rolled back earlier"),
            "idempotent": True,
        }
    if champ_v != (str(expected_champion) if expected_champion is not None else None):
        saw = f"v{expected_champion}" if expected_champion else "no champion"
        raise registry.RegistryConflict(
            f"champion is v{champ_v}, but the gate compared v{version} against {saw}; "
            "no traffic was moved — re-run the gate against the current champion"
        )
    if champ_v is None:
        replaced = registry.promote_champion(
            version,
            None,
            move=Move(
                Action.PROMOTE,
                actor,
                f"no champion to compare against: v{version} promoted directly",
                {"kind": RECORD_KIND, "reason": CanaryReason.NO_CHAMPION.value},
                run_key,
            ),
        )
        rec = {
            **base,
            "verdict": "promoted",
            "reason": CanaryReason.NO_CHAMPION.value,
            "previous_champion": replaced,
            "summary": f"no champion to compare against: v{version} promoted directly",
        }
        _finish(
            version,
            mv.run_id,
            rec,
            {"canary.status": "promoted", "canary.reason": CanaryReason.NO_CHAMPION.value},
        )
        return rec

    ro = _Rollout(version, champ_v, plan, url, run_key, actor, replicas)
    start_step = 0
    if resume and mv.tags.get("canary.state"):
        state = json.loads(mv.tags["canary.state"])
        ro.run.load_state_dict(state["run"])
        ro.run.resume()
        start_step = int(state["step"])
        ro.windows = ro.run.measurements  # >= the windows before the pause: no record overwritten
    registry.tag_version(
        version,
        {
            "canary.status": "running",
            "canary.champion_version": champ_v,
            "canary.started_by": actor,
            "canary.run_key": run_key,
        },
    )
    verdict, reason, message = "promoted", CanaryReason.HEALTHY, ""
    previous: str | None = None
    bake: CanaryDecision | None = None
    rolled_back_after_bake: dict[str, Any] | None = None
    baseline = baseline_labelled = None
    try:
        try:
            if not resume or traffic.read_state().canary != version:
                traffic.set_canary_weight(0.0)
                registry.set_alias(traffic.CANARY, version)
            ro.phase_start = ro._wait_for(
                f"load v{version} as canary",
                lambda s: (
                    s.serving.get("canary") == version and s.serving.get("champion") == champ_v
                ),
            )
            ro._note(
                "loaded", message=f"service serves canary v{version} beside champion v{champ_v}"
            )
            ro.steps(start_step)
        except _Stop as stop:
            verdict, reason, message = stop.verdict, stop.reason, stop.message
        snap = ro.last_snapshot
        if snap is not None and ro.phase_start is not None:
            try:
                baseline = snap.since(ro.phase_start, champ_v)
                baseline_labelled = baseline
            except MeasurementError:
                baseline = None
        if verdict == "promoted":
            message = (
                f"v{version} passed {len(plan.steps)} steps "
                f"({', '.join(f'{s.weight:.0%}' for s in plan.steps)}) against champion "
                f"v{champ_v}"
            )
            canary_decision = {
                "kind": RECORD_KIND,
                "verdict": "promoted",
                "reason": reason.value,
                "summary": message,
                "plan": plan.to_dict(),
                "record_uri": f"runs:/{mv.run_id}/{_RECORD_PATH}" if mv.run_id else None,
                "last_window": ro.decision_records[-1] if ro.decision_records else None,
            }
            move = Move(Action.CANARY_PROMOTE, actor, message, canary_decision, run_key)
            try:
                previous = registry.promote_champion(version, champ_v, move=move)
            except registry.RegistryConflict as exc:
                _out_of_traffic(version)
                registry.tag_version(
                    version, {"canary.status": "conflict", "canary.summary": str(exc)[:4000]}
                )
                raise
            _out_of_traffic(version)
            registry.tag_version(
                version,
                {
                    "promoted_at": promoted_at or _now(),
                    "promoted_by": actor,
                    "promoted.previous_champion": previous or "none",
                },
            )
            if baseline is not None:
                bake = ro.bake(baseline, baseline_labelled or baseline)
                if bake is not None and bake.verdict is CanaryVerdict.FAIL:
                    from pipeline.rollback import rollback_champion

                    rolled_back_after_bake = rollback_champion(
                        f"bake regression of v{version}: {bake.message}",
                        target_version=previous,
                        who=f"canary-bake ({actor})",
                        expected_champion=version,
                        run_key=f"{run_key}__bake_rollback",
                        source="canary_bake",
                        decision=bake.to_dict(),
                    )
                    verdict, reason = "rolled_back_after_bake", bake.reason
                    message = f"promoted, then rolled back in the bake: {bake.message}"
        elif verdict == "rolled_back" or verdict == "aborted":
            if verdict == "rolled_back" or traffic.read_state().canary == version:
                _out_of_traffic(version)
        # paused: weight and alias stay; a human resumes or aborts
    except BaseException:
        if verdict != "paused":
            try:
                _out_of_traffic(version)
            except Exception:  # noqa: BLE001 - best effort while failing
                log.exception("could not take v%s out of traffic", version)
        raise
    finally:
        ro.http.close()

    rec = {
        **base,
        "champion_version": champ_v,
        "verdict": verdict,
        "reason": reason.value,
        "summary": message,
        "step_reached": ro.step_index,
        "weight_reached": ro.weight,
        "previous_champion": previous,
        "analysis_run": ro.run.state_dict(),
        "measurements": ro.history,
        "baseline": {"version": champ_v, "stats": baseline.to_dict() if baseline else None},
        "bake": bake.to_dict() if bake else None,
        "rollback": rolled_back_after_bake,
        "seconds": round(time.monotonic() - ro.started, 3),
    }
    tags: dict[str, Any] = {
        "canary.status": {"promoted": "promoted", "paused": "paused", "aborted": "aborted"}.get(
            verdict, "rolled_back"
        ),
        "canary.reason": reason.value,
        "canary.summary": message[:4000],
        "canary.step": ro.step_index,
        "canary.weight_reached": ro.weight,
        "canary.finished_at": _now(),
    }
    if verdict == "rolled_back":
        tags.update(
            {"rolled_back": "true", "rollback_reason": f"canary {reason.value}: {message}"[:4000]}
        )
    if verdict == "paused":
        tags["canary.state"] = json.dumps({"step": ro.step_index, "run": ro.run.state_dict()})[
            :4900
        ]
    if bake is not None:
        tags.update({"bake.verdict": bake.verdict.value, "bake.reason": bake.reason.value})
    _finish(version, mv.run_id, rec, tags)
    _log_decision_records(version, mv.run_id, ro.decision_records)
    return rec


def _out_of_traffic(version: str) -> None:
    """Weight 0 first (the service stops routing at its next poll), then the alias."""
    from pipeline import registry
    from pipeline.serving import traffic

    traffic.set_canary_weight(0.0)
    if traffic.read_state().canary == version:
        registry.delete_alias(traffic.CANARY)


def _finish(version: str, run_id: str | None, rec: dict[str, Any], tags: dict[str, Any]) -> None:
    from pipeline import registry

    registry.tag_version(version, tags)
    if rec.get("verdict") in ("promoted", "rolled_back", "rolled_back_after_bake", "aborted"):
        held = registry.alias_version(registry.CHALLENGER)  # decided: no longer a candidate
        if held is not None and str(held.version) == str(version):
            registry.delete_alias(registry.CHALLENGER)
    if run_id:
        try:
            registry.log_record(run_id, RECORD_KIND, rec)
        except Exception:  # noqa: BLE001 - the tags carry the outcome; the record is the detail
            log.exception("could not log the canary record on run %s", run_id)
    log.info("canary v%s: %s (%s) — %s", version, rec["verdict"], rec["reason"], rec["summary"])


def _log_decision_records(version: str, run_id: str | None, records: list[dict[str, Any]]) -> None:
    """Each window's decision record on the version's run, beside ``canary_rollout.json``;
    a failure is a warning (the outcome is already decided, tagged and recorded)."""
    if not run_id or not records:
        return
    from pipeline import registry

    logged = 0
    try:
        for rec in records:
            path = decisions.record_path(KIND, f"step{rec['context']['window']}")
            registry.log_text(run_id, json.dumps(rec, indent=2, default=str), path)
            logged += 1
        log.info(
            "canary v%s: %d analysis decision records logged on run %s", version, logged, run_id
        )
    except Exception as exc:  # noqa: BLE001 - the audit trail must not change the outcome
        log.warning(
            "canary v%s: logged %d of %d analysis decision records on run %s, then: %s: %s",
            version,
            logged,
            len(records),
            run_id,
            type(exc).__name__,
            exc,
        )


def _now() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat(timespec="seconds")


def abort_canary(version: str, reason: str, who: str = "unknown") -> dict[str, Any]:
    """A human's answer to a paused (or any running) canary: out of traffic, tagged."""
    from pipeline import registry
    from pipeline.errors import PipelineRejection
    from pipeline.serving import traffic

    if len(reason.strip()) < 3:
        raise PipelineRejection("a reason of at least 3 characters is required")
    status = (
        registry.client()
        .get_model_version(registry.model_name(), str(version))
        .tags.get("canary.status")
    )
    if traffic.read_state().canary != str(version) and status not in ("running", "paused"):
        raise PipelineRejection(
            f"v{version} is not a running or paused canary (status {status!r}); nothing changed"
        )
    _out_of_traffic(str(version))
    tags = {
        "canary.status": "rolled_back",
        "canary.reason": CanaryReason.ABORTED.value,
        "canary.summary": f"aborted by {who}: {reason}"[:4000],
        "rolled_back": "true",
        "rollback_reason": f"canary aborted by {who}: {reason}"[:4000],
        "canary.finished_at": _now(),
    }
    mv = registry.client().get_model_version(registry.model_name(), str(version))
    rec = {
        "kind": RECORD_KIND,
        "model_version": str(version),
        "verdict": "rolled_back",
        "reason": CanaryReason.ABORTED.value,
        "summary": tags["canary.summary"],
        "actor": who,
    }
    _finish(str(version), mv.run_id, rec, tags)
    return rec
