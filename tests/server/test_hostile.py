"""Hostile clients against a real ``edgefleet server run`` process on loopback: huge and chunked bodies,
slowloris headers, half-sent bodies, connection floods, a held database lock, random methods (metric
series) and forged proxy headers. While each pushes, the server's RSS is read from /proc (peak growth
at most the route's body limit + 64 MiB) and /healthz must keep answering."""

from __future__ import annotations

import json
import random
import re
import select
import socket
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from _fleet import MIB, PeakRSS, Server, enroll, make_bundle, publish_roots
from _support import wait_until

from edgefleet.server.metrics import METHODS
from edgefleet.server.settings import Settings
from edgefleet.server.state import init_server

pytestmark = pytest.mark.slow

JSON_LIMIT = 1 * MIB  # the default max_json_bytes
UPLOAD_LIMIT = 32 * MIB  # max_upload_bytes for these servers
MAX_CONNECTIONS = 100
SLACK = 64 * MIB  # allowed RSS growth on top of the route's body limit
BODY_BUDGET = 2 * MIB  # the default max_buffered_body_bytes
HOSTILE_ENV = {
    "EDGEFLEET_SERVER_HEADER_TIMEOUT": "1",
    "EDGEFLEET_SERVER_BODY_IDLE_TIMEOUT": "1",
    "EDGEFLEET_SERVER_BODY_TIMEOUT": "3",
    "EDGEFLEET_SERVER_KEEP_ALIVE_TIMEOUT": "2",
    "EDGEFLEET_SERVER_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
    "EDGEFLEET_SERVER_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT),
    "EDGEFLEET_SERVER_TRUSTED_PROXIES": '["127.0.0.1"]',
    "EDGEFLEET_SERVER_CLIENT_CERT_HEADER": "x-client-cert",
}


# ------------------------------------------------------------------ helpers


class Fleet:
    def __init__(self, server: Server, admin: str) -> None:
        self.server, self.admin = server, admin
        self.client = httpx.Client(base_url=server.url, timeout=30)

    @property
    def admin_h(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin}"}

    def device(self) -> Any:
        publish_roots(self.client, self.admin_h, self.server.data.parent / "fleet-keyring")  # enrollment needs them
        r = self.client.post("/api/v1/enrollment-tokens", json={}, headers=self.admin_h)
        assert r.status_code == 201, r.text
        d = enroll(self.client, r.json()["token"])
        d.authenticate()
        return d


def start_fleet(tmp: Path, db_url: str, env: dict[str, str] | None = None) -> Fleet:
    data = tmp / "data"
    admin = init_server(Settings(data_dir=data, db_url=db_url))
    server = Server(data, db_url, {**HOSTILE_ENV, **(env or {})})
    server.start()
    return Fleet(server, admin)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """One server (SQLite) for the HTTP-layer tests, which do not depend on the database."""
    tmp = tmp_path_factory.mktemp("hostile")
    f = start_fleet(tmp, f"sqlite:///{tmp / 'edgefleet.db'}")
    yield f
    f.client.close()
    logged = f.server.stop()
    assert "Traceback" not in logged, logged[-4000:]
    assert "Exception in ASGI application" not in logged, logged[-4000:]


def status_of(response: bytes) -> int:
    m = re.match(rb"HTTP/1\.1 (\d{3}) ", response)
    return int(m.group(1)) if m else 0


def body_of(response: bytes) -> Any:
    return json.loads(response.partition(b"\r\n\r\n")[2])


