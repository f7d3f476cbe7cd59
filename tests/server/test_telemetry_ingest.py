"""Telemetry ingestion through a real Mosquitto of the test's own, on SQLite and PostgreSQL: every
(device, epoch, seq) is stored once however often it arrives, a message is acknowledged only after its
commit (a real `edgefleet server run` SIGKILLed before the commit loses nothing: the broker redelivers), refused
messages are acknowledged, dropped and counted by reason, ingestion survives a broker restart (also on
a plain subscription), ``cmd`` follows the contract, and retention deletes what is old. Throughput is
printed, never asserted. The server reaches a TLS broker with its own client certificate."""

from __future__ import annotations

import ipaddress
import json
import queue
import random
import socket
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from _fleet import Server
from _support import free_port, wait_until
from _telemetry import (
    Broker,
    add_devices,
    broker,
    clean_telemetry,
    dumps,
    event,
    events_topic,
    ingest_settings,
    ingesting,
    model_figures,
    publisher,
    stamp,
    telemetry,
    telemetry_topic,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import func, select, text

from edgefleet.server.app import create_app
from edgefleet.server.db import make_engine
from edgefleet.server.models import (
    DeviceEvent,
    TelemetryMessage,
    TelemetryRollup,
    TelemetryStream,
    utcnow,
)
from edgefleet.server.state import init_server, open_state
from edgefleet.server.telemetry import notify_check_in
from edgefleet.server.telemetry.payloads import parse
from edgefleet.server.telemetry.rollups import retention
from edgefleet.server.telemetry.store import store_batch

__all__ = ["broker"]  # the fixture, imported for pytest


@pytest.fixture
def settings_for(clean_db: str, tmp_path: Path, broker: Broker) -> Any:
    def make(**extra: Any) -> Any:
        return ingest_settings(clean_db, tmp_path / "data", broker.url, **extra)

    return make


def _streams(state: Any) -> dict[str, tuple[int, int, int]]:
    with state.sessions() as s:
        return {r.device_id: (r.contiguous, r.max_seq, r.received) for r in s.scalars(select(TelemetryStream))}


def test_each_device_epoch_seq_is_stored_once_however_often_it_arrives(settings_for: Any, broker: Broker) -> None:
    devices = [f"dup-{i}" for i in range(3)]
    n = 40
    unique: list[tuple[str, str, dict[str, Any]]] = []
    for d in devices:
        for seq in range(1, n + 1):
            if seq % 5 == 0:
                unique.append((events_topic(d), "events", event(d, seq, kind="install.ok")))
            else:
                unique.append((telemetry_topic(d), "telemetry", telemetry(d, seq)))
    sent = [*unique, *unique, *random.Random(7).sample(unique, 30)]  # every message twice, 30 three times
    random.Random(11).shuffle(sent)  # out of order too: the contiguous mark must catch up over gaps
    with ingesting(settings_for()) as ing:
        ing.add_devices(*devices)
        with publisher(broker.port) as pub:
            pub.send([(topic, dumps(body)) for topic, _, body in sent])
        assert wait_until(lambda: ing.sample("edgefleet_telemetry_pending") == 0 and all(
            v == (n, n, n) for v in _streams(ing.state).values()) and len(_streams(ing.state)) == 3, 30), \
            _streams(ing.state)
        assert ing.stored() == len(unique)
        duplicates = sum(ing.sample("edgefleet_telemetry_messages_total", {"topic": t, "result": "duplicate"})
                         for t in ("telemetry", "events"))
        assert duplicates == len(sent) - len(unique)
        with ing.state.sessions() as s:
            inferences = s.scalar(select(func.sum(TelemetryRollup.inferences)))
            events = s.execute(select(DeviceEvent.device_id, DeviceEvent.seq, DeviceEvent.kind)).all()
        assert inferences == 3 * sum(1 for _, kind, _ in unique if kind == "telemetry")
        assert sorted(events) == sorted((d, q, "install.ok") for d in devices for q in range(5, n + 1, 5))
        shown = ing.client.get(f"/api/v1/devices/{devices[0]}", headers=ing.admin_h).json()["events"]
        assert [e["seq"] for e in shown] == list(range(n, 0, -5))
        series = ing.client.get(f"/api/v1/devices/{devices[0]}/telemetry", headers=ing.admin_h).json()
        assert series["streams"][0] | {"first_received_at": 0, "last_received_at": 0, "last_at": 0} == {
            "epoch": "0123456789abcdef", "contiguous_seq": n, "max_seq": n, "received": n, "missing": 0, "gaps": [],
            "first_received_at": 0, "last_received_at": 0, "last_at": 0}


def test_refused_messages_are_acknowledged_dropped_and_counted(settings_for: Any, broker: Broker) -> None:
    settings = settings_for(mqtt_max_payload_bytes=4096)
    good = telemetry("ok-1", 1)
    huge = telemetry("ok-1", 2, models=[model_figures(classes={f"c{i}": i for i in range(400)})])
    bad: list[tuple[str, str | bytes, str]] = [
        (telemetry_topic("ok-1"), dumps(telemetry("ok-2", 3)), "device_mismatch"),
        (telemetry_topic("ok-1"), b"{not json", "not_json"),
        (telemetry_topic("ok-1"), b"[1, 2]", "not_json"),
        (telemetry_topic("ok-1"), dumps({**telemetry("ok-1", 4), "schema": 2}), "schema_version"),
        (telemetry_topic("ok-1"), dumps({k: v for k, v in telemetry("ok-1", 5).items() if k != "seq"}), "invalid"),
        (telemetry_topic("ok-1"), dumps(telemetry("ok-1", 6, epoch="XYZ")), "invalid"),
        (telemetry_topic("ok-1"), dumps(telemetry("ok-1", 0)), "invalid"),
        (telemetry_topic("ok-1"), dumps(telemetry("ok-1", 7, models=[{**model_figures(), "inferences": -1}])),
         "invalid"),
        (telemetry_topic("ok-1"), dumps(telemetry("ok-1", 8, models=[
            {**model_figures(), "latency": {"counts": [1, 2], "sum_s": 0.1}}])), "invalid"),
        (telemetry_topic("ok-1"), dumps(telemetry("ok-1", 9)).replace('"cpu_percent": 5.0', '"cpu_percent": NaN'),
         "invalid"),
        (events_topic("ok-1"), dumps({**event("ok-1", 10), "kind": "Bad Kind"}), "invalid"),
        (telemetry_topic("ok-1"), dumps(huge), "too_large"),
        (telemetry_topic("ghost"), dumps(telemetry("ghost", 1)), "unknown_device"),
        (telemetry_topic("gone-1"), dumps(telemetry("gone-1", 1)), "revoked_device"),
        (events_topic("gone-1"), dumps(event("gone-1", 2)), "revoked_device"),
    ]
    expected: dict[str, int] = {}
    for _, _, reason in bad:
        expected[reason] = expected.get(reason, 0) + 1
    with ingesting(settings) as ing:
        ing.add_devices("ok-1", "ok-2", "gone-1")
        r = ing.client.post("/api/v1/devices/gone-1/revoke", headers=ing.admin_h)
        assert r.status_code == 200 and r.json()["revoked"], r.text
        with publisher(broker.port) as pub:
            pub.send([(topic, payload) for topic, payload, _ in bad])
            pub.send([(telemetry_topic("ok-1"), dumps(good))])
            assert wait_until(lambda: ing.stored() == 1 and ing.sample("edgefleet_telemetry_pending") == 0, 20)
            assert {reason: ing.rejected(reason) for reason in expected} == expected
            assert ing.sample("edgefleet_telemetry_messages_total", {"topic": "telemetry", "result": "rejected"}) \
                + ing.sample("edgefleet_telemetry_messages_total", {"topic": "events", "result": "rejected"}) \
                == len(bad)
            with ing.state.sessions() as s:
                assert s.execute(select(TelemetryMessage.device_id, TelemetryMessage.seq)).all() == [("ok-1", 1)]
                assert s.scalar(select(func.count()).select_from(DeviceEvent)) == 0
        admin = ing.admin
    # Acknowledged, all of them: a new ingester on the same session gets nothing of them again.
    with ingesting(settings, admin) as again, publisher(broker.port) as pub:
        pub.send([(telemetry_topic("ok-1"), dumps(telemetry("ok-1", 2)))])
        assert wait_until(lambda: again.stored() == 2 and again.sample("edgefleet_telemetry_pending") == 0, 20)
        assert sum(again.rejected(reason) for reason in expected) == 0
        assert again.sample("edgefleet_telemetry_messages_total", {"topic": "telemetry", "result": "duplicate"}) == 0


def test_events_join_the_http_reports_and_a_new_epoch_loses_nothing(settings_for: Any, broker: Broker,
                                                                    tmp_path: Path) -> None:
    """Events over MQTT and over the HTTP fallback share one sequence: the same seq is one event in
    ``device show``. A device that lost its queue starts a new epoch at seq 1 again: its events are
    kept (without a seq where an older epoch's event holds it), its telemetry under its own stream;
    gaps in a stream are reported as ranges."""
    from _fleet import enroll, publish_roots

    old, new = "aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb"
    with ingesting(settings_for()) as ing:
        publish_roots(ing.client, ing.admin_h, tmp_path / "keys")
        r = ing.client.post("/api/v1/enrollment-tokens", json={}, headers=ing.admin_h)
        device = enroll(ing.client, r.json()["token"])
        device.authenticate()
        d = device.id
        report = {"agent_version": "0.9.0", "events": [
            {"seq": 4, "at": stamp(datetime.now(UTC)), "kind": "install.ok", "model": "digits", "version": "2.0.0"}]}
        r = ing.client.post(f"/api/v1/devices/{d}/reports", json=report, headers=device.headers)
        assert r.status_code == 204, r.text
        with publisher(broker.port) as pub:
            pub.send([(events_topic(d), dumps(event(d, seq, kind="install.ok", epoch=old))) for seq in (1, 2, 3, 4)])
            pub.send([(telemetry_topic(d), dumps(telemetry(d, seq, epoch=old))) for seq in (5, 6, 8, 11)])
            pub.send([(events_topic(d), dumps(event(d, seq, kind="update.started", epoch=new))) for seq in (1, 2)])
        assert wait_until(lambda: ing.stored() == 10 and ing.sample("edgefleet_telemetry_pending") == 0, 20)
        shown = ing.client.get(f"/api/v1/devices/{d}", headers=ing.admin_h).json()["events"]
        numbered = [(e["seq"], e["kind"]) for e in shown if e["seq"] is not None]
        assert numbered == [(4, "install.ok"), (3, "install.ok"), (2, "install.ok"), (1, "install.ok")]
        assert [e["kind"] for e in shown if e["seq"] is None] == ["update.started", "update.started"]
        body = ing.client.get(f"/api/v1/devices/{d}/telemetry", headers=ing.admin_h).json()
        streams = {s["epoch"]: s for s in body["streams"]}
        assert {k: streams[old][k] for k in ("contiguous_seq", "max_seq", "received", "missing", "gaps")} == {
            "contiguous_seq": 6, "max_seq": 11, "received": 8, "missing": 3, "gaps": [[7, 7], [9, 10]]}
        assert (streams[new]["contiguous_seq"], streams[new]["max_seq"]) == (2, 2)


def test_ingestion_resumes_after_a_broker_restart_on_a_plain_subscription(
    settings_for: Any, broker: Broker, clean_db: str, tmp_path: Path
) -> None:
    broker.stop()  # down when the server starts: the server serves, and connects once the broker is up
    settings = settings_for(mqtt_shared_subscription=False, mqtt_reconnect_max=1)
    if clean_db.startswith("sqlite"):
        # A database file of its own: after this test the session's SQLite file was reported malformed
        # to the next module's first writes (not root-caused yet: see the issue 11 closing note).
        from edgefleet.server.db import migrate

        url = f"sqlite:///{tmp_path / 'own.db'}"
        engine = make_engine(url)
        migrate(engine)
        engine.dispose()
        settings = ingest_settings(url, tmp_path / "data", broker.url, mqtt_shared_subscription=False,
                                   mqtt_reconnect_max=1)
    init_server(settings)
    state = open_state(settings, run_migrations=False)
    add_devices(state, "re-1")
    state.engine.dispose()
    state.loop_db.close()
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").status_code == 200
        assert not client.app.state.telemetry.connected  # type: ignore[attr-defined]
        broker.start()
        assert client.app.state.telemetry.wait_subscribed(30)  # type: ignore[attr-defined]
    with ingesting(settings, "unused") as ing:
        assert ing.ingester.filters() == ["edgefleet/v1/+/telemetry", "edgefleet/v1/+/events"]
        with publisher(broker.port) as pub:
            pub.send([(telemetry_topic("re-1"), dumps(telemetry("re-1", 1)))])
        assert wait_until(lambda: ing.stored() == 1, 15)
        broker.stop()
        assert wait_until(lambda: not ing.ingester.connected, 15)
        broker.start()  # no persistence: a new session, subscribed again on connect
        assert ing.ingester.wait_subscribed(30)
        with publisher(broker.port) as pub:
            pub.send([(telemetry_topic("re-1"), dumps(telemetry("re-1", 2)))])
        assert wait_until(lambda: ing.stored() == 2, 15)
        assert _streams(ing.state) == {"re-1": (2, 2, 2)}


def test_notify_check_in_publishes_the_cmd_contract(settings_for: Any, broker: Broker) -> None:
    got: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
    sub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="cmd-reader", protocol=mqtt.MQTTv5)
    sub.on_message = lambda c, u, m: got.put((m.topic, json.loads(m.payload)))
    sub.connect("127.0.0.1", broker.port)
    sub.subscribe("edgefleet/v1/+/cmd", qos=1)
    sub.loop_start()
    try:
        with ingesting(settings_for()) as ing:
            assert not notify_check_in(object(), "cmd-1")  # no ingester for that server: nothing sent
            assert not notify_check_in(ing.state, "cmd-1/#")  # not a device id: never a topic
            assert notify_check_in(ing.state, "cmd-1")
            topic, body = got.get(timeout=10)
        assert topic == "edgefleet/v1/cmd-1/cmd"
        assert body.keys() == {"schema", "device_id", "at", "action"}
        assert body["schema"] == 1 and body["device_id"] == "cmd-1" and body["action"] == "check-in"
        at = datetime.fromisoformat(body["at"])
        assert at.tzinfo is not None and abs(at - datetime.now(UTC)) < timedelta(minutes=5)
        assert got.empty()
    finally:
        sub.disconnect()
        sub.loop_stop()


