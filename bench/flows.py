"""Sensor flows against their bare loops, in the same run.

1. MQTT: readings (the digits model's 8x8 JSON payloads, QoS 1) from a publisher process through a
   private ``mosquitto`` the bench starts on a free port (settings printed), into
   - the bare loop: one paho client whose ``on_message`` parses the payload, runs the pipeline and
     writes the result as a JSON line (paho acknowledges on receipt);
   - the flow: ``MqttSource`` (manual acks once processed, receive-maximum) -> ``Flow`` ->
     ``JsonlSink``, the same pipeline and the same file (``/dev/null``).
   At fixed rates (500/1000/2000 msg/s for ``--seconds``) it reports what each processed and lost;
   flat out, the broker is filled first (a persistent session, ``--burst`` messages) and each
   consumer empties it: throughput and the flow/bare ratio.
2. Video: a generated MJPG file (cv2.VideoWriter) through a detector-shaped ONNX conv net built
   here (1x3x640x640 in, [1, 84, 8400] out, like YOLOv8's), against the bare loop (read + resize +
   colour + scale + invoke), with raw outputs off (the default) and on.

Goals: flow >= 0.9x the bare loop's throughput; no loss at any rate the bare loop sustains.
``--profile`` adds a cProfile of the flow's worker for any goal missed.

    .venv/bin/python bench/flows.py [--seconds 4] [--burst 20000] [--frames 150] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.agent import Pipeline, load_model
from edgefleet.agent.flow import Flow, FlowConfig
from edgefleet.agent.sinks import to_json
from edgefleet.agent.sources import parse_payload_bytes
from edgefleet.bundle.manifest import PipelineSpec

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "tests" / "fixtures" / "models" / "digits_cnn_float.tflite"
BROKER = {"max_inflight_messages": 20, "max_queued_messages": 200000}
TOPIC = "bench/in"
RATES = tuple(int(r) for r in os.environ.get("BENCH_RATES", "500,1000,2000").split(","))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_broker(folder: Path) -> tuple[subprocess.Popen[bytes], int]:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    conf = folder / "mosquitto.conf"
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "persistence false"]
    conf.write_text("\n".join(lines + [f"{k} {v}" for k, v in BROKER.items()]) + "\n")
    log = open(os.environ.get("BENCH_BROKER_LOG", folder / "mosquitto.log"), "wb")  # noqa: SIM115  # the broker's, kept for a crash
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("mosquitto did not start")


PUBLISHER = """
import json, sys, time
import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
port, topic, rate, count = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
x = np.load(sys.argv[5])["x"]
c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="bench-pub")
c.max_inflight_messages_set(1000)
c.max_queued_messages_set(0)
c.connect("127.0.0.1", port)
c.loop_start()
payloads = [json.dumps({"id": i, "data": x[i % len(x)].tolist()}) for i in range(count)]
t0 = time.monotonic()
infos = []
for i, p in enumerate(payloads):
    if rate > 0:
        due = t0 + i / rate
        if due > time.monotonic():
            time.sleep(due - time.monotonic())
    infos.append(c.publish(topic, p, qos=1))
for info in infos:
    info.wait_for_publish(120)
print(json.dumps({"published": sum(i.is_published() for i in infos), "seconds": time.monotonic() - t0}))
c.disconnect()
c.loop_stop()
"""


def publish(port: int, rate: float, count: int, holdout: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", PUBLISHER, str(port), TOPIC, str(rate), str(count), str(holdout)],
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(out.stdout))


class Tally:
    """Counts processed messages and the first/last time one was."""

    def __init__(self) -> None:
        self.n, self.first, self.last = 0, 0.0, 0.0
        self.lock = threading.Lock()

    def add(self) -> None:
        now = time.monotonic()
        with self.lock:
            if not self.n:
                self.first = now
            self.n += 1
            self.last = now

    def settle(self, expected: int, timeout: float) -> None:
        """Wait until ``expected`` arrived, or nothing arrived for 2 s, or ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.n < expected and time.monotonic() < deadline:
            before = self.n
            time.sleep(2.0 if self.n else 0.5)
            if self.n == before and self.n:
                break


