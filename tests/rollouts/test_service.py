"""The operator's side of rollouts, on the real databases (SQLite and PostgreSQL): membership at
creation, what is skipped and why, the precedence rule edge by edge (pin > operator > rollout),
rollouts of several models at once, and the fencing of operator actions."""

from __future__ import annotations

import hashlib
import itertools
from typing import Any

import pytest
from sqlalchemy import select

from edgefleet.server.errors import ApiError
from edgefleet.server.models import Assignment, AuditEntry, ModelVersion, Rollout
from edgefleet.server.rollouts import service
from edgefleet.server.rollouts.types import Gates
from rollouts import _ops
from rollouts._ops import NOW, add_device, add_version, assign, members

db_url, fleet = _ops.db_url, _ops.fleet  # the fixtures
ACTOR = "op (token t1)"


def _create(s: Any, model: str = "digits", version: str = "2.0.0", **kw: Any) -> Rollout:
    kw.setdefault("tags", [])
    kw.setdefault("gates", Gates())
    kw.setdefault("version_b", None)
    return service.create(s, None, model, version, actor=ACTOR, now=NOW, **kw)


def _fleet_of(s: Any, n: int, model: str = "digits", tags: list[str] | None = None) -> list[str]:
    """n devices on ``model`` 1.0.0 (an operator's assignment), and version 2.0.0 in the registry."""
    v1 = s.scalar(select(ModelVersion).where(ModelVersion.name == model,
                                                     ModelVersion.version == "1.0.0"))
    if v1 is None:
        v1 = add_version(s, model, "1.0.0")
        add_version(s, model, "2.0.0")
    ids = []
    for i in range(n):
        d = add_device(s, f"{model}-dev-{i:03d}", tags)
        assign(s, d.id, v1)
        ids.append(d.id)
    return ids


def test_member_order_depends_only_on_rollout_and_device() -> None:
    devices = [f"dev-{i}" for i in range(50)]
    order = service.member_order(7, devices)
    assert order == service.member_order(7, list(reversed(devices)))  # the same on every call
    assert service.member_order(7, set(devices)) == order
    some = order[10:20]
    kept = [d for d in service.member_order(7, [*some, "dev-new-1", "dev-new-2"]) if d in some]
    assert kept == some  # other devices never reorder two devices
    assert service.member_order(8, devices) != order  # another rollout, another order


def _by_hash(rollout_id: int, ids: list[str]) -> list[str]:
    return sorted(ids, key=lambda d: hashlib.sha256(f"{rollout_id}:{d}".encode()).digest())


def test_members_ranked_by_the_hash_and_the_same_for_a_recreated_id(fleet: Any) -> None:
    with fleet.state.sessions.begin() as s:
        ids = _fleet_of(s, 30)
        r = _create(s)
        rid = r.id
        got = sorted(members(s, rid).values(), key=lambda m: m.rank)
        assert [m.device_id for m in got] == _by_hash(rid, ids)
        assert [m.rank for m in got] == list(range(30))
        assert all(m.status == "waiting" and m.previous_source == "operator" for m in got)
        first = [(m.device_id, m.rank) for m in got]
        s.delete(r)
    with fleet.state.sessions.begin() as s:  # made again: SQLite gives the same id again, PostgreSQL the next
        again = _create(s)
        got = [(m.device_id, m.rank) for m in sorted(members(s, again.id).values(), key=lambda m: m.rank)]
        assert [d for d, _ in got] == _by_hash(again.id, ids)
        if again.id == rid:
            assert got == first


def test_ab_arms_alternate_along_the_rank_order(fleet: Any) -> None:
    with fleet.state.sessions.begin() as s:
        _fleet_of(s, 20)
        add_version(s, "digits", "2.1.0")
        r = _create(s, version_b="2.1.0")
        got = sorted(members(s, r.id).values(), key=lambda m: m.rank)
        arms = [m.arm for m in got]
        assert all(a != b for a, b in itertools.pairwise(arms)), arms
        assert arms.count("a") == arms.count("b") == 10
        assert service.gates_of(r).ab_version == "2.1.0"


def test_selection_by_tags_leaves_out_revoked_and_untagged_devices(fleet: Any) -> None:
    with fleet.state.sessions.begin() as s:
        _fleet_of(s, 3, tags=["site:a", "cam"])
        add_device(s, "other-tags", ["site:b", "cam"])
        add_device(s, "revoked-one", ["site:a", "cam"], revoked=True)
        r = _create(s, tags=["site:a", "cam"])
        assert sorted(members(s, r.id)) == ["digits-dev-000", "digits-dev-001", "digits-dev-002"]
        assert r.tags == ["cam", "site:a"]


