"""Hostile clients of a real agent process (`edgefleet agent serve`): while each one pushes, the
agent's resident memory (read from /proc) grows by at most the route's body limit + 64 MiB, and
`/v2/health/ready` keeps answering 200. Limits are set small on the command line to keep this fast.

Each test records its figure (peak RSS growth, MiB) in the ``FIGURES`` dict, printed at the end of
the module (``pytest -s``) for the issue's report.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _support import MODELS, free_port

EDGEFLEET = str(Path(sys.executable).parent / "edgefleet")
MIB = 1 << 20
BODY_LIMIT = 8 * MIB  # binary bodies (--max-body-bytes)
JSON_LIMIT = 1 * MIB  # JSON bodies (--max-json-bytes)
BUDGET = 16 * MIB  # all connections together (--max-buffered-bytes)
CONNECTIONS = 32  # --max-connections
HEADER_TIMEOUT = 1.5  # s, EDGEFLEET_AGENT__API__HEADER_TIMEOUT
REQUEST_TIMEOUT = 4.0  # s, EDGEFLEET_AGENT__API__REQUEST_TIMEOUT
PUSH_SECONDS = 3.0  # how long each hostile client pushes
FIGURES: dict[str, float] = {}

INFER = "/v2/models/multi_io/infer"
GOOD = json.dumps(
    {
        "inputs": [
            {"name": "features", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]},
            {"name": "scale", "shape": [], "datatype": "INT64", "data": [2]},
        ]
    }
).encode()

if not Path("/proc/self/status").exists():
    if os.environ.get("CI") == "true":
        raise RuntimeError("these tests read RSS from /proc, which this CI machine lacks")
    pytest.skip("these tests read the agent's RSS from /proc (Linux only)", allow_module_level=True)


class Agent:
    def __init__(self, proc: subprocess.Popen[str], port: int) -> None:
        self.proc, self.port = proc, port
        self.url = f"http://127.0.0.1:{port}"

    def status(self, field: str) -> int:
        """A /proc/PID/status figure (VmRSS, VmHWM), bytes."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"no {field} in /proc/{self.proc.pid}/status")

    def connect(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        return s


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    port = free_port()
    env = {
        **os.environ,
        "EDGEFLEET_AGENT__API__HEADER_TIMEOUT": str(HEADER_TIMEOUT),
        "EDGEFLEET_AGENT__API__REQUEST_TIMEOUT": str(REQUEST_TIMEOUT),
        "EDGEFLEET_AGENT__API__KEEPALIVE_TIMEOUT": str(REQUEST_TIMEOUT),
    }
    log = (tmp_path_factory.mktemp("agent") / "agent.log").open("w")
    # fmt: off
    proc = subprocess.Popen(
        [
            EDGEFLEET, "agent", "serve", str(MODELS / "multi_io.onnx"), "--port", str(port),
            "--max-body-bytes", str(BODY_LIMIT), "--max-json-bytes", str(JSON_LIMIT),
            "--max-buffered-bytes", str(BUDGET), "--max-connections", str(CONNECTIONS), "--log-level", "warning",
        ],
        stdout=subprocess.PIPE, stderr=log, text=True, env=env,
    )
    # fmt: on
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "ready: ..." once the model is loaded and the port is open
        assert line.startswith("ready:"), (line, Path(log.name).read_text())
        yield Agent(proc, port)
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
        text = Path(log.name).read_text()
        assert "Traceback" not in text, text


@pytest.fixture(scope="module", autouse=True)
def _report_figures() -> Iterator[None]:
    yield
    print("\nRSS growth under each hostile client (MiB):", json.dumps(FIGURES, indent=1))


class Watch:
    """While a hostile client runs: sample the agent's RSS and probe /v2/health/ready in threads."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.done = threading.Event()
        self.peak = 0
        self.ready_ok = 0
        self.ready_bad: list[str] = []
        self.threads = [threading.Thread(target=self._sample), threading.Thread(target=self._probe)]

    def _sample(self) -> None:
        while not self.done.wait(0.01):
            self.peak = max(self.peak, self.agent.status("VmRSS"))

    def _probe(self) -> None:
        with httpx.Client(base_url=self.agent.url, timeout=10) as client:
            while not self.done.wait(0.1):
                try:
                    r = client.get("/v2/health/ready")
                except httpx.HTTPError as e:
                    self.ready_bad.append(repr(e))
                    continue
                if r.status_code == 200 and r.json() == {"ready": True}:
                    self.ready_ok += 1
                else:
                    self.ready_bad.append(f"{r.status_code} {r.text}")

    def __enter__(self) -> Watch:
        # VmHWM is reset (clear_refs 5), so that it holds this test's peak, including bursts too
        # short for the sampler to see.
        Path(f"/proc/{self.agent.proc.pid}/clear_refs").write_text("5")
        self.base = self.agent.status("VmRSS")
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        for t in self.threads:
            t.join()

    def check(self, name: str, route_limit: int) -> None:
        peak = max(self.peak, self.agent.status("VmHWM"))
        growth = (peak - self.base) / MIB
        FIGURES[name] = round(growth, 1)
        assert self.agent.proc.poll() is None, "the agent died"
        assert growth <= route_limit / MIB + 64, f"{name}: RSS grew {growth:.0f} MiB"
        assert self.ready_ok >= 1 and not self.ready_bad, (self.ready_ok, self.ready_bad[:3])


def push(clients: int, one: Callable[[], None]) -> None:
    """Run ``one`` over and over from ``clients`` threads for PUSH_SECONDS."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def loop() -> None:
        while not stop.is_set():
            try:
                one()
            except BaseException as e:  # reported below, in the test's thread
                errors.append(e)
                stop.set()

    threads = [threading.Thread(target=loop) for _ in range(clients)]
    for t in threads:
        t.start()
    stop.wait(PUSH_SECONDS)
    stop.set()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def exchange(agent: Agent, payload: bytes) -> tuple[int, dict[str, Any]]:
    """Send raw bytes on a new connection; (status, JSON body) of the answer (the body must be JSON)."""
    with agent.connect() as s:
        try:
            s.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused early: the answer is already waiting
        chunks = []
        try:
            while data := s.recv(65536):
                chunks.append(data)
        except ConnectionResetError:
            pass
    answer = b"".join(chunks)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 "), answer[:200]
    return int(head.split()[1]), json.loads(body)


def post(path: str, body: bytes, *headers: str, length: int | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body) if length is None else length}"]
    return ("\r\n".join([*lines, *headers, "Connection: close"]) + "\r\n\r\n").encode() + body


