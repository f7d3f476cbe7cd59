"""A small HTTP/1.1 server for the agent's ASGI app: asyncio for the sockets, h11 for the protocol.

Why not uvicorn: the agent is a resident process on devices with 1 GB of memory, and uvicorn brings
click, multiprocessing and its logging setup (~3 MB) for what a loopback API does not use. This
serves keep-alive, Content-Length and chunked bodies, ``Expect: 100-continue``, gzip/deflate bodies,
TCP and Unix sockets, and a graceful stop. h11 parses, so malformed requests are refused (400) by a
well-tested parser, never by this code.

It is also the agent's gatekeeper, because a device with 1 GB of RAM must survive any one client and
a web page in a browser on the device must not reach the loopback API. Before a body is read:

- ``Host`` must be on an allow-list (DNS rebinding: 421), any ``Origin`` must be on one (cross-site
  requests: 403; a Unix socket is not reachable from a browser and skips the ``Host`` check);
- a POST must be JSON or OIP binary (``application/octet-stream`` or ``Inference-Header-Content-Length``):
  anything else is a 415, so a browser's "simple" ``text/plain`` or form POST never reaches the app;
- the body is bounded by its kind's limit (JSON is small, binary tensors larger: 413), and every byte
  buffered counts against one budget shared by all connections (503 with ``Retry-After`` when full);
- gzip/deflate bodies are decompressed off the event loop, bounded (413) and charged to the budget.

Connections are capped (when full, the connection idle or in its headers the longest is closed to
make room, one that never completed a request first; when every one is busy, a 503), headers must
arrive within ``header_timeout`` (slowloris), a whole request within ``request_timeout`` (408), and
idle keep-alive connections are closed after ``keepalive_timeout``. Every error body is JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
import traceback
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import h11

__all__ = ["HttpError", "HttpServer", "Limits"]

log = logging.getLogger(__name__)

App = Callable[
    [dict[str, Any], Callable[[], Awaitable[dict[str, Any]]], Callable[[dict[str, Any]], Awaitable[None]]],
    Awaitable[None],
]
MAX_HEADER_BYTES = 64 * 1024
READ_CHUNK = 256 * 1024
COALESCE_BYTES = 256 * 1024  # a response's head and body up to this size go out in one write
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
HEADER_LENGTH = b"inference-header-content-length"


@dataclass(frozen=True)
class Limits:
    """What one request, and all of them together, may cost. Sizes in bytes, times in seconds."""

    max_body_bytes: int = 64 << 20  # a binary (octet-stream / OIP binary) body, on the wire and decoded
    max_json_bytes: int = 4 << 20  # a JSON body, on the wire and decoded
    max_decompressed_bytes: int = 64 << 20  # a gzip/deflate body once decoded (and its kind's limit)
    max_buffered_bytes: int = 96 << 20  # request bodies buffered at once, summed over all connections
    max_connections: int = 64  # open connections; more evict the idle ones, or get a 503
    header_timeout: float = 10.0  # from a request's first byte (or the connection) to its last header
    request_timeout: float = 60.0  # from the headers to the body's end; also bounds writing a response
    keepalive_timeout: float = 30.0  # an idle keep-alive connection is closed after this
    allowed_hosts: frozenset[str] = field(default_factory=lambda: frozenset(LOOPBACK_HOSTS))  # "*": any
    allowed_origins: frozenset[str] = frozenset()  # empty: any request with an Origin header is refused
    api_token: bytes | None = field(default=None, repr=False)  # Bearer token every request but OPEN_PATH needs


OPEN_PATH = "/v2/health/live"  # the one path an API token does not guard (liveness probes carry none)


def bearer_refusal(headers: list[tuple[bytes, bytes]], token: bytes) -> str | None:
    """Why a request without ``Authorization: Bearer <token>`` is refused, or None when it has it.
    Compared in constant time; the token is never part of the message."""
    given = b""
    for k, v in headers:
        if k == b"authorization":
            scheme, _, value = v.strip().partition(b" ")
            if scheme.lower() == b"bearer":
                given = value.strip()
            break
    if not given:
        return "this agent's API needs a token: send Authorization: Bearer <api.token>"
    if not hmac.compare_digest(given, token):
        return "wrong API token (Authorization: Bearer ...)"
    return None


class HttpError(Exception):
    """A request refused before it reaches the app; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or []


def error_body(message: str) -> bytes:
    """The JSON error body every refusal carries."""
    return json.dumps({"error": message}).encode()


