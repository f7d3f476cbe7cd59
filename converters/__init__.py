"""Converters and bundle tools: package models, quantize and convert them (heavy frameworks are
imported only by the function that needs them)."""

from edgefleet.converters.package import package_model

__all__ = ["package_model"]
