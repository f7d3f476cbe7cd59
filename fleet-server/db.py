"""The database: SQLAlchemy 2 engine and sessions, and Alembic migrations run from code.

SQLite (the default, under ``--data DIR``) runs in WAL mode with foreign keys on and a busy timeout,
so readers never wait for the writer; PostgreSQL is reached with ``postgresql+psycopg://...``. Every
wait is bounded (lock, connect, pool checkout), so a stuck database surfaces as ``OperationalError`` or
the pool's ``TimeoutError``, which the API answers with 503 + ``Retry-After``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, Executable, Row, create_engine, event, inspect
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from edgefleet.errors import ConfigError

__all__ = [
    "MIGRATIONS", "AutocommitDB", "LoopConnection", "make_engine", "make_sessionmaker", "migrate", "schema_is_current"
]

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
BUSY_TIMEOUT = 10.0  # s: how long a SQLite writer waits for the lock before failing (URL ?timeout=S overrides)
PG_CONNECT_TIMEOUT = 5  # s: how long a PostgreSQL connect may take (URL ?connect_timeout=S overrides)
POOL_TIMEOUT = 10.0  # s: how long a request waits for a pooled connection before a 503


def _sqlite_pragmas(busy_ms: int) -> Any:
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes; WAL fsyncs at checkpoints
        cur.execute(f"PRAGMA busy_timeout={busy_ms}")
        cur.close()

    return on_connect


def _seconds(parsed: URL, key: str, default: float) -> float:
    raw = parsed.query.get(key)
    if raw is None:
        return default
    try:
        value = float(raw if isinstance(raw, str) else raw[-1])
    except ValueError:
        value = -1.0
    if not 0 <= value <= 3600:
        raise ConfigError(f"db_url: {key}={raw!r} is not a number of seconds (0 to 3600)")
    return value


def make_engine(url: str) -> Engine:
    """An engine for ``url``. SQLite takes ``?timeout=SECONDS`` (the busy timeout, default
    :data:`BUSY_TIMEOUT`); PostgreSQL takes libpq's parameters (``connect_timeout`` defaults to
    :data:`PG_CONNECT_TIMEOUT`; ``options=-c lock_timeout=...`` bounds lock waits). A pooled connection
    is waited for at most :data:`POOL_TIMEOUT`. Raises :class:`ConfigError` for a URL SQLAlchemy cannot
    use or a timeout that is not a number of seconds."""
    try:
        parsed = make_url(url)
    except ArgumentError as e:
        raise ConfigError(f"db_url: not a database URL: {e}") from e
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        busy = _seconds(parsed, "timeout", BUSY_TIMEOUT)
        parsed = parsed.difference_update_query(["timeout"])
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            parsed, connect_args={"check_same_thread": False, "timeout": busy}, pool_timeout=POOL_TIMEOUT
        )
        event.listen(engine, "connect", _sqlite_pragmas(int(busy * 1000)))
        return engine
    if backend == "postgresql":
        connect = int(_seconds(parsed, "connect_timeout", PG_CONNECT_TIMEOUT))
        parsed = parsed.difference_update_query(["connect_timeout"])
        return create_engine(
            parsed, pool_size=10, max_overflow=20, pool_pre_ping=True, pool_timeout=POOL_TIMEOUT,
            connect_args={"connect_timeout": max(1, connect)},
        )
    raise ConfigError(f"db_url: unsupported database {backend!r}; use sqlite:/// or postgresql+psycopg://")


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


class AutocommitDB:
    """Short AUTOCOMMIT statements for the check-in path, from any thread: :meth:`connect` checks a
    connection out of the engine's pool in autocommit mode (each statement its own transaction, so a
    read never holds a snapshot a later write must upgrade) and returns it afterwards. Errors are
    SQLAlchemy's (``OperationalError`` for a locked or unreachable database)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        with self._autocommit.connect() as conn:
            yield conn

    def execute(self, stmt: Executable, params: dict[str, Any]) -> list[Row[Any]]:
        """Run one statement on a pooled autocommit connection: its rows (none for a write)."""
        with self.connect() as conn:
            result = conn.execute(stmt, params)
            return list(result) if result.returns_rows else []

    def close(self) -> None:
        """Nothing to release (connections go back to the pool after each use); kept for callers."""


LoopConnection = AutocommitDB  # the old name (state.py); it no longer runs on the event loop


def _alembic_config(engine: Engine) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def migrate(engine: Engine, revision: str = "head") -> None:
    """Apply migrations up to ``revision``. Raises :class:`ConfigError` when the database is unreachable."""
    from alembic import command

    try:
        command.upgrade(_alembic_config(engine), revision)
    except SQLAlchemyError as e:
        raise ConfigError(f"db_url: cannot migrate the database: {str(e).splitlines()[0]}") from e


def schema_is_current(engine: Engine) -> bool:
    """True when the database is at the newest migration."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(_alembic_config(engine))
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return False
        return set(MigrationContext.configure(conn).get_current_heads()) == set(script.get_heads())
