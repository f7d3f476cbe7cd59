"""The device's HTTP client (edgefleet.agent.updater.client) against a real ``edgefleet server run``
process (SQLite) whose operator published both TUF roots before any device enrolled, with devices
enrolled through the real API, and against a small misbehaving server on loopback (cuts, endless bodies,
ignored ranges, 401s, 503s) that counts what it sends. Token caching, one retry on a 401, Retry-After,
Range resume, the signed length as a hard bound, disk full on a 1 MiB tmpfs, certificate renewal with a
cut between every two of its steps, and stock ngclient refreshing both repositories through the fetcher.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tuf.api.exceptions import DownloadError, DownloadHTTPError
from tuf.api.metadata import TargetFile, Targets
from tuf.ngclient import Updater

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))  # tests/server/_fleet.py
from _fleet import CLI, Server, enroll, make_bundle, sign  # tests/server/_fleet.py (this folder has updater._fleet)
from _support import free_port

from edgefleet.agent.updater.client import CHUNK, DeviceClient, recover_identity
from edgefleet.agent.updater.errors import Refused, Transient
from edgefleet.tufmeta import canonical_bytes, expiry_from
from edgefleet.tufmeta.keyring import Keyring

AUTH = ("/api/v1/device-auth/challenge", "/api/v1/device-auth/token")


# ------------------------------------------------------------------------------ identity files


@dataclass
class Identity:
    device_id: str
    key: Path
    cert: Path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_identity(folder: Path, device_id: str, key: ec.EllipticCurvePrivateKey, cert_pem: str) -> Identity:
    folder.mkdir(parents=True, exist_ok=True)
    ident = Identity(device_id, folder / "device.key", folder / "device.crt")
    ident.key.write_bytes(_key_pem(key))
    os.chmod(ident.key, 0o600)
    ident.cert.write_text(cert_pem)
    return ident


def _self_signed(key: ec.EllipticCurvePrivateKey) -> str:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-local")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now.replace(year=now.year + 1))
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _public(path: Path, cert: bool = False) -> bytes:
    if cert:
        pub = x509.load_pem_x509_certificate(path.read_bytes()).public_key()
    else:
        k = serialization.load_pem_private_key(path.read_bytes(), None)
        assert isinstance(k, ec.EllipticCurvePrivateKey)
        pub = k.public_key()
    return pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _pair_matches(ident: Identity) -> bool:
    return _public(ident.key) == _public(ident.cert, cert=True)


# ------------------------------------------------------------------------------ the real server


@dataclass
class Live:
    srv: Server
    admin: httpx.Client
    ring: Keyring
    bundle: Path

    @property
    def url(self) -> str:
        return self.srv.url

    def device(self, folder: Path, assign: bool = True) -> Identity:
        """A device enrolled through the API (its own key, a CSR), digits 1.0.0 assigned."""
        r = self.admin.post("/api/v1/enrollment-tokens", json={"tags": []})
        assert r.status_code == 201, r.text
        with httpx.Client(base_url=self.url, timeout=30) as c:
            d = enroll(c, r.json()["token"])
        if assign:
            r = self.admin.put(f"/api/v1/devices/{d.id}/models/digits", json={"version": "1.0.0"})
            assert r.status_code == 200, r.text
        return _write_identity(folder, d.id, d.key, d.cert)

    def server_serial(self, device_id: str) -> str:
        r = self.admin.get(f"/api/v1/devices/{device_id}")
        assert r.status_code == 200, r.text
        return str(r.json()["cert_serial"])

    def target_url(self) -> str:
        sha = hashlib.sha256(self.bundle.read_bytes()).hexdigest()
        return f"/tuf/image/targets/{sha}.{self.bundle.name}"


def _client(ident: Identity, url: str, **kw: Any) -> DeviceClient:
    return DeviceClient(url, ident.device_id, ident.key, ident.cert, **kw)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """A server process; the operator publishes image root 1, the director root and image targets 1
    (listing digits 1.0.0) from an offline keyring before any device enrolls."""
    tmp = tmp_path_factory.mktemp("live")
    db = f"sqlite:///{tmp / 'edgefleet.db'}"
    srv = Server(tmp / "data", db)
    init = subprocess.run([*CLI, "server", "init", "--data", str(srv.data), "--db", db, "--json"],
                          capture_output=True, text=True, timeout=120)
    assert init.returncode == 0, init.stderr
    srv.start()
    admin = httpx.Client(base_url=srv.url, timeout=30,
                         headers={"Authorization": f"Bearer {json.loads(init.stdout)['admin_token']}"})
    try:
        now = datetime.now(UTC)
        ring = Keyring.create(tmp / "keys", 1, 1)
        ring.online = admin.get("/tuf/image/keys").json()["keys"]
        ring.save()
        root = ring.sign_root(ring.build_root(now), ring.roles["root"])
        assert admin.put("/tuf/image/root", content=canonical_bytes(root)).status_code == 200
        ring.save_root(root)
        director = ring.sign_root(ring.build_director_root(now), ring.roles["root"])
        r = admin.put("/tuf/director/root", content=canonical_bytes(director))
        assert r.status_code == 200, r.text
        ring.save_director_root(director)
        bundle = make_bundle(tmp / "b", "digits", "1.0.0", 300_000)
        assert admin.post("/api/v1/models", content=bundle.read_bytes()).status_code == 201
        targets = Targets(version=1, expires=expiry_from(now, "targets"))
        targets.targets[bundle.name] = TargetFile.from_data(bundle.name, bundle.read_bytes(), ["sha256"])
        r = admin.put("/tuf/image/targets", content=canonical_bytes(ring.sign_targets(targets)))
        assert r.status_code == 200, r.text
        yield Live(srv, admin, ring, bundle)
    finally:
        admin.close()
        srv.stop()


class Recorder:
    """A forwarding proxy on loopback that records each request's method, path and headers."""

    def __init__(self, upstream: str) -> None:
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        host, port = upstream.removeprefix("http://").split(":")
        rec = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n) if n else None
                rec.requests.append((self.command, self.path, dict(self.headers)))
                up = http.client.HTTPConnection(host, int(port), timeout=30)
                up.request(self.command, self.path, body=body,
                           headers={k: v for k, v in self.headers.items() if k.lower() != "host"})
                r = up.getresponse()
                data = r.read()
                self.send_response(r.status)
                for k, v in r.getheaders():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "date", "server"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                up.close()

            do_GET = do_POST = do_PUT = _forward

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def count(self, path: str) -> int:
        return sum(1 for _, p, _ in self.requests if p.split("?")[0] == path)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def recorder(live: Live) -> Iterator[Recorder]:
    rec = Recorder(live.url)
    yield rec
    rec.close()


