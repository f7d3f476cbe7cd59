"""The database: SQLAlchemy 2 engine and sessions, and Alembic migrations run from code.

SQLite (the default, under ``--data DIR``) runs in WAL mode with foreign keys on and a busy timeout,
so readers never wait for the writer; PostgreSQL is reached with ``postgresql+psycopg://...``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Connection, CursorResult, Engine, Executable, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from edgefleet.errors import ConfigError

__all__ = ["MIGRATIONS", "LoopConnection", "make_engine", "make_sessionmaker", "migrate", "schema_is_current"]

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_BUSY_TIMEOUT_MS = 10_000  # how long a SQLite writer waits for the lock before failing


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes; WAL fsyncs at checkpoints
    cur.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
    cur.close()


def make_engine(url: str) -> Engine:
    """An engine for ``url``. Raises :class:`ConfigError` for a URL SQLAlchemy cannot use."""
    try:
        parsed = make_url(url)
    except ArgumentError as e:
        raise ConfigError(f"db_url: not a database URL: {e}") from e
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(parsed, connect_args={"check_same_thread": False, "timeout": _BUSY_TIMEOUT_MS / 1000})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if backend == "postgresql":
        return create_engine(parsed, pool_size=10, max_overflow=20, pool_pre_ping=True)
    raise ConfigError(f"db_url: unsupported database {backend!r}; use sqlite:/// or postgresql+psycopg://")


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


class LoopConnection:
    """One AUTOCOMMIT connection for statements run inline on the event loop thread (which runs one
    handler at a time), so the hot path skips the pool. A failed connection is replaced; reads may
    ask for one retry on the fresh connection."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._conn: Connection | None = None

    def _get(self) -> Connection:
        if self._conn is None:
            self._conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        return self._conn

    def execute(self, stmt: Executable, params: dict[str, Any], retry: bool = False) -> CursorResult[Any]:
        try:
            return self._get().execute(stmt, params)
        except DBAPIError:
            self.close()
            if not retry:
                raise
            return self._get().execute(stmt, params)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.invalidate()
            finally:
                conn.close()


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
