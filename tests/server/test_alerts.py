"""Alerts for retraining: thresholds judged on stored telemetry entries (drift and live accuracy, from
the server's rules and from the bundle manifest), once per cooldown, fleet-wide; delivery to a real
HTTP receiver on loopback whose signature check is an independent implementation of Standard
Webhooks, retried after a 500, surviving workers SIGKILLed mid-retry and mid-request with each
attempt sent once; the MQTT alert topic through the ingester's connection to a real Mosquitto; the
API and the CLI (against the app on a real loopback HTTP server)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import inspect
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from _support import assert_one_line_error, run_cli, wait_until
from conftest import Fleet
from sqlalchemy import func, select, text

from edgefleet.bundle import Manifest, file_ref, write_bundle
from edgefleet.server.alerts import DeliveryWorker, evaluate, ingester_publisher, router
from edgefleet.server.alerts import rules as alert_rules
from edgefleet.server.alerts.webhooks import new_secret, secret_key, signature
from edgefleet.server.models import Alert, AlertDelivery, AlertRule, utcnow
from edgefleet.server.telemetry.payloads import BOUNDS, ModelFigures, Parsed, TelemetryIn, parse
from edgefleet.server.telemetry.store import STORED, store_batch

ALERT_TABLES = ("alert_deliveries", "alert_devices", "alerts", "webhooks", "alert_rules")
EPOCH = "00000000000000aa"


@pytest.fixture
def af(fleet: Fleet) -> Fleet:
    """The fleet with the alerts API mounted and the alert tables emptied."""
    with fleet.state.engine.begin() as c:
        for t in ALERT_TABLES:
            c.execute(text(f"DELETE FROM {t}"))
    alert_rules.invalidate()
    fleet.client.app.include_router(router)  # type: ignore[attr-defined]
    return fleet


def upload(fleet: Fleet, folder: Path, version: str = "1.0.0", metadata: dict[str, str] | None = None) -> None:
    model = hashlib.sha256(version.encode()).digest() * 64
    manifest = Manifest(name="digits", version=version, runtime="onnx", model=file_ref("model.onnx", model),
                        inputs=[{"name": "x", "dtype": "float32", "shape": [1, 4]}],
                        outputs=[{"name": "y", "dtype": "float32", "shape": [1, 2]}],
                        created_at=datetime(2026, 11, 1, tzinfo=UTC), metadata=metadata or {})
    folder.mkdir(parents=True, exist_ok=True)
    r = fleet.upload(write_bundle(folder / manifest.bundle_name, manifest, {"model.onnx": model}))
    assert r.status_code == 201, r.text


def entry(version: str = "1.0.0", psi: float | None = None, mean_shift: float | None = None, samples: int = 500,
          accuracy: float | None = None, window: int = 0) -> dict[str, Any]:
    e: dict[str, Any] = {"name": "digits", "version": version, "inferences": 10, "errors": 0,
                         "latency": {"counts": [0] * (len(BOUNDS) + 1), "sum_s": 0.0}}
    if psi is not None or mean_shift is not None:
        e["drift"] = {"samples": samples, "features": 4, "psi_max": psi, "psi_mean": psi,
                      "mean_shift_max": mean_shift, "std_ratio_max": 1.0, "granularity": "feature"}
    if accuracy is not None:
        e["accuracy"] = {"window": window, "accuracy": accuracy}
    return e


class Device:
    """A device's telemetry stream: each call is the next seq of its epoch."""

    def __init__(self, device_id: str) -> None:
        self.id, self.seq = device_id, 0

    def message(self, **figures: Any) -> tuple[str, bytes]:
        """The next telemetry message as published: (topic, payload)."""
        self.seq += 1
        body = {"schema": 1, "device_id": self.id, "at": utcnow().isoformat(), "epoch": EPOCH, "seq": self.seq,
                "models": [entry(**figures)]}
        return f"edgefleet/v1/{self.id}/telemetry", json.dumps(body).encode()

    def report(self, **figures: Any) -> Parsed:
        """The next telemetry message as the ingester has it once validated."""
        return parse(*self.message(**figures), 1 << 20)


# Whether the ingester's store already judges what it stores (the call to evaluate wired in); until
# then the helper below makes that call itself, where it goes: after the entries are stored, in the
# same transaction, for the newly stored ones only.
STORE_EVALUATES = "evaluate" in inspect.getsource(store_batch)


