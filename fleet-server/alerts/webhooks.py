"""Alert delivery: webhooks signed as Standard Webhooks specifies, and the MQTT topic
``edgefleet/v1/alerts/{model}``, from a durable outbox (``alert_deliveries``) that a restart does not
lose.

**Signing** (https://www.standardwebhooks.com, spec 1.0.0): a secret is ``whsec_`` + base64 of 32
random bytes (24 to 64 accepted when an admin brings their own); the HMAC key is the decoded bytes.
Every attempt sends ``webhook-id`` (the delivery's id, ``msg_...``, the same on every retry: the
receiver's idempotency key), ``webhook-timestamp`` (the attempt's Unix seconds, new on each retry)
and ``webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``, over the exact body
bytes sent (stored once, so every retry sends the same bytes). ``edgefleet-attempt: N`` (our
extension) numbers the attempts. The body: ``{"schema": 1, "type": "alert.raised", "timestamp",
"at", "data": {...the alert...}}``; the MQTT topic carries the same JSON.

**Retries.** 2xx is delivered. Anything else (3xx included: redirects are not followed), a timeout
or a broken connection is a failed attempt, retried after :func:`backoff` (``alert_delivery_backoff``
doubling per attempt up to ``alert_delivery_backoff_max``, plus up to 10% jitter; a
``Retry-After`` in seconds on 429/503 is honoured within that cap) until ``alert_delivery_attempts``,
then the delivery is ``failed``. ``410 Gone`` fails it at once and disables the webhook (its other
deliveries are ``skipped``), as the spec asks.

**At most once per attempt.** Before an attempt goes out, one committed compare-and-set UPDATE
raises ``attempts`` to N and moves ``next_attempt_at`` past twice the request's timeout and its back-off: a
worker that dies (SIGKILL) before it records the answer leaves attempt N spent, and whichever worker
or replica comes next sends attempt N+1 once that time has passed, never N again. Two workers
racing for a row: only one UPDATE matches. A receiver may thus see an event twice (sent, answered,
the answer lost with the worker) but under one ``webhook-id``.

The MQTT deliveries go through a :data:`Publisher` (the ingester's connection to the fleet's broker:
:func:`ingester_publisher`): QoS 1, delivered on the broker's PUBACK. Without one (``mqtt_url``
unset) they are ``skipped``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import random
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from edgefleet import __version__
from edgefleet.server.models import Alert, AlertDelivery, Webhook, utcnow
from edgefleet.server.settings import Settings

__all__ = [
    "ALERT_TOPIC",
    "ATTEMPT_HEADER",
    "EVENT_RAISED",
    "SECRET_PREFIX",
    "DeliveryWorker",
    "Publisher",
    "alert_data",
    "backoff",
    "enqueue",
    "ingester_publisher",
    "new_secret",
    "secret_key",
    "signature",
]

log = logging.getLogger(__name__)

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32  # random bytes in a secret the server makes
SECRET_MIN, SECRET_MAX = 24, 64  # bytes a secret must decode to (Standard Webhooks: 192 to 512 bits)
EVENT_RAISED = "alert.raised"
ATTEMPT_HEADER = "edgefleet-attempt"
ALERT_TOPIC = "edgefleet/v1/alerts/{model}"
BATCH = 20  # due deliveries read per pass
JITTER = 0.1  # up to this fraction added to each back-off

# (topic, payload, timeout s) -> whether the broker acknowledged it (PUBACK) within the timeout
Publisher = Callable[[str, bytes, float], bool]


def new_secret() -> str:
    """A fresh signing secret: ``whsec_`` + base64 of :data:`SECRET_BYTES` random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_`` secret (its base64 part decoded). Raises ValueError naming the
    field when it is not ``whsec_`` + base64 of 24 to 64 bytes."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"secret: must start with {SECRET_PREFIX!r}")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"secret: the part after {SECRET_PREFIX!r} is not base64") from None
    if not SECRET_MIN <= len(key) <= SECRET_MAX:
        raise ValueError(f"secret: decodes to {len(key)} bytes; it must be {SECRET_MIN} to {SECRET_MAX}")
    return key


def signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,`` + base64 HMAC-SHA256 of ``{id}.{timestamp}.{body}``."""
    mac = hmac.new(secret_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def backoff(attempt: int, base: float, cap: float, rng: Callable[[], float] = random.random) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1, 2, ...): ``base * 2**(attempt-1)``,
    capped at ``cap``, plus up to :data:`JITTER` of it at random (still within ``cap``)."""
    delay = min(cap, base * 2.0 ** min(attempt - 1, 60))
    return min(cap, delay * (1.0 + JITTER * rng()))