def test_gzip_bomb_is_cut_at_the_decoded_limit_off_the_event_loop(agent: Agent) -> None:
    bomb = gzip.compress(b" " * (60 * MIB), 9)  # 61 KB on the wire, 60 MiB decoded
    assert len(bomb) < 100_000

    def one() -> None:
        status, body = exchange(agent, post(INFER, bomb, "Content-Type: application/json", "Content-Encoding: gzip"))
        assert status == 413 and "decompressed body is over" in body["error"], body

    with Watch(agent) as w:
        push(4, one)
    w.check("gzip bomb, JSON route", JSON_LIMIT)


def test_gzip_bomb_to_the_binary_route_is_cut_at_its_limit(agent: Agent) -> None:
    bomb = gzip.compress(b"\0" * (60 * MIB), 9)

    def one() -> None:
        payload = post(INFER, bomb, "Content-Type: application/octet-stream", "Content-Encoding: gzip")
        status, body = exchange(agent, payload)
        assert status in (413, 503), body  # over the limit, or no room in the budget right now

    with Watch(agent) as w:
        push(4, one)
    w.check("gzip bomb, binary route", BODY_LIMIT)


def test_unfinished_large_bodies_are_bounded_by_the_global_budget(agent: Agent) -> None:
    """Eight connections each start a body just under the binary limit and never finish it: the
    budget lets two in, the rest get a 503 before their bytes are buffered, and the request deadline
    ends the two."""
    refused = 0

    def one() -> None:
        nonlocal refused
        socks = []
        for _ in range(8):
            s = agent.connect()
            head = post(INFER, b"", "Content-Type: application/octet-stream", length=BODY_LIMIT - 1)
            s.sendall(head)
            socks.append(s)
        for s in socks:
            try:
                s.sendall(b"\0" * (BODY_LIMIT - 1024 * 1024))
            except (BrokenPipeError, ConnectionResetError):
                refused += 1
        for s in socks:
            s.close()

    with Watch(agent) as w:
        push(1, one)
    w.check("8 unfinished bodies", BODY_LIMIT)


