"""Telemetry benchmarks (issue 11): a Mosquitto the script starts on a free port, the agent's real
``Outbox`` and ``Publisher`` (``agent/telemetry/queue.py``, ``publisher.py``), real ``edgefleet server run``
and ``edgefleet agent run`` processes (the harness of ``tests/updater/_fleet.py``). Sections:

``--publish``  store-and-forward publish throughput: messages/s until every message is PUBACKed (and,
               for the outbox, deleted from it), ~1 KB telemetry bodies, against a bare paho-mqtt QoS 1
               loop to the same broker in the same run (rounds in a shuffled order). Rows: the bare loop;
               the outbox draining a backlog (what happens after an outage); store-and-forward proper
               (``Outbox.put`` back to back while the Publisher runs); the same with the queue on tmpfs
               (what the put's fsync costs); ``Outbox.put`` alone. Goal: store-and-forward >= 0.8x bare.
``--ingest``   ingestion of one ``edgefleet server run`` (``EDGEFLEET_SERVER_MQTT_URL``) on SQLite and
               PostgreSQL: 100 enrolled devices (rows inserted as the ingester's tests do), a backlog
               published while the server is stopped (the broker keeps its session), then drained by
               one server: messages/s from the first message stored to the last (``/metrics``), and where
               the time goes (CPU of the server, PostgreSQL and the broker; time inside the store +
               commit). Goal: >= 5,000 msg/s. ``--profile``: also the ingester's writer thread under
               cProfile, in-process, on each database.
``--agent-cpu`` the agent's CPU at 200 inferences/s over its local API, with ``[mqtt.fleet]`` telemetry
               (interval 1 s, and the default 60 s) and without (same load, same agent, rounds in turn):
               the difference as % of one core; the per-inference measurement, which runs with or
               without ``[mqtt.fleet]``, timed in-process; bytes per device per hour from the bytes the
               agent's MQTT connection carried through a counting TCP relay.
``--cmd``      assignment to check-in through ``cmd``: ``checkin_interval`` 900 s, ``device assign``'s
               PUT, then when a subscriber sees the ``cmd``, when the agent's check-in starts
               (``update.json``'s ``last_checkin``), its ``switch.ok`` (the event's ``at``). Goal: <= 2 s.
``--idle``     the server's CPU for 10,000 devices checking in at the rate push allows (15-min poll:
               10,000/900 s) against 60 s polling (10,000/60 s), each for ``--seconds`` (60), driven by
               paced raw HTTP/1.1 check-ins (a new connection each, or ``--keepalive``: 8 kept-alive ones,
               as ``bench/fleet_checkin.py``'s client) with that script's devices and tokens; and idle.

No section asserts a figure: each prints what it measured. With no section flag, all run.

    .venv/bin/python bench/telemetry.py [--publish] [--ingest] [--agent-cpu] [--cmd] [--idle]
        [--messages 5000] [--rounds 5] [--ingest-messages 20000] [--db sqlite,postgresql] [--profile]
        [--cpu-seconds 12] [--cpu-rounds 2] [--runs 6] [--devices 10000] [--seconds 60] [--keepalive]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import functools
import getpass
import io
import json
import os
import platform
import pstats
import random
import secrets
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))

from updater._fleet import Agent, Fleet, FleetServer, models, running_fleet, wait_for  # noqa: E402

from edgefleet.agent.metrics import BUCKETS  # noqa: E402
from edgefleet.agent.telemetry.config import MqttFleetConfig  # noqa: E402
from edgefleet.agent.telemetry.publisher import Publisher  # noqa: E402
from edgefleet.agent.telemetry.queue import Outbox, device_topic, rfc3339  # noqa: E402

PG_ADMIN = os.environ.get("EDGEFLEET_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
CLK_TCK = os.sysconf("SC_CLK_TCK")
RECEIVE_MAXIMUM = 20  # Mosquitto's default max_inflight_messages, sent as the CONNACK's receive-maximum
LOAD_RATE = 200.0  # inferences per second in the agent CPU section


# ------------------------------------------------------------------ helpers


def machine_line() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if "model name" in ln), platform.processor())
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    from importlib.metadata import version

    mosq = subprocess.run([mosquitto_exe(), "-h"], capture_output=True, text=True).stdout.split("\n")[0]
    return (f"machine: {cpu}, {len(os.sched_getaffinity(0))} cores, "
            f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB; Linux "
            f"{platform.release()}; Python {platform.python_version()}, paho-mqtt {version('paho-mqtt')}, "
            f"{mosq.strip()}, SQLite {sqlite3.sqlite_version}, SQLAlchemy {version('sqlalchemy')}, "
            f"psycopg {version('psycopg')}; load average {load}")


def mosquitto_exe() -> str:
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
    if exe is None:
        raise SystemExit("bench/telemetry.py needs the mosquitto binary (apt-get install mosquitto)")
    return exe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads), seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_of_command(name: str) -> float:
    """utime + stime summed over every process whose command is ``name`` (PostgreSQL's backends)."""
    total = 0.0
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
        except OSError:
            continue
        if stat[stat.index("(") + 1 : stat.rindex(")")] == name:
            fields = stat.rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def metrics_of(url: str) -> dict[str, float]:
    """The server's ``/metrics`` as {"name{labels}": value} (an empty dict when it does not answer)."""
    try:
        text = httpx.get(f"{url}/metrics", timeout=5).text
    except httpx.HTTPError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[key] = float(value)
    return out


def _stored(m: dict[str, float]) -> float:
    return sum(v for k, v in m.items() if k.startswith("edgefleet_telemetry_messages_total{") and
               'result="stored"' in k)


def _rejected(m: dict[str, float]) -> float:
    return sum(v for k, v in m.items() if k.startswith("edgefleet_telemetry_rejected_total{"))


class Broker:
    """``mosquitto -c`` on a free loopback port: anonymous, no persistence, ``max_queued_messages 0`` (no
    limit: a stopped server's session keeps the whole backlog); otherwise Mosquitto's defaults
    (``max_inflight_messages`` 20, i.e. a receive-maximum of 20 in its CONNACK)."""

    def __init__(self, folder: Path, lines: tuple[str, ...] = ()) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        conf = [f"listener {self.port} 127.0.0.1", "allow_anonymous true", "persistence false",
                "max_queued_messages 0", f"user {getpass.getuser()}", *lines]
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text("\n".join(conf) + "\n")
        self.log = folder / "mosquitto.log"
        with self.log.open("ab") as f:
            self.proc = subprocess.Popen([mosquitto_exe(), "-c", str(self.conf)], stdout=f, stderr=f)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto did not start: {self.log.read_text()[-1000:]}")
            time.sleep(0.05)

        self.sinks: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def add_sink(self) -> None:
        """A ``mosquitto_sub`` (C, its own process, output discarded) on the ingester's shared
        subscriptions, QoS 1: the publisher drops a message from its outbox only when the broker routed
        it to a subscriber (a PUBACK "no matching subscribers" keeps it), as the server is in a fleet.
        Returns once a probe message is routed."""
        exe = shutil.which("mosquitto_sub") or "/usr/bin/mosquitto_sub"
        argv = [exe, "-h", "127.0.0.1", "-p", str(self.port), "-V", "5", "-q", "1", "-i",
                f"sink-{secrets.token_hex(4)}"]
        for kind in ("telemetry", "events"):
            argv += ["-t", f"$share/edgefleet-ingest/edgefleet/v1/+/{kind}"]
        self.sinks.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        routed = threading.Event()
        c = _client(f"probe-{secrets.token_hex(4)}")
        c.on_publish = lambda _c, _u, _mid, reason, _p: routed.set() if getattr(reason, "value", 16) == 0 else None
        c.connect("127.0.0.1", self.port)
        c.loop_start()
        try:
            for _ in range(100):
                c.publish("edgefleet/v1/probe/telemetry", b"{}", qos=1)
                if routed.wait(0.1):
                    return
            raise RuntimeError("mosquitto_sub did not subscribe within 10 s")
        finally:
            c.disconnect()
            c.loop_stop()

    def stop(self) -> None:
        for p in self.sinks:
            _stop_process(p)
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _client(client_id: str) -> mqtt.Client:
    return mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)


