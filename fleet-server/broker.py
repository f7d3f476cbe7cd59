"""The fleet's MQTT broker, server side: the server's own broker identity, the files a Mosquitto needs
(its TLS certificate, the fleet CA, a CRL, the first dynamic-security configuration), and revocation that
reaches live sessions. The broker's configuration itself is ``deploy/mosquitto/``; docs/mqtt.md says why.

How a device is identified and confined (``deploy/mosquitto/mosquitto.conf`` and ``acl``): the broker
requires a client certificate signed by the fleet CA and takes its CN, the device id, as the user name;
static ACL ``pattern`` lines let ``%u`` publish only ``edgefleet/v1/%u/{telemetry,events,status,feedback}``
and read only ``edgefleet/v1/%u/cmd``. The server connects with a certificate of its own, CN
:data:`SERVER_IDENTITY` (never a device id: enrollment names devices ``dev-<hex>``), which the ACL lets
read every device's telemetry, events and status and publish ``cmd`` and alerts.

Revocation, in two layers, both from :func:`revoke_on_broker`:

1. Mosquitto's dynamic-security plugin, driven over MQTT (``$CONTROL/dynamic-security/v1``) as the
   server's identity: the device's user name becomes a dynsec client holding only the
   :data:`REVOKED_ROLE` (deny everything), then ``disableClient`` kicks its live session at once.
   Mosquitto consults the plugin before the ACL file, so from then on every publish, subscribe and
   delivery for that name is refused, whatever certificate it comes back with.
2. A CRL (``DATA/broker/crl.pem``) listing the certificates of revoked devices, rebuilt from the
   database, so that their TLS handshake fails and they cannot connect at all once the broker reloads
   it (SIGHUP; ``deploy/mosquitto/edgefleet-broker-crl.path`` does it when the file changes). The
   broker checks the CRL's nextUpdate: an expired CRL locks every device out, so it is reissued
   (:func:`refresh_crl`, ``python -m edgefleet.server.broker crl``) well before: valid
   :data:`CRL_DAYS`, reissued when fewer than :data:`CRL_REISSUE_DAYS` remain.

Raises :class:`BrokerError` (the broker is unreachable, refuses the server, or answers a command with
an error) and :class:`~edgefleet.errors.ConfigError` (no fleet CA, a bad identity name or hostname).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import secrets
import ssl
import sys
import threading
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgefleet.durable import atomic_write_bytes
from edgefleet.errors import ConfigError, EdgefleetError
from edgefleet.server.ca import CA_CERT, FleetCA, load_ca
from edgefleet.server.settings import Settings

__all__ = [
    "ADMIN_ROLE",
    "BROKER_CA",
    "BROKER_CERT",
    "BROKER_DIR",
    "BROKER_KEY",
    "CONTROL_TOPIC",
    "CRL",
    "CRL_DAYS",
    "CRL_REISSUE_DAYS",
    "DYNSEC_CONFIG",
    "RESPONSE_TOPIC",
    "REVOKED_ROLE",
    "SERVER_CERT",
    "SERVER_IDENTITY",
    "SERVER_KEY",
    "BrokerError",
    "DynsecAdmin",
    "build_crl",
    "crl_next_update",
    "dynsec_config",
    "init_broker_files",
    "issue_identity",
    "main",
    "refresh_crl",
    "revoke_commands",
    "revoke_on_broker",
    "revoked_certificates",
    "sync_revocations",
    "write_crl",
    "write_identity",
]

log = logging.getLogger(__name__)

SERVER_IDENTITY = "edgefleet-server"  # the CN of the server's broker certificate (its broker user name)
ADMIN_ROLE = "edgefleet-admin"  # dynsec role: may send dynamic-security commands and read their answers
REVOKED_ROLE = "edgefleet-revoked"  # dynsec role: denies every publish, delivery and subscription
CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = CONTROL_TOPIC + "/response"

BROKER_DIR = Path("broker")  # under the server's data folder, 0700
SERVER_CERT = BROKER_DIR / "server.crt"  # the server's identity to the broker (settings.mqtt_client_cert)
SERVER_KEY = BROKER_DIR / "server.key"
BROKER_CERT = BROKER_DIR / "broker.crt"  # the broker's TLS certificate (copied to the broker)
BROKER_KEY = BROKER_DIR / "broker.key"
BROKER_CA = BROKER_DIR / "ca.crt"  # a copy of the fleet CA certificate, the broker's cafile
CRL = BROKER_DIR / "crl.pem"  # the broker's crlfile
DYNSEC_CONFIG = BROKER_DIR / "dynamic-security.json"  # the first plugin_opt_config_file (the broker owns it)

CRL_DAYS = 30  # nextUpdate of a CRL is this far after its issue, days
CRL_REISSUE_DAYS = 20  # refresh_crl reissues when fewer days than this remain (daily timer: 19 days' slack)
COMMAND_TIMEOUT = 10.0  # a connection, subscription or command answer from the broker, s
_IDENTITY = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_DEVICE_ID = re.compile(r"\A[a-z0-9][a-z0-9-]{0,63}\Z")  # api.schemas.DEVICE_ID
_ALLOWED_ERRORS = frozenset({("deleteClient", "Client not found")})  # what an idempotent revocation may hear


class BrokerError(EdgefleetError):
    """The broker is unreachable, refused the server's identity, or answered a command with an error."""


