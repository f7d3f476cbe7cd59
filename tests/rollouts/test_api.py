"""The rollouts API and the pin routes through the real app (SQLite and PostgreSQL): every route,
the roles, the 422 that names a bad field, the 409 of a lost compare-and-set."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from edgefleet.server.models import Assignment, AuditEntry, ModelVersion, Rollout, RolloutMember
from edgefleet.server.rollouts.codec import gate_result_to_json
from edgefleet.server.rollouts.types import GateResult
from rollouts import _ops
from rollouts._ops import add_device, add_version, assign

db_url, fleet = _ops.db_url, _ops.fleet  # the fixtures
BASE = "/api/v1/rollouts"


def _devices(fleet: Any, n: int = 10, model: str = "digits") -> list[str]:
    """n devices tagged site:a on ``model`` 1.0.0, one more on site:b; versions 1.0.0, 2.0.0, 2.1.0."""
    with fleet.state.sessions.begin() as s:
        v1 = add_version(s, model, "1.0.0")
        add_version(s, model, "2.0.0")
        add_version(s, model, "2.1.0")
        ids = []
        for i in range(n):
            d = add_device(s, f"dev-{i:02d}", ["site:a"])
            assign(s, d.id, v1)
            ids.append(d.id)
        add_device(s, "far-away", ["site:b"])
    return ids


def _create(fleet: Any, **body: Any) -> Any:
    r = fleet.client.post(BASE, json={"model": "digits", "version": "2.0.0", **body}, headers=fleet.admin_h)
    return r


def test_create_show_list_and_members(fleet: Any) -> None:
    ids = _devices(fleet)
    pinned = fleet.client.put(f"/api/v1/devices/{ids[0]}/pins/digits", json={"version": "1.0.0"},
                              headers=fleet.admin_h)
    assert pinned.status_code == 200 and pinned.json()["source"] == "pin", pinned.text
    r = _create(fleet, tags=["site:a"], stages=[10, 50, 100], soak="10m", max_failure="5%", max_p95_ratio=1.2,
                max_error_rate="1%", stage_timeout="1h", windows=[{"tag": "site:a", "window": "22:00-04:00"}],
                max_concurrent=3, on_fail="abort")
    assert r.status_code == 201, r.text
    out = r.json()
    assert (out["model"], out["version"], out["state"], out["stage"], out["phase"]) == (
        "digits", "2.0.0", "running", 0, "serve")
    assert out["gates"]["soak_s"] == 600 and out["gates"]["max_failure"] == 0.05
    assert out["gates"]["windows"] == [["site:a", "22:00-04:00"]] and out["gates"]["on_fail"] == "abort"
    assert out["members"]["total"] == 10 and out["members"]["waiting"] == 9 and out["members"]["skipped"] == 1
    assert out["skipped"] == [{"device_id": ids[0], "detail": "pinned"}]
    assert [(st["percent"], st["devices"]) for st in out["stages"]] == [(10, 1), (50, 5), (100, 9)]
    assert out["stages"][0]["current"] and out["stages"][0]["members"] == {"waiting": 1}
    assert "Stage 1 of 3 (10%, 1 of 9 devices)" in out["explanation"], out["explanation"]
    assert "1 skipped (1 pinned)" in out["reason"]
    rid = out["id"]

    shown = fleet.client.get(f"{BASE}/{rid}", headers=fleet.admin_h).json()
    assert shown["id"] == rid and shown["state_version"] == 0

    listed = fleet.client.get(BASE, params={"model": "digits", "state": "running"}, headers=fleet.admin_h).json()
    assert [x["id"] for x in listed] == [rid]
    assert fleet.client.get(BASE, params={"state": "paused"}, headers=fleet.admin_h).json() == []
    assert fleet.client.get(BASE, params={"model": "other"}, headers=fleet.admin_h).json() == []

    page1 = fleet.client.get(f"{BASE}/{rid}/members", params={"limit": 4}, headers=fleet.admin_h).json()
    page2 = fleet.client.get(f"{BASE}/{rid}/members", params={"limit": 4, "offset": 4}, headers=fleet.admin_h).json()
    assert [m["rank"] for m in page1 + page2] == list(range(8))
    everyone = fleet.client.get(f"{BASE}/{rid}/members", headers=fleet.admin_h).json()
    stages = [m["stage"] for m in everyone if m["status"] != "skipped"]
    assert stages == sorted(stages) and stages.count(1) == 1 and stages.count(2) == 4 and stages.count(3) == 4
    assert all(m["previous_version"] == "1.0.0" for m in everyone)
    skipped = fleet.client.get(f"{BASE}/{rid}/members", params={"status": "skipped"}, headers=fleet.admin_h).json()
    assert [(m["device_id"], m["stage"], m["detail"]) for m in skipped] == [(ids[0], None, "pinned")]


def test_show_gives_the_last_gates_and_the_ab_comparison(fleet: Any) -> None:
    _devices(fleet, 6)
    rid = _create(fleet, version_b="2.1.0", hold="1d").json()["id"]
    gates = [
        GateResult("p95_ratio", "wait", threshold=1.2, estimate=1.05, low=0.9, high=1.31, p_value=0.41,
                   n_candidate=2, n_baseline=3, samples_candidate=400, samples_baseline=600,
                   detail="p95 ratio 1.05 [0.9, 1.31] vs 1.2: waiting"),
        GateResult("ab", "pass", threshold=0.0, estimate=0.01, low=-0.02, high=0.04, p_value=0.5, n_candidate=3,
                   n_baseline=3, detail="A/B error rate b-a 0.01 [-0.02, 0.04]: not significant"),
    ]
    with fleet.state.sessions.begin() as s:
        r = s.get(Rollout, rid)
        assert r is not None
        r.last_gates = [gate_result_to_json(g) for g in gates]
        r.reason = "stage 1 (1%): waiting: p95 ratio 1.05 [0.9, 1.31] vs 1.2"
    out = fleet.client.get(f"{BASE}/{rid}", headers=fleet.admin_h).json()
    assert out["version_b"] == "2.1.0" and out["gates"]["hold_s"] == 86400
    assert [g["name"] for g in out["last_gates"]] == ["p95_ratio"]
    g = out["last_gates"][0]
    assert (g["estimate"], g["low"], g["high"], g["p_value"], g["n_candidate"], g["samples_baseline"]) == (
        1.05, 0.9, 1.31, 0.41, 2, 600)
    assert [a["detail"] for a in out["ab"]] == [gates[1].detail]
    assert "Last decision: stage 1 (1%): waiting" in out["explanation"]


def test_roles_viewer_reads_but_cannot_create_or_act(fleet: Any) -> None:
    _devices(fleet, 3)
    rid = _create(fleet).json()["id"]
    viewer = fleet.auth(fleet.api_token("viewer"))
    operator = fleet.auth(fleet.api_token("operator"))
    body = {"model": "digits", "version": "2.1.0"}
    r = fleet.client.post(BASE, json=body, headers=viewer)
    assert r.status_code == 403 and r.json()["field"] == "authorization"
    for action in ("pause", "resume", "abort", "promote"):
        assert fleet.client.post(f"{BASE}/{rid}/{action}", headers=viewer).status_code == 403
    assert fleet.client.put("/api/v1/devices/dev-00/pins/digits", json={"version": "1.0.0"},
                            headers=viewer).status_code == 403
    assert fleet.client.delete("/api/v1/devices/dev-00/pins/digits", headers=viewer).status_code == 403
    for path in (BASE, f"{BASE}/{rid}", f"{BASE}/{rid}/members"):
        assert fleet.client.get(path, headers=viewer).status_code == 200
        assert fleet.client.get(path).status_code == 401
    assert fleet.client.post(f"{BASE}/{rid}/pause", headers=operator).status_code == 200
    with fleet.state.sessions() as s:
        e = s.scalars(select(AuditEntry).where(AuditEntry.action == "rollout.pause")).one()
        assert e.actor.startswith("operator-x") and e.target == f"rollout:{rid}"


@pytest.mark.parametrize(("body", "field", "words"), [
    ({"soak": "10x"}, "body.soak", "expected seconds or a number with s, m, h or d"),
    ({"soak": -5}, "body.soak", ">= 0"),
    ({"stage_timeout": "400d"}, "body.stage_timeout", "at most"),
    ({"max_failure": 5}, "body.max_failure", "write a percentage"),
    ({"max_failure": "five"}, "body.max_failure", "expected a number"),
    ({"max_p95_ratio": 0}, "body.max_p95_ratio", "> 0"),
    ({"stages": [10, 5, 100]}, "body.stages", "strictly increasing"),
    ({"stages": [10, 50]}, "body.stages", "last stage must be 100"),
    ({"stages": [0, 100]}, "body.stages.0", "greater than or equal to 1"),
    ({"on_fail": "explode"}, "body.on_fail", "pause"),
    ({"windows": [{"tag": "site:a", "window": "25:00-26:00"}]}, "body.windows.0.window", "not a time of day"),
    ({"tags": ["bad tag"]}, "body.tags.0", "pattern"),
    ({"hold": "1d"}, "body", "needs version_b"),
    ({"version_b": "2.0.0"}, "body", "must differ"),
    ({"surprise": 1}, "body.surprise", "Extra inputs"),
    ({"version": "not a version"}, "body.version", "pattern"),
])
def test_bad_bodies_are_422_naming_the_field(fleet: Any, body: dict[str, Any], field: str, words: str) -> None:
    r = _create(fleet, **body)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field and words in r.json()["error"], r.json()


def test_refusals_404_and_409(fleet: Any) -> None:
    _devices(fleet, 2)
    r = _create(fleet, version="9.0.0")
    assert r.status_code == 404 and r.json()["field"] == "version"
    r = _create(fleet, tags=["site:nowhere"])
    assert r.status_code == 409 and r.json()["field"] == "tags"
    r = _create(fleet, version="1.0.0", tags=["site:a"])
    assert r.status_code == 409 and "already run digits 1.0.0" in r.json()["error"]
    assert fleet.client.get(f"{BASE}/999", headers=fleet.admin_h).status_code == 404
    assert fleet.client.get(f"{BASE}/999/members", headers=fleet.admin_h).status_code == 404
    assert fleet.client.post(f"{BASE}/999/pause", headers=fleet.admin_h).status_code == 404
    with fleet.state.sessions() as s:
        assert s.scalars(select(Rollout)).all() == []  # nothing was left behind by the refusals


def test_pause_resume_promote_abort(fleet: Any) -> None:
    ids = _devices(fleet, 10)
    rid = _create(fleet, stages=[10, 50, 100], tags=["site:a"]).json()["id"]
    h = fleet.admin_h
    r = fleet.client.post(f"{BASE}/{rid}/pause", json={"reason": "night shift"}, headers=h)
    assert r.status_code == 200 and r.json()["state"] == "paused" and "night shift" in r.json()["reason"]
    assert "nothing moves until `rollout resume`" in r.json()["explanation"]
    assert fleet.client.post(f"{BASE}/{rid}/pause", headers=h).json()["state_version"] == 1  # unchanged
    r = fleet.client.post(f"{BASE}/{rid}/resume", headers=h)
    assert r.status_code == 200 and r.json()["state"] == "running" and r.json()["state_version"] == 2
    r = fleet.client.post(f"{BASE}/{rid}/promote", json={"reason": "looks fine"}, headers=h)
    assert r.status_code == 200 and r.json()["stage"] == 1 and "gates of stage 1 (10%) skipped" in r.json()["reason"]
    # the controller assigned stage 2 meanwhile (here: straight in the database, as apply does)
    with fleet.state.sessions.begin() as s:
        v1 = s.scalar(select(ModelVersion.id).where(ModelVersion.version == "1.0.0"))
        v2 = s.scalar(select(ModelVersion.id).where(ModelVersion.version == "2.0.0"))
        for m in s.scalars(select(RolloutMember).where(RolloutMember.rollout_id == rid, RolloutMember.rank < 5)):
            m.status = "assigned"
            a = s.get(Assignment, (m.device_id, "digits"))
            assert a is not None
            a.source, a.version_id = f"rollout:{rid}", v2
    stale = r.json()["state_version"] - 1
    r = fleet.client.post(f"{BASE}/{rid}/abort", json={"state_version": stale}, headers=h)
    assert r.status_code == 409 and r.json()["field"] == "state_version" and "retry" in r.json()["error"]
    r = fleet.client.post(f"{BASE}/{rid}/abort", json={"reason": "p95 looks off"}, headers=h)
    assert r.status_code == 200 and r.json()["state"] == "aborted" and r.json()["ended_at"] is not None
    with fleet.state.sessions() as s:
        rows = {a.device_id: (a.version_id, a.source) for a in s.scalars(select(Assignment))}
        assert {rows[d] for d in ids} == {(v1, "operator")}  # every touched device is back on 1.0.0
    for action in ("pause", "resume", "promote", "abort"):
        r = fleet.client.post(f"{BASE}/{rid}/{action}", headers=h)
        assert r.status_code == 409 and "aborted" in r.json()["error"], (action, r.text)
    r = fleet.client.post(f"{BASE}/{rid}/promote", json={"version": "bad version"}, headers=h)
    assert r.status_code == 422 and r.json()["field"] == "body.version"


def test_pin_and_unpin_routes(fleet: Any) -> None:
    ids = _devices(fleet, 4)
    rid = _create(fleet).json()["id"]
    h = fleet.admin_h
    r = fleet.client.put(f"/api/v1/devices/{ids[2]}/pins/digits", json={"version": "2.1.0"}, headers=h)
    assert r.status_code == 200, r.text
    assert r.json() == {"device_id": ids[2], "model": "digits", "version": "2.1.0", "source": "pin",
                        "changed": True, "released_from_rollouts": [rid]}
    members = {m["device_id"]: m for m in fleet.client.get(f"{BASE}/{rid}/members", headers=h).json()}
    assert members[ids[2]]["status"] == "released"
    r = fleet.client.delete(f"/api/v1/devices/{ids[2]}/pins/digits", headers=h)
    assert r.status_code == 200 and (r.json()["source"], r.json()["version"], r.json()["changed"]) == (
        "operator", "2.1.0", True)
    r = fleet.client.delete(f"/api/v1/devices/{ids[2]}/pins/digits", headers=h)
    assert r.status_code == 200 and r.json()["changed"] is False
    assert fleet.client.delete(f"/api/v1/devices/{ids[2]}/pins/words", headers=h).status_code == 404
    assert fleet.client.put(f"/api/v1/devices/{ids[2]}/pins/digits", json={"version": "7.0.0"},
                            headers=h).status_code == 404
    assert fleet.client.put("/api/v1/devices/nobody/pins/digits", json={"version": "1.0.0"},
                            headers=h).status_code == 404
    r = fleet.client.put(f"/api/v1/devices/{ids[2]}/pins/digits", json={"version": "v 1"}, headers=h)
    assert r.status_code == 422 and r.json()["field"] == "body.version"