def _host_name(value: str) -> str:
    """``Host`` without its port, lower case (``[::1]:8500`` -> ``[::1]``)."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[: value.find("]") + 1] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _media_type(value: bytes) -> str:
    return value.split(b";", 1)[0].strip().lower().decode("latin-1")


class _Budget:
    """Bytes buffered by all connections; the event loop is the only user, so no lock."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> None:
        """Raises :class:`HttpError` 503 when ``n`` more bytes would exceed the budget."""
        if self.used + n > self.limit:
            raise HttpError(
                503,
                f"the agent is buffering {self.used} bytes of requests, its {self.limit}-byte budget "
                f"has no room for {n} more; retry later",
                [(b"retry-after", b"1")],
            )
        self.used += n

    def give(self, n: int) -> None:
        self.used -= n


def _decompress(body: bytes, encoding: str, limit: int) -> bytearray:
    """Decode a gzip/deflate body to at most ``limit`` bytes (on a thread: it can take a while), a MiB
    at a time into one growing buffer, so the peak is the output once, not twice. Raises
    :class:`HttpError` 413 past the limit, 400 for data that is not one valid ``encoding`` stream.
    """
    d = zlib.decompressobj(31 if encoding == "gzip" else 15)
    out = bytearray()
    tail = body
    try:
        while not d.eof and len(out) <= limit:
            chunk = d.decompress(tail, 1 << 20)
            tail = d.unconsumed_tail
            if not chunk and not tail:
                break  # the input ended before the stream did
            out += chunk
    except zlib.error as e:
        out.clear()  # (the traceback keeps this frame alive)
        raise HttpError(400, f"body is not valid {encoding} data: {e}") from e
    if len(out) > limit:
        out.clear()
        raise HttpError(413, f"decompressed body is over the {limit}-byte limit")
    if not d.eof or d.unused_data:
        out.clear()
        raise HttpError(400, f"body is not one complete {encoding} stream")
    return out


def _forget(e: BaseException) -> None:
    """Clear the locals of the finished frames in ``e``'s traceback (and its context's).

    An exception caught here is often in a reference cycle: asyncio's StreamReader keeps the
    connection error it re-raises, whose traceback holds our frames, which hold the reader. Such a
    cycle keeps the connection's buffers (hundreds of KiB each, or a body) alive until the cycle
    collector runs, and big buffers do not make it run: without this, a client resetting
    connections mid-body grew the agent by tens of MiB.
    """
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        traceback.clear_frames(cur.__traceback__)
        cur = cur.__cause__ or cur.__context__


