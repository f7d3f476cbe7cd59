"""The image root pin an enrollment token carries: ``TOKEN.N.SHA256`` (root version N, sha256 of its
canonical JSON). The operator's CLI appends it from its own keyring, never from the server's copy, so
a device learns whom to trust from the operator, not from the server it is learning to distrust.

Base64url (the token's alphabet) has no ``.``, so the pin splits off unambiguously.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from edgefleet.errors import ConfigError

__all__ = ["RootPin", "pin_token", "split_pin"]

_PIN = re.compile(r"\A(?P<token>[^.\s]+)\.(?P<version>[1-9][0-9]{0,9})\.(?P<sha>[0-9a-f]{64})\Z")


@dataclass(frozen=True)
class RootPin:
    """Root ``version`` of the image repository has this ``fingerprint`` (sha256 of canonical JSON)."""

    version: int
    fingerprint: str


def pin_token(token: str, version: int, fingerprint: str) -> str:
    """``token`` with the image root pin appended."""
    if "." in token:
        raise ConfigError("token: already carries a root pin")
    if not re.fullmatch(r"[0-9a-f]{64}", fingerprint) or version < 1:
        raise ConfigError(f"fingerprint: {fingerprint!r} (root {version}) is not a sha256 fingerprint")
    return f"{token}.{version}.{fingerprint}"


def split_pin(token: str) -> tuple[str, RootPin | None]:
    """The server's token and the pin it carries (None for a token without one). Raises ConfigError
    naming ``token`` for a token with a malformed pin."""
    token = token.strip()
    if "." not in token:
        return token, None
    m = _PIN.match(token)
    if m is None:
        raise ConfigError("token: malformed root pin; expected TOKEN.N.SHA256 as `edgefleet device enroll-token "
                          "--keys DIR` prints it")
    return m["token"], RootPin(int(m["version"]), m["sha"])
