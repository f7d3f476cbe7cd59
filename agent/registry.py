"""The models an agent serves, by name, swappable without dropping a request.

The table is copy-on-write: readers take the current mapping without a lock, and a swap replaces
the whole mapping, so a request that already holds a model finishes on it while new requests get the
new one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

from edgefleet.agent.runtime import Model

if TYPE_CHECKING:
    from edgefleet.agent.pipeline import Pipeline

__all__ = ["ModelRegistry", "Served"]


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
