"""The wire contract of ``edgefleet/v1/{device_id}/telemetry`` and ``.../events``, as pydantic models,
and :func:`parse`, which turns one MQTT message into a validated :class:`Parsed` or raises
:class:`Rejected` with a reason from :data:`REASONS` (the label of ``edgefleet_telemetry_rejected_total``).

Every payload is a JSON object with ``schema: 1``, ``device_id`` (equal to the topic's), ``at`` (RFC 3339
with a zone), ``epoch`` (16 hex characters) and ``seq`` (1, 2, ... within the epoch, one sequence for
telemetry and events). Unknown fields are ignored, so a newer agent's additions do not get its messages
refused; every known field is bounded (lengths, counts, finite numbers), so nothing a device sends can
reach the database unchecked. Pure: no I/O.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from edgefleet.agent.metrics import BUCKETS
from edgefleet.server.api.schemas import DEVICE_ID, MODEL_NAME, REASON, SEQ_MAX, SHA256, TARGET_PATH, VERSION

__all__ = [
    "BOUNDS",
    "REASONS",
    "TOPIC_KINDS",
    "EventIn",
    "ModelFigures",
    "Parsed",
    "Rejected",
    "Shadow",
    "TelemetryIn",
    "parse",
    "topic_device",
]

BOUNDS: tuple[float, ...] = BUCKETS  # latency bucket upper bounds, s; counts has len(BOUNDS) + 1 (the last: above)
EPOCH = r"^[0-9a-f]{16}$"
TOPIC = re.compile(r"^edgefleet/v1/([a-z0-9][a-z0-9-]{0,63})/(telemetry|events)$")
TOPIC_KINDS = ("telemetry", "events")
# Why a message was refused (acknowledged and dropped): the fixed label set of the rejected counter.
REASONS = (
    "bad_topic",  # not edgefleet/v1/{device_id}/telemetry|events
    "too_large",  # over mqtt_max_payload_bytes
    "overflow",  # a QoS 0 message while the ingester's queue was full
    "not_json",  # not a JSON object
    "schema_version",  # schema is not 1
    "invalid",  # a field is missing, of the wrong type or out of bounds
    "device_mismatch",  # device_id is not the topic's
    "unknown_device",  # no such enrolled device
    "revoked_device",  # the device is revoked
    "store_error",  # the database refused this one message (logged)
)
COUNT_MAX = 10**15
DRIFT_CAP = 1e12  # drift statistics above this (or infinite) are stored as this
Label = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]+$")]
Ratio = Annotated[float, Field(ge=0.0, le=1.0)]
Figure = Annotated[float, Field(ge=0.0, le=1e15)]
Count = Annotated[int, Field(ge=0, le=COUNT_MAX)]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, frozen=True)


class Latency(_Wire):
    counts: list[Count] = Field(min_length=len(BOUNDS) + 1, max_length=len(BOUNDS) + 1,
                                description="calls per bucket: counts[i] <= BOUNDS[i] and > BOUNDS[i-1]; last: above")
    sum_s: Figure
    p50_s: Figure | None = None
    p95_s: Figure | None = None
    p99_s: Figure | None = None


class Drift(_Wire):
    """Drift statistics: unbounded by nature (a shift against a near-constant baseline feature is huge),
    so any value from 0 up is taken, infinity and anything above :data:`DRIFT_CAP` as the cap, NaN as
    not measured: one odd statistic never costs the message its counts."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=True, frozen=True)
    samples: Count
    features: Annotated[int, Field(ge=0, le=1 << 24)] = 0
    psi_max: Annotated[float, Field(ge=0)] | None = None
    psi_mean: Annotated[float, Field(ge=0)] | None = None
    mean_shift_max: Annotated[float, Field(ge=0)] | None = None
    std_ratio_max: Annotated[float, Field(ge=0)] | None = None
    granularity: Literal["feature", "tensor"] | None = None

    @field_validator("psi_max", "psi_mean", "mean_shift_max", "std_ratio_max", mode="wrap")
    @classmethod
    def _capped(cls, value: Any, handler: Any) -> float | None:
        if isinstance(value, float) and math.isnan(value):
            return None
        v: float | None = handler(value)
        return None if v is None else min(v, DRIFT_CAP)


class Accuracy(_Wire):
    window: Count
    accuracy: Ratio | None = None
    precision: dict[Label, Ratio] = Field(default_factory=dict, max_length=1000)
    recall: dict[Label, Ratio] = Field(default_factory=dict, max_length=1000)


class Shadow(_Wire):
    """A candidate version run beside the served one over the interval (shadow mode): ``compared`` live
    inputs also run on the candidate, ``agreed`` of them with the same top-1 (classifier outputs) or a mean
    absolute difference within the golden tolerance (dense outputs), ``skipped`` offered but not compared
    (rate limit, busy), ``abs_error_sum`` the sum over compared inputs of the mean |served - candidate| of
    the first output, ``errors`` candidate runs that raised (counted in ``compared``, not ``agreed``)."""

    version: str = Field(pattern=VERSION)
    compared: Count
    agreed: Count
    skipped: Count = 0
    abs_error_sum: Figure = 0.0
    errors: Count = 0

    @field_validator("agreed")
    @classmethod
    def _agreed_within_compared(cls, value: int, info: ValidationInfo) -> int:
        compared = info.data.get("compared")
        if compared is not None and value > compared:
            raise ValueError(f"agreed ({value}) is more than compared ({compared})")
        return value


