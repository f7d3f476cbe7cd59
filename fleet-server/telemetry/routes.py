"""The telemetry API (viewer role): a device's series and a model version's series over the fleet.

``GET /api/v1/devices/{id}/telemetry`` and ``GET /api/v1/models/{name}/{version}/telemetry`` take
``since`` (an RFC 3339 time, or a number of seconds before ``until``; default an hour), ``until``
(default now) and ``step`` (seconds, a multiple of the rollup window of 60 s; at most
:data:`MAX_POINTS` steps in the range). Points are the rollups merged per step, at the step's start
(Unix seconds ``t`` and ``at``), only for steps something was reported in; latency percentiles come
from the merged histogram (bounds in ``bounds``, counts per point). A device's answer also has its
streams (per epoch: the highest contiguous seq, the highest seq, received, missing and the first
missing ranges), so gaps in what arrived are visible.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from edgefleet.server.api.deps import Actor, SessionDep, require
from edgefleet.server.api.schemas import DEVICE_ID, MODEL_NAME, VERSION
from edgefleet.server.errors import ApiError
from edgefleet.server.models import Device, TelemetryMessage, TelemetryStream, utcnow
from edgefleet.server.telemetry import rollups
from edgefleet.server.telemetry.payloads import BOUNDS

__all__ = ["MAX_POINTS", "router"]

router = APIRouter(prefix="/api/v1", tags=["telemetry"])
MAX_POINTS = 1440  # steps in one answer (a day of minutes)
DEFAULT_SPAN = 3600  # s before ``until`` when ``since`` is not given
MAX_STREAMS = 10  # newest epochs shown per device
MAX_GAPS = 20  # missing seq ranges shown per stream
_GAP_SCAN = 10_000  # stored seqs above the contiguous mark read to find them
_SECONDS = re.compile(r"^[0-9]{1,10}$")

SinceQ = Annotated[str | None, Query(max_length=64, description="RFC 3339 time, or seconds before `until` "
                                     "(default 3600)")]
UntilQ = Annotated[str | None, Query(max_length=64, description="RFC 3339 time (default now)")]
StepQ = Annotated[int, Query(ge=rollups.WINDOW, le=31 * 86400, description="seconds per point, a multiple of 60")]


class LatencyOut(BaseModel):
    counts: list[int] = Field(description="calls per bucket of `bounds` (the last: above the last bound)")
    sum_s: float
    p50_s: float | None
    p95_s: float | None
    p99_s: float | None


class DriftOut(BaseModel):
    reports: int
    samples: int
    psi_max: float | None
    psi_mean: float | None = Field(description="mean PSI weighted by samples")
    mean_shift_max: float | None
    std_ratio_max: float | None


class AccuracyOut(BaseModel):
    window: int = Field(description="predictions with ground truth the accuracies were measured on")
    accuracy: float = Field(description="the devices' window accuracies, weighted by window")


class PointOut(BaseModel):
    t: int = Field(description="start of the step, Unix seconds")
    at: datetime
    reports: int
    inferences: int
    errors: int
    error_rate: float | None = Field(description="errors / inferences (failed calls are among the inferences)")
    latency: LatencyOut
    drift: DriftOut | None
    classes: dict[str, int]
    accuracy: AccuracyOut | None


class ModelPointOut(PointOut):
    devices: int = Field(description="devices that reported this version in the step")


class SeriesOut(BaseModel):
    model: str
    version: str
    points: list[PointOut]


class DevicePointOut(BaseModel):
    t: int
    at: datetime
    reports: int
    cpu_percent_mean: float | None
    cpu_percent_max: float | None
    memory_rss_bytes_max: int | None
    memory_percent_max: float | None
    temperature_c_max: float | None
    disk_free_bytes_min: int | None
    queue_depth_max: int | None
    dropped_max: int | None
    uptime_s_max: float | None


class StreamOut(BaseModel):
    epoch: str
    contiguous_seq: int = Field(description="every seq from 1 to this one is stored")
    max_seq: int
    received: int
    missing: int = Field(description="seqs below max_seq never received")
    gaps: list[tuple[int, int]] = Field(description="the first missing ranges, inclusive")
    first_received_at: datetime
    last_received_at: datetime
    last_at: datetime | None


class _Range(BaseModel):
    since: datetime
    until: datetime
    step: int
    window: int = rollups.WINDOW
    bounds: list[float] = Field(default_factory=lambda: list(BOUNDS), description="latency bucket upper bounds, s")


class DeviceTelemetryOut(_Range):
    device_id: str
    series: list[SeriesOut]
    device: list[DevicePointOut]
    streams: list[StreamOut]


class ModelTelemetryOut(_Range):
    model: str
    version: str
    points: list[ModelPointOut]


def _time(raw: str, field: str) -> datetime:
    try:
        t = datetime.fromisoformat(raw)
    except ValueError:
        raise ApiError(422, f"{field}: {raw[:64]!r} is not an RFC 3339 time", field) from None
    if t.tzinfo is None:
        raise ApiError(422, f"{field}: {raw[:64]!r} has no time zone (add Z or +HH:MM)", field)
    try:
        return t.astimezone(UTC)
    except OverflowError:
        raise ApiError(422, f"{field}: {raw[:64]!r} is out of range", field) from None


def _range(since: str | None, until: str | None, step: int) -> tuple[int, int]:
    """[since, until) in Unix seconds, since aligned down to ``step``. Raises ApiError 422 naming the
    parameter as FastAPI's own validation does (``query.step``)."""
    if step % rollups.WINDOW:
        raise ApiError(422, f"query.step: must be a multiple of {rollups.WINDOW} s", "query.step")
    end = _time(until, "query.until") if until else utcnow()
    end_ts = int(end.timestamp())
    if since is None:
        start_ts = end_ts - DEFAULT_SPAN
    elif _SECONDS.match(since):
        start_ts = end_ts - int(since)
    else:
        start_ts = int(_time(since, "query.since").timestamp())
    start_ts = max(0, start_ts)
    if start_ts >= end_ts:
        raise ApiError(422, "query.since: must be before until", "query.since")
    start_ts -= start_ts % step
    if -(-(end_ts - start_ts) // step) > MAX_POINTS:
        raise ApiError(422, f"query.step: more than {MAX_POINTS} points from since to until; use a larger step",
                       "query.step")
    return start_ts, end_ts


def _stamp(ts: int) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


def _gaps(s: Session, device_id: str, st: TelemetryStream) -> list[tuple[int, int]]:
    if st.contiguous >= st.max_seq:
        return []
    m = TelemetryMessage
    q = (select(m.seq).where(m.device_id == device_id, m.epoch == st.epoch, m.seq > st.contiguous)
         .order_by(m.seq).limit(_GAP_SCAN))
    gaps: list[tuple[int, int]] = []
    expected = st.contiguous + 1
    for (seq,) in s.execute(q):
        if seq > expected:
            gaps.append((expected, seq - 1))
            if len(gaps) >= MAX_GAPS:
                break
        expected = seq + 1
    return gaps


def streams(s: Session, device_id: str) -> list[dict[str, Any]]:
    """The device's newest epochs with their gaps."""
    q = (select(TelemetryStream).where(TelemetryStream.device_id == device_id)
         .order_by(TelemetryStream.last_received_at.desc()).limit(MAX_STREAMS))
    return [{"epoch": st.epoch, "contiguous_seq": st.contiguous, "max_seq": st.max_seq, "received": st.received,
             "missing": max(0, st.max_seq - st.received), "gaps": _gaps(s, device_id, st),
             "first_received_at": st.first_received_at, "last_received_at": st.last_received_at,
             "last_at": st.last_at} for st in s.scalars(q)]


@router.get("/devices/{device_id}/telemetry", response_model=DeviceTelemetryOut)
def device_telemetry(
    device_id: Annotated[str, Path(pattern=DEVICE_ID)],
    s: SessionDep,
    _: Annotated[Actor, Depends(require("viewer"))],
    since: SinceQ = None,
    until: UntilQ = None,
    step: StepQ = rollups.WINDOW,
) -> dict[str, Any]:
    """The device's telemetry per model version it served, its device figures, and its streams."""
    start, end = _range(since, until, step)
    if s.get(Device, device_id) is None:
        raise ApiError(404, f"device_id: no device {device_id}", "device_id")
    return {
        "device_id": device_id, "since": _stamp(start), "until": _stamp(end), "step": step,
        "series": rollups.device_series(s, device_id, start, end, step),
        "device": rollups.device_figures(s, device_id, start, end, step),
        "streams": streams(s, device_id),
    }


@router.get("/models/{name}/{version}/telemetry", response_model=ModelTelemetryOut)
def model_telemetry(
    name: Annotated[str, Path(pattern=MODEL_NAME)],
    version: Annotated[str, Path(pattern=VERSION)],
    s: SessionDep,
    _: Annotated[Actor, Depends(require("viewer"))],
    since: SinceQ = None,
    until: UntilQ = None,
    step: StepQ = rollups.WINDOW,
) -> dict[str, Any]:
    """One model version's telemetry merged over every device that reported it (whether or not the
    registry holds that version: devices may serve local models)."""
    start, end = _range(since, until, step)
    return {
        "model": name, "version": version, "since": _stamp(start), "until": _stamp(end), "step": step,
        "points": rollups.model_series(s, name, version, start, end, step),
    }
