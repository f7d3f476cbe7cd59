"""The on-disk store-and-forward queue (``STATE/queue.db``) on real files: payloads, seq order shared
by telemetry and events, the bounds by bytes and age with the dropped count, seq never reused across
reopens and SIGKILLs of a writer process, and an unreadable file moved aside for a new epoch."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import sqlite3
import stat
import subprocess
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from edgefleet.agent.telemetry.queue import KINDS, Outbox, OutboxError, device_topic, rfc3339


class Clock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _body(m: bytes) -> dict[str, Any]:
    out = json.loads(m)
    assert isinstance(out, dict)
    return out


def test_put_builds_the_payload_with_schema_device_at_epoch_and_one_seq_for_both_topics(tmp_path: Path) -> None:
    clock = Clock(1_800_000_000.25)
    with Outbox(tmp_path / "queue.db", "dev-1", clock=clock) as ob:
        assert re.fullmatch(r"[0-9a-f]{16}", ob.epoch)
        s1, p1 = ob.put("telemetry", {"interval_s": 60.0, "models": []})
        s2, p2 = ob.put("events", {"kind": "switched", "model": "digits", "at": "2026-11-03T10:00:00Z"})
        s3, _ = ob.put("telemetry", {"x": float("nan")})
        assert (s1, s2, s3) == (1, 2, 3)
        b1, b2 = _body(p1), _body(p2)
        assert list(b1)[:5] == ["schema", "device_id", "at", "epoch", "seq"]
        assert b1 == {"schema": 1, "device_id": "dev-1", "at": "2027-01-15T08:00:00.250Z", "epoch": ob.epoch,
                      "seq": 1, "interval_s": 60.0, "models": []}
        assert datetime.fromisoformat(b1["at"].replace("Z", "+00:00")).timestamp() == 1_800_000_000.25
        assert b2["at"] == "2026-11-03T10:00:00Z" and b2["seq"] == 2  # an event keeps its own time
        peeked = ob.peek(10)
        assert [m.seq for m in peeked] == [1, 2, 3]
        assert [m.topic for m in peeked] == [device_topic("dev-1", k) for k in ("telemetry", "events", "telemetry")]
        assert peeked[0].payload == p1 and peeked[0].created_at == clock.t
        assert _body(peeked[2].payload)["x"] is None  # NaN is not JSON: null
        assert ob.depth() == 3 and ob.last_seq() == 3 and ob.dropped() == 0


def test_bad_puts_are_refused_naming_the_field_and_consume_no_seq(tmp_path: Path) -> None:
    with Outbox(tmp_path / "queue.db", "dev-1", max_bytes=4096) as ob:
        for key in ("schema", "device_id", "epoch", "seq"):
            with pytest.raises(ValueError, match=rf"body\.{key}: set by the queue"):
                ob.put("telemetry", {key: 1})
        with pytest.raises(ValueError, match="kind: 'status' is not one of"):
            ob.put("status", {})  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"body\.at: expected an RFC 3339 string"):
            ob.put("events", {"at": 12})
        with pytest.raises(ValueError, match="over the queue's max_bytes of 4096"):
            ob.put("telemetry", {"blob": "x" * 5000})
        assert ob.put("events", {"kind": "ok"})[0] == 1
    with pytest.raises(ValueError, match="device_id: 'a/b' cannot be a topic level"):
        Outbox(tmp_path / "q2.db", "a/b")


def test_peek_after_and_ack_keep_seq_order(tmp_path: Path) -> None:
    with Outbox(tmp_path / "queue.db", "dev-1") as ob:
        for i in range(50):
            ob.put(KINDS[i % 2], {"i": i})
        assert [m.seq for m in ob.peek(5, after=10)] == [11, 12, 13, 14, 15]
        ob.ack_many([3, 1, 2, 40, 999])  # unknown seqs are nothing
        ob.ack(5)
        assert ob.depth() == 45
        assert [m.seq for m in ob.peek(4)] == [4, 6, 7, 8]
        assert ob.peek(0) == []
        ob.ack_many(m.seq for m in ob.peek(100))
        assert ob.depth() == 0 and ob.stored_bytes() == 0 and ob.peek(10) == []
        assert ob.put("events", {})[0] == 51  # emptied: the sequence goes on


def test_bytes_bound_drops_the_oldest_first_and_counts_them_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    with Outbox(path, "dev-1", max_bytes=10_000) as ob:
        sizes = []
        for i in range(100):
            seq, payload = ob.put("telemetry", {"pad": "p" * 150, "i": i})
            sizes.append(len(payload) + len(device_topic("dev-1", "telemetry")))
        kept = [m.seq for m in ob.peek(1000)]
        assert kept == list(range(kept[0], 101))  # the newest, contiguous: the oldest went first
        assert ob.stored_bytes() == sum(sizes[kept[0] - 1:]) <= 10_000
        assert ob.stored_bytes() + sizes[kept[0] - 2] > 10_000  # no more was dropped than needed
        assert ob.dropped() == kept[0] - 1 == 100 - ob.depth()
        dropped = ob.dropped()
    with Outbox(path, "dev-1", max_bytes=10_000) as ob:
        assert ob.dropped() == dropped and ob.depth() == 100 - dropped
        ob.ack_many(range(1, 200))
        assert ob.dropped() == dropped  # acknowledged is not dropped
        ob.ack_many([], lost=True)
        seq, _ = ob.put("events", {})
        ob.ack_many([seq], lost=True)  # refused by the broker for good: counted
        assert ob.dropped() == dropped + 1


def test_age_bound_drops_messages_older_than_max_age(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    with Outbox(tmp_path / "queue.db", "dev-1", max_age_s=3600, clock=clock) as ob:
        for _ in range(5):
            ob.put("telemetry", {})
            clock.t += 600  # 0, 600, ..., 2400 s
        clock.t = 1_800_000_000.0 + 3600 + 700  # the first two are over an hour old
        with caplog.at_level(logging.WARNING):
            assert ob.prune() == 2
        assert [m.seq for m in ob.peek(10)] == [3, 4, 5] and ob.dropped() == 2
        assert "dropped the 2 oldest message(s)" in caplog.text
        clock.t += 10_000
        ob.put("events", {})  # a put applies the age bound too
        assert [m.seq for m in ob.peek(10)] == [6] and ob.dropped() == 5


def test_seq_is_never_reused_across_reopens_even_when_everything_was_acknowledged(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    with Outbox(path, "dev-1") as ob:
        epoch = ob.epoch
        for _ in range(3):
            ob.put("telemetry", {})
        ob.ack_many([1, 2, 3])
    with Outbox(path, "dev-1") as ob:
        assert ob.epoch == epoch and ob.depth() == 0 and ob.last_seq() == 3
        assert ob.put("events", {})[0] == 4
    with Outbox(path, "dev-1") as ob:
        assert ob.put("telemetry", {})[0] == 5 and [m.seq for m in ob.peek(9)] == [4, 5]


def test_threads_putting_at_once_get_distinct_contiguous_seqs(tmp_path: Path) -> None:
    with Outbox(tmp_path / "queue.db", "dev-1") as ob:
        got: list[int] = []
        lock = threading.Lock()

        def work(k: int) -> None:
            for i in range(50):
                seq, payload = ob.put(KINDS[k % 2], {"t": k, "i": i})
                assert _body(payload)["seq"] == seq
                with lock:
                    got.append(seq)
                if i % 10 == 0:
                    ob.ack_many(m.seq for m in ob.peek(3))

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(got) == list(range(1, 201))
        rows = ob.peek(1000)
        assert all(_body(m.payload)["seq"] == m.seq for m in rows)
        assert ob.depth() == len(rows)


def test_queue_file_is_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o000)
    try:
        with Outbox(tmp_path / "state" / "queue.db", "dev-1") as ob:
            ob.put("telemetry", {})
            for name in ("queue.db", "queue.db-wal"):
                assert stat.S_IMODE((tmp_path / "state" / name).stat().st_mode) == 0o600, name
    finally:
        os.umask(old)


@pytest.mark.parametrize(
    "damage",
    ["garbage", "truncated", "wrong_meta", "foreign_tables"],
)
def test_an_unreadable_queue_is_moved_aside_and_a_new_epoch_starts(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "queue.db"
    with Outbox(path, "dev-1") as ob:
        old_epoch = ob.epoch
        for i in range(300):
            ob.put("telemetry", {"pad": "x" * 200, "i": i})
    if damage == "garbage":
        path.write_bytes(os.urandom(8192))
    elif damage == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif damage == "wrong_meta":
        db = sqlite3.connect(path)
        db.execute("UPDATE meta SET value = 'not-an-epoch' WHERE key = 'epoch'")
        db.commit()
        db.close()
    else:
        db = sqlite3.connect(path)
        db.execute("CREATE TABLE other (x)")
        db.commit()
        db.close()
    with caplog.at_level(logging.WARNING), Outbox(path, "dev-1") as ob:
        assert ob.epoch != old_epoch
        assert ob.depth() == 0 and ob.last_seq() == 0 and ob.dropped() == 0
        assert ob.put("events", {})[0] == 1
    asides = [p.name for p in tmp_path.iterdir() if p.name.startswith("queue.db.corrupt-")]
    assert len(asides) == 1, sorted(p.name for p in tmp_path.iterdir())
    assert f"moved to {asides[0]}" in caplog.text and "new epoch" in caplog.text


def test_only_the_newest_moved_aside_queues_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    clock = Clock()
    for _ in range(4):
        path.write_bytes(b"not sqlite" * 100)
        clock.t += 1
        Outbox(path, "dev-1", clock=clock).close()
    asides = sorted(p.name for p in tmp_path.iterdir() if ".corrupt-" in p.name and not p.name.endswith("-wal"))
    assert len(asides) == 2


def test_a_queue_of_another_device_is_moved_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "queue.db"
    with Outbox(path, "dev-1") as ob:
        ob.put("telemetry", {})
        old = ob.epoch
    with caplog.at_level(logging.WARNING), Outbox(path, "dev-2") as ob:
        assert ob.epoch != old and ob.depth() == 0
        assert _body(ob.put("telemetry", {})[1])["device_id"] == "dev-2"
    assert "made for device 'dev-1'" in caplog.text
    assert any(p.name.startswith("queue.db.device-") for p in tmp_path.iterdir())


def test_a_closed_queue_raises_outbox_error(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "queue.db", "dev-1")
    ob.close()
    ob.close()
    with pytest.raises(OutboxError, match="the queue is closed"):
        ob.put("telemetry", {})


def test_an_unwritable_folder_is_one_outbox_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OutboxError, match="cannot create the queue's folder"):
        Outbox(blocker / "state" / "queue.db", "dev-1")


def test_sigkill_of_a_writer_loses_no_stored_message_and_never_reuses_a_seq(
    tmp_path: Path, driver: Any
) -> None:
    """A writer process puts as fast as it can and is SIGKILLed at random moments, 8 times: every
    seq whose put had returned is on disk with its own payload, the next run goes on after the
    highest seq ever handed out, the epoch never changes, and the file passes integrity_check."""
    state = tmp_path / "state"
    rng = random.Random(11)
    returned: set[int] = set()
    epochs = set()
    total = 100_000
    for _ in range(8):
        d = driver("--state", str(state), "--total", str(total), "--no-publish", "--every", "1")
        target = max(returned, default=0) + rng.randint(20, 400)
        assert d.wait_line(lambda d, t=target: d.last_put >= t, 60), d.stderr()
        d.kill()
        epochs.add(d.line("epoch").split()[1])
        returned |= {int(line.split()[1]) for line in d.seen if line.startswith("put ")}
    assert len(epochs) == 1
    db = sqlite3.connect(state / "queue.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    with Outbox(state / "queue.db", "dev-1") as ob:
        assert ob.epoch in epochs
        rows = ob.peek(total)
        stored = [m.seq for m in rows]
        assert stored == list(range(1, len(stored) + 1))  # nothing acknowledged: all there, no gap
        assert returned <= set(stored)
        assert all(_body(m.payload)["seq"] == m.seq and _body(m.payload)["epoch"] == ob.epoch for m in rows)
        assert ob.put("events", {})[0] == len(stored) + 1


def test_rfc3339_is_utc_with_milliseconds() -> None:
    assert rfc3339(0) == "1970-01-01T00:00:00.000Z"
    assert rfc3339(1_800_000_000.1234) == "2027-01-15T08:00:00.123Z"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs (needs root; skipped when it cannot be mounted, failed under CI=true)."""
    folder = tmp_path / "small"
    folder.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m,mode=0700", "tmpfs", str(folder)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        reason = f"cannot mount a 3 MiB tmpfs: {(r.stderr or r.stdout).strip() or r.returncode}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False, capture_output=True)
        if os.path.ismount(folder):
            subprocess.run(["umount", "-l", str(folder)], check=False)


