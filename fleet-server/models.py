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
    "ApiToken",
    "Assignment",
    "AuditEntry",
    "Base",
    "Device",
    "DeviceEvent",
    "EnrollmentToken",
    "ModelVersion",
    "ServerSecret",
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