def exchange(port: int, head: bytes, body: Iterable[bytes] = (), source: str | None = None) -> tuple[bytes, int]:
    """Send ``head`` then the ``body`` chunks until the server stops taking them; return what the
    server answered and how many body bytes went out."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0) if source else None)
    sent = 0
    with sock:
        sock.sendall(head)
        try:
            for chunk in body:
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass  # the server closed the connection: what it answered is still readable
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except OSError:
            pass
    return out, sent


def json_chunks(total: int, chunked: bool) -> Iterator[bytes]:
    """A JSON body of ``total`` bytes, made 1 MiB at a time (never whole in memory)."""
    piece = b'{"a":' * (MIB // 5)
    left = total
    while left > 0:
        part = piece[: min(len(piece), left)]
        left -= len(part)
        yield b"%x\r\n%s\r\n" % (len(part), part) if chunked else part
    if chunked:
        yield b"0\r\n\r\n"


class HealthProbe:
    """GETs /healthz on fresh connections while a hostile client pushes; records every outcome."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.statuses: list[int] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.statuses.append(httpx.get(f"{self.url}/healthz", timeout=5).status_code)
            except httpx.HTTPError as e:
                self.errors.append(f"{type(e).__name__}: {e}")
            self._stop.wait(0.05)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def assert_answered(self) -> None:
        assert self.statuses and not self.errors, (self.statuses[-5:], self.errors[:3])
        assert set(self.statuses) == {200}, self.statuses


def report(name: str, rss: PeakRSS, **extra: Any) -> None:
    figures = {"rss_before_mib": round(rss.before, 1), "peak_growth_mib": round(rss.growth_mib, 1), **extra}
    print(f"\n[hostile] {name}: {json.dumps(figures)}")


# ------------------------------------------------------------------ bodies


def test_a_300_mb_json_body_with_content_length_is_a_413_before_it_is_read(fleet: Fleet) -> None:
    total = 300 * MIB
    head = (
        b"POST /api/v1/enroll HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % total
    )
    with PeakRSS(fleet.server.pid) as rss, HealthProbe(fleet.server.url) as probe:
        answer, sent = exchange(fleet.server.port, head, json_chunks(total, chunked=False))
    report("300 MB JSON, Content-Length", rss, body_bytes_sent=sent)
    assert status_of(answer) == 413, answer[:300]
    assert body_of(answer)["field"] == "content-length"
    assert rss.growth_mib * MIB <= JSON_LIMIT + SLACK
    probe.assert_answered()


