"""MQTT flows that lose nothing, through a real Mosquitto of our own (a free port, stated limits):
QoS 1 messages are acknowledged only once processed, so a burst waits in the broker; a message
cut short by a SIGKILL is redelivered to the restarted agent (persistent session); QoS 0 and
messages past the window go by the drop policy, counted."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from _support import CollectSink, digits_bundle, free_port, wait_until
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.agent import Pipeline, load_model
from edgefleet.agent.flow import Flow, FlowConfig
from edgefleet.agent.sources import MqttSource


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
    """``mosquitto -c`` on a free port with the given settings (no persistence to disk)."""

    def __init__(self, exe: str, folder: Path, **settings: int) -> None:
        self.port = free_port()
        conf = folder / f"mosquitto-{self.port}.conf"
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true", "persistence false"]
        lines += [f"{k} {v}" for k, v in settings.items()]
        conf.write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_until(lambda: _reachable(self.port) or self.proc.poll() is not None, 10) or self.proc.poll():
            raise RuntimeError(f"mosquitto did not start with {settings}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
    if exe is None:
        _unavailable("the mosquitto binary is not installed")
    started: list[Broker] = []

    def start(**settings: int) -> Broker:
        started.append(Broker(str(exe), tmp_path, **settings))
        return started[-1]

    yield start
    for b in started:
        b.stop()


class Publisher:
    """A plain paho client; ``send`` returns once the broker has every QoS 1 message."""

    def __init__(self, port: int) -> None:
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"p-{uuid.uuid4().hex}")
        self.client.max_inflight_messages_set(100)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def send(self, topic: str, payloads: list[dict[str, Any]], qos: int = 1) -> None:
        infos = [self.client.publish(topic, json.dumps(p), qos=qos) for p in payloads]
        for info in infos:
            info.wait_for_publish(30)
            assert info.is_published()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Gate:
    """A pipeline held shut until released: the model is slow for as long as the test wants."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.entered, self.release = inner, threading.Event(), threading.Event()

    def run(self, data: Any, raw_outputs: Any = None) -> dict[str, Any]:
        self.entered.set()
        assert self.release.wait(60)
        return dict(self.inner.run(data, raw_outputs=raw_outputs))


@pytest.fixture(scope="module")
def digits_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    return Pipeline(load_model(digits_bundle(tmp_path_factory.mktemp("bundle"))))


def mqtt_flow(port: int, runner: Any, topic: str, **source: Any) -> tuple[Flow, CollectSink]:
    queue_size = source.pop("queue_size", 16)
    cfg = FlowConfig.model_validate(
        {
            "model": "digits",
            "source": {"type": "mqtt", "port": port, "topics": [topic], **source},
            "sinks": [{"type": "stdout"}],
            "queue_size": queue_size,
        }
    )
    sink = CollectSink()
    flow = Flow(cfg, lambda: runner, sinks=[sink])
    flow.start()
    assert isinstance(flow.source, MqttSource) and flow.source.subscribed.wait(10)
    return flow, sink


DIGIT = [[0, 0, 5, 13, 9, 1, 0, 0]] * 8