# ------------------------------------------------------------------------------ a misbehaving server

Route = Callable[[BaseHTTPRequestHandler], None]


class Fake:
    """A server on loopback whose auth endpoints always answer (nothing is checked) and whose other paths
    do what ``routes`` says. Records every request; ``sent`` counts target body bytes written."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.routes: dict[str, Route] = {}
        self.sent = 0
        self.tokens = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                n = int(self.headers.get("content-length") or 0)
                if n:
                    self.rfile.read(n)
                fake.requests.append((self.command, self.path, dict(self.headers)))
                if self.path == AUTH[0]:
                    return fake.reply(self, 200, {"challenge": "chal-1", "expires_in": 60})
                if self.path == AUTH[1]:
                    fake.tokens += 1
                    return fake.reply(self, 200, {"access_token": f"tok-{fake.tokens}", "expires_in": 900})
                route = fake.routes.get(self.path)
                if route is None:
                    return fake.reply(self, 404, {"error": "path: nothing here", "field": "path"})
                route(self)

            do_GET = do_POST = do_PUT = _any

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @staticmethod
    def reply(h: BaseHTTPRequestHandler, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode() if body is not None else b""
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def body(self, h: BaseHTTPRequestHandler, status: int, data: bytes, headers: dict[str, str],
             length: int | None = None) -> None:
        """Send ``data`` with ``headers``; ``length``: the Content-Length claimed (None: none, close-delimited)."""
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        if length is None:
            h.send_header("Connection", "close")
            h.close_connection = True
        else:
            h.send_header("Content-Length", str(length))
        h.end_headers()
        try:
            h.wfile.write(data)
            self.sent += len(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def ranges(self, data: bytes, cut_first_at: int | None = None) -> Route:
        """Serve ``data`` honouring ``Range: bytes=N-``; the first answer is cut after ``cut_first_at`` bytes
        (it promises the full length, then closes the connection)."""
        cut = [cut_first_at]

        def route(h: BaseHTTPRequestHandler) -> None:
            start = _range(h)
            part = data[start:]
            headers = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"} if start else {}
            if cut[0] is not None:
                part, cut[0] = part[: cut[0]], None
                h.close_connection = True
                self.body(h, 206 if start else 200, part, headers, len(data) - start)
                return
            self.body(h, 206 if start else 200, part, headers, len(data) - start)

        return route

    def endless(self, data: bytes, content_length: Callable[[int], int | None]) -> Route:
        """``data`` (from the asked start), then junk until the client goes away (at most 64 MiB)."""

        def route(h: BaseHTTPRequestHandler) -> None:
            start = _range(h)
            headers = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"} if start else {}
            self.body(h, 206 if start else 200, data[start:], headers, content_length(len(data) - start))
            junk = b"\xee" * CHUNK
            try:
                for _ in range(1024):
                    h.wfile.write(junk)
                    self.sent += len(junk)
            except (BrokenPipeError, ConnectionResetError):
                pass
            h.close_connection = True

        return route

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def paths(self) -> list[str]:
        return [p for _, p, _ in self.requests]


def _range(h: BaseHTTPRequestHandler) -> int:
    value = h.headers.get("range")
    return int(value.removeprefix("bytes=").rstrip("-")) if value else 0


@pytest.fixture
def fake() -> Iterator[Fake]:
    f = Fake()
    yield f
    f.close()


@pytest.fixture
def local(tmp_path: Path) -> Identity:
    """Key and (self-signed) certificate files for the fake server, which checks nothing."""
    key = ec.generate_private_key(ec.SECP256R1())
    return _write_identity(tmp_path / "identity", "dev-0123456789abcdef", key, _self_signed(key))


def _data(n: int) -> bytes:
    return hashlib.sha256(b"bundle").digest() * (n // 32) + b"x" * (n % 32)


# ================================================================================== tokens and calls


def test_many_calls_from_many_threads_share_one_token_until_less_than_a_fifth_of_its_life_is_left(
    live: Live, recorder: Recorder, tmp_path: Path
) -> None:
    now = [datetime.now(UTC).timestamp()]
    client = _client(live.device(tmp_path), recorder.url, clock=lambda: now[0])
    errors: list[BaseException] = []

    def check_in() -> None:
        try:
            assert client.check_in(None).changed
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=check_in) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    client.report({"agent_version": "0.1.0"})
    assert recorder.count(AUTH[0]) == 1 and recorder.count(AUTH[1]) == 1
    now[0] += 900 * 0.79  # the server's token lifetime is 900 s: 21% left, still cached
    client.check_in(None)
    assert recorder.count(AUTH[0]) == 1
    now[0] += 900 * 0.02  # 19% left: a new one
    client.check_in(None)
    assert recorder.count(AUTH[0]) == 2 and recorder.count(f"/api/v1/devices/{client.device_id}/desired") == 10


def test_check_in_gives_the_desired_state_then_a_304_for_its_etag_and_a_report_reaches_the_server(
    live: Live, tmp_path: Path
) -> None:
    ident = live.device(tmp_path)
    client = _client(ident, live.url)
    first = client.check_in(None)
    assert first.changed and first.etag and first.desired is not None
    assert [m["name"] for m in first.desired["models"]] == ["digits"]
    again = client.check_in(first.etag)
    assert again == type(again)(False, first.etag, None)
    client.report({"agent_version": "0.1.0", "hardware_profile": "generic-x86_64",
                   "running": [{"name": "digits", "version": "1.0.0"}],
                   "events": [{"at": datetime.now(UTC).isoformat(), "kind": "install.ok", "model": "digits",
                               "version": "1.0.0"}]})
    shown = live.admin.get(f"/api/v1/devices/{ident.device_id}").json()
    assert shown["agent_version"] == "0.1.0" and shown["running"][0]["version"] == "1.0.0"
    with pytest.raises(Refused) as e:
        client.report({"agent_version": "not a version"})
    assert e.value.reason == "http_422" and "agent_version" in str(e.value)


def test_a_token_the_server_stopped_taking_is_dropped_and_the_call_retried_once_with_a_new_one(
    live: Live, recorder: Recorder, tmp_path: Path
) -> None:
    ident = live.device(tmp_path)
    other = _client(ident, recorder.url)
    other.check_in(None)  # caches a token for the current certificate
    assert _client(ident, live.url).renew(days_before=10_000)  # new serial: that token is dead
    desired = f"/api/v1/devices/{ident.device_id}/desired"
    before = recorder.count(desired), recorder.count(AUTH[0])
    assert other.check_in(None).changed  # 401, new token (signed by the renewed key on disk), retried
    assert (recorder.count(desired), recorder.count(AUTH[0])) == (before[0] + 2, before[1] + 1)


def test_a_401_that_a_new_token_does_not_cure_is_refused_after_exactly_one_retry(
    fake: Fake, local: Identity
) -> None:
    path = f"/api/v1/devices/{local.device_id}/desired"
    fake.routes[path] = lambda h: fake.reply(h, 401, {"error": "authorization: invalid or expired device token"})
    with pytest.raises(Refused) as e:
        _client(local, fake.url).check_in(None)
    assert e.value.reason == "http_401" and "invalid or expired device token" in str(e.value)
    assert fake.paths().count(path) == 2 and fake.paths().count(AUTH[0]) == 2
    tokens = [hdrs.get("Authorization") for _, p, hdrs in fake.requests if p == path]
    assert tokens == ["Bearer tok-1", "Bearer tok-2"]


def test_refusals_name_the_status_and_carry_the_servers_error_text(live: Live, tmp_path: Path) -> None:
    ident = live.device(tmp_path / "a", assign=False)
    client = _client(ident, live.url)
    with pytest.raises(Refused) as e:
        client.download(live.target_url(), tmp_path / "x.part", live.bundle.stat().st_size)
    assert e.value.reason == "http_403" and "is not assigned to device" in str(e.value)
    assert (tmp_path / "x.part").stat().st_size == 0
    with pytest.raises(Refused) as e:
        client.request("GET", "/api/v1/devices/dev-0000000000000000/desired")
    assert e.value.reason == "http_403" and "may only act as itself" in str(e.value)


def test_503_and_429_are_transient_with_retry_after_from_seconds_or_an_http_date(
    fake: Fake, local: Identity
) -> None:
    now = 1_800_000_000.0
    answers = {
        "/a": (503, {"Retry-After": "7"}),
        "/b": (429, {"Retry-After": format_datetime(datetime.fromtimestamp(now + 120, UTC), usegmt=True)}),
        "/c": (500, {}),
        "/d": (503, {"Retry-After": "99999999"}),
    }
    for path, (status, headers) in answers.items():
        fake.routes[path] = lambda h, s=status, hd=headers: fake.reply(h, s, {"error": "database: busy"}, hd)
    client = _client(local, fake.url, clock=lambda: now)
    got = {}
    for path in answers:
        with pytest.raises(Transient) as e:
            client.request("GET", path)
        got[path] = (e.value.reason, e.value.retry_after)
        assert "database: busy" in str(e.value)
    assert got == {"/a": ("http_503", 7.0), "/b": ("http_429", 120.0), "/c": ("http_500", None),
                   "/d": ("http_503", 86400.0)}


def test_no_server_listening_is_transient_and_another_origin_never_gets_the_token(
    fake: Fake, local: Identity
) -> None:
    with pytest.raises(Transient) as e:
        _client(local, f"http://127.0.0.1:{free_port()}", timeout=5).check_in(None)
    assert e.value.reason == "connect"
    with pytest.raises(Refused) as r:
        _client(local, fake.url).request("GET", "http://example.invalid/steal")
    assert r.value.reason == "other_origin" and fake.requests == []


# ================================================================================== downloads


def test_a_download_cut_after_k_bytes_resumes_with_range_from_k_and_no_byte_is_sent_twice(
    fake: Fake, local: Identity, tmp_path: Path
) -> None:
    data, k = _data(700_001), 250_007
    fake.routes["/t"] = fake.ranges(data, cut_first_at=k)
    client, dest = _client(local, fake.url), tmp_path / "b.efb.part"
    seen: list[int] = []
    with pytest.raises(Transient) as e:
        client.download("/t", dest, len(data), hashlib.sha256(data).hexdigest(), progress=lambda n, _: seen.append(n))
    assert e.value.reason == "network" and dest.stat().st_size == k
    assert client.download("/t", dest, len(data), hashlib.sha256(data).hexdigest(),
                           progress=lambda n, _: seen.append(n)) == len(data) - k
    assert dest.read_bytes() == data and fake.sent == len(data)
    ranges = [hdrs.get("Range") for _, p, hdrs in fake.requests if p == "/t"]
    assert ranges == [None, f"bytes={k}-"]
    steps = [b - a for a, b in zip([0, *seen], seen, strict=False) if b > a]
    assert max(steps) <= CHUNK and seen[-1] == len(data)  # memory bounded: 64 KiB at a time


def test_a_download_resumes_from_its_part_file_on_the_real_server(
    live: Live, recorder: Recorder, tmp_path: Path
) -> None:
    data = live.bundle.read_bytes()
    dest = tmp_path / "digits.part"
    dest.write_bytes(data[:100_000])
    client = _client(live.device(tmp_path / "id"), recorder.url)
    assert client.download(live.target_url(), dest, len(data), hashlib.sha256(data).hexdigest()) == len(data) - 100_000
    assert dest.read_bytes() == data
    assert [h.get("Range") for _, p, h in recorder.requests if p == live.target_url()] == ["bytes=100000-"]


@pytest.mark.parametrize(
    ("start", "content_length"),
    [(0, lambda n: None), (0, lambda n: n + 1000), (300_000, lambda n: None), (300_000, lambda n: n + 5)],
    ids=["200-no-length-endless", "200-longer-length", "206-no-length-endless", "206-longer-length"],
)
def test_a_server_that_sends_more_than_the_signed_length_is_refused_with_exactly_that_length_on_disk(
    fake: Fake, local: Identity, tmp_path: Path, start: int, content_length: Callable[[int], int | None]
) -> None:
    data = _data(1_000_000)
    fake.routes["/t"] = fake.endless(data, content_length)
    dest = tmp_path / "b.part"
    dest.write_bytes(data[:start])
    with pytest.raises(Refused) as e:
        _client(local, fake.url).download("/t", dest, len(data), hashlib.sha256(data).hexdigest())
    assert e.value.reason == "endless_data" and "1000000" in str(e.value)
    assert dest.read_bytes() == data
    assert fake.sent < len(data) + 1024 * CHUNK  # the client hung up; it did not read the server dry


def test_a_server_that_ignores_range_makes_the_download_start_again_from_zero(
    fake: Fake, local: Identity, tmp_path: Path
) -> None:
    data = _data(200_000)
    fake.routes["/t"] = lambda h: fake.body(h, 200, data, {}, len(data))
    dest = tmp_path / "b.part"
    dest.write_bytes(b"\x00" * 50_000)  # not even the right bytes: only the server's full body counts
    assert _client(local, fake.url).download("/t", dest, len(data), hashlib.sha256(data).hexdigest()) == len(data)
    assert dest.read_bytes() == data
    assert [h.get("Range") for _, p, h in fake.requests if p == "/t"] == ["bytes=50000-"]


def test_a_part_file_longer_than_the_signed_length_is_emptied_and_fetched_again(
    fake: Fake, local: Identity, tmp_path: Path
) -> None:
    data = _data(100_000)
    fake.routes["/t"] = fake.ranges(data)
    dest = tmp_path / "b.part"
    dest.write_bytes(data + b"trailing")
    assert _client(local, fake.url).download("/t", dest, len(data)) == len(data)
    assert dest.read_bytes() == data
    assert [h.get("Range") for _, p, h in fake.requests if p == "/t"] == [None]


def test_a_complete_part_file_needs_no_request_and_one_with_the_wrong_hash_is_emptied_and_refused(
    fake: Fake, local: Identity, tmp_path: Path
) -> None:
    data = _data(10_000)
    dest = tmp_path / "b.part"
    dest.write_bytes(data)
    client = _client(local, fake.url)
    assert client.download("/t", dest, len(data), hashlib.sha256(data).hexdigest()) == 0
    assert fake.requests == []
    with pytest.raises(Refused) as e:
        client.download("/t", dest, len(data), "0" * 64)
    assert e.value.reason == "hash_mismatch" and dest.stat().st_size == 0


def test_416_for_a_partial_file_empties_it_and_is_transient(fake: Fake, local: Identity, tmp_path: Path) -> None:
    fake.routes["/t"] = lambda h: fake.reply(h, 416, {"error": "range: not satisfiable"})
    dest = tmp_path / "b.part"
    dest.write_bytes(b"x" * 5000)
    with pytest.raises(Transient) as e:
        _client(local, fake.url).download("/t", dest, 10_000)
    assert e.value.reason == "range_not_satisfiable" and dest.stat().st_size == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (needs root); skipped when it cannot be mounted, failed under CI=true."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        reason = f"cannot mount a 1 MiB tmpfs: {(r.stderr or r.stdout).strip() or r.returncode}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_is_transient_naming_the_path_and_what_was_written_stays_for_a_resume(
    fake: Fake, local: Identity, small_disk: Path
) -> None:
    data = _data(2 << 20)
    fake.routes["/t"] = fake.ranges(data)
    dest = small_disk / "b.part"
    with pytest.raises(Transient) as e:
        _client(local, fake.url).download("/t", dest, len(data))
    assert e.value.reason == "disk_full" and str(dest) in str(e.value)
    kept = dest.read_bytes()
    assert 0 < len(kept) < len(data) and kept == data[: len(kept)]


# ================================================================================== renewal


def test_renewal_proves_possession_of_the_current_key_and_leaves_a_new_pair_the_server_takes(
    live: Live, tmp_path: Path
) -> None:
    ident = live.device(tmp_path)
    old_key = ident.key.read_bytes()
    client = _client(ident, live.url)
    assert not client.renew(days_before=30)  # a fresh certificate is good for 365 days
    assert ident.key.read_bytes() == old_key

    current = serialization.load_pem_private_key(old_key, None)
    assert isinstance(current, ec.EllipticCurvePrivateKey)
    with pytest.raises(Refused) as e:  # signed by some other key: the server wants the current one
        client._request_certificate(ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1()))
    assert e.value.reason == "http_401" and "signature" in str(e.value)

    assert client.renew(days_before=400)
    assert ident.key.read_bytes() != old_key and _pair_matches(ident) and not client.pending_key_path.exists()
    assert ident.key.stat().st_mode & 0o777 == 0o600
    serial = format(x509.load_pem_x509_certificate(ident.cert.read_bytes()).serial_number, "x")
    assert live.server_serial(ident.device_id) == serial
    assert client.check_in(None).changed
    with httpx.Client(base_url=live.url, timeout=30) as c:  # the old key signs in no more
        ch = c.post(AUTH[0], json={"device_id": ident.device_id}).json()["challenge"]
        r = c.post(AUTH[1], json={"device_id": ident.device_id, "challenge": ch, "signature": sign(current, ch)})
    assert r.status_code == 401


def test_a_device_past_its_certificate_expiry_still_renews_over_http(live: Live, tmp_path: Path) -> None:
    ident = live.device(tmp_path)
    later = datetime.now(UTC).timestamp() + 400 * 86400  # the device's clock: its certificate expired
    assert _client(ident, live.url, clock=lambda: later).renew(days_before=30)
    assert _pair_matches(ident) and _client(ident, live.url).check_in(None).changed


def test_a_cut_between_any_two_steps_of_a_renewal_leaves_a_key_and_certificate_that_work(
    live: Live, tmp_path: Path
) -> None:
    ident = live.device(tmp_path)
    for cut_after in range(5):  # 0: before step 1 ... 4: after step 4
        before = ident.key.read_bytes()
        client = _client(ident, live.url)
        client.token()
        current = serialization.load_pem_private_key(before, None)
        assert isinstance(current, ec.EllipticCurvePrivateKey)
        new = ec.generate_private_key(ec.SECP256R1())
        pem: list[str] = []
        steps: list[Callable[[], object]] = [
            lambda c=client, n=new: c._stage_key(n),
            lambda c=client, k=current, n=new, p=pem: p.append(c._request_certificate(k, n)),
            lambda c=client, p=pem: c._write_cert(p[0]),
            lambda c=client: c._commit_key(),
        ]
        for step in steps[:cut_after]:
            step()
        # the power goes here: nothing else of that process runs; the next one starts
        restarted = _client(ident, live.url)  # recover_identity() runs first
        assert _pair_matches(ident), cut_after  # a consistent pair on disk, whatever the cut
        assert restarted.check_in(None).changed, cut_after  # and the server takes it (a lost answer: finished)
        assert _pair_matches(ident) and not restarted.pending_key_path.exists(), cut_after
        serial = format(x509.load_pem_x509_certificate(ident.cert.read_bytes()).serial_number, "x")
        assert live.server_serial(ident.device_id) == serial, cut_after
        assert (ident.key.read_bytes() != before) == (cut_after >= 2), cut_after  # the server took the new key


def test_recover_identity_renames_a_pending_key_only_when_the_certificate_is_its_own(tmp_path: Path) -> None:
    old, new = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ident = _write_identity(tmp_path, "dev-0123456789abcdef", old, _self_signed(old))
    pending = tmp_path / "device.key.new"
    pending.write_bytes(_key_pem(new))
    (tmp_path / ".device.crt.abc.tmp").write_bytes(b"half")  # a cut atomic write
    recover_identity(ident.key, ident.cert)
    assert pending.exists() and _public(ident.key) == _public(ident.cert, cert=True)  # only the server knows
    assert not (tmp_path / ".device.crt.abc.tmp").exists()
    ident.cert.write_text(_self_signed(new))  # cut after step 3: the certificate is the new key's
    recover_identity(ident.key, ident.cert)
    assert not pending.exists() and _pair_matches(ident) and ident.key.read_bytes() == _key_pem(new)
    assert ident.key.stat().st_mode & 0o777 == 0o600


# ================================================================================== TUF


def test_stock_ngclient_refreshes_both_repositories_and_downloads_the_assigned_target_through_the_fetcher(
    live: Live, tmp_path: Path
) -> None:
    ident = live.device(tmp_path / "id")
    client = _client(ident, live.url)
    fetcher = client.tuf_fetcher()
    for d in ("image", "director", "targets"):
        (tmp_path / d).mkdir()
    image = Updater(str(tmp_path / "image"), f"{live.url}/tuf/image/", str(tmp_path / "targets"),
                    f"{live.url}/tuf/image/targets/", fetcher,
                    bootstrap=live.ring.root_file(1).read_bytes())
    image.refresh()  # root 2 is a 404: the fetcher's DownloadHTTPError ends the root walk
    info = image.get_targetinfo(live.bundle.name)
    assert info is not None and info.length == live.bundle.stat().st_size
    path = image.download_target(info)
    assert Path(path).read_bytes() == live.bundle.read_bytes()

    director = Updater(str(tmp_path / "director"), f"{live.url}/tuf/director/{ident.device_id}/", None, None,
                       fetcher, bootstrap=live.ring.director_root_file(1).read_bytes())
    director.refresh()
    assigned = director.get_targetinfo(live.bundle.name)
    assert assigned is not None and assigned.custom == {"model": "digits", "role": "serve", "device": ident.device_id}
    assert assigned.hashes == info.hashes and assigned.length == info.length

    with pytest.raises(DownloadHTTPError) as e:
        list(fetcher.fetch(f"{live.url}/tuf/director/dev-0000000000000000/timestamp.json"))
    assert e.value.status_code == 403


def test_the_fetcher_turns_a_cut_body_and_a_dead_server_into_tuf_download_errors(
    fake: Fake, local: Identity
) -> None:
    data = _data(200_000)
    fake.routes["/tuf/image/timestamp.json"] = fake.ranges(data, cut_first_at=1000)
    fetcher = _client(local, fake.url).tuf_fetcher()
    with pytest.raises(DownloadHTTPError) as e:
        list(fetcher.fetch(f"{fake.url}/tuf/image/2.root.json"))
    assert e.value.status_code == 404
    with pytest.raises(DownloadError) as cut:
        fetcher.download_bytes(f"{fake.url}/tuf/image/timestamp.json", len(data))
    assert not isinstance(cut.value, DownloadHTTPError)
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(DownloadError) as gone:
        _client(local, dead, timeout=5).tuf_fetcher().fetch(f"{dead}/tuf/image/timestamp.json")
    assert "cannot connect" in str(gone.value)
