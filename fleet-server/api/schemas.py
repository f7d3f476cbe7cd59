"""Request and response bodies. Every string that reaches the database has a pattern or a bound, so
that malformed input is a 422 naming the field, never a database error."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from edgefleet.bundle.manifest import NAME_PATTERN, VERSION_PATTERN

__all__ = [
    "DEVICE_ID",
    "MODEL_NAME",
    "REASON",
    "SEQ_MAX",
    "SHA256",
    "TAG",
    "TARGET_PATH",
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
    "EventOut",
    "RenewIn",
    "ReportIn",
    "TagsIn",
    "TokenIn",
    "TokenOut",
    "UpdateEvent",
    "UpdateFailure",
    "UpdateStatus",
    "VersionOut",
]

MODEL_NAME = NAME_PATTERN  # one definition for the manifest and the API's paths and bodies
VERSION = VERSION_PATTERN
DEVICE_ID = r"^[a-z0-9][a-z0-9-]{0,63}$"
SHA256 = r"^[0-9a-f]{64}$"
TAG = r"^[A-Za-z0-9][A-Za-z0-9._:=/-]{0,63}$"
WORD = r"^[a-z][a-z0-9_.-]{0,63}$"  # a machine-friendly word: event kinds, update states
REASON = WORD  # why an update step ended as it did: hash_mismatch, selftest_failed, ...
TARGET_PATH = rf"^{MODEL_NAME[1:-1]}-{VERSION[1:-1]}\.efb$"  # a TUF target path, NAME-VERSION.efb
SEQ_MAX = 2**63 - 1  # event numbers are BIGINT

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
    """One step of the device's update state machine, as the device saw it."""

    seq: int | None = Field(
        default=None, ge=1, le=SEQ_MAX,
        description="the device's own event number, growing by one per event across restarts; the server keeps "
        "each (device, seq) once, so a report sent again adds nothing. Optional for older agents",
    )
    at: AwareDatetime = Field(description="when it happened, on the device's clock (RFC 3339 with a zone)")
    kind: str = Field(pattern=WORD, description="e.g. download.started, install.ok, rollback")
    model: str | None = Field(default=None, pattern=MODEL_NAME)
    version: str | None = Field(default=None, pattern=VERSION)
    target: str | None = Field(default=None, pattern=TARGET_PATH, max_length=256,
                               description="the TUF target path, NAME-VERSION.efb")
    sha256: str | None = Field(default=None, pattern=SHA256, description="the target's sha256")
    reason: str | None = Field(default=None, pattern=REASON,
                               description="a short word saying why: hash_mismatch, selftest_failed, ...")
    detail: str = Field(default="", max_length=2048, pattern=r"^[^\x00]*$", description="a sentence for people")


class UpdateFailure(_In):
    """The last update attempt that failed, kept until one succeeds."""

    reason: str = Field(pattern=REASON)
    detail: str = Field(default="", max_length=2048, pattern=r"^[^\x00]*$")
    at: AwareDatetime | None = None
    target: str | None = Field(default=None, pattern=TARGET_PATH, max_length=256)
    sha256: str | None = Field(default=None, pattern=SHA256)


class UpdateStatus(_In):
    """Where the device's update state machine is: what operators see on ``device show``."""

    state: str = Field(pattern=WORD, description="the state machine's state, e.g. idle, downloading, probation")
    target: str | None = Field(default=None, pattern=TARGET_PATH, max_length=256,
                               description="the target being installed, NAME-VERSION.efb")
    last_failure: UpdateFailure | None = None


class ReportIn(_In):
    agent_version: str = Field(pattern=VERSION)
    hardware_profile: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    running: list[RunningModel] = Field(default_factory=list, max_length=64)
    events: list[UpdateEvent] = Field(default_factory=list, max_length=256)
    update: UpdateStatus | None = Field(
        default=None, description="the update state machine now; kept on the device row (absent: unchanged)")


class EventOut(BaseModel):
    """An update event as stored: ``seq`` is None for events from agents without event numbers."""

    seq: int | None
    at: datetime
    received_at: datetime
    kind: str
    model: str | None = None
    version: str | None = None
    target: str | None = None
    sha256: str | None = None
    reason: str | None = None
    detail: str = ""


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
    desired: dict[str, Any] | None = Field(default=None, description="what it should run (device show only)")
    update: dict[str, Any] | None = Field(
        default=None, description="the update block it last reported: state, target, last_failure")
    events: list[EventOut] | None = Field(default=None, description="its last 20 events, newest first (device "
                                          "show only; all of them: GET /devices/{id}/events)")


class AuditOut(BaseModel):
    id: int
    at: datetime
    actor: str
    action: str
    target: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
