"""Alerts for retraining (``edgefleet.server.alerts``): thresholds on drift and live accuracy per model
(:mod:`.rules`, judged by :func:`evaluate` for every stored telemetry entry), their delivery to
webhooks signed as Standard Webhooks says and to ``edgefleet/v1/alerts/{model}`` from a durable outbox
(:mod:`.webhooks`), and the API (:mod:`.routes`). See docs/alerts.md.
"""

from __future__ import annotations

__all__ = ["DeliveryWorker", "evaluate", "ingester_publisher", "router"]

from edgefleet.server.alerts.routes import router
from edgefleet.server.alerts.rules import evaluate
from edgefleet.server.alerts.webhooks import DeliveryWorker, ingester_publisher
