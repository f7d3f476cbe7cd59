"""The ``edgefleet`` command line: ``entry`` (the console script) dispatches to ``main`` (typer)."""

__all__: list[str] = []
