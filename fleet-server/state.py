"""What a running server holds: settings, database, CA, blob store, MAC key and metrics; and
``init_server``, which makes a fresh server's database, CA and first admin token."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from edgefleet.errors import ConfigError
from edgefleet.server.blobs import BlobStore
from edgefleet.server.ca import CA_KEY, FleetCA, create_ca, load_ca
from edgefleet.server.db import LoopConnection, make_engine, make_sessionmaker, migrate, schema_is_current
from edgefleet.server.metrics import Metrics
from edgefleet.server.models import ApiToken, AuditEntry, Device, ServerSecret, utcnow
from edgefleet.server.settings import Settings
from edgefleet.server.tokens import new_mac_key, new_token

__all__ = ["ROLES", "ServerState", "audit", "init_server", "open_state"]

ROLES = ("viewer", "operator", "admin")  # each includes the ones before it
_MAC_KEY = "device_token_mac_key"


@dataclass
class ServerState:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    ca: FleetCA
    blobs: BlobStore
    mac_key: str
    metrics: Metrics
    loop_db: LoopConnection

    def count_online(self) -> tuple[int, int]:
        since = utcnow() - timedelta(seconds=self.settings.online_window)
        with self.sessions() as s:
            live = Device.revoked_at.is_(None)
            total = s.scalar(select(func.count()).select_from(Device).where(live)) or 0
            online = s.scalar(select(func.count()).select_from(Device).where(live, Device.last_seen >= since)) or 0
        return int(online), int(total)


def audit(
    s: Session, actor: str, action: str, target: str, before: dict[str, Any] | None, after: dict[str, Any] | None
) -> None:
    """Record a change in the audit log, in the caller's transaction (so both commit or neither)."""
    s.add(AuditEntry(at=utcnow(), actor=actor, action=action, target=target, before=before, after=after))


def _mac_key(sessions: sessionmaker[Session]) -> str:
    with sessions.begin() as s:
        row = s.get(ServerSecret, _MAC_KEY)
        if row is None:
            row = ServerSecret(name=_MAC_KEY, value=new_mac_key())
            s.add(row)
        return row.value


def open_state(settings: Settings, *, run_migrations: bool | None = None) -> ServerState:
    """Connect, migrate (when asked or configured), and load the CA. Raises ConfigError when the server
    was never initialised or the schema is behind and migrations are off."""
    engine = make_engine(settings.database_url())
    if settings.migrate_on_start if run_migrations is None else run_migrations:
        migrate(engine)
    elif not schema_is_current(engine):
        raise ConfigError("db_url: the database schema is not current; run `edgefleet server migrate`")
    sessions = make_sessionmaker(engine)
    ca = load_ca(settings.data_dir)
    blobs = BlobStore(settings.data_dir)
    blobs.sweep()
    state = ServerState(
        settings, engine, sessions, ca, blobs, _mac_key(sessions), Metrics(lambda: (0, 0)), LoopConnection(engine)
    )
    state.metrics = Metrics(state.count_online)
    return state


def init_server(settings: Settings, admin_name: str = "admin") -> str:
    """Create the data folder, database, fleet CA and MAC key, and return a first admin token (shown
    once; only its hash is stored). Raises ConfigError when a CA already exists there."""
    if (settings.data_dir / CA_KEY).exists():
        raise ConfigError(f"{settings.data_dir}: already initialised (a fleet CA exists)")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.database_url())
    try:
        migrate(engine)
        sessions = make_sessionmaker(engine)
        create_ca(settings.data_dir)
        _mac_key(sessions)
        token, token_id, digest = new_token("efo")
        with sessions.begin() as s:
            s.add(
                ApiToken(
                    id=token_id, name=admin_name, role="admin", secret_sha256=digest,
                    created_at=utcnow(), created_by="server init", expires_at=None, revoked_at=None,
                )
            )
            audit(s, "server init", "token.create", f"token:{token_id}", None, {"name": admin_name, "role": "admin"})
    finally:
        engine.dispose()
    return token
