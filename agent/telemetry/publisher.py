"""The agent's MQTT link to the fleet's broker: ``status``, the queued ``telemetry`` and ``events``,
and the ``cmd`` topic (paho-mqtt 2 API; MQTT 5 by default, 3.1.1 as an option).

Topics, under ``edgefleet/v1/{device_id}/``:

- ``status``: retained ``{"schema": 1, "device_id", "at", "state": "online" | "offline"}``, no
  ``seq``. ``online`` is published on every connect, ``offline`` by :meth:`Publisher.close`, and the
  broker publishes the last will (``offline``, with the ``at`` of the connect attempt) when the
  connection is lost without a clean disconnect (a crash, a power cut, a network cut).
- ``telemetry`` and ``events``: QoS 1, from the :class:`~edgefleet.agent.telemetry.queue.Outbox`, in
  ``seq`` order, at most ``max_inflight`` unacknowledged at once (MQTT 5: never more than the
  broker's receive-maximum). A message leaves the outbox only when its PUBACK arrives. On a
  reconnect, paho sends what was in flight again (same packet ids, DUP set), in order, before
  anything new; after a restart, everything still in the outbox is sent again from the oldest.
  A message may thus arrive twice (QoS 1); the server deduplicates by ``(device_id, epoch, seq)``.
  A PUBACK with a failure reason (MQTT 5: e.g. 0x87 not authorized) means the broker will never
  take that message: it is removed and counted as dropped (``refused`` here), never retried forever.
- ``cmd``: subscribed at QoS 1 by :meth:`Publisher.subscribe_cmd`; a message is
  ``{"schema": 1, "device_id", "at", "action": "check-in"}`` and carries no authority (it only
  makes the agent check in now; what follows is verified through TUF). Anything else is ignored,
  counted and logged.

One thread owns the paho client (its own network loop, as :mod:`edgefleet.agent.sources.mqtt`
does): it connects, reconnects with exponential back-off (``reconnect_min_s`` doubling to
``reconnect_max_s``, each wait drawn between half the delay and the whole, so a fleet that lost its
broker does not come back in step; the delay resets once a connection stayed up 10 s), publishes
from the outbox when :meth:`Publisher.wake` (called by every ``Outbox.put``) says there is more, and
deletes acknowledged messages from the outbox in one transaction per network-loop turn.

TLS: the device certificate and key from enrollment (``STATE/identity/device.crt``,
``device.key``) and the fleet CA (``ca.crt``) unless the config names other files; the broker's
host name is checked. A certificate renewed on disk (the updater renews it before expiry) is loaded
again before the next connect.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import select
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefleet.agent.sources.base import Counters
from edgefleet.agent.telemetry.config import MqttFleetConfig, TlsFiles
from edgefleet.agent.telemetry.queue import Message, Outbox, OutboxError, device_topic, rfc3339
from edgefleet.errors import ConfigError

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

__all__ = ["ACTIONS", "MAX_CMD_BYTES", "Backoff", "CmdCallback", "Publisher", "parse_cmd", "status_payload"]

NO_MATCHING_SUBSCRIBERS = 16  # MQTT 5 reason code in a PUBACK
UNROUTED_RETRY_S = 5.0  # seconds before messages that reached no subscriber are sent again
log = logging.getLogger(__name__)

ACTIONS = ("check-in",)  # what a cmd may ask
MAX_CMD_BYTES = 4096  # a longer cmd payload is ignored unread
STABLE_S = 10.0  # a connection that lasted this long resets the reconnect delay
PREFETCH = 256  # messages read from the outbox at once (at most this many payloads in memory)
CLOSE_GRACE_S = 5.0  # close() waits this much past close_timeout_s for the network thread

CmdCallback = Callable[[dict[str, Any]], None]


def status_payload(device_id: str, state: str, at: float) -> bytes:
    """The retained ``status`` message (no ``seq``: only the latest matters)."""
    body = {"schema": 1, "device_id": device_id, "at": rfc3339(at), "state": state}
    return json.dumps(body, separators=(",", ":")).encode()


def parse_cmd(payload: bytes | bytearray, device_id: str) -> dict[str, Any]:
    """A ``cmd`` message as a dict, checked. Raises ValueError naming the field at fault."""
    if len(payload) > MAX_CMD_BYTES:
        raise ValueError(f"payload: {len(payload)} bytes, over the limit of {MAX_CMD_BYTES}")
    try:
        msg = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"payload: not JSON ({e})") from e
    if not isinstance(msg, dict):
        raise ValueError(f"payload: expected a JSON object, got {type(msg).__name__}")
    if msg.get("schema") != 1 or isinstance(msg.get("schema"), bool):
        raise ValueError(f"schema: expected 1, got {msg.get('schema')!r}")
    if msg.get("device_id") != device_id:
        raise ValueError(f"device_id: {msg.get('device_id')!r} is not this device ({device_id!r})")
    if msg.get("action") not in ACTIONS:
        raise ValueError(f"action: {msg.get('action')!r} is not one of {list(ACTIONS)}")
    at = msg.get("at")
    if not isinstance(at, str):
        raise ValueError(f"at: expected an RFC 3339 time, got {at!r}")
    try:
        parsed = datetime.fromisoformat(at.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError as e:
        raise ValueError(f"at: {at!r} is not an RFC 3339 time") from e
    if parsed.tzinfo is None:
        raise ValueError(f"at: {at!r} has no time zone")
    return msg


class Backoff:
    """Reconnect delays: exponential from ``min_s`` doubling to ``max_s``, each wait drawn between half
    the current delay and the whole ("equal jitter"), so devices that lost the same broker spread
    their reconnects instead of arriving in step, yet none waits less than half the delay."""

    def __init__(self, min_s: float, max_s: float, rng: random.Random) -> None:
        if not 0 < min_s <= max_s:
            raise ValueError(f"reconnect_min_s: {min_s} must be positive and at most reconnect_max_s ({max_s})")
        self.min_s, self.max_s, self._rng = min_s, max_s, rng
        self.delay = min_s  # the upper end of the next wait
        self.attempts = 0  # waits since the last reset

    def next(self) -> float:
        """The next wait, seconds; the delay after it doubles (up to ``max_s``)."""
        wait = self._rng.uniform(self.delay / 2, self.delay)
        self.delay = min(self.delay * 2, self.max_s)
        self.attempts += 1
        return wait

    def reset(self) -> None:
        self.delay, self.attempts = self.min_s, 0


class _TlsContext:
    """An SSL context with the device certificate, loaded again when the files change on disk."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        try:
            self.context = ssl.create_default_context(
                ssl.Purpose.SERVER_AUTH, cafile=str(files.ca_cert) if files.ca_cert else None
            )
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"mqtt.fleet.ca_cert: cannot load {files.ca_cert}: {e}") from e
        self._stamp = self._files_stamp()
        try:
            self.context.load_cert_chain(str(files.certfile), str(files.keyfile))
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(
                f"mqtt.fleet.certfile: cannot load the client certificate {files.certfile} and key {files.keyfile}: {e}"
            ) from e

    def _files_stamp(self) -> tuple[int, ...]:
        out: list[int] = []
        for p in (self.files.certfile, self.files.keyfile):
            try:
                st = os.stat(p)
                out += [st.st_mtime_ns, st.st_size, st.st_ino]
            except OSError:
                out += [-1, -1, -1]
        return tuple(out)

    def refresh(self) -> None:
        """Load the certificate again if it changed (a renewal); keep the old one if the new files
        do not load (a renewal half done: key and certificate do not match yet)."""
        stamp = self._files_stamp()
        if stamp == self._stamp:
            return
        try:
            self.context.load_cert_chain(str(self.files.certfile), str(self.files.keyfile))
        except (OSError, ssl.SSLError) as e:
            log.warning("mqtt fleet: the renewed certificate %s does not load yet (%s); keeping the old one",
                        self.files.certfile, e)
            return
        self._stamp = stamp
        log.info("mqtt fleet: loaded the renewed certificate %s", self.files.certfile)


