"""API errors: every refusal is a JSON ``{"error": message, "field": name}`` with a 4xx status.

Handlers translate FastAPI's validation errors, HTTP errors, upload errors and database conflicts at
the boundary, so no request can end in a traceback; an unexpected exception is logged (without the
request's headers) and answered with a JSON 500.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgefleet.server.blobs import UploadError

__all__ = ["ApiError", "install_handlers"]

log = logging.getLogger(__name__)


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
