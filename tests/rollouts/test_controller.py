"""The rollout controller on the real databases (SQLite and PostgreSQL) with an injected clock: a
rollout whose members and telemetry are written straight into the database advances stage by stage
and completes; a failing gate pauses or aborts it; an abort gives every touched device back what it had
(its director metadata signed again: the ETag changes); pinned and released members are never
touched; and two controllers on one database make each decision once, a stale one refused by the lease
and, behind it, by the rollout's compare-and-set."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from server._fleet import publish_roots
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from edgefleet.server.models import LATENCY_BUCKETS, Assignment, AuditEntry, Device, Rollout, RolloutMember
from edgefleet.server.rollouts import assign as assign_mod
from edgefleet.server.rollouts import lease
from edgefleet.server.rollouts.controller import LEASE, Outcome, RolloutController
from edgefleet.server.rollouts.types import Gates
from edgefleet.server.telemetry.rollups import WINDOW
from edgefleet.server.tuf import routes as tuf_routes
from rollouts._ctl import Clock, add_event, add_rollup, make_rollout
from rollouts._ops import NOW, add_device, add_version, assign, db_url, fleet  # noqa: F401

MODEL = "digits"
FAST = [0, 0, 0, 0, 0, 50, 45, 5] + [0] * (LATENCY_BUCKETS - 8)  # p95 at 0.01 s
SLOW = [0, 0, 0, 0, 0, 0, 0, 0, 0, 50, 45, 5] + [0] * (LATENCY_BUCKETS - 12)  # p95 at 0.25 s


@dataclass
class World:
    fleet: Any
    director: Any
    clock: Clock
    notified: list[str] = field(default_factory=list)

    def sessions(self) -> Any:
        return self.fleet.state.sessions

    def controller(self, holder: str = "replica-a") -> RolloutController:
        return RolloutController(self.fleet.state, lambda: self.director, interval=5, lease_ttl=15, holder=holder,
                                 clock=self.clock, notify=self.notified.append)


@pytest.fixture
def world(fleet: Any, tmp_path: Path) -> Iterator[World]:  # noqa: F811
    publish_roots(fleet.client, fleet.admin_h, tmp_path / "keys")  # a director root: assignments are signed
    director = tuf_routes.director_repository(SimpleNamespace(app=fleet.client.app))  # type: ignore[arg-type]
    yield World(fleet, director, Clock(NOW))


def _setup(w: World, n: int, gates: Gates, *, pinned: int = 0) -> tuple[int, list[str]]:
    """n devices on 1.0.0 (an operator's), a rollout of 2.0.0 over them; the first ``pinned`` members
    are skipped (pinned at creation)."""
    with w.sessions().begin() as s:
        v1, v2 = add_version(s, MODEL, "1.0.0"), add_version(s, MODEL, "2.0.0")
        ids = [f"dev-{i:03d}" for i in range(n)]
        for i, d in enumerate(ids):
            add_device(s, d)
            assign(s, d, v1, source="pin" if i < pinned else "operator")
        r = make_rollout(s, MODEL, v2, ids, gates, w.clock.now, v1,
                         statuses={d: "skipped" for d in ids[:pinned]})
        return r.id, ids


def _report(w: World, rid: int, slow: set[str] | None = None, refuse: set[str] | None = None) -> None:
    """One minute of the fleet: every device online, a rollup for what it serves, and the members the
    rollout assigned report having installed it (or refused it)."""
    now = w.clock.now
    bucket = int(now.timestamp()) // WINDOW * WINDOW
    with w.sessions().begin() as s:
        s.execute(update(Device).values(last_seen=now))
        rows = s.execute(select(Assignment.device_id, Assignment.version_id).where(Assignment.model_name == MODEL))
        from edgefleet.server.models import ModelVersion

        versions = {v.id: (v.version, v.sha256) for v in s.scalars(select(ModelVersion))}
        for dev, vid in rows:
            version, _ = versions[vid]
            lat = SLOW if (slow and dev in slow and version == "2.0.0") else FAST
            add_rollup(s, dev, MODEL, version, bucket, inferences=100, lat=lat)
        for m in s.scalars(select(RolloutMember).where(RolloutMember.rollout_id == rid,
                                                       RolloutMember.status == "assigned")):
            a = s.get(Assignment, (m.device_id, MODEL))
            assert a is not None
            _, sha = versions[a.shadow_version_id or a.version_id]
            if refuse and m.device_id in refuse:
                add_event(s, m.device_id, "update.refused", now, sha256=sha, reason="selftest")
            else:
                add_event(s, m.device_id, "shadow.ok" if a.shadow_version_id else "update.committed", now, sha256=sha)


def _run(w: World, rid: int, ctl: RolloutController, rounds: int, step: float = WINDOW, **report: Any) -> list[Outcome]:
    out: list[Outcome] = []
    for _ in range(rounds):
        _report(w, rid, **report)
        w.clock.advance(step)
        out += ctl.tick()
        with w.sessions()() as s:
            r = s.get(Rollout, rid)
            assert r is not None
            if r.state not in ("running",):
                break
    return out


def _audit(w: World, rid: int) -> list[dict[str, Any]]:
    with w.sessions()() as s:
        rows = s.scalars(select(AuditEntry).where(AuditEntry.target == f"rollout:{rid}").order_by(AuditEntry.id))
        return [{"action": a.action, "before": a.before, "after": a.after, "actor": a.actor} for a in rows]


def _assignments(w: World) -> dict[str, tuple[str, str, int | None]]:
    with w.sessions()() as s:
        from edgefleet.server.models import ModelVersion

        v = {m.id: m.version for m in s.scalars(select(ModelVersion))}
        return {a.device_id: (v[a.version_id], a.source, a.shadow_version_id)
                for a in s.scalars(select(Assignment).where(Assignment.model_name == MODEL))}


def _etags(w: World) -> dict[str, str]:
    with w.sessions()() as s:
        return {d.id: d.desired_etag for d in s.scalars(select(Device))}


GATES = Gates(stages=(25, 50, 100), soak_s=60, max_p95_ratio=1.2, max_error_rate=0.02, min_devices=3,
              min_samples=50, confidence=0.9, stage_timeout_s=3600)


def test_a_rollout_advances_stage_by_stage_and_completes(world: World) -> None:
    rid, ids = _setup(world, 22, GATES, pinned=2)
    ctl = world.controller()
    _run(world, rid, ctl, 60)
    with world.sessions()() as s:
        r = s.get(Rollout, rid)
        assert r is not None
        assert (r.state, r.stage) == ("completed", 2), r.reason
    audit = _audit(world, rid)
    # each stage: its members assigned once, then one advance; the last stage completes: no doubles
    assert [a["action"] for a in audit] == ["rollout.assign", "rollout.advance", "rollout.assign", "rollout.advance",
                                            "rollout.assign", "rollout.complete"], [a["after"]["reason"] for a in audit]
    assert [len(a["after"]["decision"]["assign"]) for a in audit if a["action"] == "rollout.assign"] == [5, 5, 10]
    versions = [a["after"]["state_version"] for a in audit]
    assert versions == sorted(set(versions))  # every decision raised the fencing counter once
    advance = audit[1]["after"]["decision"]
    p95 = next(g for g in advance["gates"] if g["name"] == "p95_ratio")
    assert p95["status"] == "pass" and p95["n_candidate"] == 5 and p95["n_baseline"] == 15
    assert all(a["actor"] == "controller" for a in audit)
    got = _assignments(world)
    assert {d: got[d] for d in ids[2:]} == {d: ("2.0.0", f"rollout:{rid}", None) for d in ids[2:]}
    assert {d: got[d] for d in ids[:2]} == {d: ("1.0.0", "pin", None) for d in ids[:2]}  # skipped: never touched
    assert sorted(set(world.notified)) == sorted(ids[2:])  # told to check in after each commit
    assert all(_etags(world)[d].startswith("ts-") for d in ids[2:])  # director targets signed with them


def test_a_failing_p95_gate_pauses_and_nothing_moves_after(world: World) -> None:
    rid, ids = _setup(world, 20, GATES)
    ctl = world.controller()
    _run(world, rid, ctl, 30, slow=set(ids))
    with world.sessions()() as s:
        r = s.get(Rollout, rid)
        assert r is not None
        assert (r.state, r.stage) == ("paused", 0)
        assert "p95 ratio" in r.reason and r.reason.endswith(": pause"), r.reason
        version = r.state_version
    out = _run(world, rid, ctl, 3, slow=set(ids))
    assert {o.result for o in out} == {"skipped"}
    with world.sessions()() as s:
        r = s.get(Rollout, rid)
        assert r is not None and r.state_version == version and "p95 ratio" in r.reason  # its reason stays
    actions = [a["action"] for a in _audit(world, rid)]
    assert actions == ["rollout.assign", "rollout.pause"]
    assert sum(1 for v in _assignments(world).values() if v[0] == "2.0.0") == 5  # stage 1 only


def test_abort_restores_previous_assignments_resigned_and_leaves_pinned_and_released(world: World) -> None:
    gates = Gates(**{**GATES.__dict__, "on_fail": "abort", "max_failure": 0.3})
    rid, ids = _setup(world, 20, gates, pinned=1)
    ctl = world.controller()
    _run(world, rid, ctl, 1)  # stage 1 assigned
    stage = [d for d, v in _assignments(world).items() if v[0] == "2.0.0"]
    assert len(stage) == 5
    # an operator takes one stage member in hand (assign: released) and pins another: the rollout lets them be
    released, pinned = stage[0], stage[1]
    with world.sessions().begin() as s:
        for dev, src in ((released, "operator"), (pinned, "pin")):
            v = s.scalar(select(Assignment.version_id).where(Assignment.device_id == dev))
            assert v is not None
            assign_mod.set_assignment(s, world.director, dev, MODEL, v, src)
            assign_mod.release_members(s, dev, MODEL, f"device {src} by op")
    before = _etags(world)
    world.notified.clear()
    _run(world, rid, ctl, 10, refuse=set(stage[2:4]))  # two of the three left refuse: 2/3 > 30%
    with world.sessions()() as s:
        r = s.get(Rollout, rid)
        assert r is not None
        assert r.state == "aborted" and r.ended_at is not None, r.reason
        assert "failure" in r.reason
        status = {m.device_id: m.status for m in s.scalars(select(RolloutMember).where(RolloutMember.rollout_id == rid))}
    assert status[released] == status[pinned] == "released"
    assert sorted(d for d, st in status.items() if st == "failed") == sorted(stage[2:4])
    got = _assignments(world)
    for dev in stage[2:]:  # touched by the rollout: back to what it had, as the operator's
        assert got[dev] == ("1.0.0", "operator", None)
    assert got[released] == ("2.0.0", "operator", None) and got[pinned] == ("2.0.0", "pin", None)
    assert got[ids[0]] == ("1.0.0", "pin", None)
    after = _etags(world)
    assert all(after[d] != before[d] and after[d].startswith("ts-") for d in stage[2:])  # signed again
    assert after[released] == before[released] and after[pinned] == before[pinned]
    assert sorted(world.notified) == sorted(stage[2:])
    assert [a["action"] for a in _audit(world, rid)] == ["rollout.assign", "rollout.abort"]


def test_shadow_phase_then_promotion_serves_the_candidate_at_once(world: World) -> None:
    gates = Gates(**{**GATES.__dict__, "stages": (25, 100), "shadow_s": 60, "min_agreement": 0.5, "min_samples": 10,
                     "max_p95_ratio": None, "max_error_rate": None})
    rid, _ = _setup(world, 8, gates)
    ctl = world.controller()

    def shadow_rollups() -> None:
        from rollouts._ctl import add_shadow_rollup

        with world.sessions().begin() as s:
            for a in s.scalars(select(Assignment).where(Assignment.shadow_version_id.is_not(None))):
                add_shadow_rollup(s, a.device_id, MODEL, "1.0.0", "2.0.0",
                                  int(world.clock.now.timestamp()) // WINDOW * WINDOW, compared=30, agreed=30)

    _run(world, rid, ctl, 1)
    shadowing = {d: v for d, v in _assignments(world).items() if v[2] is not None}
    assert len(shadowing) == 2 and all(v[:2] == ("1.0.0", f"rollout:{rid}") for v in shadowing.values())
    for _ in range(10):
        shadow_rollups()
        _run(world, rid, ctl, 1)
        with world.sessions()() as s:
            r = s.get(Rollout, rid)
            assert r is not None
            if r.phase == "serve":
                break
    assert r.phase == "serve", r.reason
    got = _assignments(world)
    assert {d: got[d] for d in shadowing} == {d: ("2.0.0", f"rollout:{rid}", None) for d in shadowing}
    actions = [a["action"] for a in _audit(world, rid)]
    assert actions == ["rollout.assign", "rollout.promote_shadow"]


def test_two_controllers_make_each_decision_once(world: World) -> None:
    rid, _ = _setup(world, 20, GATES)
    a, b = world.controller("replica-a"), world.controller("replica-b")
    for _ in range(60):
        _report(world, rid)
        world.clock.advance(WINDOW)
        a.tick()
        b.tick()
        with world.sessions()() as s:
            r = s.get(Rollout, rid)
            assert r is not None
            if r.state != "running":
                break
    assert r.state == "completed", r.reason
    actions = [x["action"] for x in _audit(world, rid)]
    assert actions == ["rollout.assign", "rollout.advance", "rollout.assign", "rollout.advance", "rollout.assign",
                       "rollout.complete"]
    assert b.token is None  # a held the lease throughout: b never judged


def _interleave(ctl: RolloutController, between: Callable[[], None]) -> None:
    """Run ``between`` after ``ctl`` decided and before it commits (a replica paused there)."""
    real = ctl.commit

    def late(*args: Any) -> Outcome:
        between()
        return real(*args)

    ctl.commit = late  # type: ignore[method-assign]


def test_a_stale_decision_is_refused_by_the_lease_and_behind_it_by_the_cas(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    rid, _ = _setup(world, 20, GATES)
    a, b = world.controller("replica-a"), world.controller("replica-b")
    _report(world, rid)
    taken: list[Outcome] = []

    def takeover() -> None:  # a stops past its lease; b takes over and decides first
        world.clock.advance(16)
        taken.extend(b.tick())

    _interleave(a, takeover)
    out = a.tick()
    assert [(o.action, o.result) for o in out] == [("assign", "lease")]
    assert [(o.action, o.result) for o in taken] == [("assign", "committed")]
    assert a.token is None and b.token == 2  # the takeover raised the fencing token
    with world.sessions()() as s:
        assert not lease.still_held(s, LEASE, "replica-a", 1, world.clock.now)

    # Were the lease check fooled (a clock jump, a bug), the compare-and-set still refuses it.
    monkeypatch.setattr(lease, "still_held", lambda *args: True)
    c = world.controller("replica-c")
    c.token = 99
    with world.sessions()() as s:
        r = s.get(Rollout, rid)
        assert r is not None
        stale = r.state_version - 1
    from edgefleet.server.rollouts.types import Decision

    o = c.commit(rid, stale, Decision("assign", "stale", assign=("dev-019",)), 99, world.clock.now)
    assert o.result == "cas"
    assert [x["action"] for x in _audit(world, rid)] == ["rollout.assign"]  # exactly once


def test_lease_acquire_renew_takeover_and_release(world: World) -> None:
    s_: Any = world.sessions()
    now = world.clock.now
    with s_.begin() as s:
        assert lease.acquire(s, "x", "a", 10, now) == 1
    with s_.begin() as s:
        assert lease.acquire(s, "x", "b", 10, now + timedelta(seconds=5)) is None  # a's runs until +10
        assert lease.acquire(s, "x", "a", 10, now + timedelta(seconds=5)) == 1  # renewed: same token
    with s_.begin() as s:
        assert lease.acquire(s, "x", "b", 10, now + timedelta(seconds=14)) is None
        assert lease.acquire(s, "x", "b", 10, now + timedelta(seconds=15)) == 2  # expired: taken over
        assert not lease.still_held(s, "x", "a", 1, now + timedelta(seconds=15))
        assert lease.still_held(s, "x", "b", 2, now + timedelta(seconds=15))
    with s_.begin() as s:
        assert lease.release(s, "x", "b", 2, now + timedelta(seconds=16))
        assert lease.acquire(s, "x", "a", 10, now + timedelta(seconds=16)) == 3
    _ = Session
