"""What the rollout controller reads: a rollout as a :class:`RolloutView`, its members' progress from
what the devices reported, and one judging window's telemetry as :class:`Figures`.

- :func:`load_view`: the rollout and its members in one query (online from ``Device.last_seen``,
  tags, the version each had before).
- :func:`refresh_members`: ``assigned`` → ``updated`` when the device reported running what the
  rollout assigned it (``update.committed`` with its sha256, ``shadow.ok`` for a shadow assignment, or
  ``Device.running`` listing it); ``assigned`` / ``updated`` → ``failed`` on ``update.refused`` /
  ``update.rolled_back`` with that sha256 (``detail``: the reason). Only events received after the
  member's ``assigned_at`` count. What was assigned is read from the device's assignment (the
  rollout's own), so a shadow candidate, an A/B arm and a promotion each expect the right sha256.
- :func:`figures`: per device and version, the telemetry rollups summed over the judging window
  ``[max(phase start, the member's updated_at), now]`` for the candidate's devices, ``[phase start,
  now]`` for the baseline: ``candidate`` = stage members serving the candidate (``candidate_b``:
  serving the A/B version), ``baseline`` = members outside the stage still waiting, on the version
  they had before (each its own), ``shadow`` = stage members' shadow comparisons of the candidate.

Bounded work: one grouped query per role (never one per device), so 10,000 members are read in a few
queries; the members' own window starts are compared in SQL against their ``updated_at``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Integer, and_, bindparam, cast, func, or_, select, update
from sqlalchemy.orm import Session, aliased
from sqlalchemy.sql import ColumnElement

from edgefleet.server.models import (
    Assignment,
    Device,
    DeviceEvent,
    ModelVersion,
    Rollout,
    RolloutMember,
    TelemetryRollup,
    TelemetryShadowRollup,
)
from edgefleet.server.rollouts.assign import rollout_source
from edgefleet.server.rollouts.codec import gates_from_json
from edgefleet.server.rollouts.judge import stage_members
from edgefleet.server.rollouts.types import DeviceFigures, Figures, Member, MemberStatus, RolloutView
from edgefleet.server.telemetry.rollups import LAT_COLUMNS, quantile

__all__ = ["MemberChange", "figures", "load_view", "refresh_members"]

_SUCCESS = {"update.committed": False, "shadow.ok": True}  # kind -> counts for a shadow assignment
_FAILURE = ("update.refused", "update.rolled_back")


def _ts(t: datetime | None) -> float | None:
    return None if t is None else t.timestamp()


# -- the view ------------------------------------------------------------------------------------------


def load_view(s: Session, rollout_id: int, now: datetime, online_window: float) -> RolloutView:
    """The rollout and its members as of ``s``'s transaction. Raises ``LookupError`` when there is no
    such rollout, ``ValueError`` (from the codec) when its stored gates are malformed."""
    r = s.get(Rollout, rollout_id, populate_existing=True)
    if r is None:
        raise LookupError(f"rollout {rollout_id}: no such rollout")
    version = s.scalar(select(ModelVersion.version).where(ModelVersion.id == r.version_id))
    m, prev = RolloutMember, aliased(ModelVersion)
    since = now - timedelta(seconds=online_window)
    q = (select(m.device_id, m.rank, m.arm, m.status, m.assigned_at, m.updated_at, m.detail, Device.last_seen,
                Device.tags, prev.version.label("previous"))
         .join(Device, Device.id == m.device_id)
         .outerjoin(prev, prev.id == m.previous_version_id)
         .where(m.rollout_id == rollout_id)
         .order_by(m.rank, m.device_id))
    members: list[Member] = []
    previous: Counter[str] = Counter()
    for row in s.execute(q):
        status: MemberStatus = row.status
        members.append(Member(
            device_id=row.device_id, rank=int(row.rank), status=status, arm="b" if row.arm == "b" else "a",
            online=row.last_seen is not None and row.last_seen >= since,
            tags=tuple(str(t) for t in (row.tags or ())), previous=row.previous,
            assigned_at=_ts(row.assigned_at),
            updated_at=_ts(row.updated_at) if status == "updated" else None,  # "seen running the candidate"
            detail=row.detail or "",
        ))
        if row.previous is not None and status != "skipped":
            previous[row.previous] += 1
    return RolloutView(
        id=r.id, model=r.model, version=version or "", state=r.state,  # type: ignore[arg-type]
        stage=r.stage, phase=r.phase,  # type: ignore[arg-type]
        stage_started_at=r.stage_started_at.timestamp(), phase_started_at=r.phase_started_at.timestamp(),
        state_version=int(r.state_version), gates=gates_from_json(r.gates), members=tuple(members),
        previous=previous.most_common(1)[0][0] if previous else None,
    )


# -- members' progress ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemberChange:
    """One member's status change found by :func:`refresh_members`."""

    device_id: str
    before: str
    status: MemberStatus
    at: datetime
    detail: str = ""


