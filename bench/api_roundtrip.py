"""The local inference API's cost: an OIP round trip minus the bare inference, against a bare Python
ASGI round trip of the same body (uvicorn, no parsing), measured in the same run.

Both servers are real processes on loopback; one client with a kept-alive ``http.client``
connection alternates requests between them. The bare inference is the runtime's own call on the
same input, timed in this process. Goal (issue 3): (OIP p50 - inference p50) / bare ASGI p50 <= 1.5.

    .venv/bin/python bench/api_roundtrip.py [--runs 2000]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from edgefleet.agent import load_model
from edgefleet.agent.benchmark import summarize

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "tests" / "fixtures" / "models" / "digits_cnn_float.onnx"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(port: int, path: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", path)
            if c.getresponse().status == 200:
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=2000)
    args = ap.parse_args()

    x = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)
    cases: dict[str, tuple[bytes, dict[str, str]]] = {}
    body = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": x.reshape(-1).tolist()}]}
    cases["json"] = (json.dumps(body).encode(), {"Content-Type": "application/json"})
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 1, 8, 8],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
        }
    ).encode()
    cases["binary"] = (
        head + x.tobytes(),
        {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"},
    )

    model = load_model(MODEL)
    bare = model.bare_callable()
    feeds = {"input": x}
    inf_ns = []
    for _ in range(args.runs):
        t0 = time.perf_counter_ns()
        bare(feeds)
        inf_ns.append(time.perf_counter_ns() - t0)
    inference = summarize(inf_ns)

    agent_port, asgi_port = free_port(), free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    agent = subprocess.Popen(
        [str(BIN / "edgefleet"), "agent", "serve", str(MODEL), "--port", str(agent_port), "--log-level", "warning"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    procs = [agent]
    try:
        wait_http(agent_port, "/v2/health/ready")
        rows = []
        for case, (payload, headers) in cases.items():
            conn = http.client.HTTPConnection("127.0.0.1", agent_port)
            _, sample = timed(conn, "/v2/models/digits_cnn_float/infer", payload, headers)
            asgi = subprocess.Popen(
                [str(BIN / "python"), str(Path(__file__).parent / "_bare_asgi.py"), str(asgi_port), str(len(sample))],
                env=env,
            )
            procs.append(asgi)
            wait_http_post(asgi_port)
            bconn = http.client.HTTPConnection("127.0.0.1", asgi_port)
            oip_ns, asgi_ns = [], []
            for i in range(args.runs + 50):
                pair = ((conn, "/v2/models/digits_cnn_float/infer", oip_ns), (bconn, "/", asgi_ns))
                for c, path, sink in pair if i % 2 == 0 else pair[::-1]:
                    ns, _ = timed(c, path, payload, headers)
                    if i >= 50:
                        sink.append(ns)
            asgi.terminate()
            asgi.wait(10)
            asgi_port = free_port()
            oip, floor = summarize(oip_ns), summarize(asgi_ns)
            ratio = (oip["p50_us"] - inference["p50_us"]) / floor["p50_us"]
            rows.append((case, len(payload), len(sample), oip, floor, ratio))
        print(f"model: {MODEL.name}; runs per side: {args.runs}; bare inference p50 {inference['p50_us']:.1f} µs")
        print(
            f"{'body':8} {'req B':>6} {'resp B':>7} {'OIP p50':>9} {'OIP p99':>9} {'ASGI p50':>9} {'ASGI p99':>9} "
            f"{'(OIP-inf)/ASGI':>15}"
        )
        ok = True
        for case, req_b, resp_b, oip, floor, ratio in rows:
            ok &= ratio <= 1.5
            print(
                f"{case:8} {req_b:6d} {resp_b:7d} {oip['p50_us']:9.1f} {oip['p99_us']:9.1f} {floor['p50_us']:9.1f} "
                f"{floor['p99_us']:9.1f} {ratio:15.2f}"
            )
        print(f"\nOIP overhead within 1.5x of a bare ASGI round trip: {'yes' if ok else 'NO'}")
        return 0 if ok else 1
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def wait_http_post(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("POST", "/", body=b"{}")
            c.getresponse().read()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"bare ASGI server on port {port} did not start")


if __name__ == "__main__":
    sys.exit(main())
