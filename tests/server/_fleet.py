"""Test helpers: a bundle maker, a simulated device (own key, CSR, challenge signing), and a real
``edgefleet server run`` process on a free loopback port, with its RSS read from /proc."""

from __future__ import annotations

import base64
import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgefleet.bundle import Manifest, file_ref, write_bundle


def make_bundle(folder: Path, name: str = "digits", version: str = "1.0.0", size: int = 2048) -> Path:
    model = hashlib.sha256(f"{name}{version}".encode()).digest() * (size // 32 + 1)
    model = model[:size]
    manifest = Manifest(
        name=name,
        version=version,
        runtime="onnx",
        model=file_ref("model.onnx", model),
        inputs=[{"name": "x", "dtype": "float32", "shape": [1, 4]}],
        outputs=[{"name": "y", "dtype": "float32", "shape": [1, 2]}],
        created_at=datetime(2026, 11, 1, tzinfo=UTC),
    )
    folder.mkdir(parents=True, exist_ok=True)
    return write_bundle(folder / manifest.bundle_name, manifest, {"model.onnx": model})


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def csr_pem(key: ec.EllipticCurvePrivateKey, cn: str = "device") -> str:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def sign(key: ec.EllipticCurvePrivateKey, data: str) -> str:
    return base64.b64encode(key.sign(data.encode(), ec.ECDSA(hashes.SHA256()))).decode()


@dataclass
class SimDevice:
    """A device as the server sees it: its id, key and certificate, and an HTTP client."""

    client: Any  # httpx.Client or starlette TestClient
    id: str
    key: ec.EllipticCurvePrivateKey
    cert: str
    ca: str
    token: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def authenticate(self) -> str:
        r = self.client.post("/api/v1/device-auth/challenge", json={"device_id": self.id})
        assert r.status_code == 200, r.text
        ch = r.json()["challenge"]
        r = self.client.post(
            "/api/v1/device-auth/token", json={"device_id": self.id, "challenge": ch, "signature": sign(self.key, ch)}
        )
        assert r.status_code == 200, r.text
        self.token = r.json()["access_token"]
        return self.token

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def publish_roots(client: Any, headers: dict[str, str], keys: Path) -> Any:
    """What ``edgefleet keys init --keys KEYS --server URL`` does, over ``client`` (httpx or TestClient)
    with an operator's ``headers``, for whichever root the server lacks: image root 1 with an empty
    targets 1, and director root 1, signed by the keyring in ``keys`` (made with one root key when there
    is none). A server refuses enrollment until both roots exist. Returns the
    :class:`~edgefleet.tufmeta.keyring.Keyring`; ``pinned(ring, token)`` makes a token devices accept."""
    from tuf.api.metadata import Targets

    from edgefleet.tufmeta import canonical_bytes, expiry_from
    from edgefleet.tufmeta.keyring import KEYS_FILE, Keyring

    r = client.get("/tuf/image/keys", headers=headers)
    assert r.status_code == 200, r.text
    info = r.json()
    ring = Keyring.load(keys) if (keys / KEYS_FILE).exists() else Keyring.create(keys, 1, 1)
    ring.online = dict(info["keys"])
    ring.save()
    now = datetime.now(UTC)
    uploads: list[tuple[str, Any]] = []
    if int(info.get("root_version", 0)) == 0:
        root = ring.sign_root(ring.build_root(now), ring.roles["root"])
        ring.save_root(root)
        uploads += [("/tuf/image/root", root),
                    ("/tuf/image/targets", ring.sign_targets(Targets(version=1, expires=expiry_from(now, "targets"))))]
    if int(info.get("director_root_version", 0)) == 0:
        director = ring.sign_root(ring.build_director_root(now), ring.roles["root"])
        ring.save_director_root(director)
        uploads.append(("/tuf/director/root", director))
    for path, md in uploads:
        r = client.put(path, content=canonical_bytes(md), headers={**headers, "content-type": "application/json"})
        assert r.status_code == 200, f"PUT {path}: {r.text}"
    return ring


def pinned(ring: Any, enrollment_token: str) -> str:
    """``enrollment_token`` with the pin of ``ring``'s newest image root (what `device enroll-token --keys`
    prints)."""
    from edgefleet.tufmeta.pin import pin_token

    root = ring.latest_root()
    return pin_token(enrollment_token, root.signed.version, ring.fingerprint())


def enroll(client: Any, enrollment_token: str) -> SimDevice:
    """Enroll a simulated device (the server must have its roots: :func:`publish_roots`)."""
    key = new_key()
    r = client.post("/api/v1/enroll", json={"token": enrollment_token, "csr": csr_pem(key)})
    assert r.status_code == 201, r.text
    body = r.json()
    return SimDevice(client, body["device_id"], key, body["certificate"], body["ca_certificate"])


CLI = [sys.executable, "-c", "from edgefleet.cli.main import main; main()"]
MIB = 1 << 20


def proc_status_kib(pid: int, key: str) -> int:
    """A ``/proc/PID/status`` figure in KiB (``VmRSS``, ``VmHWM``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class Server:
    """``edgefleet server run`` as a child process on a free port (``env``: EDGEFLEET_SERVER_* settings)."""

    def __init__(self, data: Path, db: str, env: dict[str, str] | None = None) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.data, self.db, self.env = data, db, env or {}
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        """Start and wait for READY=1 (sd_notify) and a 200 from /healthz. Raises AssertionError if it dies."""
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify_path = self.data.parent / f"notify-{self.port}.sock"
        notify_path.unlink(missing_ok=True)
        notify.bind(str(notify_path))
        notify.settimeout(30)
        env = {
            **os.environ, "EDGEFLEET_SERVER_ALLOW_PLAIN_HTTP_DEVICES": "true", "NOTIFY_SOCKET": str(notify_path),
            **self.env,
        }
        self.proc = subprocess.Popen(
            [*CLI, "server", "run", "--data", str(self.data), "--db", self.db, "--port", str(self.port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        with notify:
            try:
                assert b"READY=1" in notify.recv(4096)  # systemd is told once the server listens
            except TimeoutError:
                raise AssertionError(self.stop()) from None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.stderr.read().decode() if self.proc.stderr else ""
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise AssertionError("server did not start")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> str:
        """Stop the server; returns what it logged."""
        if self.proc is None:
            return ""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.stderr.read().decode() if self.proc.stderr else ""

    def rss_mib(self) -> float:
        return proc_status_kib(self.pid, "VmRSS") / 1024


class PeakRSS:
    """The peak RSS of a process while a block runs, read from /proc: ``VmHWM`` after resetting it
    (``clear_refs`` 5), and samples of ``VmRSS`` where that reset is not allowed."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = 0.0
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.peak = max(self.peak, proc_status_kib(self.pid, "VmRSS") / 1024)
            except (OSError, KeyError):
                return

    def __enter__(self) -> PeakRSS:
        self.before = proc_status_kib(self.pid, "VmRSS") / 1024
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        except OSError:
            pass
        self.peak = self.before
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        try:
            hwm = proc_status_kib(self.pid, "VmHWM") / 1024
        except (OSError, KeyError):
            return
        self.peak = max(self.peak, hwm)

    @property
    def growth_mib(self) -> float:
        return self.peak - self.before
