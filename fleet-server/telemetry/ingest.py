"""Telemetry ingestion: an MQTT 5 subscriber (paho-mqtt v2) that stores every device's ``telemetry`` and
``events`` messages and acknowledges each one only after the transaction holding it committed.

Threads: paho's network thread receives and puts each message on a bounded queue (nothing else runs
there); one writer thread takes batches off it (up to ``mqtt_batch_max`` messages, or what arrived
within ``mqtt_batch_seconds`` of the first), validates them (:func:`payloads.parse`), stores them in
one transaction (:func:`store.store_batch`), commits, and only then sends the PUBACKs, in the order
the messages arrived. So:

- a crash before the commit leaves the messages unacknowledged in the broker's session for this
  client (``clean_start=False``, ``mqtt_session_expiry``), which redelivers them when the server
  connects again; a crash after the commit and before the PUBACKs redelivers messages already stored,
  which the (device, epoch, seq) key makes no-ops. Nothing is lost, nothing is counted twice.
- a refused message (malformed, ``device_id`` not the topic's, unknown or revoked device) is
  acknowledged with its batch and dropped, with a log line (at most :data:`LOG_REFUSALS_PER_MINUTE`)
  and ``edgefleet_telemetry_rejected_total{reason}``; it never stops the stream.
- a database that fails (locked, unreachable) is retried with back-off, holding the batch: the
  broker sends no more than ``mqtt_receive_maximum`` unacknowledged messages, so memory stays bounded
  and the rest waits in the broker. A batch that fails for any other reason is stored one message at
  a time, so a single poisonous message is dropped (``store_error``) and the others kept.
- PUBACKs are never sent on a later connection than the message came on (packet ids belong to one
  connection's session): those messages are redelivered and deduplicated instead.

Subscriptions: ``$share/{mqtt_share_group}/edgefleet/v1/+/telemetry`` and ``.../events`` (replicas split
the stream), or the plain filters with ``mqtt_shared_subscription = false``. Reconnects: paho's
exponential back-off, 1 s doubling to ``mqtt_reconnect_max``.

The same client publishes ``edgefleet/v1/{device}/cmd`` (:func:`notify_check_in`): "check in now",
QoS 1, expiring after :data:`CMD_EXPIRY` seconds in the broker.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from edgefleet.server.api.schemas import DEVICE_ID
from edgefleet.server.metrics import Metrics
from edgefleet.server.models import utcnow
from edgefleet.server.settings import Settings
from edgefleet.server.telemetry import rollups
from edgefleet.server.telemetry.payloads import REASONS, TOPIC_KINDS, Parsed, Rejected, TelemetryIn, parse
from edgefleet.server.telemetry.store import DUPLICATE, STORED, store_batch

__all__ = ["CMD_EXPIRY", "Ingester", "active_ingester", "notify_check_in"]

log = logging.getLogger(__name__)
CMD_EXPIRY = 300  # s: a "check in now" the broker could not deliver by then is dropped (devices poll anyway)
LOG_REFUSALS_PER_MINUTE = 20
RETRY_MIN, RETRY_MAX = 0.1, 5.0  # s: back-off between attempts at a batch the database refused
_DEVICE = re.compile(DEVICE_ID)
_ACTIVE: dict[int, Ingester] = {}  # id(ServerState) -> its running ingester (notify_check_in looks it up)
_ACTIVE_LOCK = threading.Lock()


@dataclass(frozen=True)
class _Received:
    gen: int  # the connection it came on (see Ingester._gen)
    mid: int
    qos: int
    topic: str
    payload: bytes


def _transient(e: BaseException) -> bool:
    """A database error worth retrying the same batch for (locked, unreachable, deadlock, pool)."""
    return isinstance(e, OperationalError | InterfaceError | PoolTimeout) or (
        isinstance(e, DBAPIError) and e.connection_invalidated)


class Ingester:
    """Subscribes, stores and acknowledges (see the module docstring). ``start`` returns at once (the
    broker may be down: paho keeps trying); ``stop`` stores what was received, acknowledges it, and
    disconnects."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], metrics: Metrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if settings.mqtt_url is None:
            raise ValueError("mqtt_url: not set")
        self.settings = settings
        self.sessions = sessions
        self.metrics = metrics
        self.clock = clock
        url = urlsplit(settings.mqtt_url)
        self.tls = url.scheme == "mqtts"
        self.host = url.hostname or "localhost"
        self.port = url.port or (8883 if self.tls else 1883)
        self.client_id = settings.mqtt_client_id or _default_client_id()
        self._queue: queue.Queue[_Received] = queue.Queue(maxsize=2 * settings.mqtt_receive_maximum)
        self._gen = 0
        self._ack_lock = threading.Lock()  # held while acknowledging, and while a connection ends
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._stopping = threading.Event()
        self._writer: threading.Thread | None = None
        self._refusals_logged = 0
        self._refusal_minute = 0.0
        self.client = self._make_client()
        for reason in REASONS:
            metrics.telemetry_rejected.labels(reason)
        for kind in TOPIC_KINDS:
            for result in (STORED, DUPLICATE, "rejected"):
                metrics.telemetry_messages.labels(kind, result)

    # -- lifecycle
    def start(self, register_for: object | None = None) -> None:
        """Connect in the background and start the writer. ``register_for``: the server state that
        :func:`notify_check_in` will be called with."""
        self._writer = threading.Thread(target=self._write_loop, name="edgefleet-ingest", daemon=True)
        self._writer.start()
        self.client.connect_async(self.host, self.port, keepalive=self.settings.mqtt_keepalive, clean_start=False,
                                  properties=self._connect_properties())
        self.client.loop_start()
        if register_for is not None:
            with _ACTIVE_LOCK:
                _ACTIVE[id(register_for)] = self
        log.info("telemetry ingestion: connecting to %s:%d as %s (%s)", self.host, self.port, self.client_id,
                 "shared subscription" if self.settings.mqtt_shared_subscription else "plain subscription")

    def stop(self, timeout: float = 10.0) -> None:
        """Store and acknowledge what was received, then disconnect (what arrives meanwhile stays
        unacknowledged in the broker, for the next start)."""
        with _ACTIVE_LOCK:
            for key in [k for k, v in _ACTIVE.items() if v is self]:
                del _ACTIVE[key]
        self._stopping.set()
        if self._writer is not None:
            self._writer.join(timeout)
        self.client.disconnect()
        self.client.loop_stop()
        self.metrics.mqtt_connected.set(0)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_subscribed(self, timeout: float) -> bool:
        """Wait until the broker granted the subscriptions (tests and the bench use it)."""
        return self._subscribed.wait(timeout)

    # -- commands
    def notify_check_in(self, device_id: str) -> bool:
        """Publish "check in now" on ``edgefleet/v1/{device_id}/cmd`` (QoS 1, expiring after
        :data:`CMD_EXPIRY`). False when the id is not a device id or the broker is not connected (the
        device's next poll finds the change); never blocks."""
        if not _DEVICE.match(device_id) or not self.connected:
            self.metrics.commands.labels("skipped").inc()
            return False
        at = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        body = json.dumps({"schema": 1, "device_id": device_id, "at": at, "action": "check-in"})
        ok = self.publish(f"edgefleet/v1/{device_id}/cmd", body, expiry=CMD_EXPIRY)
        self.metrics.commands.labels("published" if ok else "failed").inc()
        return ok

    def publish(self, topic: str, payload: str | bytes, qos: int = 1, retain: bool = False,
                expiry: int | None = None) -> bool:
        """Publish on the ingester's own connection (``cmd``, alerts): queued in paho, never blocking;
        ``expiry`` seconds is the MQTT 5 message expiry. False when not connected (nothing queued)."""
        if not self.connected:
            return False
        props = None
        if expiry is not None:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.MessageExpiryInterval = expiry
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        return info.rc == mqtt.MQTT_ERR_SUCCESS

    # -- MQTT (paho's network thread)
    def _make_client(self) -> mqtt.Client:
        s = self.settings
        c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=self.client_id,
                        protocol=mqtt.MQTTv5, manual_ack=True)
        if self.tls:
            c.tls_set(ca_certs=str(s.mqtt_ca_cert) if s.mqtt_ca_cert else None,
                      certfile=str(s.mqtt_client_cert) if s.mqtt_client_cert else None,
                      keyfile=str(s.mqtt_client_key) if s.mqtt_client_key else None,
                      cert_reqs=ssl.CERT_REQUIRED)
        if s.mqtt_username is not None:
            c.username_pw_set(s.mqtt_username, s.mqtt_password.get_secret_value() if s.mqtt_password else None)
        c.reconnect_delay_set(1, max(1, int(s.mqtt_reconnect_max)))
        c.max_inflight_messages_set(100)  # our own publishes (cmd) in flight
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        return c

    def _connect_properties(self) -> Properties:
        p = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        p.SessionExpiryInterval = self.settings.mqtt_session_expiry
        p.ReceiveMaximum = self.settings.mqtt_receive_maximum
        return p

    def filters(self) -> list[str]:
        s = self.settings
        prefix = f"$share/{s.mqtt_share_group}/" if s.mqtt_shared_subscription else ""
        return [f"{prefix}edgefleet/v1/+/{kind}" for kind in TOPIC_KINDS]

    def _on_connect(self, client: mqtt.Client, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.warning("telemetry ingestion: the broker refused the connection: %s", reason)
            return
        self._connected.set()
        self.metrics.mqtt_connected.set(1)
        log.info("telemetry ingestion: connected to %s:%d (session %s)", self.host, self.port,
                 "resumed" if flags.session_present else "new")
        client.subscribe([(f, SubscribeOptions(qos=1)) for f in self.filters()])

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, _mid: int, reasons: list[Any], _p: Any) -> None:
        bad = [str(r) for r in reasons if r.is_failure]
        if bad:
            log.error("telemetry ingestion: the broker refused the subscriptions %s: %s", self.filters(), bad)
            return
        self._subscribed.set()

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        with self._ack_lock:
            self._gen += 1  # no PUBACK for anything received before this goes out on a later connection
        self._connected.clear()
        self._subscribed.clear()
        self.metrics.mqtt_connected.set(0)
        if not self._stopping.is_set():
            log.warning("telemetry ingestion: disconnected from the broker (%s); reconnecting", reason)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            item = _Received(self._gen, msg.mid, msg.qos, msg.topic, bytes(msg.payload))
        except UnicodeDecodeError:  # a topic that is not UTF-8
            item = _Received(self._gen, msg.mid, msg.qos, "", b"")
        self.metrics.telemetry_pending.inc()
        if msg.qos == 0:
            try:
                self._queue.put_nowait(item)  # QoS 0 is not bounded by the broker's in-flight window
            except queue.Full:
                self.metrics.telemetry_pending.dec()
                self._refused("overflow", f"{item.topic[:120]}: a QoS 0 message, and the queue is full")
            return
        while not self._stopping.is_set():
            try:
                self._queue.put(item, timeout=1.0)
                return
            except queue.Full:
                continue

    # -- writer thread
    def _write_loop(self) -> None:
        next_retention = self.clock() + min(60.0, self.settings.mqtt_retention_interval)
        while not self._stopping.is_set():
            batch = self._take_batch(0.5)
            if batch:
                self._process_safely(batch)
            if self.clock() >= next_retention:
                self._retention()
                next_retention = self.clock() + self.settings.mqtt_retention_interval
        rest: list[_Received] = []
        while True:
            try:
                rest.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for i in range(0, len(rest), self.settings.mqtt_batch_max):
            self._process_safely(rest[i : i + self.settings.mqtt_batch_max])

    def _process_safely(self, batch: list[_Received]) -> None:
        try:
            self._process(batch)
        except _Stopped:
            pass  # unacknowledged: the broker redelivers them to the next start
        except Exception:  # a bug must not end ingestion; the batch stays unacknowledged (redelivered later)
            log.exception("telemetry ingestion: a batch of %d could not be processed", len(batch))

    def _take_batch(self, wait: float) -> list[_Received]:
        try:
            batch = [self._queue.get(timeout=wait)]
        except queue.Empty:
            return []
        deadline = self.clock() + self.settings.mqtt_batch_seconds
        while len(batch) < self.settings.mqtt_batch_max:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except queue.Empty:
                pass
            left = deadline - self.clock()
            if left <= 0:
                break
            try:
                batch.append(self._queue.get(timeout=left))
            except queue.Empty:
                break
        return batch

    def _process(self, batch: list[_Received]) -> None:
        outcome: list[str] = [""] * len(batch)
        parsed: list[tuple[int, Parsed]] = []
        for i, r in enumerate(batch):
            try:
                parsed.append((i, parse(r.topic, r.payload, self.settings.mqtt_max_payload_bytes)))
            except Rejected as e:
                outcome[i] = e.reason
                self._refused(e.reason, f"{r.topic[:120]}: {e.message}")
        started = time.perf_counter()
        results = self._store([p for _, p in parsed])
        self.metrics.telemetry_batch.observe(time.perf_counter() - started)
        for (i, p), result in zip(parsed, results, strict=True):
            outcome[i] = result
            if result not in (STORED, DUPLICATE):
                self._refused(result, f"{p.device_id}: {result.replace('_', ' ')} (epoch {p.body.epoch} seq "
                              f"{p.body.seq})")
            elif result == STORED and isinstance(p.body, TelemetryIn):
                for m in p.body.models:
                    self.metrics.fleet_counts(m.name, m.version, m.inferences, m.errors)
        for r, result in zip(batch, outcome, strict=True):
            kind = r.topic.rsplit("/", 1)[-1]
            if kind in TOPIC_KINDS:
                self.metrics.telemetry_messages.labels(kind, result if result in (STORED, DUPLICATE) else
                                                       "rejected").inc()
        self._ack(batch)

    def _store(self, items: list[Parsed]) -> list[str]:
        """Outcomes of ``items``, committed. Retries a database that is down until it answers (or the
        server stops: then raises nothing, and nothing is acknowledged)."""
        if not items:
            return []
        delay, failures = RETRY_MIN, 0
        while True:
            try:
                return self._commit(items)
            except SQLAlchemyError as e:
                if not _transient(e):
                    log.warning("telemetry ingestion: a batch of %d failed (%s); storing them one by one",
                                len(items), str(e).splitlines()[0][:300])
                    return [self._store_one(p) for p in items]
                failures += 1
                if failures == 1 or failures % 20 == 0:
                    log.warning("telemetry ingestion: the database refused a batch of %d (%s); retrying",
                                len(items), str(e).splitlines()[0][:300])
                if self._stopping.wait(delay):
                    raise _Stopped from None
                delay = min(RETRY_MAX, delay * 2)

    def _store_one(self, item: Parsed) -> str:
        try:
            return self._commit([item])[0]
        except SQLAlchemyError as e:
            if _transient(e):
                raise
            log.error("telemetry ingestion: %s epoch %s seq %s cannot be stored: %s", item.device_id,
                      item.body.epoch, item.body.seq, str(e).splitlines()[0][:300])
            return "store_error"

    def _commit(self, items: list[Parsed]) -> list[str]:
        with self.sessions.begin() as s:
            return store_batch(s, items, utcnow(), self.settings.last_seen_granularity)

    def _ack(self, batch: list[_Received]) -> None:
        with self._ack_lock:
            for r in batch:
                if r.qos > 0 and r.gen == self._gen:
                    self.client.ack(r.mid, r.qos)
        self.metrics.telemetry_pending.dec(len(batch))

    def _refused(self, reason: str, message: str) -> None:
        self.metrics.telemetry_rejected.labels(reason).inc()
        now = self.clock()
        if now - self._refusal_minute >= 60:
            if self._refusals_logged > LOG_REFUSALS_PER_MINUTE:
                log.warning("telemetry ingestion: %d more refusals not logged in the last minute",
                            self._refusals_logged - LOG_REFUSALS_PER_MINUTE)
            self._refusal_minute, self._refusals_logged = now, 0
        self._refusals_logged += 1
        if self._refusals_logged <= LOG_REFUSALS_PER_MINUTE:
            log.warning("telemetry refused (%s): %s", reason, message)

    def _retention(self) -> None:
        s = self.settings
        try:
            with self.sessions() as session:
                deleted = rollups.retention(session, utcnow(), s.mqtt_raw_retention_days, s.mqtt_rollup_retention_days)
        except SQLAlchemyError as e:
            log.warning("telemetry retention failed (next run in %g s): %s", s.mqtt_retention_interval,
                        str(e).splitlines()[0][:300])
            return
        if any(deleted.values()):
            log.info("telemetry retention deleted %s", {k: v for k, v in deleted.items() if v})


class _Stopped(Exception):
    """The server stopped while a batch waited for the database: nothing of it is acknowledged."""


def _default_client_id() -> str:
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:100] or "host"
    return f"edgefleet-server-{host}"


def active_ingester(state: object) -> Ingester | None:
    """The running ingester started for ``state`` (a :class:`~edgefleet.server.state.ServerState`)."""
    with _ACTIVE_LOCK:
        return _ACTIVE.get(id(state))


def notify_check_in(state: object, device_id: str) -> bool:
    """Tell device ``device_id`` to check in now, through the ingester of server ``state``: what the
    assignment paths call after their transaction committed. False (and nothing sent) when ingestion
    is off or the broker is not connected: the device's next poll finds the change."""
    ingester = active_ingester(state)
    return ingester.notify_check_in(device_id) if ingester is not None else False
