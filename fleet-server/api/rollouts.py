"""The rollouts API (see :mod:`edgefleet.server.rollouts` and docs/rollouts.md).

- ``POST /api/v1/rollouts`` (operator) creates one: 201 with the rollout, its members by status and
  the skipped devices with their reasons; 409 when no device was selected or none would change.
- ``GET /api/v1/rollouts?model=&state=&limit=&offset=`` (viewer), newest first.
- ``GET /api/v1/rollouts/{id}`` (viewer): the rollout, its stages with their members by status, the
  last judgement's gates (figures, intervals, sample sizes, p-values), the A/B comparison, and the
  state in one explanation.
- ``GET /api/v1/rollouts/{id}/members?status=&limit=&offset=`` (viewer), by rank.
- ``POST /api/v1/rollouts/{id}/pause|resume|abort|promote`` (operator), an optional body
  ``{"reason", "state_version"}`` (promote also ``"version"``): fenced by the rollout's state version,
  409 "changed meanwhile, retry" when a controller or another operator won.

Pins are device routes (``PUT``/``DELETE /api/v1/devices/{id}/pins/{model}``, in ``devices.py``).
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from edgefleet.server.api.deps import Actor, SessionDep, StateDep, require
from edgefleet.server.api.devices import _director, _push_check_in
from edgefleet.server.api.rollout_schemas import (
    ActionIn,
    GateOut,
    MemberOut,
    PromoteIn,
    RolloutIn,
    RolloutOut,
    RolloutSummaryOut,
    SkippedOut,
    StageOut,
)
from edgefleet.server.api.schemas import MODEL_NAME
from edgefleet.server.models import ModelVersion, Rollout, RolloutMember, utcnow
from edgefleet.server.rollouts import service
from edgefleet.server.rollouts.types import MEMBER_STATUSES, ROLLOUT_STATES
from edgefleet.server.state import ServerState

__all__ = ["describe", "router"]

router = APIRouter(prefix="/api/v1", tags=["rollouts"])
RolloutId = Annotated[int, Path(ge=1, le=2**31 - 1)]
SKIPPED_SHOWN = 100
MAX_MEMBERS = 1000  # per page of GET /rollouts/{id}/members
_STATE = "^(" + "|".join(ROLLOUT_STATES) + ")$"
_STATUS = "^(" + "|".join(MEMBER_STATUSES) + ")$"


def _versions(s: Session, ids: set[int | None]) -> dict[int, str]:
    wanted = {i for i in ids if i is not None}
    if not wanted:
        return {}
    return dict(s.execute(select(ModelVersion.id, ModelVersion.version).where(ModelVersion.id.in_(wanted)))
                .all())


def _summary(r: Rollout, names: dict[int, str]) -> dict[str, Any]:
    stages = r.gates.get("stages") or [100]
    return {
        "id": r.id, "model": r.model, "version": names.get(r.version_id, "?"),
        "version_b": names.get(r.version_b_id) if r.version_b_id is not None else None, "tags": list(r.tags),
        "state": r.state, "stage": r.stage, "stage_percent": stages[min(r.stage, len(stages) - 1)], "phase": r.phase,
        "state_version": r.state_version, "reason": r.reason, "created_at": r.created_at,
        "created_by": r.created_by, "updated_at": r.updated_at, "ended_at": r.ended_at,
    }


def _words(r: Rollout, counts: Counter[str], stage: StageOut | None, total: int) -> str:
    """The state in one paragraph: where it is, what its members do, what the last decision said."""
    n = len(r.gates.get("stages") or [])
    what = {"running": "running", "paused": "paused: nothing moves until `rollout resume`",
            "aborted": "aborted: the devices it touched were given back their previous version",
            "completed": "completed: every member runs the new version"}.get(r.state, r.state)
    parts = [f"rollout {r.id} of {r.model} is {what}."]
    if stage is not None and r.state in ("running", "paused"):
        phase = {"shadow": "the candidate runs in shadow beside the served version",
                 "serve": "the stage's members serve the candidate",
                 "hold": "the A/B comparison is held"}.get(r.phase, r.phase)
        parts.append(f"Stage {stage.number} of {n} ({stage.percent}%, {stage.devices} of {total} devices): {phase}.")
    if total:
        shown = ", ".join(f"{counts[k]} {k}" for k in MEMBER_STATUSES if counts.get(k))
        parts.append(f"Members: {shown}.")
    if r.reason:
        parts.append(f"Last decision: {r.reason}.")
    return " ".join(parts)


def describe(s: Session, r: Rollout) -> RolloutOut:
    """The detail view of one rollout (one read of its members)."""
    names = _versions(s, {r.version_id, r.version_b_id})
    members = list(s.execute(select(RolloutMember.device_id, RolloutMember.status, RolloutMember.detail)
                             .where(RolloutMember.rollout_id == r.id)
                             .order_by(RolloutMember.rank, RolloutMember.device_id)))
    counts = Counter(status for _, status, _ in members)
    eligible = [status for _, status, _ in members if status != "skipped"]
    gates = service.gates_of(r)
    sizes = service.stage_sizes(gates, len(eligible))
    stages, start = [], 0
    for k, (pct, size) in enumerate(zip(gates.stages, sizes, strict=True)):
        stages.append(StageOut(number=k + 1, percent=pct, devices=size, current=k == r.stage,
                               members=dict(Counter(eligible[start:size]))))
        start = max(start, size)
    results = [GateOut(**g) for g in (r.last_gates or []) if isinstance(g, dict)]
    current = stages[r.stage] if r.stage < len(stages) else None
    skipped = [SkippedOut(device_id=d, detail=detail) for d, status, detail in members if status == "skipped"]
    return RolloutOut(
        **_summary(r, names), stages=stages, stage_started_at=r.stage_started_at,
        phase_started_at=r.phase_started_at, last_judged_at=r.last_judged_at, gates=dict(r.gates),
        members={**{k: counts.get(k, 0) for k in MEMBER_STATUSES}, "total": len(members)},
        last_gates=[g for g in results if g.name != "ab"], ab=[g for g in results if g.name == "ab"],
        explanation=_words(r, counts, current, len(eligible)), skipped=skipped[:SKIPPED_SHOWN],
    )


def _get(s: Session, rollout_id: int) -> Rollout:
    r = s.get(Rollout, rollout_id)
    if r is None:
        from edgefleet.server.errors import ApiError

        raise ApiError(404, f"rollout_id: no rollout {rollout_id}", "rollout_id")
    return r


@router.post("/rollouts", response_model=RolloutOut, status_code=201)
def create_rollout(
    body: RolloutIn, request: Request, state: StateDep, actor: Annotated[Actor, Depends(require("operator"))]
) -> RolloutOut:
    """Create a rollout. Its members are fixed now (by a stable hash of rollout and device); the
    controller assigns the first stage on its next tick."""
    director = _director(request)
    with state.sessions.begin() as s:
        r = service.create(s, director, body.model, body.version, tags=body.tags, gates=body.gates(),
                           version_b=body.version_b, actor=actor.label, now=utcnow())
        return describe(s, r)


@router.get("/rollouts", response_model=list[RolloutSummaryOut])
def list_rollouts(
    s: SessionDep,
    _: Annotated[Actor, Depends(require("viewer"))],
    model: Annotated[str | None, Query(pattern=MODEL_NAME)] = None,
    state: Annotated[str | None, Query(pattern=_STATE, description="running | paused | aborted | completed")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> list[RolloutSummaryOut]:
    """Rollouts, newest first."""
    q = select(Rollout).order_by(Rollout.id.desc())
    if model is not None:
        q = q.where(Rollout.model == model)
    if state is not None:
        q = q.where(Rollout.state == state)
    rows = list(s.scalars(q.limit(limit).offset(offset)))
    ids: set[int | None] = {r.version_id for r in rows}
    ids.update(r.version_b_id for r in rows)
    names = _versions(s, ids)
    return [RolloutSummaryOut(**_summary(r, names)) for r in rows]


@router.get("/rollouts/{rollout_id}", response_model=RolloutOut)
def show_rollout(
    rollout_id: RolloutId, s: SessionDep, _: Annotated[Actor, Depends(require("viewer"))]
) -> RolloutOut:
    return describe(s, _get(s, rollout_id))


@router.get("/rollouts/{rollout_id}/members", response_model=list[MemberOut])
def list_members(
    rollout_id: RolloutId,
    s: SessionDep,
    _: Annotated[Actor, Depends(require("viewer"))],
    status: Annotated[str | None, Query(pattern=_STATUS)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_MEMBERS)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> list[MemberOut]:
    """The rollout's members by rank (the order stages take them in)."""
    r = _get(s, rollout_id)
    gates = service.gates_of(r)
    ranks = sorted(s.scalars(select(RolloutMember.rank).where(RolloutMember.rollout_id == r.id,
                                                             RolloutMember.status != "skipped")))
    sizes = service.stage_sizes(gates, len(ranks))
    q = select(RolloutMember).where(RolloutMember.rollout_id == r.id)
    if status is not None:
        q = q.where(RolloutMember.status == status)
    rows = list(s.scalars(q.order_by(RolloutMember.rank, RolloutMember.device_id).limit(limit).offset(offset)))
    names = _versions(s, {m.previous_version_id for m in rows})
    out: list[MemberOut] = []
    for m in rows:
        stage = None
        if m.status != "skipped":  # its place among the eligible members decides its stage
            before = bisect.bisect_left(ranks, m.rank)
            stage = next((k + 1 for k, size in enumerate(sizes) if before < size), len(sizes))
        out.append(MemberOut(
            device_id=m.device_id, rank=m.rank, stage=stage, arm=m.arm, status=m.status,
            previous_version=names.get(m.previous_version_id) if m.previous_version_id is not None else None,
            assigned_at=m.assigned_at, updated_at=m.updated_at, detail=m.detail,
        ))
    return out