class ModelFigures(_Wire):
    """One served model version over the interval."""

    name: str = Field(pattern=MODEL_NAME)
    version: str = Field(pattern=VERSION)
    inferences: Count
    errors: Count
    latency: Latency
    drift: Drift | None = None
    classes: dict[Label, Count] = Field(default_factory=dict, max_length=1000)
    accuracy: Accuracy | None = None
    shadow: Shadow | None = None


class DeviceFigures(_Wire):
    """The device block: every figure optional (a device without a temperature sensor sends null)."""

    cpu_percent: Annotated[float, Field(ge=0, le=100_000)] | None = None
    memory_rss_bytes: Count | None = None
    memory_percent: Annotated[float, Field(ge=0, le=100)] | None = None
    temperature_c: Annotated[float, Field(ge=-300, le=1000)] | None = None
    disk_free_bytes: Count | None = None
    uptime_s: Figure | None = None
    queue_depth: Count | None = None
    dropped: Count | None = None
    agent_version: str | None = Field(default=None, pattern=VERSION)


class _Numbered(_Wire):
    schema_: Literal[1] = Field(alias="schema")
    device_id: str = Field(pattern=DEVICE_ID)
    at: AwareDatetime
    epoch: str = Field(pattern=EPOCH)
    seq: int = Field(ge=1, le=SEQ_MAX)


class TelemetryIn(_Numbered):
    interval_s: Annotated[float, Field(gt=0, le=86400 * 366)] = 60.0
    models: list[ModelFigures] = Field(default_factory=list, max_length=64)
    device: DeviceFigures = Field(default_factory=DeviceFigures)


class EventIn(_Numbered):
    """An update lifecycle event (the fields of the HTTP report's ``UpdateEvent``)."""

    kind: str = Field(pattern=r"^[a-z][a-z0-9_.-]{0,63}$")
    model: str | None = Field(default=None, pattern=MODEL_NAME)
    version: str | None = Field(default=None, pattern=VERSION)
    target: str | None = Field(default=None, pattern=TARGET_PATH, max_length=256)
    sha256: str | None = Field(default=None, pattern=SHA256)
    reason: str | None = Field(default=None, pattern=REASON)
    detail: str = Field(default="", max_length=2048, pattern=r"^[^\x00]*$")


class Rejected(Exception):
    """A message that is acknowledged and dropped: ``reason`` is one of :data:`REASONS`; the message
    (for the log) names the field."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Parsed:
    """A valid message: ``topic`` is ``telemetry`` or ``events``, ``body`` the validated payload."""

    topic: str
    body: TelemetryIn | EventIn

    @property
    def device_id(self) -> str:
        return self.body.device_id

    @property
    def key(self) -> tuple[str, str, int]:
        """(device_id, epoch, seq): what the message is stored once by."""
        return self.body.device_id, self.body.epoch, self.body.seq

    @property
    def at(self) -> datetime:
        return self.body.at


def topic_device(topic: str) -> tuple[str, str] | None:
    """(device_id, kind) of a telemetry or events topic, else None."""
    m = TOPIC.match(topic)
    return (m.group(1), m.group(2)) if m else None


def _first_problem(e: ValidationError) -> tuple[str, str]:
    err = e.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err["loc"]) or "payload"
    reason = "schema_version" if err["loc"][:1] == ("schema",) and err["type"] != "missing" else "invalid"
    if err["type"] in ("json_invalid", "model_type") and not err["loc"]:
        reason = "not_json"
    return reason, f"{loc}: {err['msg']}"


def parse(topic: str, payload: bytes, max_bytes: int) -> Parsed:
    """Validate one message. Raises :class:`Rejected` naming the reason and the first bad field."""
    where = topic_device(topic)
    if where is None:
        raise Rejected("bad_topic", f"topic: {topic[:200]!r} is not edgefleet/v1/DEVICE/telemetry|events")
    device_id, kind = where
    if len(payload) > max_bytes:
        raise Rejected("too_large", f"payload: {len(payload)} bytes, more than {max_bytes}")
    model: type[TelemetryIn | EventIn] = TelemetryIn if kind == "telemetry" else EventIn
    try:
        body = model.model_validate_json(payload)
    except ValidationError as e:
        reason, message = _first_problem(e)
        raise Rejected(reason, message) from e
    if body.device_id != device_id:
        raise Rejected("device_mismatch", f"device_id: {body.device_id!r} is not the topic's {device_id!r}")
    return Parsed(kind, body)


def as_event_data(body: EventIn) -> dict[str, Any]:
    """What ``device_events.data`` keeps of an event (as the HTTP report path stores it), plus its epoch."""
    return {
        "model": body.model, "version": body.version, "target": body.target, "sha256": body.sha256,
        "reason": body.reason, "detail": body.detail, "epoch": body.epoch,
    }
