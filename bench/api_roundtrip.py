"""The local inference API's cost and its throughput under concurrent clients, in one run.

1. Overhead: an OIP round trip minus the bare inference, against a bare Python ASGI round trip of
   the same body (uvicorn, no parsing), and against MLServer serving the same ONNX model with the
   same bodies. One client with kept-alive ``http.client`` connections alternates requests between
   the servers. Models: the digits CNN (one 1x1x8x8 input) and a sensor-shaped model (three inputs,
   one a scalar, ~100 µs); JSON and binary (OIP binary tensor extension) bodies.
   Goal: (OIP p50 - inference p50) / bare ASGI p50 <= 1.5.
2. Concurrency: 1/2/4/8 clients (threads, one kept-alive raw socket each, binary bodies) against
   a ~1 ms dense model, ONNX and TFLite, beside the in-process ceilings measured in the same run
   (the runtime's own call from 1 and from 2 threads: for TFLite one interpreter per thread, for
   ONNX one session). Goal: >= 0.8x the two-caller ceiling at 2+ clients.

All servers are real processes on loopback: the agent is ``edgefleet agent serve`` with
``--threads 1`` (what the agent's thread rule picks for these models, printed below); MLServer runs
from its own virtualenv (``--mlserver-venv``, default ``$EDGEFLEET_MLSERVER_VENV`` or
``.bench-venv``; ``pip install mlserver onnxruntime`` there) with a custom runtime that calls
onnxruntime (``bench/_mlserver_onnx.py``: PyPI has no ``mlserver-onnx``).

    .venv/bin/python bench/api_roundtrip.py [--runs 2000] [--seconds 3]
"""

from __future__ import annotations

import argparse
import functools
import http.client
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import _models

from edgefleet.agent import load_model
from edgefleet.agent.benchmark import summarize

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "tests" / "fixtures" / "models" / "digits_cnn_float.onnx"
BIN = Path(sys.executable).parent
HERE = Path(__file__).parent
Body = tuple[bytes, dict[str, str]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(port: int, path: str, timeout: float = 90, method: str = "GET") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request(method, path, body=b"{}" if method == "POST" else None)
            r = c.getresponse()
            r.read()
            if method == "POST" or r.status == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"server on port {port} did not become ready")


def timed(conn: http.client.HTTPConnection, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    t0 = time.perf_counter_ns()
    conn.request("POST", path, body=body, headers=headers)
    r = conn.getresponse()
    data = r.read()
    elapsed = time.perf_counter_ns() - t0
    if r.status != 200:
        raise RuntimeError(f"{path}: {r.status} {data[:200]!r}")
    return elapsed, data


def bodies(feeds: dict[str, np.ndarray[Any, Any]], outputs: list[str]) -> dict[str, Body]:
    """The same request as a JSON body and as an OIP binary body (binary outputs too)."""
    json_body = {
        "inputs": [
            {"name": n, "shape": list(a.shape), "datatype": "FP32", "data": a.reshape(-1).tolist()}
            for n, a in feeds.items()
        ]
    }
    head = json.dumps(
        {
            "inputs": [
                {"name": n, "shape": list(a.shape), "datatype": "FP32", "parameters": {"binary_data_size": a.nbytes}}
                for n, a in feeds.items()
            ],
            "outputs": [{"name": o, "parameters": {"binary_data": True}} for o in outputs],
        }
    ).encode()
    blob = b"".join(a.tobytes() for a in feeds.values())
    return {
        "json": (json.dumps(json_body).encode(), {"Content-Type": "application/json"}),
        "binary": (
            head + blob,
            {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"},
        ),
    }


def bare_p50_us(call: Callable[[], object], runs: int) -> float:
    ns = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        call()
        ns.append(time.perf_counter_ns() - t0)
    return float(summarize(ns)["p50_us"])


def machine_line() -> str:
    import onnxruntime

    from edgefleet.agent.backends.litert import _package_version

    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln),
        platform.processor(),
    )
    return (
        f"machine: {cpu}, {len(os.sched_getaffinity(0))} cores; Linux {platform.release()}; Python "
        f"{platform.python_version()}, numpy {np.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"ai-edge-litert {_package_version('ai_edge_litert')}"
    )


