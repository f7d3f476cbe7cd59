"""Request dependencies: the server state, a database session, and who is calling.

Operators send ``Authorization: Bearer efo_<id>_<secret>``; a role check compares against
``viewer < operator < admin``. Devices send ``Authorization: Bearer <device access token>`` (see
``identity.py``) or, from a trusted TLS-terminating proxy, their verified certificate in the configured
header. Secrets are never logged: refusals name the reason, never the token.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import unquote

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from edgefleet.server.ca import DeviceIdentityError, common_name
from edgefleet.server.errors import ApiError
from edgefleet.server.models import ApiToken
from edgefleet.server.state import ROLES, ServerState
from edgefleet.server.tokens import open_signed, parse_token, secret_matches

__all__ = ["PEER_KEY", "Actor", "DeviceCaller", "SessionDep", "StateDep", "device_caller", "get_state", "require"]

PEER_KEY = "edgefleet.peer"  # scope key: the socket peer (host, port), set before X-Forwarded-For rewrites "client"

DEVICE_TOKEN = "dev"  # the purpose claim of device access tokens
_BEARER = {"WWW-Authenticate": "Bearer"}


def get_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.server
    return state


StateDep = Annotated[ServerState, Depends(get_state)]


def get_session(state: StateDep) -> Iterator[Session]:
    with state.sessions() as s:
        yield s


SessionDep = Annotated[Session, Depends(get_session)]


@dataclass(frozen=True)
class Actor:
    """An authenticated operator: ``name`` is what the audit log records."""

    token_id: str
    name: str
    role: str

    @property
    def label(self) -> str:
        return f"{self.name} (token {self.token_id})"


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def require(role: str) -> Callable[[Request, Session], Actor]:
    """A dependency that admits operators whose role is at least ``role``."""
    need = ROLES.index(role)

    def check(request: Request, s: SessionDep) -> Actor:
        raw = bearer(request)
        if raw is None:
            raise ApiError(401, "authorization: an operator API token is required (Bearer efo_...)", "authorization",
                           _BEARER)
        parsed = parse_token(raw, "efo")
        row = s.get(ApiToken, parsed.id) if parsed else None
        if parsed is None or row is None or not secret_matches(parsed.secret, row.secret_sha256):
            raise ApiError(401, "authorization: unknown or malformed API token", "authorization", _BEARER)
        if row.revoked_at is not None:
            raise ApiError(401, "authorization: this API token was revoked", "authorization", _BEARER)
        if row.expires_at is not None and row.expires_at.timestamp() < time.time():
            raise ApiError(401, "authorization: this API token has expired", "authorization", _BEARER)
        if ROLES.index(row.role) < need:
            raise ApiError(403, f"authorization: role {row.role!r} may not do this; it needs {role!r}", "authorization")
        return Actor(row.id, row.name, row.role)

    return check


@dataclass(frozen=True)
class DeviceCaller:
    """A device that proved its identity: by an access token (``cert_serial`` it was issued for) or by a
    client certificate a trusted proxy verified."""

    device_id: str
    cert_serial: str
    via: str  # "token" | "proxy-cert"


def _via_trusted_proxy(request: Request, trusted: list[str]) -> bool:
    """Whether the connection itself comes from a trusted proxy: its socket peer, which X-Forwarded-For
    does not change (the app keeps it in the scope), not ``request.client``, which names the device."""
    peer = request.scope.get(PEER_KEY) or request.scope.get("client")
    return peer is not None and str(peer[0]) in trusted


def device_caller(request: Request, state: ServerState) -> DeviceCaller:
    """Who the calling device is. Raises ApiError 401 when it proves nothing. Revocation and the current
    certificate serial are checked by the caller against the device's row (one read it does anyway)."""
    settings = state.settings
    if not settings.allow_plain_http_devices and request.scope.get("scheme") != "https":
        raise ApiError(403, "scheme: devices must use TLS (allow_plain_http_devices is off)", "scheme")
    header = settings.client_cert_header
    if header and _via_trusted_proxy(request, settings.trusted_proxies) and (pem := request.headers.get(header)):
        try:
            cert = state.ca.check_device_cert(unquote(pem))
        except DeviceIdentityError as e:
            raise ApiError(401, f"{header}: {e}", header) from e
        return DeviceCaller(common_name(cert), format(cert.serial_number, "x"), "proxy-cert")
    raw = bearer(request)
    if raw is None:
        raise ApiError(401, "authorization: a device access token is required", "authorization", _BEARER)
    claims = open_signed(state.mac_key, raw, DEVICE_TOKEN)
    if claims is None:
        raise ApiError(401, "authorization: invalid or expired device token; get a new one", "authorization", _BEARER)
    return DeviceCaller(str(claims["sub"]), str(claims["ser"]), "token")
