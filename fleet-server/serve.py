"""Run the fleet server under uvicorn in this process (``edgefleet server run`` calls :func:`serve`)."""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgefleet.server.settings import Settings

__all__ = ["serve"]


async def serve(settings: Settings, log_level: str, access_log: bool) -> int:
    """Serve until stopped (SIGINT/SIGTERM); return the exit code: 0 after a clean stop, 1 if it never started."""
    import uvicorn

    from edgefleet.agent.sdnotify import Notifier
    from edgefleet.server.app import create_app

    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        ssl_certfile=settings.tls_certfile,
        ssl_keyfile=settings.tls_keyfile,
        log_level=log_level,
        access_log=access_log,
        lifespan="off",
        proxy_headers=bool(settings.trusted_proxies),
        forwarded_allow_ips=settings.trusted_proxies or None,
        server_header=False,
    )
    server = uvicorn.Server(config)
    notifier = Notifier()
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        sock = server.servers[0].sockets[0].getsockname()
        scheme = "https" if settings.tls_certfile else "http"
        print(f"edgefleet server listening on {scheme}://{sock[0]}:{sock[1]}", file=sys.stderr, flush=True)
        notifier.ready(status=f"listening on {sock[0]}:{sock[1]}")
        interval = notifier.watchdog_interval()
        while not task.done():
            if interval:
                notifier.watchdog()
            await asyncio.wait({task}, timeout=(interval or 60) / 2)
    notifier.stopping()
    await task
    return 0 if server.started else 1