def ingest(fleet: Fleet, *items: Parsed, now: datetime | None = None) -> list[int]:
    """What the ingester does with a batch (at ``now``, the server's clock): store it, and judge every
    newly stored entry in the same transaction. The ids of the alerts raised."""
    at = now or utcnow()
    with fleet.state.sessions.begin() as s:
        before = s.scalar(select(func.max(Alert.id))) or 0
        outcome = store_batch(s, list(items), at)
        if not STORE_EVALUATES:
            for p, result in zip(items, outcome, strict=True):
                if result == STORED and isinstance(p.body, TelemetryIn):
                    for m in p.body.models:
                        evaluate(s, p.device_id, m.name, m.version, m, now=at)
        return [int(i) for i in s.scalars(select(Alert.id).where(Alert.id > before).order_by(Alert.id))]


def alerts(fleet: Fleet, **params: Any) -> list[dict[str, Any]]:
    r = fleet.client.get("/api/v1/alerts", params=params, headers=fleet.admin_h)
    assert r.status_code == 200, r.text
    out: list[dict[str, Any]] = r.json()
    return out


def put_rules(fleet: Fleet, **body: Any) -> None:
    r = fleet.client.put("/api/v1/models/digits/alert-rules", json=body, headers=fleet.admin_h)
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------- the receiver and the spec, independently


def verify_standard_webhook(secret: str, headers: dict[str, str], body: bytes, tolerance: int = 300) -> bool:
    """Standard Webhooks verification written from the spec, sharing no code with the server: the key
    is the base64 after ``whsec_``; the signed content ``{webhook-id}.{webhook-timestamp}.{body}``;
    ``webhook-signature`` a space-separated list of ``v1,<base64 HMAC-SHA256>``; the timestamp within
    ``tolerance`` seconds of now."""
    assert secret.startswith("whsec_")
    key = base64.b64decode(secret[len("whsec_"):])
    msg_id, stamp = headers["webhook-id"], headers["webhook-timestamp"]
    if abs(int(stamp) - time.time()) > tolerance:
        return False
    expected = base64.b64encode(hmac.new(key, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256).digest())
    for candidate in headers["webhook-signature"].split(" "):
        version, _, sig = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(sig.encode(), expected):
            return True
    return False


@dataclass
class Hit:
    headers: dict[str, str]
    body: bytes


class Receiver:
    """A real HTTP server on loopback recording every POST; it answers ``script``'s statuses in turn
    (200 after), and holds the request unanswered for the entry ``"hold"`` until :meth:`release`."""

    def __init__(self, *script: int | str) -> None:
        self.script = list(script)
        self.hits: list[Hit] = []
        self.cond = threading.Condition()
        self.released = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with receiver.cond:
                    receiver.hits.append(Hit({k.lower(): v for k, v in self.headers.items()}, body))
                    answer = receiver.script.pop(0) if receiver.script else 200
                    receiver.cond.notify_all()
                if answer == "hold":
                    receiver.released.wait(60)
                    answer = 200
                try:
                    self.send_response(int(answer))
                    self.send_header("content-length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the sender is gone (killed)

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/alerts?token=abc"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait_hits(self, n: int, timeout: float = 30.0) -> list[Hit]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.hits) >= n, timeout), f"{len(self.hits)} of {n} requests"
            return list(self.hits)

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Any]:
    made: list[Receiver] = []

    def make(*script: int | str) -> Receiver:
        made.append(Receiver(*script))
        return made[-1]

    yield make
    for r in made:
        r.close()


def add_webhook(fleet: Fleet, url: str, **extra: Any) -> dict[str, Any]:
    r = fleet.client.post("/api/v1/webhooks", json={"url": url, **extra}, headers=fleet.admin_h)
    assert r.status_code == 201, r.text
    out: dict[str, Any] = r.json()
    return out


def fast(fleet: Fleet, **more: Any) -> Any:
    """The fleet's settings with a delivery schedule fit for a test (fractions of a second)."""
    return fleet.settings.model_copy(update={"alert_delivery_backoff": 0.2, "alert_delivery_backoff_max": 0.5,
                                             "alert_webhook_timeout": 1.0, "alert_delivery_poll": 0.05, **more})


