"""Tensor descriptions shared by every backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Quantization", "TensorSpec", "dtype_name"]


@dataclass(frozen=True)
class Quantization:
    """Per-tensor affine quantization: ``real = scale * (q - zero_point)``."""

    scale: float
    zero_point: int


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output.

    ``shape`` holds ``None`` for a dynamic dimension. ``quantization`` is set for int8/uint8
    tensors that carry a scale and zero point; such inputs also accept float arrays.
    """

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype[Any]
    quantization: Quantization | None = None

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (the manifest's ``TensorInfo`` fields)."""
        q = self.quantization
        return {
            "name": self.name,
            "dtype": self.dtype_name,
            "shape": list(self.shape),
            "quantization": None if q is None else {"scale": q.scale, "zero_point": q.zero_point},
        }

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        q = (
            ""
            if self.quantization is None
            else f" q(scale={self.quantization.scale:.6g}, zp={self.quantization.zero_point})"
        )
        return f"{self.name}: {self.dtype_name}[{dims}]{q}"


def dtype_name(dtype: np.dtype[Any]) -> str:
    """numpy dtype to the names used in manifests (``string`` for text tensors)."""
    if dtype.kind in "OUS":
        return "string"
    return str(dtype)