# -- identities and files -------------------------------------------------------------------------


def issue_identity(ca: FleetCA, name: str = SERVER_IDENTITY, days: int = 825) -> tuple[bytes, bytes]:
    """A client certificate (CN = ``name``, clientAuth) and its new EC P-256 key, PEM, signed by the fleet
    CA: an identity to the broker for the server or another service (an alert consumer). Raises
    ConfigError naming ``name`` when it is not 1-64 of ``A-Za-z0-9._-`` or has a device id's shape
    (``dev-...``), which could one day be a device's, and ``days`` outside 1..3650."""
    if not _IDENTITY.match(name):
        raise ConfigError(f"name: {name[:80]!r} is not 1-64 characters of A-Za-z0-9._- (a broker user name)")
    if name.lower().startswith("dev-"):
        raise ConfigError(f"name: {name!r} has the shape of a device id (dev-...); pick one no device can hold")
    if not 1 <= days <= 3650:
        raise ConfigError(f"days: {days} is not between 1 and 3650")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _broker_dir(data_dir: Path) -> Path:
    folder = data_dir / BROKER_DIR
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
    except OSError as e:
        raise ConfigError(f"{folder}: cannot create the broker folder: {e.strerror or e}") from e
    return folder


def _write(path: Path, data: bytes) -> None:
    try:
        atomic_write_bytes(path, data, mode=0o600)
    except OSError as e:
        raise ConfigError(f"{path}: cannot write: {e.strerror or e}") from e


def write_identity(data_dir: Path, name: str = SERVER_IDENTITY, days: int = 825) -> tuple[Path, Path]:
    """Issue :func:`issue_identity` with the CA of ``data_dir`` and write it under ``DATA/broker/``
    (``server.crt``/``server.key`` for :data:`SERVER_IDENTITY`, else ``NAME.crt``/``NAME.key``; 0600,
    folder 0700), replacing an earlier one: (certificate path, key path). Point ``mqtt_client_cert`` and
    ``mqtt_client_key`` at them. Raises ConfigError."""
    cert, key = issue_identity(load_ca(data_dir), name, days)
    folder = _broker_dir(data_dir)
    stem = "server" if name == SERVER_IDENTITY else name
    cert_path, key_path = folder / f"{stem}.crt", folder / f"{stem}.key"
    _write(key_path, key)
    _write(cert_path, cert)
    return cert_path, key_path


def dynsec_config(server_identity: str = SERVER_IDENTITY) -> dict[str, Any]:
    """The dynamic-security plugin's first configuration: the server's user name holds :data:`ADMIN_ROLE`
    (``$CONTROL/dynamic-security/#`` only: its other rights come from the ACL file, because the plugin
    defers to it for anything it does not decide), and :data:`REVOKED_ROLE` exists for revocations.
    No passwords: every identity is a certificate. Default access is deny, so an unknown topic falls
    through to the ACL file."""
    every = [{"acltype": t, "topic": topic, "allow": False, "priority": 0}
             for t in ("publishClientSend", "publishClientReceive", "subscribePattern")
             for topic in ("#", "$CONTROL/#", "$SYS/#")]
    control = "$CONTROL/dynamic-security/#"
    return {
        "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": False, "subscribe": False,
                             "unsubscribe": True},
        "clients": [{"username": server_identity, "textname": "edgefleet server (dynsec admin)",
                     "roles": [{"rolename": ADMIN_ROLE}]}],
        "groups": [],
        "roles": [
            {"rolename": ADMIN_ROLE, "textdescription": "send dynamic-security commands, read the answers",
             "acls": [{"acltype": t, "topic": control, "allow": True, "priority": 0}
                      for t in ("publishClientSend", "publishClientReceive", "subscribePattern")]},
            {"rolename": REVOKED_ROLE, "textdescription": "a revoked device: nothing at all", "acls": every},
        ],
    }


