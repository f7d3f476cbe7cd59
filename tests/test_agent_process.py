"""The agent as a real process: systemd notifications, watchdog, and a graceful SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from _support import digits_bundle, free_port, wait_until

EDGEFLEET = shutil.which("edgefleet", path=str(Path(sys.executable).parent)) or "edgefleet"


class NotifyListener:
    """A NOTIFY_SOCKET like systemd's: a datagram socket collecting what the agent sends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []

    def wait_for(self, text: str, timeout: float = 60) -> float:
        """Receive until a datagram containing ``text`` arrives; returns its arrival time."""
        deadline = time.monotonic() + timeout
        for t, m in self.messages:
            if text in m:
                return t
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            now = time.monotonic()
            self.messages.append((now, data))
            if text in data:
                return now
        raise AssertionError(f"no {text!r} within {timeout}s; got {[m for _, m in self.messages]}")

    def count(self, text: str) -> int:
        return sum(text in m for _, m in self.messages)


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    lst = NotifyListener(tmp_path / "notify.sock")
    yield lst
    lst.sock.close()


def start_agent(models: list[Path], port: int, env: dict[str, str], uds: Path | None = None) -> subprocess.Popen[str]:
    args = [EDGEFLEET, "agent", "serve", *map(str, models), "--port", str(port)]
    if uds is not None:
        args += ["--uds", str(uds)]
    return subprocess.Popen(args, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_ready_after_warm_up_watchdog_and_stopping(listener: NotifyListener, models_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    uds = tmp_path / "agent.sock"
    env = {"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "400000"}
    proc = start_agent([models_dir / "digits_cnn_int8.tflite", models_dir / "multi_io.onnx"], port, env, uds)
    try:
        listener.wait_for("READY=1")
        # READY means every model is loaded and warmed: the API answers ready at once, on both listeners.
        assert httpx.get(f"http://127.0.0.1:{port}/v2/health/ready").status_code == 200
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(uds))) as c:
            assert c.get("http://agent/v2/models/multi_io/ready").status_code == 200
        loading = [t for t, m in listener.messages if "STATUS=loading" in m]
        ready = listener.wait_for("READY=1")
        assert loading and max(loading) <= ready
        # WATCHDOG=1 at half the 0.4 s interval, from the serving loop.
        for _ in range(3):
            listener.messages = [(t, m) for t, m in listener.messages if "WATCHDOG=1" not in m]
            listener.wait_for("WATCHDOG=1", timeout=5)
        proc.send_signal(signal.SIGTERM)
        listener.wait_for("STOPPING=1")
        assert proc.wait(30) == 0
        assert not uds.exists(), "the Unix socket is removed on exit"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _in_flight(port: int) -> int:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    line = next(line for line in text.splitlines() if line.startswith("edgefleet_requests_in_flight "))
    return int(float(line.split()[1])) - 1  # not counting this scrape


def test_sigterm_finishes_requests_in_flight_then_exits_0(listener: NotifyListener, models_dir: Path) -> None:
    port = free_port()
    proc = start_agent([models_dir / "digits_cnn_float.onnx"], port, {"NOTIFY_SOCKET": str(listener.path)})
    try:
        listener.wait_for("READY=1")
        batch = np.random.default_rng(1).random((60000, 1, 8, 8), dtype=np.float32)  # a slow request
        head = json.dumps(
            {
                "inputs": [
                    {
                        "name": "input",
                        "shape": list(batch.shape),
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": batch.nbytes},
                    }
                ],
                "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
            }
        ).encode()
        result: dict[str, Any] = {}

        def slow_request() -> None:
            r = httpx.post(
                f"http://127.0.0.1:{port}/v2/models/digits_cnn_float/infer",
                content=head + batch.tobytes(),
                headers={"Inference-Header-Content-Length": str(len(head))},
                timeout=120,
            )
            result["status"] = r.status_code
            result["size"] = len(r.content)

        t = threading.Thread(target=slow_request)
        t.start()
        deadline = time.monotonic() + 30
        while _in_flight(port) < 1:
            assert time.monotonic() < deadline, "the request never got in flight"
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        t.join(120)
        assert result.get("status") == 200, result
        assert result["size"] > 60000 * 10 * 4  # the whole logits tensor came back
        assert proc.wait(30) == 0
        assert listener.count("STOPPING=1") or listener.wait_for("STOPPING=1", timeout=1)
        _, err = proc.communicate()
        assert "finishing 1 request(s) in flight" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_model_exits_non_zero_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not a model")
    r = subprocess.run(
        [EDGEFLEET, "agent", "serve", str(bad), "--port", str(free_port())], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 1
    assert f"error: {bad}: not a loadable ONNX model" in r.stderr
    assert "Traceback" not in r.stderr


def test_port_in_use_is_a_clear_error(models_dir: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run(
            [EDGEFLEET, "agent", "serve", str(models_dir / "multi_io.onnx"), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert r.returncode == 1
    assert f"error: api: cannot listen on 127.0.0.1:{port}" in r.stderr


def test_agent_run_config_folder_flow_to_jsonl(models_dir: Path, holdout: Any, tmp_path: Path) -> None:
    """agent run --config: a bundle served over the API and fed by a folder flow writing JSON lines."""
    x, y = holdout
    bundle = digits_bundle(tmp_path, top_k=1)
    inbox, out = tmp_path / "inbox", tmp_path / "predictions.jsonl"
    inbox.mkdir()
    port = free_port()
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"""
device_id = "test-device"
state_dir = "state"
[api]
port = {port}
[[models]]
path = "{bundle}"
[[flows]]
name = "inbox"
model = "digits"
source = {{ type = "folder", path = "{inbox}", poll_interval = 0.05 }}
sinks = [{{ type = "jsonl", path = "{out}" }}]
""")
    proc = subprocess.Popen(
        [EDGEFLEET, "agent", "run", "--config", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert "ready" in proc.stdout.readline()
        for i in range(10):
            np.save(inbox / f"digit{i}.npy", x[i].astype(np.float32))
        deadline = time.monotonic() + 60
        lines: list[dict[str, Any]] = []
        while len(lines) < 10:
            assert time.monotonic() < deadline, f"only {len(lines)} predictions"
            time.sleep(0.05)
            lines = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
        by_file = {r["meta"]["file"]: r["top_k"][0]["index"] for r in lines}
        assert sum(by_file[f"digit{i}.npy"] == y[i] for i in range(10)) >= 8
        assert _listening_tcp_ports(proc.pid) == {port}  # (what the api-disabled test checks is empty)
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert 'edgefleet_flow_items{counter="processed",flow="inbox",stage="flow"} 10.0' in metrics
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _ask(sock: socket.socket, host: str, origin: str | None = None) -> int:
    head = f"GET /v2/health/ready HTTP/1.1\r\nHost: {host}\r\n" + (f"Origin: {origin}\r\n" if origin else "")
    with sock:
        sock.settimeout(10)
        sock.sendall((head + "Connection: close\r\n\r\n").encode())
        answer = b""
        while data := sock.recv(4096):
            answer += data
    return int(answer.split()[1])


def test_allow_lists_in_agent_toml_reach_the_server_and_the_unix_socket_skips_the_host_check(
    tmp_path: Path, models_dir: Path
) -> None:
    port = free_port()
    uds = tmp_path / "agent.sock"
    config = tmp_path / "agent.toml"
    config.write_text(
        f'state_dir = "state"\n\n[api]\nport = {port}\nuds = "{uds}"\n'
        'allowed_hosts = ["pi-0042.local"]\nallowed_origins = ["http://localhost:3000"]\n\n'
        f'[[models]]\npath = "{models_dir / "multi_io.onnx"}"\n'
    )
    proc = subprocess.Popen([EDGEFLEET, "agent", "run", "--config", str(config)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("ready:")

        def tcp() -> socket.socket:
            return socket.create_connection(("127.0.0.1", port))

        def unix() -> socket.socket:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(uds))
            return s

        assert _ask(tcp(), f"127.0.0.1:{port}") == 200
        assert _ask(tcp(), "pi-0042.local:8500") == 200
        assert _ask(tcp(), "evil.example") == 421
        assert _ask(tcp(), "localhost", "http://localhost:3000") == 200
        assert _ask(tcp(), "localhost", "http://localhost:3001") == 403
        assert _ask(unix(), "evil.example") == 200  # no browser reaches a Unix socket
        assert _ask(unix(), "localhost", "http://evil.example") == 403
    finally:
        proc.terminate()
        proc.wait(30)
        if proc.stdout:
            proc.stdout.close()


def _listening_tcp_ports(pid: int) -> set[int]:
    """TCP ports process ``pid`` listens on: its socket inodes matched in /proc/net/tcp{,6} (state 0A)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:
                    ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def test_api_disabled_runs_a_folder_flow_without_opening_any_port(
    models_dir: Path, holdout: Any, tmp_path: Path
) -> None:
    """[api] enabled = false: a real `agent run` processes files from its folder flow, and the process
    listens on no TCP port (the configured one refuses connections) and makes no Unix socket."""
    x, _ = holdout
    bundle = digits_bundle(tmp_path, top_k=1)
    inbox, out = tmp_path / "inbox", tmp_path / "predictions.jsonl"
    inbox.mkdir()
    port, uds = free_port(), tmp_path / "agent.sock"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"""
state_dir = "state"
[api]
enabled = false
port = {port}
uds = "{uds}"
[[models]]
path = "{bundle}"
[[flows]]
name = "inbox"
model = "digits"
source = {{ type = "folder", path = "{inbox}", poll_interval = 0.05 }}
sinks = [{{ type = "jsonl", path = "{out}" }}]
""")
    proc = subprocess.Popen(
        [EDGEFLEET, "agent", "run", "--config", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("ready: 1 model(s), 1 flow(s)") and "api.enabled = false" in line, line
        np.save(inbox / "digit0.npy", x[0].astype(np.float32))
        assert wait_until(lambda: out.exists() and out.read_text().count("\n") >= 1, timeout=60)
        result = json.loads(out.read_text().splitlines()[0])
        assert result["meta"]["file"] == "digit0.npy" and result["top_k"][0]["label"] is not None
        assert _listening_tcp_ports(proc.pid) == set()
        with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        assert not uds.exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
