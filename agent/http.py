"""A small HTTP/1.1 server for the agent's ASGI app: asyncio for the sockets, h11 for the protocol.

Why not uvicorn: the agent is a resident process on devices with 1 GB of memory, and uvicorn brings
click, multiprocessing and its logging setup (~3 MB) for features a loopback API does not use. This
server speaks what the local API needs: keep-alive, Content-Length and chunked bodies,
``Expect: 100-continue``, a body size limit, idle timeouts, TCP and Unix sockets, and a graceful
stop that lets requests in flight finish. h11 does the parsing, so malformed requests are refused
by a well-tested parser (400), never by this code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

import h11

__all__ = ["HttpServer"]

log = logging.getLogger(__name__)

App = Callable[
    [dict[str, Any], Callable[[], Awaitable[dict[str, Any]]], Callable[[dict[str, Any]], Awaitable[None]]],
    Awaitable[None],
]
MAX_HEADER_BYTES = 64 * 1024
READ_CHUNK = 256 * 1024


class _Connection:
    def __init__(self, server: HttpServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        self.busy = False

    async def _next_event(self, timeout: float) -> Any:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            if self.conn.they_are_waiting_for_100_continue:
                await self._send(h11.InformationalResponse(status_code=100, headers=[]))
            data = await asyncio.wait_for(self.reader.read(READ_CHUNK), timeout)
            self.conn.receive_data(data)

    async def _send(self, event: Any) -> None:
        data = self.conn.send(event)
        if data:
            self.writer.write(data)
            await self.writer.drain()

    async def _error(self, status: int, message: str) -> None:
        body = ('{"error": "' + message.replace('"', "'") + '"}').encode()
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            with contextlib.suppress(h11.LocalProtocolError, ConnectionError):
                await self._send(
                    h11.Response(
                        status_code=status,
                        headers=[
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"),
                        ],
                    )
                )
                await self._send(h11.Data(data=body))
                await self._send(h11.EndOfMessage())

    async def serve(self) -> None:
        try:
            while not self.server.stopping:
                try:
                    event = await self._next_event(self.server.keepalive_timeout)
                except (TimeoutError, asyncio.IncompleteReadError):
                    return
                if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                    return
                if not isinstance(event, h11.Request):
                    return
                self.busy = True
                try:
                    await self._handle(event)
                finally:
                    self.busy = False
                if self.conn.our_state is not h11.DONE or self.conn.their_state is not h11.DONE:
                    return  # an early answer (413) or a Connection: close
                if self.server.stopping:
                    return
                try:
                    self.conn.start_next_cycle()
                except h11.LocalProtocolError:
                    return
        except h11.RemoteProtocolError as e:
            await self._error(e.error_status_hint, f"bad HTTP request: {e}")
        except (ConnectionError, TimeoutError):
            pass
        finally:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()

    async def _handle(self, request: h11.Request) -> None:
        limit = self.server.max_body_bytes
        headers = [(k.lower(), v) for k, v in request.headers]
        if sum(len(k) + len(v) for k, v in headers) > MAX_HEADER_BYTES:
            await self._error(431, f"request headers are over {MAX_HEADER_BYTES} bytes")
            return
        declared = next((v for k, v in headers if k == b"content-length"), None)
        if declared is not None and int(declared) > limit:  # h11 has checked it is a number
            await self._error(413, f"request body of {int(declared)} bytes is over the {limit}-byte limit")
            return
        chunks: list[bytes] = []
        size = 0
        too_big = False
        while True:
            event = await self._next_event(self.server.request_timeout)
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > limit:
                    too_big = True
                    break
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                return
        if too_big:
            await self._error(413, f"request body is over the {limit}-byte limit")
            return
        target = request.target.decode("latin-1")
        raw_path, _, query = target.partition("?")
        path = unquote(raw_path)  # ASGI's path is percent-decoded
        scope = {
            "type": "http",
            "http_version": request.http_version.decode(),
            "method": request.method.decode(),
            "path": path,
            "raw_path": raw_path.encode("latin-1"),
            "query_string": query.encode(),
            "headers": headers,
            "scheme": "http",
            "server": None,
            "client": None,
        }
        body = b"".join(chunks)
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        started = False

        async def send(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                await self._send(h11.Response(status_code=message["status"], headers=message.get("headers", [])))
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    await self._send(h11.Data(data=message["body"]))
                if not message.get("more_body"):
                    await self._send(h11.EndOfMessage())

        try:
            await self.server.app(scope, receive, send)
        except Exception:
            log.exception("unhandled error in %s %s", scope["method"], path)
            if not started:
                await self._error(500, "internal error; see the agent's log")


class HttpServer:
    """Serves an ASGI app on already bound sockets until :meth:`stop`."""

    def __init__(
        self,
        app: App,
        max_body_bytes: int,
        keepalive_timeout: float = 30.0,
        request_timeout: float = 60.0,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.keepalive_timeout = keepalive_timeout
        self.request_timeout = request_timeout
        self.stopping = False
        self._servers: list[asyncio.Server] = []
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Connection(self, reader, writer)
        self._connections.add(conn)
        try:
            await conn.serve()
        finally:
            self._connections.discard(conn)

    async def start(self, sockets: list[socket.socket]) -> None:
        for sock in sockets:
            if sock.family == socket.AF_UNIX:
                server = await asyncio.start_unix_server(self._accept, sock=sock, limit=READ_CHUNK)
            else:
                server = await asyncio.start_server(self._accept, sock=sock, limit=READ_CHUNK)
            self._servers.append(server)

    async def stop(self, timeout: float) -> None:
        """Stop taking connections, close idle ones, and wait up to ``timeout`` s for the busy ones."""
        self.stopping = True
        for server in self._servers:
            server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._connections and loop.time() < deadline:
            for conn in list(self._connections):
                if not conn.busy:
                    conn.writer.close()
            await asyncio.sleep(0.02)
        for conn in list(self._connections):
            conn.writer.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
