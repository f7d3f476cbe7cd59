"""The alerts API: thresholds per model (operator), alerts listed (viewer) and acknowledged
(operator), webhooks (admin; the secret is in the creating response only).

- ``PUT /api/v1/models/{name}/alert-rules`` sets a model's thresholds; ``GET /api/v1/alert-rules``
  and ``GET /api/v1/alert-rules/{name}`` read them, ``DELETE /api/v1/alert-rules/{name}`` drops them
  (the manifests' then apply). (The reads are not under ``/models/{name}/...``: the registry's
  ``/models/{name}/{version}`` would take them.)
- ``GET /api/v1/alerts?state=open|acked&model=&limit=&before_id=`` newest first;
  ``GET /api/v1/alerts/{id}`` with its devices and deliveries; ``POST /api/v1/alerts/{id}/ack``
  (acknowledging an acknowledged alert changes nothing and answers the same).
- ``POST /api/v1/webhooks`` ``{url, description?, models?, secret?}``, ``GET /api/v1/webhooks``,
  ``DELETE /api/v1/webhooks/{id}`` (its deliveries go with it).
"""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Path, Query, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import delete, func, select

from edgefleet.server.alerts import rules
from edgefleet.server.alerts.webhooks import alert_data, new_secret, secret_key
from edgefleet.server.api.deps import Actor, SessionDep, StateDep, require
from edgefleet.server.api.schemas import MODEL_NAME
from edgefleet.server.errors import ApiError
from edgefleet.server.models import Alert, AlertDelivery, AlertDevice, AlertRule, ModelVersion, Webhook, utcnow
from edgefleet.server.state import audit

__all__ = ["router"]

router = APIRouter(prefix="/api/v1", tags=["alerts"])
ModelName = Annotated[str, Path(pattern=MODEL_NAME)]
AlertId = Annotated[int, Path(ge=1, le=2**31 - 1)]
WebhookId = Annotated[str, Path(pattern=r"^wh_[0-9a-f]{12}$")]
MAX_WEBHOOKS = 100
DEVICES_SHOWN = 100  # device ids in one alert's answer


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class AlertRulesIn(_In):
    """A model's thresholds; a field left out or null falls back to the version's manifest, then the
    default (see :mod:`edgefleet.server.alerts.rules`)."""

    drift_psi_max: float | None = Field(default=None, gt=0, le=1e6, description="alert above this drift.psi_max")
    drift_mean_shift_max: float | None = Field(default=None, gt=0, le=1e6,
                                               description="alert above this drift.mean_shift_max (std units)")
    accuracy_min: float | None = Field(default=None, gt=0, le=1, description="alert below this live accuracy")
    min_samples: int | None = Field(default=None, ge=1, le=10**9,
                                    description=f"drift samples / accuracy window needed (default "
                                    f"{rules.DEFAULT_MIN_SAMPLES})")
    cooldown_s: int | None = Field(default=None, ge=0, le=366 * 86400,
                                   description=f"no new alert of a kind within this of the last, s (default "
                                   f"{rules.DEFAULT_COOLDOWN})")


class AlertRulesOut(AlertRulesIn):
    model: str
    updated_at: datetime
    updated_by: str


class AlertOut(BaseModel):
    id: int
    model: str
    version: str
    kind: str = Field(description="drift | accuracy")
    state: str = Field(description="open | acked")
    metric: str = Field(description="the figure that broke the threshold: psi_max | mean_shift_max | accuracy")
    value: float
    threshold: float
    worst: float = Field(description="the highest drift or lowest accuracy reported while open")
    device_id: str = Field(description="the device whose report raised it")
    devices: int = Field(description="devices whose reports broke the threshold while it was open")
    occurrences: int
    raised_at: datetime
    last_at: datetime
    acked_at: datetime | None
    acked_by: str | None
    rule: dict[str, Any] | None
    drift: dict[str, Any] | None
    accuracy: dict[str, Any] | None


