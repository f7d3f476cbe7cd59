"""The models an agent serves, by name, swappable without dropping a request; and the predictions
made recently, by id (so that feedback can refer to them).

The table is copy-on-write: readers take the current mapping without a lock, and a swap replaces
the whole mapping, so a request that already holds a model finishes on it while new requests get the
new one.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from edgefleet.agent.runtime import Model

if TYPE_CHECKING:
    from edgefleet.agent.pipeline import Pipeline

__all__ = ["ModelRegistry", "Prediction", "RecentPredictions", "Served"]


@dataclass(frozen=True)
class Served:
    """One model being served: its name, version, the loaded model and its pipeline."""

    name: str
    version: str
    model: Model
    loaded_at: float = field(default_factory=time.time)

    @cached_property
    def pipeline(self) -> Pipeline:
        """The model's pipeline, built on first use (the API's infer path does not need it)."""
        from edgefleet.agent.pipeline import Pipeline

        return Pipeline(self.model)


class ModelRegistry:
    """Name -> :class:`Served`. ``expected`` names must all be loaded before the agent is ready."""

    def __init__(self, expected: Iterable[str] = ()) -> None:
        self._models: dict[str, Served] = {}
        self._write = threading.Lock()
        self.expected = set(expected)

    def put(self, name: str, model: Model, version: str | None = None) -> Served:
        """Serve ``model`` under ``name``, replacing any previous version atomically."""
        served = Served(
            name=name,
            version=version or (model.manifest.version if model.manifest else "1"),
            model=model,
        )
        with self._write:
            self._models = {**self._models, name: served}
        return served

    def remove(self, name: str) -> None:
        with self._write:
            self._models = {k: v for k, v in self._models.items() if k != name}

    def get(self, name: str) -> Served | None:
        return self._models.get(name)

    def all(self) -> list[Served]:
        return list(self._models.values())

    @property
    def ready(self) -> bool:
        models = self._models
        return bool(models) and self.expected <= set(models)


@dataclass(frozen=True)
class Prediction:
    """What is kept of one prediction: who made it, when, and the result's top-level scalars (``class``,
    ``label``, ``score`` of a classifier); never the whole result, which can be a map of megabytes."""

    id: str
    model: str
    version: str
    at: float
    summary: dict[str, Any]


class RecentPredictions:
    """The last ``capacity`` predictions by id, in memory (a ring: the oldest is forgotten first)."""

    def __init__(self, capacity: int = 1024) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._items: OrderedDict[str, Prediction] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, id: str, model: str, version: str, result: Mapping[str, Any]) -> Prediction:
        summary = {k: v for k, v in result.items() if isinstance(v, str | int | float | bool) or v is None}
        p = Prediction(id=id, model=model, version=version, at=time.time(), summary=summary)
        with self._lock:
            self._items[id] = p
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return p

    def get(self, id: str) -> Prediction | None:
        return self._items.get(id)

    def __len__(self) -> int:
        return len(self._items)
