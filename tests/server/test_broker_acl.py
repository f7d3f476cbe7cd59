"""The fleet's broker as deployed: a real Mosquitto started here on free ports with deploy/mosquitto's
``mosquitto.conf`` and ``acl`` (only paths and ports rewritten), real certificates from a real fleet CA
(``edgefleet server init``; devices enrolled through the API), paho-mqtt v2 clients over TLS.

Device A cannot publish under B's prefix nor read B's ``cmd``; a certificate of another CA (or none)
cannot connect; a revoked device's live session is cut, it is denied everything at once and, once the
broker reloaded the CRL, cannot connect at all; the server's identity reads what it ingests (through a
shared subscription) and publishes ``cmd`` and alerts. Also: an expired CRL locks out every device
(why :func:`refresh_crl` reissues it early), and :func:`sync_revocations` replays revocations into a
broker that lost its dynamic-security state. Mosquitto missing: skipped, failed under CI=true.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from _fleet import SimDevice, csr_pem, enroll, new_key, publish_roots
from _support import free_port, wait_until
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from fastapi.testclient import TestClient
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.errors import ConfigError
from edgefleet.server import broker as fb
from edgefleet.server.app import create_app
from edgefleet.server.ca import create_ca, load_ca
from edgefleet.server.settings import Settings
from edgefleet.server.state import open_state

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "mosquitto"
WAIT = 15.0  # s: the bound on waiting for an event that must come (never a timing assertion)
ACCEPTED = {"Success", "No matching subscribers"}  # PUBACK reasons of an authorized publish (MQTT 5)


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def _mosquitto() -> tuple[str, str]:
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
    if exe is None:
        _unavailable("the mosquitto binary is not installed (apt-get install mosquitto)")
    plugins = sorted(glob.glob("/usr/lib/*/mosquitto_dynamic_security.so") + glob.glob("/usr/lib/mosquitto_dynamic_security.so"))
    if not plugins:
        _unavailable("mosquitto_dynamic_security.so is not installed (Mosquitto >= 2.0 ships it)")
    return str(exe), plugins[0]


class Broker:
    """``mosquitto -c`` with deploy/mosquitto/mosquitto.conf, its ``/etc/mosquitto/edgefleet/`` and
    ``/var/lib/mosquitto/`` moved into ``root``, the listeners on free loopback ports; the broker files
    come from the server's ``DATA/broker/`` as an operator copies them."""

    def __init__(self, exe: str, plugin: str, root: Path, broker_files: Path) -> None:
        self.root, self.etc, self.var = root, root / "etc", root / "var"
        self.etc.mkdir(parents=True)
        self.var.mkdir()
        for name in ("ca.crt", "broker.crt", "broker.key", "crl.pem"):
            shutil.copy(broker_files / name, self.etc / name)
        shutil.copy(DEPLOY / "acl", self.etc / "acl")
        shutil.copy(broker_files / "dynamic-security.json", self.var / "edgefleet-dynamic-security.json")
        self.device_port, self.server_port = free_port(), free_port()
        conf = (DEPLOY / "mosquitto.conf").read_text()
        for old, new in [("/etc/mosquitto/edgefleet/", f"{self.etc}/"), ("/var/lib/mosquitto/", f"{self.var}/"),
                         ("\nlistener 8883\n", f"\nlistener {self.device_port} 127.0.0.1\n"),
                         ("\nlistener 8884 127.0.0.1\n", f"\nlistener {self.server_port} 127.0.0.1\n"),
                         ("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so", plugin)]:
            assert old in conf, f"deploy/mosquitto/mosquitto.conf no longer has {old!r}"
            conf = conf.replace(old, new)
        if os.geteuid() == 0:
            conf += "user root\n"  # else it drops to `mosquitto`, who cannot write the test's folders
        (root / "mosquitto.conf").write_text(conf)
        self.log = root / "mosquitto.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen([exe, "-c", str(root / "mosquitto.conf")], stdout=out, stderr=out)
        if not wait_until(lambda: "running" in self.log_text() or self.proc.poll() is not None, WAIT) \
                or self.proc.poll() is not None:
            raise RuntimeError(f"mosquitto did not start:\n{self.log_text()[-2000:]}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def crl_check(self, crl: Path) -> subprocess.CompletedProcess[str]:
        """edgefleet-broker-crl.service's ExecStartPre= on ``crl``, with this broker's paths."""
        unit = (DEPLOY / "edgefleet-broker-crl.service").read_text()
        line = next(x for x in unit.splitlines() if x.startswith("ExecStartPre="))
        args = line.removeprefix("ExecStartPre=").replace("/etc/mosquitto/edgefleet/", f"{self.etc}/")
        args = args.replace("/var/lib/edgefleet-server/broker/crl.pem", str(crl))
        return subprocess.run(args.split(), capture_output=True, text=True, timeout=30)

    def install_crl(self, crl: Path, checked: bool = True) -> None:
        """What edgefleet-broker-crl.service does when the server rewrote its CRL: check it (unless not
        ``checked``), copy it, SIGHUP; returns once the broker logged the reload (it reloads before
        handling its next connection)."""
        if checked:
            check = self.crl_check(crl)
            assert check.returncode == 0, check.stdout + check.stderr
        shutil.copy(crl, self.etc / "crl.pem")
        before = self.log_text().count("Reloading config.")
        self.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: self.log_text().count("Reloading config.") > before, WAIT), self.log_text()[-2000:]
        assert self.proc.poll() is None, self.log_text()[-2000:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Client:
    """A paho-mqtt v2 client (MQTT 5, TLS) that records what happens to it."""

    name: str
    mqttc: Any
    cond: threading.Condition = field(default_factory=threading.Condition)
    connack: str | None = None
    disconnects: list[str] = field(default_factory=list)
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    pubacks: dict[int, str] = field(default_factory=dict)
    subacks: dict[int, list[str]] = field(default_factory=dict)

    def _event(self, update: Any) -> None:
        with self.cond:
            update()
            self.cond.notify_all()

    def wait(self, what: Any, description: str) -> None:
        with self.cond:
            assert self.cond.wait_for(what, WAIT), f"{self.name}: no {description}"

    def publish(self, topic: str, payload: str, retain: bool = False) -> str:
        """Publish at QoS 1; the PUBACK's reason (MQTT 5 says "Not authorized" for an ACL denial)."""
        info = self.mqttc.publish(topic, payload, qos=1, retain=retain)
        self.wait(lambda: info.mid in self.pubacks, f"PUBACK for {topic}")
        return self.pubacks[info.mid]

    def subscribe(self, *topics: str) -> list[str]:
        _rc, mid = self.mqttc.subscribe([(t, 1) for t in topics])
        self.wait(lambda: mid in self.subacks, f"SUBACK for {topics}")
        return self.subacks[mid]

    def got(self, topic: str, payload: bytes) -> bool:
        with self.cond:
            return (topic, payload) in self.messages

    def close(self) -> None:
        self.mqttc.disconnect()
        self.mqttc.loop_stop()


def connect(name: str, port: int, ca: Path, cert: Path | None, key: Path | None, client_id: str | None = None) -> Client:
    """A client connecting as ``cert`` (or with none): it has a ``connack`` ("Success" or why not) or a
    disconnect once this returns, and never reconnects by itself."""
    m = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id or name,
                    protocol=mqtt.MQTTv5, reconnect_on_failure=False)
    m.tls_set(ca_certs=str(ca), certfile=str(cert) if cert else None, keyfile=str(key) if key else None)
    c = Client(name, m)
    m.on_connect = lambda _c, _u, _f, rc, _p: c._event(lambda: setattr(c, "connack", str(rc)))
    m.on_disconnect = lambda _c, _u, _f, rc, _p: c._event(lambda: c.disconnects.append(str(rc)))
    m.on_message = lambda _c, _u, msg: c._event(lambda: c.messages.append((msg.topic, msg.payload)))
    m.on_publish = lambda _c, _u, mid, rc, _p: c._event(lambda: c.pubacks.__setitem__(mid, str(rc)))
    m.on_subscribe = lambda _c, _u, mid, rcs, _p: c._event(lambda: c.subacks.__setitem__(mid, [str(r) for r in rcs]))
    try:
        m.connect("127.0.0.1", port, keepalive=30)
    except OSError as e:  # ssl.SSLError too: the broker refused the handshake before CONNECT
        c.disconnects.append(f"{type(e).__name__}: {e}")
        return c
    m.loop_start()
    c.wait(lambda: c.connack is not None or bool(c.disconnects), "CONNACK nor disconnect")
    return c


