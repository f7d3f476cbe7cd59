"""A hostile network for the updater's attack tests: a threaded HTTP reverse proxy on loopback between
an agent and the real fleet server, with hooks per path.

Every request is forwarded to the upstream server as it came (method, path, headers, body; ``Host``
rewritten, hop-by-hop headers dropped) unless a hook whose pattern (a regular expression, full match on
the path without its query) matches answers instead. A hook gets the :class:`Request` and the
:class:`Proxy`; it may call :meth:`Proxy.forward` (to the same path or another one, with other
headers) and returns the :class:`Reply` to send. Hooks made here:

* :func:`rewrite` - the upstream answer with its body changed (bytes flipped in transit);
* :func:`serve` - these bytes instead of the upstream's (another bundle), as a plain 200;
* :func:`replay` - a reply recorded earlier (:meth:`Proxy.last`), without asking the server;
* :func:`endless` - the upstream body, then filler for as long as the client reads (no length),
  optionally held back until the test says go;
* :func:`not_modified` - 304 to every check-in, the client's own ETag echoed;
* :func:`served_from` - another path's answer (another device's metadata) with other credentials.

What the proxy did is recorded: every :class:`Exchange` (status, body bytes written to the socket, how
the writing ended: ``complete``, ``peer closed: ...``, ``cap``, ``timeout``), and the last 2xx upstream
reply of every path (:meth:`Proxy.last`), which is what a replay sends. Answers always close the
connection (``Connection: close``): an endless body is delimited by the close, and no reply can leak
into the next one.
"""

from __future__ import annotations

import dataclasses
import http.client
import itertools
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "Exchange",
    "Hook",
    "Proxy",
    "Reply",
    "Request",
    "endless",
    "not_modified",
    "replay",
    "rewrite",
    "serve",
    "served_from",
]

# Headers that describe one hop, not the message: never copied across the proxy.
HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                 "transfer-encoding", "upgrade", "content-length", "host", "date", "server"})
ENDLESS_CAP = 256 << 20  # bytes: an endless body stops here even if the client never hangs up (a bug)
FILLER = b"\0" * (64 << 10)


@dataclass(frozen=True)
class Request:
    """A request as the client sent it: ``path`` with its query, header names in lower case."""

    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes

    @property
    def route(self) -> str:
        """The path without its query (what hook patterns match)."""
        return self.path.split("?", 1)[0]


@dataclass(frozen=True)
class Reply:
    """An answer to send: status, end-to-end headers, body; ``then``: more data sent after the body until
    it ends or the client hangs up (the reply then has no Content-Length: the close ends it)."""

    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    then: Iterable[bytes] | None = None

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def replace(self, **changes: Any) -> Reply:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Exchange:
    """One request the proxy answered: its status and the body bytes written to the socket (``sendall``
    returned), and how writing ended."""

    method: str
    path: str
    status: int
    sent: int
    ended: str

    @property
    def route(self) -> str:
        return self.path.split("?", 1)[0]


Hook = Callable[[Request, "Proxy"], Reply]


