"""API errors: every refusal is a JSON ``{"error": message, "field": name}`` with a 4xx status.

Handlers translate FastAPI's validation errors, HTTP errors, upload errors and database conflicts at
the boundary, so no request can end in a traceback; a database that is locked, unreachable or out of
connections is a 503 with ``Retry-After`` (on every route); a client that went away mid-body gets a
400 nobody reads; an unexpected exception is logged (without the request's headers) and answered with
a JSON 500.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from edgefleet.server.blobs import UploadError

__all__ = ["RETRY_AFTER", "ApiError", "database_unavailable", "install_handlers"]

log = logging.getLogger(__name__)
RETRY_AFTER = 5  # seconds a client is asked to wait when the database is busy or unreachable


class ApiError(Exception):
    """Raised by handlers: becomes ``status`` with ``{"error": message, "field": field}``."""

    def __init__(self, status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.headers = headers


def error_body(message: str, field: str | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"error": message, "field": field}
    body.update(extra)
    return body


def database_unavailable(e: Exception) -> bool:
    """True for a database error that is the database's state, not the request: a lock not granted
    in time (SQLite ``database is locked``, PostgreSQL lock or statement timeouts), a server that
    cannot be reached or dropped the connection, or no pooled connection free in time."""
    if isinstance(e, OperationalError | InterfaceError | PoolTimeout):
        return True
    return isinstance(e, DBAPIError) and bool(e.connection_invalidated)


def _loc(loc: tuple[Any, ...] | list[Any]) -> str:
    return ".".join(str(p) for p in loc)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(error_body(e.message, e.field), e.status, headers=e.headers)

    @app.exception_handler(UploadError)
    async def _upload(_: Request, e: UploadError) -> JSONResponse:
        return JSONResponse(error_body(str(e), e.field), e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        errs = list(e.errors())
        problems = [
            {"field": _loc(x.get("loc", ())), "message": str(x.get("msg", "")).removeprefix("Value error, ")}
            for x in errs
        ]
        first = problems[0] if problems else {"field": None, "message": "invalid request"}
        msg = "; ".join(f"{p['field']}: {p['message']}" for p in problems) or "invalid request"
        return JSONResponse(error_body(msg, first["field"], problems=problems), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(e.detail), None), e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(IntegrityError)
    async def _conflict(_: Request, e: IntegrityError) -> JSONResponse:
        log.info("integrity conflict: %s", type(e.orig).__name__)
        return JSONResponse(error_body("conflicts with the current state (already exists or in use)", None), 409)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        log.error("unexpected %s on %s %s", type(e).__name__, request.method, request.url.path, exc_info=e)
        return JSONResponse(error_body("internal error", None), 500)

    async def _unavailable(request: Request, e: Exception) -> JSONResponse:
        if not database_unavailable(e):
            return await _unexpected(request, e)
        detail = str(getattr(e, "orig", None) or e).splitlines()[0][:200]
        log.warning("database unavailable on %s %s: %s: %s", request.method, request.url.path, type(e).__name__, detail)
        return JSONResponse(
            error_body("database: busy or unreachable; retry later", "database"),
            503,
            headers={"Retry-After": str(RETRY_AFTER)},
        )

    app.add_exception_handler(DBAPIError, _unavailable)
    app.add_exception_handler(PoolTimeout, _unavailable)

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, _: ClientDisconnect) -> JSONResponse:
        log.info("client went away during %s %s", request.method, request.url.path)
        return JSONResponse(error_body("body: the client went away before the request was read", "body"), 400)
