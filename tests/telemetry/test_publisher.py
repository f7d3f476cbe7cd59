"""The publisher against a real Mosquitto started by the test: queued messages arrive in seq order at
QoS 1 and leave the outbox only on PUBACK, status online/offline retained with the last will on a
SIGKILL, reconnect after the broker comes back, refused publishes counted, the cmd topic validated,
and mutual TLS with a device certificate from the real fleet CA, reloaded after a renewal."""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from _support import wait_until
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import ValidationError
from telemetry._mqtt import Broker, Subscriber

from edgefleet.agent.telemetry.config import MqttFleetConfig, MqttLocalConfig
from edgefleet.agent.telemetry.publisher import Backoff, Publisher, parse_cmd, status_payload
from edgefleet.agent.telemetry.queue import KINDS, Outbox
from edgefleet.errors import ConfigError

DEV = "dev-1"


def _cfg(port: int, **kw: Any) -> MqttFleetConfig:
    # resend_unrouted off: these brokers have no server subscribed (tests/telemetry/test_outage_server.py
    # covers keeping what reached no subscriber)
    base: dict[str, Any] = {"host": "127.0.0.1", "port": port, "tls": False, "keepalive": 5,
                            "reconnect_min_s": 0.1, "reconnect_max_s": 0.5, "resend_unrouted": False}
    return MqttFleetConfig(**(base | kw))


@pytest.fixture
def outbox(tmp_path: Path) -> Any:
    ob = Outbox(tmp_path / "state" / "queue.db", DEV)
    yield ob
    ob.close()


@pytest.fixture
def publishers() -> Any:
    made: list[Publisher] = []

    def make(*args: Any, **kw: Any) -> Publisher:
        made.append(Publisher(*args, **kw))
        return made[-1]

    yield make
    for p in made:
        p.close(timeout=1)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_queued_messages_arrive_in_seq_order_at_qos1_and_leave_the_outbox_on_puback(
    broker: Callable[..., Broker], subscriber: Callable[..., Subscriber], outbox: Outbox, publishers: Any,
    protocol: str,
) -> None:
    b = broker()
    sub = subscriber(b.port)
    for i in range(300):  # queued before the publisher even starts
        outbox.put(KINDS[i % 2], {"i": i})
    pub = publishers(_cfg(b.port, protocol=protocol, max_inflight=100), DEV, outbox)
    pub.start()
    assert sub.wait_for(lambda ms: len([m for m in ms if "seq" in m.body]) >= 300)
    for i in range(300, 500):  # and while it runs: each put wakes it
        outbox.put(KINDS[i % 2], {"i": i})
    assert sub.wait_for(lambda ms: len([m for m in ms if "seq" in m.body]) >= 500)
    assert sub.seqs() == list(range(1, 501))
    got = sub.on("/telemetry") + sub.on("/events")
    assert all(m.body["epoch"] == outbox.epoch and m.body["device_id"] == DEV for m in got)
    assert {m.topic for m in got} == {f"edgefleet/v1/{DEV}/telemetry", f"edgefleet/v1/{DEV}/events"}
    assert wait_until(lambda: outbox.depth() == 0)
    c = pub.counters()
    assert c["published"] == 500 and c["refused"] == 0 and c["connects"] == 1 and c["in_flight"] == 0


def test_status_is_retained_online_on_connect_and_offline_after_close(
    broker: Callable[..., Broker], subscriber: Callable[..., Subscriber], outbox: Outbox
) -> None:
    b = broker()
    pub = Publisher(_cfg(b.port), DEV, outbox)
    pub.start()
    assert pub.connected.wait(10)
    late = subscriber(b.port, topic=f"edgefleet/v1/{DEV}/status")  # subscribes after: gets the retained one
    assert late.wait_for(lambda ms: len(ms) >= 1)
    first = late.messages[0]
    assert first.retain and first.body["state"] == "online" and first.body["device_id"] == DEV
    assert set(first.body) == {"schema", "device_id", "at", "state"}  # no seq on status
    events = subscriber(b.port, topic=f"edgefleet/v1/{DEV}/events")  # a message no one receives stays queued
    outbox.put("events", {"kind": "idle"})
    assert events.wait_for(lambda ms: len(ms) >= 1)
    pub.close()
    assert outbox.depth() == 0  # close waits for what is in flight
    assert late.wait_for(lambda ms: any(m.body["state"] == "offline" for m in ms))
    after = subscriber(b.port, topic=f"edgefleet/v1/{DEV}/status")
    assert after.wait_for(lambda ms: len(ms) >= 1)
    assert after.messages[0].retain and after.messages[0].body["state"] == "offline"


