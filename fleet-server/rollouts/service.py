"""What the API (and so the CLI) does to rollouts and pins: database logic in the caller's session.

- :func:`create` validates the request, selects the devices, makes the members (fixed from then on)
  and leaves the first stage's assignments to the controller (it runs ``judge.due`` every tick, so
  maintenance windows and the download cap apply from the first device on).
- :func:`pause`, :func:`resume`, :func:`abort`, :func:`promote`: an operator's decision, fenced like
  the controller's: each commits only by :func:`~edgefleet.server.rollouts.apply.cas` on the
  rollout's ``state_version`` read in the same request (or the one the operator saw, when given), so
  an operator and a controller replica acting at once never both win: the loser gets a 409.
- :func:`pin` / :func:`unpin`: the top of the precedence rule (see :mod:`~edgefleet.server.rollouts.assign`).

Every change is audited in the same transaction. Refusals raise :class:`~edgefleet.server.errors.ApiError`
(404 unknown rollout/device/version, 409 a state that does not allow it, 422 a bad argument), with
the field named. The functions that change assignments return the device ids whose director metadata
changed: the caller tells them to check in after the commit.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from edgefleet.server.errors import ApiError
from edgefleet.server.models import Assignment, Device, ModelVersion, Rollout, RolloutMember
from edgefleet.server.rollouts.assign import OPERATOR, PIN, release_members, set_assignment
from edgefleet.server.rollouts.codec import check_gates, gates_from_json, gates_to_json
from edgefleet.server.rollouts.judge import initial_phase
from edgefleet.server.rollouts.types import ACTIVE_STATES, Decision, Gates

if TYPE_CHECKING:
    from edgefleet.server.tuf.director import DirectorRepository

__all__ = [
    "Outcome",
    "abort",
    "arms",
    "create",
    "gates_of",
    "member_order",
    "pause",
    "pin",
    "promote",
    "resume",
    "stage_sizes",
    "unpin",
]


@dataclass(frozen=True)
class Outcome:
    """A change to a rollout: the rollout as it is now, whether anything changed, and the devices whose
    assignment changed (to be told to check in once committed)."""

    rollout: Rollout
    changed: bool = True
    push: tuple[str, ...] = ()


# -- membership ----------------------------------------------------------------------------------------


def _digest(rollout_id: int, device_id: str) -> bytes:
    return hashlib.sha256(f"{rollout_id}:{device_id}".encode()).digest()


def member_order(rollout_id: int, device_ids: list[str] | set[str]) -> list[str]:
    """The devices in rank order: by sha256(f"{rollout_id}:{device_id}"). It depends on nothing but the
    rollout id and the device id, so it is the same on every call and for a rollout re-created with the
    same id; adding or removing another device never reorders two devices."""
    return sorted(device_ids, key=lambda d: (_digest(rollout_id, d), d))


def arms(rollout_id: int, eligible_in_rank_order: list[str]) -> dict[str, str]:
    """The A/B arm of each eligible (not skipped) member: alternating along the rank order, so every
    stage (a prefix of that order) is split evenly, the first arm chosen by a second bit of the first
    member's hash (bit 0 of its second byte) so that rank 0 is not always arm a."""
    if not eligible_in_rank_order:
        return {}
    first_b = _digest(rollout_id, eligible_in_rank_order[0])[1] & 1
    return {d: "b" if (i + first_b) % 2 else "a" for i, d in enumerate(eligible_in_rank_order)}


def stage_sizes(gates: Gates, eligible: int) -> list[int]:
    """Members in each stage (cumulative), as the judge counts them: ``ceil(pct * n / 100)``."""
    return [min(eligible, math.ceil(p * eligible / 100 - 1e-9)) for p in gates.stages]


def gates_of(rollout: Rollout) -> Gates:
    return gates_from_json(rollout.gates)


def _version(s: Session, model: str, version: str, field: str) -> ModelVersion:
    v = s.scalar(select(ModelVersion).where(ModelVersion.name == model, ModelVersion.version == version))
    if v is None:
        raise ApiError(404, f"{field}: no model {model} version {version} in the registry", field)
    return v


