"""The fleet server (``edgefleet.server``): model registry, device identity and check-in, operator API.

``create_app(settings)`` builds the FastAPI app; ``init_server(settings)`` prepares a data folder;
``load_settings`` reads ``server.toml`` and ``EDGEFLEET_SERVER_*``. See docs/server.md.
"""

from __future__ import annotations

__all__ = ["create_app", "init_server", "load_settings"]

from edgefleet.server.app import create_app
from edgefleet.server.settings import load_settings
from edgefleet.server.state import init_server
