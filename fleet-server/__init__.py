"""The fleet server (``edgefleet.server``): registry, device identity, rollouts. Not built yet."""

__all__: list[str] = []
