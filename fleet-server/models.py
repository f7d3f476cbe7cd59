"""The server's tables, as SQLAlchemy 2 declarative models. Alembic migrations mirror them.

Times are timezone-aware UTC everywhere (:class:`UTCDateTime` restores the zone SQLite drops).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import JSON, BigInteger, DateTime, ForeignKey, Index, Integer, String, Text, UniqueConstraint, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.types import TypeDecorator

__all__ = [
    "LATENCY_BUCKETS",
    "ApiToken",
    "Assignment",
    "AuditEntry",
    "Base",
    "Device",
    "DeviceEvent",
    "EnrollmentToken",
    "ModelVersion",
    "ServerSecret",
    "TelemetryClassRollup",
    "TelemetryDeviceRollup",
    "TelemetryMessage",
    "TelemetryRollup",
    "TelemetryStream",
    "TufMetadata",
    "UTCDateTime",
    "upsert_insert",
    "utcnow",
]


def utcnow() -> datetime:
    return datetime.now(UTC)


def upsert_insert(s: Session, model: type[Base]) -> postgresql.Insert | sqlite.Insert:
    """An INSERT into ``model``'s table that takes ``on_conflict_do_nothing`` / ``on_conflict_do_update``
    (``INSERT ... ON CONFLICT``, which both databases the server runs on speak): one statement, safe
    against a concurrent insert of the same key, where select-then-insert would be a 409 race."""
    if s.get_bind().dialect.name == "postgresql":
        return postgresql.insert(model)
    return sqlite.insert(model)  # make_engine allows only these two


class UTCDateTime(TypeDecorator[datetime]):
    """A DateTime that is always aware UTC in Python, whatever the database keeps."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTCDateTime column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime, dict[str, Any]: JSON, list[Any]: JSON}


class ServerSecret(Base):
    """Server-wide secrets shared by every replica (e.g. the key device access tokens are MACed with)."""

    __tablename__ = "server_secrets"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))


class ApiToken(Base):
    """An operator's API token: ``efo_<id>_<secret>``; only sha256(secret) is kept."""

    __tablename__ = "api_tokens"
    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))  # viewer | operator | admin
    secret_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime]
    created_by: Mapped[str] = mapped_column(String(160))
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class EnrollmentToken(Base):
    """A token devices enroll with: ``efe_<id>_<secret>``; tags given to the devices, expiry, uses."""

    __tablename__ = "enrollment_tokens"
    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    tags: Mapped[list[Any]]
    max_uses: Mapped[int] = mapped_column(Integer)
    uses: Mapped[int] = mapped_column(Integer, default=0)
    expires_at: Mapped[datetime]
    created_at: Mapped[datetime]
    created_by: Mapped[str] = mapped_column(String(160))
    revoked_at: Mapped[datetime | None]


class Device(Base):
    """An enrolled device: its certificate (CN = id), tags, what it reported (running versions, the update
    block: state, target, last failure), and its check-in ETag (see :mod:`edgefleet.server.desired`)."""

    __tablename__ = "devices"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tags: Mapped[list[Any]]
    cert_serial: Mapped[str] = mapped_column(String(64))  # hex of the current certificate's serial
    cert_pem: Mapped[str] = mapped_column(Text)
    cert_not_after: Mapped[datetime]
    enrolled_at: Mapped[datetime]
    enrollment_token_id: Mapped[str | None] = mapped_column(String(16))
    revoked_at: Mapped[datetime | None]
    last_seen: Mapped[datetime | None]
    reported_at: Mapped[datetime | None]
    agent_version: Mapped[str | None] = mapped_column(String(64))
    hardware_profile: Mapped[str | None] = mapped_column(String(128))
    running: Mapped[list[Any]] = mapped_column(default=list)
    # "ts-N": the director timestamp version N signed with the current assignments; a hash of the desired
    # state while the server has no director root (or no online keys). Written with every change.
    desired_etag: Mapped[str] = mapped_column(String(64))
    update_state: Mapped[dict[str, Any] | None]  # the last reported update block (ReportIn.update)
    __table_args__ = (Index("ix_devices_last_seen", "last_seen"),)


