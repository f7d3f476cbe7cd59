"""Run the fleet server under uvicorn in this process (``edgefleet server run`` calls :func:`serve`).

uvicorn bounds the size of a request's headers (``h11_max_incomplete_event_size``) and the idle time
between requests (``timeout_keep_alive``), but not the time a request's headers or body take to
arrive, nor the number of open connections. :class:`GuardedH11Protocol` adds, per connection:

- a **header deadline**: a request's line and headers must be complete within ``header_timeout`` of
  its first byte (or of the connection, for a connection that sends nothing); else a JSON 408 and
  the connection is closed (slowloris);
- a **body idle timeout**: a request body that stops arriving for ``body_idle_timeout`` (while the
  server is reading it, not while the application holds it back) closes the connection, and the
  application sees the client go away (half-sent bodies);
- a **connection cap**: past ``max_connections`` open connections a new one is answered with a JSON
  503 and ``Retry-After`` and closed at once;
- closing, not draining, a connection whose request was answered before its body was read (uvicorn
  would read and discard any amount of it);
- JSON (not plain text) for the requests h11 refuses (400, or 431 for headers over the limit).

The listening socket is bound here first, so a busy port is one :class:`ConfigError` line, not a
uvicorn log line and an exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from edgefleet.errors import ConfigError

if TYPE_CHECKING:
    from edgefleet.server.settings import Settings

__all__ = ["ConnectionLimits", "GuardedH11Protocol", "bind", "protocol_for", "serve"]

_PHRASES = {
    400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large", 503: "Service Unavailable"
}
RETRY_AFTER = 1  # seconds, on a 503 for too many connections


@dataclass(frozen=True)
class ConnectionLimits:
    """Per-connection bounds (see the module docstring); times in seconds, sizes in bytes."""

    header_timeout: float
    body_idle_timeout: float
    max_connections: int
    max_header_bytes: int


def _raw_error(status: int, message: str, field: str | None, retry_after: int | None = None) -> bytes:
    body = json.dumps({"error": message, "field": field}).encode()
    head = [
        f"HTTP/1.1 {status} {_PHRASES.get(status, 'Error')}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    if retry_after is not None:
        head.append(f"retry-after: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline, a body idle timeout and a connection cap."""

    limits: ClassVar[ConnectionLimits]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._phase = "headers"  # "headers" | "body" | "app": what the connection is waiting for
        self._got_bytes = False

    # -- timers
    def _arm(self, delay: float, callback: Any) -> None:
        self._disarm()
        self._timer = self.loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _refuse(self, status: int, message: str, field: str | None, retry_after: int | None = None) -> None:
        self._disarm()
        if not self.transport.is_closing():
            self.transport.write(_raw_error(status, message, field, retry_after))
            self.transport.close()

    def _headers_late(self) -> None:
        self._timer = None
        if self._phase != "headers" or self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is being answered; its own timers apply
        if self._got_bytes:
            limit = self.limits.header_timeout
            self._refuse(408, f"headers: not complete within {limit:g} s", "headers")
        else:
            self.transport.close()

    def _body_idle(self) -> None:
        self._timer = None
        if self._phase != "body" or self.transport.is_closing():
            return
        cycle = self.cycle
        if self.flow.read_paused or (cycle is not None and cycle.waiting_for_100_continue):
            self._arm(self.limits.body_idle_timeout, self._body_idle)  # the application is not reading yet
            return
        limit = self.limits.body_idle_timeout
        self.logger.info("closing a connection whose request body stalled for %g s", limit)
        if cycle is not None and not cycle.response_started:
            self.transport.write(_raw_error(408, f"body: nothing arrived for {limit:g} s", "body"))
        if cycle is not None:
            cycle.disconnected = True  # the application's receive() sees the client go; its answer is dropped
            cycle.message_event.set()
        self.transport.close()

    # -- protocol
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self.logger.warning("refusing a connection: %d open (max_connections)", len(self.connections) - 1)
            self._refuse(503, "connections: the server is at its connection limit; retry later", None, RETRY_AFTER)
            return
        self._arm(self.limits.header_timeout, self._headers_late)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._phase == "app" and self.conn.their_state is h11.DONE and self.cycle is not None \
                and self.cycle.response_complete:
            self._phase = "headers"  # the next request on a kept-alive connection
        if self._phase == "headers" and not self._got_bytes:
            self._got_bytes = True
            self._arm(self.limits.header_timeout, self._headers_late)  # the deadline runs from the first byte
        super().data_received(data)
        self._after_events()

    def _after_events(self) -> None:
        if self.transport.is_closing():
            self._disarm()
            return
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            if self._phase != "body":
                self._phase = "body"
            self._arm(self.limits.body_idle_timeout, self._body_idle)  # restarted by every chunk
        elif state in (h11.DONE, h11.MUST_CLOSE):
            self._phase = "app"
            self._got_bytes = False
            self._disarm()

    def on_response_complete(self) -> None:
        if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
            self._disarm()  # answered before the body was read (401, 413...): close rather than drain the rest
            self.transport.close()
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._phase = "headers"  # uvicorn's keep-alive timer covers the wait for the next request
            self._got_bytes = False
            self._after_events()  # a pipelined request may already be under way

    def send_400_response(self, msg: str) -> None:
        buffered, _ = self.conn.trailing_data
        if len(buffered) >= self.limits.max_header_bytes:
            self._refuse(431, f"headers: more than {self.limits.max_header_bytes} bytes", "headers")
        else:
            self._refuse(400, "request: not valid HTTP/1.1", None)