@contextmanager
def worker(fleet: Fleet, **kw: Any) -> Iterator[DeliveryWorker]:
    w = DeliveryWorker(fast(fleet), fleet.state.sessions, **kw)
    w.start()
    try:
        yield w
    finally:
        w.stop()


def delivery(fleet: Fleet, channel: str = "webhook") -> AlertDelivery:
    with fleet.state.sessions() as s:
        rows = list(s.scalars(select(AlertDelivery).where(AlertDelivery.channel == channel)))
    assert len(rows) == 1, rows
    return rows[0]


# ---------------------------------------------------------------- thresholds (pure)


def test_thresholds_come_from_the_server_rule_then_the_manifest_then_the_defaults() -> None:
    meta = {"edgefleet.alert.drift_psi_max": "0.3", "edgefleet.alert.accuracy_min": "0.8",
            "edgefleet.alert.min_samples": "20", "edgefleet.alert.cooldown_s": "not a number"}
    assert alert_rules.rule_from(None, None) == alert_rules.Rule()
    assert not alert_rules.Rule().active
    from_manifest = alert_rules.rule_from(None, meta)
    assert from_manifest == alert_rules.Rule(drift_psi_max=0.3, accuracy_min=0.8, min_samples=20,
                                             cooldown_s=alert_rules.DEFAULT_COOLDOWN)
    row = AlertRule(model="digits", drift_psi_max=0.1, drift_mean_shift_max=None, accuracy_min=None, min_samples=None,
                    cooldown_s=60)
    assert alert_rules.rule_from(row, meta) == alert_rules.Rule(drift_psi_max=0.1, accuracy_min=0.8, min_samples=20,
                                                                cooldown_s=60)


def test_a_report_breaks_drift_above_and_accuracy_below_with_enough_samples() -> None:
    rule = alert_rules.Rule(drift_psi_max=0.2, drift_mean_shift_max=1.5, accuracy_min=0.9, min_samples=100)

    def check(**figures: Any) -> list[tuple[str, str]]:
        return [(b.kind, b.metric) for b in alert_rules.check(rule, ModelFigures.model_validate(entry(**figures)))]

    assert check() == []
    assert check(psi=0.2, mean_shift=1.5) == []  # at the threshold is not beyond it
    assert check(psi=0.21, mean_shift=3.0) == [("drift", "psi_max")]  # one drift breach, PSI first
    assert check(psi=0.1, mean_shift=1.6) == [("drift", "mean_shift_max")]
    assert check(psi=5.0, samples=99) == []  # too few samples to judge
    assert check(accuracy=0.5, window=99) == []
    assert check(accuracy=0.9, window=100) == []
    assert check(psi=0.5, accuracy=0.89, window=100) == [("drift", "psi_max"), ("accuracy", "accuracy")]


# ---------------------------------------------------------------- alerts from stored telemetry


def test_drift_raises_one_fleet_alert_per_cooldown_counting_every_device(af: Fleet, tmp_path: Path) -> None:
    upload(af, tmp_path / "b")
    put_rules(af, drift_psi_max=0.2, min_samples=50, cooldown_s=3600)
    a, b = Device(af.device().id), Device(af.device().id)
    assert ingest(af, a.report(psi=0.1), a.report(psi=0.9, samples=10)) == []  # below / too few samples
    raised = ingest(af, a.report(psi=0.4), a.report(psi=0.7), b.report(psi=0.3))
    assert len(raised) == 1
    assert ingest(af, b.report(psi=0.5)) == []
    [alert] = alerts(af)
    assert (alert["id"], alert["state"], alert["kind"], alert["metric"]) == (raised[0], "open", "drift", "psi_max")
    assert (alert["value"], alert["threshold"], alert["worst"]) == (0.4, 0.2, 0.7)
    assert (alert["device_id"], alert["devices"], alert["occurrences"]) == (a.id, 2, 4)
    assert alert["drift"]["samples"] == 500 and alert["rule"]["drift_psi_max"] == 0.2

    message = a.report(psi=0.9)
    assert ingest(af, message) == [] and alerts(af)[0]["occurrences"] == 5
    assert ingest(af, message) == [] and alerts(af)[0]["occurrences"] == 5  # redelivered: stored once, counted once

    r = af.client.post(f"/api/v1/alerts/{raised[0]}/ack", headers=af.admin_h)
    assert r.status_code == 200 and r.json()["state"] == "acked", r.text
    assert ingest(af, a.report(psi=0.9)) == []  # acknowledged, but within the cooldown
    later = utcnow() + timedelta(seconds=3601)
    second = ingest(af, b.report(psi=0.25), now=later)
    assert len(second) == 1 and second[0] != raised[0]
    assert [x["state"] for x in alerts(af)] == ["open", "acked"]
    assert [x["device_id"] for x in alerts(af, state="open")] == [b.id]


