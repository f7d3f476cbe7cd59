"""Secrets the server hands out, as pure functions over bytes (no database, no I/O).

- Operator API tokens ``efo_<id>_<secret>`` and enrollment tokens ``efe_<id>_<secret>``: ``id`` is a
  public 12-hex lookup key, ``secret`` 32 random bytes (base64url); only sha256(secret) is stored and
  compared in constant time.
- Device challenges and device access tokens: ``<base64url JSON>.<base64url HMAC-SHA256>`` under the
  server's MAC key (shared by replicas through the database), each with an expiry.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DeviceClaims",
    "ParsedToken",
    "hash_secret",
    "new_mac_key",
    "new_token",
    "open_signed",
    "parse_token",
    "seal",
    "secret_matches",
]

_TOKEN = re.compile(r"\A(efo|efe)_([0-9a-f]{12})_([A-Za-z0-9_-]{43})\Z")


@dataclass(frozen=True)
class ParsedToken:
    kind: str  # "efo" (operator API) or "efe" (enrollment)
    id: str
    secret: str

    def __repr__(self) -> str:  # never show the secret, even in a traceback
        return f"ParsedToken(kind={self.kind!r}, id={self.id!r}, secret=***)"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def new_token(kind: str) -> tuple[str, str, str]:
    """A fresh token of ``kind`` ("efo" or "efe"): (full token, id, sha256 of the secret)."""
    token_id = secrets.token_hex(6)
    secret = _b64(secrets.token_bytes(32))
    return f"{kind}_{token_id}_{secret}", token_id, hash_secret(secret)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_token(token: str, kind: str) -> ParsedToken | None:
    """The parts of a well-formed token of ``kind``, or None."""
    m = _TOKEN.match(token)
    if m is None or m.group(1) != kind:
        return None
    return ParsedToken(m.group(1), m.group(2), m.group(3))


def secret_matches(secret: str, stored_sha256: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_sha256)


def new_mac_key() -> str:
    return _b64(secrets.token_bytes(32))


def seal(key: str, claims: dict[str, Any]) -> str:
    """``claims`` as compact JSON, MACed with ``key``: readable by anyone, forgeable by no one."""
    body = _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    mac = hmac.new(key.encode(), body.encode(), hashlib.sha256).digest()
    return f"{body}.{_b64(mac)}"


def open_signed(key: str, sealed: str, purpose: str, now: float | None = None) -> dict[str, Any] | None:
    """The claims of a value :func:`seal` made for ``purpose`` (claim ``p``), or None when forged,
    malformed, for another purpose or past its expiry (claim ``exp``, Unix seconds)."""
    body, _, mac = sealed.partition(".")
    if not body or not mac or len(sealed) > 4096:
        return None
    try:
        expected = hmac.new(key.encode(), body.encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(expected, _unb64(mac)):
            return None
        claims = json.loads(_unb64(body))
    except (ValueError, UnicodeError):
        return None
    if not isinstance(claims, dict) or claims.get("p") != purpose:
        return None
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or exp < (time.time() if now is None else now):
        return None
    return claims


@dataclass(frozen=True)
class DeviceClaims:
    """Who a device access token speaks for, and the certificate it was issued against."""

    device_id: str
    cert_serial: str
    expires: float
