"""The operator's view of devices: list, show, tag, revoke, and assign model versions."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Response
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from edgefleet.server.api.deps import Actor, SessionDep, StateDep, require
from edgefleet.server.api.schemas import DEVICE_ID, MODEL_NAME, TAG, AssignIn, DeviceOut, TagsIn
from edgefleet.server.desired import desired_state, refresh_etag
from edgefleet.server.errors import ApiError
from edgefleet.server.models import Assignment, Device, ModelVersion, utcnow
from edgefleet.server.state import ServerState, audit

__all__ = ["router"]

router = APIRouter(prefix="/api/v1", tags=["devices"])
DevicePath = Annotated[str, Path(pattern=DEVICE_ID)]


def _out(d: Device, state: ServerState, s: Session | None = None) -> DeviceOut:
    window = timedelta(seconds=state.settings.online_window)
    return DeviceOut(
        id=d.id, tags=list(d.tags), online=d.last_seen is not None and utcnow() - d.last_seen < window,
        revoked=d.revoked_at is not None, enrolled_at=d.enrolled_at, last_seen=d.last_seen,
        reported_at=d.reported_at, agent_version=d.agent_version, hardware_profile=d.hardware_profile,
        running=list(d.running), cert_serial=d.cert_serial, cert_not_after=d.cert_not_after,
        desired=desired_state(s, d.id) if s is not None else None,
    )


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
        return _out(d, state)


@router.put("/devices/{device_id}/models/{name}", response_model=DeviceOut)
def assign(
    device_id: DevicePath,
    name: Annotated[str, Path(pattern=MODEL_NAME)],
    body: AssignIn,
    state: StateDep,
    actor: Annotated[Actor, Depends(require("operator"))],
) -> DeviceOut:
    """Pin a version of model ``name`` on the device (rollouts will set these too)."""
    with state.sessions.begin() as s:
        d = _get(s, device_id)
        v = s.scalar(select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == body.version))
        if v is None:
            raise ApiError(404, f"version: no model {name} version {body.version}", "version")
        a = s.get(Assignment, (device_id, name))
        before = None
        if a is None:
            s.add(Assignment(device_id=device_id, model_name=name, version_id=v.id, source="operator",
                             updated_at=utcnow()))
        else:
            before = {"version_id": a.version_id, "source": a.source}
            a.version_id, a.source, a.updated_at = v.id, "operator", utcnow()
        s.flush()
        refresh_etag(s, device_id)
        audit(s, actor.label, "device.assign", f"device:{device_id}/model:{name}", before,
              {"version": v.version, "sha256": v.sha256})
        s.refresh(d)
        return _out(d, state, s)


@router.delete("/devices/{device_id}/models/{name}", status_code=204)
def unassign(
    device_id: DevicePath,
    name: Annotated[str, Path(pattern=MODEL_NAME)],
    state: StateDep,
    actor: Annotated[Actor, Depends(require("operator"))],
) -> Response:
    with state.sessions.begin() as s:
        _get(s, device_id)
        gone = s.execute(delete(Assignment).where(Assignment.device_id == device_id, Assignment.model_name == name))
        if gone.rowcount:  # type: ignore[attr-defined]
            refresh_etag(s, device_id)
            audit(s, actor.label, "device.unassign", f"device:{device_id}/model:{name}", {"model": name}, None)
    return Response(status_code=204)