def _act(request: Request, state: ServerState, rollout_id: int,
         do: Callable[[Session, Any], service.Outcome]) -> RolloutOut:
    director = _director(request)
    with state.sessions.begin() as s:
        outcome = do(s, director)
        out = describe(s, _get(s, rollout_id))
    for device_id in outcome.push:  # committed: the devices may check in now
        _push_check_in(state, device_id)
    return out


_operator = Depends(require("operator"))


@router.post("/rollouts/{rollout_id}/pause", response_model=RolloutOut)
def pause_rollout(rollout_id: RolloutId, request: Request, state: StateDep,
                  actor: Annotated[Actor, _operator], body: ActionIn | None = None) -> RolloutOut:
    """Pause: nothing is assigned or judged until resume (a paused rollout: unchanged)."""
    b = body or ActionIn()
    return _act(request, state, rollout_id, lambda s, _d: service.pause(
        s, rollout_id, actor=actor.label, now=utcnow(), reason=b.reason, state_version=b.state_version))


@router.post("/rollouts/{rollout_id}/resume", response_model=RolloutOut)
def resume_rollout(rollout_id: RolloutId, request: Request, state: StateDep,
                   actor: Annotated[Actor, _operator], body: ActionIn | None = None) -> RolloutOut:
    """Resume a paused rollout; the stage clock restarts (a running rollout: unchanged)."""
    b = body or ActionIn()
    return _act(request, state, rollout_id, lambda s, _d: service.resume(
        s, rollout_id, actor=actor.label, now=utcnow(), reason=b.reason, state_version=b.state_version))


@router.post("/rollouts/{rollout_id}/abort", response_model=RolloutOut)
def abort_rollout(rollout_id: RolloutId, request: Request, state: StateDep,
                  actor: Annotated[Actor, _operator], body: ActionIn | None = None) -> RolloutOut:
    """Abort: every device the rollout touched gets back the version it had before."""
    b = body or ActionIn()
    return _act(request, state, rollout_id, lambda s, d: service.abort(
        s, d, rollout_id, actor=actor.label, now=utcnow(), reason=b.reason, state_version=b.state_version))


@router.post("/rollouts/{rollout_id}/promote", response_model=RolloutOut)
def promote_rollout(rollout_id: RolloutId, request: Request, state: StateDep,
                    actor: Annotated[Actor, _operator], body: PromoteIn | None = None) -> RolloutOut:
    """Advance the current stage now, skipping its gates (in phase shadow: serve the candidate now; in
    an A/B hold, ``version`` picks the winner)."""
    b = body or PromoteIn()
    return _act(request, state, rollout_id, lambda s, d: service.promote(
        s, d, rollout_id, actor=actor.label, now=utcnow(), version=b.version, reason=b.reason,
        state_version=b.state_version))