def create(
    s: Session,
    director: DirectorRepository | None,
    model: str,
    version: str,
    *,
    tags: list[str],
    gates: Gates,
    version_b: str | None,
    actor: str,
    now: datetime,
) -> Rollout:
    """A new running rollout of ``model`` ``version`` over the non-revoked devices carrying every tag of
    ``tags`` (none: every device). ``version_b`` (or ``gates.ab_version``) makes the first stage an A/B
    stage. Members are ranked by :func:`member_order`; a pinned device, or one governed by another
    active rollout of the same model, is a ``skipped`` member with the reason in ``detail``. Raises
    ApiError: 404 an unknown version, 422 bad gates or an A/B version equal to ``version``, 409 when
    no device was selected or none of the selected would change version. ``director`` is unused (the
    controller signs the first assignments)."""
    del director  # the controller assigns the first stage: nothing is signed here
    version_b = version_b if version_b is not None else gates.ab_version
    gates = replace(gates, ab_version=version_b)
    try:
        check_gates(gates)
    except ValueError as e:
        raise ApiError(422, str(e), str(e).split(":", 1)[0]) from None
    v = _version(s, model, version, "version")
    vb = None
    if version_b is not None:
        if version_b == version:
            raise ApiError(422, f"version_b: the A/B version must differ from version {version}", "version_b")
        vb = _version(s, model, version_b, "version_b")
    wanted = set(tags)
    devices = sorted(d.id for d in s.scalars(select(Device).where(Device.revoked_at.is_(None)))
                     if wanted <= set(d.tags or ()))
    if not devices:
        which = f"carries the tag(s) {', '.join(sorted(wanted))}" if wanted else "is enrolled"
        raise ApiError(409, f"tags: no device that is not revoked {which}: nothing to roll out", "tags")
    current = {a.device_id: a for a in s.scalars(select(Assignment).where(Assignment.model_name == model))}
    busy = dict(s.execute(
        select(RolloutMember.device_id, RolloutMember.rollout_id).join(Rollout, Rollout.id == RolloutMember.rollout_id)
        .where(Rollout.model == model, Rollout.state.in_(ACTIVE_STATES),
               RolloutMember.status.not_in(("skipped", "released")))
    ).all())
    skipped: dict[str, str] = {}
    for d in devices:
        a = current.get(d)
        if a is not None and a.source == PIN:
            skipped[d] = "pinned"
        elif d in busy:
            skipped[d] = f"in rollout {busy[d]}"
    eligible = [d for d in devices if d not in skipped]
    r = Rollout(
        model=model, version_id=v.id, version_b_id=vb.id if vb is not None else None, tags=sorted(wanted),
        gates=gates_to_json(gates), state="running", stage=0, phase=initial_phase(gates), stage_started_at=now,
        phase_started_at=now, state_version=0, reason="", last_gates=[], last_judged_at=None, created_at=now,
        created_by=actor[:160], updated_at=now, ended_at=None,
    )
    s.add(r)
    s.flush()  # the id the ranks are hashed with (a refusal below rolls it back with the transaction)
    order = member_order(r.id, devices)
    arm = arms(r.id, [d for d in order if d not in skipped]) if vb is not None else {}
    target = {"a": v.id, "b": vb.id if vb is not None else v.id}
    if not any(current.get(d) is None or current[d].version_id != target[arm.get(d, "a")] for d in eligible):
        why = (f"all {len(eligible)} selectable device(s) already run {model} {version}" if eligible
               else f"every selected device is skipped ({_skip_words(skipped)})")
        raise ApiError(409, f"version: no selected device would change: {why}", "version")
    rows: list[dict[str, Any]] = []
    for rank, d in enumerate(order):
        a = current.get(d)
        rows.append({
            "rollout_id": r.id, "device_id": d, "rank": rank, "arm": arm.get(d, "a"),
            "status": "skipped" if d in skipped else "waiting",
            "previous_version_id": a.version_id if a is not None else None,
            "previous_source": a.source if a is not None else None,
            "assigned_at": None, "updated_at": now, "detail": skipped.get(d, ""),
        })
    s.execute(insert(RolloutMember), rows)
    sizes = stage_sizes(gates, len(eligible))
    r.reason = (f"created by {actor}: {len(eligible)} member(s)"
                + (f", {len(skipped)} skipped ({_skip_words(skipped)})" if skipped else "")
                + f"; stage 1 ({gates.stages[0]}%, {sizes[0]} device(s)) is due: the controller assigns it")
    _audit(s, actor, "rollout.create", r, None, {
        "model": model, "version": version, "version_b": version_b, "tags": sorted(wanted),
        "gates": r.gates, "members": len(eligible),
        "skipped": [{"device_id": d, "detail": why} for d, why in list(skipped.items())[:100]],
        "skipped_count": len(skipped),
    })
    return r


def _skip_words(skipped: dict[str, str]) -> str:
    counts = Counter(skipped.values())
    return ", ".join(f"{n} {why}" for why, n in sorted(counts.items()))


# -- an operator's decisions ---------------------------------------------------------------------------


