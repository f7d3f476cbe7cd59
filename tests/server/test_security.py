"""Security: devices act only as themselves, revocation and expiry hold, roles bound operators, and
no secret reaches a log."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from urllib.parse import quote

import pytest
from _fleet import SimDevice, csr_pem, enroll, make_bundle, new_key, sign
from fastapi.testclient import TestClient
from sqlalchemy import update

from edgefleet.server.app import create_app
from edgefleet.server.models import EnrollmentToken, utcnow

REPORT = {"agent_version": "0.1.0", "running": [{"name": "digits", "version": "1.0.0"}]}


def test_device_a_cannot_read_b_desired_state_or_report_as_b(fleet) -> None:
    a, b = fleet.device(), fleet.device()
    r = fleet.client.get(f"/api/v1/devices/{b.id}/desired", headers=a.headers)
    assert r.status_code == 403 and r.json()["field"] == "device_id"
    r = fleet.client.post(f"/api/v1/devices/{b.id}/reports", json=REPORT, headers=a.headers)
    assert r.status_code == 403
    assert fleet.client.post(f"/api/v1/devices/{a.id}/reports", json=REPORT, headers=a.headers).status_code == 204
    shown = fleet.client.get(f"/api/v1/devices/{b.id}", headers=fleet.admin_h).json()
    assert shown["running"] == [] and shown["agent_version"] is None


def test_device_cannot_get_a_token_for_another_device_with_its_own_key(fleet) -> None:
    a, b = fleet.device(), fleet.device()
    ch = fleet.client.post("/api/v1/device-auth/challenge", json={"device_id": b.id}).json()["challenge"]
    r = fleet.client.post(
        "/api/v1/device-auth/token", json={"device_id": b.id, "challenge": ch, "signature": sign(a.key, ch)}
    )
    assert r.status_code == 401 and r.json()["field"] == "signature"
    ch_a = fleet.client.post("/api/v1/device-auth/challenge", json={"device_id": a.id}).json()["challenge"]
    r = fleet.client.post(
        "/api/v1/device-auth/token", json={"device_id": b.id, "challenge": ch_a, "signature": sign(b.key, ch_a)}
    )
    assert r.status_code == 401 and r.json()["field"] == "challenge"


def test_unenrolled_device_is_refused(fleet) -> None:
    ghost = SimDevice(fleet.client, "dev-0000000000000000", new_key(), "", "")
    ch = fleet.client.post("/api/v1/device-auth/challenge", json={"device_id": ghost.id}).json()["challenge"]
    r = fleet.client.post(
        "/api/v1/device-auth/token", json={"device_id": ghost.id, "challenge": ch, "signature": sign(ghost.key, ch)}
    )
    assert r.status_code == 403
    assert fleet.client.get(f"/api/v1/devices/{ghost.id}/desired").status_code == 401
    forged = {"Authorization": "Bearer eyJwIjoiZGV2In0.AAAA"}
    assert fleet.client.get(f"/api/v1/devices/{ghost.id}/desired", headers=forged).status_code == 401


def test_revoked_device_is_refused_with_its_live_token_and_cannot_authenticate_again(fleet) -> None:
    d = fleet.device()
    assert fleet.client.get(f"/api/v1/devices/{d.id}/desired", headers=d.headers).status_code == 200
    assert fleet.client.post(f"/api/v1/devices/{d.id}/revoke", headers=fleet.admin_h).json()["revoked"] is True
    assert fleet.client.get(f"/api/v1/devices/{d.id}/desired", headers=d.headers).status_code == 403
    assert fleet.client.post(f"/api/v1/devices/{d.id}/reports", json=REPORT, headers=d.headers).status_code == 403
    with pytest.raises(AssertionError):
        d.authenticate()


def test_stolen_device_token_expires(fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    d = fleet.device()
    later = time.time() + fleet.settings.device_token_ttl + 1
    monkeypatch.setattr("edgefleet.server.tokens.time.time", lambda: later)
    r = fleet.client.get(f"/api/v1/devices/{d.id}/desired", headers=d.headers)
    assert r.status_code == 401 and "expired" in r.json()["error"]


def test_used_up_enrollment_token_is_refused(fleet) -> None:
    token = fleet.enrollment_token(max_uses=2)
    enroll(fleet.client, token), enroll(fleet.client, token)
    r = fleet.client.post("/api/v1/enroll", json={"token": token, "csr": csr_pem(new_key())})
    assert r.status_code == 401 and "used up" in r.json()["error"] and r.json()["field"] == "token"


def test_expired_or_revoked_enrollment_token_is_refused(fleet) -> None:
    token = fleet.enrollment_token()
    with fleet.state.sessions.begin() as s:
        s.execute(update(EnrollmentToken).values(expires_at=utcnow()))
    r = fleet.client.post("/api/v1/enroll", json={"token": token, "csr": csr_pem(new_key())})
    assert r.status_code == 401 and "expired" in r.json()["error"]
    other = fleet.enrollment_token()
    token_id = other.split("_")[1]
    assert fleet.client.delete(f"/api/v1/enrollment-tokens/{token_id}", headers=fleet.admin_h).status_code == 204
    assert fleet.client.post("/api/v1/enroll", json={"token": other, "csr": csr_pem(new_key())}).status_code == 401


def test_enrollment_gives_a_certificate_for_the_device_key_with_its_id_as_cn(fleet) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    d = enroll(fleet.client, fleet.enrollment_token(tags=["site:berlin"]))
    cert = x509.load_pem_x509_certificate(d.cert.encode())
    assert cert.subject.rfc4514_string() == f"CN={d.id}"
    ser = serialization.PublicFormat.SubjectPublicKeyInfo
    assert cert.public_key().public_bytes(serialization.Encoding.DER, ser) == d.key.public_key().public_bytes(
        serialization.Encoding.DER, ser
    )
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(d.ca.encode()))
    assert fleet.client.get(f"/api/v1/devices/{d.id}", headers=fleet.admin_h).json()["tags"] == ["site:berlin"]


def test_viewer_token_cannot_push_or_change_anything(fleet, tmp_path: Path) -> None:
    viewer = fleet.auth(fleet.api_token("viewer"))
    d = fleet.device()
    fleet.upload(make_bundle(tmp_path / "a"))
    assert fleet.client.get("/api/v1/devices", headers=viewer).status_code == 200
    attempts = [
        ("POST", "/api/v1/models", {"content": make_bundle(tmp_path / "b", "other").read_bytes()}),
        ("DELETE", "/api/v1/models/digits/1.0.0", {}),
        ("POST", "/api/v1/tokens", {"json": {"name": "x", "role": "admin"}}),
        ("GET", "/api/v1/tokens", {}),
        ("POST", "/api/v1/enrollment-tokens", {"json": {}}),
        ("PUT", f"/api/v1/devices/{d.id}/tags", {"json": {"tags": ["x"]}}),
        ("POST", f"/api/v1/devices/{d.id}/revoke", {}),
        ("PUT", f"/api/v1/devices/{d.id}/models/digits", {"json": {"version": "1.0.0"}}),
        ("DELETE", f"/api/v1/devices/{d.id}/models/digits", {}),
    ]
    before = len(fleet.client.get("/api/v1/audit", headers=viewer).json())
    for method, path, kw in attempts:
        r = fleet.client.request(method, path, headers=viewer, **kw)
        assert r.status_code == 403, (method, path, r.text)
        assert r.json()["field"] == "authorization"
    assert len(fleet.client.get("/api/v1/audit", headers=viewer).json()) == before
    # and a device token is no operator token
    assert fleet.client.get("/api/v1/devices", headers=d.headers).status_code == 401


def test_revoked_operator_token_is_refused(fleet) -> None:
    token = fleet.api_token("operator")
    assert fleet.client.delete(f"/api/v1/tokens/{token.split('_')[1]}", headers=fleet.admin_h).status_code == 204
    assert fleet.client.get("/api/v1/devices", headers=fleet.auth(token)).status_code == 401


def test_renewal_replaces_the_certificate_and_retires_old_tokens(fleet) -> None:
    from edgefleet.server.api.identity import renewal_message

    d = fleet.device()
    old = d.headers
    key = new_key()
    ch = fleet.client.post(
        "/api/v1/device-auth/challenge", json={"device_id": d.id, "purpose": "renew"}, headers=d.headers
    ).json()["challenge"]
    csr = csr_pem(key)
    proof = sign(d.key, renewal_message(ch, csr).decode())
    body = {"csr": csr, "challenge": ch, "signature": proof}
    r = fleet.client.post(f"/api/v1/devices/{d.id}/certificate", json=body, headers=d.headers)
    assert r.status_code == 200, r.text
    assert fleet.client.get(f"/api/v1/devices/{d.id}/desired", headers=old).status_code == 401
    d.key = key
    d.authenticate()
    assert fleet.client.get(f"/api/v1/devices/{d.id}/desired", headers=d.headers).status_code == 200


def test_renewal_with_only_a_bearer_token_is_refused(fleet) -> None:
    d = fleet.device()
    r = fleet.client.post(f"/api/v1/devices/{d.id}/certificate", json={"csr": csr_pem(new_key())}, headers=d.headers)
    assert r.status_code == 401 and r.json()["field"] == "challenge"
    assert fleet.client.get(f"/api/v1/devices/{d.id}/desired", headers=d.headers).status_code == 200


def test_client_certificate_from_a_trusted_proxy_header_authenticates(fleet) -> None:
    d = fleet.device()
    header = {"x-client-cert": quote(d.cert)}
    trusted = fleet.settings.model_copy(update={"trusted_proxies": ["testclient"]})
    with TestClient(create_app(trusted, replace(fleet.state, settings=trusted))) as via_proxy:
        assert via_proxy.get(f"/api/v1/devices/{d.id}/desired", headers=header).status_code == 200
        other = fleet.device()
        assert via_proxy.get(f"/api/v1/devices/{other.id}/desired", headers=header).status_code == 403
        bad = {"x-client-cert": quote(d.ca)}  # the CA cert is not a device cert signed by the CA... for this CN
        assert via_proxy.get(f"/api/v1/devices/{d.id}/desired", headers=bad).status_code in (401, 403)
    # from an untrusted address the header is ignored
    assert fleet.client.get(f"/api/v1/devices/{d.id}/desired", headers=header).status_code == 401


def test_devices_must_use_tls_unless_plain_http_is_allowed(fleet) -> None:
    strict = fleet.settings.model_copy(update={"allow_plain_http_devices": False})
    with TestClient(create_app(strict, replace(fleet.state, settings=strict))) as c:
        r = c.post("/api/v1/enroll", json={"token": fleet.enrollment_token(), "csr": csr_pem(new_key())})
        assert r.status_code == 403 and r.json()["field"] == "scheme"


def test_tokens_never_appear_in_logs(fleet, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    operator = fleet.api_token("operator")
    enroll_token = fleet.enrollment_token()
    d = enroll(fleet.client, enroll_token)
    d.authenticate()
    fleet.upload(make_bundle(tmp_path), operator)
    fleet.client.get(f"/api/v1/devices/{d.id}/desired", headers=d.headers)
    fleet.client.get("/api/v1/devices", headers={"Authorization": f"Bearer {operator}x"})
    fleet.client.post("/api/v1/enroll", json={"token": enroll_token, "csr": "junk"})
    secrets = [fleet.admin, operator, enroll_token, d.token]
    # the secret part alone: everything after "kind_id_" (urlsafe base64, so it may hold "_" itself)
    secrets += [s.split("_", 2)[-1] for s in secrets[:3]]
    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert caplog.records, "expected some logging to inspect"
    for secret in secrets:
        assert secret not in logged