def test_retention_deletes_old_messages_rollups_and_streams(clean_db: str, tmp_path: Path) -> None:
    settings = ingest_settings(clean_db, tmp_path / "data", "mqtt://127.0.0.1:1")
    clean_telemetry(clean_db)
    init_server(settings)
    state = open_state(settings, run_migrations=False)
    try:
        add_devices(state, "ret-1")
        now = utcnow()
        old, recent = now - timedelta(days=40), now - timedelta(hours=1)
        for seq, t in ((1, old), (2, old), (3, recent)):
            item = parse(telemetry_topic("ret-1"), dumps(telemetry("ret-1", seq, at=t)).encode(), 1 << 20)
            with state.sessions.begin() as s:
                assert store_batch(s, [item], t) == ["stored"]
        with state.sessions() as s:
            deleted = retention(s, now, raw_days=7, rollup_days=30)
        assert deleted["telemetry_messages"] == 2 and deleted["telemetry_rollups"] == 1
        assert deleted["telemetry_device_rollups"] == 1 and deleted["telemetry_streams"] == 0
        with state.sessions() as s:
            assert s.scalars(select(TelemetryMessage.seq)).all() == [3]
            assert s.scalar(select(func.count()).select_from(TelemetryRollup)) == 1
        with state.sessions() as s:
            assert retention(s, now + timedelta(days=31), raw_days=7, rollup_days=30)["telemetry_streams"] == 1
    finally:
        state.engine.dispose()
        state.loop_db.close()