def test_chunked_bodies_without_end_are_charged_as_they_arrive(agent: Agent) -> None:
    def one() -> None:
        socks = []
        for _ in range(8):
            s = agent.connect()
            s.sendall(
                f"POST {INFER} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/octet-stream\r\n"
                "Transfer-Encoding: chunked\r\n\r\n".encode()
            )
            socks.append(s)
        chunk = f"{MIB:x}\r\n".encode() + b"\0" * MIB + b"\r\n"
        for s in socks:
            try:
                for _ in range(6):
                    s.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass
        for s in socks:
            s.close()

    with Watch(agent) as w:
        push(1, one)
    w.check("8 unfinished chunked bodies", BODY_LIMIT)


def test_slowloris_headers_are_cut_by_the_header_deadline(agent: Agent) -> None:
    socks = [agent.connect() for _ in range(CONNECTIONS * 2)]
    with Watch(agent) as w:
        stop = threading.Event()
        line = b"GET /v2/health/ready HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 10_000
        for i in range(int(PUSH_SECONDS / 0.1)):
            for s in socks:
                try:
                    s.send(line[i : i + 1])
                except OSError:
                    pass
            stop.wait(0.1)
    w.check("slowloris, 64 connections", JSON_LIMIT)
    for s in socks:  # every one was closed by the agent (EOF or reset), none got an answer
        s.settimeout(30)
        try:
            assert s.recv(100) == b""
        except ConnectionResetError:
            pass
        s.close()


def test_connection_flood_evicts_idle_connections_and_health_answers(agent: Agent) -> None:
    with Watch(agent) as w:
        socks: list[socket.socket] = []

        def one() -> None:
            socks.append(agent.connect())
            if len(socks) > 300:
                for s in socks[:100]:
                    s.close()
                del socks[:100]

        push(2, one)
        for s in socks:
            s.close()
    w.check("connection flood", JSON_LIMIT)


def test_large_json_bodies_are_parsed_off_the_event_loop(agent: Agent) -> None:
    numbers = json.dumps({"inputs": [{"name": "features", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}],
                          "pad": list(range(100_000))}).encode()  # fmt: skip
    assert len(numbers) < JSON_LIMIT

    def one() -> None:
        status, body = exchange(agent, post(INFER, numbers, "Content-Type: application/json"))
        assert status == 400 and "missing input(s) ['scale']" in body["error"], body

    with Watch(agent) as w:
        push(8, one)
    w.check("large JSON bodies", JSON_LIMIT)


@pytest.mark.parametrize("depth", [100, 5_000, 400_000])
def test_deeply_nested_json_is_a_400_with_a_json_error(agent: Agent, depth: int) -> None:
    nested = "[" * depth + "]" * depth
    body = f'{{"inputs": [{{"name": "features", "shape": [1, 2], "datatype": "FP32", "data": {nested}}}]}}'.encode()
    status, answer = exchange(agent, post(INFER, body, "Content-Type: application/json"))
    assert status == 400, answer
    assert isinstance(answer["error"], str)


def test_json_over_its_limit_is_refused_while_binary_of_that_size_is_not(agent: Agent) -> None:
    big = b" " * (JSON_LIMIT + 1)
    status, answer = exchange(agent, post(INFER, big, "Content-Type: application/json"))
    assert status == 413 and f"over the {JSON_LIMIT}-byte JSON limit" in answer["error"]
    head = GOOD
    payload = head + b" " * 0
    status, answer = exchange(
        agent,
        post(
            INFER,
            payload + b"\0" * (JSON_LIMIT + 1),
            "Content-Type: application/octet-stream",
            f"Inference-Header-Content-Length: {len(head)}",
        ),
    )
    assert status == 400 and "bytes of binary data are not claimed" in answer["error"], answer


@pytest.mark.parametrize(
    ("headers", "status", "message"),
    [
        (["Host: evil.example"], 421, "Host 'evil.example' is not allowed"),
        (["Host: evil.example:8500"], 421, "Host 'evil.example' is not allowed"),
        (["Host: 127.0.0.1", "Origin: http://evil.example"], 403, "Origin 'http://evil.example' is not allowed"),
        (["Host: localhost", "Origin: null"], 403, "Origin 'null' is not allowed"),
        (["Host: [::1]", "Content-Type: text/plain"], 415, "Content-Type 'text/plain' is not accepted"),
        (["Host: localhost", "Content-Type: application/x-www-form-urlencoded"], 415, "is not accepted"),
        (["Host: localhost", "Content-Type: multipart/form-data; boundary=x"], 415, "is not accepted"),
        (["Host: localhost", "Content-Encoding: br"], 415, "unsupported Content-Encoding 'br'"),
    ],
)
def test_browser_reachable_requests_are_refused_with_a_json_error(
    agent: Agent, headers: list[str], status: int, message: str
) -> None:
    """DNS rebinding (a foreign Host), a cross-site page (any Origin) and a browser's "simple" POST
    (text/plain, form) never reach the app."""
    payload = (
        "\r\n".join([f"POST {INFER} HTTP/1.1", *headers, f"Content-Length: {len(GOOD)}", "Connection: close"])
        + "\r\n\r\n"
    ).encode() + GOOD
    got, answer = exchange(agent, payload)
    assert got == status and message in answer["error"], answer