@dataclass
class Fleet:
    """A server data folder made by ``edgefleet server init``, its API in process (devices enroll through
    it), broker files from :func:`init_broker_files`, and the Mosquitto running them."""

    root: Path
    settings: Settings  # what the server would run with: mqtt_* point at the broker's server listener
    api: TestClient
    admin: dict[str, str]
    broker: Broker
    devices: dict[str, tuple[SimDevice, Path, Path]] = field(default_factory=dict)
    clients: list[Client] = field(default_factory=list)

    @property
    def ca(self) -> Path:
        return self.broker.etc / "ca.crt"

    def enroll(self, label: str) -> str:
        r = self.api.post("/api/v1/enrollment-tokens", json={}, headers=self.admin)
        assert r.status_code == 201, r.text
        d = enroll(self.api, r.json()["token"])
        cert, key = self.root / f"{label}.crt", self.root / f"{label}.key"
        cert.write_text(d.cert)
        key.write_bytes(d.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
        self.devices[label] = (d, cert, key)
        return d.id

    def revoke(self, label: str) -> str:
        """Revoke device ``label`` through the API (again is fine): its id."""
        r = self.api.post(f"/api/v1/devices/{self.id(label)}/revoke", headers=self.admin)
        assert r.status_code == 200, r.text
        return self.id(label)

    def id(self, label: str) -> str:
        return self.devices[label][0].id

    def device(self, label: str, port: int | None = None) -> Client:
        _d, cert, key = self.devices[label]
        c = connect(label, port or self.broker.device_port, self.ca, cert, key)
        self.clients.append(c)
        return c

    def other_cert(self, label: str) -> tuple[Path, Path]:
        """A second certificate for device ``label``'s id, made once, which no CRL lists: what a device
        still holds from before a renewal (the server's database keeps only the current serial)."""
        cert_path, key_path = self.root / f"{label}-old.crt", self.root / f"{label}-old.key"
        if not cert_path.exists():
            key = new_key()
            cert = load_ca(self.settings.data_dir).sign_device(csr_pem(key), self.id(label), 30)
            key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
            cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cert_path, key_path

    def server(self, client_id: str = "edgefleet-server-test") -> Client:
        s = self.settings
        c = connect(client_id, self.broker.server_port, self.ca, s.mqtt_client_cert, s.mqtt_client_key, client_id)
        self.clients.append(c)
        return c


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    exe, plugin = _mosquitto()
    root = tmp_path_factory.mktemp("broker-acl")
    data = root / "data"
    out = subprocess.run([sys.executable, "-c", "from edgefleet.cli.main import main; main()", "server", "init",
                          "--data", str(data)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    admin = {"Authorization": f"Bearer {out.stdout.strip().splitlines()[-1].strip()}"}
    app_settings = Settings(data_dir=data, allow_plain_http_devices=True)
    files = fb.init_broker_files(app_settings, ["127.0.0.1", "localhost"])
    b = Broker(exe, plugin, root / "mosquitto", files)
    settings = Settings(data_dir=data, allow_plain_http_devices=True, mqtt_url=f"mqtts://127.0.0.1:{b.server_port}",
                        mqtt_ca_cert=files / "ca.crt", mqtt_client_cert=data / fb.SERVER_CERT,
                        mqtt_client_key=data / fb.SERVER_KEY)
    state = open_state(app_settings)
    try:
        with TestClient(create_app(app_settings, state), base_url="http://testserver") as api:
            publish_roots(api, admin, root / "keyring")
            f = Fleet(root, settings, api, admin, b)
            for label in ("a", "b", "c"):
                f.enroll(label)
            yield f
            for c in f.clients:
                c.close()
    finally:
        b.stop()
        state.loop_db.close()
        state.engine.dispose()


def test_broker_files_are_private_and_name_the_server_identity(fleet: Fleet) -> None:
    folder = fleet.settings.data_dir / fb.BROKER_DIR
    assert folder.stat().st_mode & 0o777 == 0o700
    for p in folder.iterdir():
        assert p.stat().st_mode & 0o777 == 0o600, p
    cert = x509.load_pem_x509_certificate((fleet.settings.data_dir / fb.SERVER_CERT).read_bytes())
    assert cert.subject.rfc4514_string() == f"CN={fb.SERVER_IDENTITY}"
    cert.verify_directly_issued_by(load_ca(fleet.settings.data_dir).cert)


def test_device_cannot_publish_under_another_devices_prefix(fleet: Fleet) -> None:
    server = fleet.server("edgefleet-server-prefix")
    assert server.connack == "Success"
    assert not any(r.startswith("Not") for r in server.subscribe(
        "$share/edgefleet-ingest/edgefleet/v1/+/telemetry", "$share/edgefleet-ingest/edgefleet/v1/+/events",
        "edgefleet/v1/+/status"))
    b_watcher = fleet.server("edgefleet-server-b-watch")  # a plain subscriber to everything of B's it may read
    b_watcher.subscribe(f"edgefleet/v1/{fleet.id('b')}/#")
    a = fleet.device("a")
    assert a.connack == "Success"
    b_id = fleet.id("b")
    for kind in ("telemetry", "events", "status", "feedback", "cmd"):
        assert a.publish(f"edgefleet/v1/{b_id}/{kind}", f"forged {kind}", retain=kind == "status") == "Not authorized"
    assert a.publish("edgefleet/v1/alerts/digits", "forged alert") == "Not authorized"
    assert a.publish(f"edgefleet/v1/{fleet.id('a')}/cmd", "a cmd to itself") == "Not authorized"
    # a message A may send, after the forged ones: once it arrived, any of them would have too
    marker = f"edgefleet/v1/{fleet.id('a')}/telemetry"
    assert a.publish(marker, "A's own") == "Success"
    server.wait(lambda: (marker, b"A's own") in server.messages, "A's own telemetry")
    assert [t for t, _ in server.messages if b_id in t] == []
    b = fleet.device("b")
    b_marker = f"edgefleet/v1/{b_id}/telemetry"
    assert b.publish(b_marker, "B's own") == "Success"
    b_watcher.wait(lambda: (b_marker, b"B's own") in b_watcher.messages, "B's own telemetry")
    assert b_watcher.messages == [(b_marker, b"B's own")]  # no forged status was retained for B either


def test_device_cannot_read_another_devices_cmd(fleet: Fleet) -> None:
    a, b = fleet.device("a"), fleet.device("b")
    a_id, b_id = fleet.id("a"), fleet.id("b")
    a.subscribe(f"edgefleet/v1/{b_id}/cmd", "edgefleet/v1/+/cmd", "#")  # granted, but nothing of B's is delivered
    b.subscribe(f"edgefleet/v1/{b_id}/cmd")
    server = fleet.server("edgefleet-server-cmd")
    b_cmd = json.dumps({"schema": 1, "device_id": b_id, "action": "check-in"})
    a_cmd = json.dumps({"schema": 1, "device_id": a_id, "action": "check-in"})
    assert server.publish(f"edgefleet/v1/{b_id}/cmd", b_cmd) == "Success"
    assert server.publish(f"edgefleet/v1/{a_id}/cmd", a_cmd) == "Success"
    b.wait(lambda: b.got(f"edgefleet/v1/{b_id}/cmd", b_cmd.encode()), "B's cmd")
    a.wait(lambda: a.got(f"edgefleet/v1/{a_id}/cmd", a_cmd.encode()), "A's cmd")
    assert {t for t, _ in a.messages} == {f"edgefleet/v1/{a_id}/cmd"}  # nothing of B's, which came first


def test_certificate_of_another_ca_cannot_connect(fleet: Fleet, tmp_path: Path) -> None:
    other = create_ca(tmp_path / "other", "another fleet CA")
    key = new_key()
    cert = other.sign_device(csr_pem(key), fleet.id("a"), 30)  # even with a real device's id as CN
    cert_path, key_path = tmp_path / "x.crt", tmp_path / "x.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    for port in (fleet.broker.device_port, fleet.broker.server_port):
        forged = connect("forged", port, fleet.ca, cert_path, key_path)
        assert forged.connack is None and forged.disconnects, (forged.connack, forged.disconnects)
        forged.close()
        bare = connect("no-certificate", port, fleet.ca, None, None)
        assert bare.connack is None and bare.disconnects, (bare.connack, bare.disconnects)
        bare.close()
    assert "certificate verify failed" in fleet.broker.log_text() or "peer did not return a certificate" in \
        fleet.broker.log_text()


def test_server_identity_reads_what_it_ingests_and_publishes_cmd_and_alerts(fleet: Fleet) -> None:
    s1, s2 = fleet.server("edgefleet-server-r1"), fleet.server("edgefleet-server-r2")
    shared = [f"$share/edgefleet-test/edgefleet/v1/+/{kind}" for kind in ("telemetry", "events")]
    for s in (s1, s2):  # two replicas splitting one stream
        assert s.subscribe(*shared, "edgefleet/v1/+/status") == ["Granted QoS 1"] * 3
    a = fleet.device("a")
    a_id = fleet.id("a")
    sent = [(f"edgefleet/v1/{a_id}/{kind}", f"{kind} {i}".encode()) for i in range(10) for kind in ("telemetry", "events")]
    for topic, payload in sent:
        assert a.publish(topic, payload.decode()) == "Success"
    assert a.publish(f"edgefleet/v1/{a_id}/status", '{"state":"online"}', retain=True) == "Success"

    def received() -> list[tuple[str, bytes]]:
        return [m for s in (s1, s2) for m in s.messages if not m[0].endswith("/status")]

    assert wait_until(lambda: len(received()) >= len(sent), WAIT)
    assert sorted(received()) == sorted(sent)  # each exactly once over the two replicas
    for s in (s1, s2):
        s.wait(lambda s=s: s.got(f"edgefleet/v1/{a_id}/status", b'{"state":"online"}'), "A's status")
    assert s1.publish(f"edgefleet/v1/{a_id}/cmd", "{}") in ACCEPTED
    assert s1.publish(f"edgefleet/v1/{fleet.id('b')}/cmd", "{}") in ACCEPTED
    assert s1.publish("edgefleet/v1/alerts/digits", '{"kind":"drift"}') in ACCEPTED
    assert s1.publish(f"edgefleet/v1/{a_id}/telemetry", "forged by the server") == "Not authorized"
    assert s1.publish("$CONTROL/broker/v1", "{}") == "Not authorized"


def test_device_cannot_send_dynamic_security_commands(fleet: Fleet) -> None:
    a = fleet.device("a")
    command = {"commands": [{"command": "deleteClient", "username": fb.SERVER_IDENTITY}]}
    assert a.publish(fb.CONTROL_TOPIC, json.dumps(command)) == "Not authorized"
    server = fleet.server("edgefleet-server-still")
    assert server.connack == "Success"
    assert server.publish("edgefleet/v1/alerts/x", "{}") in ACCEPTED


def test_revoked_device_is_cut_at_once_and_cannot_connect_again(fleet: Fleet) -> None:
    c_id = fleet.id("c")
    c = fleet.device("c")
    assert c.connack == "Success"
    c.subscribe(f"edgefleet/v1/{c_id}/cmd")
    assert c.publish(f"edgefleet/v1/{c_id}/telemetry", "before") == "Success"
    server = fleet.server("edgefleet-server-revoke")
    server.subscribe(f"edgefleet/v1/{c_id}/telemetry", "edgefleet/v1/+/telemetry")

    r = fleet.api.post(f"/api/v1/devices/{c_id}/revoke", headers=fleet.admin)
    assert r.status_code == 200, r.text
    fb.revoke_on_broker(fleet.settings, c_id)  # what the revoke route calls (idempotent)

    c.wait(lambda: bool(c.disconnects), "disconnect of the revoked device's live session")
    assert c.disconnects[0] == "Administrative action"

    # before the broker reloads its CRL: connected, but every topic is denied by the plugin
    again = fleet.device("c")
    assert again.connack == "Success"
    assert again.publish(f"edgefleet/v1/{c_id}/telemetry", "after") == "Not authorized"
    assert again.publish(f"edgefleet/v1/{c_id}/status", "{}", retain=True) == "Not authorized"
    assert again.subscribe(f"edgefleet/v1/{c_id}/cmd") == ["Not authorized"]
    assert server.publish(f"edgefleet/v1/{c_id}/cmd", "check in") in ACCEPTED
    a = fleet.device("a")
    a_marker = f"edgefleet/v1/{fleet.id('a')}/telemetry"
    assert a.publish(a_marker, "marker") == "Success"
    server.wait(lambda: server.got(a_marker, b"marker"), "A's marker")
    assert not server.got(f"edgefleet/v1/{c_id}/telemetry", b"after")
    assert again.messages == []  # its cmd is not delivered either
    again.close()

    # the CRL the server wrote lists C's certificate; once the broker loaded it, C cannot connect
    crl = x509.load_pem_x509_crl((fleet.settings.data_dir / fb.CRL).read_bytes())
    c_serial = x509.load_pem_x509_certificate(fleet.devices["c"][1].read_bytes()).serial_number
    assert crl.get_revoked_certificate_by_serial_number(c_serial) is not None
    fleet.broker.install_crl(fleet.settings.data_dir / fb.CRL)
    for port in (fleet.broker.device_port, fleet.broker.server_port):
        refused = connect("c", port, fleet.ca, fleet.devices["c"][1], fleet.devices["c"][2])
        assert refused.connack is None and refused.disconnects, (refused.connack, refused.disconnects)
        refused.close()
    assert fleet.device("b").connack == "Success"  # the others are not locked out

    # a certificate of C that the CRL does not list (one issued before a renewal) still gets nothing
    ghost = connect("c-old", fleet.broker.device_port, fleet.ca, *fleet.other_cert("c"))
    fleet.clients.append(ghost)
    assert ghost.connack == "Success"
    assert ghost.publish(f"edgefleet/v1/{c_id}/telemetry", "ghost") == "Not authorized"


def test_revoke_with_the_broker_down_says_so_and_still_writes_the_crl(fleet: Fleet, tmp_path: Path) -> None:
    down = fleet.settings.model_copy(update={"mqtt_url": f"mqtts://127.0.0.1:{free_port()}"})
    crl = fleet.settings.data_dir / fb.CRL
    before = crl.read_bytes()
    with pytest.raises(fb.BrokerError, match=r"^mqtt_url: cannot connect to the broker at 127\.0\.0\.1:\d+"):
        fb.revoke_on_broker(down, fleet.id("c"))
    assert crl.read_bytes() != before  # reissued all the same (a new CRL number)
    with pytest.raises(fb.BrokerError, match=r"^device_id: "):
        fb.revoke_on_broker(fleet.settings, "../../etc")


def test_identity_names_a_device_could_hold_are_refused(fleet: Fleet) -> None:
    ca = load_ca(fleet.settings.data_dir)
    for name, needle in [("dev-0123456789abcdef", "device id"), ("a/b", "A-Za-z0-9._-"), ("#", "A-Za-z0-9._-"),
                         ("", "A-Za-z0-9._-")]:
        with pytest.raises(ConfigError, match=r"^name: ") as e:
            fb.issue_identity(ca, name)
        assert needle in str(e.value) and "\n" not in str(e.value)
    cert, _key = fb.issue_identity(ca, "edgefleet-pipeline", days=10)
    assert b"BEGIN CERTIFICATE" in cert


def test_crl_is_reissued_well_before_its_next_update(fleet: Fleet) -> None:
    s = fleet.settings
    ca = load_ca(s.data_dir)
    fleet.revoke("c")
    now = datetime.now(UTC)
    fb.write_crl(s, now=now)
    first = fb.crl_next_update(s.data_dir / fb.CRL, ca)
    assert first is not None and first - now >= timedelta(days=fb.CRL_DAYS - 1)
    assert fb.refresh_crl(s, now=now + timedelta(days=1)) is False  # plenty left
    later = now + timedelta(days=fb.CRL_DAYS - fb.CRL_REISSUE_DAYS + 1)
    assert fb.refresh_crl(s, now=later) is True
    renewed = fb.crl_next_update(s.data_dir / fb.CRL, ca)
    assert renewed is not None and renewed > first
    revoked = x509.load_pem_x509_crl((s.data_dir / fb.CRL).read_bytes())
    c_serial = x509.load_pem_x509_certificate(fleet.devices["c"][1].read_bytes()).serial_number
    assert revoked.get_revoked_certificate_by_serial_number(c_serial) is not None  # still from the database
    (s.data_dir / fb.CRL).write_bytes(b"garbage")
    assert fb.refresh_crl(s) is True and fb.crl_next_update(s.data_dir / fb.CRL, ca) is not None


def test_expired_crl_locks_out_every_device(fleet: Fleet, tmp_path: Path) -> None:
    """Why the CRL is reissued early: Mosquitto (OpenSSL's CRL check) refuses every client once the CRL
    it holds is past its nextUpdate. A broker of its own, not to lock out the module's."""
    exe, plugin = _mosquitto()
    files = fleet.settings.data_dir / fb.BROKER_DIR
    b = Broker(exe, plugin, tmp_path / "expired", files)
    try:
        _d, cert, key = fleet.devices["a"]
        ok = connect("a", b.device_port, fleet.ca, cert, key)
        assert ok.connack == "Success"
        ok.close()
        stale = tmp_path / "stale-crl.pem"
        stale.write_bytes(fb.build_crl(load_ca(fleet.settings.data_dir), [], now=datetime.now(UTC) - timedelta(days=40)))
        assert b.crl_check(stale).returncode != 0  # edgefleet-broker-crl.service would not install it
        b.install_crl(stale, checked=False)
        locked = connect("a", b.device_port, fleet.ca, cert, key)
        assert locked.connack is None and locked.disconnects
        locked.close()
    finally:
        b.stop()


def test_sync_replays_revocations_into_a_broker_that_lost_its_state(fleet: Fleet, tmp_path: Path) -> None:
    """A broker started from the first dynamic-security config (it lost its own): C's older certificate,
    which no CRL lists, gets everything a device may, until sync_revocations replays C's revocation."""
    exe, plugin = _mosquitto()
    b = Broker(exe, plugin, tmp_path / "fresh", fleet.settings.data_dir / fb.BROKER_DIR)
    try:
        s = fleet.settings.model_copy(update={"mqtt_url": f"mqtts://127.0.0.1:{b.server_port}"})
        c_id = fleet.revoke("c")
        ghost = connect("c-old", b.device_port, fleet.ca, *fleet.other_cert("c"))
        assert ghost.connack == "Success"
        assert ghost.publish(f"edgefleet/v1/{c_id}/telemetry", "lost state") in ACCEPTED
        assert fb.sync_revocations(s) == 1
        ghost.wait(lambda: bool(ghost.disconnects), "disconnect by the replayed revocation")
        ghost.close()
        again = connect("c-old", b.device_port, fleet.ca, *fleet.other_cert("c"))
        assert again.connack == "Success"
        assert again.publish(f"edgefleet/v1/{c_id}/telemetry", "after sync") == "Not authorized"
        again.close()
    finally:
        b.stop()