def take(sink: CollectSink, flow: Flow, n: int) -> list[dict[str, Any]]:
    try:
        return sink.take(n, timeout=30)
    except queue.Empty:
        pytest.fail(f"fewer than {n} results; flow counters {flow.counters()}")


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_burst_of_2000_qos1_messages_into_a_slow_model_waits_in_the_broker_and_each_is_processed_once(
    broker: Callable[..., Broker], digits_pipeline: Pipeline, protocol: str
) -> None:
    b = broker(max_inflight_messages=10, max_queued_messages=5000)
    gate = Gate(digits_pipeline)
    flow, sink = mqtt_flow(b.port, gate, "burst", protocol=protocol, receive_maximum=16, queue_size=4)
    pub = Publisher(b.port)
    try:
        pub.send("burst", [{"id": i, "data": DIGIT} for i in range(2000)])  # all stored by the broker
        assert gate.entered.wait(10)
        src = flow.source.counters()
        window = 16 if protocol == "5" else 10  # MQTT 3.1.1: the broker's max_inflight_messages
        assert 0 < src["held"] <= window and src["received"] <= window, src
        gate.release.set()
        results = take(sink, flow, 2000)
    finally:
        pub.close()
        flow.stop()
    ids = [r["meta"]["id"] for r in results]
    assert sorted(ids) == list(range(2000)), "every message processed exactly once"
    assert ids == sorted(ids), "in the order published"
    c = flow.counters()
    assert (c["processed"], c["dropped_queue_full"], c["dropped_on_stop"], c["errors"]) == (2000, 0, 0, 0)
    assert c["source"]["received"] == 2000 and c["source"]["acked"] == 2000 and c["source"]["over_limit"] == 0
    # the source stops reading at receive_maximum, whatever the broker's own window (Mosquitto 2.0.11
    # sends far past both receive-maximum and max_inflight_messages while acks flow)
    assert c["queued_max"] <= 16 and c["source"]["held_max"] <= 16 and c["source"]["redelivered"] == 0


def test_qos0_messages_past_the_queue_are_dropped_oldest_first_and_counted(
    broker: Callable[..., Broker], digits_pipeline: Pipeline
) -> None:
    b = broker()
    gate = Gate(digits_pipeline)
    flow, sink = mqtt_flow(b.port, gate, "live", qos=0, queue_size=4)
    pub = Publisher(b.port)
    try:
        pub.send("live", [{"id": 0, "data": DIGIT}], qos=0)
        assert gate.entered.wait(10)  # item 0 is in the model
        pub.send("live", [{"id": i, "data": DIGIT} for i in range(1, 21)], qos=0)
        assert wait_until(lambda: flow.source.counters()["received"] == 21)
        gate.release.set()
        results = take(sink, flow, 5)
    finally:
        pub.close()
        flow.stop()
    assert [r["meta"]["id"] for r in results] == [0, 17, 18, 19, 20]
    c = flow.counters()
    assert (c["received"], c["processed"], c["dropped_queue_full"]) == (21, 5, 16)
    assert c["source"]["acked"] == 0 and c["source"]["held_max"] == 0


def test_qos1_past_max_held_goes_by_the_drop_policy_counted_and_acknowledged(
    broker: Callable[..., Broker], digits_pipeline: Pipeline
) -> None:
    """A broker sending more in flight than the source holds: the excess is not held, so the drop
    policy applies; a dropped QoS 1 message is acknowledged (dropped on purpose, never stuck)."""
    b = broker(max_inflight_messages=100)
    gate = Gate(digits_pipeline)
    flow, sink = mqtt_flow(b.port, gate, "over", protocol="3.1.1", max_held=4, queue_size=2)
    pub = Publisher(b.port)
    try:
        pub.send("over", [{"id": 0, "data": DIGIT}])
        assert gate.entered.wait(10)
        pub.send("over", [{"id": i, "data": DIGIT} for i in range(1, 21)])
        assert wait_until(lambda: flow.source.counters()["received"] == 21)
        gate.release.set()
        results = take(sink, flow, 6)
        assert wait_until(lambda: flow.source.counters()["acked"] == 21)
    finally:
        pub.close()
        flow.stop()
    # held: 0 (in the model), 1, 2, 3; past the window: 4..20, of which the newest two stay queued
    assert [r["meta"]["id"] for r in results] == [0, 1, 2, 3, 19, 20]
    c = flow.counters()
    assert (c["processed"], c["dropped_queue_full"]) == (6, 15)
    assert c["source"]["over_limit"] == 17 and c["source"]["held_max"] == 4


