"""The data the rollout decision core works on: a rollout's parameters (:class:`Gates`), its state as
the controller read it (:class:`RolloutView`, :class:`Member`), the telemetry figures of one judging
window (:class:`Figures`, :class:`DeviceFigures`) and what the core decides (:class:`Decision`,
:class:`GateResult`). Plain frozen dataclasses: no database, no clock, no I/O. Times are Unix seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "ACTIVE_STATES",
    "MEMBER_STATUSES",
    "ROLLOUT_STATES",
    "Action",
    "Decision",
    "DeviceFigures",
    "Figures",
    "GateResult",
    "GateStatus",
    "Gates",
    "Member",
    "MemberStatus",
    "Phase",
    "RolloutState",
    "RolloutView",
]

RolloutState = Literal[
    "running",  # the controller judges it and advances it by itself
    "paused",  # a gate failed with on_fail=pause, or an operator paused it: nothing moves until resume
    "aborted",  # rolled back: every touched device was given back the version it had before
    "completed",  # the last stage passed: every member runs the new version
]
ROLLOUT_STATES: tuple[str, ...] = ("running", "paused", "aborted", "completed")
ACTIVE_STATES: tuple[str, ...] = ("running", "paused")  # a device in one of these is "in a rollout"

Phase = Literal[
    "shadow",  # the stage's members run the candidate beside their served version (role "shadow")
    "serve",  # the stage's members serve the candidate (or, in an A/B stage, version A or B)
    "hold",  # an A/B stage past its gates, held for ``hold_s`` for the comparison
]

MemberStatus = Literal[
    "waiting",  # not in a stage yet (or its stage's assignment is not due: download cap, window)
    "assigned",  # the rollout assigned it the candidate (serve or shadow); not confirmed yet
    "updated",  # it reported running the candidate (update.committed, or shadow installed)
    "failed",  # it refused the candidate (update.refused / update.rolled_back for its sha256)
    "skipped",  # never touched: pinned, or in another active rollout of the same model (``detail`` says)
    "released",  # an operator assigned or pinned it after the rollout took it: the rollout lets it be
]
MEMBER_STATUSES: tuple[str, ...] = ("waiting", "assigned", "updated", "failed", "skipped", "released")

GateStatus = Literal["pass", "fail", "wait", "skip"]

Action = Literal[
    "wait",  # nothing to change now (gates waiting for data or soak time)
    "assign",  # assign the candidate to ``Decision.assign`` (download cap / maintenance windows allow them)
    "promote_shadow",  # shadow gates passed: the stage's members serve the candidate at once (blue-green)
    "advance",  # the stage's gates passed: move to stage ``Decision.stage`` (its members get assigned)
    "hold",  # an A/B stage passed its gates: hold it for ``hold_s`` with both versions
    "complete",  # the last stage passed
    "pause",  # a gate failed (or the stage timed out) and on_fail is pause
    "abort",  # a gate failed (or the stage timed out) and on_fail is abort: roll the touched devices back
]


@dataclass(frozen=True)
class Gates:
    """A rollout's parameters, as ``rollout create`` took them (durations in seconds, ratios 0..1)."""

    stages: tuple[int, ...] = (1, 10, 50, 100)  # percent of the members, increasing, the last 100
    soak_s: float = 600.0  # an updated device must run the candidate this long before its stage passes
    max_failure: float = 0.05  # failed / online members of the stage above this fails the stage
    max_p95_ratio: float | None = 1.2  # candidate p95 / baseline p95: the upper confidence bound must be <=
    max_error_rate: float | None = 0.01  # candidate error rate - baseline error rate (absolute), upper bound <=
    max_drift: float | None = None  # candidate psi_max - baseline psi_max, upper bound <=
    min_accuracy_ratio: float | None = None  # candidate accuracy / baseline accuracy, lower bound >=
    shadow_s: float | None = None  # each stage first runs the candidate in shadow for at least this long
    min_agreement: float = 0.98  # shadow: lower confidence bound of the agreement must be >=
    ab_version: str | None = None  # an A/B stage: members alternate between ``version`` (a) and this (b)
    hold_s: float | None = None  # how long the A/B stage is held once its gates pass
    stage_timeout_s: float = 3600.0  # a stage still undecided this long after it started applies on_fail
    on_fail: Literal["pause", "abort"] = "pause"
    min_devices: int = 2  # devices with enough data a comparative gate needs on each side
    min_samples: int = 50  # inferences (or shadow comparisons, or labelled predictions) per such device
    confidence: float = 0.95  # two-sided level of the confidence bounds
    max_concurrent: int | None = None  # members assigned but not yet updated or failed, at most
    windows: tuple[tuple[str, str], ...] = ()  # (tag, "HH:MM-HH:MM" UTC): members with tag assigned only then