class TallySink:
    """The flow's sink: a JSON line to /dev/null (like the bare loop), counted."""

    name = "tally"

    def __init__(self, tally: Tally, f: Any) -> None:
        self.tally, self.f = tally, f

    def send(self, result: dict[str, Any]) -> None:
        self.f.write(to_json(result) + "\n")
        self.tally.add()

    def close(self) -> None:
        pass

    def counters(self) -> dict[str, int]:
        return {"sent": self.tally.n}


def bare_mqtt(port: int, pipeline: Pipeline, tally: Tally, client_id: str, devnull: Any) -> Any:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        data, meta = parse_payload_bytes(msg.payload)
        result = pipeline.run(data)
        result["meta"] = meta
        devnull.write(to_json(result) + "\n")
        tally.add()

    subscribed = threading.Event()
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.on_message = on_message
    c.on_connect = lambda cl, *_: cl.subscribe(TOPIC, qos=1)
    c.on_subscribe = lambda *_: subscribed.set()
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 600
    c.connect("127.0.0.1", port, clean_start=False, properties=props)
    c.loop_start()
    assert subscribed.wait(10)

    def stop() -> None:
        c.disconnect()
        c.loop_stop()

    return stop


def flow_mqtt(port: int, pipeline: Pipeline, tally: Tally, client_id: str, devnull: Any) -> Any:
    cfg = FlowConfig.model_validate(
        {
            "model": "digits",
            "source": {
                "type": "mqtt",
                "port": port,
                "topics": [TOPIC],
                "protocol": "5",
                "client_id": client_id,
                "persistent_session": True,
                "session_expiry": 600,
            },
            "sinks": [{"type": "stdout"}],
        }
    )
    flow = Flow(cfg, lambda: pipeline, sinks=[TallySink(tally, devnull)])
    flow.start()
    assert flow.source.subscribed.wait(10)  # type: ignore[attr-defined]
    return flow.stop