def refresh_members(s: Session, view: RolloutView, now: datetime) -> list[MemberChange]:
    """Move members on from what their devices reported (see the module docstring), in the caller's
    transaction; each change is a conditional UPDATE (``WHERE status = <what it was>``), so running it
    twice, or on two replicas at once, changes each member once. Returns the changes."""
    m, a, mv = RolloutMember, Assignment, ModelVersion
    pending = ("assigned", "updated")
    if not any(x.status in pending for x in view.members):
        return []
    # What the rollout assigned each pending member (its own assignment only): sha256, shadow or served.
    expected_id = func.coalesce(a.shadow_version_id, a.version_id)
    rows = s.execute(
        select(m.device_id, m.status, m.assigned_at, mv.sha256, mv.version, a.shadow_version_id, Device.running)
        .join(a, and_(a.device_id == m.device_id, a.model_name == view.model, a.source == rollout_source(view.id)))
        .join(mv, mv.id == expected_id)
        .join(Device, Device.id == m.device_id)
        .where(m.rollout_id == view.id, m.status.in_(pending))
    ).all()
    want = {r.device_id: r for r in rows}
    if not want:
        return []
    ev = DeviceEvent
    events = s.execute(
        select(ev.device_id, ev.kind, ev.data, ev.received_at)
        .join(m, and_(m.device_id == ev.device_id, m.rollout_id == view.id))
        .where(m.status.in_(pending), ev.kind.in_((*_SUCCESS, *_FAILURE)),
               or_(m.assigned_at.is_(None), ev.received_at >= m.assigned_at))
        .order_by(ev.device_id, ev.id)
    ).all()
    status = {d: r.status for d, r in want.items()}
    changed: dict[str, MemberChange] = {}

    def move(dev: str, to: MemberStatus, at: datetime, detail: str = "") -> None:
        before = want[dev].status
        status[dev] = to
        changed[dev] = MemberChange(dev, before, to, at, detail)

    for e in events:
        w = want.get(e.device_id)
        data: dict[str, Any] = e.data if isinstance(e.data, dict) else {}
        if w is None or data.get("sha256") != w.sha256 or status[e.device_id] == "failed":
            continue
        if e.kind in _FAILURE:
            reason = str(data.get("reason") or e.kind)
            detail = str(data.get("detail") or "")
            why = f"{e.kind}: {reason}" + (f": {detail}" if detail else "")
            move(e.device_id, "failed", e.received_at, why[:256])
        elif status[e.device_id] == "assigned" and _SUCCESS[e.kind] == (w.shadow_version_id is not None):
            move(e.device_id, "updated", e.received_at)
    for dev, w in want.items():  # the check-in's running list: serving it is "updated" whatever the events said
        if status[dev] != "assigned" or w.shadow_version_id is not None:
            continue
        for entry in w.running or ():
            if isinstance(entry, dict) and entry.get("name") == view.model and (
                    entry.get("sha256") == w.sha256 or (entry.get("sha256") is None
                                                        and entry.get("version") == w.version)):
                move(dev, "updated", now)
                break
    if changed:
        stmt = (update(m).where(m.rollout_id == view.id, m.device_id == bindparam("dev"),
                                m.status == bindparam("before"))
                .values(status=bindparam("to"), updated_at=bindparam("at"), detail=bindparam("why")))
        s.connection().execute(stmt, [{"dev": c.device_id, "before": c.before, "to": c.status, "at": c.at,
                                       "why": c.detail} for c in changed.values()])
    return list(changed.values())


# -- figures -------------------------------------------------------------------------------------------


def _epoch(s: Session, col: Any) -> ColumnElement[Any]:
    """Unix seconds of a UTCDateTime column, in the database's own SQL."""
    if s.get_bind().dialect.name == "postgresql":
        return func.extract("epoch", col)
    return cast(func.strftime("%s", col), Integer)  # SQLite keeps 'YYYY-MM-DD HH:MM:SS[.ffffff]' (UTC)


def _sums() -> list[Any]:
    r = TelemetryRollup
    cols: list[Any] = [func.sum(r.inferences).label("inferences"), func.sum(r.errors).label("errors"),
                       func.max(r.psi_max).label("psi_max"), func.sum(r.accuracy_wsum).label("accuracy_wsum"),
                       func.sum(r.accuracy_window).label("accuracy_window")]
    cols += [func.sum(getattr(r, c)).label(c) for c in LAT_COLUMNS]
    return cols


