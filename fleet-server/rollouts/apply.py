"""Committing a rollout decision: the compare-and-set that fences it, and what each action writes.

Every change to a rollout is ``cas`` first (``UPDATE rollouts SET state_version = state_version + 1
WHERE id = ? AND state_version = ?``), then, in the same transaction, :func:`apply_decision` (the
controller's decisions) or :func:`roll_back` (an abort, the controller's or an operator's). A caller
whose ``cas`` lost acted on a stale read: it applies nothing. Assignments go through
:mod:`edgefleet.server.rollouts.assign` (the precedence rule; director metadata signed in the same
transaction). The functions return the devices whose assignment changed: the caller publishes "check
in now" to them once the transaction committed (``notify_check_in``).

What each action writes (besides ``reason``, ``last_gates``, ``last_judged_at``, ``updated_at``, and an
audit entry ``rollout.<action>`` with the decision's figures, for every action but ``wait``):

- ``assign``: the due members get the candidate (arm ``b``: the A/B version); in phase ``shadow`` a
  member keeps the version it serves and runs the candidate beside it (a member serving nothing is
  assigned to serve it); status ``assigned``. A member that is no longer ``waiting`` (an operator
  released it meanwhile) or whose assignment is now a pin or another rollout's is left alone.
- ``promote_shadow``: every member running the candidate in shadow serves it at once (already
  installed: the switch is immediate); phase ``serve``.
- ``advance``: the next stage, in phase ``shadow`` when ``shadow_s`` is set, else ``serve``; leaving
  the A/B stage, the members of arm ``b`` are given the candidate.
- ``hold``: phase ``hold``. ``complete``: state ``completed`` (leaving the A/B stage as ``advance``
  does); members still ``waiting`` (offline through the last stage) are assigned the candidate then, and
  pick it up at their next check-in. ``pause``: state ``paused``. ``abort``: :func:`roll_back`.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from edgefleet.server.models import Assignment, ModelVersion, Rollout, RolloutMember
from edgefleet.server.rollouts import assign
from edgefleet.server.rollouts.codec import decision_to_json, gate_result_to_json, gates_from_json
from edgefleet.server.rollouts.judge import initial_phase
from edgefleet.server.rollouts.types import ACTIVE_STATES, Decision
from edgefleet.server.state import audit

if TYPE_CHECKING:
    from edgefleet.server.tuf.director import DirectorRepository

__all__ = ["apply_decision", "cas", "roll_back", "snapshot"]

_TOUCHED = ("assigned", "updated", "failed")


def cas(s: Session, rollout_id: int, state_version: int) -> bool:
    """Raise the rollout's ``state_version`` from ``state_version``: True when this caller won (the row
    was still at that version), False when someone changed the rollout since it was read."""
    done = s.execute(update(Rollout).where(Rollout.id == rollout_id, Rollout.state_version == state_version)
                     .values(state_version=Rollout.state_version + 1)
                     .execution_options(synchronize_session=False))
    return int(getattr(done, "rowcount", 0) or 0) == 1


def snapshot(r: Rollout) -> dict[str, Any]:
    """The rollout's state as the audit log records it."""
    return {"state": r.state, "stage": r.stage, "phase": r.phase, "state_version": int(r.state_version),
            "reason": r.reason}


def _finish(s: Session, rollout: Rollout, values: dict[str, Any]) -> None:
    s.execute(update(Rollout).where(Rollout.id == rollout.id).values(**values)
              .execution_options(synchronize_session=False))
    s.flush()
    s.expire_all()
    s.refresh(rollout)


def _members(s: Session, rollout_id: int, device_ids: list[str] | None = None,
             statuses: tuple[str, ...] | None = None) -> list[RolloutMember]:
    q = select(RolloutMember).where(RolloutMember.rollout_id == rollout_id)
    if device_ids is not None:
        q = q.where(RolloutMember.device_id.in_(device_ids))
    if statuses is not None:
        q = q.where(RolloutMember.status.in_(statuses))
    # device id order: the order every multi-device writer (the telemetry store) locks device rows in,
    # so two such transactions cannot deadlock on PostgreSQL
    return list(s.scalars(q.order_by(RolloutMember.device_id)))


