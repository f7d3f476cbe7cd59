"""The operator's view of devices: list, show (with the update state and last events), events, tag,
revoke, and assign model versions.

An assignment change signs the device's director metadata in its own transaction and stores the new
timestamp version as the device's check-in ETag (see :mod:`edgefleet.server.desired`): the device's
next check-in is a 200 naming exactly the director timestamp it then fetches.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from edgefleet.server.api.deps import Actor, SessionDep, StateDep, device_caller, require
from edgefleet.server.api.rollout_schemas import PinIn, PinOut
from edgefleet.server.api.schemas import DEVICE_ID, MODEL_NAME, SEQ_MAX, TAG, AssignIn, DeviceOut, EventOut, TagsIn
from edgefleet.server.desired import desired_state
from edgefleet.server.errors import ApiError
from edgefleet.server.models import Assignment, Device, DeviceEvent, ModelVersion, utcnow
from edgefleet.server.rollouts.assign import OPERATOR, clear_assignment, release_members, set_assignment
from edgefleet.server.state import ServerState, audit
from edgefleet.server.tuf.director import DirectorRepository
from edgefleet.server.tuf.routes import director_repository

__all__ = ["SHOWN_EVENTS", "recent_events", "router"]

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1", tags=["devices"])
DevicePath = Annotated[str, Path(pattern=DEVICE_ID)]
SHOWN_EVENTS = 20  # events on device show
MAX_EVENTS = 500  # events per page of GET /devices/{id}/events


def recent_events(s: Session, device_id: str, limit: int, before_seq: int | None = None) -> list[EventOut]:
    """The device's events, newest first: those with a ``seq`` by seq (below ``before_seq`` if given),
    then those from older agents without one, by arrival. Two index reads, each at most ``limit`` rows.
    Events without a seq cannot be paged past: at most ``limit`` of them follow the numbered ones."""
    numbered = select(DeviceEvent).where(DeviceEvent.device_id == device_id, DeviceEvent.seq.isnot(None))
    if before_seq is not None:
        numbered = numbered.where(DeviceEvent.seq < before_seq)
    rows = list(s.scalars(numbered.order_by(DeviceEvent.seq.desc()).limit(limit)))
    if len(rows) < limit:
        rows += s.scalars(
            select(DeviceEvent).where(DeviceEvent.device_id == device_id, DeviceEvent.seq.is_(None))
            .order_by(DeviceEvent.id.desc()).limit(limit - len(rows))
        )
    return [_event_out(e) for e in rows]


def _event_out(e: DeviceEvent) -> EventOut:
    data = e.data or {}
    return EventOut(
        seq=e.seq, at=e.at, received_at=e.received_at, kind=e.kind, model=data.get("model"),
        version=data.get("version"), target=data.get("target"), sha256=data.get("sha256"),
        reason=data.get("reason"), detail=data.get("detail") or "",
    )


def _out(d: Device, state: ServerState, s: Session | None = None) -> DeviceOut:
    """The device as operators see it; with ``s`` (device show) also its desired state and last events."""
    window = timedelta(seconds=state.settings.online_window)
    return DeviceOut(
        id=d.id, tags=list(d.tags), online=d.last_seen is not None and utcnow() - d.last_seen < window,
        revoked=d.revoked_at is not None, enrolled_at=d.enrolled_at, last_seen=d.last_seen,
        reported_at=d.reported_at, agent_version=d.agent_version, hardware_profile=d.hardware_profile,
        running=list(d.running), cert_serial=d.cert_serial, cert_not_after=d.cert_not_after,
        desired=desired_state(s, d.id, d.desired_etag) if s is not None else None,
        update=d.update_state, events=recent_events(s, d.id, SHOWN_EVENTS) if s is not None else None,
    )


def _director(request: Request) -> DirectorRepository | None:
    """The app's director repositories, or None on a server without online TUF keys (hash ETags then)."""
    try:
        return director_repository(request)
    except ApiError:  # 503: initialised before TUF
        return None


_viewer = require("viewer")


def events_reader(request: Request, s: SessionDep, state: StateDep) -> Actor:
    """Operators with a viewer token and up. A device's own credentials are a 403 (it is known, and
    events are for operators), not the 401 of a token that proves nothing."""
    try:
        return _viewer(request, s)
    except ApiError as refused:
        if refused.status != 401:
            raise
        try:
            who = device_caller(request, state)
        except ApiError:
            raise refused from None
        raise ApiError(403, f"authorization: device {who.device_id} may not read device events; they are for "
                       "operators (viewer and up)", "authorization") from None