def test_live_accuracy_below_the_manifest_threshold_raises_an_accuracy_alert(af: Fleet, tmp_path: Path) -> None:
    upload(af, tmp_path / "b", "2.0.0", {"edgefleet.alert.accuracy_min": "0.8", "edgefleet.alert.min_samples": "50"})
    d = Device(af.device().id)
    assert ingest(af, d.report(version="2.0.0", accuracy=0.95, window=200)) == []
    assert ingest(af, d.report(version="2.0.0", accuracy=0.5, window=49)) == []  # window too small
    assert ingest(af, d.report(version="1.9.0", accuracy=0.1, window=500)) == []  # a version with no thresholds
    [raised] = ingest(af, d.report(version="2.0.0", accuracy=0.7, window=60))
    assert ingest(af, d.report(version="2.0.0", accuracy=0.6, window=80)) == []
    [alert] = alerts(af, state="open", model="digits")
    assert (alert["id"], alert["kind"], alert["version"], alert["metric"]) == (raised, "accuracy", "2.0.0", "accuracy")
    assert (alert["value"], alert["threshold"], alert["worst"], alert["occurrences"]) == (0.7, 0.8, 0.6, 2)
    # The server's rule overrides the manifest's field (and the cache is cleared by the PUT).
    put_rules(af, accuracy_min=0.5)
    r = af.client.post(f"/api/v1/alerts/{raised}/ack", headers=af.admin_h)
    assert r.status_code == 200
    assert ingest(af, d.report(version="2.0.0", accuracy=0.6, window=80), now=utcnow() + timedelta(days=1)) == []


# ---------------------------------------------------------------- delivery


def test_a_signed_alert_reaches_the_webhook_after_a_500_then_a_200(af: Fleet, tmp_path: Path, receiver: Any) -> None:
    upload(af, tmp_path / "b")
    put_rules(af, drift_mean_shift_max=2.0, min_samples=1)
    rcv = receiver(500, 200)
    hook = add_webhook(af, rcv.url, description="retrain digits", models=["digits"])
    other = add_webhook(af, rcv.url, models=["faces"])  # wants another model: never called
    assert hook["secret"].startswith("whsec_") and len(secret_key(hook["secret"])) == 32
    listed = af.client.get("/api/v1/webhooks", headers=af.admin_h).json()
    assert {w["id"] for w in listed} == {hook["id"], other["id"]} and all(w["secret"] is None for w in listed)

    [alert_id] = ingest(af, Device(af.device().id).report(psi=0.0, mean_shift=4.5))
    with worker(af):
        first, second = rcv.wait_hits(2)
        assert wait_until(lambda: delivery(af).state == "delivered")
    for hit in (first, second):
        assert verify_standard_webhook(hook["secret"], hit.headers, hit.body), hit.headers
        assert not verify_standard_webhook(new_secret(), hit.headers, hit.body)
        assert hit.headers["content-type"] == "application/json"
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == delivery(af).id
    assert [first.headers["edgefleet-attempt"], second.headers["edgefleet-attempt"]] == ["1", "2"]
    assert first.body == second.body
    payload = json.loads(first.body)
    assert payload["type"] == "alert.raised" and payload["schema"] == 1 and payload["timestamp"] == payload["at"]
    assert payload["data"]["id"] == alert_id and payload["data"]["metric"] == "mean_shift_max"
    assert payload["data"]["value"] == 4.5 and payload["data"]["path"] == f"/api/v1/alerts/{alert_id}"

    row = delivery(af)
    assert (row.state, row.attempts, row.last_status, row.webhook_id) == ("delivered", 2, 200, hook["id"])
    assert delivery(af, "mqtt").state == "skipped"  # this worker has no broker
    shown = af.client.get(f"/api/v1/alerts/{alert_id}", headers=af.admin_h).json()
    assert {d["channel"]: d["state"] for d in shown["deliveries"]} == {"webhook": "delivered", "mqtt": "skipped"}
    assert len(shown["device_ids"]) == 1


