"""Converters and bundle tools: package models, quantize and convert them.

Heavy frameworks (TensorFlow, PyTorch, skl2onnx) are imported only by the function that needs them;
when one is missing, the error names the extra to install.
"""

from edgefleet.converters.convert import convert_model
from edgefleet.converters.package import package_model
from edgefleet.converters.quantize import quantize_onnx

__all__ = ["convert_model", "package_model", "quantize_onnx"]
