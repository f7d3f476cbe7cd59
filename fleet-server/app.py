"""The FastAPI application factory."""

from __future__ import annotations

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from edgefleet import __version__
from edgefleet.server.api import checkin, devices, identity, registry, tokens
from edgefleet.server.errors import install_handlers
from edgefleet.server.metrics import MetricsMiddleware
from edgefleet.server.settings import Settings
from edgefleet.server.state import ServerState, open_state

__all__ = ["create_app"]


def create_app(settings: Settings, state: ServerState | None = None) -> FastAPI:
    """The server app: connects, migrates (per settings) and loads the CA unless ``state`` is given.
    Raises :class:`edgefleet.errors.ConfigError` when the server was never initialised."""
    st = state if state is not None else open_state(settings)
    app = FastAPI(
        title="edgefleet fleet server",
        version=__version__,
        description="Model registry, device identity and check-in, operator API. Errors are JSON "
        '`{"error": ..., "field": ...}`.',
    )
    app.state.server = st
    install_handlers(app)
    for r in (checkin.router, registry.router, devices.router, identity.router, tokens.router):  # hot path first
        app.include_router(r)

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    @app.get("/metrics", tags=["ops"], response_class=Response)
    def metrics() -> Response:
        return Response(generate_latest(st.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(MetricsMiddleware, metrics=st.metrics)
    return app