def test_deliveries_give_up_after_the_attempts_and_410_disables_the_webhook(
    af: Fleet, tmp_path: Path, receiver: Any
) -> None:
    upload(af, tmp_path / "b")
    put_rules(af, drift_psi_max=0.1, min_samples=1)
    failing, gone = receiver(503, 503, 503), receiver(410)
    h1, h2 = add_webhook(af, failing.url), add_webhook(af, gone.url)
    ingest(af, Device(af.device().id).report(psi=1.0))
    w = DeliveryWorker(fast(af, alert_delivery_attempts=3, alert_delivery_backoff=0.01,
                            alert_delivery_backoff_max=0.01), af.state.sessions)
    try:
        def done() -> bool:
            w.run_once()
            with af.state.sessions() as s:
                return all(r.state != "pending" for r in s.scalars(select(AlertDelivery)))
        assert wait_until(done)
    finally:
        w.stop()
    with af.state.sessions() as s:
        rows = {r.webhook_id: r for r in s.scalars(select(AlertDelivery).where(AlertDelivery.channel == "webhook"))}
    assert (rows[h1["id"]].state, rows[h1["id"]].attempts, rows[h1["id"]].last_status) == ("failed", 3, 503)
    assert (rows[h2["id"]].state, rows[h2["id"]].attempts, rows[h2["id"]].last_status) == ("failed", 1, 410)
    assert len(failing.hits) == 3 and len(gone.hits) == 1
    listed = {x["id"]: x for x in af.client.get("/api/v1/webhooks", headers=af.admin_h).json()}
    assert listed[h2["id"]]["disabled_at"] is not None and listed[h1["id"]]["disabled_at"] is None
    assert listed[h1["id"]]["failed"] == 1


WORKER = """
import sys
from edgefleet.server.alerts import DeliveryWorker
from edgefleet.server.db import make_engine, make_sessionmaker
from edgefleet.server.settings import Settings

settings = Settings(db_url=sys.argv[1], alert_delivery_backoff=0.2, alert_delivery_backoff_max=0.5,
                    alert_webhook_timeout=1.0, alert_delivery_poll=0.05)
DeliveryWorker(settings, make_sessionmaker(make_engine(sys.argv[1]))).run_forever()
"""


def test_workers_killed_mid_retry_and_mid_request_send_each_attempt_once(
    af: Fleet, tmp_path: Path, receiver: Any
) -> None:
    worker = getattr(af.client.app.state, "alert_worker", None)
    if worker is not None:
        worker.stop()  # the server's own worker would take the deliveries these worker processes must
    upload(af, tmp_path / "b")
    put_rules(af, drift_psi_max=0.1, min_samples=1)
    rcv = receiver(500, "hold", 200)
    hook = add_webhook(af, rcv.url)
    ingest(af, Device(af.device().id).report(psi=1.0))
    url = af.settings.database_url()
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, url], stderr=subprocess.PIPE))
        return procs[-1]

    def kill(p: subprocess.Popen[bytes]) -> None:
        p.send_signal(signal.SIGKILL)
        p.wait(10)

    try:
        first = start()
        rcv.wait_hits(1)
        assert wait_until(lambda: delivery(af).last_status == 500)  # attempt 1 recorded, waiting to retry
        kill(first)
        second = start()
        rcv.wait_hits(2)  # attempt 2 is held by the receiver: the worker dies with it in flight
        kill(second)
        rcv.release()
        assert (delivery(af).attempts, delivery(af).state, delivery(af).last_status) == (2, "pending", 500)
        start()
        rcv.wait_hits(3)
        assert wait_until(lambda: delivery(af).state == "delivered")
    finally:
        for p in procs:
            if p.poll() is None:
                kill(p)
    hits = rcv.wait_hits(3)
    assert [h.headers["edgefleet-attempt"] for h in hits] == ["1", "2", "3"]
    assert len({h.headers["webhook-id"] for h in hits}) == 1 and len({h.body for h in hits}) == 1
    assert all(verify_standard_webhook(hook["secret"], h.headers, h.body) for h in hits)
    row = delivery(af)
    assert (row.state, row.attempts, row.last_status) == ("delivered", 3, 200)
    w = DeliveryWorker(fast(af), af.state.sessions)
    try:
        assert w.run_once() == 0  # nothing due any more
    finally:
        w.stop()
    assert len(rcv.hits) == 3


