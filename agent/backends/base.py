"""The inference backend interface: load a model, describe its tensors, run it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from edgefleet.agent.tensors import TensorSpec

__all__ = ["Backend", "Feeds", "Outputs"]

Feeds = dict[str, np.ndarray[Any, Any]]
Outputs = dict[str, np.ndarray[Any, Any]]


class Backend(Protocol):
    """One loaded model on one runtime.

    ``run`` receives arrays already checked against ``inputs`` (name, dtype, shape) and returns
    every output by name, in the tensor's own dtype. It need not be thread-safe; the caller locks
    when ``thread_safe`` is false (a backend that is thread-safe runs concurrent calls in parallel:
    one ONNX Runtime session, or a pool of LiteRT interpreters). Every failure of the runtime
    itself (a shape it refuses, an error inside a kernel) is raised as
    :class:`~edgefleet.errors.ModelError` naming the model and the input shapes, never as the
    runtime's own exception type.
    """

    name: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    aliases: dict[str, str]  # other accepted input names -> the canonical one (e.g. raw TFLite tensor names)
    thread_safe: bool
    stateful: bool  # the model keeps state between runs (TFLite resource variables)
    metadata: dict[str, str]  # the model file's own key/value metadata (ONNX metadata_props)
    signatures: list[str]  # named entry points (TFLite signatures); empty when the format has none

    def run(self, feeds: Feeds) -> Outputs: ...

    def adapt(self, seconds: float | None) -> None:
        """Called once after warm-up with the CPU seconds one run took, summed over the process's
        threads (``None``: not measured): a backend may choose its threads from it (ONNX Runtime
        does). Raises ModelError."""
        ...

    def reset(self) -> None:
        """Put a stateful model back in its initial state (a no-op for a stateless one)."""
        ...

    def bare_callable(self) -> Callable[[Feeds], object]:
        """The runtime's own call with no edgefleet code around it (for benchmarks)."""
        ...

    def info(self) -> dict[str, Any]:
        """Runtime name, version, threads, providers or delegates actually used."""
        ...
