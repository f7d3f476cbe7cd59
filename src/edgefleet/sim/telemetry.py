"""The simulator's MQTT side: telemetry out, ``cmd`` in (paho-mqtt 2 API, MQTT 5, QoS 1).

Two ways to reach the broker, chosen by the URL:

- ``mqtt://HOST[:PORT]`` (an open broker: tests, benchmarks): :class:`SharedLink`, a few connections
  (``connections``, default 4) publishing for every device, device ``i`` on connection ``i %
  connections``; connection 0 subscribes to ``edgefleet/v1/+/cmd`` and hands each check-in request to
  ``on_cmd(device_id)``. A handful of sockets and threads for any number of devices.
- ``mqtts://HOST[:PORT]`` (a broker that demands client certificates, as ``deploy/mosquitto`` does:
  the certificate's CN is the user name and the ACL lets a device publish under its own id only):
  :class:`DeviceLinks`, one TLS connection per device with its enrolled certificate and key, the
  fleet CA from its identity (client id = device id, as the broker forces). One paho network thread
  per device: fine for a few hundred devices, not for thousands.

Messages are published QoS 1 without waiting; paho queues what is published while a connection is
down and sends it after the reconnect (the server deduplicates by ``(device_id, epoch, seq)``).
"""

from __future__ import annotations

import logging
import secrets
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from edgefleet.errors import ConfigError

__all__ = ["DeviceLinks", "Link", "SharedLink", "make_link", "parse_broker"]

log = logging.getLogger(__name__)

CMD_TOPIC = "edgefleet/v1/+/cmd"
OnCmd = Callable[[str], None]


def parse_broker(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of ``mqtt://HOST[:PORT]`` or ``mqtts://HOST[:PORT]``. Raises ConfigError."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ConfigError(f"--broker: {url[:100]!r} is not mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
    try:
        port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
    except ValueError as e:
        raise ConfigError(f"--broker: {url[:100]!r}: {e}") from e
    return parts.scheme, parts.hostname, port


def _client(client_id: str) -> Any:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(100)
    c.max_queued_messages_set(0)  # unbounded while disconnected (a simulation run is short)
    c.reconnect_delay_set(1, 10)
    return c


class Link(Protocol):
    def add(self, device_id: str, identity: Path | None) -> None: ...
    def publish(self, device_id: str, topic: str, payload: bytes) -> None: ...
    def counters(self) -> dict[str, int]: ...
    def close(self) -> None: ...


class _Counted:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.published = 0
        self.acked = 0
        self.cmds = 0

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        with self._lock:
            self.acked += 1

    def counters(self) -> dict[str, int]:
        return {"published": self.published, "acked": self.acked, "cmds": self.cmds}

    def _cmd(self, on_cmd: OnCmd | None, msg: Any, expect: str | None = None) -> None:
        from edgefleet.agent.telemetry.publisher import parse_cmd

        parts = msg.topic.split("/")
        if on_cmd is None or len(parts) != 4 or (expect is not None and parts[2] != expect):
            return
        try:
            parse_cmd(msg.payload, parts[2])
        except ValueError as e:
            log.info("cmd for %s ignored: %s", parts[2], e)
            return
        self.cmds += 1
        on_cmd(parts[2])


class SharedLink(_Counted):
    """A few connections to an open broker, publishing for every device (see the module docstring)."""

    def __init__(self, host: str, port: int, connections: int = 4, on_cmd: OnCmd | None = None,
                 connect_timeout: float = 10.0) -> None:
        super().__init__()
        self.on_cmd = on_cmd
        tag = secrets.token_hex(3)
        self.clients = [_client(f"efsim-{tag}-{i}") for i in range(max(1, connections))]
        first = self.clients[0]
        first.on_connect = self._on_connect
        first.on_message = lambda c, u, msg: self._cmd(self.on_cmd, msg)
        ready = threading.Event()
        self._ready = ready
        for c in self.clients:
            c.on_publish = self._on_publish
            try:
                c.connect(host, port, keepalive=60)
            except OSError as e:
                self.close()
                raise ConfigError(f"--broker: cannot connect to mqtt://{host}:{port}: {e}") from e
            c.loop_start()
        if not ready.wait(connect_timeout):
            log.warning("mqtt://%s:%d: no CONNACK in %g s; messages are queued until it connects", host, port,
                        connect_timeout)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not reason.is_failure:
            client.subscribe(CMD_TOPIC, qos=1)
            self._ready.set()

    def add(self, device_id: str, identity: Path | None) -> None:
        return None

    def publish(self, device_id: str, topic: str, payload: bytes) -> None:
        c = self.clients[hash(device_id) % len(self.clients)]
        c.publish(topic, payload, qos=1)
        with self._lock:
            self.published += 1

    def close(self) -> None:
        for c in self.clients:
            try:
                c.disconnect()
                c.loop_stop()
            except Exception as e:  # closing must not fail the run
                log.debug("mqtt close: %s", e)


class DeviceLinks(_Counted):
    """One TLS connection per device with its own certificate (see the module docstring)."""

    def __init__(self, host: str, port: int, on_cmd: OnCmd | None = None) -> None:
        super().__init__()
        self.host, self.port, self.on_cmd = host, port, on_cmd
        self.clients: dict[str, Any] = {}

    def add(self, device_id: str, identity: Path | None) -> None:
        if identity is None:
            raise ConfigError("--broker mqtts://: a device connects with its enrolled certificate; none given")
        c = _client(device_id)
        ctx = ssl.create_default_context(cafile=str(identity / "ca.crt"))
        ctx.load_cert_chain(str(identity / "device.crt"), str(identity / "device.key"))
        c.tls_set_context(ctx)
        topic = f"edgefleet/v1/{device_id}/cmd"
        c.on_connect = lambda cl, u, f, reason, p: None if reason.is_failure else cl.subscribe(topic, qos=1)
        c.on_message = lambda cl, u, msg: self._cmd(self.on_cmd, msg, device_id)
        c.on_publish = self._on_publish
        c.connect_async(self.host, self.port, keepalive=60)
        c.loop_start()
        self.clients[device_id] = c

    def publish(self, device_id: str, topic: str, payload: bytes) -> None:
        self.clients[device_id].publish(topic, payload, qos=1)
        with self._lock:
            self.published += 1

    def close(self) -> None:
        for c in self.clients.values():
            try:
                c.disconnect()
                c.loop_stop()
            except Exception as e:
                log.debug("mqtt close: %s", e)


def make_link(url: str, on_cmd: OnCmd | None = None, connections: int = 4) -> SharedLink | DeviceLinks:
    scheme, host, port = parse_broker(url)
    if scheme == "mqtts":
        return DeviceLinks(host, port, on_cmd)
    return SharedLink(host, port, connections, on_cmd)
