"""Check-in: ETag/304 when unchanged, a new ETag when an assignment changes, reports, last seen,
online/offline, metrics."""

from __future__ import annotations

from pathlib import Path

from _fleet import make_bundle
from sqlalchemy import select

from edgefleet.server.models import Device, DeviceEvent


def test_unchanged_desired_state_is_a_304_and_an_assignment_changes_the_etag(fleet, tmp_path: Path) -> None:
    d = fleet.device()
    first = fleet.client.get(f"/api/v1/devices/{d.id}/desired", headers=d.headers)
    assert first.status_code == 200 and first.json()["models"] == []
    etag = first.headers["etag"]
    again = fleet.client.get(f"/api/v1/devices/{d.id}/desired", headers={**d.headers, "If-None-Match": etag})
    assert again.status_code == 304 and again.headers["etag"] == etag

    sha = fleet.upload(make_bundle(tmp_path)).json()["sha256"]
    r = fleet.client.put(f"/api/v1/devices/{d.id}/models/digits", json={"version": "1.0.0"}, headers=fleet.admin_h)
    assert r.status_code == 200, r.text
    changed = fleet.client.get(f"/api/v1/devices/{d.id}/desired", headers={**d.headers, "If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["etag"] != etag
    assert changed.json()["models"] == [
        {
            "name": "digits",
            "version": "1.0.0",
            "sha256": sha,
            "size": changed.json()["models"][0]["size"],
            "url": f"/api/v1/blobs/{sha}",
            "source": "operator",
        }
    ]
    new = changed.headers["etag"]
    assert (
        fleet.client.get(f"/api/v1/devices/{d.id}/desired", headers={**d.headers, "If-None-Match": new}).status_code
        == 304
    )


def test_check_ins_write_last_seen_at_most_once_per_granularity(fleet) -> None:
    d = fleet.device()
    fleet.client.get(f"/api/v1/devices/{d.id}/desired", headers=d.headers)
    with fleet.state.sessions() as s:
        first = s.scalar(select(Device.last_seen).where(Device.id == d.id))
    for _ in range(3):
        fleet.client.get(f"/api/v1/devices/{d.id}/desired", headers=d.headers)
    with fleet.state.sessions() as s:
        assert s.scalar(select(Device.last_seen).where(Device.id == d.id)) == first
    listed = fleet.client.get("/api/v1/devices?online=true", headers=fleet.admin_h).json()
    assert [x["id"] for x in listed] == [d.id] and listed[0]["online"] is True


def test_report_records_versions_events_agent_and_hardware(fleet) -> None:
    d = fleet.device(["lab"])
    report = {
        "agent_version": "0.3.1",
        "hardware_profile": "raspberry-pi-5",
        "running": [{"name": "digits", "version": "1.0.0"}],
        "events": [{"at": "2026-11-23T10:00:00Z", "kind": "install.ok", "model": "digits", "version": "1.0.0"}],
    }
    assert fleet.client.post(f"/api/v1/devices/{d.id}/reports", json=report, headers=d.headers).status_code == 204
    shown = fleet.client.get(f"/api/v1/devices/{d.id}", headers=fleet.admin_h).json()
    assert shown["agent_version"] == "0.3.1" and shown["hardware_profile"] == "raspberry-pi-5"
    assert shown["running"] == [{"name": "digits", "version": "1.0.0", "sha256": None}]
    assert shown["online"] is True and (shown["desired"]["device_id"], shown["desired"]["models"]) == (d.id, [])
    with fleet.state.sessions() as s:
        assert [e.kind for e in s.scalars(select(DeviceEvent))] == ["install.ok"]
    assert [(e["kind"], e["seq"], e["model"]) for e in shown["events"]] == [("install.ok", None, "digits")]
    assert [x["id"] for x in fleet.client.get("/api/v1/devices?tag=lab", headers=fleet.admin_h).json()] == [d.id]
    assert fleet.client.get("/api/v1/devices?tag=other", headers=fleet.admin_h).json() == []


def test_a_bad_report_is_a_422_naming_the_field(fleet) -> None:
    d = fleet.device()
    r = fleet.client.post(f"/api/v1/devices/{d.id}/reports", json={"agent_version": "x y"}, headers=d.headers)
    assert r.status_code == 422 and r.json()["field"] == "body.agent_version"


def test_metrics_count_requests_check_ins_and_devices_online(fleet) -> None:
    d = fleet.device()
    etag = fleet.client.get(f"/api/v1/devices/{d.id}/desired", headers=d.headers).headers["etag"]
    fleet.client.get(f"/api/v1/devices/{d.id}/desired", headers={**d.headers, "If-None-Match": etag})
    text = fleet.client.get("/metrics").text
    assert 'edgefleet_checkins_total{result="304"} 1.0' in text
    assert 'edgefleet_devices{state="online"} 1.0' in text
    assert 'route="/api/v1/devices/{device_id}/desired"' in text
    assert "edgefleet_http_request_seconds_bucket" in text


def test_openapi_and_docs_are_served(fleet) -> None:
    spec = fleet.client.get("/openapi.json").json()
    assert "/api/v1/devices/{device_id}/desired" in spec["paths"]
    assert fleet.client.get("/docs").status_code == 200


def test_metric_labels_come_from_fixed_sets() -> None:
    from edgefleet.server.metrics import method_label, status_label

    methods = ("GET", "POST", "BREW", "get", "X" * 500)
    assert [method_label(m) for m in methods] == ["GET", "POST", "other", "other", "other"]
    statuses = (200, 304, 413, 418, 599, 999, 42)
    assert [status_label(s) for s in statuses] == ["200", "304", "413", "4xx", "5xx", "other", "other"]


def test_only_database_state_errors_are_a_503() -> None:
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    from edgefleet.server.errors import database_unavailable

    locked = OperationalError("UPDATE devices", {}, Exception("database is locked"))
    assert database_unavailable(locked) and database_unavailable(PoolTimeout("pool"))
    assert not database_unavailable(ProgrammingError("SELECT", {}, Exception("syntax")))
    assert not database_unavailable(IntegrityError("INSERT", {}, Exception("unique")))
    assert not database_unavailable(ValueError("x"))