def test_the_signature_matches_the_standard_webhooks_example_construction() -> None:
    secret = "whsec_" + base64.b64encode(b"k" * 24).decode()
    body = b'{"type":"contact.created","timestamp":"2022-11-03T20:26:10.344522Z","data":{"id":"1"}}'
    sig = signature(secret, "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W", 1674087231, body)
    mac = hmac.new(b"k" * 24, b"msg_2KWPBgLlAfxdpx2AI54pPJ85f4W.1674087231." + body, hashlib.sha256).digest()
    assert sig == "v1," + base64.b64encode(mac).decode()
    for bad, needle in (("abc", "whsec_"), ("whsec_!!!", "base64"), ("whsec_" + base64.b64encode(b"x" * 8).decode(),
                                                                      "8 bytes")):
        with pytest.raises(ValueError, match=needle):
            secret_key(bad)


def _mosquitto() -> str:
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the mosquitto binary is not installed (CI=true: not skipping)")
        pytest.skip("the mosquitto binary is not installed")
    return exe


@contextmanager
def ingesting(fleet: Fleet, folder: Path) -> Iterator[tuple[Any, Any]]:
    """A Mosquitto of the test's own and the server's ingester connected to it (registered for the
    fleet's state, as the server's lifespan does): (broker, ingester)."""
    from telemetry._mqtt import Broker

    from edgefleet.server.telemetry.ingest import Ingester

    broker = Broker(_mosquitto(), folder)
    settings = fleet.settings.model_copy(update={"mqtt_url": f"mqtt://127.0.0.1:{broker.port}",
                                                 "mqtt_client_id": f"alerts-{os.getpid()}-{time.monotonic_ns()}"})
    ingester = Ingester(settings, fleet.state.sessions, fleet.state.metrics)
    try:
        ingester.start(register_for=fleet.state)
        assert ingester.wait_subscribed(15)
        yield broker, ingester
    finally:
        ingester.stop()
        broker.stop()


def test_an_alert_reaches_the_mqtt_alert_topic_through_the_ingester(af: Fleet, tmp_path: Path) -> None:
    from telemetry._mqtt import Subscriber

    with ingesting(af, tmp_path / "broker") as (broker, _):
        sub = Subscriber(broker.port, topic="edgefleet/v1/alerts/#")
        try:
            upload(af, tmp_path / "b")
            put_rules(af, accuracy_min=0.9, min_samples=10)
            [alert_id] = ingest(af, Device(af.device().id).report(accuracy=0.4, window=100))
            with worker(af, publish=ingester_publisher(af.state)):
                assert sub.wait_for(lambda ms: len(ms) >= 1, 30)
                assert wait_until(lambda: delivery(af, "mqtt").state == "delivered")
            [m] = sub.messages
        finally:
            sub.close()
    assert m.topic == "edgefleet/v1/alerts/digits" and not m.retain
    assert m.body["type"] == "alert.raised" and m.body["data"]["id"] == alert_id
    assert m.body["data"]["kind"] == "accuracy" and m.body["data"]["value"] == 0.4


@pytest.mark.skipif(not STORE_EVALUATES, reason="the ingester's store does not call alerts.evaluate yet (the "
                    "wiring of issue 11: see docs/alerts.md)")