def test_a_300_mb_chunked_json_body_is_cut_at_the_route_limit(fleet: Fleet) -> None:
    head = (
        b"POST /api/v1/enroll HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    with PeakRSS(fleet.server.pid) as rss, HealthProbe(fleet.server.url) as probe:
        answer, sent = exchange(fleet.server.port, head, json_chunks(300 * MIB, chunked=True))
    report("300 MB JSON, chunked", rss, body_bytes_sent=sent)
    assert status_of(answer) == 413, answer[:300]
    assert body_of(answer)["field"] == "body"
    assert sent < 300 * MIB  # the server stopped reading
    assert rss.growth_mib * MIB <= JSON_LIMIT + SLACK
    probe.assert_answered()


def test_a_300_mb_chunked_upload_is_cut_at_the_upload_limit_and_leaves_no_temp_file(fleet: Fleet) -> None:
    head = (
        b"POST /api/v1/models HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
        b"Authorization: Bearer %s\r\nTransfer-Encoding: chunked\r\n\r\n" % fleet.admin.encode()
    )
    with PeakRSS(fleet.server.pid) as rss, HealthProbe(fleet.server.url) as probe:
        answer, sent = exchange(fleet.server.port, head, json_chunks(300 * MIB, chunked=True))
    report("300 MB upload, chunked, admin token", rss, body_bytes_sent=sent)
    assert status_of(answer) == 413, answer[:300]
    assert sent < 300 * MIB
    assert rss.growth_mib * MIB <= UPLOAD_LIMIT + SLACK
    probe.assert_answered()
    assert wait_until(lambda: not any((fleet.server.data / "tmp").iterdir()))


def test_an_unauthenticated_300_mb_upload_is_refused_without_reading_the_body(fleet: Fleet) -> None:
    head = (
        b"POST /api/v1/models HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Length: %d\r\n\r\n" % (20 * MIB)
    )
    with PeakRSS(fleet.server.pid) as rss, HealthProbe(fleet.server.url) as probe:
        answer, sent = exchange(fleet.server.port, head, json_chunks(300 * MIB, chunked=False))
    report("300 MB upload, no token", rss, body_bytes_sent=sent)
    assert status_of(answer) == 401, answer[:300]
    assert sent < 20 * MIB  # closed, not drained
    assert rss.growth_mib * MIB <= UPLOAD_LIMIT + SLACK
    probe.assert_answered()


def test_a_bundle_larger_than_the_json_limit_still_uploads(fleet: Fleet, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, "big", "1.0.0", 3 * MIB).read_bytes()
    assert len(bundle) > JSON_LIMIT
    r = fleet.client.post("/api/v1/models", content=bundle, headers=fleet.admin_h)
    assert r.status_code == 201, r.text


def test_a_json_body_just_over_the_limit_is_a_413_naming_the_field(fleet: Fleet) -> None:
    r = fleet.client.post("/api/v1/enroll", content=b" " * (JSON_LIMIT + 1), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["field"] == "content-length"
    r = fleet.client.post("/api/v1/enroll", content=iter([b" " * JSON_LIMIT, b"{}"]),
                          headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["field"] == "body"


# ------------------------------------------------------------------ slow and idle connections


def _wait_closed(socks: list[socket.socket], drip: bytes | None = None, rounds: int = 200) -> dict[int, bytes]:
    """Until every socket is closed by the server (or ``rounds`` pass): drip a byte into the open ones,
    collect what the server said on each."""
    said: dict[int, bytes] = {i: b"" for i in range(len(socks))}
    open_ = set(range(len(socks)))
    stop = threading.Event()
    for _ in range(rounds):
        if not open_:
            break
        if drip:
            for i in list(open_):
                try:
                    socks[i].send(drip)
                except OSError:
                    pass
        ready, _, _ = select.select([socks[i] for i in open_], [], [], 0.1)
        for s in ready:
            i = socks.index(s)
            try:
                chunk = s.recv(65536)
            except OSError:
                chunk = b""
            said[i] += chunk
            if not chunk:
                open_.discard(i)
        stop.wait(0.05)
    assert not open_, f"{len(open_)} connections still open"
    return said


def test_slowloris_headers_get_a_408_at_the_header_deadline(fleet: Fleet) -> None:
    with PeakRSS(fleet.server.pid) as rss, HealthProbe(fleet.server.url) as probe:
        socks = [socket.create_connection(("127.0.0.1", fleet.server.port), timeout=10) for _ in range(40)]
        try:
            for s in socks:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            said = _wait_closed(socks, drip=b"a")
        finally:
            for s in socks:
                s.close()
    report("40 slowloris connections", rss)
    assert {status_of(v) for v in said.values()} == {408}
    assert body_of(said[0])["field"] == "headers"
    assert rss.growth_mib * MIB <= JSON_LIMIT + SLACK
    probe.assert_answered()


def test_half_sent_bodies_are_dropped_when_they_stall(fleet: Fleet) -> None:
    head = (
        b"POST /api/v1/enroll HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % (JSON_LIMIT - 10)
    )
    part = b" " * (JSON_LIMIT // 2)
    with PeakRSS(fleet.server.pid) as rss, HealthProbe(fleet.server.url) as probe:
        socks = [socket.create_connection(("127.0.0.1", fleet.server.port), timeout=10) for _ in range(20)]
        try:
            for s in socks:
                s.sendall(head + part)
            said = _wait_closed(socks)
        finally:
            for s in socks:
                s.close()
    report("20 half-sent 1 MiB bodies", rss)
    statuses = {i: status_of(v) for i, v in said.items()}
    assert set(statuses.values()) == {408, 503}  # dropped once stalled; the rest waited for the budget in vain
    assert body_of(said[next(i for i, st in statuses.items() if st == 408)])["field"] == "body"
    assert rss.growth_mib * MIB <= JSON_LIMIT + SLACK
    probe.assert_answered()


def test_json_bodies_dripped_a_byte_at_a_time_get_a_408_at_the_body_deadline(fleet: Fleet) -> None:
    head = (
        b"POST /api/v1/enroll HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100000\r\n\r\n{"
    )
    with PeakRSS(fleet.server.pid) as rss, HealthProbe(fleet.server.url) as probe:
        socks = [socket.create_connection(("127.0.0.1", fleet.server.port), timeout=10) for _ in range(20)]
        try:
            for s in socks:
                s.sendall(head)
            said = _wait_closed(socks, drip=b" ")  # faster than the idle timeout: only the deadline stops it
        finally:
            for s in socks:
                s.close()
    report("20 dripped JSON bodies", rss)
    assert {status_of(v) for v in said.values()} == {408}
    assert "within 3 s" in body_of(said[0])["error"]
    probe.assert_answered()


def test_valid_1_mib_json_bodies_that_expand_when_parsed_stay_within_the_bound(fleet: Fleet) -> None:
    body = b"[" + b"{}," * ((JSON_LIMIT - 3) // 3) + b"{}]"  # ~350,000 dicts once parsed
    assert len(body) <= JSON_LIMIT
    head = (
        b"POST /api/v1/enroll HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
    )
    answers: list[bytes] = []

    def one() -> None:
        answers.append(exchange(fleet.server.port, head, [body])[0])

    with PeakRSS(fleet.server.pid) as rss, HealthProbe(fleet.server.url) as probe:
        threads = [threading.Thread(target=one) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    report("16 concurrent 1 MiB JSON bodies of empty objects", rss)
    assert [status_of(a) for a in answers] == [422] * 16
    assert rss.growth_mib * MIB <= JSON_LIMIT + SLACK
    probe.assert_answered()


def test_a_flood_of_nearly_complete_bodies_is_held_to_the_body_budget(fleet: Fleet) -> None:
    n = MAX_CONNECTIONS - 10  # room for the health probe
    head = (
        b"POST /api/v1/enroll HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % JSON_LIMIT
    )
    part = b" " * (JSON_LIMIT - 1)  # all but the last byte, then silence
    with PeakRSS(fleet.server.pid) as rss, HealthProbe(fleet.server.url) as probe:
        socks = [socket.create_connection(("127.0.0.1", fleet.server.port), timeout=10) for _ in range(n)]
        try:
            for s in socks:
                try:
                    s.sendall(head + part)
                except OSError:
                    pass  # refused at once (503) and closed
            said = _wait_closed(socks)
        finally:
            for s in socks:
                s.close()
    statuses = [status_of(v) for v in said.values()]
    report(f"{n} nearly complete 1 MiB bodies", rss, waited_503=statuses.count(503), dropped_408=statuses.count(408))
    assert set(statuses) == {408, 503}  # admitted by turns, as the budget frees, and dropped; the rest waited in vain
    assert rss.growth_mib * MIB <= JSON_LIMIT + SLACK
    probe.assert_answered()
    assert fleet.client.post("/api/v1/enroll", json={}).status_code == 422  # the budget is free again


def test_a_connection_flood_is_capped_with_a_503_and_idle_ones_are_closed(fleet: Fleet) -> None:
    extra = 30
    with PeakRSS(fleet.server.pid) as rss:
        socks = [socket.create_connection(("127.0.0.1", fleet.server.port), timeout=10)
                 for _ in range(MAX_CONNECTIONS + extra)]
        try:
            said = _wait_closed(socks)
        finally:
            for s in socks:
                s.close()
    report(f"{MAX_CONNECTIONS + extra} idle connections", rss)
    refused = [v for v in said.values() if v]
    assert len(refused) >= extra and {status_of(v) for v in refused} == {503}
    assert b"retry-after: " in refused[0].lower() and body_of(refused[0])["field"] is None
    assert rss.growth_mib * MIB <= JSON_LIMIT + SLACK
    assert fleet.client.get("/healthz").status_code == 200


def test_headers_over_the_limit_are_a_431_and_garbage_a_400_both_json(fleet: Fleet) -> None:
    big, _ = exchange(fleet.server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000)
    assert status_of(big) == 431 and body_of(big)["field"] == "headers"
    junk, _ = exchange(fleet.server.port, b"NOT HTTP AT ALL\r\n\r\n")
    assert status_of(junk) == 400 and "error" in body_of(junk)
    bad, _ = exchange(fleet.server.port, b"POST /api/v1/enroll HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n")
    assert status_of(bad) == 400 and "error" in body_of(bad)


def test_pipelined_and_kept_alive_requests_still_work_under_the_guards(fleet: Fleet) -> None:
    two = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answer, _ = exchange(fleet.server.port, two)
    assert answer.count(b"HTTP/1.1 200 OK") == 2, answer
    with httpx.Client(base_url=fleet.server.url) as c:  # one connection, several requests with bodies
        for _ in range(5):
            assert c.post("/api/v1/enroll", json={"token": "x", "csr": "y"}).status_code in (400, 401, 422)


# ------------------------------------------------------------------ metrics and proxies


def _series(text: str) -> set[str]:
    return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line.startswith("edgefleet_http_")}


def test_random_methods_and_paths_add_no_metric_series(fleet: Fleet) -> None:
    rng = random.Random(8)

    def hammer(n: int) -> None:
        for _ in range(n):
            method = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(rng.randint(3, 9)))
            path = "/" + "/".join(f"{rng.getrandbits(40):x}" for _ in range(rng.randint(1, 3)))
            r = fleet.client.request(rng.choice([method, "GET", "DELETE"]), path)
            assert r.status_code in (404, 405), r.status_code
            assert r.json()["error"]

    fleet.client.get("/metrics")
    hammer(100)
    before = _series(fleet.client.get("/metrics").text)
    hammer(100)
    after = _series(fleet.client.get("/metrics").text)
    assert after == before
    methods = set(re.findall(r'method="([^"]*)"', "\n".join(after)))
    assert methods <= METHODS | {"other"} and "other" in methods
    assert 'route="unmatched"' in "\n".join(after)


def test_a_client_certificate_header_is_believed_from_the_proxy_socket_only(fleet: Fleet) -> None:
    d = fleet.device()
    header = {"x-client-cert": quote(d.cert), "x-forwarded-for": "203.0.113.7", "x-forwarded-proto": "http"}
    # From the proxy (127.0.0.1), forwarding for a device elsewhere: believed, though the client is now 203.0.113.7.
    r = fleet.client.get(f"/api/v1/devices/{d.id}/desired", headers=header)
    assert r.status_code == 200, r.text
    # A client that is not the proxy claiming, by X-Forwarded-For, to come through it: not believed.
    with httpx.Client(base_url=fleet.server.url, transport=httpx.HTTPTransport(local_address="127.0.0.2")) as other:
        forged = {"x-client-cert": quote(d.cert), "x-forwarded-for": "127.0.0.1"}
        r = other.get(f"/api/v1/devices/{d.id}/desired", headers=forged)
        assert r.status_code == 401 and r.json()["field"] == "authorization", r.text


# ------------------------------------------------------------------ a locked database (SQLite and PostgreSQL)


def _with_lock_timeout(db_url: str) -> str:
    if db_url.startswith("sqlite"):
        return f"{db_url}?timeout=1"
    return f"{db_url}%20-clock_timeout%3D1000"  # the fixture's URL ends in options=-csearch_path%3D...


class HeldLock:
    """A write lock held by another connection: BEGIN EXCLUSIVE (SQLite), LOCK TABLE devices (PostgreSQL)."""

    def __init__(self, db_url: str) -> None:
        self.db_url = db_url
        self._release: Any = None

    def __enter__(self) -> HeldLock:
        if self.db_url.startswith("sqlite"):
            conn = sqlite3.connect(self.db_url.removeprefix("sqlite:///"), isolation_level=None)
            conn.execute("BEGIN EXCLUSIVE")
            self._release = lambda: (conn.execute("ROLLBACK"), conn.close())
        else:
            from sqlalchemy import text

            from edgefleet.server.db import make_engine

            engine = make_engine(self.db_url)
            conn = engine.connect()
            conn.execute(text("LOCK TABLE devices IN ACCESS EXCLUSIVE MODE"))
            self._release = lambda: (conn.rollback(), conn.close(), engine.dispose())
        return self

    def __exit__(self, *exc: object) -> None:
        self._release()


def test_a_held_database_lock_is_a_503_with_retry_after_while_healthz_answers(clean_db: str, tmp_path: Path) -> None:
    f = start_fleet(tmp_path, _with_lock_timeout(clean_db))
    try:
        d = f.device()
        checkin: dict[str, httpx.Response] = {}
        with HeldLock(clean_db):
            worker = threading.Thread(
                target=lambda: checkin.update(r=f.client.get(f"/api/v1/devices/{d.id}/desired", headers=d.headers))
            )
            worker.start()
            answered = 0
            while worker.is_alive():  # /healthz answers while the check-in waits for the lock
                assert f.client.get("/healthz", timeout=5).status_code == 200
                answered += 1
                worker.join(0.05)
            r = checkin["r"]
            assert r.status_code == 503 and r.headers["retry-after"].isdigit(), r.text
            assert r.json()["field"] == "database"
            tags = f.client.put(f"/api/v1/devices/{d.id}/tags", json={"tags": ["x"]}, headers=f.admin_h)
            assert tags.status_code == 503 and "retry-after" in tags.headers, tags.text
        assert answered >= 1
        assert f.client.get(f"/api/v1/devices/{d.id}/desired", headers=d.headers).status_code == 200
    finally:
        f.client.close()
        logged = f.server.stop()
    assert "Traceback" not in logged, logged[-4000:]


class TcpRelay:
    """A TCP relay on a free loopback port to ``upstream``; :meth:`cut` drops every connection and
    refuses new ones (the database becomes unreachable), :meth:`restore` listens again."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked on it (close would not)
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def test_an_unreachable_postgresql_is_a_503_with_retry_after_and_the_server_recovers(
    clean_postgres: str, tmp_path: Path
) -> None:
    from sqlalchemy.engine import make_url

    clean_db = clean_postgres

    url = make_url(clean_db)
    relay = TcpRelay((url.host or "127.0.0.1", url.port or 5432))
    via_relay = clean_db.replace(f"{url.host}:{url.port or 5432}", f"127.0.0.1:{relay.port}", 1)
    assert via_relay != clean_db
    f = start_fleet(tmp_path, via_relay)
    try:
        d = f.device()
        assert f.client.get(f"/api/v1/devices/{d.id}/desired", headers=d.headers).status_code == 200
        relay.cut()
        for path, headers in ((f"/api/v1/devices/{d.id}/desired", d.headers), ("/api/v1/devices", f.admin_h)):
            r = f.client.get(path, headers=headers)
            assert r.status_code == 503 and r.headers["retry-after"].isdigit(), (path, r.text)
            assert r.json()["field"] == "database"
        assert f.client.get("/healthz").status_code == 200
        relay.restore()
        assert f.client.get(f"/api/v1/devices/{d.id}/desired", headers=d.headers).status_code == 200
        assert f.client.get("/api/v1/devices", headers=f.admin_h).status_code == 200
    finally:
        f.client.close()
        logged = f.server.stop()
        relay.cut()
    assert "Traceback" not in logged, logged[-4000:]
