"""Telemetry rollups: per device / model / version sums over fixed windows of :data:`WINDOW` seconds,
upserted as messages arrive, read back merged over any multiple of the window, and deleted past
their retention.

- **Exact merging.** A rollup row holds sums (inferences, errors, latency seconds, and one count per
  latency bucket: the bounds are the fixed :data:`~edgefleet.server.telemetry.payloads.BOUNDS`), maxima
  (drift PSI, mean shift, std ratio) and weighted sums (PSI mean by samples, accuracy by its window).
  Every one of them merges associatively, so rows of many devices or many windows combine exactly, and
  the merge runs inside the upsert itself (``SET x = x + excluded.x``): no read-modify-write, so
  replicas writing the same row at once cannot lose an update. Percentiles are read from the merged
  histogram by :func:`quantile` (linear inside the bucket, as Prometheus' ``histogram_quantile``).
- **The window** of a message is the one its ``at`` falls in (the device's clock: store-and-forward
  messages land where they were measured); an ``at`` more than :data:`MAX_FUTURE` ahead of the server's
  clock is taken as the arrival time instead.
- **Shadow comparisons** (a candidate run beside the served version) are summed per device, model,
  served version, candidate and window into :class:`~edgefleet.server.models.TelemetryShadowRollup`
  (counts and the absolute-difference sum add), which the rollout gates read.
- **Accuracy** is a mean of the devices' sliding-window accuracies weighted by their window sizes;
  per-class precision and recall are not merged (they cannot be without the confusion counts).

:func:`accumulate` is pure; :func:`upsert` writes; :func:`model_series`, :func:`device_series` read;
:func:`retention` deletes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, case, delete, func, literal, select
from sqlalchemy.orm import Session

from edgefleet.server.models import (
    LATENCY_BUCKETS,
    TelemetryClassRollup,
    TelemetryDeviceRollup,
    TelemetryMessage,
    TelemetryRollup,
    TelemetryShadowRollup,
    TelemetryStream,
    upsert_insert,
)
from edgefleet.server.telemetry.payloads import BOUNDS, TelemetryIn

__all__ = [
    "MAX_FUTURE",
    "WINDOW",
    "RollupBatch",
    "accumulate",
    "bucket_of",
    "device_figures",
    "device_series",
    "fleet_snapshot",
    "model_series",
    "quantile",
    "retention",
    "upsert",
]

WINDOW = 60  # s: the rollup window; fixed (rows already stored are in windows of this size)
MAX_FUTURE = timedelta(minutes=5)  # an ``at`` further ahead than this is a wrong clock: the arrival time is used
LAT_COLUMNS = tuple(f"lat{i:02d}" for i in range(LATENCY_BUCKETS))
assert len(BOUNDS) + 1 == LATENCY_BUCKETS, "models.LATENCY_BUCKETS must be len(BOUNDS) + 1"
QUANTILES = {"p50_s": 0.50, "p95_s": 0.95, "p99_s": 0.99}


def bucket_of(at: datetime, received_at: datetime) -> int:
    """The start (Unix seconds) of the window a message measured at ``at`` and received at
    ``received_at`` is summed into."""
    t = at if at <= received_at + MAX_FUTURE else received_at
    ts = int(t.timestamp())
    return ts - ts % WINDOW


def quantile(counts: Sequence[int], q: float, bounds: Sequence[float] = BOUNDS) -> float | None:
    """The ``q`` quantile (0..1) of a histogram with ``counts[i]`` calls in (bounds[i-1], bounds[i]] and
    the last count above ``bounds[-1]``: linear interpolation inside the bucket holding rank q*total
    (from 0 for the first bucket); ``bounds[-1]`` when that is the overflow bucket; None when empty."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    cumulative = 0
    for i, c in enumerate(counts):
        if c > 0 and cumulative + c >= rank:
            if i >= len(bounds):
                return float(bounds[-1])
            lo, hi = (0.0 if i == 0 else float(bounds[i - 1])), float(bounds[i])
            fraction = (rank - cumulative) / c
            return hi if fraction >= 1.0 else lo + (hi - lo) * fraction  # a bucket's top is its bound exactly
        cumulative += c
    return float(bounds[-1])


N = TypeVar("N", int, float)


def _max(a: N | None, b: N | None) -> N | None:
    if a is None:
        return b
    if b is None:
        return a
    return a if a >= b else b


