"""MQTT in and out through a real Mosquitto: the shared broker on 127.0.0.1:1883 for a digits flow
end to end, and a private one on a free port, stopped and started again, for the reconnects."""

from __future__ import annotations

import json
import os
import queue
import shutil
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from _support import CollectSink, digits_bundle, free_port, wait_until
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.agent import Pipeline, load_model
from edgefleet.agent.flow import Flow, FlowConfig
from edgefleet.agent.sinks import MqttSink, MqttSinkConfig
from edgefleet.agent.sources import MqttSource


@pytest.fixture(scope="module")
def digits_pipeline(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    """The float TFLite digits model as a real bundle with its pipeline (scale 1/16, nhwc, softmax, top-3)."""
    return Pipeline(load_model(digits_bundle(tmp_path_factory.mktemp("bundle"))))


# -- MQTT ---------------------------------------------------------------------------------------


def _reachable(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: not skipping)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def broker_port() -> int:
    if not _reachable(1883):
        _unavailable("no MQTT broker on 127.0.0.1:1883 (install and start Mosquitto)")
    return 1883


class PrivateBroker:
    """A Mosquitto of our own on a free port, to stop and start again."""

    def __init__(self, exe: str) -> None:
        self.exe, self.port = exe, free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.exe, "-p", str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        assert wait_until(lambda: _reachable(self.port), 10), "mosquitto did not start"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def private_broker() -> Iterator[PrivateBroker]:
    exe = shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto",) if os.path.exists(p)), None)
    if exe is None:
        _unavailable("the mosquitto binary is not installed")
    b = PrivateBroker(str(exe))
    yield b
    b.stop()


class Subscriber:
    """A plain paho client collecting JSON messages on a topic filter."""

    def __init__(self, port: int, topic: str) -> None:
        self.messages: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:8]}"
        )
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, json.loads(m.payload)))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.subscribed.wait(10)

    def take(self, n: int, timeout: float = 10.0) -> list[tuple[str, Any]]:
        return [self.messages.get(timeout=timeout) for _ in range(n)]

    def publish(self, topic: str, payload: bytes | str) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_mqtt_source_to_mqtt_sink_predicts_digits_and_counts_malformed_payloads(
    broker_port: int, digits_pipeline: Pipeline, holdout: tuple[Any, Any]
) -> None:
    x, y = holdout
    base = f"edgefleet-test/{uuid.uuid4().hex[:12]}"
    cfg = FlowConfig.model_validate(
        {
            "model": "digits",
            "source": {"type": "mqtt", "port": broker_port, "topics": [f"{base}/in"], "protocol": "5"},
            "sinks": [{"type": "mqtt", "port": broker_port, "topic": f"{base}/out/{{device_id}}/{{model}}"}],
            "queue_size": 64,
        }
    )
    flow = Flow(cfg, lambda: digits_pipeline, device_id="dev-1")
    sub = Subscriber(broker_port, f"{base}/out/#")
    flow.start()
    try:
        assert isinstance(flow.source, MqttSource) and flow.source.subscribed.wait(10)
        malformed = [b"not json", b'{"dat": [1]}', b'{"data": [[1, 2], [3]]}', b'{"image_b64": "%%%"}']
        for p in malformed:  # first: messages on one topic arrive in order
            sub.publish(f"{base}/in", p)
        for i in range(10):
            payload = {"id": i, "data": x[i].tolist()} if i else {"id": i, "inputs": {"image": x[i].tolist()}}
            sub.publish(f"{base}/in", json.dumps(payload))
        got = sub.take(10)
    finally:
        flow.stop()
        sub.close()
    assert {t for t, _ in got} == {f"{base}/out/dev-1/digits"}
    by_id = {r["meta"]["id"]: r for _, r in got}
    assert sorted(by_id) == list(range(10))
    assert all(by_id[i]["top_k"][0]["index"] == digits_pipeline.run(x[i])["top_k"][0]["index"] for i in range(10))
    assert sum(by_id[i]["top_k"][0]["index"] == y[i] for i in range(10)) >= 7
    assert by_id[3]["meta"]["topic"] == f"{base}/in" and by_id[3]["meta"]["source"] == "mqtt"
    c = flow.counters()
    assert c["source"]["received"] == 14 and c["source"]["errors"] == 4
    assert "image_b64" in (flow.source.last_error or "")
    assert c["processed"] == 10 and c["sinks"]["mqtt"]["sent"] == 10 and c["sinks"]["mqtt"]["dropped"] == 0


def test_mqtt_sink_publishes_its_buffer_once_the_broker_comes_up(private_broker: PrivateBroker) -> None:
    cfg = MqttSinkConfig.model_validate(
        {"type": "mqtt", "port": private_broker.port, "topic": "results/{model}", "buffer": 2, "retain": True}
    )
    sink = MqttSink(cfg)  # the broker is not running yet
    try:
        for name in ("a", "b", "c"):
            sink.send({"model": name})
        assert sink.counters()["buffered"] == 2 and sink.counters()["dropped"] == 1
        private_broker.start()
        assert sink.connected.wait(15)
        assert wait_until(lambda: sink.counters()["published"] == 2)
        sub = Subscriber(private_broker.port, "results/#")  # retained: delivered whenever it subscribes
        got = sorted(sub.take(2))
        sub.close()
    finally:
        sink.close()
    assert got == [("results/b", {"model": "b"}), ("results/c", {"model": "c"})]


def test_mqtt_source_subscribes_again_after_the_broker_restarts(
    private_broker: PrivateBroker, digits_pipeline: Pipeline, holdout: tuple[Any, Any]
) -> None:
    x, _ = holdout
    private_broker.start()
    cfg = FlowConfig.model_validate(
        {
            "model": "digits",
            "source": {"type": "mqtt", "port": private_broker.port, "topics": ["in/#"], "keepalive": 5},
            "sinks": [{"type": "stdout"}],
        }
    )
    sink = CollectSink()
    flow = Flow(cfg, lambda: digits_pipeline, sinks=[sink])
    flow.start()
    try:
        src = flow.source
        assert isinstance(src, MqttSource) and src.subscribed.wait(10)
        private_broker.stop()
        assert wait_until(lambda: not src.subscribed.is_set())
        private_broker.start()
        assert src.subscribed.wait(15)
        pub = Subscriber(private_broker.port, "unused")
        pub.publish("in/cam1", json.dumps({"data": x[2].tolist()}))
        pub.close()
        (result,) = sink.take(1)
    finally:
        flow.stop()
    assert result["meta"]["topic"] == "in/cam1"
    assert result["top_k"][0]["index"] == digits_pipeline.run(x[2])["top_k"][0]["index"]
    assert flow.counters()["source"]["connects"] == 2 and flow.counters()["source"]["disconnects"] >= 1