def _stamp(t: datetime) -> str:
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def alert_data(alert: Alert) -> dict[str, Any]:
    """The public view of an alert (the ``data`` of a notification, and what the API lists)."""
    return {
        "id": alert.id, "model": alert.model, "version": alert.version, "kind": alert.kind, "state": alert.state,
        "metric": alert.metric, "value": alert.value, "threshold": alert.threshold, "worst": alert.worst,
        "device_id": alert.device_id, "occurrences": alert.occurrences, "raised_at": _stamp(alert.raised_at),
        "last_at": _stamp(alert.last_at), "acked_at": _stamp(alert.acked_at) if alert.acked_at else None,
        "acked_by": alert.acked_by, "rule": alert.data.get("rule"), "drift": alert.data.get("drift"),
        "accuracy": alert.data.get("accuracy"), "path": f"/api/v1/alerts/{alert.id}",
    }


def _body(alert: Alert) -> str:
    at = _stamp(alert.raised_at)
    return json.dumps({"schema": 1, "type": EVENT_RAISED, "timestamp": at, "at": at, "data": alert_data(alert)},
                      separators=(",", ":"), allow_nan=False)


def enqueue(s: Session, alert: Alert, now: datetime) -> list[str]:
    """Queue ``alert``'s notifications in the caller's transaction: one delivery per enabled webhook
    that wants the model, and one to ``edgefleet/v1/alerts/{model}``, due at once. Their ids."""
    body = _body(alert)
    hooks = [w for w in s.scalars(select(Webhook).where(Webhook.disabled_at.is_(None)).order_by(Webhook.id))
             if not w.models or alert.model in w.models]
    rows = [AlertDelivery(id=f"msg_{secrets.token_hex(12)}", alert_id=alert.id, channel="webhook", webhook_id=w.id,
                          topic=None, body=body, state="pending", attempts=0, next_attempt_at=now,
                          created_at=now) for w in hooks]
    rows.append(AlertDelivery(id=f"msg_{secrets.token_hex(12)}", alert_id=alert.id, channel="mqtt", webhook_id=None,
                              topic=ALERT_TOPIC.format(model=alert.model), body=body, state="pending", attempts=0,
                              next_attempt_at=now, created_at=now))
    s.add_all(rows)
    s.flush()
    return [r.id for r in rows]