def _min(a: N | None, b: N | None) -> N | None:
    if a is None:
        return b
    if b is None:
        return a
    return a if a <= b else b


@dataclass
class _ModelAcc:
    reports: int = 0
    inferences: int = 0
    errors: int = 0
    latency_sum: float = 0.0
    lat: list[int] = field(default_factory=lambda: [0] * LATENCY_BUCKETS)
    drift_reports: int = 0
    drift_samples: int = 0
    psi_max: float | None = None
    psi_mean_wsum: float = 0.0
    mean_shift_max: float | None = None
    std_ratio_max: float | None = None
    accuracy_wsum: float = 0.0
    accuracy_window: int = 0
    classes: Counter[str] = field(default_factory=Counter)


@dataclass
class _DeviceAcc:
    reports: int = 0
    cpu_percent_sum: float = 0.0
    cpu_percent_max: float | None = None
    memory_rss_max: int | None = None
    memory_percent_max: float | None = None
    temperature_max: float | None = None
    disk_free_min: int | None = None
    queue_depth_max: int | None = None
    dropped_max: int | None = None
    uptime_max: float | None = None


@dataclass
class _ShadowAcc:
    compared: int = 0
    agreed: int = 0
    skipped: int = 0
    abs_error_sum: float = 0.0


@dataclass
class RollupBatch:
    """What a batch of telemetry adds, keyed by (device, model, version, bucket), (device, bucket) and,
    for shadow comparisons, (device, model, served version, candidate, bucket)."""

    models: dict[tuple[str, str, str, int], _ModelAcc] = field(default_factory=dict)
    devices: dict[tuple[str, int], _DeviceAcc] = field(default_factory=dict)
    shadows: dict[tuple[str, str, str, str, int], _ShadowAcc] = field(default_factory=dict)


def accumulate(messages: Iterable[TelemetryIn], received_at: datetime) -> RollupBatch:
    """Sum telemetry messages into their windows (pure)."""
    out = RollupBatch()
    for t in messages:
        b = bucket_of(t.at, received_at)
        for m in t.models:
            acc = out.models.setdefault((t.device_id, m.name, m.version, b), _ModelAcc())
            acc.reports += 1
            acc.inferences += m.inferences
            acc.errors += m.errors
            acc.latency_sum += m.latency.sum_s
            for i, c in enumerate(m.latency.counts):
                acc.lat[i] += c
            if m.drift is not None:
                d = m.drift
                acc.drift_reports += 1
                acc.drift_samples += d.samples
                acc.psi_max = _max(acc.psi_max, d.psi_max)
                acc.psi_mean_wsum += (d.psi_mean or 0.0) * d.samples
                acc.mean_shift_max = _max(acc.mean_shift_max, d.mean_shift_max)
                acc.std_ratio_max = _max(acc.std_ratio_max, d.std_ratio_max)
            if m.accuracy is not None and m.accuracy.accuracy is not None and m.accuracy.window > 0:
                acc.accuracy_wsum += m.accuracy.accuracy * m.accuracy.window
                acc.accuracy_window += m.accuracy.window
            acc.classes.update(m.classes)
            if m.shadow is not None:
                sh = out.shadows.setdefault((t.device_id, m.name, m.version, m.shadow.version, b), _ShadowAcc())
                sh.compared += m.shadow.compared
                sh.agreed += m.shadow.agreed
                sh.skipped += m.shadow.skipped
                sh.abs_error_sum += m.shadow.abs_error_sum
        dv = t.device
        dacc = out.devices.setdefault((t.device_id, b), _DeviceAcc())
        dacc.reports += 1
        dacc.cpu_percent_sum += dv.cpu_percent or 0.0
        dacc.cpu_percent_max = _max(dacc.cpu_percent_max, dv.cpu_percent)
        dacc.memory_rss_max = _max(dacc.memory_rss_max, dv.memory_rss_bytes)
        dacc.memory_percent_max = _max(dacc.memory_percent_max, dv.memory_percent)
        dacc.temperature_max = _max(dacc.temperature_max, dv.temperature_c)
        dacc.disk_free_min = _min(dacc.disk_free_min, dv.disk_free_bytes)
        dacc.queue_depth_max = _max(dacc.queue_depth_max, dv.queue_depth)
        dacc.dropped_max = _max(dacc.dropped_max, dv.dropped)
        dacc.uptime_max = _max(dacc.uptime_max, dv.uptime_s)
    return out