def test_drifting_telemetry_published_to_the_broker_reaches_the_webhook_and_the_alert_topic(
    af: Fleet, tmp_path: Path, receiver: Any
) -> None:
    from telemetry._mqtt import Subscriber

    upload(af, tmp_path / "b")
    put_rules(af, drift_psi_max=0.2, min_samples=10)
    rcv = receiver()
    hook = add_webhook(af, rcv.url)
    device = Device(af.device().id)
    with ingesting(af, tmp_path / "broker") as (broker, _):
        sub = Subscriber(broker.port, topic="edgefleet/v1/alerts/#")
        try:
            for psi in (0.05, 0.6, 0.8):  # in distribution, then shifted
                sub.publish(*device.message(psi=psi))
            assert wait_until(lambda: [a["occurrences"] for a in alerts(af)] == [2])
            with worker(af, publish=ingester_publisher(af.state)):
                [hit] = rcv.wait_hits(1)
                assert sub.wait_for(lambda ms: len(ms) >= 1, 30)
                assert wait_until(lambda: delivery(af).state == delivery(af, "mqtt").state == "delivered")
            [m] = sub.messages
        finally:
            sub.close()
    [alert] = alerts(af)
    assert (alert["kind"], alert["value"], alert["worst"], alert["device_id"]) == ("drift", 0.6, 0.8, device.id)
    assert verify_standard_webhook(hook["secret"], hit.headers, hit.body)
    assert json.loads(hit.body) == m.body and m.body["data"]["id"] == alert["id"]


# ---------------------------------------------------------------- API and CLI


def test_alert_and_webhook_api_roles_and_refusals_name_the_field(af: Fleet, tmp_path: Path) -> None:
    c, viewer, operator = af.client, af.auth(af.api_token("viewer")), af.auth(af.api_token("operator"))
    r = c.put("/api/v1/models/nope/alert-rules", json={"drift_psi_max": 0.2}, headers=af.admin_h)
    assert r.status_code == 404 and r.json()["field"] == "name"
    upload(af, tmp_path / "b")
    assert c.put("/api/v1/models/digits/alert-rules", json={"drift_psi_max": 0.2}, headers=viewer).status_code == 403
    for body, field in (({"accuracy_min": 2}, "body.accuracy_min"), ({"psi": 1}, "body.psi"),
                        ({"drift_psi_max": -1}, "body.drift_psi_max"), ({"cooldown_s": 1.5}, "body.cooldown_s")):
        r = c.put("/api/v1/models/digits/alert-rules", json=body, headers=operator)
        assert r.status_code == 422 and r.json()["field"] == field, r.text
    r = c.put("/api/v1/models/digits/alert-rules", json={"drift_psi_max": 0.2, "min_samples": 1}, headers=operator)
    assert r.status_code == 200 and r.json()["updated_by"].startswith("operator-x")
    assert c.get("/api/v1/alert-rules/digits", headers=viewer).json()["drift_psi_max"] == 0.2
    assert [x["model"] for x in c.get("/api/v1/alert-rules", headers=viewer).json()] == ["digits"]

    [alert_id] = ingest(af, Device(af.device().id).report(psi=0.5))
    assert [a["id"] for a in c.get("/api/v1/alerts?state=open", headers=viewer).json()] == [alert_id]
    assert c.get("/api/v1/alerts?state=acked", headers=viewer).json() == []
    r = c.get("/api/v1/alerts?state=closed", headers=viewer)
    assert r.status_code == 422 and r.json()["field"] == "query.state"
    assert c.post(f"/api/v1/alerts/{alert_id}/ack", headers=viewer).status_code == 403
    assert c.post("/api/v1/alerts/999999/ack", headers=operator).json()["field"] == "alert_id"
    acked = c.post(f"/api/v1/alerts/{alert_id}/ack", headers=operator).json()
    assert acked["state"] == "acked" and acked["acked_by"].startswith("operator-x")
    assert c.post(f"/api/v1/alerts/{alert_id}/ack", headers=af.admin_h).json()["acked_by"] == acked["acked_by"]
    assert [a["id"] for a in c.get("/api/v1/alerts?state=acked", headers=viewer).json()] == [alert_id]
    audit = [e["action"] for e in c.get("/api/v1/audit", headers=viewer).json()]
    assert audit.count("alert.ack") == 1 and "alert_rules.set" in audit

    assert c.get("/api/v1/webhooks", headers=operator).status_code == 403
    for body, field in (({"url": "ftp://example.com/x"}, "body.url"), ({"url": "http://x.example", "secret": "nope"},
                                                                      "body.secret"),
                        ({"url": "http://x.example", "models": ["Bad Name"]}, "body.models.0")):
        r = c.post("/api/v1/webhooks", json=body, headers=af.admin_h)
        assert r.status_code == 422 and r.json()["field"] == field, r.text
    mine = "whsec_" + base64.b64encode(os.urandom(24)).decode()
    hook = add_webhook(af, "https://ci.example.com/hooks/retrain?token=s3cret", secret=mine)
    assert hook["secret"] == mine
    assert not any("s3cret" in json.dumps(e) for e in c.get("/api/v1/audit", headers=af.admin_h).json())
    assert c.delete(f"/api/v1/webhooks/{hook['id']}", headers=af.admin_h).status_code == 204
    assert c.delete(f"/api/v1/webhooks/{hook['id']}", headers=af.admin_h).json()["field"] == "webhook_id"
    assert c.delete("/api/v1/alert-rules/digits", headers=operator).status_code == 204
    assert c.get("/api/v1/alert-rules/digits", headers=viewer).status_code == 404