def test_pinned_and_in_another_rollout_are_skipped_with_the_reason(fleet: Any) -> None:
    with fleet.state.sessions.begin() as s:
        ids = _fleet_of(s, 6)
        add_version(s, "digits", "3.0.0")
        v1 = s.scalar(select(ModelVersion).where(ModelVersion.version == "1.0.0"))
        assign(s, ids[0], v1, source="pin")
        first = _create(s, tags=[])
        m1 = members(s, first.id)
        assert m1[ids[0]].status == "skipped" and m1[ids[0]].detail == "pinned"
        assert "1 skipped (1 pinned)" in first.reason
        # a device released from the first rollout (an operator took it) is not "in" it any more
        m1[ids[1]].status = "released"
        s.flush()
        second = _create(s, version="3.0.0")
        m2 = members(s, second.id)
        assert m2[ids[0]].detail == "pinned"
        assert m2[ids[1]].status == "waiting"
        assert {m2[d].detail for d in ids[2:]} == {f"in rollout {first.id}"}
        audit = s.scalars(select(AuditEntry).where(AuditEntry.action == "rollout.create")
                          .order_by(AuditEntry.id)).all()[-1]
        assert audit.after is not None and audit.after["skipped_count"] == 5


def test_a_rollout_no_device_would_change_is_refused(fleet: Any) -> None:
    with fleet.state.sessions() as s, s.begin():
        ids = _fleet_of(s, 2)
        v2 = s.scalar(select(ModelVersion).where(ModelVersion.version == "2.0.0"))
        for d in ids:
            assign(s, d, v2)
        with pytest.raises(ApiError) as e:
            _create(s)
        assert e.value.status == 409 and e.value.field == "version"
        assert "already run digits 2.0.0" in e.value.message
        s.rollback()
    with fleet.state.sessions() as s, s.begin():
        ids = _fleet_of(s, 2, model="other")
        v1 = s.scalar(select(ModelVersion).where(ModelVersion.name == "other",
                                                         ModelVersion.version == "1.0.0"))
        for d in ids:
            assign(s, d, v1, source="pin")
        with pytest.raises(ApiError) as e:
            _create(s, model="other")
        assert e.value.status == 409 and "every selected device is skipped (2 pinned)" in e.value.message
        s.rollback()


@pytest.mark.parametrize(("kw", "status", "field"), [
    ({"version": "9.9.9"}, 404, "version"),
    ({"version_b": "9.9.9"}, 404, "version_b"),
    ({"version_b": "2.0.0"}, 422, "version_b"),
    ({"gates": Gates(stages=(10, 5, 100))}, 422, "gates.stages"),
    ({"gates": Gates(stages=(10, 50))}, 422, "gates.stages"),
    ({"tags": ["nobody-has-it"]}, 409, "tags"),
])
def test_create_refusals_name_the_field(fleet: Any, kw: dict[str, Any], status: int, field: str) -> None:
    with fleet.state.sessions() as s, s.begin():
        _fleet_of(s, 2)
        with pytest.raises(ApiError) as e:
            _create(s, **kw)
        assert (e.value.status, e.value.field) == (status, field), e.value.message
        s.rollback()


def test_several_rollouts_of_different_models_at_once(fleet: Any) -> None:
    with fleet.state.sessions.begin() as s:
        a = _fleet_of(s, 4, model="digits")
        v1 = add_version(s, "words", "1.0.0")
        add_version(s, "words", "2.0.0")
        for d in a:
            assign(s, d, v1)
        r1 = _create(s, model="digits")
        r2 = _create(s, model="words")
        assert {m.status for m in members(s, r1.id).values()} == {"waiting"}
        assert {m.status for m in members(s, r2.id).values()} == {"waiting"}  # not "in rollout r1"
        assert sorted(members(s, r2.id)) == a


# -- precedence, one test per edge ---------------------------------------------------------------------


