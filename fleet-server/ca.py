"""The fleet's certificate authority: an EC P-256 key (0600) and a self-signed CA certificate under
``DATA/ca/``; it signs device certificates (CN = device id) from their CSRs and checks them back.

Raises :class:`DeviceIdentityError` (a CSR or certificate is unacceptable) and
:class:`edgefleet.errors.ConfigError` (the CA files are missing or unreadable).
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgefleet.durable import atomic_write_bytes
from edgefleet.errors import ConfigError, EdgefleetError

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "TLS_CERT",
    "TLS_KEY",
    "DeviceIdentityError",
    "FleetCA",
    "check_hostnames",
    "common_name",
    "create_ca",
    "load_ca",
    "verify_signature",
    "write_server_cert",
]

CA_KEY = Path("ca") / "ca.key"
CA_CERT = Path("ca") / "ca.crt"
TLS_KEY = Path("tls") / "server.key"
TLS_CERT = Path("tls") / "server.crt"
_CA_YEARS = 20
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"\A(?:\*\.)?{_LABEL}(?:\.{_LABEL})*\Z")  # a wildcard only as the first label


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if len(host) > 253 or not _DNS_NAME.match(host):
        raise ConfigError(f"hostname: {host[:80]!r} is neither a DNS name nor an IP address")
    return x509.DNSName(host.lower())


def check_hostnames(hostnames: list[str]) -> list[x509.GeneralName]:
    """The subject alternative names for ``hostnames``. Raises ConfigError naming ``hostname`` when none is
    given or one is neither a DNS name nor an IP address."""
    if not hostnames:
        raise ConfigError("hostname: give at least one DNS name or IP address the devices connect to")
    return [_general_name(h) for h in hostnames]


class DeviceIdentityError(EdgefleetError):
    """A CSR, certificate or signature does not prove what it claims."""


@dataclass(frozen=True)
class FleetCA:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def cert_pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    def sign_device(self, csr_pem: str, device_id: str, days: int) -> x509.Certificate:
        """A certificate for the CSR's key with CN = ``device_id``. The CSR must be self-consistent
        (its signature checks) and hold an EC P-256 key."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode())
        except ValueError as e:
            raise DeviceIdentityError("csr: not a PEM certificate signing request") from e
        if not csr.is_signature_valid:
            raise DeviceIdentityError("csr: its signature does not match its key")
        key = csr.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
            raise DeviceIdentityError("csr: the key must be EC P-256")
        now = datetime.now(UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
            .issuer_name(self.cert.subject)
            .public_key(key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    def issue_server_cert(self, hostnames: list[str], days: int = 825) -> tuple[bytes, bytes]:
        """A TLS server certificate and key (PEM) for ``hostnames``, which devices verify with the CA.
        Raises ConfigError naming ``hostname`` when none is given or one is neither a DNS name nor an IP."""
        names = check_hostnames(hostnames)
        if not 1 <= days <= 3650:
            raise ConfigError(f"days: {days} is not between 1 and 3650")
        cn = hostnames[0] if len(hostnames[0]) <= 64 else "edgefleet server"  # X.509 bounds CN; SANs matter
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return cert.public_bytes(serialization.Encoding.PEM), key_pem

    def check_device_cert(self, pem: str) -> x509.Certificate:
        """The certificate, if this CA signed it and it is within its validity; else DeviceIdentityError."""
        try:
            cert = x509.load_pem_x509_certificate(pem.encode())
        except ValueError as e:
            raise DeviceIdentityError("client certificate: not PEM") from e
        try:
            cert.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, InvalidSignature) as e:
            raise DeviceIdentityError("client certificate: not issued by the fleet CA") from e
        now = datetime.now(UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise DeviceIdentityError("client certificate: expired or not yet valid")
        return cert


def common_name(cert: x509.Certificate) -> str:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = attrs[0].value if attrs else ""
    return value if isinstance(value, str) else value.decode()


def verify_signature(cert_pem: str, signature: bytes, data: bytes) -> bool:
    """True when ``signature`` (DER ECDSA-SHA256) over ``data`` was made by the certificate's key."""
    key = x509.load_pem_x509_certificate(cert_pem.encode()).public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return False
    try:
        key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return False
    return True


def create_ca(data_dir: Path, name: str = "edgefleet fleet CA") -> FleetCA:
    """Make the CA under ``data_dir`` (refusing to overwrite one): folder 0700, key and certificate 0600 (like
    everything in the data folder; the certificate is public, hand out a copy)."""
    key_path, cert_path = data_dir / CA_KEY, data_dir / CA_CERT
    if key_path.exists() or cert_path.exists():
        raise ConfigError(f"{key_path.parent}: a fleet CA already exists; refusing to replace it")
    key_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(key_path.parent, 0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=365 * _CA_YEARS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    atomic_write_bytes(key_path, pem, mode=0o600)
    atomic_write_bytes(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o600)
    return FleetCA(key, cert)


def load_ca(data_dir: Path) -> FleetCA:
    """The CA under ``data_dir``. Raises ConfigError when missing (run ``edgefleet server init``)."""
    key_path, cert_path = data_dir / CA_KEY, data_dir / CA_CERT
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except FileNotFoundError as e:
        raise ConfigError(f"{e.filename}: no fleet CA; run `edgefleet server init --data {data_dir}`") from e
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key_path.parent}: cannot read the fleet CA: {e}") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{key_path}: the fleet CA key must be an EC key")
    if os.stat(key_path).st_mode & 0o077:
        raise ConfigError(f"{key_path}: the CA key is readable by others; chmod 600 it")
    return FleetCA(key, cert)


def write_server_cert(data_dir: Path, hostnames: list[str], days: int = 825) -> tuple[Path, Path]:
    """Issue a TLS server certificate from the fleet CA under ``data_dir`` and write it to
    ``DATA/tls/server.crt`` and its key to ``DATA/tls/server.key`` (0600, folder 0700), replacing
    earlier ones: (certificate path, key path). Raises ConfigError (no CA, a bad hostname, unwritable)."""
    cert, key = load_ca(data_dir).issue_server_cert(hostnames, days)
    cert_path, key_path = data_dir / TLS_CERT, data_dir / TLS_KEY
    try:
        key_path.parent.mkdir(mode=0o700, exist_ok=True)
        os.chmod(key_path.parent, 0o700)
        atomic_write_bytes(key_path, key, mode=0o600)
        atomic_write_bytes(cert_path, cert, mode=0o600)
    except OSError as e:
        raise ConfigError(f"{key_path.parent}: cannot write the TLS certificate: {e.strerror or e}") from e
    return cert_path, key_path
