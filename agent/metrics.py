"""The agent's own Prometheus metrics (its registry, not the process-global one)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["AgentMetrics"]

_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class AgentMetrics:
    """Inference counts, latency histogram and errors per model."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._latency = Histogram(
            "edgefleet_inference_seconds",
            "Inference latency through the agent",
            ["model"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self._errors = Counter(
            "edgefleet_inference_errors",
            "Requests refused or failed, by kind",
            ["model", "kind"],
            registry=self.registry,
        )
        self.models = Gauge("edgefleet_models_loaded", "Models being served", registry=self.registry)
        self.in_flight = Gauge("edgefleet_requests_in_flight", "HTTP requests being served", registry=self.registry)
        self._children: dict[str, Histogram] = {}

    def watch_flows(self, counters: Callable[[], dict[str, dict[str, Any]]]) -> None:
        """Export the flows' counters (``{flow: Flow.counters()}``), read at scrape time."""
        self.registry.register(_FlowCollector(counters))

    def inference(self, model: str, seconds: float) -> None:
        child = self._children.get(model)
        if child is None:
            child = self._children[model] = self._latency.labels(model)
        child.observe(seconds)

    def error(self, model: str, kind: str) -> None:
        self._errors.labels(model, kind).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _FlowCollector:
    """``edgefleet_flow_items{flow, stage, counter}``: the flow's own, its source's and each sink's."""

    def __init__(self, counters: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self._counters = counters

    def collect(self) -> Iterator[Metric]:
        g = GaugeMetricFamily(
            "edgefleet_flow_items",
            "Items counted by each flow, its source and sinks",
            labels=["flow", "stage", "counter"],
        )
        for flow, c in self._counters().items():
            for key, value in c.items():
                if isinstance(value, int | float):
                    g.add_metric([flow, "flow", key], value)
            for key, value in c.get("source", {}).items():
                g.add_metric([flow, "source", key], value)
            for sink, sc in c.get("sinks", {}).items():
                for key, value in sc.items():
                    g.add_metric([flow, f"sink:{sink}", key], value)
        yield g
