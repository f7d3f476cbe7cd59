"""The agent's Prometheus metrics.

Recording is a few integer additions under a lock; ``prometheus_client`` is imported only when
``/metrics`` is first scraped, so an agent nobody scrapes does not carry it (2 MB on a device).
The exposition itself is prometheus_client's: metric families built from these counts at scrape time.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["AgentMetrics"]

BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Counters = Callable[[], dict[str, dict[str, Any]]]


class AgentMetrics:
    """Inference latency histogram and errors per model, models loaded, requests in flight, flows."""

    content_type = CONTENT_TYPE

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hist: dict[str, list[float]] = {}  # model -> [count per bucket..., +Inf count, sum]
        self._errors: dict[tuple[str, str], int] = {}
        self.models_loaded = 0
        self.in_flight: Callable[[], int] = lambda: 0
        self._flows: Counters | None = None
        self._registry: Any = None

    def watch_flows(self, counters: Counters) -> None:
        """Export the flows' counters (``{flow: Flow.counters()}``), read at scrape time."""
        self._flows = counters

    def inference(self, model: str, seconds: float) -> None:
        i = bisect.bisect_left(BUCKETS, seconds)
        with self._lock:
            h = self._hist.get(model)
            if h is None:
                h = self._hist[model] = [0.0] * (len(BUCKETS) + 2)
            h[i] += 1
            h[-1] += seconds

    def error(self, model: str, kind: str) -> None:
        with self._lock:
            self._errors[(model, kind)] = self._errors.get((model, kind), 0) + 1

    def snapshot(self) -> dict[str, Any]:
        """Plain numbers (for telemetry): per model count, sum and bucket counts; errors."""
        with self._lock:
            hist = {m: list(h) for m, h in self._hist.items()}
            errors = dict(self._errors)
        return {"histograms": hist, "errors": errors, "buckets": BUCKETS}

    def render(self) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest

        if self._registry is None:
            self._registry = CollectorRegistry()
            self._registry.register(_Collector(self))
        return generate_latest(self._registry)  # type: ignore[no-any-return]


class _Collector:
    def __init__(self, metrics: AgentMetrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        snap = self.m.snapshot()
        hist = HistogramMetricFamily(
            "edgefleet_inference_seconds", "Inference latency through the agent", labels=["model"]
        )
        for model, h in sorted(snap["histograms"].items()):
            cumulative, buckets = 0.0, []
            for bound, n in zip((*BUCKETS, float("inf")), h[:-1], strict=True):
                cumulative += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            hist.add_metric([model], buckets, h[-1])
        yield hist
        errors = CounterMetricFamily(
            "edgefleet_inference_errors", "Requests refused or failed, by kind", labels=["model", "kind"]
        )
        for (model, kind), n in sorted(snap["errors"].items()):
            errors.add_metric([model, kind], n)
        yield errors
        yield GaugeMetricFamily("edgefleet_models_loaded", "Models being served", value=self.m.models_loaded)
        yield GaugeMetricFamily("edgefleet_requests_in_flight", "HTTP requests being served", value=self.m.in_flight())
        if self.m._flows is not None:
            g = GaugeMetricFamily(
                "edgefleet_flow_items",
                "Items counted by each flow, its source and sinks",
                labels=["flow", "stage", "counter"],
            )
            for flow, c in self.m._flows().items():
                for key, value in c.items():
                    if isinstance(value, int | float):
                        g.add_metric([flow, "flow", key], value)
                for key, value in c.get("source", {}).items():
                    g.add_metric([flow, "source", key], value)
                for sink, sc in c.get("sinks", {}).items():
                    for key, value in sc.items():
                        g.add_metric([flow, f"sink:{sink}", key], value)
            yield g
