"""Telemetry from the fleet's MQTT broker (``edgefleet.server.telemetry``): ingestion with
acknowledgements after commit (:mod:`.ingest`), the wire contract (:mod:`.payloads`), storage once per
(device, epoch, seq) (:mod:`.store`), per-window rollups and retention (:mod:`.rollups`), and the
API (:mod:`.routes`). Off unless ``mqtt_url`` is set.
"""

from __future__ import annotations

__all__ = ["Ingester", "notify_check_in", "router"]

from edgefleet.server.telemetry.ingest import Ingester, notify_check_in
from edgefleet.server.telemetry.routes import router