class DeliveryOut(BaseModel):
    id: str = Field(description="the webhook-id")
    channel: str
    webhook_id: str | None
    topic: str | None
    state: str = Field(description="pending | delivered | failed | skipped")
    attempts: int
    next_attempt_at: datetime | None
    last_attempt_at: datetime | None
    last_status: int | None
    last_error: str | None


class AlertDetailOut(AlertOut):
    device_ids: list[str] = Field(description=f"up to {DEVICES_SHOWN} of them")
    deliveries: list[DeliveryOut]


class WebhookIn(_In):
    url: str = Field(min_length=8, max_length=2048, description="http(s) URL the alerts are POSTed to")
    description: str = Field(default="", max_length=256)
    models: list[Annotated[str, Field(pattern=MODEL_NAME)]] = Field(
        default_factory=list, max_length=100, description="only these models' alerts (empty: every model)")
    secret: str | None = Field(default=None, max_length=128,
                               description="whsec_ + base64 of 24 to 64 bytes (default: made by the server)")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        try:
            parts.port  # noqa: B018 - raises for a port out of range
        except ValueError:
            raise ValueError("the port must be a number from 1 to 65535") from None
        if any(c.isspace() or ord(c) < 32 for c in v):
            raise ValueError("must not contain spaces or control characters")
        return v

    @field_validator("secret")
    @classmethod
    def _secret(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                secret_key(v)
            except ValueError as e:
                raise ValueError(str(e).removeprefix("secret: ")) from None
        return v


class WebhookOut(BaseModel):
    id: str
    url: str
    description: str
    models: list[str]
    created_at: datetime
    created_by: str
    disabled_at: datetime | None = Field(description="set when the receiver answered 410 Gone")
    pending: int = Field(description="deliveries waiting for an attempt")
    failed: int = Field(description="deliveries that gave up")
    secret: str | None = Field(default=None, description="the signing secret: in the creating response only")


# ---------------------------------------------------------------- rules


def _rules_out(r: AlertRule) -> AlertRulesOut:
    return AlertRulesOut(model=r.model, drift_psi_max=r.drift_psi_max, drift_mean_shift_max=r.drift_mean_shift_max,
                         accuracy_min=r.accuracy_min, min_samples=r.min_samples, cooldown_s=r.cooldown_s,
                         updated_at=r.updated_at, updated_by=r.updated_by)


@router.put("/models/{name}/alert-rules", response_model=AlertRulesOut)
def put_rules(name: ModelName, body: AlertRulesIn, state: StateDep,
              actor: Annotated[Actor, Depends(require("operator"))]) -> AlertRulesOut:
    """Set the thresholds of model ``name`` (every version), replacing what was set before."""
    with state.sessions.begin() as s:
        if s.scalar(select(ModelVersion.id).where(ModelVersion.name == name).limit(1)) is None:
            raise ApiError(404, f"name: no model {name!r} in the registry", "name")
        row = s.get(AlertRule, name)
        before = _rules_out(row).model_dump(mode="json", include=set(AlertRulesIn.model_fields)) if row else None
        if row is None:
            row = AlertRule(model=name, updated_at=utcnow(), updated_by=actor.label)
            s.add(row)
        for field, value in body.model_dump().items():
            setattr(row, field, value)
        row.updated_at, row.updated_by = utcnow(), actor.label
        audit(s, actor.label, "alert_rules.set", f"model:{name}", before, body.model_dump(mode="json"))
        out = _rules_out(row)
    rules.invalidate(name)
    return out


@router.get("/alert-rules", response_model=list[AlertRulesOut])
def list_rules(s: SessionDep, _: Annotated[Actor, Depends(require("viewer"))]) -> list[AlertRulesOut]:
    """Every model's thresholds set on the server (manifests' are in each version's manifest)."""
    return [_rules_out(r) for r in s.scalars(select(AlertRule).order_by(AlertRule.model))]


@router.get("/alert-rules/{name}", response_model=AlertRulesOut)
def get_rules(name: ModelName, s: SessionDep, _: Annotated[Actor, Depends(require("viewer"))]) -> AlertRulesOut:
    row = s.get(AlertRule, name)
    if row is None:
        raise ApiError(404, f"name: no alert rules set for {name!r}", "name")
    return _rules_out(row)


@router.delete("/alert-rules/{name}", status_code=204)
def delete_rules(name: ModelName, state: StateDep, actor: Annotated[Actor, Depends(require("operator"))]) -> Response:
    with state.sessions.begin() as s:
        row = s.get(AlertRule, name)
        if row is None:
            raise ApiError(404, f"name: no alert rules set for {name!r}", "name")
        audit(s, actor.label, "alert_rules.delete", f"model:{name}",
              _rules_out(row).model_dump(mode="json", include=set(AlertRulesIn.model_fields)), None)
        s.delete(row)
    rules.invalidate(name)
    return Response(status_code=204)


# ---------------------------------------------------------------- alerts


def _alert_out(a: Alert, devices: int) -> dict[str, Any]:
    data = alert_data(a)
    data.update(raised_at=a.raised_at, last_at=a.last_at, acked_at=a.acked_at, devices=devices)
    return data


def _device_counts(s: Any, ids: list[int]) -> dict[int, int]:
    if not ids:
        return {}
    q = (select(AlertDevice.alert_id, func.count()).where(AlertDevice.alert_id.in_(ids))
         .group_by(AlertDevice.alert_id))
    return {int(i): int(n) for i, n in s.execute(q)}


@router.get("/alerts", response_model=list[AlertOut])
def list_alerts(
    s: SessionDep,
    _: Annotated[Actor, Depends(require("viewer"))],
    state: Annotated[Literal["open", "acked"] | None, Query(description="open | acked (default: both)")] = None,
    model: Annotated[str | None, Query(pattern=MODEL_NAME)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    before_id: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
) -> list[dict[str, Any]]:
    """Alerts, newest first; page with ``before_id``."""
    q = select(Alert).order_by(Alert.id.desc()).limit(limit)
    if state is not None:
        q = q.where(Alert.state == state)
    if model is not None:
        q = q.where(Alert.model == model)
    if before_id is not None:
        q = q.where(Alert.id < before_id)
    found = list(s.scalars(q))
    counts = _device_counts(s, [a.id for a in found])
    return [_alert_out(a, counts.get(a.id, 0)) for a in found]


def _detail(s: Any, a: Alert) -> dict[str, Any]:
    out = _alert_out(a, _device_counts(s, [a.id]).get(a.id, 0))
    out["device_ids"] = list(s.scalars(select(AlertDevice.device_id).where(AlertDevice.alert_id == a.id)
                                       .order_by(AlertDevice.first_at, AlertDevice.device_id).limit(DEVICES_SHOWN)))
    d = AlertDelivery
    out["deliveries"] = [
        DeliveryOut(id=r.id, channel=r.channel, webhook_id=r.webhook_id, topic=r.topic, state=r.state,
                    attempts=r.attempts, next_attempt_at=r.next_attempt_at if r.state == "pending" else None,
                    last_attempt_at=r.last_attempt_at, last_status=r.last_status, last_error=r.last_error)
        for r in s.scalars(select(d).where(d.alert_id == a.id).order_by(d.channel, d.created_at, d.id))
    ]
    return out


@router.get("/alerts/{alert_id}", response_model=AlertDetailOut)
def get_alert(alert_id: AlertId, s: SessionDep, _: Annotated[Actor, Depends(require("viewer"))]) -> dict[str, Any]:
    """One alert, with the devices that broke its threshold and where it was delivered."""
    a = s.get(Alert, alert_id)
    if a is None:
        raise ApiError(404, f"alert_id: no alert {alert_id}", "alert_id")
    return _detail(s, a)


@router.post("/alerts/{alert_id}/ack", response_model=AlertDetailOut)
def ack_alert(alert_id: AlertId, state: StateDep, actor: Annotated[Actor, Depends(require("operator"))]
              ) -> dict[str, Any]:
    """Acknowledge an alert: it is no longer open, so the next breach after the cooldown raises a new
    one. Acknowledging it again changes nothing."""
    with state.sessions.begin() as s:
        a = s.get(Alert, alert_id, with_for_update=True)
        if a is None:
            raise ApiError(404, f"alert_id: no alert {alert_id}", "alert_id")
        if a.state == "open":
            a.state, a.acked_at, a.acked_by = "acked", utcnow(), actor.label
            audit(s, actor.label, "alert.ack", f"alert:{alert_id}", {"state": "open"}, {"state": "acked"})
            s.flush()
        return _detail(s, a)


# ---------------------------------------------------------------- webhooks


def _shown_url(url: str) -> str:
    """What the audit log keeps of a webhook URL: scheme, host and port (paths and queries often carry
    a receiver's own token)."""
    p = urlsplit(url)
    return f"{p.scheme}://{p.hostname}{f':{p.port}' if p.port else ''}/..."


def _webhook_out(s: Any, w: Webhook, secret: str | None = None) -> WebhookOut:
    d = AlertDelivery
    q = (select(d.state, func.count()).where(d.webhook_id == w.id, d.state.in_(("pending", "failed")))
         .group_by(d.state))
    counts = dict(s.execute(q).all())
    return WebhookOut(id=w.id, url=w.url, description=w.description, models=list(w.models), created_at=w.created_at,
                      created_by=w.created_by, disabled_at=w.disabled_at, pending=int(counts.get("pending", 0)),
                      failed=int(counts.get("failed", 0)), secret=secret)


@router.post("/webhooks", status_code=201, response_model=WebhookOut)
def create_webhook(body: WebhookIn, state: StateDep, actor: Annotated[Actor, Depends(require("admin"))]) -> WebhookOut:
    """Add a webhook; its signing secret is in this response only (it cannot be read back)."""
    secret = body.secret or new_secret()
    with state.sessions.begin() as s:
        if (s.scalar(select(func.count()).select_from(Webhook)) or 0) >= MAX_WEBHOOKS:
            raise ApiError(409, f"url: at most {MAX_WEBHOOKS} webhooks; remove one first", "url")
        w = Webhook(id=f"wh_{secrets.token_hex(6)}", url=body.url, secret=secret, models=sorted(set(body.models)),
                    description=body.description, created_at=utcnow(), created_by=actor.label, disabled_at=None)
        s.add(w)
        s.flush()
        audit(s, actor.label, "webhook.create", f"webhook:{w.id}", None,
              {"url": _shown_url(w.url), "models": w.models})
        return _webhook_out(s, w, secret)


@router.get("/webhooks", response_model=list[WebhookOut])
def list_webhooks(s: SessionDep, _: Annotated[Actor, Depends(require("admin"))]) -> list[WebhookOut]:
    """Every webhook, with its pending and failed deliveries (never the secret)."""
    return [_webhook_out(s, w) for w in s.scalars(select(Webhook).order_by(Webhook.created_at, Webhook.id))]


@router.delete("/webhooks/{webhook_id}", status_code=204)
def delete_webhook(webhook_id: WebhookId, state: StateDep, actor: Annotated[Actor, Depends(require("admin"))]
                   ) -> Response:
    """Remove a webhook and its deliveries (those still pending are never sent)."""
    with state.sessions.begin() as s:
        w = s.get(Webhook, webhook_id)
        if w is None:
            raise ApiError(404, f"webhook_id: no webhook {webhook_id}", "webhook_id")
        s.execute(delete(AlertDelivery).where(AlertDelivery.webhook_id == webhook_id)
                  .execution_options(synchronize_session=False))
        audit(s, actor.label, "webhook.delete", f"webhook:{webhook_id}",
              {"url": _shown_url(w.url), "models": list(w.models)}, None)
        s.delete(w)
    return Response(status_code=204)