def start_mlserver(venv: Path, model: Path, work: Path) -> tuple[subprocess.Popen[bytes], int] | str:
    """MLServer serving ``model`` as ``sensor`` (parallel_workers 0: its default of 1 worker process
    fails to start on this Python, 'There is no current event loop'); or why it cannot run."""
    exe = venv / "bin" / "mlserver"
    if not exe.exists():
        return f"no MLServer at {exe} (python -m venv {venv} && {venv}/bin/pip install mlserver onnxruntime)"
    port = free_port()
    folder = work / "mlserver"
    (folder / "sensor").mkdir(parents=True)
    (folder / "settings.json").write_text(
        json.dumps(
            {
                "http_port": port,
                "grpc_port": free_port(),
                "metrics_port": free_port(),
                "parallel_workers": 0,
                "debug": False,
            }
        )
    )
    (folder / "sensor" / "model-settings.json").write_text(
        json.dumps({"name": "sensor", "implementation": "_mlserver_onnx.OnnxModel", "parameters": {"uri": str(model)}})
    )
    log = open(work / "mlserver.log", "wb")  # noqa: SIM115  (closed with the process)
    proc = subprocess.Popen(
        [str(exe), "start", str(folder)],
        env={**os.environ, "PYTHONPATH": str(HERE)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_http(port, "/v2/models/sensor/ready")
    except RuntimeError:
        proc.terminate()
        return f"MLServer did not become ready; see {work / 'mlserver.log'}"
    return proc, port


def overhead(
    args: argparse.Namespace, agent_port: int, mls: tuple[Any, int] | None, cases: list[tuple[str, str, Body, float]]
) -> list[str]:
    """Rows of the overhead table: for each (model, body) the agent, the bare ASGI floor and MLServer."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    lines = []
    for model, kind, (payload, headers), inf_us in cases:
        path = f"/v2/models/{model}/infer"
        conn = http.client.HTTPConnection("127.0.0.1", agent_port)
        _, sample = timed(conn, path, payload, headers)
        asgi_port = free_port()
        asgi = subprocess.Popen(
            [str(BIN / "python"), str(HERE / "_bare_asgi.py"), str(asgi_port), str(len(sample))], env=env
        )
        try:
            wait_http(asgi_port, "/", method="POST")
            sides: list[tuple[str, http.client.HTTPConnection, str, list[int]]] = [
                ("agent", conn, path, []),
                ("asgi", http.client.HTTPConnection("127.0.0.1", asgi_port), "/", []),
            ]
            mls_note = ""
            if mls is not None and model == "sensor":
                mconn = http.client.HTTPConnection("127.0.0.1", mls[1])
                try:
                    timed(mconn, "/v2/models/sensor/infer", payload, headers)
                    sides.append(("mlserver", mconn, "/v2/models/sensor/infer", []))
                except (RuntimeError, http.client.HTTPException, OSError) as e:
                    status = str(e).split(": ", 1)[-1][:30]
                    mls_note = f"MLServer: {status}; its REST API reads every body as JSON"
            for i in range(args.runs + 50):
                order = sides if i % 2 == 0 else sides[::-1]
                for _, c, p, sink in order:
                    ns, _ = timed(c, p, payload, headers)
                    if i >= 50:
                        sink.append(ns)
        finally:
            asgi.terminate()
            asgi.wait(10)
        stats = {name: summarize(sink) for name, _, _, sink in sides}
        floor = stats["asgi"]["p50_us"]
        row = (
            f"{model:16} {kind:7} {len(payload):6d} {len(sample):6d} {inf_us:7.1f} "
            f"{stats['agent']['p50_us']:8.1f} {stats['agent']['p99_us']:8.1f} {floor:8.1f} "
            f"{(stats['agent']['p50_us'] - inf_us) / floor:6.2f}"
        )
        if "mlserver" in stats:
            m = stats["mlserver"]["p50_us"]
            row += f" {m:9.1f} {(m - inf_us) / floor:6.2f}"
        lines.append(row + (f"   ({mls_note})" if mls_note else ""))
    return lines


def rate(workers: list[Callable[[], object]], seconds: float) -> float:
    """Calls per second of ``workers`` each looping on its own thread for ``seconds``."""
    stop = threading.Event()
    counts = [0] * len(workers)
    start = threading.Barrier(len(workers) + 1)

    def loop(k: int) -> None:
        call = workers[k]
        start.wait()
        n = 0
        while not stop.is_set():
            call()
            n += 1
        counts[k] = n

    threads = [threading.Thread(target=loop, args=(k,)) for k in range(len(workers))]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)")


class RawClient:
    """A keep-alive HTTP/1.1 client on a bare socket for the throughput runs: one prebuilt request,
    the response read by its Content-Length. ``http.client`` parses headers with the email package
    (~100 µs a response), CPU that the clients would take from the server on the same two cores."""

    def __init__(self, port: int, path: str, body: bytes, headers: dict[str, str]) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.request = (
            f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode() + body
        )
        self.buf = b""

    def __call__(self) -> None:
        self.sock.sendall(self.request)
        buf = self.buf
        while (end := buf.find(b"\r\n\r\n")) < 0:
            buf += self.sock.recv(1 << 17)
        head = buf[:end].lower()
        if not head.startswith(b"http/1.1 200"):
            raise RuntimeError(f"agent answered {head[:40]!r}")
        length = CONTENT_LENGTH.search(head)
        if length is None:
            raise RuntimeError("agent answered without a Content-Length")
        total = end + 4 + int(length.group(1))
        while len(buf) < total:
            buf += self.sock.recv(1 << 17)
        self.buf = buf[total:]

    def close(self) -> None:
        self.sock.close()


SLICE_S = 0.5  # throughput is measured in slices this long, every column in turn, then the median


def concurrency(args: argparse.Namespace, agent_port: int, models: dict[str, Path]) -> list[str]:
    """Rows of the throughput table. The ceilings and the client counts are measured in turns of
    :data:`SLICE_S` (ceiling 1, ceiling 2, 1, 2, 4, 8 clients, again...) and each column reports its
    median slice, so load from other work on the machine falls on every column alike."""
    x = np.random.default_rng(3).random((32, 512), dtype=np.float32)
    payload, headers = bodies({"x": x}, ["y"])["binary"]
    lines = []
    slices = max(1, round(args.seconds / SLICE_S))
    for name, path in models.items():
        # ceilings: the runtime's own call, from 1 and 2 threads (a TFLite interpreter per thread)
        m1 = load_model(path, threads=1)
        m2 = load_model(path, threads=1) if path.suffix == ".tflite" else m1
        feeds = {"x": x}
        calls = [functools.partial(m.bare_callable(), feeds) for m in (m1, m2)]
        url = f"/v2/models/{name}/infer"
        conns = {n: [RawClient(agent_port, url, payload, headers) for _ in range(n)] for n in (1, 2, 4, 8)}
        columns: dict[str, list[Callable[[], object]]] = {"ceil 1": calls[:1], "ceil 2": calls}
        for n, cs in conns.items():
            for c in cs:
                c()
            columns[str(n)] = list(cs)
        got: dict[str, list[float]] = {k: [] for k in columns}
        for _ in range(slices):
            for key, workers in columns.items():
                got[key].append(rate(workers, SLICE_S))
        med = {k: float(np.median(v)) for k, v in got.items()}
        for cs in conns.values():
            for c in cs:
                c.close()
        del m1, m2, calls
        ceil2 = med["ceil 2"]
        cells = [f"{med[str(n)]:7.0f} {med[str(n)] / ceil2:5.2f}x" for n in (1, 2, 4, 8)]
        lines.append(f"{name:13} {med['ceil 1']:8.0f} {ceil2:8.0f}  " + "  ".join(cells))
    return lines


def pool_effect(args: argparse.Namespace, path: Path) -> str:
    """``Model.predict`` from 1 and 2 threads with one interpreter behind the lock (pool_size 1, as
    before issue 9) and with a pool of 2, in interleaved slices: what the pool alone changes."""
    x = np.random.default_rng(3).random((32, 512), dtype=np.float32)
    one = load_model(path, threads=1, pool_size=1)
    two = load_model(path, threads=1, pool_size=2)
    columns = {
        "pool 1, 1 thread": [functools.partial(one.predict, {"x": x})],
        "pool 1, 2 threads": [functools.partial(one.predict, {"x": x})] * 2,
        "pool 2, 2 threads": [functools.partial(two.predict, {"x": x})] * 2,
    }
    got: dict[str, list[float]] = {k: [] for k in columns}
    for _ in range(max(1, round(args.seconds / SLICE_S))):
        for key, workers in columns.items():
            got[key].append(rate(workers, SLICE_S))
    return "  ".join(f"{k}: {float(np.median(v)):.0f}/s" for k, v in got.items())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=2000, help="timed requests per side and case")
    ap.add_argument("--seconds", type=float, default=3.0, help="length of each throughput measurement")
    ap.add_argument(
        "--mlserver-venv", type=Path, default=Path(os.environ.get("EDGEFLEET_MLSERVER_VENV", ROOT / ".bench-venv"))
    )
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgefleet-api-bench-"))
    sensor = _models.sensor_onnx(work / "sensor.onnx")
    dense = {
        "dense_onnx": _models.dense_onnx(work / "dense_onnx.onnx"),
        "dense_tflite": _models.dense_tflite(work / "dense_tflite.tflite"),
    }
    print(machine_line())
    chosen = {p.stem: load_model(p, max_threads=len(os.sched_getaffinity(0))).info() for p in (DIGITS, sensor)}
    chosen["dense_onnx"] = load_model(dense["dense_onnx"], max_threads=len(os.sched_getaffinity(0))).info()
    print("thread rule's choice: " + ", ".join(f"{k} {v['threads']} thread(s)" for k, v in chosen.items()))

    digits_x = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)
    sensor_x = _models.sensor_inputs()
    cases: list[tuple[str, str, Body, float]] = []
    for model, path, feeds, outs in (
        ("digits_cnn_float", DIGITS, {"input": digits_x}, ["logits"]),
        ("sensor", sensor, sensor_x, ["scores"]),
    ):
        bare = load_model(path, threads=1).bare_callable()
        inf = bare_p50_us(lambda bare=bare, feeds=feeds: bare(feeds), args.runs)
        for kind, body in bodies(feeds, outs).items():
            cases.append((model, kind, body, inf))

    agent_port = free_port()
    models = [str(DIGITS), str(sensor), *map(str, dense.values())]
    options = ["--port", str(agent_port), "--threads", "1", "--log-level", "warning"]
    agent = subprocess.Popen(
        [str(BIN / "edgefleet"), "agent", "serve", *models, *options],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    procs: list[subprocess.Popen[bytes]] = [agent]
    try:
        mls = start_mlserver(args.mlserver_venv, sensor, work)
        if isinstance(mls, str):
            print(f"MLServer: not run: {mls}")
            mls = None
        else:
            procs.append(mls[0])
        wait_http(agent_port, "/v2/health/ready")
        rows = overhead(args, agent_port, mls, cases)
        print(f"\n1. overhead; runs per side: {args.runs}; latencies in µs; ratio = (p50 - inference p50) / ASGI p50")
        print(
            f"{'model':16} {'body':7} {'req B':>6} {'resp B':>6} {'infer':>7} {'OIP p50':>8} {'OIP p99':>8} "
            f"{'ASGI p50':>8} {'ratio':>6} {'MLS p50':>9} {'ratio':>6}"
        )
        print("\n".join(rows))
        print(
            f"\n2. throughput, requests/s; median of {SLICE_S:g} s slices taken in turns, {args.seconds:g} s per "
            "column; binary bodies; x = / two-caller ceiling"
        )
        heads = "  ".join(f"{f'{n} client(s)':>14}" for n in (1, 2, 4, 8))
        print(f"{'model':13} {'ceil 1':>8} {'ceil 2':>8}  {heads}")
        print("\n".join(concurrency(args, agent_port, dense)))
        print(f"\n3. in-process Model.predict on {dense['dense_tflite'].name}, calls/s (median slices)")
        print(pool_effect(args, dense["dense_tflite"]))
        return 0
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
