"""Device identity that a stolen access token cannot take over: certificate renewal needs a fresh renewal
challenge signed by the device's CURRENT key over the challenge and the new CSR; the proof works once."""

from __future__ import annotations

import threading
from typing import Any

from _fleet import SimDevice, csr_pem, new_key, sign
from cryptography.hazmat.primitives.asymmetric import ec

from edgefleet.server.api.identity import renewal_message


def renew_challenge(d: SimDevice, headers: dict[str, str] | None = None) -> str:
    r = d.client.post(
        "/api/v1/device-auth/challenge", json={"device_id": d.id, "purpose": "renew"},
        headers=d.headers if headers is None else headers,
    )
    assert r.status_code == 200, r.text
    challenge: str = r.json()["challenge"]
    return challenge


def proof(key: ec.EllipticCurvePrivateKey, challenge: str, csr: str) -> str:
    return sign(key, renewal_message(challenge, csr).decode())


def renew(d: SimDevice, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
    return d.client.post(f"/api/v1/devices/{d.id}/certificate", json=body,
                         headers=d.headers if headers is None else headers)


def refused(r: Any, field: str) -> None:
    assert r.status_code == 401, r.text
    body = r.json()
    assert body["field"] == field and body["error"].startswith(f"{field}:"), body


def test_stolen_token_without_a_signature_cannot_renew(fleet) -> None:
    d = fleet.device()
    before = fleet.client.get(f"/api/v1/devices/{d.id}", headers=fleet.admin_h).json()["cert_serial"]
    thief_csr = csr_pem(new_key())
    refused(renew(d, {"csr": thief_csr}), "challenge")
    refused(renew(d, {"csr": thief_csr, "challenge": renew_challenge(d)}), "signature")
    # the real device still works, with its token and its certificate
    assert fleet.client.get(f"/api/v1/devices/{d.id}/desired", headers=d.headers).status_code == 200
    assert fleet.client.get(f"/api/v1/devices/{d.id}", headers=fleet.admin_h).json()["cert_serial"] == before


def test_stolen_token_with_the_thiefs_own_or_another_devices_key_cannot_renew(fleet) -> None:
    d, other = fleet.device(), fleet.device()
    before = fleet.client.get(f"/api/v1/devices/{d.id}", headers=fleet.admin_h).json()["cert_serial"]
    thief = new_key()
    csr = csr_pem(thief)
    ch = renew_challenge(d)
    refused(renew(d, {"csr": csr, "challenge": ch, "signature": proof(thief, ch, csr)}), "signature")
    refused(renew(d, {"csr": csr, "challenge": ch, "signature": proof(other.key, ch, csr)}), "signature")
    # a proof over another CSR (seen in transit) does not certify the thief's key
    honest_csr = csr_pem(new_key())
    refused(renew(d, {"csr": csr, "challenge": ch, "signature": proof(d.key, ch, honest_csr)}), "signature")
    assert fleet.client.get(f"/api/v1/devices/{d.id}", headers=fleet.admin_h).json()["cert_serial"] == before
    assert fleet.client.get(f"/api/v1/devices/{d.id}/desired", headers=d.headers).status_code == 200


def test_an_auth_challenge_or_another_devices_challenge_is_no_renewal_proof(fleet) -> None:
    d, other = fleet.device(), fleet.device()
    csr = csr_pem(new_key())
    auth_ch = fleet.client.post("/api/v1/device-auth/challenge", json={"device_id": d.id}).json()["challenge"]
    refused(renew(d, {"csr": csr, "challenge": auth_ch, "signature": proof(d.key, auth_ch, csr)}), "challenge")
    other_ch = renew_challenge(other)
    refused(renew(d, {"csr": csr, "challenge": other_ch, "signature": proof(d.key, other_ch, csr)}), "challenge")
    # and a renewal challenge buys no access token
    renew_ch = renew_challenge(d)
    r = fleet.client.post(
        "/api/v1/device-auth/token", json={"device_id": d.id, "challenge": renew_ch, "signature": sign(d.key, renew_ch)}
    )
    refused(r, "challenge")


def test_renewal_challenge_needs_the_devices_own_live_token(fleet) -> None:
    d, other = fleet.device(), fleet.device()
    r = fleet.client.post("/api/v1/device-auth/challenge", json={"device_id": d.id, "purpose": "renew"})
    refused(r, "authorization")
    r = fleet.client.post(
        "/api/v1/device-auth/challenge", json={"device_id": d.id, "purpose": "renew"}, headers=other.headers
    )
    assert r.status_code == 403 and r.json()["field"] == "device_id"


def test_renewal_with_proof_works_old_tokens_die_and_the_new_key_authenticates(fleet) -> None:
    d = fleet.device()
    old_headers, old_key = d.headers, d.key
    key = new_key()
    csr = csr_pem(key)
    ch = renew_challenge(d)
    r = renew(d, {"csr": csr, "challenge": ch, "signature": proof(d.key, ch, csr)})
    assert r.status_code == 200, r.text
    assert r.json()["device_id"] == d.id and r.json()["certificate"] != d.cert
    d.cert = r.json()["certificate"]
    serial = fleet.client.get(f"/api/v1/devices/{d.id}", headers=fleet.admin_h).json()["cert_serial"]
    assert fleet.client.get(f"/api/v1/devices/{d.id}/desired", headers=old_headers).status_code == 401
    with_old = fleet.client.post("/api/v1/device-auth/challenge", json={"device_id": d.id}).json()["challenge"]
    r = fleet.client.post(
        "/api/v1/device-auth/token",
        json={"device_id": d.id, "challenge": with_old, "signature": sign(old_key, with_old)},
    )
    refused(r, "signature")
    d.key = key
    d.authenticate()
    assert fleet.client.get(f"/api/v1/devices/{d.id}/desired", headers=d.headers).status_code == 200
    # the replaced key signs no further renewal, even with a fresh challenge and a live token
    ch, csr = renew_challenge(d), csr_pem(new_key())
    refused(renew(d, {"csr": csr, "challenge": ch, "signature": proof(old_key, ch, csr)}), "signature")
    entries = fleet.client.get("/api/v1/audit", headers=fleet.admin_h).json()
    renewals = [e for e in entries if e["action"] == "device.renew"]
    assert renewals and renewals[0]["after"] == {"cert_serial": serial} and renewals[0]["actor"] == f"device {d.id}"


def test_a_replayed_renewal_proof_is_refused_even_for_the_same_key(fleet) -> None:
    d = fleet.device()
    csr = csr_pem(d.key)  # renewing for the same key (extending validity): the proof must still work once
    ch = renew_challenge(d)
    body = {"csr": csr, "challenge": ch, "signature": proof(d.key, ch, csr)}
    assert renew(d, body).status_code == 200
    d.authenticate()  # same key, new certificate: a fresh token
    refused(renew(d, body), "challenge")
    assert fleet.client.get(f"/api/v1/devices/{d.id}/desired", headers=d.headers).status_code == 200


def test_two_renewals_racing_with_one_proof_certify_one_key(fleet) -> None:
    d = fleet.device()
    ch = renew_challenge(d)
    keys = [new_key(), new_key()]
    csrs = [csr_pem(k) for k in keys]
    results: list[int] = []
    start = threading.Barrier(2)

    def go(i: int) -> None:
        start.wait()
        body = {"csr": csrs[i], "challenge": ch, "signature": proof(d.key, ch, csrs[i])}
        results.append(renew(d, body).status_code)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [200, 401], results


def test_renewal_signature_that_is_not_base64_names_the_field(fleet) -> None:
    d = fleet.device()
    csr = csr_pem(new_key())
    r = renew(d, {"csr": csr, "challenge": renew_challenge(d), "signature": "%%%"})
    assert r.status_code == 422 and r.json()["field"] == "signature"
