"""Test helpers: a bundle maker and a simulated device (own key, CSR, challenge signing)."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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


def enroll(client: Any, enrollment_token: str) -> SimDevice:
    key = new_key()
    r = client.post("/api/v1/enroll", json={"token": enrollment_token, "csr": csr_pem(key)})
    assert r.status_code == 201, r.text
    body = r.json()
    return SimDevice(client, body["device_id"], key, body["certificate"], body["ca_certificate"])
