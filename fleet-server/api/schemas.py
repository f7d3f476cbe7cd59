"""Request and response bodies. Every string that reaches the database has a pattern or a bound, so
that malformed input is a 422 naming the field, never a database error."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from edgefleet.bundle.manifest import NAME_PATTERN, VERSION_PATTERN

__all__ = [
    "DEVICE_ID",
    "MODEL_NAME",
    "SHA256",
    "TAG",
    "VERSION",
    "AssignIn",
    "AuditOut",
    "ChallengeIn",
    "ChallengeOut",
    "DeviceOut",
    "DeviceTokenIn",
    "DeviceTokenOut",
    "EnrollIn",
    "EnrollOut",
    "EnrollTokenIn",
    "EnrollTokenOut",
    "RenewIn",
    "ReportIn",
    "TagsIn",
    "TokenIn",
    "TokenOut",
    "VersionOut",
]

MODEL_NAME = NAME_PATTERN  # one definition for the manifest and the API's paths and bodies
VERSION = VERSION_PATTERN
DEVICE_ID = r"^[a-z0-9][a-z0-9-]{0,63}$"
SHA256 = r"^[0-9a-f]{64}$"
TAG = r"^[A-Za-z0-9][A-Za-z0-9._:=/-]{0,63}$"

Tag = Annotated[str, Field(pattern=TAG)]
Name = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VersionOut(BaseModel):
    name: str
    version: str
    runtime: str
    sha256: str
    size: int
    created_at: datetime
    created_by: str
    url: str
    manifest: dict[str, Any] | None = None


class TokenIn(_In):
    name: Name
    role: Literal["viewer", "operator", "admin"]
    expires_in_days: int | None = Field(default=None, ge=1, le=3650, description="days; none: never expires")


class TokenOut(BaseModel):
    id: str
    name: str
    role: str
    created_at: datetime
    created_by: str
    expires_at: datetime | None
    revoked_at: datetime | None
    token: str | None = Field(default=None, description="the secret token: returned once, at creation")


class EnrollTokenIn(_In):
    tags: list[Tag] = Field(default_factory=list, max_length=32)
    expires_in_hours: float = Field(default=24.0, gt=0, le=24 * 365, description="hours until it stops working")
    max_uses: int = Field(default=1, ge=1, le=1_000_000, description="how many devices may enroll with it")


class EnrollTokenOut(BaseModel):
    id: str
    tags: list[str]
    max_uses: int
    uses: int
    expires_at: datetime
    created_at: datetime
    created_by: str
    revoked_at: datetime | None
    token: str | None = Field(default=None, description="the secret token: returned once, at creation")


class EnrollIn(_In):
    token: str = Field(min_length=1, max_length=256, description="enrollment token efe_...")
    csr: str = Field(min_length=1, max_length=16384, description="PEM CSR of the device's own EC P-256 key")


class EnrollOut(BaseModel):
    device_id: str
    certificate: str = Field(description="PEM device certificate, CN = device_id, signed by the fleet CA")
    ca_certificate: str = Field(description="PEM fleet CA certificate: pin it")
    tags: list[str]


class RenewIn(_In):
    csr: str = Field(min_length=1, max_length=16384, description="PEM CSR of the new key (signed by it)")
    # Optional in the schema so that a request without them is a 401 naming the field, not a 422.
    challenge: str | None = Field(
        default=None, min_length=1, max_length=4096,
        description="required: a challenge from POST /device-auth/challenge with purpose \"renew\"",
    )
    signature: str | None = Field(
        default=None, min_length=1, max_length=512,
        description="required: base64 DER ECDSA-SHA256, by the CURRENT key, of renewal_message(challenge, csr): "
        "the ASCII bytes 'edgefleet-renew-v1.' + challenge + '.' + hex sha256 of the csr's UTF-8 bytes",
    )


class ChallengeIn(_In):
    device_id: str = Field(pattern=DEVICE_ID)
    purpose: Literal["auth", "renew"] = Field(
        default="auth",
        description="auth: for /device-auth/token (no token needed); renew: for certificate renewal (needs the "
        "device's access token; bound to its current certificate)",
    )


class ChallengeOut(BaseModel):
    challenge: str = Field(description="sign these ASCII bytes with the device key (ECDSA P-256, SHA-256, DER)")
    expires_in: int


class DeviceTokenIn(_In):
    device_id: str = Field(pattern=DEVICE_ID)
    challenge: str = Field(min_length=1, max_length=4096)
    signature: str = Field(min_length=1, max_length=512, description="base64 DER ECDSA signature of the challenge")


class DeviceTokenOut(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int


class TagsIn(_In):
    tags: list[Tag] = Field(max_length=32)


class AssignIn(_In):
    version: str = Field(pattern=VERSION)


class RunningModel(_In):
    name: str = Field(pattern=MODEL_NAME)
    version: str = Field(pattern=VERSION)
    sha256: str | None = Field(default=None, pattern=SHA256)


class UpdateEvent(_In):
    at: datetime
    kind: str = Field(pattern=r"^[a-z][a-z0-9_.-]{0,63}$", description="e.g. download.started, install.ok")
    model: str | None = Field(default=None, pattern=MODEL_NAME)
    version: str | None = Field(default=None, pattern=VERSION)
    detail: str = Field(default="", max_length=2048, pattern=r"^[^\x00]*$")


class ReportIn(_In):
    agent_version: str = Field(pattern=VERSION)
    hardware_profile: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    running: list[RunningModel] = Field(default_factory=list, max_length=64)
    events: list[UpdateEvent] = Field(default_factory=list, max_length=256)


class DeviceOut(BaseModel):
    id: str
    tags: list[str]
    online: bool
    revoked: bool
    enrolled_at: datetime
    last_seen: datetime | None
    reported_at: datetime | None
    agent_version: str | None
    hardware_profile: str | None
    running: list[Any]
    cert_serial: str
    cert_not_after: datetime
    desired: dict[str, Any] | None = None


class AuditOut(BaseModel):
    id: int
    at: datetime
    actor: str
    action: str
    target: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
