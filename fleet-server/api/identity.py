"""Device identity: enrollment with a token and a CSR, challenge-response access tokens, renewal.

::

    device                                     server
    POST /enroll {token, csr}            ->    checks token (expiry, uses), signs CSR: cert CN=device id
    POST /device-auth/challenge {id}     ->    {challenge}: MACed {id, nonce, exp} (no state kept)
    POST /device-auth/token {id, challenge, sig(challenge)}
                                         ->    checks MAC, expiry, id, signature by the cert's key,
                                               device not revoked -> access token (MACed, short-lived)
    GET/POST /devices/{id}/...  Bearer <access token>
"""

from __future__ import annotations

import base64
import binascii
import secrets
import time
from typing import Annotated

from cryptography.hazmat.primitives import serialization
from fastapi import APIRouter, Path, Request
from sqlalchemy import update
from sqlalchemy.orm import Session

from edgefleet.server.api.deps import DEVICE_TOKEN, DeviceCaller, StateDep, device_caller
from edgefleet.server.api.schemas import (
    DEVICE_ID,
    ChallengeIn,
    ChallengeOut,
    DeviceTokenIn,
    DeviceTokenOut,
    EnrollIn,
    EnrollOut,
    RenewIn,
)
from edgefleet.server.ca import DeviceIdentityError, verify_signature
from edgefleet.server.desired import etag_of
from edgefleet.server.errors import ApiError
from edgefleet.server.models import Device, EnrollmentToken, utcnow
from edgefleet.server.state import ServerState, audit
from edgefleet.server.tokens import open_signed, parse_token, seal, secret_matches

__all__ = ["live_device", "require_transport", "router"]

router = APIRouter(prefix="/api/v1", tags=["device identity"])
_CHALLENGE = "chal"


def require_transport(request: Request, state: ServerState) -> None:
    if not state.settings.allow_plain_http_devices and request.scope.get("scheme") != "https":
        raise ApiError(403, "scheme: devices must use TLS (allow_plain_http_devices is off)", "scheme")


def live_device(s: Session, who: DeviceCaller, device_id: str) -> Device:
    """The caller's own device row; 403 for another device, a revoked one, or a replaced certificate."""
    if who.device_id != device_id:
        raise ApiError(403, "device_id: a device may only act as itself", "device_id")
    d = s.get(Device, device_id)
    if d is None or d.revoked_at is not None:
        raise ApiError(403, "device_id: not enrolled or revoked", "device_id")
    if d.cert_serial != who.cert_serial:
        raise ApiError(401, "authorization: issued for a replaced certificate; authenticate again", "authorization")
    return d


@router.post("/enroll", status_code=201, response_model=EnrollOut)
def enroll(body: EnrollIn, request: Request, state: StateDep) -> EnrollOut:
    """Enroll a device: a valid enrollment token and a CSR of the device's own key give a certificate."""
    require_transport(request, state)
    parsed = parse_token(body.token, "efe")
    with state.sessions.begin() as s:
        tok = s.get(EnrollmentToken, parsed.id) if parsed else None
        if parsed is None or tok is None or not secret_matches(parsed.secret, tok.secret_sha256):
            raise ApiError(401, "token: unknown enrollment token", "token")
        if tok.revoked_at is not None or tok.expires_at <= utcnow():
            raise ApiError(401, "token: this enrollment token has expired or was revoked", "token")
        taken = s.execute(
            update(EnrollmentToken)
            .where(EnrollmentToken.id == tok.id, EnrollmentToken.uses < EnrollmentToken.max_uses)
            .values(uses=EnrollmentToken.uses + 1)
        )
        if taken.rowcount != 1:  # type: ignore[attr-defined]
            raise ApiError(401, "token: this enrollment token has been used up", "token")
        device_id = f"dev-{secrets.token_hex(8)}"
        try:
            cert = state.ca.sign_device(body.csr, device_id, state.settings.device_cert_days)
        except DeviceIdentityError as e:
            raise ApiError(422, str(e), "csr") from e
        pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        tags = list(tok.tags)
        s.add(
            Device(
                id=device_id, tags=tags, cert_serial=format(cert.serial_number, "x"), cert_pem=pem,
                cert_not_after=cert.not_valid_after_utc, enrolled_at=utcnow(), enrollment_token_id=tok.id,
                revoked_at=None, last_seen=None, reported_at=None, agent_version=None, hardware_profile=None,
                running=[], desired_etag=etag_of({"device_id": device_id, "models": []}),
            )
        )
        audit(s, f"enrollment token {tok.id}", "device.enroll", f"device:{device_id}", None,
              {"tags": tags, "cert_serial": format(cert.serial_number, "x")})
    return EnrollOut(device_id=device_id, certificate=pem, ca_certificate=state.ca.cert_pem, tags=tags)


@router.post("/device-auth/challenge", response_model=ChallengeOut)
def challenge(body: ChallengeIn, request: Request, state: StateDep) -> ChallengeOut:
    """A challenge for ``device_id`` to sign. Says nothing about whether the device exists."""
    require_transport(request, state)
    ttl = state.settings.challenge_ttl
    claims = {"p": _CHALLENGE, "sub": body.device_id, "n": secrets.token_hex(16), "exp": int(time.time()) + ttl}
    return ChallengeOut(challenge=seal(state.mac_key, claims), expires_in=ttl)


@router.post("/device-auth/token", response_model=DeviceTokenOut)
def device_token(body: DeviceTokenIn, request: Request, state: StateDep) -> DeviceTokenOut:
    """Trade a signed challenge for a short-lived access token."""
    require_transport(request, state)
    claims = open_signed(state.mac_key, body.challenge, _CHALLENGE)
    if claims is None or claims.get("sub") != body.device_id:
        raise ApiError(401, "challenge: invalid, expired, or for another device", "challenge")
    try:
        sig = base64.b64decode(body.signature, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(422, "signature: not base64", "signature") from e
    with state.sessions() as s:
        d = s.get(Device, body.device_id)
        if d is None or d.revoked_at is not None:
            raise ApiError(403, "device_id: not enrolled or revoked", "device_id")
        if not verify_signature(d.cert_pem, sig, body.challenge.encode()):
            raise ApiError(401, "signature: not made by this device's key", "signature")
        serial = d.cert_serial
    ttl = state.settings.device_token_ttl
    claims = {"p": DEVICE_TOKEN, "sub": body.device_id, "ser": serial, "exp": int(time.time()) + ttl}
    token = seal(state.mac_key, claims)
    return DeviceTokenOut(access_token=token, expires_in=ttl)


@router.post("/devices/{device_id}/certificate", response_model=EnrollOut)
def renew(
    device_id: Annotated[str, Path(pattern=DEVICE_ID)], body: RenewIn, request: Request, state: StateDep
) -> EnrollOut:
    """Renew the device's certificate (e.g. for a new key); access tokens of the old one stop working."""
    who = device_caller(request, state)
    with state.sessions.begin() as s:
        d = live_device(s, who, device_id)
        try:
            cert = state.ca.sign_device(body.csr, device_id, state.settings.device_cert_days)
        except DeviceIdentityError as e:
            raise ApiError(422, str(e), "csr") from e
        before = {"cert_serial": d.cert_serial}
        d.cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        d.cert_serial = format(cert.serial_number, "x")
        d.cert_not_after = cert.not_valid_after_utc
        audit(s, f"device {device_id}", "device.renew", f"device:{device_id}", before, {"cert_serial": d.cert_serial})
        out = EnrollOut(device_id=device_id, certificate=d.cert_pem, ca_certificate=state.ca.cert_pem, tags=d.tags)
    return out
