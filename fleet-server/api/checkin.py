"""Device check-in: the desired state (ETag/304, cheap when nothing changed) and reports.

The ETag is the device's director timestamp version (``"ts-N"``, see :mod:`edgefleet.server.desired`),
stored on the device row with every assignment change: a new ETag means new director metadata to fetch.
The unchanged path costs one indexed read of the device row (identity, revocation, ETag, last seen)
and, at most once per ``last_seen_granularity`` seconds per device, one small UPDATE. They run on one
of the database workers (:class:`edgefleet.server.db.AutocommitDB`, each with an autocommit connection
kept open), never on the event loop: a database that blocks (a held SQLite lock, an unreachable
PostgreSQL) stalls that check-in, which ends in a 503 with ``Retry-After`` once the bounded wait runs
out; the token check before it is CPU only. Reports are plain functions, run on FastAPI's thread pool:
their events are inserted ignoring a (device, seq) already stored, so a report sent again after a lost
answer adds nothing (``INSERT ... ON CONFLICT DO NOTHING``, which SQLite and PostgreSQL both speak).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy import Connection, bindparam, select, update
from sqlalchemy.orm import Session

from edgefleet.server.api.deps import DeviceCaller, StateDep, device_caller
from edgefleet.server.api.identity import live_device
from edgefleet.server.api.schemas import DEVICE_ID, ReportIn, UpdateEvent
from edgefleet.server.desired import desired_state
from edgefleet.server.errors import ApiError
from edgefleet.server.models import Device, DeviceEvent, upsert_insert, utcnow
from edgefleet.server.state import ServerState

__all__ = ["router"]

router = APIRouter(prefix="/api/v1", tags=["check-in"])
DevicePath = Annotated[str, Path(pattern=DEVICE_ID)]

_ROW = select(Device.revoked_at, Device.cert_serial, Device.desired_etag, Device.last_seen).where(
    Device.id == bindparam("id")
)
_TOUCH = update(Device).where(Device.id == bindparam("did")).values(last_seen=bindparam("now"))


def _matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    return header.strip() == "*" or etag in (t.strip().removeprefix("W/") for t in header.split(","))


@router.get(
    "/devices/{device_id}/desired",
    responses={200: {"description": "the desired state"}, 304: {"description": "unchanged since If-None-Match"}},
)
async def get_desired(device_id: DevicePath, request: Request) -> Response:
    """What this device should run. Send the last ``ETag`` in ``If-None-Match`` to get a 304 when
    nothing changed. Only the device itself may ask. A busy or unreachable database is a 503."""
    state: ServerState = request.app.state.server
    who = device_caller(request, state)
    if who.device_id != device_id:
        raise ApiError(403, "device_id: a device may only act as itself", "device_id")
    granularity = timedelta(seconds=state.settings.last_seen_granularity)
    if_none_match = request.headers.get("if-none-match")
    etag, body = await state.loop_db.run(_check_in, who, if_none_match, granularity, idempotent=True)
    if body is None:
        state.metrics.checkins.labels("304").inc()
        return Response(status_code=304, headers={"etag": etag, "cache-control": "no-cache"})
    state.metrics.checkins.labels("200").inc()
    return JSONResponse(body, headers={"etag": etag, "cache-control": "no-cache"})


def _check_in(
    conn: Connection, who: DeviceCaller, if_none_match: str | None, granularity: timedelta
) -> tuple[str, dict[str, Any] | None]:
    """On a database worker: check the device, touch last_seen when due; (ETag, None) when unchanged
    since ``if_none_match``, else (ETag, the desired state). Raises ApiError 403/401."""
    row = conn.execute(_ROW, {"id": who.device_id}).first()
    if row is None or row.revoked_at is not None:
        raise ApiError(403, "device_id: not enrolled or revoked", "device_id")
    if row.cert_serial != who.cert_serial:
        raise ApiError(401, "authorization: issued for a replaced certificate; authenticate again", "authorization")
    now = utcnow()
    if row.last_seen is None or now - row.last_seen >= granularity:
        conn.execute(_TOUCH, {"did": who.device_id, "now": now})
    etag = f'"{row.desired_etag}"'
    if _matches(if_none_match, etag):
        return etag, None
    with Session(bind=conn) as s:
        return etag, desired_state(s, who.device_id, row.desired_etag)


@router.post("/devices/{device_id}/reports", status_code=204)
def post_report(device_id: DevicePath, body: ReportIn, request: Request, state: StateDep) -> Response:
    """The device's running versions, update events, update state, agent version and hardware profile.
    Events with a ``seq`` already stored for this device are ignored (a retried report); an absent
    ``update`` block leaves the last one in place."""
    who = device_caller(request, state)
    now = utcnow()
    with state.sessions.begin() as s:
        d = live_device(s, who, device_id)
        d.agent_version = body.agent_version
        d.hardware_profile = body.hardware_profile
        d.running = [m.model_dump(mode="json") for m in body.running]
        if body.update is not None:
            d.update_state = body.update.model_dump(mode="json")
        d.reported_at = d.last_seen = now
        s.flush()
        _insert_events(s, device_id, body.events, now)
    return Response(status_code=204)


def _insert_events(s: Session, device_id: str, events: list[UpdateEvent], now: datetime) -> None:
    """One INSERT of ``events``, skipping any whose (device_id, seq) is stored already (or repeated in the
    batch). Events without a seq (older agents) are always added."""
    if not events:
        return
    rows = [
        {"device_id": device_id, "seq": e.seq, "at": e.at, "received_at": now, "kind": e.kind,
         "data": e.model_dump(mode="json", exclude={"seq", "at", "kind"})}
        for e in events
    ]
    stmt = upsert_insert(s, DeviceEvent).on_conflict_do_nothing(
        index_elements=[DeviceEvent.device_id, DeviceEvent.seq], index_where=DeviceEvent.seq.isnot(None))
    s.execute(stmt, rows)