class Recorder:
    """A paho subscriber (QoS 1) keeping (arrival time.time(), topic, payload) of every message on
    ``topic``; ready once the broker granted the subscription."""

    def __init__(self, port: int, topic: str) -> None:
        self.messages: list[tuple[float, str, bytes]] = []
        self._lock = threading.Lock()
        ready = threading.Event()
        self.client = _client(f"rec-{secrets.token_hex(4)}")
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not ready.wait(10):
            raise RuntimeError(f"the recorder did not subscribe to {topic}")

    def _on_message(self, _c: Any, _u: Any, m: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((time.time(), m.topic, bytes(m.payload)))

    def since(self, t: float, suffix: str = "") -> list[tuple[float, str, bytes]]:
        with self._lock:
            return [x for x in self.messages if x[0] >= t and x[1].endswith(suffix)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def telemetry_body(i: int, inferences: int = 12_000) -> dict[str, Any]:
    """A realistic telemetry body (what ``TelemetryLoop`` puts, minus the head the outbox adds): one
    classifier with a latency histogram, drift, ten classes, live accuracy; the device block. With the
    head it is ~1 KB of JSON."""
    counts = [0] * (len(BUCKETS) + 1)
    for k, share in zip((3, 4, 5, 6, 7), (0.05, 0.55, 0.3, 0.08, 0.02), strict=True):
        counts[k] = int(inferences * share)
    classes = {str(c): inferences // 10 + c for c in range(10)}
    per_class = {str(c): round(0.9 + c / 200, 4) for c in range(10)}
    return {
        "interval_s": 60.0,
        "models": [{
            "name": "digits", "version": "2.0.0", "inferences": sum(counts), "errors": i % 3,
            "latency": {"counts": counts, "sum_s": round(sum(counts) * 0.00071, 4), "p50_s": 0.000713,
                        "p95_s": 0.00231, "p99_s": 0.00472},
            "drift": {"samples": 1200, "features": 64, "psi_max": 0.0831, "psi_mean": 0.0124,
                      "mean_shift_max": 0.412, "std_ratio_max": 1.183, "granularity": "feature"},
            "classes": classes,
            "accuracy": {"window": 1000, "accuracy": 0.953, "precision": per_class, "recall": per_class},
        }],
        "device": {"cpu_percent": 7.5, "memory_rss_bytes": 84_213_760, "memory_percent": 2.1,
                   "temperature_c": 51.3, "disk_free_bytes": 10_123_456_512, "uptime_s": 86_400.0 + i * 60,
                   "queue_depth": 0, "dropped": 0, "agent_version": "0.9.0"},
    }


def full_payload(device_id: str, epoch: str, seq: int, body: dict[str, Any], at: float | None = None) -> bytes:
    """The payload the outbox would make of ``body``: the head (schema, device_id, at, epoch, seq) first."""
    head = {"schema": 1, "device_id": device_id, "at": rfc3339(time.time() if at is None else at), "epoch": epoch,
            "seq": seq}
    return json.dumps({**head, **body}, separators=(",", ":")).encode()


def _ms(xs: list[float]) -> str:
    return " ".join(f"{x:.3f}" for x in xs)


# ------------------------------------------------------------------ 1. store-and-forward publish throughput


def _fleet_config(port: int, **kw: Any) -> MqttFleetConfig:
    return MqttFleetConfig(host="127.0.0.1", port=port, tls=False, keepalive=60, close_timeout_s=2, **kw)


def _wait_empty(outbox: Outbox, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while outbox.depth():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the outbox still holds {outbox.depth()} messages after {timeout:g} s")
        time.sleep(0.001)


def _bare_run(port: int, topic: str, payloads: list[bytes]) -> float:
    """Seconds from connect to the last PUBACK of a plain paho MQTT 5 client publishing ``payloads`` at
    QoS 1 with as many in flight as the broker's receive-maximum allows (paho's own network thread; paho
    does not read the receive-maximum itself, so the window is set to Mosquitto's default, checked at
    the CONNACK)."""
    done, connected = threading.Event(), threading.Event()
    acked = [0]
    seen: list[Any] = []

    def on_connect(_c: Any, _u: Any, _f: Any, _r: Any, props: Any) -> None:
        seen.append(getattr(props, "ReceiveMaximum", None))
        connected.set()

    def on_publish(*_: Any) -> None:
        acked[0] += 1
        if acked[0] == len(payloads):
            done.set()

    c = _client(f"bare-{secrets.token_hex(4)}")
    c.on_connect, c.on_publish = on_connect, on_publish
    c.max_queued_messages_set(0)
    c.max_inflight_messages_set(RECEIVE_MAXIMUM)
    t0 = time.perf_counter()
    c.connect("127.0.0.1", port)
    c.loop_start()
    connected.wait(10)
    if seen != [RECEIVE_MAXIMUM]:
        raise RuntimeError(f"the broker's receive-maximum is {seen}, the bench expects {RECEIVE_MAXIMUM}")
    for p in payloads:
        c.publish(topic, p, qos=1)
    if not done.wait(120):
        raise RuntimeError(f"bare loop: {acked[0]} of {len(payloads)} acknowledged")
    took = time.perf_counter() - t0
    c.disconnect()
    c.loop_stop()
    return took


def _drain_run(folder: Path, port: int, bodies: list[dict[str, Any]]) -> tuple[float, float]:
    """(seconds the puts took, seconds from the Publisher's start to an empty outbox) for a backlog."""
    device = f"bench-{secrets.token_hex(6)}"
    outbox = Outbox(folder / device / "queue.db", device)
    t = time.perf_counter()
    for b in bodies:
        outbox.put("telemetry", b)
    puts = time.perf_counter() - t
    pub = Publisher(_fleet_config(port), device, outbox)
    t0 = time.perf_counter()
    pub.start()
    _wait_empty(outbox)
    took = time.perf_counter() - t0
    pub.close(timeout=2)
    outbox.close()
    shutil.rmtree(folder / device, ignore_errors=True)
    return puts, took


def _forward_run(folder: Path, port: int, bodies: list[dict[str, Any]]) -> float:
    """Seconds from the first put to an empty outbox, the Publisher connected and running throughout."""
    device = f"bench-{secrets.token_hex(6)}"
    outbox = Outbox(folder / device / "queue.db", device)
    pub = Publisher(_fleet_config(port), device, outbox)
    pub.start()
    if not pub.connected.wait(10):
        raise RuntimeError(f"the publisher did not connect: {pub.last_error}")
    t0 = time.perf_counter()
    for b in bodies:
        outbox.put("telemetry", b)
    _wait_empty(outbox)
    took = time.perf_counter() - t0
    published = pub.counters()["published"]
    pub.close(timeout=2)
    outbox.close()
    shutil.rmtree(folder / device, ignore_errors=True)
    if published != len(bodies):
        raise RuntimeError(f"store-and-forward: {published} PUBACKs for {len(bodies)} messages")
    return took


def bench_publish(work: Path, n: int, rounds: int) -> None:
    print(f"\n1. store-and-forward publish throughput: {n} telemetry messages per run, {rounds} rounds "
          "(variants in a shuffled order each round), messages/s until every one is PUBACKed")
    bodies = [telemetry_body(i) for i in range(n)]
    epoch = secrets.token_hex(8)
    payloads = [full_payload("bench-bare", epoch, i + 1, b) for i, b in enumerate(bodies)]
    topic = device_topic("bench-bare", "telemetry")
    size = statistics.mean(len(p) for p in payloads)
    disk = work / "publish"
    shm = Path(tempfile.mkdtemp(prefix="ef-bench-", dir="/dev/shm")) if Path("/dev/shm").is_dir() else None
    disk.mkdir(parents=True, exist_ok=True)
    rates: dict[str, list[float]] = {k: [] for k in ("bare", "drain", "forward", "forward_shm", "put", "put_shm")}
    with Broker(work / "broker-publish") as broker:
        broker.add_sink()
        runs: dict[str, Callable[[], None]] = {
            "bare": lambda: rates["bare"].append(n / _bare_run(broker.port, topic, payloads)),
            "forward": lambda: rates["forward"].append(n / _forward_run(disk, broker.port, bodies)),
        }

        def drain() -> None:
            puts, took = _drain_run(disk, broker.port, bodies)
            rates["put"].append(n / puts)
            rates["drain"].append(n / took)

        runs["drain"] = drain
        if shm is not None:
            tmpfs = shm
            runs["forward_shm"] = lambda: rates["forward_shm"].append(n / _forward_run(tmpfs, broker.port, bodies))
            runs["put_shm"] = lambda: rates["put_shm"].append(n / _drain_run(tmpfs, broker.port, bodies)[0])
        for f in runs.values():  # warm: imports, the page cache, the broker's first connections
            f()
        for v in rates.values():
            v.clear()
        order, rng = list(runs), random.Random(11)
        for _ in range(rounds):
            rng.shuffle(order)
            for k in order:
                runs[k]()
    if shm is not None:
        shutil.rmtree(shm, ignore_errors=True)
    bare = statistics.median(rates["bare"])
    print(f"payload: {size:.0f} bytes of JSON on average (topic {len(topic)} bytes); broker: Mosquitto defaults "
          "(receive-maximum 20: the Publisher keeps 19 in flight, one left for its status; the bare loop 20), a "
          "mosquitto_sub on the ingester's shared subscription receiving every message")
    labels = {
        "bare": "bare paho QoS 1 loop",
        "drain": "outbox drain (a backlog of n, Publisher)",
        "forward": "store-and-forward (put + publish, disk)",
        "forward_shm": "store-and-forward, queue on tmpfs",
        "put": "Outbox.put alone (fsync each), disk",
        "put_shm": "Outbox.put alone, tmpfs",
    }
    print(f"  {'':42} {'msg/s p50':>9} {'x bare':>7} {'min':>8} {'max':>8}")
    for k, label in labels.items():
        if rates[k]:
            med = statistics.median(rates[k])
            print(f"  {label:42} {med:9.0f} {med / bare:7.2f} {min(rates[k]):8.0f} {max(rates[k]):8.0f}")
    fwd = statistics.median(rates["forward"])
    print(f"ratio store-and-forward / bare: {fwd / bare:.2f} (goal >= 0.8); backlog drain / bare: "
          f"{statistics.median(rates['drain']) / bare:.2f}")


# ------------------------------------------------------------------ 2. ingestion of one server process


@contextlib.contextmanager
def pg_schema() -> Iterator[str]:
    """A fresh schema in the local PostgreSQL's database ``test`` (trust auth), dropped after: its URL."""
    import psycopg

    plain = PG_ADMIN.replace("postgresql+psycopg://", "postgresql://")
    conn = psycopg.connect(plain, connect_timeout=3, autocommit=True)
    schema = f"ef_bench_{secrets.token_hex(4)}"
    conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield f"{PG_ADMIN}?options=-csearch_path%3D{schema}"
    finally:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        conn.close()


def pg_version() -> str:
    import psycopg

    with psycopg.connect(PG_ADMIN.replace("postgresql+psycopg://", "postgresql://"), connect_timeout=3) as c:
        row = c.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "?"


def add_devices(db_url: str, ids: list[str]) -> None:
    """Enrolled devices as rows (what enrollment leaves; ingestion only checks that the device exists and
    is not revoked), as tests/server/_telemetry.py's ``add_devices`` does."""
    from edgefleet.server.db import make_engine, make_sessionmaker
    from edgefleet.server.models import Device, utcnow

    engine = make_engine(db_url)
    now = utcnow()
    with make_sessionmaker(engine).begin() as s:
        for i in ids:
            s.add(Device(id=i, tags=[], cert_serial=secrets.token_hex(8), cert_pem="", enrolled_at=now,
                         cert_not_after=now + timedelta(days=365), desired_etag="none", running=[]))
    engine.dispose()


def streams_gap_free(db_url: str, per_device: dict[str, int]) -> bool:
    """Every device's stream holds seq 1..N contiguously, N = ``per_device[id]``, each stored once."""
    from sqlalchemy import func, select

    from edgefleet.server.db import make_engine
    from edgefleet.server.models import TelemetryMessage, TelemetryStream

    engine = make_engine(db_url)
    with engine.connect() as c:
        got = {r.device_id: (r.contiguous, r.max_seq, r.received) for r in c.execute(select(TelemetryStream))}
        rows = c.execute(select(func.count()).select_from(TelemetryMessage)).scalar()
    engine.dispose()
    return rows == sum(per_device.values()) and got == {d: (n, n, n) for d, n in per_device.items()}


def publish_all(port: int, messages: list[tuple[str, bytes]]) -> float:
    """Publish at QoS 1 from one plain paho client; returns once the broker acknowledged all (seconds)."""
    done = threading.Event()
    acked = [0]

    def on_publish(*_: Any) -> None:
        acked[0] += 1
        if acked[0] == len(messages):
            done.set()

    c = _client(f"pub-{secrets.token_hex(4)}")
    c.on_publish = on_publish
    c.max_inflight_messages_set(RECEIVE_MAXIMUM)
    c.max_queued_messages_set(0)
    t0 = time.perf_counter()
    c.connect("127.0.0.1", port)
    c.loop_start()
    for topic, payload in messages:
        c.publish(topic, payload, qos=1)
    if not done.wait(300):
        raise RuntimeError(f"publish: {acked[0]} of {len(messages)} acknowledged")
    c.disconnect()
    c.loop_stop()
    return time.perf_counter() - t0


def backlog(devices: list[str], epoch: str, first_seq: int, n: int) -> tuple[list[tuple[str, bytes]], dict[str, int]]:
    """``n`` telemetry messages round-robin over ``devices`` from ``first_seq`` on; the last seq per device."""
    out: list[tuple[str, bytes]] = []
    last: dict[str, int] = {}
    now = time.time()
    for i in range(n):
        d = devices[i % len(devices)]
        seq = first_seq + i // len(devices)
        out.append((device_topic(d, "telemetry"), full_payload(d, epoch, seq, telemetry_body(i), now - 600 + i * 0.01)))
        last[d] = seq
    return out, last


def _kill_if_alive(server: FleetServer) -> None:
    if server.alive:
        server.kill()


def _has_stored(url: str, n: int) -> bool:
    return _stored(metrics_of(url)) >= n


def _drain(server: FleetServer, broker: Broker, n: int, pg: bool) -> dict[str, float]:
    """Start ``server`` on a broker session holding ``n`` messages; sample ``/metrics`` at 10 Hz until all
    are stored: rate and CPU between the first sample with a message stored and the one with all."""
    server.start()
    first: tuple[float, float, float, float, float] | None = None
    deadline = time.monotonic() + 300
    while True:
        m = metrics_of(server.url)
        stored, now = _stored(m), time.perf_counter()
        if stored and first is None:
            first = (now, stored, cpu_seconds(server.pid), cpu_of_command("postgres") if pg else 0.0,
                     cpu_seconds(broker.proc.pid))
        if stored >= n:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"ingestion: {stored:.0f} of {n} stored after 300 s; see {server.log}")
        time.sleep(0.1)
    assert first is not None
    wall = now - first[0]
    out = {
        "rate": (stored - first[1]) / wall, "wall": wall, "messages": stored - first[1],
        "server_cpu": (cpu_seconds(server.pid) - first[2]) / wall,
        "pg_cpu": ((cpu_of_command("postgres") if pg else 0.0) - first[3]) / wall,
        "broker_cpu": (cpu_seconds(broker.proc.pid) - first[4]) / wall,
        "batches": m.get("edgefleet_telemetry_batch_seconds_count", 0.0),
        "in_store": m.get("edgefleet_telemetry_batch_seconds_sum", 0.0),
        "rejected": _rejected(m), "stored": stored,
    }
    server.stop()
    return out


def bench_ingest(work: Path, n: int, dbs: list[str], profile: bool) -> None:
    devices = [f"dev-{i:016x}" for i in range(100)]
    print(f"\n2. ingestion of one `edgefleet server run`: {n} telemetry messages from {len(devices)} enrolled devices, "
          "published while the server was stopped (its broker session keeps them), drained by the server; "
          "/metrics sampled at 10 Hz")
    for db in dbs:
        with contextlib.ExitStack() as stack:
            # a broker per database: the first server's session, offline, would stay a member of the shared
            # subscription's group and take its share of the next server's messages
            broker = stack.enter_context(Broker(work / f"broker-ingest-{db}"))
            url = stack.enter_context(pg_schema()) if db == "postgresql" else None
            name = f"ingest-{db}"
            env = {"EDGEFLEET_SERVER_MQTT_URL": broker.url,
                   "EDGEFLEET_SERVER_MQTT_CLIENT_ID": f"bench-{name}-{secrets.token_hex(3)}"}
            server = FleetServer(work / name, db=url, env=env)
            stack.callback(_kill_if_alive, server)
            server.init()
            from edgefleet.server.settings import Settings

            db_url = url or Settings(data_dir=server.data).database_url()
            add_devices(db_url, [*devices, "dev-probe"])
            epoch = secrets.token_hex(8)
            # the first start makes the broker session (and its subscriptions): one message proves it
            server.start()
            publish_all(broker.port, backlog(["dev-probe"], epoch, 1, 1)[0])
            wait_for(functools.partial(_has_stored, server.url, 1), 60, "the probe message stored", [server.log])
            server.stop()
            messages, last = backlog(devices, epoch, 1, n)
            pub_s = publish_all(broker.port, messages)
            r = _drain(server, broker, n, db == "postgresql")
            gap_free = streams_gap_free(db_url, {**last, "dev-probe": 1})
            label = f"PostgreSQL {pg_version()} (127.0.0.1, same 2 cores)" if db == "postgresql" else \
                "SQLite (WAL, the server's data folder)"
            print(f"  {label}: {r['rate']:,.0f} msg/s ({r['messages']:.0f} messages in {r['wall']:.2f} s; "
                  f"goal >= 5,000); stored once and gap-free per device: {'yes' if gap_free else 'NO'}; "
                  f"rejected {r['rejected']:.0f}")
            print(f"    where the time goes: server process {r['server_cpu'] * 100:.0f}% of a core"
                  + (f", PostgreSQL backends {r['pg_cpu'] * 100:.0f}%" if db == "postgresql" else "")
                  + f", Mosquitto {r['broker_cpu'] * 100:.0f}%; {r['batches']:.0f} batches "
                  f"(~{r['stored'] / max(r['batches'], 1):.0f} messages each), {r['in_store']:.2f} s of the "
                  f"{r['wall']:.2f} s inside store + commit ({r['in_store'] / r['wall'] * 100:.0f}%); "
                  f"publishing the backlog took {pub_s:.2f} s ({n / pub_s:,.0f} msg/s)")
            if profile:
                profile_ingester(work / f"{name}-profile", db_url, broker, devices, n)


def profile_ingester(folder: Path, db_url: str, broker: Broker, devices: list[str], n: int) -> None:
    """The server's Ingester in this process (same settings, same database) draining a backlog, its
    writer thread under cProfile: the functions that took the most time, cumulative and own."""
    from pydantic import SecretStr

    from edgefleet.server.db import make_engine, make_sessionmaker
    from edgefleet.server.metrics import Metrics
    from edgefleet.server.settings import Settings
    from edgefleet.server.telemetry.ingest import Ingester

    folder.mkdir(parents=True, exist_ok=True)
    settings = Settings(data_dir=folder, db_url=SecretStr(db_url), mqtt_url=broker.url,
                        mqtt_share_group="bench-profile",  # a group of its own (see bench_ingest)
                        mqtt_client_id=f"bench-profile-{secrets.token_hex(3)}")
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    ing = Ingester(settings, sessions, Metrics(lambda: (0, 0)))
    ing.start()
    if not ing.wait_subscribed(15):
        raise RuntimeError("profile: the ingester did not subscribe")
    ing.stop()
    messages, _ = backlog(devices, secrets.token_hex(8), 1, n)
    publish_all(broker.port, messages)
    prof = cProfile.Profile()
    process = ing._process
    busy = [0.0]

    def profiled(batch: list[Any]) -> None:
        t = time.perf_counter()
        prof.enable()
        try:
            process(batch)
        finally:
            prof.disable()
            busy[0] += time.perf_counter() - t

    ing = Ingester(settings, sessions, Metrics(lambda: (0, 0)))
    process = ing._process
    ing._process = profiled  # type: ignore[method-assign]
    t0 = time.perf_counter()
    ing.start()
    wait_for(lambda: ing.metrics.registry.get_sample_value(
        "edgefleet_telemetry_messages_total", {"topic": "telemetry", "result": "stored"}) == n, 120,
        "the profiled ingester's backlog", [])
    took = time.perf_counter() - t0
    ing.stop()
    engine.dispose()
    print(f"    in-process Ingester under cProfile: {n / took:,.0f} msg/s including connect (profiling slows it); "
          f"writer thread busy {busy[0]:.2f} s of {took:.2f} s; top functions by own time:")
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
    body = [ln for ln in out.getvalue().splitlines() if ln.strip() and not ln.startswith(("   Ordered", "   List"))]
    for ln in body[-13:]:
        print("      " + ln.strip().replace(str(ROOT) + "/", ""))


# ------------------------------------------------------------------ 3. the agent's CPU for telemetry


class CountingRelay:
    """A TCP relay on a free loopback port to ``target_port``, counting the bytes each way (asyncio in a
    thread of its own): what the agent's MQTT connection carries, framing, pings and PUBACKs included."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.port = free_port()
        self.up = 0  # client -> broker
        self.down = 0  # broker -> client
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="relay", daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", self.port), self._loop).result(10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            r2, w2 = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, up: bool) -> None:
            try:
                while data := await r.read(65536):
                    if up:
                        self.up += len(data)
                    else:
                        self.down += len(data)
                    w.write(data)
                    await w.drain()
            except OSError:
                pass
            finally:
                w.close()

        await asyncio.gather(pipe(reader, w2, True), pipe(r2, writer, False))

    def total(self) -> int:
        return self.up + self.down

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def drift_bundle(folder: Path) -> Path:
    """``good`` 1.0.0 of the update fixtures (64 float inputs, 10 classes) packaged with a drift baseline
    (the training half of the digits), so its telemetry carries drift as well as classes and latency."""
    from edgefleet.converters.package import package_model

    folder.mkdir(parents=True, exist_ok=True)
    model = folder / "model.onnx"
    model.write_bytes(models.onnx_model("good", "1.0.0"))
    x_train, _, x_test, _ = models.digits()
    path, _ = package_model(model, models.MODEL_NAME, "1.0.0", out=folder, golden={"x": x_test[:8, None, :].copy()},
                            baseline={"x": x_train[:, None, :].copy()}, description="telemetry bench: with baseline")
    model.unlink()
    return path


def measurement_cost(bundle: Path, calls: int = 20_000) -> tuple[float, float, float]:
    """In this process: (µs per ``ModelStats.observe`` of an unsampled call, µs per drift update of a
    sampled one, µs per ``Model.predict`` without telemetry), each the median of alternating blocks."""
    from edgefleet.agent.runtime import load_model
    from edgefleet.agent.telemetry.measure import ModelStats

    model = load_model(bundle)
    stats = ModelStats.from_model(models.MODEL_NAME, "1.0.0", model, drift_interval_s=1e9)
    assert stats.drift is not None, "the bench bundle has no baseline"
    feeds = [{"x": models.sample_input(i)} for i in range(64)]
    outs = [model.predict(f) for f in feeds]
    model.telemetry = None
    observe, drift, predict = [], [], []
    for _ in range(10):
        t = time.perf_counter()
        for i in range(calls // 10):
            stats.observe(feeds[i % 64], outs[i % 64], 0.0007, True)
        observe.append((time.perf_counter() - t) / (calls // 10) * 1e6)
        t = time.perf_counter()
        for i in range(calls // 100):
            stats.drift.add(feeds[i % 64])
        drift.append((time.perf_counter() - t) / (calls // 100) * 1e6)
        t = time.perf_counter()
        for i in range(calls // 10):
            model.predict(feeds[i % 64])
        predict.append((time.perf_counter() - t) / (calls // 10) * 1e6)
    return statistics.median(observe), statistics.median(drift), statistics.median(predict)


def message_cost(folder: Path, port: int, bundle: Path, n: int = 300) -> tuple[float, float]:
    """In this process, the agent's own ``TelemetryLoop`` (registry snapshot, device sample, outbox put with
    its fsync, publish, PUBACK, delete): (CPU ms per message, all threads; wall ms per message), each
    message on its own until acknowledged, as one a minute is."""
    from edgefleet.agent.runtime import load_model
    from edgefleet.agent.telemetry.device import DeviceSampler
    from edgefleet.agent.telemetry.loop import TelemetryLoop
    from edgefleet.agent.telemetry.measure import TelemetryRegistry

    model = load_model(bundle)
    stats = TelemetryRegistry()
    model.telemetry = stats.track_model(models.MODEL_NAME, "1.0.0", model)
    device = f"bench-{secrets.token_hex(6)}"
    state = folder / device
    loop = TelemetryLoop(_fleet_config(port, telemetry_interval_s=86400.0), device, state, stats, DeviceSampler(state))
    loop.start()
    try:
        if not loop.publisher.connected.wait(10):
            raise RuntimeError(f"the telemetry loop did not connect: {loop.publisher.last_error}")
        feeds = [{"x": models.sample_input(i)} for i in range(10)]
        cpu = wall = 0.0
        for _ in range(n):
            for f in feeds:  # something to report (not timed)
                model.predict(f)
            c, t = time.process_time(), time.perf_counter()
            loop.publish_now()
            _wait_empty(loop.outbox, 30)
            cpu += time.process_time() - c
            wall += time.perf_counter() - t
    finally:
        loop.stop()
    return cpu / n * 1e3, wall / n * 1e3


def bench_agent_cpu(work: Path, seconds: float, rounds: int) -> None:
    print(f"\n3. the agent's CPU for telemetry: `edgefleet agent run` under {LOAD_RATE:g} inferences/s over its local "
          f"API (JSON, one thread), {seconds:g} s windows after 3 s of load, {rounds} rounds of: without "
          "[mqtt.fleet], with it at telemetry_interval_s 1, with it at the default 60; checkin_interval 900 in all")
    bundle = drift_bundle(work / "cpu-bundle")
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(Broker(work / "broker-cpu"))
        relay = CountingRelay(broker.port)
        stack.callback(relay.close)
        fleet = stack.enter_context(running_fleet(work / "cpu", server_env={"EDGEFLEET_SERVER_MQTT_URL": broker.url}))
        fleet.push(bundle)
        agent = fleet.agent(bundle, updates={"checkin_interval": 900}, start=False)
        assert agent.device_id is not None
        rec = Recorder(broker.port, f"edgefleet/v1/{agent.device_id}/telemetry")
        stack.callback(rec.close)
        configs: list[tuple[str, float | None]] = [("off", None), ("on, 1 s", 1.0), ("on, 60 s", 60.0)]
        cpu: dict[str, list[float]] = {label: [] for label, _ in configs}
        achieved: dict[str, list[float]] = {label: [] for label, _ in configs}
        wire: list[tuple[int, int]] = []  # (bytes through the relay, telemetry messages) in the 1 s windows
        sizes: list[int] = []
        for _ in range(rounds):
            for label, interval in configs:
                agent.extra.pop("mqtt", None)
                if interval is not None:
                    agent.extra["mqtt"] = {"fleet": {"host": "127.0.0.1", "port": relay.port, "tls": False,
                                                     "telemetry_interval_s": interval}}
                agent.restart()
                with agent.load(rate=LOAD_RATE) as load:
                    time.sleep(3)
                    c0, b0, t0, w0 = cpu_seconds(agent.pid), relay.total(), time.perf_counter(), time.time()
                    n0 = len(load.samples)
                    time.sleep(seconds)
                    c1, b1, t1, w1 = cpu_seconds(agent.pid), relay.total(), time.perf_counter(), time.time()
                    n1 = len(load.samples)
                failed = [x for x in load.samples if not x.ok]
                if failed:
                    raise RuntimeError(f"{label}: {len(failed)} inferences failed: {failed[0]}")
                cpu[label].append((c1 - c0) / (t1 - t0))
                achieved[label].append((n1 - n0) / (t1 - t0))
                if interval == 1.0:
                    got = [m for m in rec.since(w0) if m[0] <= w1]
                    wire.append((b1 - b0, len(got)))
                    sizes += [len(m[2]) for m in got]
        agent.stop()
    off = statistics.median(cpu["off"])
    print(f"  {'':24} {'agent CPU, % of a core (median; runs)':>48} {'inferences/s':>13} {'- off':>8}")
    for label, _ in configs:
        med = statistics.median(cpu[label])
        runs = ", ".join(f"{x * 100:.2f}" for x in cpu[label])
        print(f"  {label:24} {med * 100:12.2f}   ({runs}){'':{max(0, 30 - len(runs))}} "
              f"{statistics.median(achieved[label]):13.1f} {(med - off) * 100:+8.2f}")
    per_msg = sum(b for b, _ in wire) / max(1, sum(m for _, m in wire))
    size = statistics.mean(sizes) if sizes else 0.0
    observe_us, drift_us, predict_us = measurement_cost(bundle)
    with Broker(work / "broker-cost") as broker:
        broker.add_sink()
        msg_cpu_ms, msg_wall_ms = message_cost(work / "cost", broker.port, bundle)
    always = LOAD_RATE * observe_us + min(LOAD_RATE, 20.0) * drift_us  # µs per second
    print(f"  the measurement on every inference (runs with or without [mqtt.fleet]; in-process, {predict_us:.1f} µs "
          f"per Model.predict without it): observe {observe_us:.2f} µs per call, drift update {drift_us:.1f} µs "
          f"on the <= 20 sampled calls a second: {always / 1e4:.3f}% of a core at {LOAD_RATE:g}/s")
    print(f"  one telemetry message in-process (TelemetryLoop.publish_now to its PUBACK, the queue on this disk): "
          f"{msg_cpu_ms:.2f} ms CPU ({msg_wall_ms:.2f} ms wall): {msg_cpu_ms / 10:.3f}% of a core at one a second, "
          f"{msg_cpu_ms / 600:.4f}% at one a minute")
    print(f"  telemetry payload {size:.0f} bytes of JSON (at 1 s; at 60 s its counts have ~2 more digits each); "
          f"{per_msg:.0f} bytes through the TCP relay per message (PUBLISH + PUBACK and the pings of the window)")
    mqtt_h = 60 * per_msg + 60 * 4  # one message a minute, and a PINGREQ/PINGRESP (2 + 2 bytes) per keep-alive
    tls_h = mqtt_h + 60 * 4 * 22  # TLS 1.3 AEAD: ~22 bytes per record; PUBLISH, PUBACK, PINGREQ, PINGRESP
    tcp_h = tls_h + 60 * 6 * 52  # IPv4 + TCP with timestamps, 52 bytes per segment: the four and two bare ACKs
    print(f"  bytes per device per hour at the default 60 s: {mqtt_h / 1e3:.1f} kB of MQTT (measured per message x 60, "
          f"+ 60 keep-alive pings); ~{tls_h / 1e3:.1f} kB with TLS records; ~{tcp_h / 1e3:.1f} kB with TCP/IP headers "
          f"(estimates: 22 B per TLS record, 52 B per segment, 6 segments a minute)")


# ------------------------------------------------------------------ 4. assignment to check-in through cmd


def _update_state(agent: Agent) -> dict[str, Any]:
    """The agent's ``update.json`` (written atomically); {} before it exists."""
    try:
        out: dict[str, Any] = json.loads((agent.state_dir / "update.json").read_bytes())
        return out
    except (FileNotFoundError, ValueError):
        return {}


def _event_at(event: dict[str, Any]) -> float:
    """An event's ``at`` (the agent's clock, RFC 3339) as epoch seconds."""
    return datetime.fromisoformat(str(event["at"]).replace("Z", "+00:00")).timestamp()


def _cmd_run(fleet: Fleet, agent: Agent, rec: Recorder, version: str) -> dict[str, float]:
    """One assignment to ``version``: seconds from just before the PUT to each mark."""
    assert agent.device_id is not None
    seq = max((e["seq"] or 0 for e in fleet.events(agent.device_id)), default=0)
    t0 = time.time()
    r = fleet.http.put(f"/api/v1/devices/{agent.device_id}/models/{models.MODEL_NAME}", json={"version": version})
    put = time.time()
    if r.status_code != 200:
        raise RuntimeError(f"assign {version}: {r.status_code} {r.text[:300]}")
    checkin: float | None = None
    deadline = time.monotonic() + 60
    while True:  # update.json at 200 Hz: the first last_checkin after t0 is the start of the check-in cmd caused
        st = _update_state(agent)
        last = st.get("last_checkin")
        if checkin is None and isinstance(last, int | float) and last > t0:
            checkin = float(last)
        cur = st.get("current", {}).get(models.MODEL_NAME)
        if checkin is not None and st.get("pending") is None and cur is not None and cur["version"] == version:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{version}: not committed within 60 s; see {agent.log}")
        time.sleep(0.005)

    def events() -> dict[str, dict[str, Any]] | None:
        out: dict[str, dict[str, Any]] = {}
        for e in fleet.events(str(agent.device_id)):
            if (e["seq"] or 0) > seq and e.get("version") == version:
                out.setdefault(e["kind"], e)
        return out if "update.committed" in out else None

    got: dict[str, dict[str, Any]] = fleet.wait_for(events, 60, f"update.committed {version} on the server")
    cmds = rec.since(t0)
    return {"assign": put - t0, "cmd": cmds[0][0] - t0 if cmds else float("nan"), "checkin": checkin - t0,
            "switch": _event_at(got["switch.ok"]) - t0, "commit": _event_at(got["update.committed"]) - t0}


def bench_cmd(work: Path, runs: int) -> None:
    print(f"\n4. assignment -> check-in through cmd: checkin_interval 900 s, probation 0.5 s; {runs} assignments "
          "alternating 2.0.0 / 1.0.0 (PUT /api/v1/devices/{id}/models/digits, what `device assign` sends); seconds "
          "from just before the PUT")
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(Broker(work / "broker-cmd"))
        fleet = stack.enter_context(running_fleet(work / "cmd", server_env={"EDGEFLEET_SERVER_MQTT_URL": broker.url}))
        b1 = models.bundle("good", "1.0.0", work / "bundles")
        b2 = models.bundle("good", "2.0.0", work / "bundles")
        for b in (b1, b2):
            fleet.push(b)
        mqtt_cfg = {"fleet": {"host": "127.0.0.1", "port": broker.port, "tls": False}}
        agent = fleet.agent(b1, config={"mqtt": mqtt_cfg}, updates={
            "checkin_interval": 900, "probation_inferences": 0, "probation_seconds": 0.5})
        assert agent.device_id is not None
        status = Recorder(broker.port, f"edgefleet/v1/{agent.device_id}/status")  # retained: arrives at once
        stack.callback(status.close)
        rec = Recorder(broker.port, f"edgefleet/v1/{agent.device_id}/cmd")
        stack.callback(rec.close)
        fleet.wait_for(lambda: _update_state(agent).get("last_refresh") is not None, 60, "the first TUF refresh")
        fleet.wait_for(lambda: any(json.loads(m[2]).get("state") == "online" for m in status.since(0)), 60,
                       "the agent's status online")
        time.sleep(1.0)  # its cmd subscription follows the connect; and past the first check-in
        cols = ("assign", "cmd", "checkin", "switch", "commit")
        print(f"  {'run':>3} {'version':>7} " + " ".join(f"{c:>8}" for c in cols))
        rows: list[dict[str, float]] = []
        for i in range(runs):
            version = "2.0.0" if i % 2 == 0 else "1.0.0"
            row = _cmd_run(fleet, agent, rec, version)
            rows.append(row)
            print(f"  {i + 1:>3} {version:>7} " + " ".join(f"{row[c]:8.3f}" for c in cols))
            time.sleep(1.0)  # the agent checks in once more right after a commit: let that one pass
        for label, f in (("median", statistics.median), ("max", max)):
            print(f"  {label:>11} " + " ".join(f"{f([r[c] for r in rows]):8.3f}" for c in cols))
    checkin = [r["checkin"] for r in rows]
    switch = [r["switch"] for r in rows]
    print(f"  assign -> check-in: median {statistics.median(checkin):.3f} s, max {max(checkin):.3f} s (goal <= 2 s); "
          f"-> switch.ok: median {statistics.median(switch):.3f} s, max {max(switch):.3f} s. cmd = a subscriber "
          "on the device's cmd topic got it; checkin = update.json's last_checkin (the check-in's start); "
          "switch / commit = the agent's events' at")


# ------------------------------------------------------------------ 5. the server's idle load: push against polling


async def _checkin(port: int, job: tuple[str, str, str], writer_reader: Any | None) -> tuple[int, Any]:
    """One conditional GET of the desired state as bench/fleet_checkin.py's client sends it: (status, the
    connection to reuse, or None when each check-in opens its own)."""
    did, token, etag = job
    if writer_reader is None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    else:
        reader, writer = writer_reader
    writer.write((f"GET /api/v1/devices/{did}/desired HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  f"Authorization: Bearer {token}\r\nIf-None-Match: {etag}\r\n\r\n").encode())
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:" and int(line[15:]):
            await reader.readexactly(int(line[15:]))
    if writer_reader is None:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return status, None
    return status, (reader, writer)


def paced_checkins(port: int, jobs: list[tuple[str, str, str]], rate: float, keepalive: bool,
                   connections: int = 8) -> dict[str, float]:
    """Check-ins of ``jobs`` at ``rate`` per second (job k sent at start + k / rate), each on a new TCP
    connection (as a device polling every few minutes does) or, ``keepalive``, spread over ``connections``
    kept-alive ones; latencies, statuses, and how late the sending fell behind its schedule."""
    lat: list[float] = []
    statuses: dict[int, int] = {}
    behind = [0.0]

    async def one(k: int, job: tuple[str, str, str], start: float) -> None:
        wait = start + k / rate - asyncio.get_running_loop().time()
        if wait > 0:
            await asyncio.sleep(wait)
        behind[0] = max(behind[0], -wait)
        t = time.perf_counter()
        status, _ = await _checkin(port, job, None)
        lat.append(time.perf_counter() - t)
        statuses[status] = statuses.get(status, 0) + 1

    async def main() -> None:
        start = asyncio.get_running_loop().time() + 0.05
        if keepalive:
            conns: list[Any] = [await asyncio.open_connection("127.0.0.1", port) for _ in range(connections)]
            shares = [list(enumerate(jobs))[i::connections] for i in range(connections)]

            async def kept(i: int) -> None:
                conn = conns[i]
                loop = asyncio.get_running_loop()
                for k, job in shares[i]:
                    wait = start + k / rate - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    behind[0] = max(behind[0], -wait)
                    t = time.perf_counter()
                    status, conn = await _checkin(port, job, conn)
                    lat.append(time.perf_counter() - t)
                    statuses[status] = statuses.get(status, 0) + 1
                conn[1].close()

            await asyncio.gather(*(kept(i) for i in range(connections)))
        else:  # one task per check-in, started on schedule: a slow answer never delays the next device
            await asyncio.gather(*(one(k, job, start) for k, job in enumerate(jobs)))

    t0 = time.perf_counter()
    asyncio.run(main())
    wall = time.perf_counter() - t0
    lat.sort()
    return {"count": len(lat), "wall": wall, "per_s": len(lat) / wall, "p50_ms": lat[len(lat) // 2] * 1e3,
            "p99_ms": lat[int(len(lat) * 0.99)] * 1e3, "behind_s": behind[0],
            "not_304": sum(v for k, v in statuses.items() if k != 304)}


def bench_idle(work: Path, n: int, seconds: float, keepalive: bool) -> None:
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))
    import fleet_checkin

    how = "8 kept-alive connections" if keepalive else "a new TCP connection per check-in (as a polling device)"
    print(f"\n5. the server's load for {n:,} devices: check-ins at the rate a 15-minute poll (push) implies against "
          f"60 s polling, {seconds:g} s each, {how}; unchanged desired state (304), SQLite; server CPU from "
          "/proc/PID/stat")
    folder = work / "idle"
    devices, env, _ = fleet_checkin.prepare(folder / "data", None, n)  # rows and tokens, as bench/fleet_checkin.py
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(Broker(work / "broker-idle"))
        port = free_port()
        log = stack.enter_context((folder / "server.log").open("ab"))
        server = subprocess.Popen([*fleet_checkin.CLI, "server", "run", "--data", str(folder / "data"), "--port",
                                   str(port)], env={**os.environ, **env, "EDGEFLEET_SERVER_MQTT_URL": broker.url},
                                  stdout=log, stderr=log)
        stack.callback(_stop_process, server)
        url = f"http://127.0.0.1:{port}"
        fleet_checkin.wait_http(f"{url}/healthz")
        wait_for(lambda: metrics_of(url).get("edgefleet_mqtt_connected") == 1, 30, "the server's MQTT connection",
                 [folder / "server.log"])
        time.sleep(2)
        idle_s = min(10.0, seconds)
        c0, t0 = cpu_seconds(server.pid), time.perf_counter()
        time.sleep(idle_s)
        idle = (cpu_seconds(server.pid) - c0) / (time.perf_counter() - t0)
        print(f"  {'':34} {'check-ins/s':>11} {'done':>6} {'server CPU':>10} {'- idle':>7} {'ms CPU each':>11} "
              f"{'p50 ms':>7} {'p99 ms':>7}")
        print(f"  {'idle (MQTT connected, no requests)':34} {0:11.1f} {0:6d} {idle * 100:9.2f}%")
        rows = {}
        for label, interval in (("push: 15-min poll (n / 900 s)", 900.0), ("60 s polling (n / 60 s)", 60.0)):
            rate = n / interval
            jobs = devices[: max(1, round(rate * seconds))]
            c0 = cpu_seconds(server.pid)
            r = paced_checkins(port, jobs, rate, keepalive)
            cpu = (cpu_seconds(server.pid) - c0) / r["wall"]
            each = (cpu - idle) / r["per_s"] * 1e3
            rows[interval] = cpu
            print(f"  {label:34} {r['per_s']:11.1f} {r['count']:6.0f} {cpu * 100:9.2f}% {(cpu - idle) * 100:+6.2f}% "
                  f"{each:11.2f} {r['p50_ms']:7.1f} {r['p99_ms']:7.1f}"
                  + (f"  ({r['not_304']:.0f} not 304!)" if r["not_304"] else "")
                  + (f"  (fell {r['behind_s']:.2f} s behind schedule)" if r["behind_s"] > 0.5 else ""))
    print(f"  push and a 15-minute poll cost {rows[900.0] * 100:.2f}% of a core against {rows[60.0] * 100:.2f}% for "
          f"60 s polling ({rows[60.0] / max(rows[900.0], 1e-9):.1f}x); every check-in here writes last_seen (its "
          "granularity is 60 s, each device's previous check-in was longer ago), as in steady state")


def _stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# ------------------------------------------------------------------ main


SECTIONS = ("publish", "ingest", "agent_cpu", "cmd", "idle")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for s in SECTIONS:
        ap.add_argument(f"--{s.replace('_', '-')}", action="store_true", help=f"run section {s}")
    ap.add_argument("--messages", type=int, default=5000, help="messages per run in the publish section")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of the publish section")
    ap.add_argument("--ingest-messages", type=int, default=20_000, help="backlog drained in the ingest section")
    ap.add_argument("--db", default="sqlite,postgresql", help="ingest section: sqlite, postgresql or both")
    ap.add_argument("--profile", action="store_true", help="ingest section: also cProfile the ingester in-process")
    ap.add_argument("--cpu-seconds", type=float, default=12.0, help="agent-cpu section: seconds per window")
    ap.add_argument("--cpu-rounds", type=int, default=2, help="agent-cpu section: rounds of off / 1 s / 60 s")
    ap.add_argument("--runs", type=int, default=6, help="cmd section: assignments")
    ap.add_argument("--devices", type=int, default=10_000, help="idle section: devices in the fleet")
    ap.add_argument("--seconds", type=float, default=60.0, help="idle section: seconds per rate")
    ap.add_argument("--keepalive", action="store_true",
                    help="idle section: 8 kept-alive connections (bench/fleet_checkin.py's way) instead of one each")
    args = ap.parse_args()
    chosen = [s for s in SECTIONS if getattr(args, s)] or list(SECTIONS)
    print(machine_line())
    with tempfile.TemporaryDirectory(prefix="telemetry-bench-") as tmp:
        work = Path(tmp)
        for s in chosen:
            t = time.perf_counter()
            if s == "publish":
                bench_publish(work, max(1, args.messages), max(1, args.rounds))
            elif s == "ingest":
                dbs = [d.strip() for d in args.db.split(",") if d.strip()]
                bad = [d for d in dbs if d not in ("sqlite", "postgresql")]
                if bad:
                    raise SystemExit(f"--db: {bad[0]!r} is not sqlite or postgresql")
                bench_ingest(work, max(100, args.ingest_messages), dbs, args.profile)
            elif s == "agent_cpu":
                bench_agent_cpu(work, max(1.0, args.cpu_seconds), max(1, args.cpu_rounds))
            elif s == "cmd":
                bench_cmd(work, max(1, args.runs))
            else:
                bench_idle(work, max(100, args.devices), max(5.0, args.seconds), args.keepalive)
            print(f"({s}: {time.perf_counter() - t:.0f} s)")


if __name__ == "__main__":
    main()
