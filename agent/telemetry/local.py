"""``feedback`` from local apps over MQTT: the agent subscribes to ``edgefleet/v1/{device_id}/feedback``
on the local broker (``[mqtt.local]``, often localhost where sensors and apps publish) and hands each
message to :meth:`edgefleet.agent.telemetry.feedback.Feedback.from_mqtt`, exactly as the HTTP
``POST /v2/models/{name}/feedback`` does. A bad message is logged and counted, never fatal.
"""

from __future__ import annotations

import logging
from typing import Any

from edgefleet.agent.sources.base import Counters
from edgefleet.agent.telemetry.config import MqttLocalConfig
from edgefleet.agent.telemetry.queue import device_topic

__all__ = ["FeedbackSubscriber"]

log = logging.getLogger(__name__)


class FeedbackSubscriber:
    """Feedback from the local broker into ``feedback`` (an :class:`~.feedback.Feedback`)."""

    def __init__(self, config: MqttLocalConfig, device_id: str, feedback: Any) -> None:
        from edgefleet.agent.sources.mqtt import make_client

        self.config = config
        self.device_id = device_id
        self.feedback = feedback
        self.topic = device_topic(device_id, "feedback")
        self.counters = Counters("received", "accepted", "refused")
        self._broker = config.broker_config()
        self._client = make_client(self._broker, "mqtt.local")
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message

    def start(self) -> None:
        from edgefleet.agent.sources.mqtt import connect

        connect(self._client, self._broker)
        log.info("mqtt local: feedback from %s on %s:%s", self.topic, self.config.host, self.config.port)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not getattr(reason, "is_failure", False):
            client.subscribe(self.topic, qos=1)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        from edgefleet.agent.telemetry.feedback import FeedbackError

        self.counters.inc("received")
        try:
            self.feedback.from_mqtt(bytes(msg.payload), self.device_id)
        except FeedbackError as e:
            self.counters.inc("refused")
            log.info("feedback on %s refused: %s", self.topic, e)
            return
        except Exception:  # a bug must not go unseen in paho's thread (it suppresses callback errors)
            self.counters.inc("refused")
            log.exception("feedback on %s", self.topic)
            return
        self.counters.inc("accepted")

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
