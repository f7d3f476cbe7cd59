"""What every source shares: the :class:`Item` it emits, the :class:`Source` protocol, thread-safe
counters, and the JSON payload format that the folder, MQTT and stdin sources accept.

A payload is a JSON object with exactly one of::

    {"inputs": {"<input name>": <nested list>, ...}}   several named inputs (multi-input models)
    {"data": <nested list>}                            the pipeline's one input
    {"image_b64": "<base64 PNG/JPEG/...>"}             an encoded image, decoded by the pipeline

and optionally ``"id"`` (a string or integer) that is copied into the result's ``meta``.
Anything else raises :class:`PayloadError` whose message names the field.
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeAlias

import numpy as np
from pydantic import BaseModel, ConfigDict

from edgefleet.errors import PipelineError

__all__ = [
    "Ack",
    "Counters",
    "Emit",
    "Item",
    "ItemData",
    "Outcome",
    "PayloadError",
    "Source",
    "parse_payload",
    "parse_payload_bytes",
]

ItemData: TypeAlias = np.ndarray[Any, Any] | bytes | dict[str, Any]
Outcome: TypeAlias = Literal["ok", "error", "dropped"]
Ack: TypeAlias = Callable[[Outcome], None]

_PAYLOAD_KEYS = ("inputs", "data", "image_b64")


class PayloadError(PipelineError):
    """An input payload is malformed; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass(slots=True, eq=False)
class Item:
    """One input on its way to the model.

    ``meta`` holds ``source`` (the source's name), ``received_at`` (Unix time, seconds) and what the
    source knows: ``frame``, ``path``, ``topic``, ``line``, ``id``. ``ack``, when set, is called once
    by the flow with the outcome (the folder source moves the file then; the MQTT source sends the
    QoS 1/2 acknowledgement). ``received`` is the monotonic clock at receipt, for latency.

    ``held``: the source keeps this item upstream until it is acknowledged (an MQTT broker keeps an
    unacknowledged QoS 1/2 message and redelivers it to a persistent session) and bounds how many
    such items it has out at once (MQTT 5 receive-maximum). The flow never drops a held item for a
    full queue; an ack of ``"dropped"`` (only at stop) leaves it upstream.
    """

    data: ItemData
    meta: dict[str, Any] = field(default_factory=dict)
    ack: Ack | None = None
    received: float = field(default_factory=time.monotonic)
    held: bool = False


Emit: TypeAlias = Callable[[Item], None]


class Source(Protocol):
    """Something that produces items on its own thread(s).

    ``can_wait``: true when the source can hold its input while the flow is full (files stay in
    the folder, stdin is not read, a camera keeps only its newest frame): ``emit`` then blocks.
    False for live data that cannot wait (MQTT: blocking paho's network thread would miss
    keep-alives): ``emit`` never blocks; items marked ``held`` wait upstream (the broker), the
    others go by the flow's drop policy.
    ``ended`` is set once the source will emit nothing more (end of a file or stream, or stopped).
    """

    name: str
    can_wait: bool
    ended: threading.Event

    def start(self, emit: Emit) -> None:
        """Start the source's daemon thread(s); ``emit`` is called for every item."""

    def stop(self) -> None:
        """Stop and join the threads. Idempotent."""

    def counters(self) -> dict[str, int]:
        """received, errors, dropped... since start."""
        ...


class Counters:
    """Named integer counters, safe to bump from several threads."""

    def __init__(self, *names: str) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, int] = dict.fromkeys(names, 0)

    def inc(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._values[name] = self._values.get(name, 0) + n

    def get(self, name: str) -> int:
        with self._lock:
            return self._values.get(name, 0)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)


def _array(value: Any, where: str) -> np.ndarray[Any, Any]:
    if isinstance(value, str | bytes | Mapping) or value is None:
        raise PayloadError(f"{where}: expected a number or a nested list of numbers, got {type(value).__name__}")
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError, RecursionError) as e:
        raise PayloadError(f"{where}: not a rectangular array of numbers ({e})") from e
    if arr.dtype.kind not in "biuf":
        raise PayloadError(f"{where}: expected numbers, got values of type {arr.dtype.kind!r} ({arr.dtype})")
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    return arr


def parse_payload(obj: Any, where: str = "payload") -> tuple[ItemData, dict[str, Any]]:
    """A decoded JSON payload to ``(data, meta)``. Raises :class:`PayloadError` naming the field."""
    if not isinstance(obj, dict):
        raise PayloadError(
            f"{where}: expected a JSON object with one of {list(_PAYLOAD_KEYS)}, got {type(obj).__name__}"
        )
    unknown = sorted(set(obj) - {*_PAYLOAD_KEYS, "id"})
    if unknown:
        raise PayloadError(
            f"{where}: unknown field(s) {unknown}; expected one of {list(_PAYLOAD_KEYS)} and optional 'id'"
        )
    given = [k for k in _PAYLOAD_KEYS if k in obj]
    if len(given) != 1:
        raise PayloadError(f"{where}: expected exactly one of {list(_PAYLOAD_KEYS)}, got {given or 'none'}")
    meta: dict[str, Any] = {}
    if "id" in obj:
        if not isinstance(obj["id"], str | int) or isinstance(obj["id"], bool):
            raise PayloadError(f"{where}.id: expected a string or an integer, got {type(obj['id']).__name__}")
        meta["id"] = obj["id"]
    key = given[0]
    value = obj[key]
    if key == "data":
        return _array(value, f"{where}.data"), meta
    if key == "inputs":
        if not isinstance(value, dict) or not value:
            raise PayloadError(f"{where}.inputs: expected an object of input name to nested list, got {value!r:.40}")
        return {str(k): _array(v, f"{where}.inputs.{k}") for k, v in value.items()}, meta
    if not isinstance(value, str):
        raise PayloadError(f"{where}.image_b64: expected a base64 string, got {type(value).__name__}")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise PayloadError(f"{where}.image_b64: not valid base64 ({e})") from e
    if not raw:
        raise PayloadError(f"{where}.image_b64: empty image")
    return raw, meta


def parse_payload_bytes(raw: bytes | bytearray | str, where: str = "payload") -> tuple[ItemData, dict[str, Any]]:
    """JSON text to ``(data, meta)``; see :func:`parse_payload`."""
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise PayloadError(f"{where}: not valid JSON ({e})") from e
    return parse_payload(obj, where)
