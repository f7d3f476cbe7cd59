"""Device update events under one per-device sequence (SQLite and PostgreSQL): a report sent again after a
lost answer stores nothing twice, events are listed newest first with a bounded limit and ``before_seq``
paging, ``device show`` carries the last reported update block and the last 20 events, only operators
read events (a device is 403, for its own or another's), and bad fields are a 422 naming the field."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select

from edgefleet.server.api.checkin import _insert_events
from edgefleet.server.api.schemas import UpdateEvent
from edgefleet.server.models import DeviceEvent

T0 = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)


def _event(seq: int | None, kind: str = "download.started", **extra: Any) -> dict[str, Any]:
    at = T0 + timedelta(seconds=seq or 0)
    return {**({"seq": seq} if seq is not None else {}), "at": at.isoformat(), "kind": kind, "model": "digits",
            "version": "1.1.0", **extra}


def _report(fleet: Any, device: Any, events: list[dict[str, Any]], **extra: Any) -> Any:
    body = {"agent_version": "0.4.0", "events": events, **extra}
    return fleet.client.post(f"/api/v1/devices/{device.id}/reports", json=body, headers=device.headers)


def _events(fleet: Any, device_id: str, headers: dict[str, str] | None = None, **params: Any) -> Any:
    return fleet.client.get(f"/api/v1/devices/{device_id}/events", params=params, headers=headers or fleet.admin_h)


def _stored(fleet: Any, device_id: str) -> int:
    with fleet.state.sessions() as s:
        return int(s.scalar(select(func.count()).select_from(DeviceEvent).where(DeviceEvent.device_id == device_id))
                   or 0)


def test_a_report_sent_again_after_a_lost_answer_stores_each_event_once(fleet: Any) -> None:
    device, other = fleet.device(), fleet.device()
    failure = {"reason": "hash_mismatch", "detail": "sha256 differs", "target": "digits-1.1.0.efb"}
    update = {"state": "downloading", "target": "digits-1.1.0.efb", "last_failure": failure}
    assert _report(fleet, device, [_event(1), _event(2), _event(3)], update=update).status_code == 204
    # the answer was lost: the device sends the same events again, with a new one and a repeat inside the batch
    again = [_event(2), _event(3), _event(4, "download.failed", reason="hash_mismatch", target="digits-1.1.0.efb",
                                           sha256="ab" * 32, detail="sha256 differs"), _event(4)]
    assert _report(fleet, device, again).status_code == 204
    assert _stored(fleet, device.id) == 4
    listed = _events(fleet, device.id).json()
    assert [e["seq"] for e in listed] == [4, 3, 2, 1]
    assert listed[0] == {
        "seq": 4, "at": "2026-12-01T10:00:04Z", "received_at": listed[0]["received_at"], "kind": "download.failed",
        "model": "digits", "version": "1.1.0", "target": "digits-1.1.0.efb", "sha256": "ab" * 32,
        "reason": "hash_mismatch", "detail": "sha256 differs",
    }
    # another device's numbers are its own
    assert _report(fleet, other, [_event(1), _event(2)]).status_code == 204
    assert [e["seq"] for e in _events(fleet, other.id).json()] == [2, 1]

    # the update block is kept until the next one; a report without one leaves it
    shown = fleet.client.get(f"/api/v1/devices/{device.id}", headers=fleet.admin_h).json()
    assert shown["update"] == {"state": "downloading", "target": "digits-1.1.0.efb",
                               "last_failure": {**failure, "at": None, "sha256": None}}
    assert _report(fleet, device, [], update={"state": "idle"}).status_code == 204
    shown = fleet.client.get(f"/api/v1/devices/{device.id}", headers=fleet.admin_h).json()
    assert shown["update"] == {"state": "idle", "target": None, "last_failure": None}


def test_events_without_a_seq_from_older_agents_are_kept_and_listed_after_the_numbered_ones(fleet: Any) -> None:
    device = fleet.device()
    assert _report(fleet, device, [_event(None, "install.ok"), _event(None, "install.ok")]).status_code == 204
    assert _report(fleet, device, [_event(1, "check.started")]).status_code == 204
    assert [(e["seq"], e["kind"]) for e in _events(fleet, device.id).json()] == [
        (1, "check.started"), (None, "install.ok"), (None, "install.ok")]


def test_events_are_listed_newest_first_with_a_bounded_limit_and_before_seq_paging(fleet: Any) -> None:
    device = fleet.device()
    assert _report(fleet, device, [_event(n) for n in range(1, 31)]).status_code == 204
    page = _events(fleet, device.id, limit=10).json()
    assert [e["seq"] for e in page] == list(range(30, 20, -1))
    page = _events(fleet, device.id, limit=10, before_seq=page[-1]["seq"]).json()
    assert [e["seq"] for e in page] == list(range(20, 10, -1))
    assert [e["seq"] for e in _events(fleet, device.id, before_seq=3).json()] == [2, 1]
    assert len(_events(fleet, device.id).json()) == 30  # the default page (100) holds them all

    shown = fleet.client.get(f"/api/v1/devices/{device.id}", headers=fleet.admin_h).json()
    assert [e["seq"] for e in shown["events"]] == list(range(30, 10, -1))  # the last 20
    assert fleet.client.get("/api/v1/devices", headers=fleet.admin_h).json()[0]["events"] is None  # show only

    for params, field in (({"limit": 501}, "query.limit"), ({"limit": 0}, "query.limit"),
                          ({"before_seq": 0}, "query.before_seq")):
        r = _events(fleet, device.id, **params)
        assert r.status_code == 422 and r.json()["field"] == field, r.text
    r = _events(fleet, "no-such-device")
    assert r.status_code == 404 and r.json()["field"] == "device_id"


def test_only_operators_read_events_and_a_device_is_403_for_its_own_or_anothers(fleet: Any) -> None:
    mine, other = fleet.device(), fleet.device()
    assert _report(fleet, other, [_event(1)]).status_code == 204
    for device_id in (other.id, mine.id):
        r = _events(fleet, device_id, headers=mine.headers)
        assert r.status_code == 403 and r.json()["field"] == "authorization", r.text
        assert mine.id in r.json()["error"]
    r = fleet.client.get(f"/api/v1/devices/{other.id}/events")
    assert r.status_code == 401 and r.json()["field"] == "authorization"
    r = _events(fleet, other.id, headers={"Authorization": "Bearer not-a-token"})
    assert r.status_code == 401 and r.json()["field"] == "authorization"
    viewer = fleet.auth(fleet.api_token("viewer"))
    assert [e["seq"] for e in _events(fleet, other.id, headers=viewer).json()] == [1]
    # and a device may not report events as another device
    r = fleet.client.post(f"/api/v1/devices/{other.id}/reports", json={"agent_version": "0.4.0",
                          "events": [_event(2)]}, headers=mine.headers)
    assert r.status_code == 403 and _stored(fleet, other.id) == 1


def test_a_bad_event_or_update_field_is_a_422_naming_it_and_stores_nothing(fleet: Any) -> None:
    device = fleet.device()
    cases = [
        ([_event(1, reason="Hash Mismatch")], {}, "body.events.0.reason"),
        ([_event(0)], {}, "body.events.0.seq"),
        ([_event(1, target="../etc/passwd")], {}, "body.events.0.target"),
        ([_event(1, sha256="xyz")], {}, "body.events.0.sha256"),
        ([{**_event(1), "at": "2026-12-01T10:00:00"}], {}, "body.events.0.at"),  # no zone: ambiguous
        ([], {"update": {"state": "Bad State"}}, "body.update.state"),
        ([], {"update": {"state": "idle", "last_failure": {"detail": "x"}}}, "body.update.last_failure.reason"),
        ([], {"update": {"state": "idle", "extra": 1}}, "body.update.extra"),
    ]
    for events, extra, field in cases:
        r = _report(fleet, device, events, **extra)
        assert r.status_code == 422 and r.json()["field"] == field, (field, r.text)
    assert _stored(fleet, device.id) == 0


def test_two_reports_racing_with_the_same_seq_store_it_once_and_both_succeed(fleet: Any) -> None:
    device = fleet.device()
    event = UpdateEvent.model_validate(_event(7, "install.ok"))
    errors: list[BaseException] = []
    with fleet.state.sessions.begin() as first:
        _insert_events(first, device.id, [event], datetime.now(UTC))  # not committed yet

        def second() -> None:  # waits for the first transaction (PostgreSQL: its index entry; SQLite: its lock)
            try:
                with fleet.state.sessions.begin() as s:
                    _insert_events(s, device.id, [event], datetime.now(UTC))
            except BaseException as e:  # handed to the test thread
                errors.append(e)

        racer = threading.Thread(target=second)
        racer.start()
    racer.join(30)
    assert not racer.is_alive() and errors == []
    assert _stored(fleet, device.id) == 1