def _load(s: Session, rollout_id: int) -> Rollout:
    r = s.get(Rollout, rollout_id)
    if r is None:
        raise ApiError(404, f"rollout_id: no rollout {rollout_id}", "rollout_id")
    return r


def _snapshot(r: Rollout) -> dict[str, Any]:
    return {"state": r.state, "stage": r.stage, "phase": r.phase, "state_version": r.state_version,
            "version_id": r.version_id}


def _audit(s: Session, actor: str, action: str, r: Rollout, before: dict[str, Any] | None,
           after: dict[str, Any]) -> None:
    from edgefleet.server.state import audit

    audit(s, actor, action, f"rollout:{r.id}", before, after)


def _fence(s: Session, r: Rollout, state_version: int | None) -> None:
    """Win the rollout's compare-and-set, or 409: the rollout changed since it was read (a controller
    replica decided, another operator acted) or since the operator saw ``state_version``."""
    from edgefleet.server.rollouts import apply

    expected = r.state_version if state_version is None else state_version
    if not apply.cas(s, r.id, expected):
        raise ApiError(409, f"rollout {r.id}: changed meanwhile (state version {expected} is no longer current); "
                       "retry", "state_version")
    s.refresh(r)


def _active(r: Rollout, what: str) -> None:
    if r.state not in ACTIVE_STATES:
        raise ApiError(409, f"rollout {r.id} is {r.state}: it cannot be {what}", "state")


def _why(actor: str, reason: str | None) -> str:
    return f"by {actor}" + (f": {reason}" if reason else "")


def pause(s: Session, rollout_id: int, *, actor: str, now: datetime, reason: str | None = None,
          state_version: int | None = None) -> Outcome:
    """Stop the rollout where it is: nothing is assigned or judged until :func:`resume`. Pausing a
    paused rollout changes nothing; an ended one is a 409."""
    r = _load(s, rollout_id)
    _active(r, "paused")
    if r.state == "paused":
        return Outcome(r, changed=False)
    before = _snapshot(r)
    _fence(s, r, state_version)
    r.state, r.reason, r.updated_at = "paused", f"paused {_why(actor, reason)}", now
    _audit(s, actor, "rollout.pause", r, before, {**_snapshot(r), "reason": r.reason})
    return Outcome(r)


def resume(s: Session, rollout_id: int, *, actor: str, now: datetime, reason: str | None = None,
           state_version: int | None = None) -> Outcome:
    """Run a paused rollout again. The stage clock restarts (``stage_started_at`` = now), so the stage
    timeout counts from the resume; soak and hold times are kept. Resuming a running rollout changes
    nothing; an ended one is a 409."""
    r = _load(s, rollout_id)
    _active(r, "resumed")
    if r.state == "running":
        return Outcome(r, changed=False)
    before = _snapshot(r)
    _fence(s, r, state_version)
    r.state, r.stage_started_at, r.updated_at = "running", now, now
    r.reason = f"resumed {_why(actor, reason)}: the stage clock restarts"
    _audit(s, actor, "rollout.resume", r, before, {**_snapshot(r), "reason": r.reason})
    return Outcome(r)


def abort(s: Session, director: DirectorRepository | None, rollout_id: int, *, actor: str, now: datetime,
          reason: str | None = None, state_version: int | None = None) -> Outcome:
    """Roll the rollout back: every device it touched gets back the version it had before (unless an
    operator or a pin took it since), and the rollout ends ``aborted``. An ended rollout is a 409."""
    r = _load(s, rollout_id)
    _active(r, "aborted")
    _fence(s, r, state_version)
    from edgefleet.server.rollouts import apply

    pushed = apply.roll_back(s, director, r, actor, f"aborted {_why(actor, reason)}", now)
    return Outcome(r, push=tuple(pushed))


