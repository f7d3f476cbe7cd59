"""The rollout decision core: a rollout's state and one judging window's figures in, a decision out.

Pure functions (no database, no clock: ``now`` is passed in). The controller reads a
:class:`RolloutView` and :class:`Figures`, calls :func:`decide`, and commits the :class:`Decision`
by compare-and-set on ``state_version``.

**Order of a decision.** A rollout not ``running`` waits. Then the stage's gates are judged
(:func:`judge_gates`). A failed gate applies ``on_fail`` (``pause`` / ``abort``) at once — before any
assignment, so a failing version reaches no further device. Otherwise members that are due
(:func:`due`: waiting, online, inside their maintenance window, under ``max_concurrent``) are
assigned. Otherwise, when every gate passes: in phase ``shadow`` → ``promote_shadow``; in phase
``serve`` → ``advance`` to the next stage, or ``hold`` in the A/B stage (the first stage, when
``ab_version`` and ``hold_s`` are set), or ``complete`` after the last stage; in phase ``hold`` →
``advance`` (or ``complete``) once ``hold_s`` has passed since ``phase_started_at``. A stage still
undecided ``stage_timeout_s`` after ``stage_started_at`` applies ``on_fail`` with reason "stage
timeout" (not in phase ``hold``, whose length is ``hold_s``). After ``advance`` the new stage starts in
phase :func:`initial_phase` (``shadow`` when ``shadow_s`` is set).

**Gates.** ``soak``: every online member of the stage updated (none still waiting or assigned) and each
updated one has run the candidate ``soak_s`` (``shadow_s`` in phase shadow) since
``max(updated_at, phase_started_at)``; offline members are ignored; a stage with no online member
waits (and so times out). ``failure``: failed / (online or failed) members of the stage above
``max_failure`` fails at once. Comparative gates (``p95_ratio``, ``error_rate``, ``drift``,
``accuracy_ratio``) compare per-device figures of the candidate's devices with the baseline cohort's
(Hodges–Lehmann interval, Mann–Whitney p-value), each device needing ``min_samples`` inferences
(labelled predictions for accuracy) and each side ``min_devices`` such devices, else ``wait``.
``agreement`` (phase shadow only) is absolute: the pooled Wilson interval of agreed / compared over
the stage's shadow devices with ``min_samples`` comparisons each, against ``min_agreement``.
Decision rule: pass when the confidence bound on the regression is inside the threshold, fail when the
bound on the other side is outside it, else wait. A gate set to ``None`` is ``skip``.

**The last stage and tiny stages.** When the stage holds every member, there is no baseline left: the
comparative gates ``skip`` ("no baseline left") and the stage is judged on soak, failure and the
absolute limit of agreement (if a shadow phase is set). The same holds whenever one side can never
reach ``min_devices`` online devices (a stage of one device when ``min_devices`` is 2, or a single
device left outside the stage): the comparative gates ``skip`` with the counts in words, and the next
larger stage is where they judge. Failure still applies in a tiny stage at face value: one failure in
two devices is 50%. Agreement in a stage smaller than ``min_devices`` needs every online member's
comparisons (pooled), not ``min_devices`` devices. Offline members count toward neither side.

**A/B.** In the A/B stage (the first, when ``ab_version`` is set) members of arm ``b`` are assigned
``ab_version`` (``Decision.arm_b``); the gates judge arm a (``Figures.candidate``) against the baseline,
and the failure and soak gates cover both arms. ``ab`` results (error rate, p95 and accuracy of arm b
against arm a, with interval, p-value and whether the difference is significant) are reported and
never decide anything: their status is ``pass`` when computed, ``wait`` when data is short.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from edgefleet.server.rollouts.codec import parse_window
from edgefleet.server.rollouts.stats import hodges_lehmann, mann_whitney, ratio_interval, wilson
from edgefleet.server.rollouts.types import (
    Decision,
    DeviceFigures,
    Figures,
    GateResult,
    Gates,
    GateStatus,
    Member,
    Phase,
    RolloutView,
)

__all__ = [
    "decide",
    "due",
    "in_flight",
    "in_window",
    "initial_phase",
    "judge_gates",
    "stage_members",
    "stage_size",
]

_COMPARATIVE = ("p95_ratio", "error_rate", "drift", "accuracy_ratio")


# -- membership ----------------------------------------------------------------------------------------


def _eligible(view: RolloutView) -> list[Member]:
    return sorted((m for m in view.members if m.status != "skipped"), key=lambda m: (m.rank, m.device_id))


def stage_size(view: RolloutView, k: int) -> int:
    """How many members stage ``k`` holds: ``ceil(stages[k] / 100 * n)``, n the members not skipped."""
    n = sum(1 for m in view.members if m.status != "skipped")
    pct = view.gates.stages[k]
    return min(n, math.ceil(pct * n / 100 - 1e-9))


def stage_members(view: RolloutView, k: int) -> list[Member]:
    """The members of stage ``k``: the first :func:`stage_size` by rank among those not skipped
    (cumulative: stage k holds stage k-1's members). Stable: ranks never change."""
    return _eligible(view)[: stage_size(view, k)]


def in_window(spec: str, now: float) -> bool:
    """Whether ``now`` (Unix seconds) is inside the UTC window ``"HH:MM-HH:MM"`` (may cross midnight;
    start included, end excluded). Raises ``ValueError`` for a malformed window."""
    start, end = parse_window(spec)
    t = datetime.fromtimestamp(now, UTC)
    minute = t.hour * 60 + t.minute
    if start < end:
        return start <= minute < end
    return minute >= start or minute < end


def _windows_open(gates: Gates, member: Member, now: float) -> bool:
    specs = [spec for tag, spec in gates.windows if tag in member.tags]
    return not specs or any(in_window(s, now) for s in specs)


def in_flight(view: RolloutView) -> int:
    """Members assigned but not yet updated or failed, online ones only (what ``max_concurrent`` caps)."""
    return sum(1 for m in view.members if m.status == "assigned" and m.online)


def due(view: RolloutView, now: float) -> list[Member]:
    """Members of the current stage to assign now, by rank: ``waiting``, online, inside one of their
    tags' maintenance windows (a member with no windowed tag is always inside), at most
    ``max_concurrent - in_flight`` of them."""
    out = [
        m
        for m in stage_members(view, view.stage)
        if m.status == "waiting" and m.online and _windows_open(view.gates, m, now)
    ]
    cap = view.gates.max_concurrent
    if cap is not None:
        out = out[: max(0, cap - in_flight(view))]
    return out


def initial_phase(gates: Gates) -> Phase:
    """The phase a stage starts in: ``shadow`` when ``shadow_s`` is set, else ``serve``."""
    return "shadow" if gates.shadow_s is not None else "serve"


def _ab_stage(view: RolloutView) -> bool:
    return view.gates.ab_version is not None and view.stage == 0


# -- words ---------------------------------------------------------------------------------------------


def _n(x: float | None) -> str:
    """A figure in words: 2.01, 0.0123, 3e-5, 700."""
    if x is None or math.isnan(x):
        return "?"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    if abs(x) >= 1e-3:
        return f"{x:.3g}"
    return _p(x)


def _pct(r: float) -> str:
    return f"{r * 100:.3g}%"


def _p(p: float | None) -> str:
    if p is None:
        return "?"
    if p != 0 and abs(p) < 1e-3:
        return re.sub(r"e([+-])0*(\d)", r"e\1\2", f"{p:.0e}").replace("e+", "e")
    return f"{p:.2g}"


def _fin(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _stage_words(view: RolloutView, k: int) -> str:
    return f"stage {k + 1} ({view.gates.stages[k]}%)"


# -- gates ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Stage:
    members: list[Member]  # of the stage, not released
    online: list[Member]
    candidate_capacity: int  # online members that can give candidate (arm a) figures
    baseline_capacity: int  # online members outside the stage, still on the previous version
    last: bool


def _stage(view: RolloutView) -> _Stage:
    members = [m for m in stage_members(view, view.stage) if m.status != "released"]
    inside = {m.device_id for m in stage_members(view, view.stage)}
    online = [m for m in members if m.online]
    cand = [m for m in online if m.status != "failed" and (not _ab_stage(view) or m.arm == "a")]
    base = [m for m in view.members if m.device_id not in inside and m.online and m.status == "waiting"]
    last = stage_size(view, view.stage) >= sum(1 for m in view.members if m.status != "skipped")
    return _Stage(members, online, len(cand), len(base), last)


def _soak(view: RolloutView, st: _Stage, now: float) -> GateResult:
    need = view.gates.shadow_s if view.phase == "shadow" and view.gates.shadow_s is not None else view.gates.soak_s
    what = "in shadow" if view.phase == "shadow" else "serving"
    if not st.online:
        return GateResult("soak", "wait", threshold=need, detail="soak: no online member in the stage")
    pending = [m for m in st.online if m.status in ("waiting", "assigned")]
    updated = [m for m in st.online if m.status == "updated"]
    if pending:
        return GateResult(
            "soak", "wait", threshold=need, n_candidate=len(updated),
            detail=f"soak: {len(updated)} of {len(st.online)} online members updated, {len(pending)} pending",
        )
    if not updated:
        return GateResult("soak", "wait", threshold=need, detail="soak: no online member runs the candidate")
    soaked = min(now - max(m.updated_at or now, view.phase_started_at) for m in updated)
    status: GateStatus = "pass" if soaked >= need else "wait"
    verb = ">=" if status == "pass" else "<"
    return GateResult(
        "soak", status, threshold=need, estimate=soaked, n_candidate=len(updated),
        detail=f"soak: {len(updated)} online members {what}, the shortest for {soaked:.0f}s {verb} {need:.0f}s",
    )


def _failure(view: RolloutView, st: _Stage) -> GateResult:
    limit = view.gates.max_failure
    counted = [m for m in st.members if m.online or m.status == "failed"]
    failed = sum(1 for m in counted if m.status == "failed")
    if not counted:
        return GateResult("failure", "wait", threshold=limit, detail="failure: no online member in the stage")
    ratio = failed / len(counted)
    status: GateStatus = "fail" if ratio > limit else "pass"
    op = ">" if status == "fail" else "<="
    return GateResult(
        "failure", status, threshold=limit, estimate=ratio, n_candidate=len(counted),
        detail=f"failure {failed} of {len(counted)} ({_pct(ratio)}) {op} {_pct(limit)}",
    )


@dataclass(frozen=True)
class _Metric:
    name: str
    words: str  # "p95 ratio"
    value: Callable[[DeviceFigures], float | None]
    samples: Callable[[DeviceFigures], int]
    unit: str  # "inferences" / "labelled predictions"


def _error_rate(f: DeviceFigures) -> float | None:
    return f.errors / f.inferences if f.inferences > 0 else None


def _pos(v: float | None) -> float | None:
    return v if v is not None and v > 0 and math.isfinite(v) else None


_P95 = _Metric("p95_ratio", "p95 ratio", lambda f: _pos(f.p95_s), lambda f: f.inferences, "inferences")
_ERR = _Metric("error_rate", "error rate difference", _error_rate, lambda f: f.inferences, "inferences")
_DRIFT = _Metric("drift", "psi_max difference", lambda f: f.psi_max, lambda f: f.inferences, "inferences")
_ACC = _Metric("accuracy_ratio", "accuracy ratio", lambda f: f.accuracy, lambda f: f.labelled, "labelled predictions")


def _pick(figs: dict[str, DeviceFigures], metric: _Metric, min_samples: int) -> tuple[list[float], int]:
    values: list[float] = []
    samples = 0
    for f in sorted(figs.values(), key=lambda f: f.device_id):
        v = metric.value(f)
        n = metric.samples(f)
        if v is not None and math.isfinite(v) and n >= min_samples:
            values.append(v)
            samples += n
    return values, samples


def _short_words(metric: _Metric, nc: int, nb: int, gates: Gates, sides: tuple[str, str]) -> str:
    return (
        f"{metric.words}: waiting for data: {nc} {sides[0]} and {nb} {sides[1]} devices have "
        f">= {gates.min_samples} {metric.unit}, {gates.min_devices} needed on each side"
    )


def _interval(metric: _Metric, c: list[float], b: list[float], conf: float) -> tuple[float, float, float] | None:
    """(estimate, low, high) on the metric's scale, or None when it cannot be formed."""
    if metric is _P95:
        return ratio_interval(c, b, conf)
    est, low, high = hodges_lehmann(c, b, conf)
    if metric is _ACC:
        med = statistics.median(b)
        if med <= 0:
            return None
        return 1 + est / med, 1 + low / med, 1 + high / med
    return est, low, high


def _comparative(
    view: RolloutView, st: _Stage, figures: Figures, metric: _Metric, threshold: float | None
) -> GateResult:
    g = view.gates
    name = metric.name
    if threshold is None:
        return GateResult(name, "skip", detail=f"{metric.words}: not set")
    if view.phase == "shadow":
        return GateResult(name, "skip", threshold=threshold,
                          detail=f"{metric.words}: the candidate is not serving yet (shadow)")
    if st.last or st.baseline_capacity == 0:
        return GateResult(name, "skip", threshold=threshold, detail=f"{metric.words}: no baseline left")
    if st.candidate_capacity < g.min_devices or st.baseline_capacity < g.min_devices:
        return GateResult(
            name, "skip", threshold=threshold,
            detail=(f"{metric.words}: too few devices to compare ({st.candidate_capacity} online in the stage, "
                    f"{st.baseline_capacity} outside, {g.min_devices} needed on each side)"),
        )
    c, sc = _pick(figures.candidate, metric, g.min_samples)
    b, sb = _pick(figures.baseline, metric, g.min_samples)
    counts = {"n_candidate": len(c), "n_baseline": len(b), "samples_candidate": sc, "samples_baseline": sb}
    if len(c) < g.min_devices or len(b) < g.min_devices:
        return GateResult(name, "wait", threshold=threshold, **counts,
                          detail=_short_words(metric, len(c), len(b), g, ("candidate", "baseline")))
    iv = _interval(metric, c, b, g.confidence)
    _, p = mann_whitney(c, b)
    if iv is None:
        return GateResult(name, "wait", threshold=threshold, p_value=p, **counts,
                          detail=f"{metric.words}: the baseline's median is 0: no ratio")
    est, low, high = iv
    status: GateStatus
    if metric is _ACC:  # a lower bound: the candidate must keep at least threshold of the baseline
        status = "pass" if low >= threshold else "fail" if high < threshold else "wait"
        op = {"pass": ">=", "fail": "<", "wait": "straddles"}[status]
    else:
        status = "pass" if high <= threshold else "fail" if low > threshold else "wait"
        op = {"pass": "<=", "fail": ">", "wait": "straddles"}[status]
    words = (f"{metric.words} {_n(est)} [{_n(low)}, {_n(high)}] {op} {threshold:g} with {len(c)} vs {len(b)} "
             f"devices, p={_p(p)}")
    if not (math.isfinite(low) and math.isfinite(high)):
        words += f" (too few devices for a {g.confidence:.0%} interval)"
    return GateResult(name, status, threshold=threshold, estimate=est, low=_fin(low), high=_fin(high), p_value=p,
                      **counts, detail=words)


def _agreement(view: RolloutView, st: _Stage, figures: Figures) -> GateResult:
    g = view.gates
    t = g.min_agreement
    if g.shadow_s is None:
        return GateResult("agreement", "skip", detail="agreement: no shadow phase set")
    if view.phase != "shadow":
        return GateResult("agreement", "skip", threshold=t, detail="agreement: judged in the shadow phase only")
    devices = [f for f in figures.shadow.values() if f.shadow_compared >= g.min_samples]
    need = min(g.min_devices, max(1, len(st.online)))
    compared = sum(f.shadow_compared for f in devices)
    agreed = sum(min(f.shadow_agreed, f.shadow_compared) for f in devices)
    if len(devices) < need:
        return GateResult(
            "agreement", "wait", threshold=t, n_candidate=len(devices), samples_candidate=compared,
            detail=(f"agreement: waiting for data: {len(devices)} shadow devices have >= {g.min_samples} "
                    f"comparisons, {need} needed"),
        )
    est, low, high = wilson(agreed, compared, g.confidence)
    status: GateStatus = "pass" if low >= t else "fail" if high < t else "wait"
    op = {"pass": ">=", "fail": "<", "wait": "straddles"}[status]
    return GateResult(
        "agreement", status, threshold=t, estimate=est, low=low, high=high, n_candidate=len(devices),
        samples_candidate=compared,
        detail=(f"agreement {_n(est)} [{_n(low)}, {_n(high)}] {op} {t:g} over {compared} comparisons "
                f"on {len(devices)} devices"),
    )


def _ab(view: RolloutView, figures: Figures) -> list[GateResult]:
    g = view.gates
    out: list[GateResult] = []
    for metric in (_ERR, _P95, _ACC):
        label = {"error_rate": "error rate b-a", "p95_ratio": "p95 ratio b/a", "accuracy_ratio": "accuracy b-a"}
        words = f"A/B {label[metric.name]}"
        b, sb = _pick(figures.candidate_b, metric, g.min_samples)
        a, sa = _pick(figures.candidate, metric, g.min_samples)
        counts = {"n_candidate": len(b), "n_baseline": len(a), "samples_candidate": sb, "samples_baseline": sa}
        if len(a) < g.min_devices or len(b) < g.min_devices:
            out.append(GateResult("ab", "wait", **counts, detail=_short_words(
                _Metric(metric.name, words, metric.value, metric.samples, metric.unit), len(b), len(a), g, ("b", "a"))))
            continue
        if metric is _P95:
            est, low, high = ratio_interval(b, a, g.confidence)
            null = 1.0
        else:
            est, low, high = hodges_lehmann(b, a, g.confidence)
            null = 0.0
        _, p = mann_whitney(b, a)
        significant = (low > null or high < null) and p < 1 - g.confidence
        out.append(GateResult(
            "ab", "pass", threshold=null, estimate=est, low=_fin(low), high=_fin(high), p_value=p, **counts,
            detail=(f"{words} {_n(est)} [{_n(low)}, {_n(high)}] with {len(b)} vs {len(a)} devices, p={_p(p)}: "
                    f"{'significant' if significant else 'not significant'}"),
        ))
    return out


def judge_gates(view: RolloutView, figures: Figures, now: float) -> tuple[GateResult, ...]:
    """Every gate of the current stage and phase (and, in the A/B stage, the ``ab`` results)."""
    st = _stage(view)
    g = view.gates
    results = [
        _soak(view, st, now),
        _failure(view, st),
        _comparative(view, st, figures, _P95, g.max_p95_ratio),
        _comparative(view, st, figures, _ERR, g.max_error_rate),
        _comparative(view, st, figures, _DRIFT, g.max_drift),
        _comparative(view, st, figures, _ACC, g.min_accuracy_ratio),
        _agreement(view, st, figures),
    ]
    if _ab_stage(view) and view.phase != "shadow":
        results.extend(_ab(view, figures))
    return tuple(results)


# -- the decision --------------------------------------------------------------------------------------


def _join(results: Sequence[GateResult]) -> str:
    return "; ".join(r.detail for r in results)


def decide(view: RolloutView, figures: Figures, now: float) -> Decision:
    """The next step of ``view`` given the judging window's ``figures`` at time ``now`` (see the module
    docstring for the order). ``Decision.reason`` is one sentence with the figures that made it."""
    g = view.gates
    if view.state != "running":
        return Decision("wait", f"rollout {view.id} is {view.state}: nothing moves")
    k = view.stage
    where = _stage_words(view, k)
    results = judge_gates(view, figures, now)
    deciding = [r for r in results if r.name != "ab"]
    failed = [r for r in deciding if r.status == "fail"]
    if failed:
        return Decision(g.on_fail, f"{where}: {_join(failed)}: {g.on_fail}", results)
    todo = due(view, now)
    if todo:
        ab = _ab_stage(view)
        ids = tuple(m.device_id for m in todo)
        arm_b = tuple(m.device_id for m in todo if ab and m.arm == "b")
        what = "the shadow candidate" if view.phase == "shadow" else f"version {view.version}"
        extra = f" ({len(arm_b)} of them {g.ab_version})" if arm_b else ""
        return Decision("assign", f"{where}: assign {what} to {len(ids)} due members{extra}", results,
                        assign=ids, arm_b=arm_b)
    last = k == len(g.stages) - 1
    nxt = f"advance to {_stage_words(view, k + 1)}" if not last else "complete"
    if view.phase == "hold":
        held = now - view.phase_started_at
        hold = g.hold_s or 0.0
        if held >= hold:
            ab_words = _join([r for r in results if r.name == "ab"]) or "no A/B figures"
            return Decision("complete" if last else "advance",
                            f"{where}: A/B hold of {hold:.0f}s over ({ab_words}): {nxt}",
                            results, stage=None if last else k + 1)
        return Decision("wait", f"{where}: holding A/B for {hold - held:.0f}s more", results)
    waiting = [r for r in deciding if r.status == "wait"]
    if not waiting:
        passed = [r for r in deciding if r.status == "pass"]
        summary = f"gates passed ({_join(passed)})"
        if view.phase == "shadow":
            return Decision("promote_shadow", f"{where}: shadow {summary}: promote the candidate to serve", results)
        if _ab_stage(view) and g.hold_s is not None:
            return Decision("hold", f"{where}: {summary}: hold the A/B comparison for {g.hold_s:.0f}s", results)
        return Decision("complete" if last else "advance", f"{where}: {summary}: {nxt}", results,
                        stage=None if last else k + 1)
    elapsed = now - view.stage_started_at
    if elapsed > g.stage_timeout_s:
        return Decision(
            g.on_fail,
            f"{where}: stage timeout after {elapsed:.0f}s > {g.stage_timeout_s:.0f}s, undecided: "
            f"{_join(waiting)}: {g.on_fail}",
            results,
        )
    return Decision("wait", f"{where}: waiting: {_join(waiting)}", results)