def test_a_sigkilled_publisher_leaves_the_last_will_offline_retained(
    broker: Callable[..., Broker], subscriber: Callable[..., Subscriber], driver: Any, tmp_path: Path
) -> None:
    b = broker()
    watch = subscriber(b.port, topic=f"edgefleet/v1/{DEV}/status")
    d = driver("--state", str(tmp_path / "s"), "--port", str(b.port), "--total", "20", "--hold", "--drop-unrouted")
    assert d.wait_line(lambda d: d.has("connected 1"), 30), d.stderr()
    assert watch.wait_for(lambda ms: any(m.body["state"] == "online" for m in ms))
    d.kill()
    assert watch.wait_for(lambda ms: ms[-1].body["state"] == "offline")
    will = watch.messages[-1].body
    assert will["device_id"] == DEV and will["schema"] == 1 and "seq" not in will
    fresh = subscriber(b.port, topic=f"edgefleet/v1/{DEV}/status")
    assert fresh.wait_for(lambda ms: len(ms) >= 1)
    assert fresh.messages[0].retain and fresh.messages[0].body["state"] == "offline"


def test_messages_put_while_the_broker_is_down_arrive_in_order_once_it_is_back(
    broker: Callable[..., Broker], subscriber: Callable[..., Subscriber], outbox: Outbox, publishers: Any
) -> None:
    b = broker(persistent=True)
    sub = subscriber(b.port, persistent=True)
    pub = publishers(_cfg(b.port), DEV, outbox)
    pub.start()
    for i in range(100):
        outbox.put("telemetry", {"i": i})
    assert sub.wait_for(lambda ms: len(sub.seqs()) >= 100)
    b.stop()
    assert wait_until(lambda: not pub.connected.is_set())
    for i in range(100, 400):
        outbox.put(KINDS[i % 2], {"i": i})
    assert wait_until(lambda: pub.counters()["connect_failures"] >= 2)  # it keeps trying, backing off
    assert outbox.depth() == 300
    b.start()
    assert sub.wait_for(lambda ms: len(set(sub.seqs())) >= 400, 30)
    seqs = sub.seqs()
    assert sorted(set(seqs)) == list(range(1, 401))
    first = [s for i, s in enumerate(seqs) if s not in seqs[:i]]
    assert first == list(range(1, 401))  # every new seq in order (a repeat is a QoS 1 resend)
    assert wait_until(lambda: outbox.depth() == 0)
    assert pub.counters()["connects"] == 2


def test_a_publish_the_broker_refuses_is_dropped_and_counted_not_retried(
    broker: Callable[..., Broker], outbox: Outbox, publishers: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """MQTT 5: the refusal is in the PUBACK (Mosquitto 2.0.11 then also cuts the connection; the
    message after it is sent again on the reconnect)."""
    acl = tmp_path / "acl"
    acl.write_text(f"topic write edgefleet/v1/{DEV}/status\ntopic write edgefleet/v1/{DEV}/events\n")
    b = broker(lines=(f"acl_file {acl}",))
    pub = publishers(_cfg(b.port), DEV, outbox)
    pub.start()
    outbox.put("telemetry", {})  # not allowed
    outbox.put("events", {"kind": "x"})
    assert wait_until(lambda: outbox.depth() == 0)
    c = pub.counters()
    assert c["refused"] == 1 and c["published"] == 1
    assert outbox.dropped() == 1
    assert "the broker refused seq 1: Not authorized (dropped, counted)" in caplog.text


def test_cmd_calls_back_on_a_valid_message_and_ignores_the_rest(
    broker: Callable[..., Broker], subscriber: Callable[..., Subscriber], outbox: Outbox, publishers: Any
) -> None:
    b = broker()
    got: list[dict[str, Any]] = []
    called = threading.Event()
    pub = publishers(_cfg(b.port), DEV, outbox)

    def on_cmd(msg: dict[str, Any]) -> None:
        got.append(msg)
        called.set()

    pub.subscribe_cmd(on_cmd)
    pub.start()
    assert pub.connected.wait(10)
    sender = subscriber(b.port, topic="nothing/#")
    topic = f"edgefleet/v1/{DEV}/cmd"
    good = {"schema": 1, "device_id": DEV, "at": "2026-11-03T10:00:00Z", "action": "check-in"}
    assert wait_until(lambda: _delivered(sender, topic, good, called), 10)
    for bad in (b"not json", b"[1]", json.dumps({**good, "device_id": "dev-2"}).encode(),
                json.dumps({**good, "action": "reboot"}).encode(), json.dumps({**good, "schema": 2}).encode(),
                b"x" * 5000):
        sender.publish(topic, bad)
    sender.publish("edgefleet/v1/dev-2/cmd", json.dumps({**good, "device_id": "dev-2"}))  # not ours: not received
    called.clear()
    sender.publish(topic, json.dumps(good))
    assert called.wait(10)
    assert wait_until(lambda: pub.counters()["cmd_invalid"] == 6)
    assert all(m == good for m in got) and pub.counters()["cmd_received"] == len(got) >= 2


def _delivered(sender: Subscriber, topic: str, msg: dict[str, Any], called: threading.Event) -> bool:
    """Publish until the subscription is in place (it is made after the connect)."""
    sender.publish(topic, json.dumps(msg))
    return called.wait(0.5)


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (b"{", "payload: not JSON"),
        (b'"x"', "payload: expected a JSON object"),
        (b'{"schema": true, "device_id": "dev-1", "action": "check-in", "at": "2026-11-03T10:00:00Z"}', "schema"),
        (b'{"schema": 1, "device_id": "dev-9", "action": "check-in", "at": "2026-11-03T10:00:00Z"}', "device_id"),
        (b'{"schema": 1, "device_id": "dev-1", "action": "rm -rf", "at": "2026-11-03T10:00:00Z"}', "action"),
        (b'{"schema": 1, "device_id": "dev-1", "action": "check-in"}', "at"),
        (b'{"schema": 1, "device_id": "dev-1", "action": "check-in", "at": "yesterday"}', "at"),
        (b'{"schema": 1, "device_id": "dev-1", "action": "check-in", "at": "2026-11-03T10:00:00"}', "at"),
        (b" " * 5000, "payload: 5000 bytes"),
    ],
)
def test_parse_cmd_refuses_naming_the_field(payload: bytes, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}"):
        parse_cmd(payload, DEV)