def _device(row: Any, version: str) -> DeviceFigures:
    counts = [int(getattr(row, c) or 0) for c in LAT_COLUMNS]
    window = int(row.accuracy_window or 0)
    return DeviceFigures(
        device_id=row.device_id, version=version, inferences=int(row.inferences or 0), errors=int(row.errors or 0),
        p95_s=quantile(counts, 0.95), psi_max=None if row.psi_max is None else float(row.psi_max),
        accuracy=float(row.accuracy_wsum or 0.0) / window if window else None, labelled=window,
    )


def figures(s: Session, view: RolloutView, now: datetime, bucket_s: int) -> Figures:
    """The judging window's figures of ``view`` at ``now`` from the telemetry rollups (windows of
    ``bucket_s`` seconds; a window counts when it ends after the start and starts before ``now``):
    three grouped queries (candidate, baseline, shadow)."""
    since = view.phase_started_at
    until = now.timestamp()
    out = Figures(since=since, until=until)
    stage = {x.device_id: x for x in stage_members(view, view.stage)}
    r, m = TelemetryRollup, RolloutMember
    low = int(since) - int(since) % bucket_s  # the first window that ends after the phase started
    in_window = [r.bucket >= low, r.bucket <= int(until)]
    ab = view.gates.ab_version if view.stage == 0 else None
    versions = [view.version] + ([ab] if ab else [])

    # candidate (and A/B arm b): stage members that were assigned and not failed, from their own start
    own_start = r.bucket + bucket_s > func.coalesce(_epoch(s, m.updated_at), 0)
    served = [x for x in stage.values() if x.status in ("assigned", "updated")]
    if served:
        top = max(x.rank for x in served)
        q = (select(r.device_id, r.version, *_sums())
             .join(m, and_(m.device_id == r.device_id, m.rollout_id == view.id))
             .where(r.model == view.model, r.version.in_(versions), *in_window, m.rank <= top,
                    m.status.in_(("assigned", "updated")),
                    or_(m.status != "updated", m.updated_at.is_(None), own_start))
             .group_by(r.device_id, r.version))
        for row in s.execute(q):
            if row.device_id not in stage:
                continue
            if row.version == view.version:
                out.candidate[row.device_id] = _device(row, row.version)
            elif ab is not None and row.version == ab:
                out.candidate_b[row.device_id] = _device(row, row.version)

    # baseline: members outside the stage, still waiting, on the version each had before
    outside = [x for x in view.members if x.device_id not in stage and x.status == "waiting"]
    if outside:
        prev = aliased(ModelVersion)
        q = (select(r.device_id, r.version, *_sums())
             .join(m, and_(m.device_id == r.device_id, m.rollout_id == view.id))
             .join(prev, and_(prev.id == m.previous_version_id, prev.version == r.version))
             .where(r.model == view.model, *in_window, m.status == "waiting")
             .group_by(r.device_id, r.version))
        for row in s.execute(q):
            if row.device_id not in stage:
                out.baseline[row.device_id] = _device(row, row.version)

    # shadow: stage members' comparisons of the candidate beside whatever they serve
    if view.phase == "shadow" and served:
        sh = TelemetryShadowRollup
        top = max(x.rank for x in served)
        own = sh.bucket + bucket_s > func.coalesce(_epoch(s, m.updated_at), 0)
        q = (select(sh.device_id, sh.version, func.sum(sh.compared).label("compared"),
                    func.sum(sh.agreed).label("agreed"))
             .join(m, and_(m.device_id == sh.device_id, m.rollout_id == view.id))
             .where(sh.model == view.model, sh.candidate.in_(versions), sh.bucket >= low, sh.bucket <= int(until),
                    m.rank <= top, m.status.in_(("assigned", "updated")),
                    or_(m.status != "updated", m.updated_at.is_(None), own))
             .group_by(sh.device_id, sh.version))
        merged: dict[str, tuple[str, int, int, int]] = {}  # device: (main served version, count, compared, agreed)
        for row in s.execute(q):
            if row.device_id not in stage:
                continue
            c, g = int(row.compared or 0), int(row.agreed or 0)
            ver, best, tc, ta = merged.get(row.device_id, (row.version, -1, 0, 0))
            if c > best:
                ver, best = row.version, c
            merged[row.device_id] = (ver, best, tc + c, ta + g)
        for dev, (ver, _, tc, ta) in merged.items():
            out.shadow[dev] = DeviceFigures(device_id=dev, version=ver, shadow_compared=tc, shadow_agreed=ta)
    return out
