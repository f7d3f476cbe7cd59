"""The agent's idle footprint, as systemd runs it (``edgefleet agent run --config``): RSS with one
ONNX model loaded against a bare onnxruntime process holding the same model, and the agent's idle
CPU, measured in the same run.

Goal (issue 3): RSS within 25 MB of the bare process; idle CPU near zero.

Then what the TFLite interpreter pool costs (issue 9): ``edgefleet agent serve`` with a TFLite model,
RSS (VmRSS) after serial requests (one interpreter) and after concurrent clients have grown the pool to
its size (the cores available, at most 4), for the digits CNN and the ~1 ms dense model of
``bench/_models.py`` (4 MiB of weights).

    .venv/bin/python bench/agent_footprint.py [--idle 10]
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "tests" / "fixtures" / "models" / "digits_cnn_float.onnx"
BIN = Path(sys.executable).parent
CLK = os.sysconf("SC_CLK_TCK")

BARE = """
import sys, time, numpy as np, onnxruntime as ort
s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
s.run(None, {"input": np.zeros((1, 1, 8, 8), np.float32)})
print("ready", flush=True)
time.sleep(3600)
"""


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK  # utime + stime


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pool_cost(model: Path, clients: int = 4, requests: int = 200) -> str:
    """RSS of ``agent serve MODEL`` after serial requests and after ``clients`` concurrent ones."""
    import threading

    sys.path.insert(0, str(Path(__file__).parent))
    import numpy as np
    from api_roundtrip import bodies, timed, wait_http

    from edgefleet.agent import load_model

    spec = load_model(model, warmup=False).inputs[0]
    x = np.random.default_rng(0).random([d or 1 for d in spec.shape], dtype=np.float32)
    payload, headers = bodies({spec.name: x}, [])["binary"]
    port = free_port()
    agent = subprocess.Popen(
        [str(BIN / "edgefleet"), "agent", "serve", str(model), "--port", str(port), "--log-level", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"/v2/models/{model.stem}/infer"
    try:
        wait_http(port, "/v2/health/ready")
        c = http.client.HTTPConnection("127.0.0.1", port)
        for _ in range(requests):
            timed(c, url, payload, headers)
        serial = rss_mb(agent.pid)

        def client() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port)
            for _ in range(requests):
                timed(conn, url, payload, headers)

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        pooled = rss_mb(agent.pid)
        return (
            f"{model.name}: RSS {serial:.1f} MB after serial requests, {pooled:.1f} MB after {clients} "
            f"concurrent clients (pool of up to {min(4, len(os.sched_getaffinity(0)))}): {pooled - serial:+.1f} MB"
        )
    finally:
        agent.terminate()
        agent.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--idle", type=float, default=10.0, help="seconds of idle to measure CPU over")
    args = ap.parse_args()
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="edgefleet-footprint-"))
    config = tmp / "agent.toml"
    config.write_text(
        f'state_dir = "{tmp}"\nlog_level = "warning"\n[api]\nport = {port}\n[[models]]\npath = "{MODEL}"\n'
    )
    # What a device's systemd unit runs.
    agent = subprocess.Popen(
        [str(BIN / "edgefleet"), "agent", "run", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    bare = subprocess.Popen([str(BIN / "python"), "-c", BARE, str(MODEL)], stdout=subprocess.PIPE, text=True)
    try:
        assert bare.stdout is not None and agent.stdout is not None
        bare.stdout.readline()
        agent.stdout.readline()  # "ready: ..."
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        c.request("GET", "/v2/health/ready")
        assert c.getresponse().status == 200
        c.close()
        time.sleep(1.0)
        cpu0, t0 = cpu_seconds(agent.pid), time.monotonic()
        time.sleep(args.idle)
        cpu1, t1 = cpu_seconds(agent.pid), time.monotonic()
        agent_rss, bare_rss = rss_mb(agent.pid), rss_mb(bare.pid)
        idle_cpu = 100 * (cpu1 - cpu0) / (t1 - t0)
        print(f"model: {MODEL.name}")
        print(
            f"agent RSS {agent_rss:.1f} MB; bare onnxruntime RSS {bare_rss:.1f} MB; "
            f"difference {agent_rss - bare_rss:+.1f} MB"
        )
        print(f"agent idle CPU over {t1 - t0:.1f} s: {idle_cpu:.2f}% of one core")
        ok = agent_rss - bare_rss <= 25 and idle_cpu < 1.0
        print(f"within 25 MB and idle CPU < 1%: {'yes' if ok else 'NO'}")
    finally:
        for p in (agent, bare):
            p.terminate()
            p.wait(10)
    import _models

    print("\nTFLite interpreter pool:")
    print(pool_cost(ROOT / "tests" / "fixtures" / "models" / "digits_cnn_float.tflite"))
    print(pool_cost(_models.dense_tflite(tmp / "dense_tflite.tflite")))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
