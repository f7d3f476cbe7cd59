"""The on-device agent: load a model, run it, with its pipeline.

``load_model(path, **options) -> Model``; ``Model.inputs`` / ``Model.outputs`` describe the tensors;
``Model.predict({name: array}) -> {name: array}``. ``Pipeline(model).run(data)`` adds the bundle's
pre- and post-processing. Importing this package loads no runtime: ONNX Runtime and LiteRT are
imported when a model needs them, and the names below are imported on first use (a device's
resident agent keeps only what it uses in memory).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from edgefleet.errors import BundleError, ModelError, PipelineError

if TYPE_CHECKING:
    from edgefleet.agent.pipeline import Pipeline
    from edgefleet.agent.runtime import Model, load_model
    from edgefleet.agent.tensors import Quantization, TensorSpec

__all__ = [
    "BundleError",
    "Model",
    "ModelError",
    "Pipeline",
    "PipelineError",
    "Quantization",
    "TensorSpec",
    "load_model",
]

_LAZY = {
    "Pipeline": "edgefleet.agent.pipeline",
    "Model": "edgefleet.agent.runtime",
    "load_model": "edgefleet.agent.runtime",
    "Quantization": "edgefleet.agent.tensors",
    "TensorSpec": "edgefleet.agent.tensors",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'edgefleet.agent' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
