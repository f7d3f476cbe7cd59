"""A real fleet server ingesting telemetry from a test's own Mosquitto, for the end-to-end telemetry
tests: :class:`IngestingServer` is the updater harness's :class:`~updater._fleet.Fleet` (``edgefleet
server init`` + ``server run`` on SQLite in its data folder, the operator's keyring, enrollment through
the CLI) started with ``EDGEFLEET_SERVER_MQTT_URL`` pointing at the broker, and what a test reads back:

* :meth:`IngestingServer.streams` - the device's streams as the API serves them
  (``GET /api/v1/devices/{id}/telemetry``: contiguous_seq, max_seq, received, missing, gaps);
* :meth:`IngestingServer.stored` - what the database holds for the device, read directly with
  ``sqlite3`` (read-only) from the server's data folder: every stored seq with how often it is there,
  the epochs, the events stored with a seq; so "each seq exactly once" is checked on the rows
  themselves, not on the server's own summary of them;
* :meth:`IngestingServer.metric` - a sample of the server's ``/metrics`` (duplicates seen, pending).

The server's MQTT client id is fixed per instance (so a restarted or SIGKILLed server resumes its
session in the broker) and its reconnect back-off is capped at 1 s (a broker restart in a test is
followed within a second or two). Import as ``from telemetry._server import IngestingServer``.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from updater._fleet import Fleet

__all__ = ["IngestingServer", "Stored"]


@dataclass(frozen=True)
class Stored:
    """A device's rows in the server's database: ``seqs`` counts each stored ``seq`` of
    ``telemetry_messages`` (over all its epochs), ``epochs`` the distinct epochs there, ``event_seqs``
    counts each seq of ``device_events`` rows that have one."""

    seqs: Counter[int]
    epochs: set[str]
    event_seqs: Counter[int]

    @property
    def rows(self) -> int:
        return sum(self.seqs.values())

    def repeated(self) -> list[int]:
        """Seqs stored more than once (must be none)."""
        return sorted(s for s, n in self.seqs.items() if n > 1)

    def missing(self, total: int) -> list[int]:
        """Seqs 1..``total`` not stored."""
        return [s for s in range(1, total + 1) if s not in self.seqs]


class IngestingServer:
    """A started fleet server with telemetry ingestion from ``mqtt://127.0.0.1:{broker_port}`` (a
    plain subscription unless ``shared``), under ``root``. :meth:`close` stops it, pass or fail."""

    def __init__(self, root: Path, broker_port: int, shared: bool = True, env: dict[str, str] | None = None) -> None:
        self.client_id = f"ef-test-ingest-{uuid.uuid4().hex[:8]}"
        self.fleet = Fleet(root, server_env={
            "EDGEFLEET_SERVER_MQTT_URL": f"mqtt://127.0.0.1:{broker_port}",
            "EDGEFLEET_SERVER_MQTT_CLIENT_ID": self.client_id,
            "EDGEFLEET_SERVER_MQTT_RECONNECT_MAX": "1",
            "EDGEFLEET_SERVER_MQTT_KEEPALIVE": "5",
            "EDGEFLEET_SERVER_MQTT_SHARED_SUBSCRIPTION": "true" if shared else "false",
            **(env or {}),
        })
        self.root = root
        self._devices = 0

    def start(self) -> IngestingServer:
        """``server init``, ``server run``, ``keys init``; returns once the server answers ``/healthz``
        (the ingester connects in the background: see :meth:`wait_subscribed`)."""
        self.fleet.start()
        return self

    def close(self) -> None:
        self.fleet.close()

    @property
    def db(self) -> Path:
        return self.fleet.server.data / "edgefleet.db"

    @property
    def log(self) -> Path:
        return self.fleet.server.log

    def enroll(self) -> str:
        """Enroll a new device through the CLI (the ingester drops messages of unknown devices); its id."""
        self._devices += 1
        return self.fleet.enroll(self.root / "devices" / f"d{self._devices}" / "state")

    def kill(self) -> None:
        """SIGKILL the server process (a crash: no batch flushed, nothing acknowledged)."""
        self.fleet.server.kill()

    def restart(self) -> None:
        """Start the server again on the same data folder and client id (after :meth:`kill`)."""
        self.fleet.server.start()

    # ------------------------------------------------------------------ reading back

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """The value of ``name{labels}`` in ``/metrics`` (None when absent or the server is down)."""
        try:
            text = self.fleet.http.get("/metrics", timeout=5).text
        except httpx.HTTPError:  # the server is down or restarting: no figure
            return None
        for line in text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            key, _, value = line.rpartition(" ")
            got, _, block = key.partition("{")
            if got == name and _labels(block.rstrip("}")) == (labels or {}):
                return float(value)
        return None

    def wait_subscribed(self, timeout: float = 60.0) -> None:
        """Wait until the ingester is connected to the broker (``edgefleet_mqtt_connected`` 1)."""
        self.fleet.wait_for(lambda: self.metric("edgefleet_mqtt_connected") == 1, timeout,
                            "the server's ingester connected to the broker")

    def streams(self, device_id: str) -> list[dict[str, Any]]:
        """The device's streams, newest epoch first, from ``GET /api/v1/devices/{id}/telemetry``."""
        r = self.fleet.http.get(f"/api/v1/devices/{device_id}/telemetry", params={"since": "3600", "step": "3600"})
        assert r.status_code == 200, f"telemetry of {device_id}: {r.status_code}: {r.text[:500]}"
        out: list[dict[str, Any]] = r.json()["streams"]
        return out

    @contextmanager
    def writes_held(self) -> Iterator[None]:
        """Hold SQLite's write lock (``BEGIN IMMEDIATE`` on a connection of the test's own) for the
        block: the server's ingester receives but cannot commit, so it acknowledges nothing (it retries
        the batch with back-off and commits once the block ends). Reads go on meanwhile (WAL)."""
        con = sqlite3.connect(self.db, timeout=30, isolation_level=None)
        try:
            con.execute("BEGIN IMMEDIATE")
            yield
        finally:
            con.rollback()
            con.close()

    def stored(self, device_id: str) -> Stored:
        """The device's rows, read with sqlite3 (read-only) from the server's database."""
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30)
        try:
            seqs = Counter(s for (s,) in con.execute(
                "SELECT seq FROM telemetry_messages WHERE device_id = ?", (device_id,)))
            epochs = {e for (e,) in con.execute(
                "SELECT DISTINCT epoch FROM telemetry_messages WHERE device_id = ?", (device_id,))}
            events = Counter(s for (s,) in con.execute(
                "SELECT seq FROM device_events WHERE device_id = ? AND seq IS NOT NULL", (device_id,)))
        finally:
            con.close()
        return Stored(seqs, epochs, events)


def _labels(inner: str) -> dict[str, str]:
    """``a="1",b="2"`` -> ``{"a": "1", "b": "2"}`` (the label values read here hold no commas or quotes)."""
    return {k: v.strip('"') for k, v in (part.split("=", 1) for part in inner.split(",") if part)}