class _Connection:
    def __init__(self, server: HttpServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.limits = server.limits
        self.reader = reader
        self.writer = writer
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        self.busy = False  # reading a body, in the app, or writing a response: not evictable
        self.waiting_since = asyncio.get_running_loop().time()
        sock = writer.get_extra_info("socket")
        self.unix = sock is not None and sock.family == socket.AF_UNIX
        self.served = 0  # requests answered on this connection

    async def _next_event(self, deadline: float) -> Any:
        """The next h11 event; raises TimeoutError at the loop time ``deadline``. (``asyncio.timeout``,
        not ``wait_for``, whose future would add one more reference cycle: see :func:`_forget`.)"""
        loop = asyncio.get_running_loop()
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            if self.conn.they_are_waiting_for_100_continue:
                await self._send(h11.InformationalResponse(status_code=100, headers=[]))
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError
            async with asyncio.timeout(left):
                data = await self.reader.read(READ_CHUNK)
            self.conn.receive_data(data)

    async def _next_request(self) -> Any:
        """Wait up to ``keepalive_timeout`` for a request to start, then ``header_timeout`` for its head."""
        loop = asyncio.get_running_loop()
        self.waiting_since = loop.time()
        if self.served and not self.conn.trailing_data[0]:
            # keep-alive: idle until the next request's first byte
            async with asyncio.timeout(self.limits.keepalive_timeout):
                data = await self.reader.read(READ_CHUNK)
            self.conn.receive_data(data)
        return await self._next_event(loop.time() + self.limits.header_timeout)

    async def _send(self, *events: Any) -> None:
        """Send h11 events in one socket write (a response's head, body and end in one ``send``
        syscall, where each would cost one, with a wake-up of the reader on loopback; a body over
        :data:`COALESCE_BYTES` is written apart rather than copied behind its head)."""
        chunks = [c for c in (self.conn.send(e) for e in events) if c]
        if not chunks:
            return
        if len(chunks) == 1:
            self.writer.write(chunks[0])
        elif sum(len(c) for c in chunks) <= COALESCE_BYTES:
            self.writer.write(b"".join(chunks))
        else:
            for c in chunks:
                self.writer.write(c)
        if self.writer.transport.get_write_buffer_size() > READ_CHUNK:  # a client not reading
            async with asyncio.timeout(self.limits.request_timeout):
                await self.writer.drain()
        else:
            await self.writer.drain()

    async def _error(self, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        body = error_body(message)
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            with contextlib.suppress(h11.LocalProtocolError, ConnectionError, TimeoutError):
                await self._send(
                    h11.Response(
                        status_code=status,
                        headers=[
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"),
                            *(headers or []),
                        ],
                    ),
                    h11.Data(data=body),
                    h11.EndOfMessage(),
                )

    async def serve(self) -> None:
        try:
            while not self.server.stopping:
                try:
                    event = await self._next_request()
                except (TimeoutError, asyncio.IncompleteReadError) as e:
                    _forget(e)
                    return
                if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                    return
                if not isinstance(event, h11.Request):
                    return
                self.busy = True
                try:
                    await self._handle(event)
                except HttpError as e:
                    _forget(e)
                    await self._error(e.status, str(e), e.headers)
                finally:
                    self.busy = False
                self.served += 1
                if self.conn.our_state is not h11.DONE or self.conn.their_state is not h11.DONE:
                    return  # an early answer (413) or a Connection: close
                if self.server.stopping:
                    return
                try:
                    self.conn.start_next_cycle()
                except h11.LocalProtocolError:
                    return
        except h11.RemoteProtocolError as e:
            _forget(e)
            await self._error(e.error_status_hint, f"bad HTTP request: {e}")
        except (ConnectionError, TimeoutError) as e:
            _forget(e)
        finally:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()

    def _check(self, method: bytes, headers: list[tuple[bytes, bytes]]) -> int:
        """Refuse what must not reach the app; returns the body limit for this request.

        Raises :class:`HttpError` (421 Host, 403 Origin, 415 content type or encoding, 413 declared size).
        """
        lim = self.limits
        got = dict(headers)
        if sum(len(k) + len(v) for k, v in headers) > MAX_HEADER_BYTES:
            raise HttpError(431, f"request headers are over {MAX_HEADER_BYTES} bytes")
        host = got.get(b"host")
        if host is not None and not self.unix and "*" not in lim.allowed_hosts:
            name = _host_name(host.decode("latin-1"))
            if name not in lim.allowed_hosts:
                raise HttpError(
                    421, f"Host {name[:100]!r} is not allowed (api.allowed_hosts: {sorted(lim.allowed_hosts)})"
                )
        origin = got.get(b"origin")
        if origin is not None and "*" not in lim.allowed_origins:
            value = origin.decode("latin-1").strip().lower()
            if value not in lim.allowed_origins:
                raise HttpError(
                    403, f"Origin {value[:100]!r} is not allowed (api.allowed_origins: {sorted(lim.allowed_origins)})"
                )
        encoding = got.get(b"content-encoding", b"identity").strip().lower()
        if encoding not in (b"identity", b"gzip", b"deflate"):
            raise HttpError(
                415, f"unsupported Content-Encoding {encoding[:40].decode('latin-1')!r}; use gzip or deflate"
            )
        binary = HEADER_LENGTH in got
        if b"content-type" in got:
            media = _media_type(got[b"content-type"])
            # Images (for the predict extension) count as binary bodies; browsers must preflight them
            # (they are not CORS-safelisted types), so the Origin check above still holds.
            if media in ("application/octet-stream", "image/png", "image/jpeg"):
                binary = True
            elif media != "application/json" and not binary:
                if method != b"POST":
                    return lim.max_json_bytes
                raise HttpError(
                    415,
                    f"Content-Type {media[:60]!r} is not accepted; send application/json, or "
                    "application/octet-stream with Inference-Header-Content-Length (OIP binary)",
                )
        limit = lim.max_body_bytes if binary else lim.max_json_bytes
        declared = got.get(b"content-length")
        if declared is not None and int(declared) > limit:  # h11 has checked it is a number
            kind = "binary" if binary else "JSON"
            raise HttpError(413, f"request body of {int(declared)} bytes is over the {limit}-byte {kind} limit")
        return limit

    async def _read_body(self, limit: int, declared: int | None) -> bytes:
        """Read the body, charging its bytes to the budget as they arrive (the declared length up
        front). The caller gives back ``len(result)``; on an error, this does. The pieces are kept
        apart until the end (no reallocation copies while a client trickles a body in)."""
        budget = self.server.budget
        deadline = asyncio.get_running_loop().time() + self.limits.request_timeout
        chunks: list[bytes] = []
        size = reserved = 0
        try:
            if declared:
                budget.take(declared)
                reserved = declared
            while True:
                try:
                    event = await self._next_event(deadline)
                except TimeoutError:
                    raise HttpError(408, f"request body not received within {self.limits.request_timeout} s") from None
                if isinstance(event, h11.Data):
                    size += len(event.data)
                    if size > limit:
                        raise HttpError(413, f"request body is over the {limit}-byte limit")
                    if size > reserved:
                        budget.take(size - reserved)
                        reserved = size
                    chunks.append(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    raise ConnectionError("client went away mid-body")
        except BaseException:
            budget.give(reserved)
            # The traceback keeps this frame, and with it the chunks, alive until the cycle collector
            # runs (which megabytes of bytes do not trigger): drop them now.
            chunks.clear()
            raise
        budget.give(reserved - size)
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        return bytes(body)

    async def _handle(self, request: h11.Request) -> None:
        headers = [(k.lower(), v) for k, v in request.headers]
        token = self.limits.api_token
        path = unquote(request.target.decode("latin-1").partition("?")[0]).rstrip("/")
        if token is not None and path != OPEN_PATH:
            refusal = bearer_refusal(headers, token)
            if refusal is not None:  # before a byte of the body is read or counted against the budget
                raise HttpError(401, refusal, [(b"www-authenticate", b'Bearer realm="edgefleet-agent"')])
        limit = self._check(request.method, headers)
        got = dict(headers)
        declared = int(got[b"content-length"]) if b"content-length" in got else None
        budget = self.server.budget
        body: bytes | bytearray = await self._read_body(limit, declared)
        held = len(body)
        try:
            encoding = got.get(b"content-encoding", b"identity").strip().lower().decode()
            if encoding != "identity" and body:
                out_limit = min(limit, self.limits.max_decompressed_bytes)
                budget.take(out_limit)
                try:
                    body = await asyncio.get_running_loop().run_in_executor(
                        None, _decompress, bytes(body), encoding, out_limit
                    )
                finally:
                    budget.give(out_limit)
                budget.take(len(body))  # the compressed buffer is released below, with `held`
                budget.give(held)
                held = len(body)
                headers = [(k, v) for k, v in headers if k != b"content-encoding"]
            await self._call_app(request, headers, body)
        finally:
            budget.give(held)
            del body

    async def _call_app(
        self, request: h11.Request, headers: list[tuple[bytes, bytes]], body: bytes | bytearray
    ) -> None:
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
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        started = False
        head: h11.Response | None = None  # sent with the first body message, in the same write

        async def send(message: dict[str, Any]) -> None:
            nonlocal started, head
            if message["type"] == "http.response.start":
                started = True
                head = h11.Response(status_code=message["status"], headers=message.get("headers", []))
            elif message["type"] == "http.response.body":
                events: list[Any] = [head] if head is not None else []
                head = None
                if message.get("body"):
                    events.append(h11.Data(data=message["body"]))
                if not message.get("more_body"):
                    events.append(h11.EndOfMessage())
                await self._send(*events)

        try:
            await self.server.app(scope, receive, send)
        except (ConnectionError, TimeoutError):
            raise
        except Exception as e:
            log.exception("unhandled error in %s %s", scope["method"], path)
            _forget(e)
            if head is not None or not started:  # nothing of the response went out yet
                await self._error(500, "internal error; see the agent's log")
            return
        if head is not None:  # a start with no body message: an empty response
            await self._send(head, h11.EndOfMessage())


class HttpServer:
    """Serves an ASGI app on already bound sockets until :meth:`stop`, within :class:`Limits`."""

    def __init__(self, app: App, limits: Limits | None = None) -> None:
        self.app = app
        self.limits = limits or Limits()
        self.budget = _Budget(self.limits.max_buffered_bytes)
        self.stopping = False
        self._servers: list[asyncio.Server] = []
        self._connections: set[_Connection] = set()

    def _make_room(self) -> bool:
        """At the connection cap, close the connection idle (or in its headers) the longest, taking
        first those that never completed a request (a flood, a slowloris) over a client's keep-alive."""
        if len(self._connections) < self.limits.max_connections:
            return True
        idle = [c for c in self._connections if not c.busy]
        if not idle:
            return False
        victim = min(idle, key=lambda c: (c.served > 0, c.waiting_since))
        self._connections.discard(victim)
        victim.writer.close()
        return True

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._make_room():
            body = error_body(f"the agent is serving its {self.limits.max_connections} connections; retry later")
            writer.write(
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
                b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.drain(), 1.0)
            writer.close()
            return
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