def prime(port: int, client_id: str) -> None:
    """A persistent session with the subscription, offline: the broker keeps what is published."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    done = threading.Event()
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.on_connect = lambda cl, *_: cl.subscribe(TOPIC, qos=1)
    c.on_subscribe = lambda *_: done.set()
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 600
    c.connect("127.0.0.1", port, clean_start=True, properties=props)
    c.loop_start()
    assert done.wait(10)
    c.disconnect()
    c.loop_stop()


def mqtt_bench(args: argparse.Namespace, tmp: Path) -> list[str]:
    missed: list[str] = []
    holdout = ROOT / "tests" / "fixtures" / "models" / "digits_holdout.npz"
    spec = PipelineSpec.model_validate(
        {
            "preprocess": [{"op": "scale", "factor": 1 / 16}, {"op": "layout", "target": "nhwc"}],
            "postprocess": [{"op": "softmax"}, {"op": "topk", "k": 3}],
        }
    )
    pipeline = Pipeline(load_model(DIGITS, threads=1), spec)
    broker = [start_broker(tmp)]
    print(f"\nMQTT: mosquitto on a free port with {BROKER}, QoS 1, MQTT 5, digits float TFLite, 1 thread")
    consumers = {"bare": bare_mqtt, "flow": flow_mqtt}

    def run(name: str, rate: float, count: int, devnull: Any) -> tuple[int, int, float]:
        """(published, processed, msg/s) of one consumer; rate 0: the broker is filled first."""
        for attempt in range(3):
            proc, port = broker[0]
            tally = Tally()
            cid = f"bench-{name}-{uuid.uuid4().hex[:6]}"
            try:
                prime(port, cid)
                pub = publish(port, 0, count, holdout) if not rate else None
                stop = consumers[name](port, pipeline, tally, cid, devnull)
                if rate:
                    pub = publish(port, rate, count, holdout)
                tally.settle(count, 120 if not rate else 30)
                stop()
            except (subprocess.CalledProcessError, AssertionError):
                try:
                    proc.wait(5)  # a broker stopped by a signal takes a moment to exit
                except subprocess.TimeoutExpired:
                    raise
                if attempt == 2:
                    raise
                # the shared machine: something outside the bench stopped our broker (seen twice)
                print(f"  (mosquitto was stopped from outside, exit {proc.returncode}: run again)")
                broker[0] = start_broker(tmp)
                continue
            assert pub is not None
            return pub["published"], tally.n, tally.n / max(tally.last - tally.first, 1e-9)
        raise AssertionError("unreachable")

    try:
        with open(os.devnull, "w") as devnull:
            print(f"{'rate msg/s':>11} {'consumer':>8} {'published':>9} {'processed':>9} {'lost':>6} {'msg/s':>8}")
            for rate in RATES:
                for name in consumers:
                    published, n, per_s = run(name, rate, int(rate * args.seconds), devnull)
                    lost = published - n
                    print(f"{rate:>11} {name:>8} {published:>9} {n:>9} {lost:>6} {per_s:>8.0f}")
                    if name == "flow" and lost:
                        missed.append(f"mqtt loss at {rate} msg/s")
            print(f"\nflat out: {args.burst} messages waiting in the broker (persistent session), then emptied")
            got: dict[str, float] = {}
            for rep in range(args.repeats):
                for name in consumers:
                    _, n, per_s = run(name, 0, args.burst, devnull)
                    got[name] = max(got.get(name, 0.0), per_s)
                    print(f"  run {rep + 1} {name:>5}: {n} processed, {per_s:8.0f} msg/s")
            ratio = got["flow"] / got["bare"]
            print(f"  best of {args.repeats}: bare {got['bare']:.0f} msg/s, flow {got['flow']:.0f} msg/s: {ratio:.2f}x")
            if ratio < 0.9:
                missed.append(f"mqtt flat out {ratio:.2f}x")
    finally:
        broker[0][0].terminate()
        broker[0][0].wait(10)
    return missed


# -- video --------------------------------------------------------------------------------------


def detector_onnx(path: Path) -> Path:
    """A YOLOv8-shaped conv net: 1x3x640x640 -> [1, 84, 8400] (heads at strides 8, 16, 32)."""
    from onnx import TensorProto, helper, numpy_helper, save

    rng = np.random.default_rng(0)
    nodes: list[Any] = []
    inits: list[Any] = []

    def conv(x: str, cin: int, cout: int, k: int, stride: int, name: str, relu: bool = True) -> str:
        w = (rng.standard_normal((cout, cin, k, k)) / np.sqrt(cin * k * k)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"{name}_w"))
        inits.append(numpy_helper.from_array(np.zeros(cout, np.float32), f"{name}_b"))
        nodes.append(
            helper.make_node(
                "Conv", [x, f"{name}_w", f"{name}_b"], [f"{name}_c"], strides=[stride] * 2, pads=[k // 2] * 4
            )
        )
        if not relu:
            return f"{name}_c"
        nodes.append(helper.make_node("Relu", [f"{name}_c"], [name]))
        return name

    h = conv("images", 3, 8, 3, 2, "s1")  # 320
    h = conv(h, 8, 16, 3, 2, "s2")  # 160
    p3 = conv(h, 16, 32, 3, 2, "s3")  # 80
    p4 = conv(p3, 32, 48, 3, 2, "s4")  # 40
    p5 = conv(p4, 48, 64, 3, 2, "s5")  # 20
    heads = []
    for i, (p, c) in enumerate([(p3, 32), (p4, 48), (p5, 64)]):
        o = conv(p, c, 84, 1, 1, f"head{i}", relu=False)
        inits.append(numpy_helper.from_array(np.array([1, 84, -1], np.int64), f"shape{i}"))
        nodes.append(helper.make_node("Reshape", [o, f"shape{i}"], [f"flat{i}"]))
        heads.append(f"flat{i}")
    nodes.append(helper.make_node("Concat", heads, ["cat"], axis=2))
    nodes.append(helper.make_node("Sigmoid", ["cat"], ["output0"]))
    graph = helper.make_graph(
        nodes,
        "detector",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 640, 640])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 84, 8400])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save(model, str(path))
    return path


def make_video(path: Path, frames: int, size: tuple[int, int] = (640, 480)) -> Path:
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, size)
    rng = np.random.default_rng(1)
    base = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    for i in range(frames):
        writer.write(np.roll(base, i * 4, axis=1))
    writer.release()
    return path


VIDEO_SPEC = {
    "preprocess": [
        {"op": "resize", "width": 640, "height": 640},
        {"op": "color", "source": "bgr", "target": "rgb"},
        {"op": "scale", "factor": 1 / 255},
        {"op": "layout", "target": "nchw"},
    ],
    "postprocess": [],
}


def bare_video(video: Path, model: Any) -> tuple[int, float]:
    import cv2

    cap = cv2.VideoCapture(str(video))
    n, t0 = 0, time.monotonic()
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        x = cv2.cvtColor(cv2.resize(frame, (640, 640)), cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0
        model.predict({"images": np.ascontiguousarray(x.transpose(2, 0, 1)[None])})
        n += 1
    cap.release()
    return n, time.monotonic() - t0


def flow_video(video: Path, pipeline: Pipeline, raw: bool, profile: cProfile.Profile | None) -> tuple[int, float]:
    tally = Tally()
    cfg = FlowConfig.model_validate(
        {
            "model": "detector",
            "source": {"type": "camera", "device": str(video), "realtime": False},
            "sinks": [{"type": "stdout"}],
            "raw_outputs": raw,
        }
    )

    class Profiled:
        def run(self, data: Any, raw_outputs: Any = None) -> dict[str, Any]:
            if profile is None:
                return pipeline.run(data, raw_outputs=raw_outputs)
            profile.enable()
            try:
                return pipeline.run(data, raw_outputs=raw_outputs)
            finally:
                profile.disable()

    with open(os.devnull, "w") as devnull:
        flow = Flow(cfg, lambda: Profiled(), sinks=[TallySink(tally, devnull)])
        t0 = time.monotonic()
        flow.start()
        assert flow.join(600)
        t1 = time.monotonic()
        flow.stop()
    return tally.n, t1 - t0


def video_bench(args: argparse.Namespace, tmp: Path) -> list[str]:
    missed: list[str] = []
    model = load_model(detector_onnx(tmp / "detector.onnx"), threads=args.threads)
    video = make_video(tmp / "video.avi", args.frames)
    pipeline = Pipeline(model, PipelineSpec.model_validate(VIDEO_SPEC))
    x = np.zeros((1, 3, 640, 640), np.float32)
    t0 = time.monotonic()
    for _ in range(10):
        model.predict({"images": x})
    invoke_ms = (time.monotonic() - t0) * 100
    print(f"\nvideo: {args.frames} frames 640x480 MJPG, detector 1x3x640x640 -> [1, 84, 8400], {invoke_ms:.1f} ms")
    print(f"       invoke, {args.threads} thread(s)")
    best: dict[str, float] = {}
    for rep in range(args.repeats):
        for name in ("bare", "flow"):
            n, secs = bare_video(video, model) if name == "bare" else flow_video(video, pipeline, False, None)
            best[name] = max(best.get(name, 0.0), n / secs)
            print(f"  run {rep + 1} {name:>8}: {n} frames, {n / secs:6.1f} fps")
    ratio = best["flow"] / best["bare"]
    print(f"  best of {args.repeats}: flow {best['flow']:.1f} fps / bare {best['bare']:.1f} fps = {ratio:.2f}x")
    if ratio < 0.9:
        missed.append(f"video {ratio:.2f}x")
    short = make_video(tmp / "short.avi", 10)  # raw outputs on: ~1 s a frame, so 10 frames
    n, secs = flow_video(short, pipeline, True, None)
    print(f"  raw outputs on (the old default), {n} frames: {n / secs:.1f} fps = {n / secs / best['bare']:.2f}x")
    if args.profile:
        prof = cProfile.Profile()
        flow_video(video, pipeline, False, prof)
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(14)
        print("\nprofile of the flow's pipeline.run (raw outputs off), cumulative:\n" + s.getvalue()[-3000:])
    return missed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=4.0, help="length of each fixed-rate run")
    ap.add_argument("--burst", type=int, default=20000, help="messages in the broker for the flat-out run")
    ap.add_argument("--frames", type=int, default=150, help="frames in the generated video")
    ap.add_argument("--repeats", type=int, default=3, help="flat-out and video runs per consumer (best counts)")
    ap.add_argument("--threads", type=int, default=1, help="runtime threads for the detector")
    ap.add_argument("--profile", action="store_true", help="cProfile the flow's pipeline")
    ap.add_argument("--only", choices=["mqtt", "video"], default=None)
    args = ap.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    missed: list[str] = []
    with tempfile.TemporaryDirectory() as d:
        if args.only in (None, "mqtt"):
            missed += mqtt_bench(args, Path(d))
        if args.only in (None, "video"):
            missed += video_bench(args, Path(d))
    print("\ngoals met" if not missed else f"\ngoals missed: {', '.join(missed)}")


if __name__ == "__main__":
    main()
