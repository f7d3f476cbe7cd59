"""The ``edgefleet`` command line."""

from edgefleet.cli.main import app, main

__all__ = ["app", "main"]
