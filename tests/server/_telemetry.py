"""Helpers for the telemetry ingestion tests: a Mosquitto of the test's own on a free port (so other
tests' traffic on the shared broker never reaches these ingesters), a fleet server app with ingestion
on (in-process, its lifespan running the ingester), devices, a QoS 1 publisher, and payload builders
that follow the issue-11 contract."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from _support import free_port, wait_until
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import func, select, text

warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`")
from fastapi.testclient import TestClient  # noqa: E402

from edgefleet.server.app import create_app  # noqa: E402
from edgefleet.server.db import make_engine  # noqa: E402
from edgefleet.server.models import Device, TelemetryMessage, utcnow  # noqa: E402
from edgefleet.server.settings import Settings  # noqa: E402
from edgefleet.server.state import ServerState, init_server, open_state  # noqa: E402
from edgefleet.server.telemetry.ingest import Ingester  # noqa: E402
from edgefleet.server.telemetry.payloads import BOUNDS  # noqa: E402

TELEMETRY_TABLES = ("telemetry_class_rollups", "telemetry_device_rollups", "telemetry_rollups", "telemetry_streams",
                    "telemetry_messages")


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: not skipping)")
    pytest.skip(reason)


def _reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


class Broker:
    """``mosquitto -c`` on a free loopback port, anonymous, no persistence, a deep queue per session (so
    a burst waits in the broker for a slow or dead subscriber instead of being dropped at 1000)."""

    def __init__(self, exe: str, folder: Path) -> None:
        self.exe, self.port = exe, free_port()
        self.conf = folder / f"mosquitto-{self.port}.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                             "max_queued_messages 1000000\nmax_inflight_messages 0\n")
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        if not wait_until(lambda: _reachable(self.port) or self.proc.poll() is not None, 10) or self.proc.poll():
            raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
    if exe is None:
        _unavailable("the mosquitto binary is not installed")
    b = Broker(str(exe), tmp_path)
    yield b
    b.stop()


class Publisher:
    """A plain paho MQTT 5 client; ``send`` returns once the broker holds every QoS 1 message."""

    def __init__(self, port: int) -> None:
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id=f"pub-{secrets.token_hex(4)}", protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def send(self, messages: list[tuple[str, bytes | str]], qos: int = 1) -> None:
        infos = [self.client.publish(topic, payload, qos=qos) for topic, payload in messages]
        for info in infos:
            info.wait_for_publish(60)
            assert info.is_published()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextmanager
def publisher(port: int) -> Iterator[Publisher]:
    p = Publisher(port)
    try:
        yield p
    finally:
        p.close()


def telemetry_topic(device: str) -> str:
    return f"edgefleet/v1/{device}/telemetry"


def events_topic(device: str) -> str:
    return f"edgefleet/v1/{device}/events"


def stamp(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def model_figures(name: str = "digits", version: str = "2.0.0", latencies: list[float] | None = None,
                  errors: int = 0, classes: dict[str, int] | None = None, drift: dict[str, Any] | None = None,
                  accuracy: dict[str, Any] | None = None) -> dict[str, Any]:
    """One model's block, its histogram made from ``latencies`` as the agent bins them
    (counts[i]: > BOUNDS[i-1] and <= BOUNDS[i], bisect_left)."""
    import bisect

    lat = latencies if latencies is not None else [0.003, 0.004, 0.02]
    counts = [0] * (len(BOUNDS) + 1)
    for x in lat:
        counts[bisect.bisect_left(BOUNDS, x)] += 1
    return {"name": name, "version": version, "inferences": len(lat), "errors": errors,
            "latency": {"counts": counts, "sum_s": float(sum(lat)), "p50_s": None, "p95_s": None, "p99_s": None},
            "drift": drift, "classes": classes or {}, "accuracy": accuracy}


def telemetry(device: str, seq: int, epoch: str = "0123456789abcdef", at: datetime | None = None,
              models: list[dict[str, Any]] | None = None, **device_figures: Any) -> dict[str, Any]:
    return {"schema": 1, "device_id": device, "at": stamp(at or datetime.now(UTC)), "epoch": epoch, "seq": seq,
            "interval_s": 60.0, "models": [model_figures()] if models is None else models,
            "device": {"cpu_percent": 5.0, "memory_rss_bytes": 50 << 20, "memory_percent": 1.5,
                       "temperature_c": None, "disk_free_bytes": 1 << 30, "uptime_s": 100.0, "queue_depth": 0,
                       "dropped": 0, "agent_version": "0.9.0", **device_figures}}


def event(device: str, seq: int, kind: str = "update.committed", epoch: str = "0123456789abcdef",
          **fields: Any) -> dict[str, Any]:
    return {"schema": 1, "device_id": device, "at": stamp(datetime.now(UTC)), "epoch": epoch, "seq": seq,
            "kind": kind, "model": "digits", "version": "2.0.0", **fields}


@dataclass
class Ingesting:
    """An in-process server with ingestion on: its TestClient, state, admin token and ingester."""

    client: TestClient
    state: ServerState
    settings: Settings
    admin: str

    @property
    def ingester(self) -> Ingester:
        ing = self.client.app.state.telemetry  # type: ignore[attr-defined]
        assert isinstance(ing, Ingester)
        return ing

    @property
    def admin_h(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin}"}

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.state.metrics.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value

    def rejected(self, reason: str) -> float:
        return self.sample("edgefleet_telemetry_rejected_total", {"reason": reason})

    def stored(self) -> int:
        with self.state.sessions() as s:
            return int(s.scalar(select(func.count()).select_from(TelemetryMessage)) or 0)

    def add_devices(self, *ids: str) -> None:
        add_devices(self.state, *ids)


def add_devices(state: ServerState, *ids: str) -> None:
    """Enrolled devices, as rows (what enrollment leaves in the table; these tests never authenticate)."""
    now = utcnow()
    with state.sessions.begin() as s:
        for i in ids:
            s.add(Device(id=i, tags=[], cert_serial=secrets.token_hex(8), cert_pem="", enrolled_at=now,
                         cert_not_after=now + timedelta(days=365), desired_etag="none", running=[]))


def clean_telemetry(db_url: str) -> None:
    engine = make_engine(db_url)
    with engine.begin() as c:
        for t in TELEMETRY_TABLES:
            c.execute(text(f"DELETE FROM {t}"))
    engine.dispose()


def ingest_settings(db_url: str, data_dir: Path, broker_url: str, **extra: Any) -> Settings:
    extra.setdefault("mqtt_client_id", f"test-ingest-{secrets.token_hex(4)}")
    return Settings(data_dir=data_dir, db_url=db_url, allow_plain_http_devices=True, migrate_on_start=False,
                    mqtt_url=broker_url, **extra)


@contextmanager
def ingesting(settings: Settings, admin: str | None = None) -> Iterator[Ingesting]:
    """The app with its lifespan (the ingester) running, subscribed. ``admin``: a token of a server
    already initialised in ``settings.data_dir`` (else it is initialised here)."""
    if admin is None:
        clean_telemetry(settings.database_url())
        admin = init_server(settings)
    state = open_state(settings, run_migrations=False)
    try:
        with TestClient(create_app(settings, state), base_url="http://testserver") as client:
            ing = Ingesting(client, state, settings, admin)
            assert ing.ingester.wait_subscribed(15), "the ingester did not subscribe"
            yield ing
    finally:
        state.loop_db.close()
        state.engine.dispose()


def dumps(payload: Any) -> str:
    return json.dumps(payload)
