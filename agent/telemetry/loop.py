"""The agent's telemetry, put together: every ``telemetry_interval_s`` a message with each served model
version's figures (:class:`~.measure.TelemetryRegistry`) and the device's (:class:`~.device.DeviceSampler`)
goes into the on-disk outbox (:class:`~.queue.Outbox`, ``STATE/queue.db``), which the
:class:`~.publisher.Publisher` delivers to the fleet's broker in ``seq`` order and deletes only on PUBACK.
The broker's ``cmd`` for this device wakes the updater (a check-in now; ``cmd`` carries no authority).

Started by :class:`edgefleet.agent.service.AgentService` for an enrolled agent with ``[mqtt.fleet]``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgefleet.agent.telemetry.config import MqttFleetConfig
from edgefleet.agent.telemetry.device import DeviceSampler
from edgefleet.agent.telemetry.measure import TelemetryRegistry
from edgefleet.agent.telemetry.publisher import Publisher
from edgefleet.agent.telemetry.queue import Outbox, OutboxError

__all__ = ["TelemetryLoop"]

log = logging.getLogger(__name__)


class TelemetryLoop:
    """Periodic telemetry into the outbox, the publisher, and ``cmd`` -> ``on_cmd`` (e.g. the updater's
    ``wake``). ``start()`` / ``stop()``; ``publish_now()`` puts one message at once (tests, shutdown)."""

    def __init__(
        self,
        config: MqttFleetConfig,
        device_id: str,
        state_dir: Path,
        stats: TelemetryRegistry,
        sampler: DeviceSampler,
        on_cmd: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.stats = stats
        self.sampler = sampler
        self.outbox = Outbox(state_dir / "queue.db", device_id, max_bytes=config.queue_max_bytes,
                             max_age_s=config.queue_max_age_s, min_free_bytes=config.queue_min_free_bytes)
        self.publisher = Publisher(config, device_id, self.outbox, identity_dir=state_dir / "identity")
        self.on_cmd = on_cmd  # may be set until start()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        on_cmd = self.on_cmd
        if on_cmd is not None:
            self.publisher.subscribe_cmd(lambda _msg: on_cmd())
        self.publisher.start()
        self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)
        self._thread.start()

    def publish_now(self) -> int | None:
        """Queue one telemetry message now; returns its seq (None when the outbox refused it)."""
        body: dict[str, Any] = {
            "interval_s": self.config.telemetry_interval_s,
            "models": self.stats.snapshot(),
            "device": self.sampler.sample(self.outbox.depth(), self.outbox.dropped()),
        }
        try:
            seq, _ = self.outbox.put("telemetry", body)
        except OutboxError as e:
            log.warning("telemetry: %s", e)
            return None
        return seq

    def _run(self) -> None:
        while not self._stop.wait(self.config.telemetry_interval_s):
            try:
                self.publish_now()
            except Exception:  # telemetry must never take the agent down
                log.exception("telemetry: unexpected error")

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.publisher.close()
        self.outbox.close()
