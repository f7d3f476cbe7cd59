"""Request-body limits, enforced before the bytes are read: a pure ASGI middleware.

uvicorn and FastAPI put no bound on a body (FastAPI reads a whole JSON body before pydantic looks at
it), so :class:`BodyLimit` sits in front of the router. Each request gets the limit of its route
(``(method, route template) -> bytes``, else the default for JSON routes):

- a ``Content-Length`` over the limit is refused with a JSON 413 before any of the body is read;
- a body without one (chunked) is counted as it arrives, and refused once it passes the limit: the
  413 is sent (when no response has started) with ``Connection: close``, the application sees its
  ``receive()`` raise :class:`BodyTooLarge`, and whatever the application sends afterwards is dropped;
- a ``Content-Length`` that is not a non-negative integer is a JSON 400;
- bodies the application holds in memory (every route but those given their own limit, which stream
  to disk) share a budget, because a parsed JSON body takes up to ~25 times its size (1 MiB of
  ``[{},{},...]`` is 25 MiB of dicts) and every request in flight holds its own: a request with a
  ``Content-Length`` waits, unread, until its bytes fit in the budget (a JSON 503 with
  ``Retry-After`` if they do not within the deadline); a chunked one is counted as it arrives and
  refused with the same 503 once the bodies in flight pass the budget. Each must then arrive within
  the deadline (a JSON 408 past it: a body dripped a byte at a time cannot hold its share for ever).

A route with its own limit is found by its template, before the router runs (the template is left
in the scope as ``edgefleet.route``, for the metrics of requests refused here). Starlette's own
``RequestBodyLimitMiddleware`` (``FastAPI(max_body_size=...)``) refuses only once the application
reads, in plain text, and keeps the connection draining the rest; this refuses at once, in JSON, and
closes it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from typing import Any

from starlette.routing import compile_path

__all__ = ["ROUTE_KEY", "BodyLimit", "BodyTooLarge", "error_response"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

ROUTE_KEY = "edgefleet.route"  # scope key: the template of a route with its own body limit


class BodyTooLarge(Exception):
    """Raised from ``receive()`` once a body passes its route's limit or the budget (the refusal is
    already sent)."""


def error_response(status: int, message: str, field: str | None, extra_headers: Iterable[tuple[bytes, bytes]] = ()
                   ) -> tuple[Message, Message]:
    """The two ASGI messages of a JSON error ``{"error": message, "field": field}`` that closes the
    connection (the rest of the request is never read)."""
    body = json.dumps({"error": message, "field": field}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *extra_headers,
    ]
    return (
        {"type": "http.response.start", "status": status, "headers": headers},
        {"type": "http.response.body", "body": body, "more_body": False},
    )


class BodyLimit:
    """Bound every request body by its route's limit, and the bodies held at once by a budget (see the
    module docstring).

    ``per_route`` maps ``(METHOD, path template)`` (``/api/v1/models``, ``/x/{name}``) to a limit in
    bytes, for routes that stream their body away (to disk); ``default`` bounds every other request,
    whose body the application holds in memory, ``budget`` bounds the sum of those bodies over all
    requests in flight (at least ``default``), and ``deadline`` (seconds) the time each may take to
    arrive, counted from its headers. Raises ValueError for a negative limit or a template
    starlette cannot compile.
    """

    def __init__(
        self,
        app: ASGIApp,
        default: int,
        per_route: Mapping[tuple[str, str], int],
        budget: int,
        deadline: float = 30.0,
    ) -> None:
        if default < 0 or budget < 0 or any(v < 0 for v in per_route.values()) or deadline <= 0:
            raise ValueError("body limits must be non-negative byte counts and the deadline positive")
        self.app = app
        self.deadline = deadline
        self.default = default
        self.budget = max(budget, default)
        self.in_use = 0  # bytes of in-memory bodies admitted and not yet finished (one event loop: no lock)
        self._waiters: list[asyncio.Future[None]] = []  # requests waiting for budget, woken by each release
        self.routes = [(method, template, compile_path(template)[0], limit)
                       for (method, template), limit in per_route.items()]

    def limit_for(self, scope: Scope) -> tuple[int, bool]:
        """The body limit of the request's route, bytes, and whether its body counts against the budget
        (the template of a route with its own limit goes in ``scope[ROUTE_KEY]``)."""
        for method, template, regex, limit in self.routes:
            if scope["method"] == method and regex.match(scope["path"]):
                scope[ROUTE_KEY] = template
                return limit, False
        return self.default, True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared: int | None = None
        chunked = False
        for name, value in scope["headers"]:
            if name == b"content-length":
                text = value.decode("latin-1").strip()
                if not text.isdigit() or len(text) > 19:
                    await _refuse(send, 400, "content-length: not a byte count", "content-length")
                    return
                declared = int(text)
            elif name == b"transfer-encoding":
                chunked = True
        if not declared and not chunked:  # no body at all (the check-in path)
            await self.app(scope, receive, send)
            return
        limit, buffered = self.limit_for(scope)
        if declared is not None:
            if declared > limit:
                msg = f"content-length: {declared} bytes, over this route's {limit}-byte limit"
                await _refuse(send, 413, msg, "content-length")
                return
            if not buffered:  # the server delivers at most Content-Length bytes: nothing to count or time
                await self.app(scope, receive, send)
                return
            if not await self._admit(declared):
                await _refuse(send, 503, _BUSY, "body", retry_after=True)
                return
        try:
            await self._guarded(scope, receive, send, limit, buffered, declared)
        finally:
            if buffered and declared:
                self._release(declared)

    async def _admit(self, n: int) -> bool:
        """Reserve ``n`` bytes of the budget, waiting up to ``deadline`` seconds for them to be free
        (the body stays unread meanwhile); False when they never were."""
        if n > self.budget:
            return False
        loop = asyncio.get_running_loop()
        until = loop.time() + self.deadline
        while self.in_use + n > self.budget:
            freed = loop.create_future()
            self._waiters.append(freed)
            try:
                async with asyncio.timeout_at(until):
                    await freed
            except TimeoutError:
                return False
            finally:
                if freed in self._waiters:
                    self._waiters.remove(freed)
        self.in_use += n
        return True

    def _release(self, n: int) -> None:
        self.in_use -= n
        waiters, self._waiters = self._waiters, []
        for freed in waiters:
            if not freed.done():
                freed.set_result(None)

    async def _guarded(
        self, scope: Scope, receive: Receive, send: Send, limit: int, buffered: bool, declared: int | None
    ) -> None:
        """Run the application with ``receive`` counting the body against ``limit`` (and, for a body
        held in memory, against the budget, and within ``deadline`` seconds of now)."""
        seen = 0
        started = refused = False
        deadline = asyncio.get_running_loop().time() + self.deadline if buffered else None

        async def refuse(status: int, message: str, retry_after: bool = False) -> None:
            nonlocal refused
            refused = True
            if not started:
                await _refuse(send, status, message, "body", retry_after=retry_after)
            raise BodyTooLarge(message)

        async def guarded_receive() -> Message:
            nonlocal seen
            if refused:
                raise BodyTooLarge("body: refused")
            if deadline is None:
                message = await receive()
            else:
                try:
                    async with asyncio.timeout_at(deadline):
                        message = await receive()
                except TimeoutError:
                    await refuse(408, f"body: not complete within {self.deadline:g} s")
            if message["type"] == "http.request" and declared is None:
                n = len(message.get("body", b""))
                seen += n
                if buffered:
                    self.in_use += n
                if seen > limit:
                    await refuse(413, f"body: more than this route's {limit}-byte limit")
                if buffered and self.in_use > self.budget:
                    await refuse(503, _BUSY, retry_after=True)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the refusal went out; the application's own answer to the failed read is dropped
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except Exception:
            if not refused:
                raise
        finally:
            if buffered and seen:
                self._release(seen)


_BUSY = "body: the server holds as many request bodies as it may; retry later"


async def _refuse(send: Send, status: int, message: str, field: str | None, retry_after: bool = False) -> None:
    for m in error_response(status, message, field, [(b"retry-after", b"1")] if retry_after else ()):
        await send(m)