# -- a real server process, killed between receive and commit ----------------------------------------------


class ServerProcess(Server):
    """``edgefleet server run`` (tests/server/_fleet.py) with ingestion on: started means subscribed
    to the broker, as its /metrics says."""

    def start(self) -> None:
        super().start()
        assert wait_until(lambda: self.metric("edgefleet_mqtt_connected") == 1, 60), self.stop()

    def metric(self, name: str) -> float | None:
        try:
            body = httpx.get(f"{self.url}/metrics", timeout=2).text
        except httpx.HTTPError:
            return None
        for line in body.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return None


@pytest.fixture
def server_process(clean_db: str, tmp_path: Path, broker: Broker) -> Iterator[ServerProcess]:
    settings = ingest_settings(clean_db, tmp_path / "data", broker.url)
    init_server(settings)
    state = open_state(settings, run_migrations=False)
    add_devices(state, *(f"crash-{i}" for i in range(5)))
    state.engine.dispose()
    state.loop_db.close()
    env = {"EDGEFLEET_SERVER_MQTT_URL": broker.url, "EDGEFLEET_SERVER_MQTT_CLIENT_ID": str(settings.mqtt_client_id),
           "EDGEFLEET_SERVER_MIGRATE_ON_START": "false"}
    server = ServerProcess(settings.data_dir, clean_db, env)
    yield server
    server.stop()


