"""Where a flow's inputs come from: a camera or video, a watched folder, MQTT topics, stdin lines.

Each module holds one source's pydantic config (discriminated on ``type``) and its class; the
optional libraries (OpenCV, paho-mqtt) are imported only when a source starts.
:func:`build_source` makes the source a config describes.
"""

from __future__ import annotations

from typing import Annotated, TypeAlias

from pydantic import Field

from edgefleet.agent.sources.base import Emit, Item, PayloadError, Source, parse_payload, parse_payload_bytes
from edgefleet.agent.sources.camera import CameraSource, CameraSourceConfig
from edgefleet.agent.sources.folder import FolderSource, FolderSourceConfig
from edgefleet.agent.sources.mqtt import MqttSource, MqttSourceConfig
from edgefleet.agent.sources.stdin import StdinSource, StdinSourceConfig

__all__ = [
    "CameraSource",
    "CameraSourceConfig",
    "Emit",
    "FolderSource",
    "FolderSourceConfig",
    "Item",
    "MqttSource",
    "MqttSourceConfig",
    "PayloadError",
    "Source",
    "SourceConfig",
    "StdinSource",
    "StdinSourceConfig",
    "build_source",
    "parse_payload",
    "parse_payload_bytes",
]

SourceConfig: TypeAlias = Annotated[
    CameraSourceConfig | FolderSourceConfig | MqttSourceConfig | StdinSourceConfig,
    Field(discriminator="type"),
]


def build_source(cfg: CameraSourceConfig | FolderSourceConfig | MqttSourceConfig | StdinSourceConfig) -> Source:
    """The source ``cfg`` describes (not started)."""
    match cfg:
        case CameraSourceConfig():
            return CameraSource(cfg)
        case FolderSourceConfig():
            return FolderSource(cfg)
        case MqttSourceConfig():
            return MqttSource(cfg)
        case StdinSourceConfig():
            return StdinSource(cfg)
    raise TypeError(f"not a source config: {type(cfg).__name__}")
