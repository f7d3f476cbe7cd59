"""Inference backends. Each module holds one runtime; a runtime that is not installed is only an
error when a model needs it."""

from edgefleet.agent.backends.base import Backend, Feeds, Outputs

__all__ = ["Backend", "Feeds", "Outputs"]