def test_a_message_is_acknowledged_only_after_its_commit(server_process: ServerProcess, clean_db: str,
                                                         broker: Broker) -> None:
    n = 50
    messages = [(telemetry_topic(f"crash-{i % 5}"), dumps(telemetry(f"crash-{i % 5}", i // 5 + 1))) for i in range(n)]
    engine = make_engine(clean_db)
    server_process.start()
    with engine.connect() as hold:
        # Hold the database so the server's batch cannot commit: SQLite's write lock; on PostgreSQL a
        # lock that blocks the server's INSERT (reads go on).
        if engine.dialect.name == "sqlite":
            hold.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            hold.execute(text("LOCK TABLE telemetry_streams IN EXCLUSIVE MODE"))
        with publisher(broker.port) as pub:
            pub.send(messages)
        assert wait_until(lambda: server_process.metric("edgefleet_telemetry_pending") == n, 30)
        server_process.kill()  # received, not committed
        assert hold.execute(select(func.count()).select_from(TelemetryMessage)).scalar() == 0
        hold.rollback()
    server_process.start()  # same client id: the broker redelivers what was never acknowledged

    def streams() -> dict[str, tuple[int, int, int]]:
        with engine.connect() as c:
            return {r.device_id: (r.contiguous, r.max_seq, r.received) for r in c.execute(select(TelemetryStream))}

    assert wait_until(lambda: streams() == {f"crash-{i}": (10, 10, 10) for i in range(5)}, 30), streams()
    with engine.connect() as c:
        assert c.execute(select(func.count()).select_from(TelemetryMessage)).scalar() == n
    assert wait_until(lambda: server_process.metric("edgefleet_telemetry_pending") == 0, 30)
    engine.dispose()


# -- throughput (printed, not asserted) -------------------------------------------------------------------


def test_ingestion_throughput_is_printed(settings_for: Any, broker: Broker, db_url: str) -> None:
    """The ingester alone: the messages wait in the broker for its session (published while it was
    away), then one server drains them. The figure includes the app's start and the connect."""
    devices = [f"tp-{i}" for i in range(100)]
    n = 5000
    payloads = [(telemetry_topic(devices[i % 100]), dumps(telemetry(devices[i % 100], i // 100 + 1)))
                for i in range(n)]
    settings = settings_for()
    with ingesting(settings) as ing:  # makes the session the broker keeps for this client id
        ing.add_devices(*devices)
        admin = ing.admin
    with publisher(broker.port) as pub:
        started = time.perf_counter()
        pub.send(payloads)
        published = time.perf_counter() - started
    started = time.perf_counter()
    with ingesting(settings, admin) as ing:
        assert wait_until(lambda: ing.stored() == n, 120)
        took = time.perf_counter() - started
        assert ing.sample("edgefleet_telemetry_messages_total", {"topic": "telemetry", "result": "stored"}) == n
        batches = ing.sample("edgefleet_telemetry_batch_seconds_count")
        in_db = ing.sample("edgefleet_telemetry_batch_seconds_sum")
    backend = db_url.split(":", 1)[0].split("+")[0]
    print(f"\ningestion on {backend}: {n} telemetry messages (100 devices) drained by one server in {took:.2f} s = "
          f"{n / took:.0f} msg/s ({batches:.0f} batches, {in_db:.2f} s storing and committing; publishing them "
          f"took {published:.2f} s)")


# -- TLS: the server's own certificate to the broker ------------------------------------------------------


def _pki(folder: Path) -> dict[str, Path]:
    """A CA, a broker certificate for 127.0.0.1 and client certificates (the server's, a device's)."""
    now = datetime.now(UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        path.chmod(0o600)
        return path

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("test broker CA")).issuer_name(name("test broker CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    out = {"ca": folder / "ca.crt"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for who, san in (("broker", True), ("edgefleet-server", False), ("tls-1", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        b = (x509.CertificateBuilder().subject_name(name(who)).issuer_name(ca.subject).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
             .not_valid_after(now + timedelta(days=1)))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                critical=False)
        out[f"{who}.crt"] = folder / f"{who}.crt"
        out[f"{who}.crt"].write_bytes(b.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
        out[f"{who}.key"] = write_key(key, folder / f"{who}.key")
    return out


def test_ingestion_over_tls_with_the_servers_client_certificate(clean_db: str, tmp_path: Path,
                                                                 broker: Broker) -> None:
    pki = _pki(tmp_path)
    port = free_port()
    conf = tmp_path / "tls.conf"
    # user root: as root, mosquitto would drop to a user that cannot read the test's private tmp folder
    conf.write_text(f"listener {port} 127.0.0.1\ncafile {pki['ca']}\ncertfile {pki['broker.crt']}\n"
                    f"keyfile {pki['broker.key']}\nrequire_certificate true\nuse_identity_as_username true\n"
                    "allow_anonymous false\npersistence false\nuser root\n")
    tls_broker = subprocess.Popen([broker.exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: _listening(port) or tls_broker.poll() is not None, 10) and tls_broker.poll() is None
        settings = ingest_settings(clean_db, tmp_path / "data", f"mqtts://127.0.0.1:{port}", mqtt_ca_cert=pki["ca"],
                                   mqtt_client_cert=pki["edgefleet-server.crt"],
                                   mqtt_client_key=pki["edgefleet-server.key"])
        with ingesting(settings) as ing:
            ing.add_devices("tls-1")
            device = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="tls-1",
                                 protocol=mqtt.MQTTv5)
            device.tls_set(ca_certs=str(pki["ca"]), certfile=str(pki["tls-1.crt"]), keyfile=str(pki["tls-1.key"]))
            device.connect("127.0.0.1", port)
            device.loop_start()
            try:
                device.publish(telemetry_topic("tls-1"), dumps(telemetry("tls-1", 1)), qos=1).wait_for_publish(10)
                assert wait_until(lambda: ing.stored() == 1, 15)
            finally:
                device.disconnect()
                device.loop_stop()
    finally:
        tls_broker.terminate()
        tls_broker.wait(10)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.mark.parametrize(("env", "needle"), [
    ({"EDGEFLEET_SERVER_MQTT_URL": "http://broker:1883"}, "mqtt_url"),
    ({"EDGEFLEET_SERVER_MQTT_URL": "mqtt://user:secret@broker"}, "mqtt_url"),
    ({"EDGEFLEET_SERVER_MQTT_URL": "mqtts://broker", "EDGEFLEET_SERVER_MQTT_CLIENT_CERT": "/x.crt"},
     "mqtt_client_cert and mqtt_client_key"),
    ({"EDGEFLEET_SERVER_MQTT_URL": "mqtt://broker", "EDGEFLEET_SERVER_MQTT_CLIENT_CERT": "/x.crt",
      "EDGEFLEET_SERVER_MQTT_CLIENT_KEY": "/x.key"}, "mqtts://"),
    ({"EDGEFLEET_SERVER_MQTT_BATCH_MAX": "2000"}, "mqtt_batch_max"),
    ({"EDGEFLEET_SERVER_MQTT_SHARE_GROUP": "a/b"}, "mqtt_share_group"),
])
def test_mqtt_settings_errors_name_the_setting_and_never_the_secret(env: dict[str, str], needle: str) -> None:
    from edgefleet.errors import ConfigError
    from edgefleet.server.settings import load_settings

    with pytest.raises(ConfigError) as e:
        load_settings(env=env)
    message = str(e.value)
    assert needle in message and "\n" not in message and "secret" not in message, message


def test_an_infinite_drift_statistic_is_capped_not_a_lost_message() -> None:
    from edgefleet.server.telemetry.payloads import DRIFT_CAP, Rejected, TelemetryIn

    drift = {"samples": 10, "features": 4, "psi_max": 0.5, "psi_mean": 0.1, "mean_shift_max": 3.0,
             "std_ratio_max": 2.0}
    raw = dumps(telemetry("cap-1", 1, models=[model_figures(drift=drift)]))
    raw = raw.replace('"psi_max": 0.5', '"psi_max": Infinity').replace('"psi_mean": 0.1', '"psi_mean": NaN')
    body = parse(telemetry_topic("cap-1"), raw.encode(), 1 << 20).body
    assert isinstance(body, TelemetryIn) and body.models[0].drift is not None
    assert (body.models[0].drift.psi_max, body.models[0].drift.psi_mean) == (DRIFT_CAP, None)
    with pytest.raises(Rejected) as e:  # elsewhere a non-finite number is refused, naming the field
        parse(telemetry_topic("cap-1"), raw.replace('"sum_s": 0.027', '"sum_s": Infinity').encode(), 1 << 20)
    assert e.value.reason == "invalid" and "models.0.latency.sum_s" in e.value.message


@pytest.mark.parametrize("split", [10, 8, 9, 4])
def test_a_new_epochs_events_are_kept_in_one_batch_with_the_old_or_not(clean_db: str, tmp_path: Path,
                                                                        split: int) -> None:
    """store_batch itself, batches cut at ``split`` (10: all in one): the new epoch's seq 1 and 2 are
    held by the old epoch's events, so they are kept without a seq, never dropped as duplicates."""
    settings = ingest_settings(clean_db, tmp_path / "data", "mqtt://127.0.0.1:1")
    init_server(settings)
    state = open_state(settings, run_migrations=False)
    try:
        add_devices(state, "ep-1")
        old, new = "aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb"
        bodies = [(events_topic("ep-1"), event("ep-1", q, epoch=old)) for q in (1, 2, 3, 4)]
        bodies += [(telemetry_topic("ep-1"), telemetry("ep-1", q, epoch=old)) for q in (5, 6, 8, 11)]
        bodies += [(events_topic("ep-1"), event("ep-1", q, kind="update.started", epoch=new)) for q in (1, 2)]
        items = [parse(topic, dumps(body).encode(), 1 << 20) for topic, body in bodies]
        for chunk in (items[:split], items[split:]):
            with state.sessions.begin() as s:
                assert set(store_batch(s, chunk, utcnow())) <= {"stored"}
        with state.sessions() as s:
            rows = s.execute(select(DeviceEvent.seq, DeviceEvent.kind).order_by(DeviceEvent.id)).all()
        assert sorted(rows, key=lambda r: (r.seq is None, r.seq or 0)) == [
            (1, "update.committed"), (2, "update.committed"), (3, "update.committed"), (4, "update.committed"),
            (None, "update.started"), (None, "update.started")]
    finally:
        state.engine.dispose()
        state.loop_db.close()