class Proxy:
    """A reverse proxy to ``upstream`` (``http://host:port``) on 127.0.0.1, any free port (:attr:`url`).
    ``timeout`` seconds bounds each upstream request and each write to a client that stopped reading.
    A context manager: :meth:`start` on entry, :meth:`close` on exit."""

    def __init__(self, upstream: str, timeout: float = 30.0) -> None:
        parts = urlsplit(upstream)
        assert parts.scheme == "http" and parts.hostname, f"upstream: {upstream!r} is not an http:// URL"
        self.upstream_host, self.upstream_port = parts.hostname, parts.port or 80
        self.timeout = timeout
        self._hooks: dict[str, tuple[re.Pattern[str], Hook]] = {}
        self._last: dict[str, Reply] = {}
        self._exchanges: list[Exchange] = []
        self._lock = threading.Lock()
        self.closing = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> Proxy:
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop accepting, end endless bodies, close the listening socket."""
        self.closing.set()
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # hooks -----------------------------------------------------------------------------------------

    def on(self, pattern: str, hook: Hook) -> None:
        """Answer requests whose path (no query) fully matches ``pattern`` with ``hook`` (replacing a hook
        of the same pattern; the hook set first wins when several match)."""
        with self._lock:
            self._hooks[pattern] = (re.compile(pattern), hook)

    def off(self, pattern: str) -> None:
        with self._lock:
            self._hooks.pop(pattern, None)

    def clear(self) -> None:
        with self._lock:
            self._hooks.clear()

    def _hook(self, route: str) -> Hook | None:
        with self._lock:
            return next((h for rx, h in self._hooks.values() if rx.fullmatch(route)), None)

    # what happened ---------------------------------------------------------------------------------

    def exchanges(self, pattern: str | None = None) -> list[Exchange]:
        """Every exchange so far (whose path fully matches ``pattern``, when given), oldest first."""
        rx = re.compile(pattern) if pattern is not None else None
        with self._lock:
            return [x for x in self._exchanges if rx is None or rx.fullmatch(x.route)]

    def last(self, route: str) -> Reply | None:
        """The last 2xx reply the upstream server gave for ``route`` (a path without query), or None:
        what an attacker who recorded the traffic replays."""
        with self._lock:
            return self._last.get(route)

    def _log(self, x: Exchange) -> None:
        with self._lock:
            self._exchanges.append(x)

    # upstream --------------------------------------------------------------------------------------

    def forward(self, req: Request, path: str | None = None, headers: Mapping[str, str] | None = None) -> Reply:
        """Send ``req`` upstream (to ``path`` instead of its own, with ``headers`` set on top of its own)
        and return the whole answer (a 2xx is kept as :meth:`last` of the path asked for). A server that
        cannot be reached is a 502."""
        target = path or req.path
        hdrs = {k: v for k, v in req.headers.items() if k not in HOP}
        hdrs.update({k.lower(): v for k, v in (headers or {}).items()})
        hdrs["accept-encoding"] = "identity"
        conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=self.timeout)
        try:
            conn.request(req.method, target, body=req.body or None, headers=hdrs)
            resp = conn.getresponse()
            reply = Reply(resp.status, tuple((k, v) for k, v in resp.getheaders() if k.lower() not in HOP),
                          resp.read())
        except (OSError, http.client.HTTPException) as e:
            return Reply(502, (("content-type", "text/plain"),), f"proxy: upstream: {e}".encode())
        finally:
            conn.close()
        if 200 <= reply.status < 300:
            with self._lock:
                self._last[target.split("?", 1)[0]] = reply
        return reply


def _handler(proxy: Proxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the exchanges are the log

        def _serve(self) -> None:
            n = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(n) if n else b""
            req = Request(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
            hook = proxy._hook(req.route)
            try:
                reply = hook(req, proxy) if hook is not None else proxy.forward(req)
            except Exception as e:  # a broken hook is a 500 the test sees in the exchanges, not a hang
                reply = Reply(500, (("content-type", "text/plain"),), f"proxy hook: {type(e).__name__}: {e}".encode())
            self.connection.settimeout(proxy.timeout)
            self.send_response(reply.status)
            for k, v in reply.headers:
                self.send_header(k, v)
            if reply.then is None and reply.status not in (204, 304):
                self.send_header("Content-Length", str(len(reply.body)))
            self.send_header("Connection", "close")
            sent, ended = 0, "complete"
            try:
                self.end_headers()
                if reply.body:
                    self.wfile.write(reply.body)
                    sent = len(reply.body)
                for chunk in reply.then or ():
                    if proxy.closing.is_set():
                        ended = "proxy stopped"
                        break
                    if sent >= ENDLESS_CAP:
                        ended = "cap"
                        break
                    self.wfile.write(chunk)  # sendall: counted once the kernel took all of it
                    sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError) as e:
                ended = f"peer closed: {type(e).__name__}"
            except TimeoutError:
                ended = "timeout"
            proxy._log(Exchange(req.method, req.path, reply.status, sent, ended))
            self.close_connection = True

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _serve

    return Handler


# hooks ---------------------------------------------------------------------------------------------


def rewrite(change: Callable[[bytes], bytes]) -> Hook:
    """The upstream answer with ``change(body)`` as its body when it is a 200 or 206."""
    def hook(req: Request, proxy: Proxy) -> Reply:
        reply = proxy.forward(req)
        return reply.replace(body=change(reply.body)) if reply.status in (200, 206) else reply

    return hook


def serve(data: bytes, content_type: str = "application/octet-stream") -> Hook:
    """``data`` as a 200 whatever was asked (a Range included), without asking the server."""
    reply = Reply(200, (("content-type", content_type),), data)
    return lambda req, proxy: reply


def replay(reply: Reply) -> Hook:
    """``reply`` (recorded earlier) for every request, without asking the server."""
    return lambda req, proxy: reply


def endless(filler: bytes = FILLER, hold: threading.Event | None = None) -> Hook:
    """The upstream body (a 200), then ``filler`` again and again until the client hangs up; with
    ``hold``, the filler starts only once that event is set (the client waits at the end of the real
    body meanwhile: what it wrote so far can be looked at)."""
    def more(proxy: Proxy) -> Iterator[bytes]:
        while hold is not None and not hold.wait(0.1):
            if proxy.closing.is_set():
                return
        yield from itertools.repeat(filler)

    def hook(req: Request, proxy: Proxy) -> Reply:
        reply = proxy.forward(req)
        if reply.status != 200:
            return reply
        return reply.replace(then=more(proxy))

    return hook


def not_modified() -> Hook:
    """304 Not Modified with the client's own If-None-Match as the ETag: "nothing changed", forever."""
    def hook(req: Request, proxy: Proxy) -> Reply:
        etag = req.headers.get("if-none-match")
        return Reply(304, (("etag", etag),) if etag else ())

    return hook


def served_from(pattern: str, replacement: str, headers: Mapping[str, str] | None = None) -> Hook:
    """The upstream answer for the path ``re.sub(pattern, replacement, path)``, asked with ``headers``
    (another caller's credentials) instead of the client's."""
    def hook(req: Request, proxy: Proxy) -> Reply:
        return proxy.forward(req, re.sub(pattern, replacement, req.path), headers)

    return hook
