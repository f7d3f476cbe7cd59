"""The registry under abuse, against a real `edgefleet server run` process on SQLite and PostgreSQL:
an upload racing a delete of the same version, refused uploads, Range abuse, and `model push` that
must refuse a bad token or a conflicting version before sending its body."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from _fleet import make_bundle
from _support import free_port, wait_until

from edgefleet.server.db import make_engine
from edgefleet.server.models import Base

pytestmark = pytest.mark.slow
EDGEFLEET = [sys.executable, "-c", "from edgefleet.cli.main import main; main()"]


class Server:
    """`edgefleet server init` + `server run` on a free loopback port."""

    def __init__(self, data: Path, db: str) -> None:
        self.data, self.db, self.port = data, db, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        init = subprocess.run(
            [*EDGEFLEET, "server", "init", "--data", str(data), "--db", db, "--json"],
            capture_output=True, text=True, timeout=60, check=True,
        )
        self.admin = json.loads(init.stdout)["admin_token"]
        self.http = httpx.Client(base_url=self.url, headers=self.h(), timeout=30)
        self.proc = subprocess.Popen(
            [*EDGEFLEET, "server", "run", "--data", str(data), "--db", db, "--port", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        assert wait_until(self._up, 30), "server did not start"

    def _up(self) -> bool:
        assert self.proc.poll() is None, self.proc.stderr.read().decode() if self.proc.stderr else ""
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def h(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.admin}"}

    def token(self, role: str) -> str:
        r = httpx.post(f"{self.url}/api/v1/tokens", json={"name": role, "role": role}, headers=self.h())
        assert r.status_code == 201, r.text
        return str(r.json()["token"])

    def blobs(self) -> set[str]:
        return {p.name for p in (self.data / "blobs" / "sha256").rglob("*") if p.is_file()}

    def rows(self) -> dict[tuple[str, str], str]:
        r = self.http.get("/api/v1/models", params={"limit": 1000})
        assert r.status_code == 200, r.text
        return {(v["name"], v["version"]): v["sha256"] for v in r.json()}

    def stop(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        if self.proc.stderr:
            self.proc.stderr.close()


@pytest.fixture(scope="module")
def server(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server process for this module's tests (each uses its own model names), on an emptied
    database."""
    engine = make_engine(db_url)
    with engine.begin() as c:
        for table in reversed(Base.metadata.sorted_tables):
            c.execute(table.delete())
    engine.dispose()
    srv = Server(tmp_path_factory.mktemp("registry") / "data", db_url)
    yield srv
    srv.stop()


def _assert_rows_and_blobs_agree(server: Server) -> None:
    rows = server.rows()
    assert set(rows.values()) == server.blobs(), (rows, server.blobs())
    for sha in rows.values():
        got = server.http.get(f"/api/v1/blobs/{sha}")
        assert got.status_code == 200 and hashlib.sha256(got.content).hexdigest() == sha
    assert [p.name for p in (server.data / "tmp").iterdir()] == []


