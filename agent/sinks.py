"""Where a flow's results go: standard output, a JSON-lines file, an MQTT topic.

Every sink takes one JSON-ready result dict per :meth:`Sink.send`, never raises for a result it
cannot deliver (it counts it), and is closed once. Results are written as one line of compact JSON;
NaN and infinities, which JSON cannot hold, become ``null``.

The MQTT sink keeps results it cannot publish while the broker is unreachable in a small bounded
in-memory buffer (``buffer`` results, oldest dropped first and counted), and publishes them in
order once connected again. Whatever is still buffered at close is counted as dropped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import string
import sys
import threading
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol, TextIO, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, field_validator

from edgefleet.agent.sources.base import Counters
from edgefleet.agent.sources.mqtt import MqttBrokerConfig, connect, make_client
from edgefleet.errors import ConfigError

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

__all__ = [
    "JsonlSink",
    "JsonlSinkConfig",
    "MqttSink",
    "MqttSinkConfig",
    "Sink",
    "SinkConfig",
    "StdoutSink",
    "StdoutSinkConfig",
    "build_sink",
    "to_json",
]

log = logging.getLogger(__name__)


class Sink(Protocol):
    name: str

    def send(self, result: dict[str, Any]) -> None:
        """Deliver one result, or count it as dropped; never raises for a delivery problem."""

    def close(self) -> None:
        """Flush and release; idempotent."""

    def counters(self) -> dict[str, int]:
        """sent, dropped, errors (and sink-specific ones)."""
        ...


def _finite(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def to_json(result: dict[str, Any]) -> str:
    """Compact JSON, one line; non-finite floats become null, unknown objects their ``str``."""
    try:
        return json.dumps(result, separators=(",", ":"), allow_nan=False, default=str)
    except ValueError:
        return json.dumps(_finite(result), separators=(",", ":"), allow_nan=False, default=str)


class _SinkBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, description="name in counters and logs; default: the type")


class StdoutSinkConfig(_SinkBase):
    """Print each result as one JSON line on standard output."""

    type: Literal["stdout"]


class JsonlSinkConfig(_SinkBase):
    """Append each result as one JSON line to a file."""

    type: Literal["jsonl"]
    path: Path = Field(description="the file to append to (its folder is created)")
    fsync_every: int = Field(default=0, ge=0, le=1_000_000, description="fsync after this many lines; 0: never")


class MqttSinkConfig(MqttBrokerConfig, _SinkBase):
    """Publish each result on an MQTT topic."""

    type: Literal["mqtt"]
    topic: str = Field(
        default="edgefleet/v1/{device_id}/predictions/{model}",
        min_length=1,
        description="topic template; may use {device_id} and {model}",
    )
    qos: Literal[0, 1, 2] = Field(default=1, description="publish QoS")
    retain: bool = Field(default=False, description="publish retained messages")
    buffer: int = Field(default=100, ge=0, le=100_000, description="results kept while disconnected; 0: drop at once")

    @field_validator("topic")
    @classmethod
    def _template(cls, v: str) -> str:
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(v) if f is not None}
        except ValueError as e:
            raise ValueError(f"not a valid template: {e}") from e
        unknown = sorted(fields - {"device_id", "model"})
        if unknown:
            raise ValueError(f"unknown placeholder(s) {unknown}; use {{device_id}} and {{model}}")
        if "+" in v or "#" in v:
            raise ValueError("a topic to publish on cannot hold the wildcards + or #")
        return v


SinkConfig: TypeAlias = Annotated[StdoutSinkConfig | JsonlSinkConfig | MqttSinkConfig, Field(discriminator="type")]


class StdoutSink:
    """One JSON line per result on ``stream`` (default: the current ``sys.stdout``)."""

    def __init__(self, config: StdoutSinkConfig, stream: TextIO | None = None) -> None:
        self.name = config.name or config.type
        self._stream = stream
        self._lock = threading.Lock()
        self._counters = Counters("sent", "dropped", "errors")

    def send(self, result: dict[str, Any]) -> None:
        line = to_json(result) + "\n"
        try:
            with self._lock:
                stream = self._stream if self._stream is not None else sys.stdout
                stream.write(line)
                stream.flush()
        except (OSError, ValueError) as e:  # closed or broken pipe
            self._counters.inc("errors")
            self._counters.inc("dropped")
            log.warning("sink %s: cannot write to stdout: %s", self.name, e)
            return
        self._counters.inc("sent")

    def close(self) -> None:
        pass

    def counters(self) -> dict[str, int]:
        return self._counters.snapshot()


class JsonlSink:
    """Appends one line per result, flushed at once; each line is one ``write`` of a whole line.

    A crash can leave at most the last line partial; on open, a partial last line is ended with a
    newline, so earlier lines and the lines written from then on stay readable.
    """

    def __init__(self, config: JsonlSinkConfig) -> None:
        self.name = config.name or config.type
        self.config = config
        self._lock = threading.Lock()
        self._counters = Counters("sent", "dropped", "errors")
        self._since_sync = 0
        path = config.path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._f: Any = open(path, "ab")  # noqa: SIM115  # closed in close()
            if self._f.tell() > 0:
                with open(path, "rb") as r:
                    r.seek(-1, os.SEEK_END)
                    if r.read(1) != b"\n":
                        self._f.write(b"\n")
                        self._f.flush()
        except OSError as e:
            raise ConfigError(f"sink {self.name}: path: cannot append to {path}: {e.strerror or e}") from e

    def send(self, result: dict[str, Any]) -> None:
        data = (to_json(result) + "\n").encode()
        with self._lock:
            if self._f.closed:
                self._counters.inc("dropped")
                return
            try:
                self._f.write(data)
                self._f.flush()
                self._since_sync += 1
                if self.config.fsync_every and self._since_sync >= self.config.fsync_every:
                    os.fsync(self._f.fileno())
                    self._since_sync = 0
            except OSError as e:
                self._counters.inc("errors")
                self._counters.inc("dropped")
                log.warning("sink %s: cannot write %s: %s", self.name, self.config.path, e.strerror or e)
                return
        self._counters.inc("sent")

    def close(self) -> None:
        with self._lock:
            if self._f.closed:
                return
            try:
                self._f.flush()
                if self.config.fsync_every:
                    os.fsync(self._f.fileno())
            except OSError as e:
                log.warning("sink %s: cannot flush %s: %s", self.name, self.config.path, e.strerror or e)
            finally:
                self._f.close()

    def counters(self) -> dict[str, int]:
        return self._counters.snapshot()


class MqttSink:
    """Publishes each result on the topic made from the template; buffers while disconnected."""

    close_timeout = 5.0  # seconds close() waits for the broker to take the last result

    def __init__(self, config: MqttSinkConfig, device_id: str = "") -> None:
        self.name = config.name or config.type
        self.config = config
        if "{device_id}" in config.topic and not device_id:
            raise ConfigError(f"sink {self.name}: topic {config.topic!r} uses {{device_id}} but no device id is set")
        self.device_id = device_id
        self.connected = threading.Event()
        self._lock = threading.Lock()
        self._buffer: deque[tuple[str, bytes]] = deque()
        self._counters = Counters("sent", "dropped", "errors", "published", "connects")
        self._closed = False
        self._last: mqtt.MQTTMessageInfo | None = None
        self._client: mqtt.Client = make_client(config, f"sink-{self.name}")
        # paho's own queue (QoS 1/2 messages awaiting their ack, or sent while the link broke):
        # bounded too; past it, results come back to our buffer.
        self._client.max_queued_messages_set(config.buffer + 20)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        connect(self._client, config)

    def topic_for(self, result: dict[str, Any]) -> str:
        model = str(result.get("model") or "unknown")
        for ch in "/+#":
            model = model.replace(ch, "_")
        return self.config.topic.format(device_id=self.device_id, model=model)

    def send(self, result: dict[str, Any]) -> None:
        item = (self.topic_for(result), to_json(result).encode())
        with self._lock:
            if self._closed:
                self._counters.inc("dropped")
                return
            self._drain()
            if not self._buffer and self.connected.is_set() and self._publish(*item):
                return
            self._keep(item)

    def _keep(self, item: tuple[str, bytes]) -> None:
        """Buffer a result (lock held); the oldest goes when the buffer is full."""
        if self.config.buffer == 0:
            self._counters.inc("dropped")
            return
        if len(self._buffer) >= self.config.buffer:
            self._buffer.popleft()
            self._counters.inc("dropped")
        self._buffer.append(item)

    def _publish(self, topic: str, payload: bytes) -> bool:
        """Hand one message to paho (lock held); false when it should be kept for later."""
        import paho.mqtt.client as mqtt

        try:
            info = self._client.publish(topic, payload, qos=self.config.qos, retain=self.config.retain)
        except (ValueError, OSError) as e:
            self._counters.inc("errors")
            self._counters.inc("dropped")
            log.warning("sink %s: cannot publish on %s: %s", self.name, topic, e)
            return True  # not worth keeping: it would fail again
        rc = info.rc
        if rc == mqtt.MQTT_ERR_SUCCESS or (rc == mqtt.MQTT_ERR_NO_CONN and self.config.qos > 0):
            self._last = info
            self._counters.inc("sent")  # with QoS 1/2 paho keeps it and sends it on reconnect
            return True
        if rc in (mqtt.MQTT_ERR_NO_CONN, mqtt.MQTT_ERR_QUEUE_SIZE):
            return False
        self._counters.inc("errors")
        self._counters.inc("dropped")
        log.warning("sink %s: cannot publish on %s: %s", self.name, topic, mqtt.error_string(rc))
        return True

    def _drain(self) -> None:
        """Publish buffered results in order while connected (lock held)."""
        while self._buffer and self.connected.is_set():
            if not self._publish(*self._buffer[0]):
                break
            self._buffer.popleft()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            left = len(self._buffer)
            self._buffer.clear()
        if left:
            self._counters.inc("dropped", left)
            log.warning("sink %s: %d buffered result(s) dropped at close (broker unreachable)", self.name, left)
        last = self._last
        if last is not None and self.connected.is_set():
            try:  # messages go out in order: once the last is out, so are the others
                last.wait_for_publish(timeout=self.close_timeout)
            except (RuntimeError, ValueError):
                pass
        self._client.disconnect()
        self._client.loop_stop()

    def counters(self) -> dict[str, int]:
        c = self._counters.snapshot()
        with self._lock:
            c["buffered"] = len(self._buffer)
        return c

    # -- paho callbacks (paho's network thread) --------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._counters.inc("errors")
            log.warning("sink %s: broker refused the connection: %s", self.name, reason)
            return
        self._counters.inc("connects")
        self.connected.set()
        with self._lock:
            self._drain()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.connected.clear()
        if not self._closed:
            log.warning("sink %s: disconnected from the broker (%s); buffering", self.name, reason)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        self._counters.inc("published")  # acknowledged by the broker (QoS 1/2) or written (QoS 0)


def build_sink(cfg: StdoutSinkConfig | JsonlSinkConfig | MqttSinkConfig, device_id: str = "") -> Sink:
    """The sink ``cfg`` describes, ready to send. Raises :class:`ConfigError`."""
    match cfg:
        case StdoutSinkConfig():
            return StdoutSink(cfg)
        case JsonlSinkConfig():
            return JsonlSink(cfg)
        case MqttSinkConfig():
            return MqttSink(cfg, device_id)
    raise TypeError(f"not a sink config: {type(cfg).__name__}")
