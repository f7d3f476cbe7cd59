"""An in-process agent API on a free loopback port, for tests that talk HTTP to it."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn

from edgefleet.agent.api import InferenceApp
from edgefleet.agent.registry import ModelRegistry
from edgefleet.agent.runtime import load_model


@contextmanager
def running_api(models: dict[str, Path], max_body_bytes: int = 1 << 20) -> Iterator[tuple[str, InferenceApp]]:
    """Yield ("127.0.0.1:PORT", app) with ``models`` served under their keys."""
    registry = ModelRegistry()
    for name, path in models.items():
        registry.put(name, load_model(path))
    registry.expected = set(models)
    app = InferenceApp(registry, max_body_bytes=max_body_bytes)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("test API server did not start")
        time.sleep(0.01)
    try:
        yield f"127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(10)
        app.close()
        sock.close()
