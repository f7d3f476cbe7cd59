"""HTTP routers, one per area: registry, tokens, devices (operator side), identity and check-in (device side)."""

from __future__ import annotations

__all__: list[str] = []