def protocol_for(limits: ConnectionLimits) -> type[GuardedH11Protocol]:
    """A :class:`GuardedH11Protocol` class bound to ``limits`` (uvicorn builds protocols by class)."""
    return type("EdgefleetH11Protocol", (GuardedH11Protocol,), {"limits": limits})


def bind(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for ``host:port`` (every address it resolves to). Raises :class:`ConfigError`
    when the port is in use, the address is not this machine's, or the host does not resolve."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"host: cannot listen on {host!r}: {e.strerror}") from e
    socks: list[socket.socket] = []
    seen: set[tuple[Any, ...]] = set()
    try:
        for family, kind, proto, _, addr in infos:
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(addr)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise ConfigError(f"port {port} on {host} is in use (set --port or port in server.toml)") from e
                if e.errno == errno.EACCES:
                    raise ConfigError(f"port {port} on {host}: permission denied (ports below 1024 need root)") from e
                raise ConfigError(f"host: cannot listen on {host}:{port}: {e.strerror}") from e
            sock.set_inheritable(True)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def _server_class() -> type[Any]:
    import uvicorn

    class _Server(uvicorn.Server):  # type: ignore[misc]
        """uvicorn's server, but a SIGTERM or SIGINT is a request to stop, not a death: after the graceful
        shutdown uvicorn re-raises the signal it caught, so the process would end *by* SIGTERM (status 143)
        instead of exiting 0 with ``STOPPING=1`` sent to systemd."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return _Server


async def serve(settings: Settings, log_level: str, access_log: bool) -> int:
    """Serve until stopped (SIGINT/SIGTERM); return the exit code: 0 after a clean stop, 1 if it never
    started. Raises :class:`ConfigError` when the port is in use or the server was never initialised."""
    import uvicorn

    from edgefleet.agent.sdnotify import Notifier
    from edgefleet.server.app import create_app

    sockets = bind(settings.host, settings.port)
    try:
        app = create_app(settings)
    except BaseException:
        for s in sockets:
            s.close()
        raise
    limits = ConnectionLimits(
        header_timeout=settings.header_timeout,
        body_idle_timeout=settings.body_idle_timeout,
        max_connections=settings.max_connections,
        max_header_bytes=settings.max_header_bytes,
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=protocol_for(limits),
        ssl_certfile=settings.tls_certfile,
        ssl_keyfile=settings.tls_keyfile,
        log_level=log_level,
        access_log=access_log,
        lifespan="on",  # the app's lifespan runs telemetry ingestion (when mqtt_url is set)
        proxy_headers=False,  # the app reads X-Forwarded-* itself, keeping the proxy's own address (app.py)
        server_header=False,
        timeout_keep_alive=settings.keep_alive_timeout,
        h11_max_incomplete_event_size=settings.max_header_bytes,
    )
    server = _server_class()(config)
    notifier = Notifier()
    task = asyncio.create_task(server.serve(sockets=sockets))
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
