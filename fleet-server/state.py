"""What a running server holds: settings, database, CA, blob store, MAC key and metrics; ``init_server``,
which makes a fresh server's database, CA and first admin token; and the offline recovery of an admin
token (``create_token_offline``).

Secrets stay private whatever the umask: the data folder is 0700 (set explicitly, also on start), the
SQLite database that holds the token MAC key is created 0600 before SQLite opens it (SQLite gives its
``-wal`` and ``-shm`` files the database's mode), and the CA key is written 0600.
"""

from __future__ import annotations

import getpass
import logging
import os
import stat
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from edgefleet.errors import ConfigError
from edgefleet.server.blobs import BlobStore
from edgefleet.server.ca import CA_KEY, FleetCA, create_ca, load_ca
from edgefleet.server.db import LoopConnection, make_engine, make_sessionmaker, migrate, schema_is_current
from edgefleet.server.metrics import Metrics
from edgefleet.server.models import ApiToken, AuditEntry, Device, ServerSecret, utcnow
from edgefleet.server.settings import Settings
from edgefleet.server.tokens import new_mac_key, new_token

__all__ = [
    "ROLES",
    "ServerState",
    "add_api_token",
    "audit",
    "create_token_offline",
    "init_server",
    "is_initialised",
    "open_state",
    "private_dir",
    "private_sqlite_file",
]

ROLES = ("viewer", "operator", "admin")  # each includes the ones before it
_MAC_KEY = "device_token_mac_key"
_SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")
log = logging.getLogger(__name__)


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


def add_api_token(
    s: Session, name: str, role: str, created_by: str, expires_at: datetime | None = None
) -> tuple[str, ApiToken]:
    """Add an operator API token and its audit entry to the caller's transaction: (secret token, row).
    Only the secret's sha256 is stored."""
    token, token_id, digest = new_token("efo")
    row = ApiToken(
        id=token_id, name=name, role=role, secret_sha256=digest, created_at=utcnow(), created_by=created_by,
        expires_at=expires_at, revoked_at=None,
    )
    s.add(row)
    audit(s, created_by, "token.create", f"token:{token_id}", None, {"name": name, "role": role})
    return token, row