def _race(upload: Callable[[], int], delete: Callable[[], int]) -> tuple[int, int]:
    """Run both at once (released by one barrier): (upload status, delete status)."""
    start = threading.Barrier(2)
    codes: dict[str, int] = {}

    def run(key: str, call: Callable[[], int]) -> None:
        start.wait()
        codes[key] = call()

    threads = [threading.Thread(target=run, args=("u", upload)), threading.Thread(target=run, args=("d", delete))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return codes["u"], codes["d"]


def test_upload_racing_a_delete_of_the_same_version_never_splits_row_and_blob(server: Server, tmp_path: Path) -> None:
    rounds = 40
    outcomes: dict[str, int] = {}
    with httpx.Client(base_url=server.url, headers=server.h(), timeout=30) as up, httpx.Client(
        base_url=server.url, headers=server.h(), timeout=30
    ) as down:
        for i in range(rounds):
            data = make_bundle(tmp_path / str(i), "race", f"1.0.{i}", 20_000).read_bytes()
            assert up.post("/api/v1/models", content=data).status_code == 201
            codes = _race(
                lambda data=data: up.post("/api/v1/models", content=data).status_code,
                lambda i=i: down.delete(f"/api/v1/models/race/1.0.{i}").status_code,
            )
            assert codes[0] in (200, 201) and codes[1] in (204, 404), codes
            key = f"upload {codes[0]} / delete {codes[1]}"
            outcomes[key] = outcomes.get(key, 0) + 1
            _assert_rows_and_blobs_agree(server)
    print(f"race outcomes over {rounds} rounds: {outcomes}")


def test_two_uploads_of_one_version_with_different_bytes_store_exactly_one(server: Server, tmp_path: Path) -> None:
    with httpx.Client(base_url=server.url, headers=server.h(), timeout=30) as a, httpx.Client(
        base_url=server.url, headers=server.h(), timeout=30
    ) as b:
        for i in range(10):
            one = make_bundle(tmp_path / f"a{i}", "twin", f"1.0.{i}", 10_000).read_bytes()
            two = make_bundle(tmp_path / f"b{i}", "twin", f"1.0.{i}", 11_000).read_bytes()
            codes = _race(
                lambda one=one: a.post("/api/v1/models", content=one).status_code,
                lambda two=two: b.post("/api/v1/models", content=two).status_code,
            )
            assert sorted(codes) == [201, 409], codes
            _assert_rows_and_blobs_agree(server)


def test_refused_uploads_leave_no_blob_and_nothing_downloadable(server: Server, tmp_path: Path) -> None:
    first = make_bundle(tmp_path / "a", "m", "1.0.0", 4000).read_bytes()
    assert server.http.post("/api/v1/models", content=first).status_code == 201
    other = make_bundle(tmp_path / "b", "m", "1.0.0", 5000).read_bytes()  # same version, other bytes
    fresh = make_bundle(tmp_path / "c", "m", "2.0.0", 6000).read_bytes()
    viewer = server.token("viewer")
    cases = [
        ("conflict", other, server.h(), 409, "version"),
        ("bad bundle", b"not a tar" * 500, server.h(), 422, "body"),
        ("junk after the tar", fresh + b"JUNK" * 100, server.h(), 422, "body"),
        ("no token", fresh, {}, 401, None),
        ("viewer token", fresh, server.h(viewer), 403, None),
    ]
    for what, body, headers, status, field in cases:
        r = httpx.post(f"{server.url}/api/v1/models", content=body, headers=headers)
        assert r.status_code == status, (what, r.text)
        if field is not None:
            assert r.json()["field"] == field, (what, r.text)
        sha = hashlib.sha256(body).hexdigest()
        assert sha not in server.blobs(), what
        assert server.http.get(f"/api/v1/blobs/{sha}").status_code == 404, what
    assert "version" in server.http.post("/api/v1/models", content=other).json()["error"]
    _assert_rows_and_blobs_agree(server)
    assert [k for k in server.rows() if k[0] == "m"] == [("m", "1.0.0")]


def test_pushing_the_same_bytes_again_is_a_200_no_op(server: Server, tmp_path: Path) -> None:
    data = make_bundle(tmp_path, "same", "1.0.0", 3000).read_bytes()
    first = server.http.post("/api/v1/models", content=data)
    again = server.http.post("/api/v1/models", content=data)
    assert first.status_code == 201 and again.status_code == 200, again.text
    assert again.json() == first.json()
    _assert_rows_and_blobs_agree(server)


def test_range_errors_are_json_416_with_the_size(server: Server, tmp_path: Path) -> None:
    data = make_bundle(tmp_path, "r", "1.0.0", 3000).read_bytes()
    sha = server.http.post("/api/v1/models", content=data).json()["sha256"]
    for rng in (f"bytes={len(data)}-", "bytes=x-y", "lines=0-9", "bytes=20-10", "bytes=" + "9" * 500):
        r = httpx.get(f"{server.url}/api/v1/blobs/{sha}", headers={**server.h(), "Range": rng})
        assert r.status_code == 416, (rng, r.text)
        assert r.json()["field"] == "range" and r.headers["content-range"] == f"bytes */{len(data)}"
        assert len(r.json()["error"]) < 200
    ok = httpx.get(f"{server.url}/api/v1/models/r/1.0.0/bundle", headers={**server.h(), "Range": "bytes=-10"})
    assert ok.status_code == 206 and ok.content == data[-10:]


def _vm(pid: int, key: str) -> int:
    """VmRSS / VmHWM of a process, KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} for {pid}")


class CountingProxy:
    """A TCP proxy on loopback that counts the bytes clients send to the server."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.sent = 0
        self.lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        try:
            while chunk := src.recv(1 << 16):
                if count:
                    with self.lock:
                        self.sent += len(chunk)
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self.sock.close()


def _push(bundle: Path, url: str, token: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EDGEFLEET_SERVER": url, "EDGEFLEET_TOKEN": token}
    return subprocess.run(
        [*EDGEFLEET, "model", "push", str(bundle)], capture_output=True, text=True, timeout=120, env=env
    )


@pytest.fixture(scope="module")
def big_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 50 MB bundle, built once for the module."""
    return make_bundle(tmp_path_factory.mktemp("big"), "big", "1.0.0", 50_000_000)


def test_50_mb_uploads_keep_the_server_flat_and_answering(server: Server, big_bundle: Path) -> None:
    """A valid 50 MB bundle, and the same with junk after its end: streamed to disk, hashed and checked
    1 MiB at a time, while /healthz keeps answering."""

    def body(extra: bytes) -> Iterator[bytes]:
        with big_bundle.open("rb") as f:
            while chunk := f.read(1 << 20):
                yield chunk
        yield extra

    health: list[int] = []
    done = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=server.url, timeout=10) as c:
            while not done.is_set():
                health.append(c.get("/healthz").status_code)
                done.wait(0.05)

    hwm = _vm(server.proc.pid, "VmHWM")
    poller = threading.Thread(target=poll)
    poller.start()
    try:
        junk = server.http.post("/api/v1/models", content=body(b"JUNK" * 1000), timeout=120)
        good = server.http.post("/api/v1/models", content=body(b""), timeout=120)
    finally:
        done.set()
        poller.join(30)
    assert junk.status_code == 422 and "trailing data after the end of the archive" in junk.json()["error"]
    assert good.status_code == 201, good.text
    growth = (_vm(server.proc.pid, "VmHWM") - hwm) / 1024
    print(f"server peak RSS growth over two 50 MB uploads: {growth:.1f} MiB; /healthz answered {len(health)} times")
    assert growth < 64 and health and set(health) == {200}
    assert server.http.delete("/api/v1/models/big/1.0.0").status_code == 204
    _assert_rows_and_blobs_agree(server)


def test_push_of_50_mb_with_a_bad_token_or_a_conflicting_version_sends_almost_none_of_it(
    server: Server, tmp_path: Path, big_bundle: Path
) -> None:
    big = big_bundle
    taken = make_bundle(tmp_path / "taken", "big", "1.0.0", 1000)  # the same version with other bytes
    assert server.http.post("/api/v1/models", content=taken.read_bytes()).status_code == 201
    proxy = CountingProxy(server.port)
    hwm_before = _vm(server.proc.pid, "VmHWM")
    try:
        for what, token, needle in (
            ("bad token", "efo_nope_nope", "401"),
            ("conflicting version", server.admin, "already exists with different content"),
            ("viewer token", server.token("viewer"), "403"),
        ):
            before = proxy.sent
            r = _push(big, proxy.url, token)
            assert r.returncode == 1, (what, r.stderr)
            lines = [line for line in r.stderr.splitlines() if line.strip()]
            assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (what, r.stderr)
            sent = proxy.sent - before
            print(f"{what}: the client sent {sent} bytes of a {big.stat().st_size}-byte push")
            assert sent < 64 * 1024, (what, sent)
    finally:
        proxy.close()
    growth = (_vm(server.proc.pid, "VmHWM") - hwm_before) / 1024
    print(f"server peak RSS growth over the three refused 50 MB pushes: {growth:.1f} MiB")
    assert growth < 64
    assert not any(p.name == hashlib.sha256(big.read_bytes()).hexdigest() for p in server.data.rglob("*"))


def test_push_through_the_cli_twice_is_a_no_op_the_second_time(server: Server, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, "twice", "1.0.0", 100_000)
    first = _push(bundle, server.url, server.admin)
    assert first.returncode == 0 and "pushed twice 1.0.0" in first.stdout, first.stderr
    again = _push(bundle, server.url, server.admin)
    assert again.returncode == 0, again.stderr
    assert "already in the registry" in again.stdout
    _assert_rows_and_blobs_agree(server)


def test_server_refuses_a_declared_conflict_before_reading_the_body(server: Server, tmp_path: Path) -> None:
    """A client that sends ``Expect: 100-continue`` with X-Model-Name/Version gets its 409 (or 200 no-op)
    without a 100, so it never sends the body."""
    data = make_bundle(tmp_path, "early", "1.0.0", 2000).read_bytes()
    assert server.http.post("/api/v1/models", content=data).status_code == 201
    for sha, status in (("0" * 64, 409), (hashlib.sha256(data).hexdigest(), 200)):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(
                (
                    f"POST /api/v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server.admin}\r\n"
                    f"Content-Type: application/octet-stream\r\nContent-Length: {50_000_000}\r\n"
                    f"Expect: 100-continue\r\nX-Model-Name: early\r\nX-Model-Version: 1.0.0\r\n"
                    f"X-Content-SHA256: {sha}\r\n\r\n"
                ).encode()
            )
            head = s.recv(65536).decode("latin-1")
        assert head.startswith(f"HTTP/1.1 {status} "), head
        assert "100 Continue" not in head