def test_pin_beats_rollout_a_pin_releases_the_member_and_the_rollout_leaves_it(fleet: Any) -> None:
    with fleet.state.sessions.begin() as s:
        ids = _fleet_of(s, 3)
        r = _create(s)
        released = service.pin(s, None, ids[0], "digits", "1.0.0", ACTOR)
        assert released == [r.id]
        m = members(s, r.id)[ids[0]]
        assert m.status == "released" and "pinned 1.0.0" in m.detail
        a = s.get(Assignment, (ids[0], "digits"))
        assert a is not None and a.source == "pin"
        rid = r.id
    with fleet.state.sessions.begin() as s:  # an abort restores only what is still the rollout's
        service.abort(s, None, rid, actor=ACTOR, now=NOW)
        a = s.get(Assignment, (ids[0], "digits"))
        assert a is not None and a.source == "pin"
        assert s.get(Rollout, rid).state == "aborted"  # type: ignore[union-attr]


def test_operator_beats_rollout_an_assignment_after_the_rollout_took_the_device_releases_it(fleet: Any) -> None:
    with fleet.state.sessions.begin() as s:
        _fleet_of(s, 3)
        r = _create(s)
        rid = r.id
    h = fleet.admin_h
    res = fleet.client.put("/api/v1/devices/digits-dev-001/models/digits", json={"version": "2.0.0"}, headers=h)
    assert res.status_code == 200, res.text
    with fleet.state.sessions.begin() as s:
        m = members(s, rid)["digits-dev-001"]
        assert m.status == "released" and "assigned 2.0.0" in m.detail
        a = s.get(Assignment, ("digits-dev-001", "digits"))
        assert a is not None and a.source == "operator"


def test_pin_beats_operator_a_rollout_takes_operator_assignments_but_not_pins_until_unpinned(fleet: Any) -> None:
    with fleet.state.sessions.begin() as s:
        ids = _fleet_of(s, 3)
        service.pin(s, None, ids[0], "digits", "1.0.0", ACTOR)
        r = _create(s)
        assert members(s, r.id)[ids[0]].detail == "pinned"
        assert members(s, r.id)[ids[1]].previous_source == "operator"
        assert service.unpin(s, None, ids[0], "digits", ACTOR) is True
        assert service.unpin(s, None, ids[0], "digits", ACTOR) is False  # not pinned any more: nothing changes
        a = s.get(Assignment, (ids[0], "digits"))
        assert a is not None and (a.source, a.version_id) == ("operator", members(s, r.id)[ids[1]].previous_version_id)
        service.abort(s, None, r.id, actor=ACTOR, now=NOW)
        again = _create(s)
        assert members(s, again.id)[ids[0]].status == "waiting"  # unpinned: the next rollout takes it
        actions = [e.action for e in s.scalars(select(AuditEntry).order_by(AuditEntry.id))]
        assert "device.pin" in actions and "device.unpin" in actions


def test_pin_and_unpin_refuse_unknown_devices_versions_and_models(fleet: Any) -> None:
    with fleet.state.sessions() as s, s.begin():
        _fleet_of(s, 1)
        for call, field in [
            (lambda: service.pin(s, None, "nope", "digits", "1.0.0", ACTOR), "device_id"),
            (lambda: service.pin(s, None, "digits-dev-000", "digits", "7.7.7", ACTOR), "version"),
            (lambda: service.unpin(s, None, "digits-dev-000", "words", ACTOR), "model"),
        ]:
            with pytest.raises(ApiError) as e:
                call()
            assert (e.value.status, e.value.field) == (404, field)


# -- operator actions and their fencing ----------------------------------------------------------------


def test_pause_resume_are_audited_and_idempotent(fleet: Any) -> None:
    with fleet.state.sessions.begin() as s:
        _fleet_of(s, 2)
        rid = _create(s).id
    with fleet.state.sessions.begin() as s:
        out = service.pause(s, rid, actor=ACTOR, now=NOW, reason="looking at it")
        assert out.changed and out.rollout.state == "paused" and out.rollout.state_version == 1
        assert "looking at it" in out.rollout.reason
        assert not service.pause(s, rid, actor=ACTOR, now=NOW).changed
    later = NOW.replace(hour=13)
    with fleet.state.sessions.begin() as s:
        out = service.resume(s, rid, actor=ACTOR, now=later)
        assert out.rollout.state == "running" and out.rollout.stage_started_at == later
        assert out.rollout.state_version == 2
        assert not service.resume(s, rid, actor=ACTOR, now=later).changed
        actions = [e.action for e in s.scalars(select(AuditEntry).where(AuditEntry.target == f"rollout:{rid}")
                                                .order_by(AuditEntry.id))]
        assert actions == ["rollout.create", "rollout.pause", "rollout.resume"]