class Publisher:
    """Publishes one device's outbox to the fleet's broker (see the module docstring).

    ``identity_dir`` is the enrolled identity's folder (``STATE/identity``), where the TLS files
    come from unless the config names them. ``rng`` draws the reconnect jitter (injected for tests).
    Raises :class:`ConfigError` naming the field (a certificate that does not load, TLS without any
    certificate, paho-mqtt missing) and ValueError for a device id that cannot be a topic level.
    """

    def __init__(
        self,
        config: MqttFleetConfig,
        device_id: str,
        outbox: Outbox,
        *,
        identity_dir: Path | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if outbox.device_id != device_id:
            raise ValueError(f"device_id: {device_id!r}, but the outbox is {outbox.device_id!r}'s")
        self.config = config
        self.device_id = device_id
        self.outbox = outbox
        self.status_topic = device_topic(device_id, "status")
        self.cmd_topic = device_topic(device_id, "cmd")
        self.connected = threading.Event()  # CONNACK received, cleared on disconnect
        self.last_error: str | None = None
        self._counters = Counters(
            "connects", "disconnects", "connect_failures", "published", "refused", "unrouted", "cmd_received",
            "cmd_invalid"
        )
        # MQTT 5 PUBACK "no matching subscribers" (16): the broker took the message and dropped it (the server
        # is not subscribed yet, e.g. a Mosquitto restart that lost a shared subscription). Such seqs stay in
        # the outbox and are sent again after UNROUTED_RETRY_S: delivered means stored by the server.
        self._unrouted: list[int] = []
        self._resend_at: float | None = None
        self._rng = rng or random.Random()
        try:
            files = config.tls_files(identity_dir)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        self._tls = _TlsContext(files) if files is not None else None
        self._client = self._make_client()
        self._window = config.max_inflight  # lowered to the broker's receive-maximum (MQTT 5)
        self._inflight: dict[int, int] = {}  # paho mid -> seq (loop thread only)
        self._cursor = 0  # highest seq handed to paho (loop thread only)
        self._ahead: deque[Message] = deque()  # read from the outbox, not yet handed to paho (seq > _cursor)
        self._acked: list[int] = []  # seqs acknowledged, not yet deleted from the outbox
        self._lost: list[int] = []  # seqs the broker refused
        self._cmd: CmdCallback | None = None
        self._want_subscribe = False
        self._offline_mid: int | None = None
        self._offline_acked = False
        self._connected_at = 0.0
        self._closing = threading.Event()
        self._close_timeout = config.close_timeout_s
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    # -- public --------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background and keep publishing until :meth:`close`."""
        with self._lock:
            if self._thread is not None or self._closing.is_set():
                raise RuntimeError("publisher: already started")
            self._thread = threading.Thread(target=self._run, name="mqtt-fleet", daemon=True)
        self.outbox.watch(self.wake)
        log.info("mqtt fleet: connecting to %s:%s as %s (MQTT %s, %s)", self.config.host, self.config.port,
                 self._client_id(), self.config.protocol, "TLS" if self._tls else "plain TCP")
        self._thread.start()

    def wake(self) -> None:
        """Something new is in the outbox (or to do): have the network thread look now."""
        self._poke()

    def subscribe_cmd(self, callback: CmdCallback) -> None:
        """Subscribe to ``edgefleet/v1/{id}/cmd`` (QoS 1, again on every connect) and call
        ``callback(message)`` for each valid one, on the network thread: it must return quickly
        (set an event, say). An exception it raises is logged."""
        self._cmd = callback
        self._want_subscribe = True
        self._poke()

    def close(self, timeout: float | None = None) -> None:
        """Stop: while connected, spend up to ``timeout`` (default ``close_timeout_s``) sending what the
        outbox holds and waiting for its acknowledgements, then publish ``status`` offline
        (retained) and disconnect cleanly (the broker then drops the last will). What is not
        acknowledged stays in the outbox for the next start.
        Idempotent; the outbox is left open (its owner closes it)."""
        self._closing.set()
        self._close_timeout = self.config.close_timeout_s if timeout is None else timeout
        self._poke()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(self._close_timeout + CLOSE_GRACE_S)
        self.outbox.unwatch(self.wake)
        self._flush_acks()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def counters(self) -> dict[str, int]:
        """connects, disconnects, connect_failures, published (PUBACKs), refused, cmd_received,
        cmd_invalid; in_flight and connected (0/1) now."""
        c = self._counters.snapshot()
        c["in_flight"] = len(self._inflight)
        c["connected"] = int(self.connected.is_set())
        return c

    # -- the client ----------------------------------------------------------------------------

    def _client_id(self) -> str:
        return self.config.client_id or self.device_id

    def _make_client(self) -> mqtt.Client:
        from edgefleet.agent.sources.mqtt import MqttBrokerConfig, connect, make_client

        cfg = self.config
        broker = MqttBrokerConfig(host=cfg.host, port=cfg.port, protocol=cfg.protocol, client_id=self._client_id(),
                                  keepalive=cfg.keepalive)
        client = make_client(broker, "fleet")
        if self._tls is not None:
            client.tls_set_context(self._tls.context)
        client.max_inflight_messages_set(cfg.max_inflight + 2)  # + status and its resend: never queued by paho
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        connect(client, broker, loop=False)  # records host, port, MQTT 5 clean start: the loop connects
        return client

    def _poke(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:  # full (a wake-up is pending anyway) or closed
            pass

    # -- the network thread --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except Exception:  # a bug must not pass silently: the agent keeps serving, telemetry waits on disk
            log.exception("mqtt fleet: the network thread failed; telemetry stays queued on disk")
            self.last_error = "the network thread failed (see the log)"
        finally:
            self.connected.clear()
            self._flush_acks()

    def _loop(self) -> None:
        import paho.mqtt.client as mqtt

        cfg = self.config
        client = self._client
        backoff = Backoff(cfg.reconnect_min_s, cfg.reconnect_max_s, self._rng)
        first = True
        deadline: float | None = None  # while closing: when to stop waiting for acknowledgements
        while True:
            sock = client.socket()
            if sock is None:
                if self._connected_at and time.monotonic() - self._connected_at >= STABLE_S:
                    backoff.reset()  # that connection was good: start again from the shortest delay
                self._connected_at = 0.0
                if self._closing.is_set():
                    return
                if not first and self._closing.wait(backoff.next()):
                    return
                first = False
                self._before_connect(client)
                try:
                    client.reconnect()
                except (OSError, ValueError) as e:
                    self._counters.inc("connect_failures")
                    self.last_error = f"cannot connect to {cfg.host}:{cfg.port}: {e}"
                    n = backoff.attempts
                    (log.warning if n <= 2 or n % 10 == 0 else log.info)(
                        "mqtt fleet: %s (attempt %d; retrying within %.3g s)", self.last_error, n + 1, backoff.delay)
                continue
            pending = sock.pending() if hasattr(sock, "pending") else 0  # TLS: bytes already decrypted
            wlist: list[Any] = [sock] if client.want_write() else []
            timeout = 0.0 if pending else min(1.0, cfg.keepalive / 4)
            try:
                rlist: list[Any] = [sock, self._wake_r]
                readable, _, _ = select.select(rlist, wlist, [], timeout)
            except (OSError, ValueError):  # the socket closed under us
                readable = []
            if self._wake_r in readable:
                with contextlib.suppress(OSError):
                    os.read(self._wake_r, 4096)
            rc = mqtt.MQTT_ERR_SUCCESS
            if sock in readable or pending:
                rc = client.loop_read()  # PUBACKs: room in the window
            if self._closing.is_set():
                if deadline is None:
                    deadline = time.monotonic() + self._close_timeout
                if self._close_step(client, deadline):
                    self._flush_acks()
                    return
            elif self.connected.is_set():
                if self._want_subscribe and self._cmd is not None:
                    self._want_subscribe = False
                    client.subscribe(self.cmd_topic, qos=1)
                self._pump(client)  # refill the window before anything else (each publish is written at once)
            if rc == mqtt.MQTT_ERR_SUCCESS and client.want_write():
                rc = client.loop_write()
            if rc == mqtt.MQTT_ERR_SUCCESS:
                client.loop_misc()
            self._flush_acks()

    def _before_connect(self, client: mqtt.Client) -> None:
        """The last will for this attempt (its ``at``: now) and a renewed certificate, if any."""
        client.will_set(self.status_topic, status_payload(self.device_id, "offline", time.time()), qos=1, retain=True)
        if self._tls is not None:
            self._tls.refresh()

    def _pump(self, client: mqtt.Client) -> None:
        """Hand paho the next messages of the outbox, in seq order, up to the in-flight window (read
        from the outbox a batch at a time: one query per PREFETCH messages, not per window)."""
        import paho.mqtt.client as mqtt

        if self._unrouted and self._resend_at is not None and time.monotonic() >= self._resend_at:
            self._cursor = min(min(self._unrouted) - 1, self._cursor)  # from the first one nobody received
            self._ahead.clear()
            self._unrouted.clear()
            self._resend_at = None
        room = self._window - len(self._inflight)
        while room > 0:
            if not self._ahead:
                if self.outbox.last_seq() <= self._cursor:
                    return
                try:
                    self._ahead.extend(self.outbox.peek(PREFETCH, after=self._cursor))
                except OutboxError as e:
                    self.last_error = str(e)
                    log.warning("mqtt fleet: %s", e)
                    return
                if not self._ahead:
                    return
            m = self._ahead[0]
            info = client.publish(m.topic, m.payload, qos=1)
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                log.warning("mqtt fleet: cannot publish seq %d: %s; trying again later", m.seq,
                            mqtt.error_string(info.rc))
                return
            self._ahead.popleft()
            self._inflight[info.mid] = m.seq  # NO_CONN too: paho keeps it and sends it on reconnect
            self._cursor = m.seq
            room -= 1

    def _close_step(self, client: mqtt.Client, deadline: float) -> bool:
        """One turn of closing: send what the outbox still holds and wait for its acknowledgements
        (until ``deadline``), then the offline status and a clean disconnect. True when done."""
        now = time.monotonic()
        if not self.connected.is_set():  # no CONNACK (yet): nothing to say, just go
            client.disconnect()
            return True
        if now < deadline:
            self._pump(client)
        settled = not self._inflight and self.outbox.last_seq() <= self._cursor
        if self._offline_mid is None and (settled or now >= deadline):
            info = client.publish(self.status_topic, status_payload(self.device_id, "offline", time.time()),
                                  qos=1, retain=True)
            self._offline_mid = info.mid
        if (self._offline_acked and settled) or now >= deadline:
            client.disconnect()
            with contextlib.suppress(Exception):
                client.loop_write()
            self.connected.clear()
            return True
        return False

    def _flush_acks(self) -> None:
        acked, self._acked = self._acked, []
        lost, self._lost = self._lost, []
        try:
            if acked:
                self.outbox.ack_many(acked)
            if lost:
                self.outbox.ack_many(lost, lost=True)
        except OutboxError as e:  # they are sent again later: QoS 1 allows it
            self.last_error = str(e)
            log.warning("mqtt fleet: %s", e)

    # -- paho callbacks (the network thread) ---------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._counters.inc("connect_failures")
            self.last_error = f"the broker {self.config.host}:{self.config.port} refused the connection: {reason}"
            log.warning("mqtt fleet: %s", self.last_error)
            return
        window = self.config.max_inflight
        rm = getattr(props, "ReceiveMaximum", None) if props is not None else None
        if isinstance(rm, int) and rm > 0:
            window = max(1, min(window, rm - 1))  # one left for the status message
        self._window = window
        self._counters.inc("connects")
        self._connected_at = time.monotonic()
        self._offline_mid, self._offline_acked = None, False
        self.connected.set()
        self.last_error = None
        log.info("mqtt fleet: connected to %s:%s (%d in flight, window %d)", self.config.host, self.config.port,
                 len(self._inflight), window)
        client.publish(self.status_topic, status_payload(self.device_id, "online", time.time()), qos=1, retain=True)
        if self._cmd is not None:
            self._want_subscribe = True

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        if self._closing.is_set():
            return
        if was:
            self._counters.inc("disconnects")
            self.last_error = f"disconnected from {self.config.host}:{self.config.port} ({reason})"
            log.warning("mqtt fleet: %s; %d message(s) in flight are sent again on reconnect", self.last_error,
                        len(self._inflight))

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        seq = self._inflight.pop(mid, None)
        failed = bool(getattr(reason, "is_failure", False))
        if seq is None:
            if mid == self._offline_mid:
                self._offline_acked = True
            return
        if failed:
            self._counters.inc("refused")
            self._lost.append(seq)
            self.last_error = f"the broker refused seq {seq}: {reason}"
            log.warning("mqtt fleet: %s (dropped, counted)", self.last_error)
            return
        if self.config.resend_unrouted and getattr(reason, "value", 0) == NO_MATCHING_SUBSCRIBERS:
            self._counters.inc("unrouted")
            self._unrouted.append(seq)
            if self._resend_at is None:
                self._resend_at = time.monotonic() + UNROUTED_RETRY_S
                log.info("mqtt fleet: seq %d reached no subscriber (the server is not subscribed); kept, sent "
                         "again in %.0f s", seq, UNROUTED_RETRY_S)
            return
        self._counters.inc("published")
        self._acked.append(seq)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        bad = [str(r) for r in reasons if getattr(r, "is_failure", False)]
        if bad:
            self.last_error = f"subscription to {self.cmd_topic} refused: {bad}"
            log.warning("mqtt fleet: %s", self.last_error)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        callback = self._cmd
        if msg.topic != self.cmd_topic or callback is None:
            return
        try:
            cmd = parse_cmd(msg.payload, self.device_id)
        except ValueError as e:
            self._counters.inc("cmd_invalid")
            log.warning("mqtt fleet: ignored a message on %s: %s", msg.topic, e)
            return
        self._counters.inc("cmd_received")
        try:
            callback(cmd)
        except Exception:
            log.exception("mqtt fleet: the cmd callback failed")