def ingester_publisher(state: object) -> Publisher:
    """A :data:`Publisher` through the running ingester of server ``state`` (its MQTT 5 client to the
    fleet's broker): False while there is none or it is not connected, so the delivery is retried."""

    def publish(topic: str, payload: bytes, timeout: float) -> bool:
        import paho.mqtt.client as mqtt

        from edgefleet.server.telemetry.ingest import active_ingester  # the ingester imports nothing of this

        ingester = active_ingester(state)
        if ingester is None or not ingester.connected:
            return False
        info = ingester.client.publish(topic, payload, qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return False
        try:
            info.wait_for_publish(timeout)
            return info.is_published()
        except (RuntimeError, ValueError):
            return False

    return publish


@dataclass(frozen=True)
class _Due:
    id: str
    attempts: int
    channel: str
    topic: str | None
    body: str
    webhook_id: str | None
    url: str | None
    secret: str | None
    disabled: bool


@dataclass(frozen=True)
class _Outcome:
    ok: bool
    status: int | None = None
    error: str | None = None
    retry_after: float | None = None
    gone: bool = False


def _retry_after(value: str | None) -> float | None:
    if value is None or not value.strip().isdigit():
        return None  # an HTTP date is not worth trusting a receiver's clock for
    return float(value.strip())


class DeliveryWorker:
    """Sends due deliveries from the outbox, one at a time, in its own thread (``start``/``stop``) or
    by :meth:`run_once`. Every replica may run one: claims are compare-and-set (module docstring).
    ``publish``: the MQTT channel (None: those deliveries are skipped); ``http``: the client webhooks
    are POSTed with (default: one of its own, no redirects, ``alert_webhook_timeout``)."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], publish: Publisher | None = None,
                 http: httpx.Client | None = None) -> None:
        self.settings = settings
        self.sessions = sessions
        self.publish = publish
        self._own_http = http is None
        self.http = http or httpx.Client(follow_redirects=False, timeout=httpx.Timeout(settings.alert_webhook_timeout),
                                         headers={"user-agent": f"edgefleet/{__version__}"})
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self.run_forever, name="edgefleet-alerts", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the attempt in flight (at most ``alert_webhook_timeout``)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._own_http:
            self.http.close()

    def run_forever(self) -> None:
        while not self._stop.is_set():
            try:
                sent = self.run_once()
            except Exception:  # a database outage or a bug must not end delivery: the rows wait in the outbox
                log.exception("alert delivery: a pass failed; retrying")
                sent = 0
            if sent == 0:
                self._stop.wait(self.settings.alert_delivery_poll)

    # -- one pass
    def run_once(self) -> int:
        """Attempt every delivery due now (up to :data:`BATCH`); how many attempts were made."""
        now = utcnow()
        w = Webhook
        d = AlertDelivery
        q = (select(d.id, d.attempts, d.channel, d.topic, d.body, d.webhook_id, w.url, w.secret, w.disabled_at)
             .outerjoin(w, w.id == d.webhook_id).where(d.state == "pending", d.next_attempt_at <= now)
             .order_by(d.next_attempt_at, d.id).limit(BATCH))
        with self.sessions() as s:
            due = [_Due(r.id, r.attempts, r.channel, r.topic, r.body, r.webhook_id, r.url, r.secret,
                        r.disabled_at is not None) for r in s.execute(q)]
        made = 0
        for item in due:
            if self._stop.is_set():
                break
            if item.channel == "mqtt" and self.publish is None:
                self._close(item.id, "skipped", None, "no MQTT broker configured (mqtt_url)")
                continue
            if item.channel == "webhook" and (item.disabled or item.url is None):
                self._close(item.id, "skipped", None, "the webhook is disabled")
                continue
            attempt = item.attempts + 1
            if not self._claim(item, attempt):
                continue  # another worker took this attempt
            made += 1
            outcome = self._send(item, attempt)
            self._record(item, attempt, outcome)
        return made

    def _claim(self, item: _Due, attempt: int) -> bool:
        s_ = self.settings
        now = utcnow()
        # Not due again before the attempt has surely ended (twice its timeout) and its back-off passed.
        hold = 2 * s_.alert_webhook_timeout + backoff(attempt, s_.alert_delivery_backoff, s_.alert_delivery_backoff_max)
        d = AlertDelivery
        with self.sessions.begin() as s:
            result = s.execute(update(d).where(d.id == item.id, d.state == "pending", d.attempts == item.attempts)
                               .values(attempts=attempt, last_attempt_at=now,
                                       next_attempt_at=now + timedelta(seconds=hold))
                               .execution_options(synchronize_session=False))
            return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    def _send(self, item: _Due, attempt: int) -> _Outcome:
        body = item.body.encode()
        if item.channel == "mqtt":
            assert self.publish is not None and item.topic is not None
            try:
                ok = self.publish(item.topic, body, self.settings.alert_webhook_timeout)
            except Exception as e:  # a publisher must not end delivery
                return _Outcome(False, error=f"publish failed: {type(e).__name__}: {e}"[:300])
            return _Outcome(True) if ok else _Outcome(False, error="the broker is not connected or did not "
                                                                     "acknowledge (PUBACK)")
        assert item.url is not None and item.secret is not None
        ts = int(time.time())
        headers = {
            "content-type": "application/json",
            "webhook-id": item.id,
            "webhook-timestamp": str(ts),
            "webhook-signature": signature(item.secret, item.id, ts, body),
            ATTEMPT_HEADER: str(attempt),
        }
        try:
            with self.http.stream("POST", item.url, content=body, headers=headers) as r:
                status = r.status_code
                retry_after = _retry_after(r.headers.get("retry-after")) if status in (429, 503) else None
        except httpx.HTTPError as e:
            return _Outcome(False, error=f"{type(e).__name__}: {' '.join(str(e).split())}"[:300])
        if 200 <= status < 300:
            return _Outcome(True, status)
        return _Outcome(False, status, f"HTTP {status}", retry_after, gone=status == 410)

    def _record(self, item: _Due, attempt: int, o: _Outcome) -> None:
        s_ = self.settings
        now = utcnow()
        d = AlertDelivery
        where = [d.id == item.id, d.state == "pending"]
        with self.sessions.begin() as s:
            if o.ok:
                s.execute(update(d).where(*where).values(state="delivered", done_at=now, last_status=o.status,
                                                         last_error=None).execution_options(synchronize_session=False))
                log.info("alert delivery %s (%s%s): delivered at attempt %d", item.id, item.channel,
                         f" {item.webhook_id}" if item.webhook_id else "", attempt)
                return
            final = o.gone or attempt >= s_.alert_delivery_attempts
            values: dict[str, Any] = {"last_status": o.status, "last_error": o.error}
            if final:
                values.update(state="failed", done_at=now)
            else:
                wait = backoff(attempt, s_.alert_delivery_backoff, s_.alert_delivery_backoff_max)
                if o.retry_after is not None:
                    wait = min(s_.alert_delivery_backoff_max, max(wait, o.retry_after))
                values["next_attempt_at"] = now + timedelta(seconds=wait)
            s.execute(update(d).where(*where, d.attempts == attempt).values(**values)
                      .execution_options(synchronize_session=False))
            if o.gone and item.webhook_id is not None:
                s.execute(update(Webhook).where(Webhook.id == item.webhook_id, Webhook.disabled_at.is_(None))
                          .values(disabled_at=now).execution_options(synchronize_session=False))
        log.warning("alert delivery %s (%s%s): attempt %d failed: %s%s", item.id, item.channel,
                    f" {item.webhook_id}" if item.webhook_id else "", attempt, o.error,
                    "; webhook disabled (410 Gone)" if o.gone else "; giving up" if final else "; will retry")

    def _close(self, delivery_id: str, state: str, status: int | None, error: str) -> None:
        d = AlertDelivery
        with self.sessions.begin() as s:
            s.execute(update(d).where(d.id == delivery_id, d.state == "pending")
                      .values(state=state, done_at=utcnow(), last_status=status, last_error=error)
                      .execution_options(synchronize_session=False))
