"""One batch of validated telemetry and events messages into the database, in the caller's transaction.

:func:`store_batch` decides, per message, ``stored``, ``duplicate`` or a refusal reason
(``unknown_device``, ``revoked_device``), and for the stored ones writes:

- the message itself into ``telemetry_messages``, once per (device, epoch, seq): a seq at or below
  the stream's contiguous mark, or found stored, is a duplicate, so a message the broker delivers
  again (after a crash between commit and acknowledgement, or a device resending) adds nothing
  anywhere;
- the device epoch's stream row: ``received``, ``max_seq`` and ``contiguous`` (the highest seq with all
  before it stored), locked first (``FOR UPDATE`` on PostgreSQL; SQLite's write lock is taken by the
  first INSERT) so replicas sharing the stream cannot lose a step;
- telemetry into the rollups (:func:`edgefleet.server.telemetry.rollups.upsert`);
- events into ``device_events`` with their seq, as the HTTP reports store them (``device show`` lists
  them); an event whose seq is stored already from the HTTP fallback is the same event, skipped; one
  whose seq is taken by an event of an *older epoch* (a device that lost its queue) is kept without a
  seq rather than lost;
- the device's ``last_seen``, at most once per ``last_seen_granularity``.

Nothing here commits or acknowledges: the ingester does both, in that order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from edgefleet.server.alerts.rules import evaluate as evaluate_alerts
from edgefleet.server.models import Device, DeviceEvent, TelemetryMessage, TelemetryStream, upsert_insert
from edgefleet.server.telemetry import rollups
from edgefleet.server.telemetry.payloads import EventIn, Parsed, TelemetryIn, as_event_data

__all__ = ["DUPLICATE", "STORED", "store_batch"]

STORED = "stored"
DUPLICATE = "duplicate"
_SCAN_LIMIT = 100_000  # seqs read at most to move a stream's contiguous mark past earlier out-of-order arrivals


def store_batch(s: Session, items: Sequence[Parsed], now: datetime, last_seen_granularity: float = 60.0) -> list[str]:
    """Write ``items`` (see the module docstring); returns one outcome per item, in order: ``stored``,
    ``duplicate``, ``unknown_device`` or ``revoked_device``. Raises what SQLAlchemy raises."""
    outcome = [STORED] * len(items)
    if not items:
        return outcome
    ids = sorted({p.device_id for p in items})
    devices = {r.id: r for r in s.execute(select(Device.id, Device.revoked_at, Device.last_seen)
                                          .where(Device.id.in_(ids)))}
    live: list[int] = []
    for i, p in enumerate(items):
        row = devices.get(p.device_id)
        if row is None:
            outcome[i] = "unknown_device"
        elif row.revoked_at is not None:
            outcome[i] = "revoked_device"
        else:
            live.append(i)
    if not live:
        return outcome
    streams = _lock_streams(s, sorted({(items[i].device_id, items[i].body.epoch) for i in live}), now)

    fresh: list[int] = []
    seen: set[tuple[str, str, int]] = set()
    for i in live:
        key = items[i].key
        if key[2] <= streams[(key[0], key[1])].contiguous or key in seen:
            outcome[i] = DUPLICATE  # stored before (at or below the contiguous mark), or twice in this batch
            continue
        seen.add(key)
        fresh.append(i)
    new = _insert_messages(s, streams, [items[i] for i in fresh], now)
    for i in fresh:
        if items[i].key not in new:
            outcome[i] = DUPLICATE
    stored = [items[i] for i in fresh if items[i].key in new]
    _advance_streams(s, streams, stored, now)
    rollups.upsert(s, rollups.accumulate((p.body for p in stored if isinstance(p.body, TelemetryIn)), now))
    _insert_events(s, [p.body for p in stored if isinstance(p.body, EventIn)], now)
    for p in stored:  # alert thresholds (drift, live accuracy), in this transaction: raised once per cooldown
        if isinstance(p.body, TelemetryIn):
            for m in p.body.models:
                evaluate_alerts(s, p.device_id, m.name, m.version, m, now=now)
    stale = now - timedelta(seconds=last_seen_granularity)
    touch = sorted({p.device_id for p in stored
                    if devices[p.device_id].last_seen is None or devices[p.device_id].last_seen <= stale})
    if touch:
        s.execute(update(Device).where(Device.id.in_(touch)).values(last_seen=now))
    return outcome


@dataclass
class _Stream:
    """A stream row as read (locked) and as it will be written back."""

    contiguous: int
    max_seq: int
    received: int
    last_at: datetime | None


def _lock_streams(s: Session, keys: list[tuple[str, str]], now: datetime) -> dict[tuple[str, str], _Stream]:
    """The stream rows of ``keys`` (created when new), locked for this transaction, in key order."""
    conn = s.connection()
    ins = upsert_insert(s, TelemetryStream).on_conflict_do_nothing(index_elements=["device_id", "epoch"])
    conn.execute(ins, [{"device_id": d, "epoch": e, "contiguous": 0, "max_seq": 0, "received": 0,
                        "first_received_at": now, "last_received_at": now, "last_at": None} for d, e in keys])
    wanted = set(keys)
    t = TelemetryStream
    q = (select(t.device_id, t.epoch, t.contiguous, t.max_seq, t.received, t.last_at)
         .where(t.device_id.in_(sorted({d for d, _ in keys}))).order_by(t.device_id, t.epoch).with_for_update())
    return {(r.device_id, r.epoch): _Stream(r.contiguous, r.max_seq, r.received, r.last_at)
            for r in conn.execute(q) if (r.device_id, r.epoch) in wanted}


_UPDATE_STREAM = (
    update(TelemetryStream)
    .where(TelemetryStream.device_id == bindparam("k_device"), TelemetryStream.epoch == bindparam("k_epoch"))
    .values(contiguous=bindparam("v_contiguous"), max_seq=bindparam("v_max_seq"), received=bindparam("v_received"),
            last_received_at=bindparam("v_now"), last_at=bindparam("v_last_at"))
)


def _insert_messages(s: Session, streams: dict[tuple[str, str], _Stream], items: list[Parsed],
                     now: datetime) -> set[tuple[str, str, int]]:
    """INSERT the messages not stored yet; the keys inserted. A seq above its stream's ``max_seq`` was
    never stored; the others (out-of-order arrivals, redeliveries) are looked up. The stream rows are
    locked by this transaction, so no other replica stores messages of these streams meanwhile (ON
    CONFLICT DO NOTHING stays as a safety net). No RETURNING: plain executemany is the fast path."""
    if not items:
        return set()
    conn = s.connection()
    m = TelemetryMessage
    doubtful: dict[tuple[str, str], list[int]] = {}
    for p in items:
        if p.body.seq <= streams[(p.device_id, p.body.epoch)].max_seq:
            doubtful.setdefault((p.device_id, p.body.epoch), []).append(p.body.seq)
    existing: set[tuple[str, str, int]] = set()
    for (device, epoch), seqs in sorted(doubtful.items()):
        q = select(m.seq).where(m.device_id == device, m.epoch == epoch, m.seq.in_(sorted(seqs)))
        existing |= {(device, epoch, seq) for (seq,) in conn.execute(q)}
    new = sorted((p for p in items if p.key not in existing), key=lambda p: p.key)
    if new:
        rows = [{"device_id": p.device_id, "epoch": p.body.epoch, "seq": p.body.seq, "topic": p.topic,
                 "at": p.body.at, "received_at": now, "data": p.body.model_dump(mode="json", by_alias=True)}
                for p in new]
        conn.execute(upsert_insert(s, m).on_conflict_do_nothing(index_elements=["device_id", "epoch", "seq"]), rows)
    return {p.key for p in new}


def _advance_streams(s: Session, streams: dict[tuple[str, str], _Stream], stored: list[Parsed],
                     now: datetime) -> None:
    by_stream: dict[tuple[str, str], list[Parsed]] = {}
    for p in stored:
        by_stream.setdefault((p.device_id, p.body.epoch), []).append(p)
    rows = []
    for key, ps in sorted(by_stream.items()):
        st = streams[key]
        seqs = sorted(p.body.seq for p in ps)
        previous_max = st.max_seq
        st.received += len(seqs)
        st.max_seq = max(st.max_seq, seqs[-1])
        newest = max(p.at for p in ps)
        st.last_at = newest if st.last_at is None or newest > st.last_at else st.last_at
        contiguous = st.contiguous
        for q in seqs:
            if q != contiguous + 1:
                break
            contiguous = q
        if previous_max > contiguous:  # earlier arrivals beyond a gap this batch may have closed
            contiguous = _scan_contiguous(s, key, contiguous)
        st.contiguous = contiguous
        rows.append({"k_device": key[0], "k_epoch": key[1], "v_contiguous": st.contiguous, "v_max_seq": st.max_seq,
                     "v_received": st.received, "v_now": now, "v_last_at": st.last_at})
    if rows:
        s.connection().execute(_UPDATE_STREAM, rows)


def _scan_contiguous(s: Session, key: tuple[str, str], contiguous: int) -> int:
    m = TelemetryMessage
    q = (select(m.seq).where(m.device_id == key[0], m.epoch == key[1], m.seq > contiguous)
         .order_by(m.seq).limit(_SCAN_LIMIT))
    for (seq,) in s.execute(q):
        if seq != contiguous + 1:
            break
        contiguous = seq
    return contiguous


def _insert_events(s: Session, events: list[EventIn], now: datetime) -> None:
    if not events:
        return
    rows: list[dict[str, Any]] = [
        {"device_id": e.device_id, "seq": e.seq, "at": e.at, "received_at": now, "kind": e.kind,
         "data": as_event_data(e)} for e in sorted(events, key=lambda e: (e.device_id, e.seq))
    ]
    first: dict[tuple[str, int], dict[str, Any]] = {}
    taken: list[dict[str, Any]] = []  # their (device, seq) is held by another event: stored, or first here
    for r in rows:
        if (r["device_id"], r["seq"]) in first:
            taken.append(r)  # the same seq in two epochs, both in this batch
        else:
            first[(r["device_id"], r["seq"])] = r
    ev = DeviceEvent
    stmt = (upsert_insert(s, ev).on_conflict_do_nothing(index_elements=[ev.device_id, ev.seq],
                                                         index_where=ev.seq.isnot(None))
            .returning(ev.device_id, ev.seq))
    inserted = {(r[0], r[1]) for r in s.connection().execute(stmt, list(first.values()))}
    taken += [r for key, r in first.items() if key not in inserted]
    if not taken:
        return
    epochs = {(d, q): (data or {}).get("epoch") for d, q, data in s.execute(
        select(ev.device_id, ev.seq, ev.data).where(ev.device_id.in_({r["device_id"] for r in taken}),
                                                    ev.seq.in_({r["seq"] for r in taken})))}
    older = [{**r, "seq": None} for r in taken
             if epochs.get((r["device_id"], r["seq"])) not in (None, r["data"]["epoch"])]
    if older:
        s.connection().execute(upsert_insert(s, ev), older)
