"""An in-process agent API (the agent's own HTTP server) on a free loopback port, in a thread."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edgefleet.agent.api import InferenceApp
from edgefleet.agent.http import HttpServer, Limits
from edgefleet.agent.registry import ModelRegistry
from edgefleet.agent.runtime import load_model


@contextmanager
def running_api(
    models: dict[str, Path],
    max_body_bytes: int = 1 << 20,
    token: bytes | None = None,
    max_image_pixels: int = 8 << 20,
    recent_predictions: int = 1024,
    **limits: Any,
) -> Iterator[tuple[str, InferenceApp]]:
    """Yield ("127.0.0.1:PORT", app) with ``models`` served under their keys; ``token``,
    ``max_image_pixels`` and ``recent_predictions`` are the app's, ``limits`` other :class:`Limits`
    fields (the JSON limit defaults to the body limit here)."""
    registry = ModelRegistry()
    for name, path in models.items():
        registry.put(name, load_model(path))
    registry.expected = set(models)
    app = InferenceApp(
        registry,
        max_body_bytes=max_body_bytes,
        max_json_bytes=limits.get("max_json_bytes", max_body_bytes),
        token=token,
        max_image_pixels=max_image_pixels,
        recent_predictions=recent_predictions,
    )
    limits.setdefault("max_json_bytes", max_body_bytes)
    try:
        with serving(app, Limits(max_body_bytes=max_body_bytes, api_token=token, **limits)) as url:
            yield url, app
    finally:
        app.close()


@contextmanager
def serving(app: Any, limits: Limits | None = None) -> Iterator[str]:
    """Yield "127.0.0.1:PORT" with ``app`` on the agent's HTTP server, on a free loopback port, in a thread."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    server = HttpServer(app, limits or Limits())
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.start([sock]))
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    if not started.wait(10):
        raise RuntimeError("test API server did not start")
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(5), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        sock.close()