class ModelVersion(Base):
    """One uploaded bundle: NAME-VERSION, stored by content at blobs/sha256/ab/abcd..."""

    __tablename__ = "model_versions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(128))
    runtime: Mapped[str] = mapped_column(String(16))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    manifest: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]
    created_by: Mapped[str] = mapped_column(String(160))
    __table_args__ = (UniqueConstraint("name", "version", name="uq_model_versions_name_version"),)


class Assignment(Base):
    """Which version of a model a device should run (set by an operator now, by rollouts later)."""

    __tablename__ = "assignments"
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="RESTRICT"), index=True)
    source: Mapped[str] = mapped_column(String(32), default="operator")  # operator | rollout:<id>
    updated_at: Mapped[datetime]


_HAS_SEQ = text("seq IS NOT NULL")


class DeviceEvent(Base):
    """An update lifecycle event a device reported. ``seq`` is the device's own event number (None from
    agents before it): each (device, seq) is stored at most once, so a report retried after a lost
    answer adds nothing. ``data``: model, version, target, sha256, reason, detail."""

    __tablename__ = "device_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), index=True)
    seq: Mapped[int | None] = mapped_column(BigInteger)
    at: Mapped[datetime]
    received_at: Mapped[datetime]
    kind: Mapped[str] = mapped_column(String(64))
    data: Mapped[dict[str, Any]]
    __table_args__ = (
        Index("uq_device_events_device_seq", "device_id", "seq", unique=True, sqlite_where=_HAS_SEQ,
              postgresql_where=_HAS_SEQ),
    )


class AuditEntry(Base):
    """Every change: who, what, when, and the state before and after (JSON)."""

    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(index=True)
    actor: Mapped[str] = mapped_column(String(160))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(256))
    before: Mapped[dict[str, Any] | None]
    after: Mapped[dict[str, Any] | None]


class TufMetadata(Base):
    """Every version of every role of a TUF repository (``image`` now; per-device director repositories
    later), as the exact signed bytes served. Versions only grow; nothing is ever updated in place."""

    __tablename__ = "tuf_metadata"
    repo: Mapped[str] = mapped_column(String(128), primary_key=True)  # "image" | "director/<device_id>"
    role: Mapped[str] = mapped_column(String(32), primary_key=True)  # root | targets | snapshot | timestamp
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[str] = mapped_column(Text)  # the metadata file, canonical JSON
    expires: Mapped[datetime]
    created_at: Mapped[datetime]
    created_by: Mapped[str] = mapped_column(String(160))


# -- telemetry (edgefleet.server.telemetry) --------------------------------------------------------------
LATENCY_BUCKETS = 16  # latency histogram counts per rollup: len(edgefleet.agent.metrics.BUCKETS) + 1 (overflow)


class TelemetryMessage(Base):
    """Every ``telemetry`` and ``events`` message a device published, once: the key is the device's own
    (epoch, seq), so a message the broker delivers again is not stored again. Kept for
    ``mqtt_raw_retention_days`` (by ``received_at``, the server's clock)."""

    __tablename__ = "telemetry_messages"
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    epoch: Mapped[str] = mapped_column(String(16), primary_key=True)  # 16 hex chars, new with each device queue
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # 1, 2, ... within the epoch
    topic: Mapped[str] = mapped_column(String(16))  # telemetry | events
    at: Mapped[datetime]  # the device's clock
    received_at: Mapped[datetime] = mapped_column(index=True)
    data: Mapped[dict[str, Any]]  # the payload as validated


class TelemetryStream(Base):
    """One device epoch's sequence as received: ``contiguous`` is the highest seq with every seq from 1 up
    to it stored, ``max_seq`` the highest stored, ``received`` how many distinct seqs are stored (so
    ``max_seq - received`` are missing, and nothing is missing when ``contiguous == max_seq``)."""

    __tablename__ = "telemetry_streams"
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    epoch: Mapped[str] = mapped_column(String(16), primary_key=True)
    contiguous: Mapped[int] = mapped_column(BigInteger, default=0)
    max_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    received: Mapped[int] = mapped_column(BigInteger, default=0)
    first_received_at: Mapped[datetime]
    last_received_at: Mapped[datetime] = mapped_column(index=True)
    last_at: Mapped[datetime | None]  # the device's clock on the newest message