def test_parse_cmd_takes_rfc3339_with_z_or_offset() -> None:
    for at in ("2026-11-03T10:00:00Z", "2026-11-03T10:00:00.5+01:00"):
        assert parse_cmd(json.dumps({"schema": 1, "device_id": DEV, "at": at, "action": "check-in"}).encode(), DEV)


def test_config_is_strict_and_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="hots"):
        MqttFleetConfig.model_validate({"host": "b", "hots": "x"})
    with pytest.raises(ValidationError, match="reconnect_max_s is shorter"):
        MqttFleetConfig(host="b", reconnect_min_s=10, reconnect_max_s=1)
    with pytest.raises(ValidationError, match="protocol"):
        MqttFleetConfig.model_validate({"host": "b", "protocol": "4"})
    with pytest.raises(ValidationError, match="certfile and keyfile together"):
        MqttFleetConfig(host="b", certfile=tmp_path / "c")
    with pytest.raises(ValidationError, match="password is set without username"):
        MqttLocalConfig.model_validate({"password": "s3cret"})
    assert "s3cret" not in repr(MqttLocalConfig.model_validate({"username": "u", "password": "s3cret"}))
    ident = tmp_path / "identity"
    files = MqttFleetConfig(host="b").tls_files(ident)
    assert files == (ident / "ca.crt", ident / "device.crt", ident / "device.key")
    assert MqttFleetConfig(host="b", tls=False).tls_files(ident) is None
    with pytest.raises(ValueError, match=r"^mqtt\.fleet\.certfile: TLS needs a client certificate"):
        MqttFleetConfig(host="b").tls_files(None)
    own = MqttFleetConfig(host="b", certfile=tmp_path / "c.pem", keyfile=tmp_path / "k.pem", ca_cert=tmp_path / "ca")
    assert own.tls_files(None) == (tmp_path / "ca", tmp_path / "c.pem", tmp_path / "k.pem")
    local = MqttLocalConfig.model_validate({"username": "u", "password": "p", "port": 1884}).broker_config()
    assert (local.host, local.port, local.username, local.protocol) == ("127.0.0.1", 1884, "u", "5")


def test_publisher_refuses_tls_without_a_certificate_and_another_devices_outbox(tmp_path: Path, outbox: Outbox) -> None:
    with pytest.raises(ConfigError, match=r"mqtt\.fleet\.certfile: TLS needs a client certificate"):
        Publisher(MqttFleetConfig(host="b"), DEV, outbox)
    from edgefleet.server.ca import create_ca

    identity = tmp_path / "identity"
    with pytest.raises(ConfigError, match=r"mqtt\.fleet\.ca_cert: cannot load .*ca\.crt"):
        Publisher(MqttFleetConfig(host="b"), DEV, outbox, identity_dir=identity)
    identity.mkdir()
    (identity / "ca.crt").write_text(create_ca(tmp_path / "server").cert_pem)
    with pytest.raises(ConfigError, match=r"mqtt\.fleet\.certfile: cannot load the client certificate .*device\.crt"):
        Publisher(MqttFleetConfig(host="b"), DEV, outbox, identity_dir=identity)
    with pytest.raises(ValueError, match="the outbox is 'dev-1'"):
        Publisher(MqttFleetConfig(host="b", tls=False), "dev-2", outbox)