def _assignments(s: Session, model: str, device_ids: list[str]) -> dict[str, tuple[int, str, int | None]]:
    if not device_ids:
        return {}
    a = Assignment
    rows = s.execute(select(a.device_id, a.version_id, a.source, a.shadow_version_id)
                     .where(a.model_name == model, a.device_id.in_(device_ids)))
    return {r.device_id: (int(r.version_id), r.source, r.shadow_version_id) for r in rows}


def _set_members(s: Session, rollout_id: int, device_ids: list[str], now: datetime, **values: Any) -> None:
    if device_ids:
        s.execute(update(RolloutMember)
                  .where(RolloutMember.rollout_id == rollout_id, RolloutMember.device_id.in_(device_ids))
                  .values(**values).execution_options(synchronize_session=False))


def _version_b(s: Session, rollout: Rollout) -> int | None:
    if rollout.version_b_id is not None:
        return rollout.version_b_id
    ab = gates_from_json(rollout.gates).ab_version
    if ab is None:
        return None
    found = s.scalar(select(ModelVersion.id).where(ModelVersion.name == rollout.model, ModelVersion.version == ab))
    return int(found) if found is not None else None


def _active_other_sources(s: Session, model: str, rollout_id: int) -> set[str]:
    ids = s.scalars(select(Rollout.id).where(Rollout.model == model, Rollout.id != rollout_id,
                                             Rollout.state.in_(ACTIVE_STATES)))
    return {assign.rollout_source(i) for i in ids}


def _assign(s: Session, director: DirectorRepository | None, rollout: Rollout, device_ids: tuple[str, ...],
            arm_b: set[str], now: datetime, serve: bool = False) -> list[str]:
    rid, model = rollout.id, rollout.model
    source = assign.rollout_source(rid)
    shadow = rollout.phase == "shadow" and not serve
    vb = _version_b(s, rollout) if arm_b else None
    # device id order: the order every multi-device writer (the telemetry store) locks device rows in
    members = sorted((m for m in _members(s, rid, list(device_ids)) if m.status == "waiting"),
                     key=lambda m: m.device_id)
    current = _assignments(s, model, [m.device_id for m in members])
    others = _active_other_sources(s, model, rid)
    changed: list[str] = []
    for m in members:
        cur = current.get(m.device_id)
        if cur is not None and (cur[1] == assign.PIN or cur[1] in others):
            continue  # a pin, or a device another active rollout governs: never ours to change
            # (an ended rollout's assignment is the standing one a new rollout replaces)
        version = vb if (m.device_id in arm_b and vb is not None) else rollout.version_id
        if shadow and cur is not None:
            assign.set_assignment(s, director, m.device_id, model, cur[0], source, shadow_version_id=version)
        else:
            assign.set_assignment(s, director, m.device_id, model, version, source)
        changed.append(m.device_id)
    _set_members(s, rid, changed, now, status="assigned", assigned_at=now, updated_at=now, detail="")
    return changed


def _promote(s: Session, director: DirectorRepository | None, rollout: Rollout, now: datetime) -> list[str]:
    """Every member running a candidate of this rollout in shadow serves it now."""
    rid, model = rollout.id, rollout.model
    members = _members(s, rid, statuses=("assigned", "updated"))
    current = _assignments(s, model, [m.device_id for m in members])
    changed: list[str] = []
    for m in members:
        cur = current.get(m.device_id)
        if cur is None or cur[2] is None or not assign.is_rollout_source(cur[1], rid):
            continue
        assign.set_assignment(s, director, m.device_id, model, cur[2], assign.rollout_source(rid))
        changed.append(m.device_id)
    _set_members(s, rid, changed, now, assigned_at=now)  # events from now on judge the switch
    return changed


