"""Writing assignments, and the one rule of precedence between who writes them.

**A pin beats an operator's assignment beats a rollout.** ``Assignment.source`` records who set a
device's version of a model:

- ``pin`` (``edgefleet device pin``): no rollout changes it. A rollout created while a device is pinned
  lists it as a ``skipped`` member ("pinned"); a device pinned during a rollout is ``released`` from it.
  ``device unpin`` turns the pin into an ``operator`` assignment of the same version.
- ``operator`` (``edgefleet device assign``): an assignment an operator made *before* a rollout is what
  the rollout replaces (recorded in the member's ``previous_version_id``, restored on abort); one made
  *after* the rollout took the device wins: the member is ``released`` and the rollout never touches it
  again (nor counts it in its gates). ``device unassign`` releases it the same way.
- ``rollout:<id>``: written only by that rollout's controller, only on its own members.

A device is in at most one active rollout per model: ``rollout create`` skips devices already in one
("in rollout N"). Every function here works in the caller's transaction and signs the device's director
metadata there (:func:`edgefleet.server.desired.refresh_etag`), so the change and its signed metadata
commit together; publishing "check in now" is the caller's, after the commit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from edgefleet.server.desired import refresh_etag
from edgefleet.server.models import Assignment, Rollout, RolloutMember, upsert_insert, utcnow
from edgefleet.server.rollouts.types import ACTIVE_STATES

if TYPE_CHECKING:
    from edgefleet.server.tuf.director import DirectorRepository

__all__ = [
    "OPERATOR",
    "PIN",
    "active_member",
    "clear_assignment",
    "is_rollout_source",
    "release_members",
    "restore_previous",
    "rollout_source",
    "set_assignment",
    "set_shadow",
]

PIN = "pin"
OPERATOR = "operator"
_ROLLOUT = "rollout:"


def rollout_source(rollout_id: int) -> str:
    return f"{_ROLLOUT}{rollout_id}"


def is_rollout_source(source: str | None, rollout_id: int | None = None) -> bool:
    """Whether ``source`` is a rollout's (that one's, when ``rollout_id`` is given)."""
    if source is None or not source.startswith(_ROLLOUT):
        return False
    return rollout_id is None or source == rollout_source(rollout_id)


def set_assignment(
    s: Session, director: DirectorRepository | None, device_id: str, model: str, version_id: int, source: str,
    shadow_version_id: int | None = None,
) -> str:
    """Serve ``version_id`` of ``model`` on the device (and run ``shadow_version_id`` beside it, or no
    shadow), set by ``source``: one upsert, then the director metadata is signed. Returns the ETag."""
    now = utcnow()
    row = {"version_id": version_id, "source": source, "shadow_version_id": shadow_version_id, "updated_at": now}
    s.execute(upsert_insert(s, Assignment).values(device_id=device_id, model_name=model, **row)
              .on_conflict_do_update(index_elements=[Assignment.device_id, Assignment.model_name], set_=row))
    s.expire_all()  # the ORM may hold the row as it was
    return refresh_etag(s, device_id, director)


def set_shadow(
    s: Session, director: DirectorRepository | None, device_id: str, model: str, shadow_version_id: int | None,
) -> bool:
    """Run ``shadow_version_id`` beside the served version (None: stop the shadow). False when the device
    has no assignment of ``model`` to shadow (nothing changed)."""
    done = s.execute(update(Assignment).where(Assignment.device_id == device_id, Assignment.model_name == model)
                     .values(shadow_version_id=shadow_version_id, updated_at=utcnow()))
    if not done.rowcount:  # type: ignore[attr-defined]
        return False
    s.expire_all()
    refresh_etag(s, device_id, director)
    return True


def clear_assignment(s: Session, director: DirectorRepository | None, device_id: str, model: str) -> bool:
    """Stop running ``model`` on the device. False when it had no assignment (nothing changed)."""
    gone = s.execute(delete(Assignment).where(Assignment.device_id == device_id, Assignment.model_name == model))
    if not gone.rowcount:  # type: ignore[attr-defined]
        return False
    s.expire_all()
    refresh_etag(s, device_id, director)
    return True


def active_member(s: Session, device_id: str, model: str) -> RolloutMember | None:
    """The device's membership in an active rollout of ``model`` that still governs it (not skipped or
    released), or None."""
    return s.scalar(
        select(RolloutMember).join(Rollout, Rollout.id == RolloutMember.rollout_id)
        .where(RolloutMember.device_id == device_id, Rollout.model == model, Rollout.state.in_(ACTIVE_STATES),
               RolloutMember.status.not_in(("skipped", "released")))
        .limit(1)
    )


def release_members(s: Session, device_id: str, model: str, why: str) -> list[int]:
    """An operator took the device's ``model`` in hand (assign, unassign, pin): every active rollout of
    that model lets the device be from now on. Returns the rollouts' ids (for the audit log)."""
    ids = list(s.scalars(
        select(RolloutMember.rollout_id).join(Rollout, Rollout.id == RolloutMember.rollout_id)
        .where(RolloutMember.device_id == device_id, Rollout.model == model, Rollout.state.in_(ACTIVE_STATES),
               RolloutMember.status.not_in(("skipped", "released")))
    ))
    if ids:
        s.execute(update(RolloutMember)
                  .where(RolloutMember.device_id == device_id, RolloutMember.rollout_id.in_(ids))
                  .values(status="released", detail=why[:256], updated_at=utcnow()))
    return ids


def restore_previous(
    s: Session, director: DirectorRepository | None, rollout_id: int, model: str, member: RolloutMember,
) -> bool:
    """Abort: give the device back what it had before the rollout, when the rollout's assignment is
    still the device's (an operator's or a pin is left alone). Returns whether anything changed."""
    current = s.get(Assignment, (member.device_id, model))
    if current is None or not is_rollout_source(current.source, rollout_id):
        return False
    if member.previous_version_id is None:
        return clear_assignment(s, director, member.device_id, model)
    set_assignment(s, director, member.device_id, model, member.previous_version_id,
                   member.previous_source or OPERATOR)
    return True
