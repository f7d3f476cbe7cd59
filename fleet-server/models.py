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
    "Alert",
    "AlertDelivery",
    "AlertDevice",
    "AlertRule",
    "ApiToken",
    "Assignment",
    "AuditEntry",
    "Base",
    "ControllerLease",
    "Device",
    "DeviceEvent",
    "EnrollmentToken",
    "ModelVersion",
    "Rollout",
    "RolloutMember",
    "ServerSecret",
    "TelemetryClassRollup",
    "TelemetryDeviceRollup",
    "TelemetryMessage",
    "TelemetryRollup",
    "TelemetryShadowRollup",
    "TelemetryStream",
    "TufMetadata",
    "UTCDateTime",
    "Webhook",
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
    """Which version of a model a device should serve, and optionally a candidate it runs beside it in
    shadow. ``source`` says who set it, in the order of precedence (see
    :mod:`edgefleet.server.rollouts.assign`): ``pin`` (no rollout changes it) beats ``operator`` beats
    ``rollout:<id>``."""

    __tablename__ = "assignments"
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="RESTRICT"), index=True)
    source: Mapped[str] = mapped_column(String(32), default="operator")  # pin | operator | rollout:<id>
    updated_at: Mapped[datetime]
    # a candidate run beside the served version (director role "shadow"); None: no shadow
    shadow_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", ondelete="RESTRICT", name="fk_assignments_shadow_version_id"), index=True)


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


# -- alerts for retraining (edgefleet.server.alerts) -----------------------------------------------------
_OPEN = text("state = 'open'")


class AlertRule(Base):
    """An operator's thresholds for one model (every version): a field left None falls back to the
    version's bundle manifest (``metadata["edgefleet.alert.*"]``), then to the defaults of
    :mod:`edgefleet.server.alerts.rules`."""

    __tablename__ = "alert_rules"
    model: Mapped[str] = mapped_column(String(64), primary_key=True)
    drift_psi_max: Mapped[float | None]  # an alert when a report's drift.psi_max is above this
    drift_mean_shift_max: Mapped[float | None]  # ... or its drift.mean_shift_max (in baseline std units)
    accuracy_min: Mapped[float | None]  # an alert when accuracy.accuracy is below this (0..1)
    min_samples: Mapped[int | None] = mapped_column(Integer)  # drift samples / accuracy window needed to judge
    cooldown_s: Mapped[int | None] = mapped_column(Integer)  # no new alert of a kind within this of the last, s
    updated_at: Mapped[datetime]
    updated_by: Mapped[str] = mapped_column(String(160))


class Alert(Base):
    """A threshold broken by a model version, fleet-wide: at most one ``open`` alert per (model,
    version, kind) (a partial unique index, so replicas cannot raise two); later breaches while it is
    open add to ``occurrences``, ``worst`` and :class:`AlertDevice` instead of raising another."""

    __tablename__ = "alerts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16))  # drift | accuracy
    state: Mapped[str] = mapped_column(String(8))  # open | acked
    metric: Mapped[str] = mapped_column(String(32))  # psi_max | mean_shift_max | accuracy: what broke first
    value: Mapped[float]  # its value in the report that raised the alert
    threshold: Mapped[float]
    worst: Mapped[float]  # the highest drift / lowest accuracy reported while open
    device_id: Mapped[str] = mapped_column(String(64))  # the device whose report raised it
    occurrences: Mapped[int] = mapped_column(BigInteger, default=1)  # reports that broke it while open
    raised_at: Mapped[datetime]
    last_at: Mapped[datetime]  # the latest breaking report (server clock)
    acked_at: Mapped[datetime | None]
    acked_by: Mapped[str | None] = mapped_column(String(160))
    data: Mapped[dict[str, Any]]  # the rule applied and the breaking report's drift / accuracy blocks
    __table_args__ = (
        Index("uq_alerts_open", "model", "version", "kind", unique=True, sqlite_where=_OPEN, postgresql_where=_OPEN),
        Index("ix_alerts_key_raised", "model", "version", "kind", "raised_at"),
        Index("ix_alerts_state_id", "state", "id"),
    )