def _leave_ab(s: Session, director: DirectorRepository | None, rollout: Rollout, now: datetime) -> list[str]:
    """Leaving the A/B stage: the members of arm b are given the candidate (version a)."""
    if rollout.stage != 0 or gates_from_json(rollout.gates).ab_version is None:
        return []
    rid, model = rollout.id, rollout.model
    members = [m for m in _members(s, rid, statuses=_TOUCHED) if m.arm == "b" and m.status != "failed"]
    current = _assignments(s, model, [m.device_id for m in members])
    changed: list[str] = []
    for m in members:
        cur = current.get(m.device_id)
        if cur is None or not assign.is_rollout_source(cur[1], rid) or cur[0] == rollout.version_id:
            continue
        assign.set_assignment(s, director, m.device_id, model, rollout.version_id, assign.rollout_source(rid))
        changed.append(m.device_id)
    _set_members(s, rid, changed, now, status="assigned", assigned_at=now, updated_at=now)
    return changed


def _restore(s: Session, director: DirectorRepository | None, rollout: Rollout) -> list[str]:
    changed: list[str] = []
    for m in _members(s, rollout.id, statuses=_TOUCHED):
        if assign.restore_previous(s, director, rollout.id, rollout.model, m):
            changed.append(m.device_id)
    return changed


def apply_decision(s: Session, director: DirectorRepository | None, rollout: Rollout, decision: Decision,
                   actor: str, now: datetime) -> list[str]:
    """Write ``decision`` on ``rollout`` in the caller's transaction, after the caller's :func:`cas`
    won (see the module docstring for each action). Returns the device ids whose assignment changed."""
    before = snapshot(rollout)
    gates = [gate_result_to_json(g) for g in decision.gates]
    values: dict[str, Any] = {"reason": decision.reason, "last_gates": gates, "last_judged_at": now,
                              "updated_at": now}
    changed: list[str] = []
    act = decision.action
    if act == "assign":
        changed = _assign(s, director, rollout, decision.assign, set(decision.arm_b), now)
    elif act == "promote_shadow":
        changed = _promote(s, director, rollout, now)
        values.update(phase="serve", phase_started_at=now)
    elif act == "advance":
        changed = _leave_ab(s, director, rollout, now)
        stage = decision.stage if decision.stage is not None else rollout.stage + 1
        phase = initial_phase(gates_from_json(rollout.gates))
        values.update(stage=stage, phase=phase, stage_started_at=now, phase_started_at=now)
    elif act == "hold":
        values.update(phase="hold", phase_started_at=now)
    elif act == "complete":
        changed = _leave_ab(s, director, rollout, now)
        # members still waiting (offline through the last stage, or a promote before the controller
        # assigned it) get the version now: each picks it up at its next check-in
        rest = tuple(m.device_id for m in _members(s, rollout.id, statuses=("waiting",)))
        changed += _assign(s, director, rollout, rest, set(), now, serve=True)
        values.update(state="completed", ended_at=now)
    elif act == "pause":
        values.update(state="paused")
    elif act == "abort":
        changed = _restore(s, director, rollout)
        values.update(state="aborted", ended_at=now)
    elif act != "wait":
        raise ValueError(f"decision.action: unknown action {act!r}")
    _finish(s, rollout, values)
    if act != "wait":
        after = {**snapshot(rollout), "decision": decision_to_json(decision), "devices_changed": len(changed)}
        audit(s, actor, f"rollout.{act}", f"rollout:{rollout.id}", before, after)
    return changed


def roll_back(s: Session, director: DirectorRepository | None, rollout: Rollout, actor: str, reason: str,
              now: datetime) -> list[str]:
    """Abort ``rollout`` in the caller's transaction, after the caller's :func:`cas` won: every member
    it touched (assigned, updated, failed) gets back what it had before, unless its assignment is no
    longer the rollout's (an operator's or a pin is left alone); state ``aborted``; the audit entry
    ``rollout.abort``. Returns the device ids whose assignment changed."""
    before = snapshot(rollout)
    changed = _restore(s, director, rollout)
    _finish(s, rollout, {"state": "aborted", "ended_at": now, "reason": reason, "updated_at": now})
    audit(s, actor, "rollout.abort", f"rollout:{rollout.id}", before,
          {**snapshot(rollout), "devices_changed": len(changed)})
    return changed
