"""Device identity: enrollment with a token and a CSR, challenge-response access tokens, renewal.

::

    device                                     server
    POST /enroll {token, csr}            ->    checks token (expiry, uses), signs CSR: cert CN=device id
    POST /device-auth/challenge {id}     ->    {challenge}: MACed {p: chal, id, nonce, exp} (no state kept)
    POST /device-auth/token {id, challenge, sig(challenge)}
                                         ->    checks MAC, expiry, id, signature by the cert's key,
                                               device not revoked -> access token (MACed, short-lived)
    GET/POST /devices/{id}/...  Bearer <access token>

    renewal (proves possession of the CURRENT key, not just a token):
    POST /device-auth/challenge {id, purpose: renew}  Bearer <access token>
                                         ->    {challenge}: MACed {p: renew, id, ser: current cert serial, ...}
    POST /devices/{id}/certificate {csr (signed by the new key), challenge,
                                    sig_current_key(renewal_message(challenge, csr))}  Bearer <access token>
                                         ->    new certificate; the serial changes, so the old tokens and this
                                               proof (bound to the old serial) are dead

A purpose claim keeps the two challenges apart: an auth challenge is no renewal proof and back. The
proof also covers the CSR, so a proof seen in transit cannot certify another key.
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
from tuf.api.metadata import Root  # type: ignore[attr-defined]

from edgefleet.renewal import renewal_message
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
from edgefleet.server.tuf.routes import director_repository, image_repository

__all__ = ["live_device", "renewal_message", "require_transport", "router"]

router = APIRouter(prefix="/api/v1", tags=["device identity"])
_CHALLENGE = "chal"  # purpose claim of challenges for /device-auth/token
_RENEW = "renew"  # purpose claim of challenges for certificate renewal


def _signature(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(422, "signature: not base64", "signature") from e


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


def require_roots(request: Request) -> None:
    """Refuse (409 naming ``tuf``) while the image repository or the director has no root: a device
    enrolled then could not check what it is sent against anything the operator signed."""
    image = image_repository(request)  # 503 naming tuf on a server initialised before TUF
    if image.current_version(Root.type) == 0 or director_repository(request).root_repo.current_version(Root.type) == 0:
        raise ApiError(409, "tuf: no image root yet: the operator runs `edgefleet keys init --server URL` first",
                       "tuf")


@router.post("/enroll", status_code=201, response_model=EnrollOut,
             responses={409: {"description": "no image or director root published yet (field tuf)"}})
def enroll(body: EnrollIn, request: Request, state: StateDep) -> EnrollOut:
    """Enroll a device: a valid enrollment token and a CSR of the device's own key give a certificate.
    Refused with 409 (``tuf``) until the operator has published the image and director roots; the token
    is not used up then."""
    require_transport(request, state)
    parsed = parse_token(body.token, "efe")
    with state.sessions.begin() as s:
        tok = s.get(EnrollmentToken, parsed.id) if parsed else None
        if parsed is None or tok is None or not secret_matches(parsed.secret, tok.secret_sha256):
            raise ApiError(401, "token: unknown enrollment token", "token")
        if tok.revoked_at is not None or tok.expires_at <= utcnow():
            raise ApiError(401, "token: this enrollment token has expired or was revoked", "token")
        require_roots(request)
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
    """A challenge for ``device_id`` to sign. For ``purpose: auth`` it says nothing about whether the device
    exists; ``purpose: renew`` needs the device's own access token and binds the current certificate."""
    require_transport(request, state)
    ttl = state.settings.challenge_ttl
    claims: dict[str, object] = {"sub": body.device_id, "n": secrets.token_hex(16), "exp": int(time.time()) + ttl}
    if body.purpose == "renew":
        who = device_caller(request, state)
        with state.sessions() as s:
            claims.update(p=_RENEW, ser=live_device(s, who, body.device_id).cert_serial)
    else:
        claims["p"] = _CHALLENGE
    return ChallengeOut(challenge=seal(state.mac_key, claims), expires_in=ttl)


@router.post("/device-auth/token", response_model=DeviceTokenOut)
def device_token(body: DeviceTokenIn, request: Request, state: StateDep) -> DeviceTokenOut:
    """Trade a signed challenge for a short-lived access token."""
    require_transport(request, state)
    claims = open_signed(state.mac_key, body.challenge, _CHALLENGE)
    if claims is None or claims.get("sub") != body.device_id:
        raise ApiError(401, "challenge: invalid, expired, or for another device", "challenge")
    sig = _signature(body.signature)
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
    """Renew the device's certificate (e.g. for a new key). Needs the device's access token AND a renewal
    challenge signed by the current certificate's key over :func:`renewal_message`, so a stolen token
    alone cannot take over the identity. Access tokens of the old certificate, and the proof, stop
    working. 401 naming ``challenge`` or ``signature`` when the proof is missing, stale or wrong."""
    who = device_caller(request, state)
    if body.challenge is None:
        raise ApiError(401, 'challenge: renewal needs a challenge from /device-auth/challenge (purpose "renew")',
                       "challenge")
    if body.signature is None:
        raise ApiError(401, "signature: renewal needs the challenge and CSR signed by the current key", "signature")
    claims = open_signed(state.mac_key, body.challenge, _RENEW)
    if claims is None or claims.get("sub") != device_id:
        raise ApiError(401, "challenge: not a renewal challenge for this device, or expired", "challenge")
    sig = _signature(body.signature)
    with state.sessions.begin() as s:
        d = live_device(s, who, device_id)
        old_serial = d.cert_serial
        if claims.get("ser") != old_serial:
            raise ApiError(401, "challenge: already used, or issued for a replaced certificate", "challenge")
        if not verify_signature(d.cert_pem, sig, renewal_message(body.challenge, body.csr)):
            raise ApiError(401, "signature: not made by this device's current key over this challenge and CSR",
                           "signature")
        try:
            cert = state.ca.sign_device(body.csr, device_id, state.settings.device_cert_days)
        except DeviceIdentityError as e:
            raise ApiError(422, str(e), "csr") from e
        pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        serial = format(cert.serial_number, "x")
        # Compare-and-set on the serial: of two requests racing with one proof, exactly one wins.
        won = s.execute(
            update(Device)
            .where(Device.id == device_id, Device.cert_serial == old_serial)
            .values(cert_pem=pem, cert_serial=serial, cert_not_after=cert.not_valid_after_utc)
            .execution_options(synchronize_session=False)
        )
        if won.rowcount != 1:  # type: ignore[attr-defined]
            raise ApiError(401, "challenge: already used, or issued for a replaced certificate", "challenge")
        audit(s, f"device {device_id}", "device.renew", f"device:{device_id}", {"cert_serial": old_serial},
              {"cert_serial": serial})
        tags = list(d.tags)
    return EnrollOut(device_id=device_id, certificate=pem, ca_certificate=state.ca.cert_pem, tags=tags)
