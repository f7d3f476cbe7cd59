"""Telemetry on the agent: what is measured, queued on disk and published over MQTT.

- :mod:`.queue`: :class:`Outbox`, the store-and-forward queue (``STATE/queue.db``) that gives
  ``telemetry`` and ``events`` their ``epoch`` and ``seq``;
- :mod:`.publisher`: :class:`Publisher`, the link to the fleet's broker (``status`` with its last
  will, the queued messages at QoS 1, the ``cmd`` topic);
- :mod:`.config`: ``[mqtt.fleet]`` and ``[mqtt.local]``.

Names are imported on first use, so that importing a measuring module does not load paho or sqlite3.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgefleet.agent.telemetry.config import MqttFleetConfig, MqttLocalConfig
    from edgefleet.agent.telemetry.publisher import Publisher
    from edgefleet.agent.telemetry.queue import Message, Outbox, OutboxError, device_topic

__all__ = ["Message", "MqttFleetConfig", "MqttLocalConfig", "Outbox", "OutboxError", "Publisher", "device_topic"]

_LAZY = {
    "Message": "edgefleet.agent.telemetry.queue",
    "MqttFleetConfig": "edgefleet.agent.telemetry.config",
    "MqttLocalConfig": "edgefleet.agent.telemetry.config",
    "Outbox": "edgefleet.agent.telemetry.queue",
    "OutboxError": "edgefleet.agent.telemetry.queue",
    "Publisher": "edgefleet.agent.telemetry.publisher",
    "device_topic": "edgefleet.agent.telemetry.queue",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'edgefleet.agent.telemetry' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