def private_dir(path: Path) -> list[str]:
    """Create ``path`` (with parents) and make it 0700, whatever the umask: what was tightened (for the
    caller to log). Raises ConfigError when that is impossible (not a folder, not ours, read-only)."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode != 0o700:
            os.chmod(path, 0o700)
            return [f"{path}: was mode {mode:o}, now 0700"]
    except OSError as e:
        raise ConfigError(f"data_dir: cannot make {path} a private folder: {e.strerror or e}") from e
    return []


def _sqlite_path(url: str) -> Path | None:
    try:
        parsed = make_url(url)
    except ArgumentError:
        return None  # make_engine names the problem
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    if parsed.database.startswith("file:") or parsed.query.get("mode") == "memory":
        return None
    return Path(parsed.database)


def private_sqlite_file(url: str) -> list[str]:
    """For a SQLite URL: create the database file 0600 before SQLite does (SQLite would follow the umask)
    and tighten an existing one and its -wal/-shm/-journal files to 0600: what was tightened (for the
    caller to log). Other URLs: nothing. Raises ConfigError when a file cannot be made private."""
    path = _sqlite_path(url)
    if path is None:
        return []
    changed: list[str] = []
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))  # before SQLite, which would follow the umask
        for f in [path, *(path.with_name(path.name + side) for side in _SQLITE_SIDE_FILES)]:
            if f.exists() and (mode := stat.S_IMODE(f.stat().st_mode)) & 0o077:
                os.chmod(f, 0o600)
                changed.append(f"{f}: was mode {mode:o}, now 0600")
    except OSError as e:
        raise ConfigError(f"db_url: cannot make the database {path} private: {e.strerror or e}") from e
    return changed


def is_initialised(settings: Settings) -> bool:
    """True when ``data_dir`` holds a fleet CA (``init`` made it)."""
    return (settings.data_dir / CA_KEY).exists()


def _mac_key(sessions: sessionmaker[Session]) -> str:
    with sessions.begin() as s:
        row = s.get(ServerSecret, _MAC_KEY)
        if row is None:
            row = ServerSecret(name=_MAC_KEY, value=new_mac_key())
            s.add(row)
        return row.value


def open_state(settings: Settings, *, run_migrations: bool | None = None) -> ServerState:
    """Load the CA, make the data folder and database private, connect, and migrate (when asked or
    configured). Raises ConfigError when the server was never initialised (nothing is created then), a
    secret cannot be made private, or the schema is behind and migrations are off."""
    ca = load_ca(settings.data_dir)
    for change in private_dir(settings.data_dir) + private_sqlite_file(settings.database_url()):
        log.warning("%s (it holds the fleet's secrets)", change)
    engine = make_engine(settings.database_url())
    if settings.migrate_on_start if run_migrations is None else run_migrations:
        migrate(engine)
    elif not schema_is_current(engine):
        raise ConfigError("db_url: the database schema is not current; run `edgefleet server migrate`")
    sessions = make_sessionmaker(engine)
    blobs = BlobStore(settings.data_dir)
    blobs.sweep()
    state = ServerState(
        settings, engine, sessions, ca, blobs, _mac_key(sessions), Metrics(lambda: (0, 0)), LoopConnection(engine)
    )
    state.metrics = Metrics(state.count_online)
    from edgefleet.server.api.registry import collect_orphans  # the registry imports this module

    collect_orphans(state)  # blobs a crash left without a committed row
    return state


def _already(settings: Settings) -> str:
    return (
        f"{settings.data_dir}: already initialised; to recover access make an admin token with "
        f"`edgefleet server token create --data {settings.data_dir}`"
    )


def init_server(settings: Settings, admin_name: str = "admin") -> str:
    """Create the data folder (0700), database (0600 for SQLite), fleet CA, online TUF keys (``DATA/tuf/``,
    0600) and MAC key, and return a first
    admin token (shown once; only its hash is stored). Raises ConfigError when the folder or the database
    is already initialised (nothing is changed then), or the database cannot be reached."""
    if is_initialised(settings):
        raise ConfigError(_already(settings))
    private_dir(settings.data_dir)
    private_sqlite_file(settings.database_url())
    engine = make_engine(settings.database_url())
    try:
        migrate(engine)
        sessions = make_sessionmaker(engine)
        with sessions() as s:
            if s.get(ServerSecret, _MAC_KEY) is not None:
                raise ConfigError(
                    "db_url: this database already belongs to an initialised server; give this folder a copy of "
                    "that server's ca/ folder, or make a token with `edgefleet server token create`"
                )
        create_ca(settings.data_dir)
        from edgefleet.server.tuf.keys import create_online_keys  # the tuf package imports this module

        create_online_keys(settings.data_dir)  # online TUF keys: image snapshot and timestamp, director targets
        _mac_key(sessions)
        with sessions.begin() as s:
            token, _ = add_api_token(s, admin_name, "admin", "server init")
    except SQLAlchemyError as e:
        raise ConfigError(f"db_url: {_db_reason(e)}") from e
    finally:
        engine.dispose()
    return token


def _db_reason(e: SQLAlchemyError) -> str:
    orig = getattr(e, "orig", None)
    text = str(orig if orig is not None else e).strip().splitlines()
    return text[0] if text else type(e).__name__


def create_token_offline(
    settings: Settings, name: str, role: str = "admin", expires_at: datetime | None = None
) -> tuple[str, str]:
    """Make an operator API token straight in the database (no server needed; for a lost admin token):
    (secret token, token id), audited as made offline by this OS user. Raises ConfigError when the server
    was never initialised, its schema is not current, or the database cannot be reached."""
    if role not in ROLES:
        raise ConfigError(f"role: {role!r} is not one of {', '.join(ROLES)}")
    url = settings.database_url()
    path = _sqlite_path(url)
    if path is not None and not path.exists():
        raise ConfigError(
            f"{settings.data_dir}: not initialised (no database at {path}); run "
            f"`edgefleet server init --data {settings.data_dir}`"
        )
    private_sqlite_file(url)
    engine = make_engine(url)
    try:
        if not schema_is_current(engine):
            raise ConfigError("db_url: the database schema is missing or not current; run `edgefleet server init` "
                              "on a new server or `edgefleet server migrate`")
        sessions = make_sessionmaker(engine)
        with sessions.begin() as s:
            if s.get(ServerSecret, _MAC_KEY) is None:
                raise ConfigError("db_url: this database was never initialised; run `edgefleet server init`")
            token, row = add_api_token(s, name, role, f"server token create (offline, by {_os_user()})", expires_at)
    except SQLAlchemyError as e:
        raise ConfigError(f"db_url: {_db_reason(e)}") from e
    finally:
        engine.dispose()
    return token, row.id


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"