def promote(s: Session, director: DirectorRepository | None, rollout_id: int, *, actor: str, now: datetime,
            version: str | None = None, reason: str | None = None, state_version: int | None = None) -> Outcome:
    """Advance the current stage now, skipping its gates: in phase shadow the stage's members serve
    the candidate at once; otherwise the rollout moves to the next stage (or completes after the last).
    ``version`` in an A/B hold picks the winner: the A/B version becomes the candidate for the rest of
    the rollout, and the stage's arm-a members are assigned it too (so in the last stage the rollout
    stays there, serving, until they have it). A paused rollout is promoted and stays paused. An
    ended rollout is a 409; ``version`` outside an A/B hold, or not one of its two versions, a 422."""
    r = _load(s, rollout_id)
    _active(r, "promoted")
    gates = gates_of(r)
    a = s.get(ModelVersion, r.version_id)
    b = s.get(ModelVersion, r.version_b_id) if r.version_b_id is not None else None
    switch_to_b = False
    if version is not None:
        if r.phase != "hold" or b is None:
            raise ApiError(422, f"version: only an A/B hold picks a version (rollout {r.id} is in phase {r.phase})",
                           "version")
        if version not in {a.version if a else None, b.version}:
            raise ApiError(422, f"version: {version} is neither of the A/B versions "
                           f"({a.version if a else '?'}, {b.version})", "version")
        switch_to_b = version == b.version
    _fence(s, r, state_version)
    last = r.stage >= len(gates.stages) - 1
    words = f"promoted {_why(actor, reason)}: gates of stage {r.stage + 1} ({gates.stages[r.stage]}%) skipped"
    if switch_to_b:
        assert b is not None
        before = _snapshot(r)
        _pick_b(s, r, b, now)
        if last:
            r.phase, r.phase_started_at, r.updated_at = "serve", now, now
            r.reason = f"{words}; {b.version} is the candidate: the stage's arm-a members get it"
            _audit(s, actor, "rollout.promote", r, before, {**_snapshot(r), "reason": r.reason, "version": b.version})
            return Outcome(r)
        words += f"; {b.version} is the candidate for the rest"
    if r.phase == "shadow":
        decision = Decision("promote_shadow", f"{words}: the stage's members serve the candidate now")
    elif last:
        decision = Decision("complete", f"{words}: complete")
    else:
        decision = Decision("advance", f"{words}: advance to stage {r.stage + 2} ({gates.stages[r.stage + 1]}%)",
                            stage=r.stage + 1)
    from edgefleet.server.rollouts import apply

    pushed = apply.apply_decision(s, director, r, decision, actor, now)
    return Outcome(r, push=tuple(pushed))


def _pick_b(s: Session, r: Rollout, b: ModelVersion, now: datetime) -> None:
    """The A/B version wins: it is the candidate from now on; members that got version A wait to be
    assigned it (the controller does, as for any waiting member of the stage)."""
    r.version_id = b.id
    s.execute(update(RolloutMember)
              .where(RolloutMember.rollout_id == r.id, RolloutMember.arm == "a",
                     RolloutMember.status.in_(("assigned", "updated")))
              .values(status="waiting", detail=f"to get {b.version}, the A/B winner", updated_at=now))
    s.execute(update(RolloutMember).where(RolloutMember.rollout_id == r.id, RolloutMember.arm == "b",
                                          RolloutMember.status.not_in(("skipped", "released")))
              .values(arm="a"))
    s.expire_all()


# -- pins ----------------------------------------------------------------------------------------------


def pin(s: Session, director: DirectorRepository | None, device_id: str, model: str, version: str,
        actor: str) -> list[int]:
    """Pin ``model`` ``version`` on the device (source ``pin``): no rollout changes it; an active rollout
    that governed the device releases it. Returns those rollouts' ids. 404 for an unknown device or
    version."""
    d = s.get(Device, device_id)
    if d is None:
        raise ApiError(404, f"device_id: no device {device_id}", "device_id")
    v = _version(s, model, version, "version")
    a = s.get(Assignment, (device_id, model))
    before = None if a is None else {"version_id": a.version_id, "source": a.source}
    set_assignment(s, director, device_id, model, v.id, PIN)
    released = release_members(s, device_id, model, f"pinned {version} by {actor}")
    from edgefleet.server.state import audit

    audit(s, actor, "device.pin", f"device:{device_id}/model:{model}", before,
          {"version": version, "sha256": v.sha256, "source": PIN,
           **({"released_from_rollouts": released} if released else {})})
    return released


def unpin(s: Session, director: DirectorRepository | None, device_id: str, model: str, actor: str) -> bool:
    """Turn the device's pin of ``model`` into an operator's assignment of the same version (rollouts
    created from now on may take it). False when it was not pinned (nothing changed); 404 for an
    unknown device or a model it has no assignment of."""
    if s.get(Device, device_id) is None:
        raise ApiError(404, f"device_id: no device {device_id}", "device_id")
    a = s.get(Assignment, (device_id, model))
    if a is None:
        raise ApiError(404, f"model: device {device_id} has no assignment of {model}", "model")
    if a.source != PIN:
        return False
    version_id, shadow = a.version_id, a.shadow_version_id
    set_assignment(s, director, device_id, model, version_id, OPERATOR, shadow)
    from edgefleet.server.state import audit

    audit(s, actor, "device.unpin", f"device:{device_id}/model:{model}", {"version_id": version_id, "source": PIN},
          {"version_id": version_id, "source": OPERATOR})
    return True
