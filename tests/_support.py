"""Helpers shared by the tests (importable because pyproject puts tests/ on the path)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

MODELS = Path(__file__).resolve().parent / "fixtures" / "models"

DIGITS = {
    # file: (input name, layout)
    "digits_cnn_float.onnx": ("input", "nchw"),
    "digits_cnn_int8.onnx": ("input", "nchw"),
    "digits_cnn_float.tflite": ("image", "nhwc"),
    "digits_cnn_int8.tflite": ("image", "nhwc"),
    "digits_cnn_uint8io.tflite": ("image", "nhwc"),
}


def digits_input(x: np.ndarray[Any, Any], layout: str) -> np.ndarray[Any, Any]:
    """uint8 pixels 0..16 [N, 8, 8] to the float [0, 1] batch a digits model takes."""
    f = x.astype(np.float32) / 16.0
    return np.ascontiguousarray(f[:, None] if layout == "nchw" else f[..., None])