def test_backoff_doubles_to_the_cap_with_equal_jitter_and_resets() -> None:
    b = Backoff(1.0, 30.0, random.Random(5))
    caps = [1, 2, 4, 8, 16, 30, 30, 30]
    waits = [b.next() for _ in caps]
    assert all(c / 2 <= w <= c for w, c in zip(waits, caps, strict=True)), waits
    assert len({round(w, 6) for w in waits[-3:]}) == 3  # jittered: not the same wait every time
    assert b.attempts == len(caps)
    b.reset()
    assert 0.5 <= b.next() <= 1.0 and b.attempts == 1
    spread = [Backoff(1.0, 30.0, random.Random(i)).next() for i in range(200)]  # a fleet after one outage
    assert min(spread) < 0.6 and max(spread) > 0.9
    with pytest.raises(ValueError, match="reconnect_min_s"):
        Backoff(0, 1, random.Random())


def test_status_payload_is_the_documented_shape() -> None:
    assert json.loads(status_payload(DEV, "online", 0)) == {
        "schema": 1, "device_id": DEV, "at": "1970-01-01T00:00:00.000Z", "state": "online"}


def test_every_public_name_exists() -> None:
    import edgefleet.agent.telemetry as pkg
    import edgefleet.agent.telemetry.config as config
    import edgefleet.agent.telemetry.publisher as publisher
    import edgefleet.agent.telemetry.queue as queue

    for module in (pkg, config, publisher, queue):
        missing = [n for n in module.__all__ if not hasattr(module, n)]
        assert not missing, (module.__name__, missing)


# -- mutual TLS with the fleet CA ---------------------------------------------------------------


def _device_cert(ca: Any, identity: Path, device_id: str = DEV) -> x509.Certificate:
    """What `agent enroll` writes: device.key, device.crt (signed by the fleet CA) and ca.crt."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
           .sign(key, hashes.SHA256()))
    cert = ca.sign_device(csr.public_bytes(serialization.Encoding.PEM).decode(), device_id, 30)
    identity.mkdir(parents=True, exist_ok=True)
    (identity / "device.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (identity / "device.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (identity / "ca.crt").write_text(ca.cert_pem)
    return cert  # type: ignore[no-any-return]


def _crl(ca: Any, revoked: list[x509.Certificate], path: Path) -> None:
    now = datetime.now(UTC)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject)
               .last_update(now - timedelta(minutes=5)).next_update(now + timedelta(days=1)))
    for cert in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(cert.serial_number).revocation_date(now).build())
    path.write_bytes(builder.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))


def test_mutual_tls_with_the_enrolled_identity_and_a_renewed_certificate_loaded_on_reconnect(
    broker: Callable[..., Broker], outbox: Outbox, tmp_path: Path
) -> None:
    """The broker requires a client certificate from the fleet CA and names the client by its CN;
    the publisher takes device.crt/device.key/ca.crt from the identity folder. After a renewal on
    disk and the old certificate revoked (a CRL), the reconnect presents the new one."""
    from edgefleet.server.ca import create_ca

    ca = create_ca(tmp_path / "server")
    server_crt, server_key = ca.issue_server_cert(["127.0.0.1"], days=2)
    tls = tmp_path / "tls"
    tls.mkdir()
    (tls / "ca.crt").write_text(ca.cert_pem)
    (tls / "server.crt").write_bytes(server_crt)
    (tls / "server.key").write_bytes(server_key)
    identity = tmp_path / "state" / "identity"
    old = _device_cert(ca, identity)
    lines = (f"cafile {tls / 'ca.crt'}", f"certfile {tls / 'server.crt'}", f"keyfile {tls / 'server.key'}",
             "require_certificate true", "use_identity_as_username true", "allow_anonymous false")
    b = broker(lines=lines)
    pub = Publisher(_cfg(b.port, tls=True), DEV, outbox, identity_dir=identity)
    pub.start()
    try:
        outbox.put("telemetry", {"n": 1})
        assert wait_until(lambda: outbox.depth() == 0), pub.last_error
        _device_cert(ca, identity)  # renewed (same key folder, new key and certificate)
        _crl(ca, [old], tls / "crl.pem")
        b.stop()
        assert wait_until(lambda: not pub.connected.is_set())
        b.conf.write_text(b.conf.read_text() + f"crlfile {tls / 'crl.pem'}\n")
        b.start()
        outbox.put("telemetry", {"n": 2})
        assert wait_until(lambda: outbox.depth() == 0, 20), pub.last_error
        assert pub.counters()["connects"] == 2
    finally:
        pub.close(timeout=2)
