"""The FastAPI application factory.

Middleware, outermost first: metrics (every request, by a fixed set of labels), proxy headers (from
``trusted_proxies`` only, keeping the proxy's own address), body limits (before any body is read),
then FastAPI's error handlers and the routes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

from fastapi import FastAPI, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from edgefleet import __version__
from edgefleet.server.alerts import routes as alert_routes
from edgefleet.server.api import checkin, devices, identity, registry, rollouts, tokens
from edgefleet.server.api.deps import PEER_KEY
from edgefleet.server.errors import install_handlers
from edgefleet.server.limits import BodyLimit
from edgefleet.server.metrics import MetricsMiddleware
from edgefleet.server.models import utcnow
from edgefleet.server.settings import Settings
from edgefleet.server.state import ServerState, open_state
from edgefleet.server.telemetry import routes as telemetry_routes
from edgefleet.server.tuf import routes as tuf_routes

if TYPE_CHECKING:
    from fastapi import Request

    from edgefleet.server.tuf.director import DirectorRepository

__all__ = ["UPLOAD_ROUTE", "TrustedProxy", "create_app"]

UPLOAD_ROUTE = ("POST", "/api/v1/models")  # the one route whose body may be larger than max_json_bytes


class TrustedProxy:
    """X-Forwarded-For/-Proto from ``trusted_proxies`` only (uvicorn's middleware), with the connection's
    own peer kept in the scope under :data:`PEER_KEY`: the forwarded ``client`` names the device, the
    peer says whether the request came through the proxy (and so whether its headers are believed)."""

    def __init__(self, app: Any, trusted: list[str]) -> None:
        self.inner = ProxyHeadersMiddleware(app, trusted_hosts=trusted)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope[PEER_KEY] = scope.get("client")
        await self.inner(scope, receive, send)


log = logging.getLogger(__name__)

def _sync_revocations(settings: Settings) -> None:
    """Replay every revoked device into the broker (a revocation it missed while it was unreachable)."""
    from edgefleet.errors import ConfigError
    from edgefleet.server.broker import BrokerError, sync_revocations

    try:
        n = sync_revocations(settings)
    except (BrokerError, ConfigError) as e:
        log.warning("broker: revocations not replayed: %s", e)
    except Exception:
        log.exception("broker: revocations not replayed")
    else:
        log.info("broker: %d revoked device(s) replayed", n)


def _director_getter(app: FastAPI) -> Callable[[], DirectorRepository | None]:
    """The app's director repositories for work outside a request (the rollout controller): the same
    instance the routes use, made on first use; None while the server has no online TUF keys."""
    from edgefleet.server.errors import ApiError

    def get() -> DirectorRepository | None:
        try:
            return tuf_routes.director_repository(cast("Request", SimpleNamespace(app=app)))  # reads .app.state only
        except ApiError:
            return None

    return get


def create_app(settings: Settings, state: ServerState | None = None) -> FastAPI:
    """The server app: connects, migrates (per settings) and loads the CA unless ``state`` is given.
    Raises :class:`edgefleet.errors.ConfigError` when the server was never initialised."""
    st = state if state is not None else open_state(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        """Telemetry ingestion from the broker while the app runs, when ``mqtt_url`` is set."""
        ingester = None
        if settings.mqtt_url is not None:
            from edgefleet.server.telemetry.ingest import Ingester
            from edgefleet.server.telemetry.rollups import fleet_snapshot

            def reporting() -> Any:
                with st.sessions() as s:
                    return fleet_snapshot(s, utcnow(), settings.online_window)

            st.metrics.watch_fleet_telemetry(reporting)
            ingester = Ingester(settings, st.sessions, st.metrics)
            ingester.start(register_for=st)
            threading.Thread(target=_sync_revocations, args=(settings,), name="broker-sync", daemon=True).start()
        app.state.telemetry = ingester
        # Alert deliveries (webhooks; the alert topic through the ingester's client) from their durable outbox.
        from edgefleet.server.alerts.webhooks import DeliveryWorker, ingester_publisher

        worker = DeliveryWorker(settings, st.sessions, publish=ingester_publisher(st) if ingester is not None else None)
        worker.start()
        app.state.alert_worker = worker
        # Staged rollouts: every replica runs the controller; a lease lets one judge at a time.
        controller = None
        if settings.rollout_enabled:
            from edgefleet.server.rollouts.controller import RolloutController

            controller = RolloutController(st, _director_getter(app), interval=settings.rollout_interval,
                                           lease_ttl=settings.rollout_lease, registry=st.metrics.registry)
            controller.start()
        app.state.rollout_controller = controller
        try:
            yield
        finally:
            if controller is not None:
                await run_in_threadpool(controller.stop)
            await run_in_threadpool(worker.stop)
            if ingester is not None:
                await run_in_threadpool(ingester.stop)

    app = FastAPI(
        title="edgefleet fleet server",
        version=__version__,
        description="Model registry, device identity and check-in, operator API. Errors are JSON "
        '`{"error": ..., "field": ...}`.',
        lifespan=lifespan,
    )
    app.state.server = st
    install_handlers(app)
    for r in (checkin.router, registry.router, devices.router, identity.router, tokens.router):  # hot path first
        app.include_router(r)
    app.include_router(tuf_routes.router)
    app.include_router(telemetry_routes.router)
    app.include_router(alert_routes.router)
    app.include_router(rollouts.router)

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:  # on the loop, no I/O: answers while the pool or database is stuck
        return {"status": "ok", "version": __version__}

    @app.get("/metrics", tags=["ops"], response_class=Response)
    def metrics() -> Response:
        return Response(generate_latest(st.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    limits = {UPLOAD_ROUTE: settings.max_upload_bytes}
    app.add_middleware(
        BodyLimit,
        default=settings.max_json_bytes,
        per_route=limits,
        budget=settings.max_buffered_body_bytes,
        deadline=settings.body_timeout,
    )
    if settings.trusted_proxies:
        app.add_middleware(TrustedProxy, trusted=list(settings.trusted_proxies))
    app.add_middleware(MetricsMiddleware, metrics=st.metrics)
    return app