def init_broker_files(settings: Settings, hostnames: list[str], days: int = 825) -> Path:
    """Everything a Mosquitto with ``deploy/mosquitto/mosquitto.conf`` needs, under ``DATA/broker/``
    (0600, folder 0700; copy them to ``/etc/mosquitto/edgefleet/``): ``ca.crt`` (the fleet CA),
    ``broker.crt``/``broker.key`` (TLS for ``hostnames``), ``crl.pem`` (from the database),
    ``dynamic-security.json`` (only when missing: after its first start the broker owns its copy), and
    the server's own identity ``server.crt``/``server.key``. Returns the folder. Raises ConfigError."""
    ca = load_ca(settings.data_dir)
    cert, key = ca.issue_server_cert(hostnames, days)
    folder = _broker_dir(settings.data_dir)
    _write(folder / BROKER_KEY.name, key)
    _write(folder / BROKER_CERT.name, cert)
    _write(folder / BROKER_CA.name, (settings.data_dir / CA_CERT).read_bytes())
    write_identity(settings.data_dir, SERVER_IDENTITY, days)
    dynsec = folder / DYNSEC_CONFIG.name
    if not dynsec.exists():
        _write(dynsec, json.dumps(dynsec_config(), indent=2).encode() + b"\n")
    write_crl(settings)
    return folder


# -- the CRL ------------------------------------------------------------------------------------------


def build_crl(ca: FleetCA, revoked: Iterable[tuple[int, datetime]], now: datetime | None = None,
              days: int = CRL_DAYS) -> bytes:
    """A CRL (PEM) signed by the fleet CA listing ``revoked`` (certificate serial, revocation time),
    valid from ``now`` for ``days`` (its nextUpdate); its CRL number is the issue time in ms, so it grows."""
    now = now or datetime.now(UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now - timedelta(minutes=5))
        .next_update(now + timedelta(days=days))
        .add_extension(x509.CRLNumber(int(now.timestamp() * 1000)), critical=False)
    )
    seen: set[int] = set()
    for serial, when in revoked:
        if serial in seen:
            continue
        seen.add(serial)
        when = when if when.tzinfo else when.replace(tzinfo=UTC)
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(min(when, now)).build()
        )
    return builder.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def revoked_certificates(settings: Settings, now: datetime | None = None) -> list[tuple[int, datetime]]:
    """(serial, revoked_at) of the current certificate of every revoked device whose certificate has not
    expired yet (an expired one is refused anyway), read from the server's database."""
    from sqlalchemy import select
    from sqlalchemy.exc import SQLAlchemyError

    from edgefleet.server.db import make_engine
    from edgefleet.server.models import Device

    now = now or datetime.now(UTC)
    engine = make_engine(settings.database_url())
    try:
        with engine.connect() as c:
            rows = c.execute(select(Device.cert_serial, Device.revoked_at, Device.cert_not_after)
                             .where(Device.revoked_at.is_not(None))).all()
    except SQLAlchemyError as e:
        raise BrokerError(f"db_url: cannot read the revoked devices for the CRL: {str(e).splitlines()[0]}") from e
    finally:
        engine.dispose()
    out: list[tuple[int, datetime]] = []
    for serial, revoked_at, not_after in rows:
        if not_after is not None and (not_after if not_after.tzinfo else not_after.replace(tzinfo=UTC)) < now:
            continue
        out.append((int(serial, 16), revoked_at or now))
    return out