@pytest.mark.parametrize(
    "headers",
    [
        ["Host: localhost:1234", "Content-Type: application/json"],
        ["Host: 127.0.0.1", "Content-Type: application/json; charset=utf-8"],
        ["Host: [::1]:8500"],  # tritonclient sends JSON with no Content-Type
    ],
)
def test_loopback_clients_with_json_are_served(agent: Agent, headers: list[str]) -> None:
    payload = (
        "\r\n".join([f"POST {INFER} HTTP/1.1", *headers, f"Content-Length: {len(GOOD)}", "Connection: close"])
        + "\r\n\r\n"
    ).encode() + GOOD
    status, answer = exchange(agent, payload)
    assert status == 200 and answer["model_name"] == "multi_io", answer


@pytest.mark.parametrize(
    "payload",
    [
        b'GET /"quoted" HTTP/1.1\r\nHost: localhost\r\nBad"Header: x\r\n\r\n',
        b'POST /v2 HTTP/1.1\r\nHost: localhost\r\nContent-Length: "3"\r\n\r\n',
        b"GET / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    ],
)
def test_protocol_errors_have_valid_json_bodies(agent: Agent, payload: bytes) -> None:
    status, answer = exchange(agent, payload)
    assert status == 400 and answer["error"].startswith("bad HTTP request")


def test_a_body_trickled_past_the_request_deadline_gets_a_408(agent: Agent) -> None:
    """Bytes keep coming, so no idle timeout fires; the whole-request deadline still does."""
    with Watch(agent) as w, agent.connect() as s:
        s.sendall(post(INFER, b"", "Content-Type: application/json", length=10_000))
        s.settimeout(0.2)
        answer = b""
        for _ in range(10_000):
            try:
                s.send(b" ")
            except OSError:
                break  # the agent answered and closed
            try:
                answer += s.recv(4096)
            except TimeoutError:
                continue
            if b"\r\n\r\n" in answer:
                break
        s.settimeout(10)
        with contextlib.suppress(OSError):
            while data := s.recv(4096):
                answer += data
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer[:200]
    assert f"not received within {REQUEST_TIMEOUT} s" in json.loads(body)["error"]
    w.check("trickled body", JSON_LIMIT)


@pytest.fixture(scope="module")
def default_agent() -> Iterator[Agent]:
    """An agent with the shipped limits (64 MiB binary bodies, 4 MiB JSON, 96 MiB buffered)."""
    port = free_port()
    proc = subprocess.Popen(
        [EDGEFLEET, "agent", "serve", str(MODELS / "multi_io.onnx"), "--port", str(port), "--log-level", "warning"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("ready:")
        yield Agent(proc, port)
    finally:
        proc.terminate()
        proc.wait(30)
        if proc.stdout:
            proc.stdout.close()


def test_the_issues_cases_at_the_shipped_limits(default_agent: Agent) -> None:
    """Issue 8 as reported: a 61 KB gzip body took 875 MB; eight unfinished 60 MB bodies held 600 MB."""
    agent = default_agent
    bomb = gzip.compress(b" " * (60 * MIB), 9)
    with Watch(agent) as w:
        for ct in ("application/json", "application/octet-stream"):
            status, body = exchange(agent, post(INFER, bomb, f"Content-Type: {ct}", "Content-Encoding: gzip"))
            assert status == 413, body
    w.check("61 KB gzip bomb, shipped limits", 64 * MIB)
    with Watch(agent) as w:
        socks = []
        for _ in range(8):
            s = agent.connect()
            s.sendall(post(INFER, b"", "Content-Type: application/octet-stream", length=60 * MIB))
            socks.append(s)
        for s in socks:
            with contextlib.suppress(OSError):
                s.sendall(b"\0" * (59 * MIB))
        for s in socks:
            s.close()
    w.check("8 unfinished 60 MB bodies, shipped limits", 64 * MIB)
