"""Exceptions, one base per boundary.

::

    EdgefleetError
    ├── ModelError          a model file or an input to it is wrong (names the tensor or the file)
    ├── BundleError         a bundle or its manifest is malformed or untrusted (names the member/field)
    ├── PipelineError       a pre/post-processing step cannot apply to the data it was given
    └── ConfigError         a configuration value is wrong (names the key)

Library errors (onnxruntime, LiteRT, tarfile, pydantic) are translated at the boundary with
``raise ... from e`` so callers need to catch only these.
"""

from __future__ import annotations

__all__ = ["BundleError", "ConfigError", "EdgefleetError", "ModelError", "PipelineError"]


class EdgefleetError(Exception):
    """Base of every error edgefleet raises on purpose."""


class ModelError(EdgefleetError):
    """A model cannot be loaded, or an input does not fit it."""


class BundleError(EdgefleetError):
    """A bundle is malformed, tampered with, or would write outside its folder."""


class PipelineError(EdgefleetError):
    """A pre- or post-processing step cannot be applied."""


class ConfigError(EdgefleetError):
    """A configuration file or value is invalid."""
