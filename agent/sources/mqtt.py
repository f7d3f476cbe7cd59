"""Inputs from MQTT topics (paho-mqtt 2, MQTT 3.1.1 or 5), and the broker settings the MQTT sink
shares.

Each message is one JSON payload (see :mod:`edgefleet.agent.sources.base`). A malformed one is
counted as an error, logged with the field at fault and acknowledged; it never stops the source.
paho's network thread reconnects with a growing delay and the source subscribes again on every
connect. The password is a ``SecretStr``: it is never logged or printed.

Nothing is lost to a burst: a QoS 1/2 message is acknowledged (paho manual acks) only once the
flow has processed it, so a burst waits in the broker. Flow control is on both sides: the source
asks the broker for at most ``receive_maximum`` unacknowledged messages (MQTT 5 receive-maximum;
with MQTT 3.1.1 the broker's own in-flight limit, e.g. Mosquitto's ``max_inflight_messages``), and
since brokers do not all keep to it (Mosquitto 2.0.11 sent hundreds past a receive-maximum of 16
while acknowledgements were flowing), the source's own network loop stops reading the socket while
``receive_maximum`` messages are out unacknowledged: TCP then holds the rest in the broker. The loop
never stops writing (acknowledgements, pings), and while paused it still reads one packet every
half keep-alive, so a model that hangs does not cost the connection. Those items are ``held``: the
flow queues them however full it is. Past ``max_held`` held items (only a pause of many keep-alives
gets there), and for every QoS 0 message, the flow's drop policy applies, counted (``over_limit``
here, ``dropped_queue_full`` in the flow). A dropped QoS 1/2 message is
acknowledged: dropped on purpose, never stuck. With ``persistent_session`` (a fixed
``client_id``) the broker keeps the subscription and every unacknowledged message while the agent
is down, and redelivers them: a message whose processing was cut short by a crash is processed
after the restart (at least once; a result sent just before the crash may be sent again). paho's
callback does only the parsing and a queue append: it never waits for the model.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, SecretStr, model_validator

from edgefleet.agent.sources.base import Counters, Emit, Item, Outcome, PayloadError, _Strict, parse_payload_bytes
from edgefleet.errors import ConfigError

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

__all__ = ["MqttBrokerConfig", "MqttSource", "MqttSourceConfig", "MqttTls", "make_client"]

log = logging.getLogger(__name__)


class MqttTls(_Strict):
    """TLS to the broker."""

    ca_certs: Path | None = Field(default=None, description="CA bundle (PEM) to trust; none: the system's")
    certfile: Path | None = Field(default=None, description="client certificate (PEM) for mutual TLS")
    keyfile: Path | None = Field(default=None, description="the client certificate's private key (PEM)")
    insecure: bool = Field(default=False, description="skip the host name check (test set-ups only)")


class MqttBrokerConfig(_Strict):
    """How to reach the broker (shared by the MQTT source and sink)."""

    host: str = Field(default="127.0.0.1", min_length=1, description="broker host name or address")
    port: int = Field(default=1883, ge=1, le=65535, description="broker TCP port (8883 is usual with TLS)")
    protocol: Literal["3.1.1", "5"] = Field(default="3.1.1", description="MQTT protocol version")
    client_id: str = Field(default="", max_length=128, description="client id; empty: edgefleet-<random>")
    username: str | None = Field(default=None, description="user name, if the broker wants one")
    password: SecretStr | None = Field(default=None, description="password (never logged)")
    keepalive: int = Field(default=30, ge=5, le=3600, description="keep-alive interval, seconds")
    tls: MqttTls | None = Field(default=None, description="TLS settings; none: plain TCP")
    reconnect_min_delay: int = Field(default=1, ge=1, le=600, description="first reconnect delay, seconds")
    reconnect_max_delay: int = Field(default=30, ge=1, le=3600, description="longest reconnect delay, seconds")

    @model_validator(mode="after")
    def _delays(self) -> MqttBrokerConfig:
        if self.reconnect_max_delay < self.reconnect_min_delay:
            raise ValueError("reconnect_max_delay is shorter than reconnect_min_delay")
        if self.password is not None and self.username is None:
            raise ValueError("password is set without username")
        return self


class MqttSourceConfig(MqttBrokerConfig):
    """Subscribe to topics; every message is one input."""

    type: Literal["mqtt"]
    name: str = Field(default="mqtt", description="name in counters, logs and result meta")
    topics: list[str] = Field(min_length=1, description="topic filters to subscribe to (wildcards allowed)")
    qos: Literal[0, 1, 2] = Field(default=1, description="subscription QoS")
    max_payload_bytes: int = Field(default=16 << 20, ge=16, description="larger messages are errors, bytes")
    receive_maximum: int = Field(
        default=32,
        ge=1,
        le=65535,
        description="most QoS 1/2 messages out unacknowledged (in the flow) at once: the MQTT 5 receive-maximum the "
        "broker honours; memory is up to this many payloads",
    )
    max_held: int = Field(
        default=1000,
        ge=1,
        le=1_000_000,
        description="most QoS 1/2 messages held unacknowledged in the flow, for brokers that send past "
        "receive_maximum; past it the flow's drop policy applies; memory is up to this many parsed payloads",
    )
    persistent_session: bool = Field(
        default=False,
        description="keep the session at the broker across reconnects and restarts (subscriptions and "
        "unacknowledged messages are kept and redelivered); needs a fixed client_id",
    )
    session_expiry: int = Field(
        default=86400, ge=1, le=0xFFFFFFFF, description="MQTT 5: seconds the broker keeps a persistent session offline"
    )
    stop_timeout: float = Field(
        default=10.0, ge=0, le=600, description="seconds stop() waits for the flow to acknowledge what it holds"
    )

    @model_validator(mode="after")
    def _topics(self) -> MqttSourceConfig:
        for i, t in enumerate(self.topics):
            if not t or "\0" in t:
                raise ValueError(f"topics.{i}: empty or invalid topic filter")
        if self.persistent_session and not self.client_id:
            raise ValueError("client_id: persistent_session needs a fixed client_id (the broker keys sessions by it)")
        return self


def make_client(cfg: MqttBrokerConfig, role: str, *, manual_ack: bool = False, persistent: bool = False) -> mqtt.Client:
    """A paho v2 client set up from ``cfg`` (not yet connected); ``manual_ack``: QoS 1/2 messages
    are acknowledged by ``client.ack``; ``persistent``: MQTT 3.1.1 asks for a kept session (MQTT 5
    asks at connect, see :func:`connect`). Raises :class:`ConfigError`."""
    try:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
    except ImportError as e:
        raise ConfigError(
            f"{role}: MQTT needs paho-mqtt: install the agent extra "
            "(pip install 'edgefleet-VERSION-py3-none-any.whl[agent]', or -e '.[agent]' from a checkout)"
        ) from e
    protocol = mqtt.MQTTv5 if cfg.protocol == "5" else mqtt.MQTTv311
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=cfg.client_id or f"edgefleet-{role}-{uuid.uuid4().hex[:10]}",
        protocol=protocol,
        clean_session=None if cfg.protocol == "5" else not persistent,
        manual_ack=manual_ack,
    )
    if cfg.username is not None:
        client.username_pw_set(cfg.username, cfg.password.get_secret_value() if cfg.password else None)
    if cfg.tls is not None:
        t = cfg.tls
        try:
            client.tls_set(
                ca_certs=str(t.ca_certs) if t.ca_certs else None,
                certfile=str(t.certfile) if t.certfile else None,
                keyfile=str(t.keyfile) if t.keyfile else None,
            )
        except (OSError, ValueError) as e:
            raise ConfigError(f"{role}: tls: cannot load the certificates: {e}") from e
        client.tls_insecure_set(t.insecure)
    client.reconnect_delay_set(min_delay=cfg.reconnect_min_delay, max_delay=cfg.reconnect_max_delay)
    client.suppress_exceptions = True  # a bug in a callback must not end the network thread: log it
    client.enable_logger(logging.getLogger(f"{__name__}.paho"))
    return client


def connect(
    client: mqtt.Client,
    cfg: MqttBrokerConfig,
    *,
    receive_maximum: int | None = None,
    session_expiry: int = 0,
    loop: bool = True,
) -> None:
    """Connect in the background: paho's thread retries the first connection and every reconnect
    (``loop=False``: only set up; the caller runs the network loop).

    MQTT 5 only: ``receive_maximum`` caps the QoS 1/2 messages the broker sends unacknowledged;
    ``session_expiry`` > 0 keeps the session (clean start off) for that many seconds offline."""
    if cfg.protocol != "5":
        client.connect_async(cfg.host, cfg.port, keepalive=cfg.keepalive)
    else:
        from paho.mqtt.client import MQTT_CLEAN_START_FIRST_ONLY
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if receive_maximum is not None:
            props.ReceiveMaximum = receive_maximum
        if session_expiry:
            props.SessionExpiryInterval = session_expiry
        clean = False if session_expiry else MQTT_CLEAN_START_FIRST_ONLY
        client.connect_async(cfg.host, cfg.port, keepalive=cfg.keepalive, clean_start=clean, properties=props)
    if loop:
        client.loop_start()


class MqttSource:
    """Emits one item per well-formed message; never blocks paho's thread. QoS 1/2 messages are
    acknowledged once processed (see the module's docstring)."""

    can_wait = False

    def __init__(self, config: MqttSourceConfig) -> None:
        self.config = config
        self.name = config.name
        self.ended = threading.Event()
        self.subscribed = threading.Event()  # set on every (re)subscription, cleared on disconnect
        self.last_error: str | None = None
        self._counters = Counters(
            "received", "errors", "connects", "disconnects", "acked", "redelivered", "over_limit", "held_max"
        )
        self._client: mqtt.Client | None = None
        self._emit: Emit | None = None
        self._lock = threading.Lock()
        self._held = threading.Condition()  # guards _out and _session
        self._out = 0  # held items the flow has not acknowledged yet (this connection)
        self._session = 0  # bumped on every connect: an ack from an earlier connection is void
        self._thread: threading.Thread | None = None
        self._selecting = False  # the loop is about to block in select()
        self._closing = threading.Event()
        self._wake_r, self._wake_w = os.pipe()  # wakes the network loop's select()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    def counters(self) -> dict[str, int]:
        c = self._counters.snapshot()
        with self._held:
            c["held"] = self._out
        return c

    def start(self, emit: Emit) -> None:
        with self._lock:
            if self._client is not None or self.ended.is_set():
                raise RuntimeError(f"source {self.name}: already started")
            self._emit = emit
            cfg = self.config
            client = make_client(cfg, f"source-{self.name}", manual_ack=True, persistent=cfg.persistent_session)
            client.on_connect = self._on_connect
            client.on_disconnect = self._on_disconnect
            client.on_subscribe = self._on_subscribe
            client.on_message = self._on_message
            client.on_socket_register_write = self._on_write_wanted
            self._client = client
            expiry = self.config.session_expiry if self.config.persistent_session else 0
            connect(client, cfg, receive_maximum=cfg.receive_maximum, session_expiry=expiry, loop=False)
            self._thread = threading.Thread(target=self._loop, args=(client,), name=f"mqtt-{self.name}", daemon=True)
        log.info("source %s: connecting to %s:%s", self.name, self.config.host, self.config.port)
        self._thread.start()

    def stop(self) -> None:
        """Stop taking messages (the flow drops, unacknowledged, what still arrives: a persistent
        session gets it again), wait up to ``stop_timeout`` for the flow to acknowledge what it
        holds, then disconnect."""
        self.ended.set()
        with self._held:
            self._held.wait_for(lambda: self._out == 0, self.config.stop_timeout)
        with self._lock:
            client, self._client = self._client, None
            thread = self._thread
        self._closing.set()
        if client is not None:
            client.disconnect()  # written by the loop, which then ends
        self._wake()
        if thread is not None:
            thread.join(10.0)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1

    # -- the network loop (its own thread) -------------------------------------------------------

    def _on_write_wanted(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        """An ack queued by the flow's thread: wake the loop only if it sits in select() with
        nothing to write (otherwise it writes on its next turn, without a syscall here)."""
        if self._selecting:
            self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:  # full (a wake-up is pending anyway) or closed
            pass

    def _loop(self, client: mqtt.Client) -> None:
        """paho's loop, but the socket is read only while fewer than ``receive_maximum`` messages
        are out unacknowledged (and once every half keep-alive), so the broker keeps the rest."""
        import paho.mqtt.client as mqtt

        cfg = self.config
        delay = float(cfg.reconnect_min_delay)
        last_read = time.monotonic()
        while not self._closing.is_set() or client.want_write():
            sock = client.socket()
            if sock is None:
                if self._closing.is_set():
                    return
                try:
                    client.reconnect()
                    delay = float(cfg.reconnect_min_delay)
                    last_read = time.monotonic()
                except (OSError, ValueError) as e:
                    self.last_error = f"cannot connect to {cfg.host}:{cfg.port} ({e}); retrying in {delay:g} s"
                    log.warning("source %s: %s", self.name, self.last_error)
                    self._closing.wait(delay)
                    delay = min(delay * 2, float(cfg.reconnect_max_delay))
                continue
            with self._held:
                room = self._out < cfg.receive_maximum
            now = time.monotonic()
            read = room or now - last_read >= cfg.keepalive / 2
            pending = sock.pending() if read and hasattr(sock, "pending") else 0  # TLS: bytes already decrypted
            rlist: list[Any] = [sock, self._wake_r] if read else [self._wake_r]
            self._selecting = True  # before want_write(): an ack queued after it wakes the select
            wlist: list[Any] = [sock] if client.want_write() else []
            try:
                readable, _, _ = select.select(rlist, wlist, [], 0 if pending else min(1.0, cfg.keepalive / 4))
            except (OSError, ValueError):  # the socket closed under us
                readable = []
            self._selecting = False
            if self._wake_r in readable:
                try:
                    os.read(self._wake_r, 4096)
                except OSError:
                    pass
            rc = mqtt.MQTT_ERR_SUCCESS
            if read and (sock in readable or pending):
                last_read = time.monotonic()
                rc = client.loop_read()
            if rc == mqtt.MQTT_ERR_SUCCESS and client.want_write():
                rc = client.loop_write()
            if rc == mqtt.MQTT_ERR_SUCCESS:
                rc = client.loop_misc()
            if rc != mqtt.MQTT_ERR_SUCCESS and client.socket() is not None and not self._closing.is_set():
                log.debug("source %s: network loop: %s", self.name, mqtt.error_string(rc))

    # -- paho callbacks (paho's network thread) --------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._error(f"broker {self.config.host}:{self.config.port} refused the connection: {reason}")
            return
        with self._held:
            self._session += 1
            self._out = 0  # what the flow still holds from before is void: the broker sends it again
            self._held.notify_all()
        self._counters.inc("connects")
        topics: list[tuple[str, int]] = [(t, self.config.qos) for t in self.config.topics]
        client.subscribe(topics)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        bad = [str(r) for r in reasons if r.is_failure]
        if bad:
            self._error(f"subscription to {self.config.topics} refused: {bad}")
        else:
            self.subscribed.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.subscribed.clear()
        if not self.ended.is_set():
            self._counters.inc("disconnects")
            log.warning("source %s: disconnected from the broker (%s); reconnecting", self.name, reason)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self._counters.inc("received")
        if msg.dup:
            self._counters.inc("redelivered")
        qos, mid = msg.qos, msg.mid
        try:
            where, payload, limit = f"topic {msg.topic}", msg.payload, self.config.max_payload_bytes
            if len(payload) > limit:
                raise PayloadError(f"{where}: {len(payload)} bytes is over the limit of {limit}")
            data, meta = parse_payload_bytes(payload, where)
        except PayloadError as e:
            self._error(str(e))
            self._ack_now(client, mid, qos)  # it will not get better: do not have it sent again
            return
        except Exception as e:  # e.g. a topic that is not UTF-8
            self._error(f"message dropped: {e!r}")
            self._ack_now(client, mid, qos)
            return
        meta.update(source=self.name, received_at=time.time(), topic=msg.topic)
        emit = self._emit
        if emit is None:
            return
        if qos == 0:
            emit(Item(data, meta))
            return
        with self._held:
            session = self._session
            held = self._out < self.config.max_held
            if held:
                self._out += 1
                if self._out > self._counters.get("held_max"):
                    self._counters.inc("held_max")
        if not held:
            self._counters.inc("over_limit")

        def ack(outcome: Outcome) -> None:
            with self._held:
                if session != self._session:
                    return  # sent on an earlier connection: the broker has it again
                if held:
                    full = self._out >= self.config.receive_maximum
                    self._out -= 1
                    self._held.notify_all()
                    if full:
                        self._wake()  # the network loop may read again
            if held and outcome == "dropped":
                return  # dropped at stop: left with the broker, which sends it again
            self._ack_now(client, mid, qos)

        emit(Item(data, meta, ack=ack, held=held))

    def _ack_now(self, client: mqtt.Client, mid: int, qos: int) -> None:
        if qos > 0:
            client.ack(mid, qos)
            self._counters.inc("acked")

    def _error(self, msg: str) -> None:
        self._counters.inc("errors")
        self.last_error = msg
        log.warning("source %s: %s", self.name, msg)