def test_the_queue_keeps_free_disk_dropping_the_oldest_and_a_failed_put_is_counted_without_losing_a_seq(
    small_disk: Path,
) -> None:
    """The queue's max_bytes (16 MiB) is far above what the 3 MiB disk holds: the queue keeps
    min_free_bytes (1 MiB) free, the oldest going first (counted), and no put fails, even once
    another file took the last byte (the file no longer grows: freed pages are reused). A put that
    cannot be written (a queue whose WAL must grow on the full disk) is one OutboxError, counted,
    with no seq handed out; once there is room again, the sequence goes on."""
    path = small_disk / "queue.db"
    ob = Outbox(path, "dev-1")
    second = Outbox(small_disk / "second" / "queue.db", "dev-1")  # a small one, made before the disk fills
    second.put("events", {"kind": "first"})
    for i in range(3000):
        ob.put(KINDS[i % 2], {"pad": "d" * 1000, "i": i})
    st = os.statvfs(small_disk)
    assert st.f_bavail * st.f_frsize >= (1 << 20) - 64 * 1024  # about min_free_bytes left (one WAL's slack)
    rows = ob.peek(100_000)
    assert 0 < len(rows) < 3000 and rows[-1].seq == 3000
    assert [m.seq for m in rows] == list(range(rows[0].seq, 3001))  # the newest, contiguous
    assert ob.dropped() == 3000 - len(rows) == rows[0].seq - 1
    _fill(small_disk / "filler")  # someone else takes the last byte
    assert os.statvfs(small_disk).f_bavail == 0
    for i in range(100):  # still stored: each put makes room inside the file
        ob.put("telemetry", {"pad": "d" * 1000, "i": i})
    assert ob.last_seq() == 3100 and ob.peek(1, after=3099)[0].seq == 3100
    _fill(small_disk / "filler")  # (a checkpoint may have truncated the WAL meanwhile)
    with pytest.raises(OutboxError, match="cannot open the queue"):
        Outbox(small_disk / "other" / "queue.db", "dev-1")  # a new file on the full disk
    before = second.dropped()
    with pytest.raises(OutboxError, match=r"cannot store events message seq 2: database or disk is full"):
        second.put("events", {"pad": "x" * 200_000})  # its WAL would have to grow
    assert second.dropped() == before + 1 and second.last_seq() == 1 and second.depth() == 1
    (small_disk / "filler").unlink()
    seq, _ = second.put("events", {"kind": "after"})
    assert seq == 2  # the failed put handed out no seq: no gap, none twice
    second.close()
    with Outbox(small_disk / "second" / "queue.db", "dev-1") as again:
        assert again.dropped() == before + 1 and again.last_seq() == 2  # the failure was written down
        assert [m.seq for m in again.peek(10)] == [1, 2]
    ob.close()


def _fill(path: Path) -> None:
    """Append to ``path`` until the file system has not one byte left."""
    with open(path, "ab", buffering=0) as f:
        for chunk in (65536, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * chunk)