def _get(s: Session, device_id: str) -> Device:
    d = s.get(Device, device_id)
    if d is None:
        raise ApiError(404, f"device_id: no device {device_id}", "device_id")
    return d


@router.get("/devices", response_model=list[DeviceOut])
def list_devices(
    s: SessionDep,
    state: StateDep,
    _: Annotated[Actor, Depends(require("viewer"))],
    tag: Annotated[str | None, Query(pattern=TAG)] = None,
    online: bool | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> list[DeviceOut]:
    q = select(Device).order_by(Device.id)
    if online is not None:
        since = utcnow() - timedelta(seconds=state.settings.online_window)
        q = q.where(Device.last_seen >= since) if online else q.where(
            (Device.last_seen < since) | Device.last_seen.is_(None)
        )
    out = [_out(d, state) for d in s.scalars(q) if tag is None or tag in d.tags]
    return out[offset : offset + limit]


@router.get("/devices/{device_id}", response_model=DeviceOut)
def show_device(
    device_id: DevicePath, s: SessionDep, state: StateDep, _: Annotated[Actor, Depends(require("viewer"))]
) -> DeviceOut:
    return _out(_get(s, device_id), state, s)


@router.get("/devices/{device_id}/events", response_model=list[EventOut])
def list_events(
    device_id: DevicePath,
    s: SessionDep,
    _: Annotated[Actor, Depends(events_reader)],
    limit: Annotated[int, Query(ge=1, le=MAX_EVENTS, description="events per page")] = 100,
    before_seq: Annotated[int | None, Query(ge=1, le=SEQ_MAX, description="only events with a lower seq: the "
                                            "last seq of the previous page")] = None,
) -> list[EventOut]:
    """The device's update events, newest first (by the device's own ``seq``; events from agents without
    one come last). Operators only: a device's token is a 403."""
    _get(s, device_id)
    return recent_events(s, device_id, limit, before_seq)


@router.put("/devices/{device_id}/tags", response_model=DeviceOut)
def set_tags(
    device_id: DevicePath, body: TagsIn, state: StateDep, actor: Annotated[Actor, Depends(require("operator"))]
) -> DeviceOut:
    with state.sessions.begin() as s:
        d = _get(s, device_id)
        before = {"tags": list(d.tags)}
        d.tags = sorted(set(body.tags))
        audit(s, actor.label, "device.tag", f"device:{device_id}", before, {"tags": d.tags})
        return _out(d, state)


@router.post("/devices/{device_id}/revoke", response_model=DeviceOut)
def revoke_device(
    device_id: DevicePath, state: StateDep, actor: Annotated[Actor, Depends(require("operator"))]
) -> DeviceOut:
    """Revoke the device: its tokens, certificate and check-ins are refused from now on."""
    with state.sessions.begin() as s:
        d = _get(s, device_id)
        if d.revoked_at is None:
            d.revoked_at = utcnow()
            audit(s, actor.label, "device.revoke", f"device:{device_id}", {"revoked": False},
                  {"revoked": True, "cert_serial": d.cert_serial})
        out = _out(d, state)
    # Committed: now the broker (its live session cut, the CRL rewritten), off the request's thread since a
    # black-holed broker can take seconds; a failure is replayed by sync_revocations at the next start.
    threading.Thread(target=_revoke_on_broker, args=(state, device_id), name="broker-revoke", daemon=True).start()
    return out


def _revoke_on_broker(state: ServerState, device_id: str) -> None:
    from edgefleet.errors import ConfigError
    from edgefleet.server.broker import BrokerError, revoke_on_broker

    try:
        revoke_on_broker(state.settings, device_id)
    except (BrokerError, ConfigError) as e:
        log.warning("revoke %s on the broker: %s (replayed at the next start)", device_id, e)
    except Exception:  # a thread of its own: never an unseen traceback
        log.exception("revoke %s on the broker", device_id)


@router.put("/devices/{device_id}/models/{name}", response_model=DeviceOut)
def assign(
    device_id: DevicePath,
    name: Annotated[str, Path(pattern=MODEL_NAME)],
    body: AssignIn,
    request: Request,
    state: StateDep,
    actor: Annotated[Actor, Depends(require("operator"))],
) -> DeviceOut:
    """Assign a version of model ``name`` to the device (an operator's assignment: it takes the device out
    of any active rollout of that model; see :mod:`edgefleet.server.rollouts.assign`). Its director
    metadata is signed in the same transaction; the new timestamp version is its check-in ETag."""
    director = _director(request)
    with state.sessions.begin() as s:
        d = _get(s, device_id)
        v = s.scalar(select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == body.version))
        if v is None:
            raise ApiError(404, f"version: no model {name} version {body.version}", "version")
        a = s.get(Assignment, (device_id, name))
        before = None if a is None else {"version_id": a.version_id, "source": a.source}
        # one upsert (two operators assigning the same model at once both succeed: the later wins), any
        # rollout's shadow candidate dropped, the director metadata signed
        set_assignment(s, director, device_id, name, v.id, OPERATOR)
        released = release_members(s, device_id, name, f"assigned {v.version} by {actor.label}")
        audit(s, actor.label, "device.assign", f"device:{device_id}/model:{name}", before,
              {"version": v.version, "sha256": v.sha256, **({"released_from_rollouts": released} if released else {})})
        s.refresh(d)
        out = _out(d, state, s)
    _push_check_in(state, device_id)  # committed: the device may check in now
    return out


