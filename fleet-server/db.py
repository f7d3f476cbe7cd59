"""The database: SQLAlchemy 2 engine and sessions, and Alembic migrations run from code.

SQLite (the default, under ``--data DIR``) runs in WAL mode with foreign keys on and a busy timeout,
so readers never wait for the writer; PostgreSQL is reached with ``postgresql+psycopg://...``. Every
wait is bounded (lock, connect, pool checkout), so a stuck database surfaces as ``OperationalError`` or
the pool's ``TimeoutError``, which the API answers with 503 + ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, inspect
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from edgefleet.errors import ConfigError

__all__ = [
    "MIGRATIONS", "AutocommitDB", "LoopConnection", "make_engine", "make_sessionmaker", "migrate", "schema_is_current"
]

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
BUSY_TIMEOUT = 10.0  # s: how long a SQLite writer waits for the lock before failing (URL ?timeout=S overrides)
PG_CONNECT_TIMEOUT = 5  # s: how long a PostgreSQL connect may take (URL ?connect_timeout=S overrides)
POOL_TIMEOUT = 10.0  # s: how long a request waits for a pooled connection before a 503
T = TypeVar("T")


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
    """A few worker threads, each with its own AUTOCOMMIT connection kept open, for the short statements
    of the check-in path: ``await db.run(fn, *args)`` calls ``fn(connection, *args)`` on one of them,
    so a database that blocks (a held SQLite lock, an unreachable PostgreSQL) blocks a worker, never
    the event loop. Each statement is its own transaction (a read never holds a snapshot that a later
    write must upgrade). Keeping the connections open skips a pool checkout and an isolation-level
    change per call; ``workers`` of them are held out of the engine's pool.

    Raises what SQLAlchemy raises (``OperationalError`` for a locked or unreachable database, after
    which the worker reconnects), and the pool's ``TimeoutError`` for a call that waited in the queue
    longer than ``queue_timeout`` seconds (every worker stuck), without running it.
    """

    def __init__(self, engine: Engine, workers: int = 4, queue_timeout: float = POOL_TIMEOUT) -> None:
        self.engine = engine
        self.queue_timeout = queue_timeout
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="edgefleet-db")
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: set[Connection] = set()
        self._pending: list[_Job] = []
        self._flush_scheduled = False

    def _conn(self) -> Connection:
        conn: Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            self._local.conn = conn
            with self._lock:
                self._open.add(conn)
        return conn

    def _drop(self) -> None:
        conn: Connection | None = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            with self._lock:
                self._open.discard(conn)
            try:
                conn.invalidate()
                conn.close()
            except SQLAlchemyError:
                pass

    def _call(self, queued: float, retry: bool, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        if time.monotonic() - queued > self.queue_timeout:
            raise PoolTimeout(f"no database worker free within {self.queue_timeout:g} s")
        try:
            return fn(self._conn(), *args)
        except DBAPIError as e:
            if not (e.connection_invalidated or isinstance(e, OperationalError | InterfaceError)):
                raise
            self._drop()  # reconnect (an unreachable server, a dropped connection)
            if not (retry and e.connection_invalidated):
                raise
        return fn(self._conn(), *args)  # once more, on a fresh connection, after a dropped one

    async def run(self, fn: Callable[..., T], *args: Any, idempotent: bool = False) -> T:
        """``fn(connection, *args)`` on a worker thread: its result, or its exception. An ``idempotent``
        call is retried once on a fresh connection when the kept one turns out to be dead.

        Calls made in the same turn of the event loop go to a worker together, as one batch (one
        thread hop and one wake-up of the loop for all of them, not one each)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:
            self._pending.append(_Job(loop, future, time.monotonic(), idempotent, fn, args))
            schedule = not self._flush_scheduled
            self._flush_scheduled = True
        if schedule:
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
            self._flush_scheduled = False
        if batch:
            self._executor.submit(self._run_batch, batch)

    def _run_batch(self, batch: list[_Job]) -> None:
        settled: dict[asyncio.AbstractEventLoop, list[tuple[_Job, bool, Any]]] = {}
        for job in batch:
            try:
                outcome: tuple[bool, Any] = (True, self._call(job.queued, job.idempotent, job.fn, job.args))
            except BaseException as e:  # handed to the awaiting request, raised there
                outcome = (False, e)
            settled.setdefault(job.loop, []).append((job, *outcome))
        for loop, results in settled.items():
            try:
                loop.call_soon_threadsafe(_settle, results)
            except RuntimeError:
                pass  # that loop is closed: nobody waits any more

    def close(self) -> None:
        """Stop the workers and close their connections."""
        self._executor.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            conns, self._open = list(self._open), set()
        for conn in conns:
            try:
                conn.close()
            except SQLAlchemyError:
                pass


@dataclass
class _Job:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    queued: float
    idempotent: bool
    fn: Callable[..., Any]
    args: tuple[Any, ...]


def _settle(results: list[tuple[_Job, bool, Any]]) -> None:
    for job, ok, value in results:
        if job.future.done():
            continue  # the request was cancelled (its client went away)
        if ok:
            job.future.set_result(value)
        else:
            job.future.set_exception(value)


LoopConnection = AutocommitDB  # the old name (state.py builds it); it no longer runs on the event loop


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