def test_an_action_on_a_stale_state_version_is_a_409_and_changes_nothing(fleet: Any) -> None:
    with fleet.state.sessions.begin() as s:
        _fleet_of(s, 2)
        r = _create(s)
        rid, seen = r.id, r.state_version
    with fleet.state.sessions.begin() as s:  # a controller replica (or another operator) acts first
        service.pause(s, rid, actor="controller", now=NOW)
    with fleet.state.sessions() as s, s.begin():
        with pytest.raises(ApiError) as e:
            service.resume(s, rid, actor=ACTOR, now=NOW, state_version=seen)
        assert e.value.status == 409 and "changed meanwhile" in e.value.message and e.value.field == "state_version"
        s.rollback()
    with fleet.state.sessions() as s:
        r2 = s.get(Rollout, rid)
        assert r2 is not None and (r2.state, r2.state_version) == ("paused", seen + 1)


def test_ended_rollouts_refuse_every_action(fleet: Any) -> None:
    with fleet.state.sessions.begin() as s:
        _fleet_of(s, 2)
        rid = _create(s).id
        service.abort(s, None, rid, actor=ACTOR, now=NOW)
    for act in (service.pause, service.resume):
        with fleet.state.sessions() as s, s.begin(), pytest.raises(ApiError) as e:
            act(s, rid, actor=ACTOR, now=NOW)
        assert e.value.status == 409 and "aborted" in e.value.message
    with fleet.state.sessions() as s, s.begin(), pytest.raises(ApiError) as e:
        service.promote(s, None, rid, actor=ACTOR, now=NOW)
    assert e.value.status == 409


def test_promote_advances_the_stage_skipping_its_gates(fleet: Any) -> None:
    with fleet.state.sessions.begin() as s:
        _fleet_of(s, 10)
        rid = _create(s, gates=Gates(stages=(10, 50, 100))).id
    with fleet.state.sessions.begin() as s:
        out = service.promote(s, None, rid, actor=ACTOR, now=NOW)
        assert (out.rollout.stage, out.rollout.state) == (1, "running")
        assert "gates of stage 1 (10%) skipped" in out.rollout.reason
    with fleet.state.sessions.begin() as s:
        service.promote(s, None, rid, actor=ACTOR, now=NOW)
        out = service.promote(s, None, rid, actor=ACTOR, now=NOW)
        assert out.rollout.state == "completed"
        with pytest.raises(ApiError) as e:
            service.promote(s, None, rid, actor=ACTOR, now=NOW, version="2.0.0")
        assert e.value.status == 409


def test_promote_with_a_version_outside_an_ab_hold_is_refused(fleet: Any) -> None:
    with fleet.state.sessions.begin() as s:
        _fleet_of(s, 4)
        rid = _create(s).id
    with fleet.state.sessions() as s, s.begin(), pytest.raises(ApiError) as e:
        service.promote(s, None, rid, actor=ACTOR, now=NOW, version="2.0.0")
    assert (e.value.status, e.value.field) == (422, "version")


def test_promote_version_b_in_an_ab_hold_makes_b_the_candidate(fleet: Any) -> None:
    with fleet.state.sessions.begin() as s:
        _fleet_of(s, 8)
        vb = add_version(s, "digits", "2.1.0")
        r = _create(s, version_b="2.1.0", gates=Gates(stages=(50, 100), hold_s=60.0))
        rid = r.id
        r.phase = "hold"  # as the controller leaves it once the A/B stage's gates pass
        for m in members(s, rid).values():
            if m.rank < 4:
                m.status = "updated"
    with fleet.state.sessions.begin() as s:
        with pytest.raises(ApiError) as e:
            service.promote(s, None, rid, actor=ACTOR, now=NOW, version="5.5.5")
        assert e.value.status == 422
    with fleet.state.sessions.begin() as s:
        out = service.promote(s, None, rid, actor=ACTOR, now=NOW, version="2.1.0")
        assert out.rollout.version_id == vb.id and out.rollout.stage == 1
        ms = members(s, rid).values()
        assert {m.arm for m in ms} == {"a"}
        regained = [m for m in ms if m.status == "waiting" and "A/B winner" in m.detail]
        assert len(regained) == 2  # the stage's arm-a members wait for 2.1.0
