"""Prometheus metrics, one registry per app: requests and latencies by route, check-ins by result, and
devices online (counted from the database at scrape time); with telemetry ingestion on, its messages by
result and refusal reason, and fleet aggregates: inferences and errors devices reported per model and
version (counters this replica adds to as it stores telemetry: summed over replicas they count every
message once) and devices reporting (from the database at scrape time).

Every label takes its value from a fixed set, so no client can add series: the method is one of
:data:`METHODS` or ``other``, the route is a route template or ``unmatched``, the status is one of
:data:`STATUSES` or its class (``2xx`` ... ``5xx``, or ``other``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from edgefleet.server.limits import ROUTE_KEY

__all__ = [
    "MAX_MODEL_SERIES", "METHODS", "STATUSES", "FleetTelemetry", "Metrics", "MetricsMiddleware", "method_label",
    "status_label",
]

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
STATUSES = frozenset(
    {200, 201, 204, 206, 304, 400, 401, 403, 404, 405, 408, 409, 411, 413, 416, 422, 429, 431, 500, 503}
)

MAX_MODEL_SERIES = 1000  # (model, version) label pairs of the fleet counters; reports past it count as "other"
_BATCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class _Fleet(Collector):
    def __init__(self, count_online: Callable[[], tuple[int, int]]) -> None:
        self._count = count_online

    def collect(self) -> Iterable[GaugeMetricFamily]:
        online, total = self._count()
        g = GaugeMetricFamily("edgefleet_devices", "Enrolled, non-revoked devices by state", labels=["state"])
        g.add_metric(["online"], online)
        g.add_metric(["offline"], total - online)
        yield g


FleetTelemetry = tuple[int, list[tuple[str, str, int]]]  # devices reporting; (model, version, devices) each


class _FleetTelemetry(Collector):
    def __init__(self, read: Callable[[], FleetTelemetry]) -> None:
        self._read = read

    def collect(self) -> Iterable[GaugeMetricFamily]:
        devices, per_model = self._read()
        yield GaugeMetricFamily("edgefleet_fleet_devices_reporting",
                                "Devices whose telemetry arrived within the online window", value=devices)
        g = GaugeMetricFamily("edgefleet_fleet_model_devices",
                              "Devices that reported a model version within the online window",
                              labels=["model", "version"])
        for model, version, n in per_model:
            g.add_metric([model, version], n)
        yield g


class Metrics:
    def __init__(self, count_online: Callable[[], tuple[int, int]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "edgefleet_http_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "edgefleet_http_request_seconds", "Request latency", ["route"], buckets=_BUCKETS, registry=self.registry
        )
        self.checkins = Counter("edgefleet_checkins", "Device check-ins by result", ["result"], registry=self.registry)
        self.uploads = Counter("edgefleet_uploads", "Bundle uploads by result", ["result"], registry=self.registry)
        self.registry.register(_Fleet(count_online))
        # telemetry ingestion (edgefleet.server.telemetry)
        self.telemetry_messages = Counter(
            "edgefleet_telemetry_messages", "Telemetry and events messages from MQTT by topic and result "
            "(stored, duplicate, rejected)", ["topic", "result"], registry=self.registry,
        )
        self.telemetry_rejected = Counter(
            "edgefleet_telemetry_rejected", "Telemetry and events messages acknowledged and dropped, by reason",
            ["reason"], registry=self.registry,
        )
        self.telemetry_batch = Histogram(
            "edgefleet_telemetry_batch_seconds", "Time to store and commit one batch of messages",
            buckets=_BATCH_BUCKETS, registry=self.registry,
        )
        self.telemetry_pending = Gauge(
            "edgefleet_telemetry_pending", "Messages received from the broker and not yet acknowledged (waiting "
            "for their batch to commit)", registry=self.registry,
        )
        self.mqtt_connected = Gauge("edgefleet_mqtt_connected", "1 while connected to the fleet's MQTT broker",
                                    registry=self.registry)
        self.commands = Counter("edgefleet_mqtt_commands", "check-in commands published to devices, by result",
                                ["result"], registry=self.registry)
        self.fleet_inferences = Counter(
            "edgefleet_fleet_inferences", "Inferences devices reported, by model and version", ["model", "version"],
            registry=self.registry,
        )
        self.fleet_errors = Counter(
            "edgefleet_fleet_inference_errors", "Inference errors devices reported, by model and version",
            ["model", "version"], registry=self.registry,
        )
        self._model_series: set[tuple[str, str]] = set()
        self._fleet_watched = False

    def fleet_counts(self, model: str, version: str, inferences: int, errors: int) -> None:
        """Add a device's reported counts to the fleet counters; past :data:`MAX_MODEL_SERIES` label pairs
        the counts go to model ``other`` (devices cannot grow the series without bound)."""
        key = (model, version)
        if key not in self._model_series:
            if len(self._model_series) >= MAX_MODEL_SERIES:
                key = ("other", "other")
            else:
                self._model_series.add(key)
        if inferences:
            self.fleet_inferences.labels(*key).inc(inferences)
        if errors:
            self.fleet_errors.labels(*key).inc(errors)

    def watch_fleet_telemetry(self, read: Callable[[], FleetTelemetry]) -> None:
        """Export devices reporting, read by ``read`` at scrape time (registered once per registry)."""
        if not self._fleet_watched:
            self._fleet_watched = True
            self.registry.register(_FleetTelemetry(read))


def method_label(method: str) -> str:
    """The request method, or ``other`` when it is not a standard one."""
    return method if method in METHODS else "other"


def status_label(status: int) -> str:
    """The status code when it is one of :data:`STATUSES`, else its class (``4xx``), else ``other``."""
    if status in STATUSES:
        return str(status)
    return f"{status // 100}xx" if 100 <= status < 600 else "other"


class MetricsMiddleware:
    """Pure ASGI middleware (cheap on the check-in path): counts and times each request by route template
    (the router's, else the body limiter's, else ``unmatched``)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def _send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, _send)
        finally:
            route = scope.get("route")
            name = str(getattr(route, "path", None) or scope.get(ROUTE_KEY) or "unmatched")
            self.metrics.requests.labels(method_label(scope["method"]), name, status_label(status[0])).inc()
            self.metrics.latency.labels(name).observe(time.perf_counter() - start)