# -- writing ---------------------------------------------------------------------------------------------


def _sql_max(old: Any, new: Any) -> ColumnElement[Any]:
    """max(old, new) ignoring NULLs, in SQL both databases speak."""
    return case((old.is_(None), new), (new.is_(None), old), (old >= new, old), else_=new)


def _sql_min(old: Any, new: Any) -> ColumnElement[Any]:
    return case((old.is_(None), new), (new.is_(None), old), (old <= new, old), else_=new)


_SUMS = ("reports", "inferences", "errors", "latency_sum", *LAT_COLUMNS, "drift_reports", "drift_samples",
         "psi_mean_wsum", "accuracy_wsum", "accuracy_window")
_MAXES = ("psi_max", "mean_shift_max", "std_ratio_max")
_SHADOW_SUMS = ("compared", "agreed", "skipped", "abs_error_sum")
_DEVICE_MAXES = ("cpu_percent_max", "memory_rss_max", "memory_percent_max", "temperature_max", "queue_depth_max",
                 "dropped_max", "uptime_max")


def upsert(s: Session, batch: RollupBatch) -> None:
    """Add ``batch`` to the stored rollups, in the caller's transaction: one INSERT ... ON CONFLICT DO
    UPDATE per table, rows in key order (replicas lock rows in the same order: no deadlock)."""
    if batch.models:
        rows, class_rows = [], []
        for (dev, model, version, b), acc in sorted(batch.models.items()):
            key = {"device_id": dev, "model": model, "version": version, "bucket": b}
            row: dict[str, Any] = {**key, "reports": acc.reports, "inferences": acc.inferences, "errors": acc.errors,
                                   "latency_sum": acc.latency_sum, "drift_reports": acc.drift_reports,
                                   "drift_samples": acc.drift_samples, "psi_max": acc.psi_max,
                                   "psi_mean_wsum": acc.psi_mean_wsum, "mean_shift_max": acc.mean_shift_max,
                                   "std_ratio_max": acc.std_ratio_max, "accuracy_wsum": acc.accuracy_wsum,
                                   "accuracy_window": acc.accuracy_window}
            row.update(zip(LAT_COLUMNS, acc.lat, strict=True))
            rows.append(row)
            class_rows += [{**key, "label": label, "count": n} for label, n in sorted(acc.classes.items())]
        ins = upsert_insert(s, TelemetryRollup)
        t = TelemetryRollup.__table__.c
        set_: dict[str, Any] = {c: t[c] + ins.excluded[c] for c in _SUMS}
        set_.update({c: _sql_max(t[c], ins.excluded[c]) for c in _MAXES})
        conn = s.connection()  # Core executemany: the ORM's bulk path costs more than the statement here
        conn.execute(ins.on_conflict_do_update(index_elements=["device_id", "model", "version", "bucket"], set_=set_),
                     rows)
        if class_rows:
            cins = upsert_insert(s, TelemetryClassRollup)
            ct = TelemetryClassRollup.__table__.c
            conn.execute(cins.on_conflict_do_update(index_elements=["device_id", "model", "version", "bucket", "label"],
                                                 set_={"count": ct["count"] + cins.excluded["count"]}), class_rows)
    if batch.devices:
        drows = [{"device_id": dev, "bucket": b, **vars(acc)} for (dev, b), acc in sorted(batch.devices.items())]
        dins = upsert_insert(s, TelemetryDeviceRollup)
        dt = TelemetryDeviceRollup.__table__.c
        dset: dict[str, Any] = {c: dt[c] + dins.excluded[c] for c in ("reports", "cpu_percent_sum")}
        dset.update({c: _sql_max(dt[c], dins.excluded[c]) for c in _DEVICE_MAXES})
        dset["disk_free_min"] = _sql_min(dt["disk_free_min"], dins.excluded["disk_free_min"])
        s.connection().execute(dins.on_conflict_do_update(index_elements=["device_id", "bucket"], set_=dset), drows)
    if batch.shadows:
        srows = [{"device_id": dev, "model": model, "version": version, "candidate": cand, "bucket": b, **vars(acc)}
                 for (dev, model, version, cand, b), acc in sorted(batch.shadows.items())]
        sins = upsert_insert(s, TelemetryShadowRollup)
        st = TelemetryShadowRollup.__table__.c
        sset = {c: st[c] + sins.excluded[c] for c in _SHADOW_SUMS}
        s.connection().execute(sins.on_conflict_do_update(
            index_elements=["device_id", "model", "version", "candidate", "bucket"], set_=sset), srows)