def write_crl(settings: Settings, revoked: Iterable[tuple[int, datetime]] | None = None,
              now: datetime | None = None) -> Path:
    """Issue the CRL (``revoked``, default: :func:`revoked_certificates`) and write it to
    ``DATA/broker/crl.pem`` atomically: the path. The broker reads it when it (re)loads."""
    ca = load_ca(settings.data_dir)
    pem = build_crl(ca, revoked_certificates(settings, now) if revoked is None else revoked, now)
    path = _broker_dir(settings.data_dir) / CRL.name
    _write(path, pem)
    return path


def crl_next_update(path: Path, ca: FleetCA) -> datetime | None:
    """The nextUpdate of the CRL at ``path``; None when it is missing, unreadable, or not signed by ``ca``
    (so it must be reissued)."""
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
    except (OSError, ValueError):
        return None
    try:
        if crl.issuer != ca.cert.subject or not crl.is_signature_valid(ca.key.public_key()):
            return None
    except (InvalidSignature, TypeError):
        return None
    return crl.next_update_utc


def refresh_crl(settings: Settings, now: datetime | None = None, force: bool = False) -> bool:
    """Reissue ``DATA/broker/crl.pem`` from the database when ``force``, when it is missing or not the
    CA's, or when fewer than :data:`CRL_REISSUE_DAYS` remain before its nextUpdate: True when it did.
    Run it daily (``deploy/mosquitto/edgefleet-broker-crl.timer``) or from the server's own loop."""
    now = now or datetime.now(UTC)
    ca = load_ca(settings.data_dir)
    due = crl_next_update(settings.data_dir / CRL, ca)
    if not force and due is not None and due - now >= timedelta(days=CRL_REISSUE_DAYS):
        return False
    write_crl(settings, now=now)
    return True


# -- dynamic security over MQTT --------------------------------------------------------------------------


def revoke_commands(device_id: str, now: datetime | None = None) -> list[dict[str, Any]]:
    """The dynamic-security commands that revoke ``device_id``, idempotently: drop any dynsec client of
    that name, create it again with :data:`REVOKED_ROLE` only, and disable it (which kicks its session)."""
    at = (now or datetime.now(UTC)).isoformat(timespec="seconds")
    return [
        {"command": "deleteClient", "username": device_id},
        {"command": "createClient", "username": device_id, "textname": "revoked device",
         "textdescription": f"revoked by edgefleet at {at}", "roles": [{"rolename": REVOKED_ROLE}]},
        {"command": "disableClient", "username": device_id},
    ]


