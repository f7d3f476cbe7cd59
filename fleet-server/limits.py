"""Request-body limits, enforced before the bytes are read: a pure ASGI middleware.

uvicorn and FastAPI put no bound on a body (FastAPI reads a whole JSON body before pydantic looks at
it), so :class:`BodyLimit` sits in front of the router. Each request gets the limit of its route
(``(method, route template) -> bytes``, else the default for JSON routes):

- a ``Content-Length`` over the limit is refused with a JSON 413 before any of the body is read;
- a body without one (chunked) is counted as it arrives, and refused once it passes the limit: the
  413 is sent (when no response has started) with ``Connection: close``, the application sees its
  ``receive()`` raise :class:`BodyTooLarge`, and whatever the application sends afterwards is dropped;
- a ``Content-Length`` that is not a non-negative integer is a JSON 400.

A route with its own limit is found by its template, before the router runs (the template is left
in the scope as ``edgefleet.route``, for the metrics of requests refused here). Starlette's own
``RequestBodyLimitMiddleware`` (``FastAPI(max_body_size=...)``) refuses only once the application
reads, in plain text, and keeps the connection draining the rest; this refuses at once, in JSON, and
closes it.
"""

from __future__ import annotations

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
    """Raised from ``receive()`` once a body passes its route's limit (the 413 is already sent)."""


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
    """Bound every request body by its route's limit (see the module docstring).

    ``per_route`` maps ``(METHOD, path template)`` (``/api/v1/models``, ``/x/{name}``) to a limit in
    bytes; ``default`` bounds every other request. Raises ValueError for a template starlette cannot
    compile or a negative limit.
    """

    def __init__(self, app: ASGIApp, default: int, per_route: Mapping[tuple[str, str], int]) -> None:
        if default < 0 or any(v < 0 for v in per_route.values()):
            raise ValueError("body limits must be non-negative byte counts")
        self.app = app
        self.default = default
        self.routes = [(method, template, compile_path(template)[0], limit)
                       for (method, template), limit in per_route.items()]
        self.smallest = min([default, *per_route.values()])

    def limit_for(self, scope: Scope) -> int:
        """The body limit of the request's route, bytes (its template goes in ``scope[ROUTE_KEY]``)."""
        for method, template, regex, limit in self.routes:
            if scope["method"] == method and regex.match(scope["path"]):
                scope[ROUTE_KEY] = template
                return limit
        return self.default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared: int | None = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                text = value.decode("latin-1").strip()
                if not text.isdigit() or len(text) > 19:
                    for m in error_response(400, "content-length: not a byte count", "content-length"):
                        await send(m)
                    return
                declared = int(text)
        limit = self.limit_for(scope) if declared is not None and declared > self.smallest else self.default
        if declared is not None and declared > limit:
            msg = f"content-length: {declared} bytes, over this route's {limit}-byte limit"
            for m in error_response(413, msg, "content-length"):
                await send(m)
            return
        if declared is not None:  # the server stops the body at Content-Length: nothing more to count
            await self.app(scope, receive, send)
            return
        await self._counted(scope, receive, send)

    async def _counted(self, scope: Scope, receive: Receive, send: Send) -> None:
        seen = 0
        limit: int | None = None
        started = refused = False

        async def counting_receive() -> Message:
            nonlocal seen, limit, refused
            message = await receive()
            if message["type"] == "http.request" and not refused:
                seen += len(message.get("body", b""))
                if seen > self.smallest:
                    if limit is None:
                        limit = self.limit_for(scope)
                    if seen > limit:
                        refused = True
                        if not started:
                            msg = f"body: more than this route's {limit}-byte limit"
                            for m in error_response(413, msg, "body"):
                                await send(m)
                        raise BodyTooLarge(f"body: over the {limit}-byte limit")
            elif refused:
                raise BodyTooLarge("body: over the limit")
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the 413 went out; the application's own answer to the failed read is dropped
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not refused:
                raise
