"""A lease naming the one server replica that runs a background controller, with a fencing token.

:func:`acquire` is a compare-and-set on the :class:`~edgefleet.server.models.ControllerLease` row:
the holder renews it (same token); anyone takes it once it has expired (token + 1: every takeover
gets a larger token); a missing row is created by an ``INSERT ... ON CONFLICT DO NOTHING``, so two
replicas racing to create it cannot both win. :func:`still_held` is checked inside the transaction
that commits a decision: on PostgreSQL it locks the row (``FOR UPDATE``), so a takeover's ``UPDATE``
waits for that commit (and the taker then sees the expiry it compares against), or the decision sees
the takeover and commits nothing. The rollout's own ``state_version`` compare-and-set is the second
fence behind it (:func:`edgefleet.server.rollouts.apply.cas`).

Every function works in the caller's transaction; the caller commits.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import case, select, update
from sqlalchemy.orm import Session

from edgefleet.server.models import ControllerLease, upsert_insert

__all__ = ["acquire", "release", "still_held"]


def _rows(result: object) -> int:
    return int(getattr(result, "rowcount", 0) or 0)


def acquire(s: Session, name: str, holder: str, ttl: float, now: datetime) -> int | None:
    """Take or renew lease ``name`` for ``holder`` until ``now + ttl`` seconds: the fencing token when
    it is ours (renewed: unchanged; taken over from an expired holder: the old token + 1; created: 1),
    None when another holder's lease is still running."""
    until = now + timedelta(seconds=ttl)
    created = s.execute(upsert_insert(s, ControllerLease)
                        .values(name=name, holder=holder, token=1, expires_at=until)
                        .on_conflict_do_nothing(index_elements=[ControllerLease.name]))
    if _rows(created) == 1:
        return 1
    lease = ControllerLease
    # One UPDATE: on PostgreSQL a concurrent taker waits on the row and re-checks the WHERE against what
    # the first one committed (a lease just taken is no longer expired), so only one takes it.
    taken = s.execute(
        update(lease)
        .where(lease.name == name, (lease.holder == holder) | (lease.expires_at <= now))
        .values(token=case((lease.holder == holder, lease.token), else_=lease.token + 1), holder=holder,
                expires_at=until)
        .execution_options(synchronize_session=False)
    )
    if _rows(taken) != 1:
        return None
    token = s.scalar(select(lease.token).where(lease.name == name, lease.holder == holder))
    return int(token) if token is not None else None


def still_held(s: Session, name: str, holder: str, token: int, now: datetime) -> bool:
    """Whether ``holder`` still holds lease ``name`` with fencing ``token`` at ``now`` (not expired). On
    PostgreSQL the row stays locked until the caller's transaction ends (see the module docstring)."""
    row = s.execute(
        select(ControllerLease.holder, ControllerLease.token, ControllerLease.expires_at)
        .where(ControllerLease.name == name).with_for_update()
    ).first()
    return row is not None and row.holder == holder and int(row.token) == token and row.expires_at > now


def release(s: Session, name: str, holder: str, token: int, now: datetime) -> bool:
    """Give the lease up at once (a clean stop), when it is still ours: it expires ``now``, so another
    replica takes it at its next tick instead of after the lease's remaining time."""
    done = s.execute(update(ControllerLease)
                     .where(ControllerLease.name == name, ControllerLease.holder == holder,
                            ControllerLease.token == token)
                     .values(expires_at=now).execution_options(synchronize_session=False))
    return _rows(done) == 1