# -- reading ---------------------------------------------------------------------------------------------


def _aggregates(step: int) -> list[Any]:
    r = TelemetryRollup
    t = (r.bucket - r.bucket % literal(step)).label("ts")
    cols: list[Any] = [t]
    cols += [func.sum(getattr(r, c)).label(c) for c in _SUMS]
    cols += [func.max(getattr(r, c)).label(c) for c in _MAXES]
    return cols


def _point(row: Any, classes: dict[str, int]) -> dict[str, Any]:
    counts = [int(getattr(row, c) or 0) for c in LAT_COLUMNS]
    inferences, errors = int(row.inferences or 0), int(row.errors or 0)
    latency: dict[str, Any] = {"counts": counts, "sum_s": float(row.latency_sum or 0.0)}
    latency.update({name: quantile(counts, q) for name, q in QUANTILES.items()})
    drift = None
    if row.drift_reports:
        samples = int(row.drift_samples or 0)
        drift = {"reports": int(row.drift_reports), "samples": samples, "psi_max": row.psi_max,
                 "psi_mean": float(row.psi_mean_wsum) / samples if samples else None,
                 "mean_shift_max": row.mean_shift_max, "std_ratio_max": row.std_ratio_max}
    window = int(row.accuracy_window or 0)
    accuracy = {"window": window, "accuracy": float(row.accuracy_wsum) / window} if window else None
    calls = inferences  # the agent counts failed runtime calls among its inferences (docs/telemetry.md)
    return {
        "t": int(row.ts), "at": datetime.fromtimestamp(int(row.ts), tz=UTC),
        "reports": int(row.reports or 0), "inferences": inferences, "errors": errors,
        "error_rate": errors / calls if calls else None, "latency": latency, "drift": drift,
        "classes": classes, "accuracy": accuracy,
    }


def _classes(s: Session, step: int, where: list[Any], by_model: bool) -> dict[tuple[Any, ...], dict[str, int]]:
    c = TelemetryClassRollup
    t = (c.bucket - c.bucket % literal(step)).label("ts")
    keys: list[Any] = [c.model, c.version] if by_model else []
    q = select(*keys, t, c.label, func.sum(c.count).label("n")).where(*where).group_by(*keys, t, c.label)
    out: dict[tuple[Any, ...], dict[str, int]] = {}
    for row in s.execute(q):
        key = (row.model, row.version, int(row.ts)) if by_model else (int(row.ts),)
        out.setdefault(key, {})[row.label] = int(row.n)
    return out


def model_series(s: Session, model: str, version: str, since: int, until: int, step: int) -> list[dict[str, Any]]:
    """The points of one model version over every device, windows from ``since`` (inclusive) to ``until``
    (exclusive), merged per ``step`` seconds (a multiple of :data:`WINDOW`); each point also counts the
    devices that reported in it. Sparse: steps with no report have no point."""
    r = TelemetryRollup
    where = [r.model == model, r.version == version, r.bucket >= since, r.bucket < until]
    q = select(*_aggregates(step), func.count(func.distinct(r.device_id)).label("devices")).where(*where)
    rows = s.execute(q.group_by("ts").order_by("ts")).all()
    c = TelemetryClassRollup
    classes = _classes(s, step, [c.model == model, c.version == version, c.bucket >= since, c.bucket < until], False)
    return [{**_point(row, classes.get((int(row.ts),), {})), "devices": int(row.devices)} for row in rows]


def device_series(s: Session, device_id: str, since: int, until: int, step: int) -> list[dict[str, Any]]:
    """Per model and version the device served, its points (as :func:`model_series`, one device)."""
    r = TelemetryRollup
    where = [r.device_id == device_id, r.bucket >= since, r.bucket < until]
    q = select(r.model, r.version, *_aggregates(step)).where(*where)
    rows = s.execute(q.group_by(r.model, r.version, "ts").order_by(r.model, r.version, "ts")).all()
    c = TelemetryClassRollup
    classes = _classes(s, step, [c.device_id == device_id, c.bucket >= since, c.bucket < until], True)
    series: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        point = _point(row, classes.get((row.model, row.version, int(row.ts)), {}))
        series.setdefault((row.model, row.version), []).append(point)
    return [{"model": m, "version": v, "points": pts} for (m, v), pts in series.items()]


