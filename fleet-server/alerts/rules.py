"""Thresholds on drift and live accuracy, and :func:`evaluate`, which turns one stored telemetry
``models[]`` entry into alerts, in the caller's (the ingester's) transaction.

**Where thresholds come from**, field by field, first found wins: the operator's rule for the model
(``PUT /api/v1/models/{name}/alert-rules``, every version), then the version's bundle manifest
(``metadata`` keys :data:`MANIFEST_PREFIX` + field name, e.g. ``"edgefleet.alert.drift_psi_max":
"0.25"``: the manifest has no field of its own for them), then :data:`DEFAULT_MIN_SAMPLES` and
:data:`DEFAULT_COOLDOWN`. Drift and accuracy thresholds have no default: no threshold, no alert.

**What breaks a threshold** (:func:`check`, pure): ``drift.psi_max`` above ``drift_psi_max``, or
``drift.mean_shift_max`` above ``drift_mean_shift_max`` (one ``drift`` alert either way), each only
when the report's ``drift.samples`` is at least ``min_samples`` (PSI over a handful of inputs is
noise); ``accuracy.accuracy`` below ``accuracy_min`` with ``accuracy.window`` at least
``min_samples`` (an ``accuracy`` alert).

**Fleet-level alerts.** An alert is per (model, version, kind) over the whole fleet, not per device:
retraining is per model, so a pipeline must be started once, not once per device of a thousand. The
device whose report raised it is named, and every device that breaks the threshold while the alert is
open is recorded (``alert_devices``), so "one camera in the fleet" and "every device" stay apart.

**Once per cooldown.** While an alert for the key is open, further breaches only add to it
(``occurrences``, ``worst``, devices): no second alert, no second notification. Once acknowledged, a
breach raises a new alert only if the last one was raised more than ``cooldown_s`` ago. The open one
is unique in the database (a partial unique index), so replicas ingesting at once cannot raise two.

Thresholds are cached per process for :data:`RULES_TTL` seconds (the ingester calls :func:`evaluate`
for every entry, thousands a second); a change through the API clears the cache of the process that
took it at once, other replicas within :data:`RULES_TTL`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import case, func, select, text, update
from sqlalchemy.orm import Session

from edgefleet.server.alerts.webhooks import enqueue
from edgefleet.server.models import Alert, AlertDevice, AlertRule, ModelVersion, upsert_insert, utcnow

if TYPE_CHECKING:  # not at run time: the ingester's store imports this module (no import cycle)
    from edgefleet.server.telemetry.payloads import ModelFigures

__all__ = [
    "DEFAULT_COOLDOWN",
    "DEFAULT_MIN_SAMPLES",
    "KINDS",
    "MANIFEST_PREFIX",
    "RULES_TTL",
    "Breach",
    "Rule",
    "check",
    "effective_rule",
    "evaluate",
    "invalidate",
    "rule_from",
]

log = logging.getLogger(__name__)

DEFAULT_MIN_SAMPLES = 100  # drift samples / accuracy window a report needs before it is judged
DEFAULT_COOLDOWN = 3600  # s: no new alert of a (model, version, kind) within this of the last one raised
MANIFEST_PREFIX = "edgefleet.alert."  # manifest metadata keys: edgefleet.alert.drift_psi_max = "0.25", ...
RULES_TTL = 5.0  # s a process keeps a model version's thresholds before reading them again
KINDS = ("drift", "accuracy")
THRESHOLDS = ("drift_psi_max", "drift_mean_shift_max", "accuracy_min")
_CACHE_MAX = 4096  # cached (database, model, version) entries; all dropped when full
_OPEN = text("state = 'open'")  # the partial unique index's predicate, as SQLite needs it spelled


@dataclass(frozen=True)
class Rule:
    """The thresholds applied to one model version (None: that check is off)."""

    drift_psi_max: float | None = None
    drift_mean_shift_max: float | None = None
    accuracy_min: float | None = None
    min_samples: int = DEFAULT_MIN_SAMPLES
    cooldown_s: int = DEFAULT_COOLDOWN

    @property
    def active(self) -> bool:
        return any(getattr(self, f) is not None for f in THRESHOLDS)


@dataclass(frozen=True)
class Breach:
    """A threshold one report broke: ``kind`` drift|accuracy, ``metric`` the figure, its ``value``, and
    whether a higher value is worse (drift) or a lower one (accuracy)."""

    kind: str
    metric: str
    value: float
    threshold: float
    higher_is_worse: bool


def _number(raw: Any, field: str, integer: bool, where: str) -> float | int | None:
    if raw is None:
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value < 0 or (integer and value != int(value)):
        log.warning("alerts: %s: %s%s = %r is not a %s; ignored", where, MANIFEST_PREFIX, field, raw,
                    "whole number >= 0" if integer else "number >= 0")
        return None
    return int(value) if integer else value


def rule_from(row: AlertRule | None, metadata: dict[str, Any] | None, where: str = "manifest") -> Rule:
    """The thresholds for a version: the operator's ``row`` field by field, else the manifest's
    ``metadata`` (:data:`MANIFEST_PREFIX` keys; a value that is not a number is logged and ignored),
    else the defaults. Pure."""
    meta = metadata or {}
    values: dict[str, Any] = {}
    for field in (*THRESHOLDS, "min_samples", "cooldown_s"):
        value = getattr(row, field) if row is not None else None
        if value is None:
            value = _number(meta.get(MANIFEST_PREFIX + field), field, field in ("min_samples", "cooldown_s"), where)
        if value is not None:
            values[field] = value
    return Rule(**values)


def check(rule: Rule, figures: ModelFigures) -> list[Breach]:
    """The thresholds ``figures`` (one telemetry ``models[]`` entry) breaks: at most one drift breach
    (PSI checked first) and one accuracy breach. Pure."""
    out: list[Breach] = []
    d = figures.drift
    if d is not None and d.samples >= rule.min_samples:
        if rule.drift_psi_max is not None and d.psi_max is not None and d.psi_max > rule.drift_psi_max:
            out.append(Breach("drift", "psi_max", d.psi_max, rule.drift_psi_max, True))
        elif (rule.drift_mean_shift_max is not None and d.mean_shift_max is not None
              and d.mean_shift_max > rule.drift_mean_shift_max):
            out.append(Breach("drift", "mean_shift_max", d.mean_shift_max, rule.drift_mean_shift_max, True))
    a = figures.accuracy
    if (rule.accuracy_min is not None and a is not None and a.accuracy is not None and a.window >= rule.min_samples
            and a.accuracy < rule.accuracy_min):
        out.append(Breach("accuracy", "accuracy", a.accuracy, rule.accuracy_min, False))
    return out


_cache: dict[tuple[Any, str, str], tuple[float, Rule]] = {}
_cache_lock = threading.Lock()


def invalidate(model: str | None = None) -> None:
    """Forget the cached thresholds of ``model`` (every model when None), in this process."""
    with _cache_lock:
        for key in [k for k in _cache if model is None or k[1] == model]:
            del _cache[key]


def effective_rule(s: Session, model: str, version: str) -> Rule:
    """The thresholds for ``model`` ``version`` (see the module docstring), cached :data:`RULES_TTL` s."""
    key = (s.get_bind().engine.url, model, version)
    now = time.monotonic()
    with _cache_lock:
        hit = _cache.get(key)
    if hit is not None and hit[0] > now:
        return hit[1]
    row = s.get(AlertRule, model)
    manifest = s.scalar(select(ModelVersion.manifest).where(ModelVersion.name == model,
                                                            ModelVersion.version == version))
    metadata = manifest.get("metadata") if isinstance(manifest, dict) else None
    rule = rule_from(row, metadata if isinstance(metadata, dict) else None, f"{model} {version}")
    with _cache_lock:
        if len(_cache) >= _CACHE_MAX:
            _cache.clear()
        _cache[key] = (now + RULES_TTL, rule)
    return rule


def evaluate(s: Session, device_id: str, model: str, version: str, figures: ModelFigures,
             now: datetime | None = None) -> list[int]:
    """Judge one stored telemetry entry of ``device_id`` against ``model`` ``version``'s thresholds,
    in the caller's transaction (nothing is committed here): raise a new alert, with its webhook and
    MQTT deliveries queued in the outbox, or add to the open one (see the module docstring). Call it
    once per *newly stored* message, so a redelivered one adds nothing. Returns the ids of the alerts
    raised (usually none). Raises what SQLAlchemy raises."""
    rule = effective_rule(s, model, version)
    if not rule.active:
        return []
    breaches = check(rule, figures)
    if not breaches:
        return []
    at = now or utcnow()
    raised: list[int] = []
    for b in breaches:
        alert_id = _raise(s, rule, b, device_id, model, version, figures, at)
        if alert_id is not None:
            raised.append(alert_id)
    return raised


def _key(model: str, version: str, kind: str) -> list[Any]:
    return [Alert.model == model, Alert.version == version, Alert.kind == kind]


def _add_to_open(s: Session, b: Breach, device_id: str, model: str, version: str, at: datetime) -> int | None:
    """Count the breach into the open alert of its key; its id, or None when none is open."""
    worse = Alert.worst < b.value if b.higher_is_worse else Alert.worst > b.value
    stmt = (update(Alert).where(*_key(model, version, b.kind), Alert.state == "open")
            .values(occurrences=Alert.occurrences + 1, last_at=at, worst=case((worse, b.value), else_=Alert.worst))
            .returning(Alert.id).execution_options(synchronize_session=False))
    alert_id = s.execute(stmt).scalar()
    if alert_id is not None:
        _add_device(s, int(alert_id), device_id, at)
    return None if alert_id is None else int(alert_id)


def _add_device(s: Session, alert_id: int, device_id: str, at: datetime) -> None:
    s.execute(upsert_insert(s, AlertDevice).values(alert_id=alert_id, device_id=device_id, first_at=at)
              .on_conflict_do_nothing(index_elements=["alert_id", "device_id"]))


def _raise(s: Session, rule: Rule, b: Breach, device_id: str, model: str, version: str, figures: ModelFigures,
           at: datetime) -> int | None:
    """A new alert for the breach, or None when it went into an open one or the cooldown holds it."""
    if _add_to_open(s, b, device_id, model, version, at) is not None:
        return None
    last = s.scalar(select(func.max(Alert.raised_at)).where(*_key(model, version, b.kind)))
    if last is not None and at - last < timedelta(seconds=rule.cooldown_s):
        return None
    data = {
        "rule": asdict(rule),
        "drift": figures.drift.model_dump(mode="json") if figures.drift is not None else None,
        "accuracy": figures.accuracy.model_dump(mode="json") if figures.accuracy is not None else None,
        "inferences": figures.inferences,
        "errors": figures.errors,
    }
    stmt = (upsert_insert(s, Alert).values(
        model=model, version=version, kind=b.kind, state="open", metric=b.metric, value=b.value,
        threshold=b.threshold, worst=b.value, device_id=device_id, occurrences=1, raised_at=at, last_at=at,
        acked_at=None, acked_by=None, data=data)
        .on_conflict_do_nothing(index_elements=["model", "version", "kind"], index_where=_OPEN)
        .returning(Alert.id))
    alert_id = s.execute(stmt).scalar()
    if alert_id is None:  # another replica raised it a moment ago: count this report into it
        _add_to_open(s, b, device_id, model, version, at)
        return None
    _add_device(s, int(alert_id), device_id, at)
    alert = s.get(Alert, int(alert_id))
    assert alert is not None
    enqueue(s, alert, at)
    log.warning("alert %d raised: %s %s %s %s = %g (threshold %g), device %s", alert.id, model, version, b.kind,
                b.metric, b.value, b.threshold, device_id)
    return int(alert_id)