@router.delete("/devices/{device_id}/models/{name}", status_code=204)
def unassign(
    device_id: DevicePath,
    name: Annotated[str, Path(pattern=MODEL_NAME)],
    request: Request,
    state: StateDep,
    actor: Annotated[Actor, Depends(require("operator"))],
) -> Response:
    """Stop running model ``name`` on the device: new director targets without it, a new ETag."""
    director = _director(request)
    with state.sessions.begin() as s:
        _get(s, device_id)
        changed = clear_assignment(s, director, device_id, name)
        if changed:
            released = release_members(s, device_id, name, f"unassigned by {actor.label}")
            audit(s, actor.label, "device.unassign", f"device:{device_id}/model:{name}", {"model": name},
                  {"released_from_rollouts": released} if released else None)
    if changed:
        _push_check_in(state, device_id)
    return Response(status_code=204)


@router.put("/devices/{device_id}/pins/{name}", response_model=PinOut)
def pin_device(
    device_id: DevicePath,
    name: Annotated[str, Path(pattern=MODEL_NAME)],
    body: PinIn,
    request: Request,
    state: StateDep,
    actor: Annotated[Actor, Depends(require("operator"))],
) -> PinOut:
    """Pin a version of model ``name`` on the device: no rollout changes it (the top of the precedence
    rule: pin > operator > rollout); an active rollout that governed the device releases it."""
    from edgefleet.server.rollouts import service

    director = _director(request)
    with state.sessions.begin() as s:
        released = service.pin(s, director, device_id, name, body.version, actor.label)
    _push_check_in(state, device_id)
    return PinOut(device_id=device_id, model=name, version=body.version, source="pin", changed=True,
                  released_from_rollouts=released)


@router.delete("/devices/{device_id}/pins/{name}", response_model=PinOut)
def unpin_device(
    device_id: DevicePath,
    name: Annotated[str, Path(pattern=MODEL_NAME)],
    request: Request,
    state: StateDep,
    actor: Annotated[Actor, Depends(require("operator"))],
) -> PinOut:
    """Unpin: the pin becomes an operator's assignment of the same version (``changed`` false when the
    device's ``name`` was not pinned). 404 when the device has no assignment of ``name``."""
    from edgefleet.server.rollouts import service

    director = _director(request)
    with state.sessions.begin() as s:
        changed = service.unpin(s, director, device_id, name, actor.label)
        a = s.get(Assignment, (device_id, name))
        assert a is not None  # unpin answered 404 otherwise
        v = s.get(ModelVersion, a.version_id)
        out = PinOut(device_id=device_id, model=name, version=v.version if v is not None else "?", source=a.source,
                     changed=changed)
    if changed:
        _push_check_in(state, device_id)
    return out


def _push_check_in(state: ServerState, device_id: str) -> None:
    """Publish "check in now" on the device's ``cmd`` topic when telemetry ingestion is on (it carries no
    authority: the device verifies whatever its check-in brings through TUF); else its next poll finds it."""
    from edgefleet.server.telemetry.ingest import notify_check_in

    notify_check_in(state, device_id)