class AlertDevice(Base):
    """The devices whose reports broke an alert's threshold while it was open."""

    __tablename__ = "alert_devices"
    alert_id: Mapped[int] = mapped_column(ForeignKey("alerts.id", ondelete="CASCADE"), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    first_at: Mapped[datetime]


class Webhook(Base):
    """An endpoint alerts are POSTed to, signed as Standard Webhooks says with ``secret`` (``whsec_`` +
    base64, shown to the admin once). ``models``: the models it wants (empty: all). ``disabled_at``: set
    when the receiver answered 410 Gone."""

    __tablename__ = "webhooks"
    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    url: Mapped[str] = mapped_column(String(2048))
    secret: Mapped[str] = mapped_column(String(128))
    models: Mapped[list[Any]]
    description: Mapped[str] = mapped_column(String(256), default="")
    created_at: Mapped[datetime]
    created_by: Mapped[str] = mapped_column(String(160))
    disabled_at: Mapped[datetime | None]


class AlertDelivery(Base):
    """The durable outbox: one row per alert and destination (a webhook, or the MQTT topic
    ``edgefleet/v1/alerts/{model}``), with the exact body sent on every attempt. ``id`` is the
    ``webhook-id`` (the same on every retry, the receiver's idempotency key). An attempt is claimed by
    raising ``attempts`` and moving ``next_attempt_at`` past its timeout and back-off in one
    compare-and-set UPDATE committed before the request goes out, so each attempt number is sent at
    most once, whichever replica or restarted worker runs it."""

    __tablename__ = "alert_deliveries"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # msg_<hex>
    alert_id: Mapped[int] = mapped_column(ForeignKey("alerts.id", ondelete="CASCADE"), index=True)
    channel: Mapped[str] = mapped_column(String(8))  # webhook | mqtt
    webhook_id: Mapped[str | None] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"), index=True)
    topic: Mapped[str | None] = mapped_column(String(256))  # mqtt: edgefleet/v1/alerts/{model}
    body: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(10))  # pending | delivered | failed | skipped
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime]
    last_attempt_at: Mapped[datetime | None]
    last_status: Mapped[int | None] = mapped_column(Integer)  # HTTP status of the last attempt
    last_error: Mapped[str | None] = mapped_column(String(300))
    created_at: Mapped[datetime]
    done_at: Mapped[datetime | None]  # delivered, failed or skipped
    __table_args__ = (Index("ix_alert_deliveries_due", "state", "next_attempt_at"),)


# -- staged rollouts (edgefleet.server.rollouts) -----------------------------------------------------------


class Rollout(Base):
    """A model version rolled out in stages to the devices its tags select (see
    :mod:`edgefleet.server.rollouts`). ``state_version`` is the fencing counter: every change is an
    ``UPDATE ... WHERE id = ? AND state_version = ?`` that raises it, so a controller replica acting on
    a stale read changes nothing. ``gates``: the :class:`~edgefleet.server.rollouts.types.Gates` as JSON;
    ``last_gates``: the last judgement's gate results (what ``rollout show`` prints)."""

    __tablename__ = "rollouts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(64))
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="RESTRICT"), index=True)
    version_b_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="RESTRICT"))
    tags: Mapped[list[Any]]
    gates: Mapped[dict[str, Any]]
    state: Mapped[str] = mapped_column(String(16))  # running | paused | aborted | completed
    stage: Mapped[int] = mapped_column(Integer, default=0)  # index into gates["stages"]
    phase: Mapped[str] = mapped_column(String(8))  # shadow | serve | hold
    stage_started_at: Mapped[datetime]
    phase_started_at: Mapped[datetime]
    state_version: Mapped[int] = mapped_column(BigInteger, default=0)
    reason: Mapped[str] = mapped_column(Text, default="")
    last_gates: Mapped[list[Any]] = mapped_column(default=list)
    last_judged_at: Mapped[datetime | None]
    created_at: Mapped[datetime]
    created_by: Mapped[str] = mapped_column(String(160))
    updated_at: Mapped[datetime]
    ended_at: Mapped[datetime | None]
    __table_args__ = (Index("ix_rollouts_model_state", "model", "state"),)


class RolloutMember(Base):
    """A device a rollout selected at creation (fixed from then on): its rank in the order of
    sha256(rollout id, device id), the arm of an A/B stage, its status
    (:data:`~edgefleet.server.rollouts.types.MEMBER_STATUSES`) and the assignment it had before, which
    an abort restores."""

    __tablename__ = "rollout_members"
    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True,
                                           index=True)
    rank: Mapped[int] = mapped_column(Integer)
    arm: Mapped[str] = mapped_column(String(1), default="a")
    status: Mapped[str] = mapped_column(String(16))
    previous_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="RESTRICT"))
    previous_source: Mapped[str | None] = mapped_column(String(32))
    assigned_at: Mapped[datetime | None]
    updated_at: Mapped[datetime | None]
    detail: Mapped[str] = mapped_column(String(256), default="")


class ControllerLease(Base):
    """Which server replica runs a background controller (``rollouts``) until ``expires_at``. Taken or
    renewed by compare-and-set; ``token`` grows with every takeover (the fencing token)."""

    __tablename__ = "controller_leases"
    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    token: Mapped[int] = mapped_column(BigInteger, default=0)
    expires_at: Mapped[datetime]


class TelemetryShadowRollup(Base):
    """Shadow comparisons per device, model, served version, candidate and window: live inputs the
    candidate also ran on (``compared``), those it agreed on, those offered but not compared
    (``skipped``) and the sum of mean absolute differences (see :class:`TelemetryRollup`)."""

    __tablename__ = "telemetry_shadow_rollups"
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    model: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[str] = mapped_column(String(128), primary_key=True)
    candidate: Mapped[str] = mapped_column(String(128), primary_key=True)
    bucket: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    compared: Mapped[int] = mapped_column(BigInteger, default=0)
    agreed: Mapped[int] = mapped_column(BigInteger, default=0)
    skipped: Mapped[int] = mapped_column(BigInteger, default=0)
    abs_error_sum: Mapped[float] = mapped_column(default=0.0)
    __table_args__ = (Index("ix_telemetry_shadow_rollups_candidate_bucket", "model", "candidate", "bucket"),
                      Index("ix_telemetry_shadow_rollups_bucket", "bucket"))