class TelemetryRollup(Base):
    """Per device, model and version, one fixed window (``bucket``: its start, Unix seconds, a multiple
    of the rollup window) of telemetry summed as it arrives: counts add, the latency histogram adds
    bucket by bucket (the bounds are fixed, so merging is exact), drift keeps maxima and a
    sample-weighted PSI mean, accuracy a window-weighted mean. Class counts are in
    :class:`TelemetryClassRollup`."""

    __tablename__ = "telemetry_rollups"
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    model: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[str] = mapped_column(String(128), primary_key=True)
    bucket: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    reports: Mapped[int] = mapped_column(BigInteger, default=0)  # telemetry messages summed in
    inferences: Mapped[int] = mapped_column(BigInteger, default=0)
    errors: Mapped[int] = mapped_column(BigInteger, default=0)
    latency_sum: Mapped[float] = mapped_column(default=0.0)  # seconds
    lat00: Mapped[int] = mapped_column(BigInteger, default=0)
    lat01: Mapped[int] = mapped_column(BigInteger, default=0)
    lat02: Mapped[int] = mapped_column(BigInteger, default=0)
    lat03: Mapped[int] = mapped_column(BigInteger, default=0)
    lat04: Mapped[int] = mapped_column(BigInteger, default=0)
    lat05: Mapped[int] = mapped_column(BigInteger, default=0)
    lat06: Mapped[int] = mapped_column(BigInteger, default=0)
    lat07: Mapped[int] = mapped_column(BigInteger, default=0)
    lat08: Mapped[int] = mapped_column(BigInteger, default=0)
    lat09: Mapped[int] = mapped_column(BigInteger, default=0)
    lat10: Mapped[int] = mapped_column(BigInteger, default=0)
    lat11: Mapped[int] = mapped_column(BigInteger, default=0)
    lat12: Mapped[int] = mapped_column(BigInteger, default=0)
    lat13: Mapped[int] = mapped_column(BigInteger, default=0)
    lat14: Mapped[int] = mapped_column(BigInteger, default=0)
    lat15: Mapped[int] = mapped_column(BigInteger, default=0)  # above the last bound
    drift_reports: Mapped[int] = mapped_column(BigInteger, default=0)
    drift_samples: Mapped[int] = mapped_column(BigInteger, default=0)
    psi_max: Mapped[float | None]
    psi_mean_wsum: Mapped[float] = mapped_column(default=0.0)  # sum of psi_mean * samples
    mean_shift_max: Mapped[float | None]
    std_ratio_max: Mapped[float | None]
    accuracy_wsum: Mapped[float] = mapped_column(default=0.0)  # sum of accuracy * window
    accuracy_window: Mapped[int] = mapped_column(BigInteger, default=0)
    __table_args__ = (Index("ix_telemetry_rollups_model_bucket", "model", "version", "bucket"),
                      Index("ix_telemetry_rollups_bucket", "bucket"))


class TelemetryClassRollup(Base):
    """Output class counts per device, model, version and window (see :class:`TelemetryRollup`)."""

    __tablename__ = "telemetry_class_rollups"
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    model: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[str] = mapped_column(String(128), primary_key=True)
    bucket: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    label: Mapped[str] = mapped_column(String(64), primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger, default=0)
    __table_args__ = (Index("ix_telemetry_class_rollups_model_bucket", "model", "version", "bucket"),
                      Index("ix_telemetry_class_rollups_bucket", "bucket"))


class TelemetryDeviceRollup(Base):
    """The device block of telemetry per device and window: maxima and sums (means are sum / reports)."""

    __tablename__ = "telemetry_device_rollups"
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    bucket: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    reports: Mapped[int] = mapped_column(BigInteger, default=0)
    cpu_percent_sum: Mapped[float] = mapped_column(default=0.0)
    cpu_percent_max: Mapped[float | None]
    memory_rss_max: Mapped[int | None] = mapped_column(BigInteger)
    memory_percent_max: Mapped[float | None]
    temperature_max: Mapped[float | None]
    disk_free_min: Mapped[int | None] = mapped_column(BigInteger)
    queue_depth_max: Mapped[int | None] = mapped_column(BigInteger)
    dropped_max: Mapped[int | None] = mapped_column(BigInteger)
    uptime_max: Mapped[float | None]
    __table_args__ = (Index("ix_telemetry_device_rollups_bucket", "bucket"),)