@contextmanager
def on_loopback(app: Any) -> Iterator[str]:
    """``app`` served by uvicorn on a free loopback port, in a thread (its lifespan already ran)."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: server.started, 15)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def test_cli_lists_acknowledges_and_manages_webhooks(
    af: Fleet, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgefleet.cli import alerts as alerts_cmd
    from edgefleet.cli import main as main_cmd

    alerts_cmd.register(main_cmd.app)
    alerts_cmd.register(main_cmd.app)  # twice: no second group
    assert [g.name for g in main_cmd.app.registered_groups].count("alert") == 1
    upload(af, tmp_path / "b")
    viewer, operator = af.api_token("viewer"), af.api_token("operator")
    monkeypatch.setenv("EDGEFLEET_CLI_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.setenv("COLUMNS", "200")  # rich's tables, not squeezed to 80 columns
    with on_loopback(af.client.app) as url:
        monkeypatch.setenv("EDGEFLEET_SERVER", url)
        monkeypatch.setenv("EDGEFLEET_TOKEN", operator)
        code, out, err = run_cli(capsys, "alert", "rules", "set", "digits", "--drift-psi-max", "0.2",
                                 "--min-samples", "1", "--json")
        assert code == 0 and json.loads(out)["drift_psi_max"] == 0.2, err
        [alert_id] = ingest(af, Device(af.device().id).report(psi=0.6))

        monkeypatch.setenv("EDGEFLEET_TOKEN", af.admin)
        code, out, err = run_cli(capsys, "alert", "webhook", "add", "https://ci.example.com/h", "--model", "digits")
        assert code == 0 and "shown once" in out and "whsec_" in out, err
        code, out, _ = run_cli(capsys, "alert", "webhook", "list", "--json")
        [hook] = json.loads(out)
        assert hook["models"] == ["digits"] and hook["secret"] is None and "whsec_" not in out

        monkeypatch.setenv("EDGEFLEET_TOKEN", viewer)
        code, out, err = run_cli(capsys, "alert", "list", "--state", "open", "--json")
        assert code == 0 and [a["id"] for a in json.loads(out)] == [alert_id], err
        code, out, _ = run_cli(capsys, "alert", "list")
        assert code == 0 and "digits" in out and "psi_max" in out
        code, _, err = run_cli(capsys, "alert", "ack", str(alert_id))
        assert_one_line_error(code, err, "403", "operator")
        code, _, err = run_cli(capsys, "alert", "list", "--state", "closed")
        assert_one_line_error(code, err, "--state")

        monkeypatch.setenv("EDGEFLEET_TOKEN", operator)
        code, out, err = run_cli(capsys, "alert", "ack", str(alert_id))
        assert code == 0 and f"alert {alert_id}" in out and "acknowledged" in out, err
        code, out, _ = run_cli(capsys, "alert", "show", str(alert_id), "--json")
        assert json.loads(out)["state"] == "acked"
        code, out, _ = run_cli(capsys, "alert", "list", "--state", "acked", "--json")
        assert [a["id"] for a in json.loads(out)] == [alert_id]
        code, _, err = run_cli(capsys, "alert", "ack", "999999")
        assert_one_line_error(code, err, "404", "alert_id")

        monkeypatch.setenv("EDGEFLEET_TOKEN", af.admin)
        code, out, err = run_cli(capsys, "alert", "webhook", "remove", hook["id"])
        assert code == 0 and "removed" in out, err
        code, out, _ = run_cli(capsys, "alert", "webhook", "list", "--json")
        assert json.loads(out) == []
