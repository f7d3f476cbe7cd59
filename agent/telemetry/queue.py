"""Store and forward: every ``telemetry`` and ``events`` message is written to ``STATE/queue.db``
before it is published, and leaves it only when the broker has acknowledged it.

One SQLite file (stdlib ``sqlite3``), two tables::

    outbox(seq INTEGER PRIMARY KEY, topic TEXT, payload BLOB, created_at REAL)
    meta(key TEXT PRIMARY KEY, value)     -- format, device_id, epoch, next_seq, dropped

``epoch`` is 16 random hex characters made when the queue is created; ``seq`` starts at 1 and grows
by one per message, one sequence for telemetry and events, kept in ``meta.next_seq`` and written in
the same transaction as the message, so it is never reused, even after every row was acknowledged
and deleted (an ``AUTOINCREMENT`` rowid would be, after a ``DELETE`` of everything is followed by a
crash... and a rowid says nothing about the epoch). A lost or unreadable queue is a new epoch:
``(device_id, epoch, seq)`` stays unique, so the server never deduplicates a new message away.

Durability. ``journal_mode=WAL`` with ``synchronous=FULL`` for :meth:`Outbox.put`: when ``put``
returns, the message is on stable storage, also against a power cut (devices lose power without
warning). ``NORMAL`` would survive a SIGKILL but not a power cut: the last few commits could roll
back, and their ``seq`` (maybe already published) would be handed out again for *other* messages,
which the server would then drop as duplicates. ``FULL`` costs one fsync per put (0.3-0.6 ms here,
a few ms on an SD card), and the agent puts about one message a minute plus update events.
Acknowledgements (:meth:`Outbox.ack_many`) are written with ``synchronous=NORMAL``: one that a
power cut loses only means that message is sent again (QoS 1 allows duplicates; the server
deduplicates); the next ``put``'s fsync makes it durable anyway (the WAL is synced as a whole).

Bounds. The messages held (topic + payload bytes) stay within ``max_bytes`` and none is older than
``max_age_s`` (by ``created_at``, the clock at put): the oldest go first, and the number dropped is
kept in ``meta.dropped`` (reported as telemetry's ``device.dropped``), with the puts that could not
be stored at all (disk full, I/O error). The file itself stays near the high-water mark of what it
held (SQLite reuses freed pages); the WAL is checkpointed every 256 KiB and truncated to 256 KiB
(a puts-only WAL of SQLite's default 4 MiB could fill a small disk before its first checkpoint, and
a checkpoint cannot then grow the database file: stuck until some other space is freed).
The queue never fills the disk either: while the file system has less than ``min_free_bytes``
(default 1 MiB) free, each put drops the oldest messages to make room for itself (counted), so the
file stops growing and the updater keeps room for its downloads. A disk that something else filled
anyway: the WAL is checkpointed and truncated and the put tried once more; then
:class:`OutboxError` (counted too). A put that failed hands out no seq.

Recovery. On open, a file that is not a queue this agent reads (not SQLite, ``quick_check`` fails,
a meta row missing or wrong) is moved aside to ``queue.db.corrupt-<unix time>`` (its ``-wal`` too;
the newest two such files are kept) and a new queue starts with a new epoch, logged as a warning. A
queue made for another device id is moved aside the same way (``queue.db.device-<unix time>``):
its messages would be refused under this device's prefix.

Thread-safe: one connection, one lock; every method is a short transaction.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, NamedTuple

from edgefleet.durable import fsync_dir
from edgefleet.errors import EdgefleetError

__all__ = [
    "KINDS",
    "RESERVED",
    "TOPIC_ROOT",
    "Message",
    "Outbox",
    "OutboxError",
    "device_topic",
    "rfc3339",
]

log = logging.getLogger(__name__)

TOPIC_ROOT = "edgefleet/v1"
KINDS = ("telemetry", "events")  # the topics that go through the queue and carry epoch and seq
RESERVED = ("schema", "device_id", "epoch", "seq")  # set by the queue; a body may not hold them
FORMAT = 1  # meta.format: the layout of this file
FILE = "queue.db"
KEEP_ASIDE = 2  # moved-aside queue files kept (newest first)
WAL_LIMIT = 256 << 10  # bytes the WAL is truncated to after a checkpoint
WAL_PAGES = 64  # pages (4 KiB) in the WAL that start a checkpoint (SQLite's default, 1000, is 4 MiB)

_EPOCH = re.compile(r"[0-9a-f]{16}")
_SCHEMA = (
    "CREATE TABLE outbox (seq INTEGER PRIMARY KEY, topic TEXT NOT NULL, payload BLOB NOT NULL, "
    "created_at REAL NOT NULL)",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID",
)


class OutboxError(EdgefleetError):
    """The queue cannot store a message (disk full, I/O error); the message is counted as dropped."""


class Message(NamedTuple):
    """One stored message, as :meth:`Outbox.peek` returns it."""

    seq: int
    topic: str
    payload: bytes
    created_at: float  # the clock at put (seconds since the epoch)


def device_topic(device_id: str, kind: str) -> str:
    """``edgefleet/v1/{device_id}/{kind}``. Raises ValueError for a device id that cannot be one topic
    level (empty, or holding ``/``, ``+``, ``#`` or NUL)."""
    if not device_id or any(c in device_id for c in "/+#\0"):
        raise ValueError(f"device_id: {device_id!r} cannot be a topic level (empty, or holds / + # or NUL)")
    return f"{TOPIC_ROOT}/{device_id}/{kind}"


def rfc3339(t: float) -> str:
    """RFC 3339 UTC with milliseconds: ``2026-11-03T12:00:00.123Z``."""
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json(obj: Mapping[str, Any]) -> bytes:
    """Compact JSON; NaN and infinities (which JSON cannot hold) become null."""
    from edgefleet.agent.sinks import to_json

    return to_json(dict(obj)).encode()


class _Corrupt(Exception):
    """The file on disk is not a queue this agent reads (the message says why)."""


class Outbox:
    """The on-disk queue of one device (see the module docstring).

    ``path`` is the database file (``STATE/queue.db``; its folder is created). ``max_bytes``,
    ``max_age_s`` and ``min_free_bytes`` are the bounds (module docstring). ``clock`` gives the
    wall-clock time of ``at`` and ``created_at`` (injected for tests). Raises :class:`OutboxError`
    when the file can be neither opened nor created (its folder is not writable, say).
    """

    def __init__(
        self,
        path: Path,
        device_id: str,
        *,
        max_bytes: int = 16 << 20,
        max_age_s: float = 7 * 86400.0,
        min_free_bytes: int = 1 << 20,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes: must be at least 1, got {max_bytes}")
        if max_age_s <= 0:
            raise ValueError(f"max_age_s: must be positive, got {max_age_s}")
        self.path = Path(path)
        self.device_id = device_id
        self.topics = {k: device_topic(device_id, k) for k in KINDS}
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.min_free_bytes = max(0, min_free_bytes)
        self._clock = clock
        self._lock = threading.Lock()
        self._watchers: list[Callable[[], None]] = []
        self._unstored = 0  # puts that failed since the last successful write (added to meta.dropped then)
        self._db: sqlite3.Connection | None = None
        self._warned_at: float | None = None  # monotonic time of the last warning about dropped messages
        self._dropped_quiet = 0  # dropped since that warning
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutboxError(f"{self.path.parent}: cannot create the queue's folder: {e.strerror or e}") from e
        self._open()

    # -- opening, recovery ---------------------------------------------------------------------

    def _open(self) -> None:
        try:
            self._db, meta = self._connect()
        except _Corrupt as e:
            self._move_aside("corrupt", str(e))
            self._db, meta = self._connect()
        if meta["device_id"] != self.device_id:
            old = meta["device_id"]
            assert self._db is not None
            self._db.close()
            self._move_aside("device", f"it was made for device {old!r}, this is {self.device_id!r}")
            self._db, meta = self._connect()
        self.epoch: str = meta["epoch"]
        self._next_seq: int = meta["next_seq"]
        self._dropped: int = meta["dropped"]
        db = self._db
        assert db is not None
        count, size = db.execute("SELECT COUNT(*), TOTAL(length(topic) + length(payload)) FROM outbox").fetchone()
        self._depth, self._bytes = int(count), int(size)
        log.info("queue %s: epoch %s, next seq %d, %d message(s) waiting (%d bytes), %d dropped so far",
                 self.path, self.epoch, self._next_seq, self._depth, self._bytes, self._dropped)

    def _connect(self) -> tuple[sqlite3.Connection, dict[str, Any]]:
        """Open (or create) the file and read its meta. Raises _Corrupt for a file that is not ours,
        OutboxError when it cannot be opened or created at all."""
        created = not self.path.exists()
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10.0)
        except sqlite3.Error as e:
            raise OutboxError(f"{self.path}: cannot open the queue: {e}") from e
        try:
            if created:
                with contextlib.suppress(OSError):
                    os.chmod(self.path, 0o600)  # the -wal and -shm files get the same mode
            try:
                if db.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
                    raise _Corrupt("cannot switch to WAL mode")
                check = db.execute("PRAGMA quick_check").fetchone()[0]
                if check != "ok":
                    raise _Corrupt(f"quick_check: {check}")
                db.execute("PRAGMA synchronous=FULL")
                db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
                db.execute(f"PRAGMA wal_autocheckpoint={WAL_PAGES}")
                meta = self._read_meta(db)
            except sqlite3.DatabaseError as e:
                if isinstance(e, sqlite3.OperationalError) and _transient(e):
                    raise OutboxError(f"{self.path}: cannot open the queue: {e}") from e
                raise _Corrupt(str(e)) from e
        except BaseException:
            db.close()
            raise
        if created:
            fsync_dir(self.path.parent)
        return db, meta

    def _read_meta(self, db: sqlite3.Connection) -> dict[str, Any]:
        """The meta rows; a file with no tables at all (new, or cut before its first commit) is made a
        queue with a new epoch."""
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            epoch = secrets.token_hex(8)
            db.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA:
                    db.execute(statement)
                db.executemany(
                    "INSERT INTO meta(key, value) VALUES (?, ?)",
                    [("format", FORMAT), ("device_id", self.device_id), ("epoch", epoch), ("next_seq", 1),
                     ("dropped", 0), ("created_at", self._clock())],
                )
                db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise
            log.info("queue %s: new queue, epoch %s", self.path, epoch)
        elif tables != {"outbox", "meta"}:
            raise _Corrupt(f"unexpected tables {sorted(tables)}")
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("format") != FORMAT:
            raise _Corrupt(f"meta.format is {meta.get('format')!r}, this agent reads {FORMAT}")
        if not isinstance(meta.get("epoch"), str) or not _EPOCH.fullmatch(meta["epoch"]):
            raise _Corrupt(f"meta.epoch is {meta.get('epoch')!r}, not 16 hex characters")
        if not isinstance(meta.get("device_id"), str):
            raise _Corrupt("meta.device_id is missing")
        for key in ("next_seq", "dropped"):
            if not isinstance(meta.get(key), int) or meta[key] < (1 if key == "next_seq" else 0):
                raise _Corrupt(f"meta.{key} is {meta.get(key)!r}")
        top = db.execute("SELECT MAX(seq) FROM outbox").fetchone()[0]
        if top is not None and top >= meta["next_seq"]:
            raise _Corrupt(f"meta.next_seq {meta['next_seq']} is not past the stored seq {top}")
        return meta

    def _move_aside(self, why: str, reason: str) -> None:
        """Rename the queue file (and its WAL) out of the way; keep the newest KEEP_ASIDE of them."""
        stamp = int(self._clock())
        aside = self.path.with_name(f"{self.path.name}.{why}-{stamp}")
        n = 1
        while aside.exists():
            aside = self.path.with_name(f"{self.path.name}.{why}-{stamp}.{n}")
            n += 1
        try:
            os.replace(self.path, aside)
            wal = self.path.with_name(self.path.name + "-wal")
            if wal.exists():
                os.replace(wal, aside.with_name(aside.name + "-wal"))
            self.path.with_name(self.path.name + "-shm").unlink(missing_ok=True)
            olds = sorted(
                (p for p in self.path.parent.glob(f"{self.path.name}.*-*") if not p.name.endswith("-wal")),
                key=lambda p: p.stat().st_mtime_ns,
                reverse=True,
            )
            for old in olds[KEEP_ASIDE:]:
                old.unlink(missing_ok=True)
                old.with_name(old.name + "-wal").unlink(missing_ok=True)
            fsync_dir(self.path.parent)
        except OSError as e:
            raise OutboxError(f"{self.path}: cannot move the unreadable queue aside: {e.strerror or e}") from e
        log.warning("queue %s: %s; moved to %s, starting a new queue (new epoch: nothing it held is sent)",
                    self.path, reason, aside.name)

    # -- the queue -----------------------------------------------------------------------------

    def put(self, kind: Literal["telemetry", "events"], body: Mapping[str, Any]) -> tuple[int, bytes]:
        """Store one message; returns its ``(seq, payload)``, on stable storage when this returns.

        The payload is ``{"schema": 1, "device_id", "at", "epoch", "seq", **body}`` as compact JSON;
        ``at`` is the clock now unless ``body`` gives its own (an event's time). Then the bounds apply
        (the oldest dropped first, counted). Raises ValueError naming ``kind`` or the ``body`` field
        at fault (a reserved key, an ``at`` that is not a string, a message larger than
        ``max_bytes``), :class:`OutboxError` when the disk cannot take it (counted as dropped)."""
        if kind not in KINDS:
            raise ValueError(f"kind: {kind!r} is not one of {list(KINDS)}")
        for key in RESERVED:
            if key in body:
                raise ValueError(f"body.{key}: set by the queue, not by the caller")
        if "at" in body and not isinstance(body["at"], str):
            raise ValueError(f"body.at: expected an RFC 3339 string, got {type(body['at']).__name__}")
        topic = self.topics[kind]
        with self._lock:
            db = self._conn()
            now = self._clock()
            seq = self._next_seq
            head = {"schema": 1, "device_id": self.device_id, "at": rfc3339(now), "epoch": self.epoch, "seq": seq}
            payload = _json({**head, **body})
            size = len(topic.encode()) + len(payload)
            if size > self.max_bytes:
                raise ValueError(f"body: the message is {size} bytes, over the queue's max_bytes of {self.max_bytes}")
            try:
                budget = self._budget()
                try:
                    dropped, freed = self._insert(db, seq, topic, payload, now, size, budget)
                except sqlite3.OperationalError as e:
                    if "full" not in str(e).lower():
                        raise
                    # Disk full (filled by someone else, past min_free_bytes): move the WAL into the
                    # file and truncate it, then try once more.
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                    self._resync(db)
                    dropped, freed = self._insert(db, seq, topic, payload, now, size, self._budget())
            except sqlite3.Error as e:
                self._unstored += 1
                self._resync(db)
                raise OutboxError(f"{self.path}: cannot store {kind} message seq {seq}: {e}") from e
            self._next_seq = seq + 1
            self._dropped += dropped + self._unstored
            self._unstored = 0
            self._depth += 1 - dropped
            self._bytes += size - freed
            watchers = list(self._watchers)
        if dropped:
            self._warn_dropped(dropped)
        for w in watchers:
            w()
        return seq, payload

    def _insert(self, db: sqlite3.Connection, seq: int, topic: str, payload: bytes, now: float, size: int,
                budget: int) -> tuple[int, int]:
        """One put's transaction: the row, the bounds (``budget``: the bytes it may hold), next_seq and
        dropped. Returns (count, bytes) dropped."""
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("INSERT INTO outbox(seq, topic, payload, created_at) VALUES (?, ?, ?, ?)",
                       (seq, topic, payload, now))
            dropped, freed = self._bound(db, now, extra=size, below=seq, budget=budget)
            db.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (seq + 1,))
            if dropped or self._unstored:
                db.execute("UPDATE meta SET value = ? WHERE key = 'dropped'",
                           (self._dropped + dropped + self._unstored,))
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        return dropped, freed

    def _budget(self) -> int:
        """The bytes of messages the queue may hold now: ``max_bytes``, and never so much that the file
        system would have less than ``min_free_bytes`` free (once there, a put drops at least as
        much as it adds: freed pages are reused inside the file, which stops growing)."""
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return self.max_bytes
        free = st.f_bavail * st.f_frsize
        return min(self.max_bytes, self._bytes + max(0, free - self.min_free_bytes))

    def _bound(self, db: sqlite3.Connection, now: float, extra: int = 0, below: int | None = None,
               budget: int | None = None) -> tuple[int, int]:
        """Delete the oldest messages that are too old or past ``budget`` bytes (default ``max_bytes``;
        inside the caller's transaction; ``extra``: bytes just inserted as seq ``below``, not yet in
        ``self._bytes``, which is never dropped). Returns (count, bytes) deleted."""
        cutoff = now - self.max_age_s
        excess = self._bytes + extra - (self.max_bytes if budget is None else budget)
        limit = below if below is not None else self._next_seq
        if excess <= 0:  # the usual case: one indexed row read
            oldest = db.execute("SELECT created_at FROM outbox WHERE seq < ? ORDER BY seq LIMIT 1", (limit,)).fetchone()
            if oldest is None or oldest[0] >= cutoff:
                return 0, 0
        last = count = freed = 0  # every seq <= last goes
        done = False
        while not done:
            rows = db.execute(
                "SELECT seq, created_at, length(topic) + length(payload) FROM outbox "
                "WHERE seq > ? AND seq < ? ORDER BY seq LIMIT 256",
                (last, limit),
            ).fetchall()
            done = len(rows) < 256
            for seq, created, size in rows:
                if created >= cutoff and freed >= excess:
                    done = True
                    break
                last, count, freed = int(seq), count + 1, freed + int(size)
        if count:
            db.execute("DELETE FROM outbox WHERE seq <= ?", (last,))
        return count, freed

    def _warn_dropped(self, n: int) -> None:
        """Say that the bounds dropped messages: at once, then at most once an hour (a queue that is
        full while the broker is away for days drops one message per put)."""
        self._dropped_quiet += n
        now = time.monotonic()
        if self._warned_at is not None and now - self._warned_at < 3600:
            return
        log.warning("queue %s: dropped the %d oldest message(s) (over %d bytes, %g s old, or less than %d bytes "
                    "free on disk); %d dropped in all", self.path, self._dropped_quiet, self.max_bytes,
                    self.max_age_s, self.min_free_bytes, self.dropped())
        self._warned_at, self._dropped_quiet = now, 0

    def _resync(self, db: sqlite3.Connection) -> None:
        """After a failed write: take the counters from what the file holds (a failed commit may
        still have reached the disk; a seq must never be handed out twice)."""
        try:
            (top,) = db.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
            count, size = db.execute("SELECT COUNT(*), TOTAL(length(topic) + length(payload)) FROM outbox").fetchone()
        except sqlite3.Error:
            return
        self._next_seq = max(self._next_seq, int(top))
        self._depth, self._bytes = int(count), int(size)

    def prune(self) -> int:
        """Apply the age bound now (``put`` does it too); returns how many messages were dropped."""
        with self._lock:
            db = self._conn()
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    dropped, freed = self._bound(db, self._clock())
                    if dropped:
                        db.execute("UPDATE meta SET value = ? WHERE key = 'dropped'", (self._dropped + dropped,))
                    db.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as e:
                raise OutboxError(f"{self.path}: cannot drop old messages: {e}") from e
            self._dropped += dropped
            self._depth -= dropped
            self._bytes -= freed
        if dropped:
            self._warn_dropped(dropped)
        return dropped

    def peek(self, n: int, after: int = 0) -> list[Message]:
        """Up to ``n`` stored messages with ``seq > after``, in ``seq`` order (nothing is removed)."""
        if n <= 0:
            return []
        with self._lock:
            rows = self._conn().execute(
                "SELECT seq, topic, payload, created_at FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?", (after, n)
            ).fetchall()
        return [Message(int(s), str(t), bytes(p), float(c)) for s, t, p, c in rows]

    def ack(self, seq: int) -> None:
        """The broker has message ``seq``: delete it (nothing happens if it is gone already)."""
        self.ack_many((seq,))

    def ack_many(self, seqs: Iterable[int], *, lost: bool = False) -> None:
        """Delete every message in ``seqs`` in one transaction (see the module docstring on why an
        acknowledgement needs no fsync of its own); ``lost``: they were not delivered (the broker
        refused them for good), so they are counted as dropped. Raises :class:`OutboxError` when the
        disk fails; the messages are then sent again later, which QoS 1 allows."""
        batch = sorted({int(s) for s in seqs})
        if not batch:
            return
        with self._lock:
            db = self._conn()
            try:
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute("BEGIN IMMEDIATE")
                try:
                    gone = freed = 0
                    for i in range(0, len(batch), 500):  # two statements per 500, not one per message
                        chunk = batch[i:i + 500]
                        marks = ",".join("?" * len(chunk))
                        n, size = db.execute(
                            "SELECT COUNT(*), TOTAL(length(topic) + length(payload)) FROM outbox "
                            f"WHERE seq IN ({marks})",
                            chunk,
                        ).fetchone()
                        db.execute(f"DELETE FROM outbox WHERE seq IN ({marks})", chunk)
                        gone, freed = gone + int(n), freed + int(size)
                    if lost and gone:
                        db.execute("UPDATE meta SET value = ? WHERE key = 'dropped'", (self._dropped + gone,))
                    db.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                    raise
                finally:
                    db.execute("PRAGMA synchronous=FULL")
            except sqlite3.Error as e:
                raise OutboxError(f"{self.path}: cannot delete acknowledged messages: {e}") from e
            self._depth -= gone
            self._bytes -= freed
            if lost:
                self._dropped += gone

    def depth(self) -> int:
        """Messages waiting (stored and not yet acknowledged)."""
        with self._lock:
            return self._depth

    def stored_bytes(self) -> int:
        """Topic + payload bytes of the messages waiting (what ``max_bytes`` bounds)."""
        with self._lock:
            return self._bytes

    def dropped(self) -> int:
        """Messages lost since this queue (epoch) began: dropped by the bounds, or not storable."""
        with self._lock:
            return self._dropped + self._unstored

    def last_seq(self) -> int:
        """The highest ``seq`` handed out so far (0: none yet)."""
        with self._lock:
            return self._next_seq - 1

    def watch(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (on the putting thread, after the lock is released) after every put."""
        with self._lock:
            self._watchers.append(callback)

    def unwatch(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if callback in self._watchers:
                self._watchers.remove(callback)

    def close(self) -> None:
        """Close the file (idempotent); later calls raise :class:`OutboxError`."""
        with self._lock:
            db, self._db = self._db, None
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            db.close()

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise OutboxError(f"{self.path}: the queue is closed")
        return self._db

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _transient(e: sqlite3.OperationalError) -> bool:
    """Errors that say nothing about the file's contents (do not move a good queue aside for them)."""
    msg = str(e).lower()
    return any(s in msg for s in ("locked", "busy", "unable to open", "disk i/o", "readonly", "read-only", "full"))