CHILD = textwrap.dedent(
    """
    import json, sys, threading
    from pathlib import Path
    from edgefleet.agent.flow import Flow, FlowConfig

    port, mode, client_id, protocol, out = sys.argv[1:6]

    class Runner:
        def run(self, data, raw_outputs=None):
            n = int(data[0][0])
            if mode == "block":
                Path(out + ".entered").write_text(str(n))
                threading.Event().wait()  # never finishes: the test SIGKILLs this process
            return {"model": "echo", "n": n}

    cfg = FlowConfig.model_validate({
        "model": "echo",
        "source": {"type": "mqtt", "port": int(port), "topics": ["jobs"], "protocol": protocol,
                   "client_id": client_id, "persistent_session": True, "stop_timeout": 5},
        "sinks": [{"type": "jsonl", "path": out}],
    })
    flow = Flow(cfg, lambda: Runner())
    flow.start()
    assert flow.source.subscribed.wait(10)
    print("subscribed", flush=True)
    sys.stdin.read()  # until the test closes stdin
    flow.stop()
    print(json.dumps(flow.counters()), flush=True)
    """
)


def _child(port: int, mode: str, client_id: str, protocol: str, out: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(port), mode, client_id, protocol, str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "subscribed"
    return proc


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_message_still_in_the_model_when_the_agent_is_sigkilled_is_redelivered_after_restart(
    broker: Callable[..., Broker], tmp_path: Path, protocol: str
) -> None:
    b = broker()
    out, client_id = tmp_path / "results.jsonl", f"agent-{uuid.uuid4().hex[:8]}"
    pub = Publisher(b.port)
    first = _child(b.port, "block", client_id, protocol, out)
    try:
        pub.send("jobs", [{"data": [[1]]}])
        assert wait_until(lambda: (tmp_path / "results.jsonl.entered").exists())
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        pub.send("jobs", [{"data": [[2]]}])  # while the agent is down: kept in its session
        second = _child(b.port, "run", client_id, protocol, out)
        try:
            assert wait_until(lambda: out.exists() and len(out.read_text().splitlines()) >= 2)
            assert second.stdin is not None and second.stdout is not None
            second.stdin.close()
            counters = json.loads(second.stdout.readline())
            assert second.wait(30) == 0
        finally:
            if second.poll() is None:
                second.kill()
                second.wait()
    finally:
        pub.close()
        if first.poll() is None:
            first.kill()
            first.wait()
    assert sorted(json.loads(line)["n"] for line in out.read_text().splitlines()) == [1, 2]
    assert counters["processed"] == 2 and counters["source"]["redelivered"] == 1
    assert counters["source"]["acked"] == 2 and counters["source"]["held"] == 0


def _vm(pid: int, field: str) -> int:
    """VmRSS / VmHWM of a process, bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


def test_a_hostile_publisher_flooding_a_hung_model_leaves_the_agent_flat_the_burst_waits_in_the_broker(
    broker: Callable[..., Broker], tmp_path: Path
) -> None:
    """100 MB of QoS 1 and QoS 0 readings at an agent whose model hangs on the first: the source
    stops reading at receive_maximum, so the agent holds a few payloads and the broker the rest."""
    if not Path("/proc/self/status").exists():
        _unavailable("no /proc to read the agent's memory from")
    b = broker(max_queued_messages=100000, max_queued_bytes=0)
    out = tmp_path / "results.jsonl"
    pub = Publisher(b.port)
    agent = _child(b.port, "block", f"agent-{uuid.uuid4().hex[:8]}", "5", out)
    try:
        pub.send("jobs", [{"data": [[1]]}])
        assert wait_until(lambda: (tmp_path / "results.jsonl.entered").exists())
        base = _vm(agent.pid, "VmRSS")
        big = [[7] * 4000]  # 12 KB of JSON, 32 KB parsed
        for qos in (1, 0):
            for start in range(0, 4000, 500):
                pub.send("jobs", [{"id": i, "data": big} for i in range(start, start + 500)], qos=qos)
        growth = _vm(agent.pid, "VmHWM") - base
    finally:
        pub.close()
        agent.kill()
        agent.wait()
    print(f"agent peak RSS growth under 8000 x 12 KB readings: {growth / 2**20:.1f} MiB")
    assert growth < 24 * 2**20, f"the agent grew by {growth / 2**20:.1f} MiB"