class DynsecAdmin:
    """A short MQTT 5 connection to the broker as the server's identity (``mqtt_url``, ``mqtt_ca_cert``,
    ``mqtt_client_cert``/``mqtt_client_key``, or ``mqtt_username``/``mqtt_password``) that sends
    dynamic-security commands and waits for their answers. Use it as a context manager; each wait is
    bounded by ``timeout``. Raises BrokerError."""

    def __init__(self, settings: Settings, timeout: float = COMMAND_TIMEOUT) -> None:
        if settings.mqtt_url is None:
            raise BrokerError("mqtt_url: not set; the server cannot reach the broker to revoke on it")
        if settings.mqtt_client_cert is None and settings.mqtt_username is None:
            raise BrokerError("mqtt_client_cert: revoking on the broker needs the server's identity "
                              "(python -m edgefleet.server.broker identity)")
        url = urlsplit(settings.mqtt_url)
        self.host = url.hostname or "localhost"
        self.tls = url.scheme == "mqtts"
        self.port = url.port or (8883 if self.tls else 1883)
        self.settings = settings
        self.timeout = timeout
        self._cond = threading.Condition()
        self._responses: dict[str, dict[str, Any]] = {}
        self._connected: str | None = None  # "ok", or why not
        self._subscribed: str | None = None
        self._client: Any = None

    def __enter__(self) -> DynsecAdmin:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        s = self.settings
        c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                        client_id=f"{SERVER_IDENTITY}-admin-{secrets.token_hex(4)}")
        if self.tls:
            c.tls_set(ca_certs=str(s.mqtt_ca_cert) if s.mqtt_ca_cert else None,
                      certfile=str(s.mqtt_client_cert) if s.mqtt_client_cert else None,
                      keyfile=str(s.mqtt_client_key) if s.mqtt_client_key else None, cert_reqs=ssl.CERT_REQUIRED)
        if s.mqtt_username is not None:
            c.username_pw_set(s.mqtt_username, s.mqtt_password.get_secret_value() if s.mqtt_password else None)
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        c.on_disconnect = self._on_disconnect
        where = f"{self.host}:{self.port}"
        try:
            c.connect(self.host, self.port, keepalive=30, clean_start=True)
        except (OSError, ssl.SSLError, ValueError) as e:
            raise BrokerError(f"mqtt_url: cannot connect to the broker at {where}: {e}") from e
        self._client = c
        c.loop_start()
        try:
            self._wait(lambda: self._connected is not None, "the broker's CONNACK")
            if self._connected != "ok":
                raise BrokerError(f"mqtt_client_cert: the broker at {where} refused the server: {self._connected}")
            c.subscribe(RESPONSE_TOPIC, qos=1)
            self._wait(lambda: self._subscribed is not None, f"the SUBACK for {RESPONSE_TOPIC}")
            if self._subscribed != "ok":
                raise BrokerError(f"the broker at {where} refused the server {RESPONSE_TOPIC}: {self._subscribed} "
                                  f"(is the dynamic-security plugin loaded, with {SERVER_IDENTITY} in {ADMIN_ROLE}?)")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Disconnect (idempotent)."""
        c, self._client = self._client, None
        if c is not None:
            c.disconnect()
            c.loop_stop()

    def run(self, commands: Sequence[dict[str, Any]],
            allowed: frozenset[tuple[str, str]] = _ALLOWED_ERRORS) -> list[dict[str, Any]]:
        """Send ``commands`` in one message and return their answers, in order. Raises BrokerError when one
        answers an error not in ``allowed`` ((command, error) pairs), or no answer comes in time."""
        if self._client is None:
            raise BrokerError("the dynamic-security connection is closed")
        tagged = [{**cmd, "correlationData": secrets.token_hex(8)} for cmd in commands]
        ids = [cmd["correlationData"] for cmd in tagged]
        info = self._client.publish(CONTROL_TOPIC, json.dumps({"commands": tagged}), qos=1)
        if info.rc != 0:
            raise BrokerError(f"cannot send dynamic-security commands to {self.host}:{self.port} (rc {info.rc})")
        self._wait(lambda: all(i in self._responses for i in ids) or self._connected != "ok",
                   "the answers to " + ", ".join(str(cmd["command"]) for cmd in commands))
        with self._cond:
            if not all(i in self._responses for i in ids):
                raise BrokerError(f"the broker at {self.host}:{self.port} closed the connection: {self._connected}")
            answers = [self._responses.pop(i) for i in ids]
        for cmd, answer in zip(commands, answers, strict=True):
            error = answer.get("error")
            if error and (cmd["command"], error) not in allowed:
                raise BrokerError(f"{cmd['command']} {cmd.get('username', '')}: the broker answered {error!r}")
        return answers

    def _wait(self, done: Any, what: str) -> None:
        with self._cond:
            if not self._cond.wait_for(done, self.timeout):
                raise BrokerError(f"no {what} from the broker at {self.host}:{self.port} within {self.timeout:g} s")

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        with self._cond:
            self._connected = "ok" if not reason.is_failure else str(reason)
            self._cond.notify_all()

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, reasons: list[Any], _p: Any) -> None:
        with self._cond:
            bad = [str(r) for r in reasons if r.is_failure]
            self._subscribed = "ok" if not bad else ", ".join(bad)
            self._cond.notify_all()

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        try:
            body = json.loads(msg.payload)
            answers = body["responses"] if isinstance(body, dict) else []
        except (ValueError, KeyError, TypeError):
            return
        with self._cond:
            for a in answers if isinstance(answers, list) else []:
                if isinstance(a, dict) and isinstance(a.get("correlationData"), str):
                    self._responses[a["correlationData"]] = a
            self._cond.notify_all()

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        with self._cond:
            self._connected = f"disconnected ({reason})"
            self._cond.notify_all()


def _check_device_id(device_id: str) -> None:
    if not _DEVICE_ID.match(device_id):
        raise BrokerError(f"device_id: {device_id[:80]!r} is not a device id")


def revoke_on_broker(settings: Settings, device_id: str) -> None:
    """Make the revocation of ``device_id`` (already committed in the database) reach the broker: rewrite
    the CRL from the database (the broker refuses the certificate's TLS handshake once it reloads), then,
    when ``mqtt_url`` is set, give the device's user name only :data:`REVOKED_ROLE` in the
    dynamic-security plugin and disable it, which cuts its open connection at once. Idempotent; blocks up
    to a few :data:`COMMAND_TIMEOUT`. Raises BrokerError (the broker is unreachable or refuses: the
    database stays revoked, and :func:`sync_revocations` replays it later) or ConfigError (no CA)."""
    _check_device_id(device_id)
    failed: BrokerError | None = None
    if settings.mqtt_url is not None:
        try:  # the live session first: it is what matters most, and needs neither the CA nor the database
            with DynsecAdmin(settings) as admin:
                admin.run(revoke_commands(device_id))
        except BrokerError as e:
            failed = e
    write_crl(settings)
    if failed is not None:
        raise failed
    log.info("revoked %s on the broker: %s, CRL rewritten", device_id,
             "session cut and every topic denied" if settings.mqtt_url else "no mqtt_url (no live session cut)")


def sync_revocations(settings: Settings, batch: int = 200) -> int:
    """Replay every revoked device of the database into the broker's dynamic-security plugin (after the
    broker was unreachable during a revocation, or lost its configuration) and rewrite the CRL: the
    number of devices. Idempotent. Raises BrokerError or ConfigError."""
    from sqlalchemy import select
    from sqlalchemy.exc import SQLAlchemyError

    from edgefleet.server.db import make_engine
    from edgefleet.server.models import Device

    engine = make_engine(settings.database_url())
    try:
        with engine.connect() as c:
            ids = [r[0] for r in c.execute(select(Device.id).where(Device.revoked_at.is_not(None))
                                           .order_by(Device.id))]
    except SQLAlchemyError as e:
        raise BrokerError(f"db_url: cannot read the revoked devices: {str(e).splitlines()[0]}") from e
    finally:
        engine.dispose()
    write_crl(settings)
    if settings.mqtt_url is None or not ids:
        return len(ids)
    with DynsecAdmin(settings) as admin:
        for i in range(0, len(ids), batch):
            admin.run([cmd for d in ids[i:i + batch] for cmd in revoke_commands(d)])
    return len(ids)


# -- python -m edgefleet.server.broker ----------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``init`` (broker files and the server's identity), ``identity`` (another service's identity),
    ``crl`` (reissue the CRL when due), ``sync`` (replay revocations into the broker). Settings come
    from ``--config`` and ``EDGEFLEET_SERVER_*`` like the server's; ``--data`` overrides ``data_dir``."""
    from edgefleet.server.settings import load_settings

    p = argparse.ArgumentParser(prog="python -m edgefleet.server.broker", description=main.__doc__)
    p.add_argument("--config", help="server.toml (default: none; EDGEFLEET_SERVER_* still apply)")
    p.add_argument("--data", type=Path, help="the server's data folder (data_dir)")
    sub = p.add_subparsers(dest="cmd", required=True)
    init = sub.add_parser("init", help="write DATA/broker/: CA, broker TLS, CRL, dynsec config, server identity")
    init.add_argument("--hostname", action="append", required=True, help="a name devices reach the broker by")
    init.add_argument("--days", type=int, default=825, help="certificate validity, days")
    ident = sub.add_parser("identity", help="issue DATA/broker/NAME.crt and NAME.key for another service")
    ident.add_argument("name")
    ident.add_argument("--days", type=int, default=825, help="certificate validity, days")
    crl = sub.add_parser("crl", help="reissue DATA/broker/crl.pem when it is due (or --force)")
    crl.add_argument("--force", action="store_true")
    sub.add_parser("sync", help="replay every revoked device into the broker and rewrite the CRL")
    args = p.parse_args(argv)
    try:
        settings = load_settings(args.config, data_dir=args.data)
        if args.cmd == "init":
            print(init_broker_files(settings, args.hostname, args.days))
        elif args.cmd == "identity":
            print(*write_identity(settings.data_dir, args.name, args.days))
        elif args.cmd == "crl":
            done = refresh_crl(settings, force=args.force)
            print(f"{settings.data_dir / CRL}: {'reissued' if done else 'still valid long enough'}")
        else:
            print(f"{sync_revocations(settings)} revoked device(s) on the broker")
    except EdgefleetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
