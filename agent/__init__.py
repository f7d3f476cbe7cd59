"""The on-device agent: load a model, run it, with its pipeline.

``load_model(path, **options) -> Model``; ``Model.inputs`` / ``Model.outputs`` describe the tensors;
``Model.predict({name: array}) -> {name: array}``. ``Pipeline(model).run(data)`` adds the bundle's
pre- and post-processing. Importing this package loads no runtime: ONNX Runtime and LiteRT are
imported when a model needs them.
"""

from edgefleet.agent.pipeline import Pipeline
from edgefleet.agent.runtime import Model, load_model
from edgefleet.agent.tensors import Quantization, TensorSpec
from edgefleet.errors import BundleError, ModelError, PipelineError

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