@dataclass(frozen=True)
class Member:
    """One device of the rollout (fixed at creation). ``rank``: its place in the order of
    sha256(rollout id, device id); stage k holds the first ceil(stages[k] / 100 * n) ranks of the
    members that are not skipped."""

    device_id: str
    rank: int
    status: MemberStatus
    arm: Literal["a", "b"] = "a"
    online: bool = True  # seen within the server's online window
    tags: tuple[str, ...] = ()
    previous: str | None = None  # the version it had before the rollout (None: no assignment)
    assigned_at: float | None = None
    updated_at: float | None = None  # when it was seen running the candidate
    detail: str = ""  # why skipped / failed


@dataclass(frozen=True)
class RolloutView:
    """A rollout as the controller read it (one transaction), with its members."""

    id: int
    model: str
    version: str  # the candidate (arm a)
    state: RolloutState
    stage: int  # index into gates.stages of the current stage
    phase: Phase
    stage_started_at: float
    phase_started_at: float
    state_version: int  # the fencing counter: a decision commits only if it is unchanged
    gates: Gates
    members: tuple[Member, ...]
    previous: str | None = None  # the version most members ran before (the baseline's version)


@dataclass(frozen=True)
class DeviceFigures:
    """One device's telemetry for one model version over the judging window (summed rollups)."""

    device_id: str
    version: str
    inferences: int = 0
    errors: int = 0
    p95_s: float | None = None  # from the summed latency histogram
    psi_max: float | None = None
    accuracy: float | None = None  # labelled predictions correct / labelled
    labelled: int = 0
    shadow_compared: int = 0  # shadow: live inputs the candidate also ran on
    shadow_agreed: int = 0  # ... of which the candidate agreed with the served model


@dataclass(frozen=True)
class Figures:
    """The judging window's figures: ``candidate`` (stage members serving the candidate, or in an A/B
    stage arm a), ``candidate_b`` (arm b), ``baseline`` (members of this rollout still serving the
    previous version, over the same window), ``shadow`` (stage members running the candidate in
    shadow: their served version's row carries the shadow counts). Keyed by device id."""

    since: float
    until: float
    candidate: dict[str, DeviceFigures] = field(default_factory=dict)
    candidate_b: dict[str, DeviceFigures] = field(default_factory=dict)
    baseline: dict[str, DeviceFigures] = field(default_factory=dict)
    shadow: dict[str, DeviceFigures] = field(default_factory=dict)


@dataclass(frozen=True)
class GateResult:
    """One gate's verdict with the figures that made it (what ``rollout show`` prints)."""

    name: str  # soak | failure | p95_ratio | error_rate | drift | accuracy_ratio | agreement | ab
    status: GateStatus
    threshold: float | None = None
    estimate: float | None = None  # the point estimate (ratio, difference, agreement)
    low: float | None = None  # the confidence interval on the estimate
    high: float | None = None
    p_value: float | None = None
    n_candidate: int = 0  # devices with enough data on each side
    n_baseline: int = 0
    samples_candidate: int = 0  # inferences / comparisons / labels behind them
    samples_baseline: int = 0
    detail: str = ""  # the verdict in words


@dataclass(frozen=True)
class Decision:
    """What the core decided, with every gate's figures and one sentence for the audit log."""

    action: Action
    reason: str
    gates: tuple[GateResult, ...] = ()
    assign: tuple[str, ...] = ()  # device ids to assign the candidate now
    stage: int | None = None  # advance: the new stage index
    arm_b: tuple[str, ...] = ()  # of ``assign``, those that get ``ab_version``