def device_figures(s: Session, device_id: str, since: int, until: int, step: int) -> list[dict[str, Any]]:
    """The device block over time: CPU mean and max, memory, temperature max, disk free min, queue depth
    and dropped max, uptime, per ``step``."""
    d = TelemetryDeviceRollup
    t = (d.bucket - d.bucket % literal(step)).label("ts")
    q = select(t, func.sum(d.reports).label("reports"), func.sum(d.cpu_percent_sum).label("cpu_sum"),
               *(func.max(getattr(d, c)).label(c) for c in _DEVICE_MAXES),
               func.min(d.disk_free_min).label("disk_free_min"))
    q = q.where(d.device_id == device_id, d.bucket >= since, d.bucket < until).group_by("ts").order_by("ts")
    out = []
    for row in s.execute(q):
        reports = int(row.reports or 0)
        out.append({
            "t": int(row.ts), "at": datetime.fromtimestamp(int(row.ts), tz=UTC),
            "reports": reports, "cpu_percent_mean": float(row.cpu_sum) / reports if reports else None,
            "cpu_percent_max": row.cpu_percent_max, "memory_rss_bytes_max": row.memory_rss_max,
            "memory_percent_max": row.memory_percent_max, "temperature_c_max": row.temperature_max,
            "disk_free_bytes_min": row.disk_free_min, "queue_depth_max": row.queue_depth_max,
            "dropped_max": row.dropped_max, "uptime_s_max": row.uptime_max,
        })
    return out


# -- retention -------------------------------------------------------------------------------------------

_RETENTION_CHUNK = timedelta(hours=1)  # one DELETE removes at most this much arrival time of messages


def retention(s: Session, now: datetime, raw_days: float, rollup_days: float) -> dict[str, int]:
    """Delete messages received more than ``raw_days`` ago (an hour of arrivals per statement, so a first
    run after a long pause is many short statements), rollups of windows older than ``rollup_days``,
    and streams last heard of before that; each statement commits on its own. Returns rows deleted per
    table."""
    deleted: dict[str, int] = {}
    cutoff = now - timedelta(days=raw_days)
    oldest = s.scalar(select(func.min(TelemetryMessage.received_at)))
    n = 0
    while oldest is not None and oldest < cutoff:
        upto = min(cutoff, oldest + _RETENTION_CHUNK)
        n += _count(s.execute(delete(TelemetryMessage).where(TelemetryMessage.received_at < upto)))
        s.commit()
        oldest = upto
    deleted["telemetry_messages"] = n
    old_bucket = int((now - timedelta(days=rollup_days)).timestamp())
    for model in (TelemetryRollup, TelemetryClassRollup, TelemetryDeviceRollup, TelemetryShadowRollup):
        deleted[model.__tablename__] = _count(s.execute(delete(model).where(model.bucket < old_bucket)))
        s.commit()
    gone = now - timedelta(days=rollup_days)
    deleted["telemetry_streams"] = _count(
        s.execute(delete(TelemetryStream).where(TelemetryStream.last_received_at < gone)))
    s.commit()
    return deleted


def _count(result: Any) -> int:
    return int(getattr(result, "rowcount", 0) or 0)



def fleet_snapshot(s: Session, now: datetime, window: float) -> tuple[int, list[tuple[str, str, int]]]:
    """Devices whose telemetry arrived within ``window`` seconds, and per model version the devices that
    reported it in the windows since then (at most 1000 versions, the most reported first)."""
    since = now - timedelta(seconds=window)
    devices = s.scalar(select(func.count(func.distinct(TelemetryStream.device_id)))
                       .where(TelemetryStream.last_received_at >= since)) or 0
    r = TelemetryRollup
    n = func.count(func.distinct(r.device_id)).label("n")
    q = (select(r.model, r.version, n).where(r.bucket >= bucket_of(since, now)).group_by(r.model, r.version)
         .order_by(n.desc()).limit(1000))
    return int(devices), [(m, v, int(k)) for m, v, k in s.execute(q)]
