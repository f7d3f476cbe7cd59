"""The telemetry tests' harness: a real Mosquitto of the test's own on a free port (stopped and
started again at will, optionally persistent, with TLS or ACL lines), a paho subscriber recording
every message, and the driver process (``_driver.py``) that runs an Outbox and a Publisher.

Import as ``from telemetry._mqtt import ...`` (``tests/`` is on the path)."""

from __future__ import annotations

import getpass
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from _support import free_port, wait_until
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

__all__ = ["DRIVER", "Broker", "Driver", "Received", "Subscriber", "mosquitto_binary"]

DRIVER = Path(__file__).resolve().parent / "_driver.py"


def mosquitto_binary() -> str:
    """The ``mosquitto`` executable; a test without it skips, or fails under ``CI=true``."""
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the mosquitto binary is not installed (CI=true: not skipping)")
        pytest.skip("the mosquitto binary is not installed")
    return exe


def _reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


class Broker:
    """``mosquitto -c`` on a free port of 127.0.0.1. ``persistent``: the broker keeps sessions and
    queued messages across a (clean) stop and start; ``lines``: more configuration lines (TLS, ACLs)."""

    def __init__(self, exe: str, folder: Path, *, persistent: bool = False, lines: tuple[str, ...] = ()) -> None:
        self.exe, self.folder, self.port = exe, folder, free_port()
        folder.mkdir(parents=True, exist_ok=True)
        conf = [f"listener {self.port} 127.0.0.1"]
        if not any(line.startswith(("allow_anonymous", "require_certificate")) for line in lines):
            conf.append("allow_anonymous true")
        conf += list(lines)
        # As root, Mosquitto would drop to the user "mosquitto", who cannot write its persistence file here.
        conf += [f"user {getpass.getuser()}", "max_queued_messages 0", "log_type error", "log_type warning",
                 "log_type notice"]
        if persistent:
            conf += ["persistence true", f"persistence_location {folder}/", "autosave_interval 1"]
        else:
            conf.append("persistence false")
        self.conf = folder / f"mosquitto-{self.port}.conf"
        self.conf.write_text("\n".join(conf) + "\n")
        self.log = folder / f"mosquitto-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        assert self.proc is None
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)], stdout=log, stderr=log)
        ok = wait_until(lambda: _reachable(self.port) or self.proc is None or self.proc.poll() is not None, 10)
        if not ok or self.proc.poll() is not None:
            raise RuntimeError(f"mosquitto did not start: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        """A clean stop (SIGTERM): a persistent broker saves its sessions and queues first."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(20)
            self.proc = None


@dataclass
class Received:
    topic: str
    body: dict[str, Any]
    retain: bool
    dup: bool
    connection: int  # the subscriber's connection it came on (1, 2, ...)


@dataclass
class Subscriber:
    """A paho client (MQTT 5, QoS 1) recording every message on ``topic``. ``persistent``: a kept
    session (clean start only the first time, session expiry of an hour), so what arrives at the
    broker while the subscriber is cut off is kept and delivered when it is back."""

    port: int
    topic: str = "edgefleet/v1/#"
    persistent: bool = False
    client_id: str = field(default_factory=lambda: f"sub-{uuid.uuid4().hex[:10]}")
    messages: list[Received] = field(default_factory=list)
    connections: int = 0

    def __post_init__(self) -> None:
        self.subscribed = threading.Event()
        self.arrived = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if self.persistent:
            props.SessionExpiryInterval = 3600
        # clean_start false from the first connect (a fresh client id has no session anyway): with a clean
        # first start, Mosquitto 2.0.11 did not restore the session after a restart.
        self.client.connect_async("127.0.0.1", self.port, keepalive=10, clean_start=not self.persistent,
                                  properties=props)
        self.client.loop_start()
        assert self.subscribed.wait(10), "the subscriber did not subscribe"

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.connections += 1
        if not flags.session_present:
            client.subscribe(self.topic, qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, m: mqtt.MQTTMessage) -> None:
        body = json.loads(m.payload)
        with self.arrived:
            self.messages.append(Received(m.topic, body, bool(m.retain), bool(m.dup), self.connections))
            self.arrived.notify_all()

    def wait_for(self, cond: Callable[[list[Received]], bool], timeout: float = 30.0) -> bool:
        """Wait until ``cond(messages)`` holds (checked on every arrival)."""
        with self.arrived:
            return self.arrived.wait_for(lambda: cond(self.messages), timeout)

    def seqs(self) -> list[int]:
        with self.arrived:
            return [m.body["seq"] for m in self.messages if m.topic.endswith(("/telemetry", "/events"))]

    def on(self, suffix: str) -> list[Received]:
        with self.arrived:
            return [m for m in self.messages if m.topic.endswith(suffix)]

    def publish(self, topic: str, payload: bytes | str, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Driver:
    """``_driver.py`` in its own process; its stdout lines are collected (``put N``, ``drained``...)."""

    def __init__(self, *args: str) -> None:
        self.args = args
        self.lines: queue.Queue[str] = queue.Queue()
        self.last_put = 0
        self.seen: list[str] = []
        self.ended = False  # its stdout closed (it exited or was killed)
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            [sys.executable, str(DRIVER), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._stderr: list[str] = []
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.strip()
            with self._cond:
                self.seen.append(line)
                if line.startswith("put "):
                    self.last_put = int(line.split()[1])
                self._cond.notify_all()
        with self._cond:
            self.ended = True
            self._cond.notify_all()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line)
            del self._stderr[:-200]

    def stderr(self) -> str:
        return "".join(self._stderr)

    def wait_line(self, cond: Callable[[Driver], bool], timeout: float = 60.0) -> bool:
        """Wait until ``cond(self)`` holds after some line (false: timed out, or the driver ended first)."""
        with self._cond:
            self._cond.wait_for(lambda: cond(self) or self.ended, timeout)
            return cond(self)

    def has(self, prefix: str) -> bool:
        return any(line.startswith(prefix) for line in self.seen)

    def line(self, prefix: str) -> str:
        return next(line for line in self.seen if line.startswith(prefix))

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def wait(self, timeout: float = 60.0) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(5)
        return rc
