"""What the rollout controller reads, on the real databases (SQLite and PostgreSQL): the judging
window's figures against a numpy computation over the rollups inserted, members' progress from the
events their devices reported, the shadow block of telemetry summed into its rollup, and bounded work
(a fixed number of queries for 10,000 members)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from sqlalchemy import event, select
from sqlalchemy.orm import Session, sessionmaker

from edgefleet.server.db import make_engine, make_sessionmaker
from edgefleet.server.models import LATENCY_BUCKETS, Device, RolloutMember, TelemetryShadowRollup
from edgefleet.server.rollouts import assign as assign_mod
from edgefleet.server.rollouts import collect
from edgefleet.server.rollouts.judge import stage_members
from edgefleet.server.rollouts.types import Gates
from edgefleet.server.telemetry import rollups
from edgefleet.server.telemetry.payloads import TelemetryIn
from rollouts._ctl import add_event, add_rollup, add_shadow_rollup, make_rollout, sha_of
from rollouts._ops import NOW, add_device, add_version, assign, clean_rollouts, db_url  # noqa: F401

MODEL = "digits"
BUCKET = rollups.WINDOW
T0 = NOW  # the phase started here


@pytest.fixture
def sessions(db_url: str) -> Iterator[sessionmaker[Session]]:  # noqa: F811
    clean_rollouts(db_url)
    engine = make_engine(db_url)
    yield make_sessionmaker(engine)
    engine.dispose()
    clean_rollouts(db_url)


def _fleet(s: Session, n: int) -> tuple[list[str], Any, Any]:
    v1, v2 = add_version(s, MODEL, "1.0.0"), add_version(s, MODEL, "2.0.0")
    ids = [f"dev-{i:05d}" for i in range(n)]
    for d in ids:
        add_device(s, d)
        assign(s, d, v1)
    return ids, v1, v2


def _ts(t: datetime) -> int:
    return int(t.timestamp())


def test_figures_equal_numpy_sums_over_each_devices_window(sessions: sessionmaker[Session]) -> None:
    rng = np.random.default_rng(7)
    now = T0 + timedelta(minutes=30)
    with sessions.begin() as s:
        ids, v1, v2 = _fleet(s, 12)
        gates = Gates(stages=(25, 50, 100))
        statuses = {ids[0]: "updated", ids[1]: "updated", ids[2]: "assigned"}
        r = make_rollout(s, MODEL, v2, ids, gates, T0, v1, statuses=statuses)
        rid = r.id
        late = T0 + timedelta(minutes=10, seconds=30)  # ids[1] was seen running it 10.5 minutes in
        s.execute(RolloutMember.__table__.update().where(RolloutMember.device_id == ids[0])
                  .values(updated_at=T0 - timedelta(hours=1)))
        s.execute(RolloutMember.__table__.update().where(RolloutMember.device_id == ids[1]).values(updated_at=late))
        rows: list[dict[str, Any]] = []
        # Buckets from an hour before the phase to 5 minutes past now: only [window start, now] counts.
        for dev in ids:
            for version in ("1.0.0", "2.0.0"):
                for b in range(_ts(T0) - 3600, _ts(now) + 300, BUCKET):
                    if rng.random() < 0.3:
                        continue
                    lat = rng.integers(0, 20, LATENCY_BUCKETS).tolist()
                    row = {"dev": dev, "version": version, "bucket": b, "inferences": int(sum(lat)),
                           "errors": int(rng.integers(0, 3)), "lat": lat, "psi": float(rng.random()),
                           "acc_w": int(rng.integers(0, 40))}
                    row["acc_sum"] = float(rng.random()) * row["acc_w"]
                    rows.append(row)
                    add_rollup(s, dev, MODEL, version, b, inferences=row["inferences"], errors=row["errors"],
                               lat=lat, psi_max=row["psi"], accuracy_wsum=row["acc_sum"],
                               accuracy_window=row["acc_w"])
    with sessions() as s:
        view = collect.load_view(s, rid, now, 300)
        figs = collect.figures(s, view, now, BUCKET)
    assert [m.device_id for m in stage_members(view, 0)] == ids[:3]
    assert figs.since == T0.timestamp() and figs.until == now.timestamp()

    def expect(dev: str, version: str, start: datetime) -> dict[str, Any] | None:
        sel = [x for x in rows if x["dev"] == dev and x["version"] == version
               and x["bucket"] + BUCKET > start.timestamp() and x["bucket"] <= now.timestamp()]
        if not sel:
            return None
        lat = np.sum(np.array([x["lat"] for x in sel]), axis=0)
        acc_w = int(np.sum([x["acc_w"] for x in sel]))
        return {"inferences": int(np.sum([x["inferences"] for x in sel])),
                "errors": int(np.sum([x["errors"] for x in sel])),
                "p95_s": rollups.quantile(lat.tolist(), 0.95), "psi_max": float(np.max([x["psi"] for x in sel])),
                "accuracy": float(np.sum([x["acc_sum"] for x in sel])) / acc_w if acc_w else None,
                "labelled": acc_w}

    def got(f: Any) -> dict[str, Any]:
        return {"inferences": f.inferences, "errors": f.errors, "p95_s": f.p95_s, "psi_max": f.psi_max,
                "accuracy": f.accuracy, "labelled": f.labelled}

    # candidate: stage members assigned or updated, from max(phase start, seen running) — ids[1] from 10.5 min
    starts = {ids[0]: T0, ids[1]: late, ids[2]: T0}
    assert set(figs.candidate) == set(starts)
    for dev, start in starts.items():
        assert got(figs.candidate[dev]) == pytest.approx(expect(dev, "2.0.0", start)), dev
        assert figs.candidate[dev].version == "2.0.0"
    # baseline: members outside the stage, on the version they had before, from the phase start
    assert set(figs.baseline) == set(ids[3:])
    for dev in ids[3:]:
        assert got(figs.baseline[dev]) == pytest.approx(expect(dev, "1.0.0", T0)), dev
        assert figs.baseline[dev].version == "1.0.0"
    assert figs.shadow == {} and figs.candidate_b == {}


def test_shadow_figures_sum_comparisons_of_the_candidate_only(sessions: sessionmaker[Session]) -> None:
    now = T0 + timedelta(minutes=20)
    with sessions.begin() as s:
        ids, v1, v2 = _fleet(s, 8)
        gates = Gates(stages=(50, 100), shadow_s=600)
        r = make_rollout(s, MODEL, v2, ids, gates, T0, v1, statuses={d: "updated" for d in ids[:4]})
        rid = r.id
        s.execute(RolloutMember.__table__.update().where(RolloutMember.device_id.in_(ids[:4]))
                  .values(updated_at=T0 + timedelta(minutes=1)))
        want: dict[str, list[int]] = {}
        for i, dev in enumerate(ids):
            for k, b in enumerate(range(_ts(T0) - 600, _ts(now) + 120, BUCKET)):
                c, a = 10 + i + k, 9 + i
                add_shadow_rollup(s, dev, MODEL, "1.0.0", "2.0.0", b, compared=c, agreed=a)
                add_shadow_rollup(s, dev, MODEL, "1.0.0", "3.0.0", b, compared=5, agreed=1)  # another candidate
                if i < 4 and b + BUCKET > _ts(T0 + timedelta(minutes=1)) and b <= _ts(now):
                    w = want.setdefault(dev, [0, 0])
                    w[0] += c
                    w[1] += a
    with sessions() as s:
        figs = collect.figures(s, collect.load_view(s, rid, now, 300), now, BUCKET)
    assert {d: [f.shadow_compared, f.shadow_agreed] for d, f in figs.shadow.items()} == want
    assert all(f.version == "1.0.0" for f in figs.shadow.values())


def test_member_status_moves_on_from_the_events_after_its_assignment(sessions: sessionmaker[Session]) -> None:
    now = T0 + timedelta(minutes=5)
    with sessions.begin() as s:
        ids, v1, v2 = _fleet(s, 8)
        r = make_rollout(s, MODEL, v2, ids, Gates(stages=(100,)), T0, v1,
                         statuses={d: "assigned" for d in ids[:7]})
        rid = r.id
        src = assign_mod.rollout_source(rid)
        for d in ids[:6]:
            assign_mod.set_assignment(s, None, d, MODEL, v2.id, src)
        assign_mod.set_assignment(s, None, ids[6], MODEL, v1.id, src, shadow_version_id=v2.id)  # in shadow
        s.execute(RolloutMember.__table__.update().where(RolloutMember.rollout_id == rid)
                  .values(assigned_at=T0))
        sha2, sha1 = sha_of(s, MODEL, "2.0.0"), sha_of(s, MODEL, "1.0.0")
        after = T0 + timedelta(seconds=30)
        add_event(s, ids[0], "update.committed", after, model=MODEL, version="2.0.0", sha256=sha2)  # -> updated
        add_event(s, ids[1], "update.committed", after, model=MODEL, version="1.0.0", sha256=sha1)  # another sha
        add_event(s, ids[2], "update.refused", after, model=MODEL, sha256=sha2, reason="selftest",
                  detail="output mismatch")  # -> failed
        add_event(s, ids[3], "update.rolled_back", T0 - timedelta(seconds=5), sha256=sha2,
                  reason="probation")  # before its assignment: ignored
        s.execute(Device.__table__.update().where(Device.id == ids[4])
                  .values(running=[{"name": MODEL, "version": "2.0.0", "sha256": sha2}]))  # -> updated
        add_event(s, ids[5], "shadow.ok", after, sha256=sha2)  # a serve assignment: shadow.ok is not enough
        add_event(s, ids[6], "update.committed", after, sha256=sha2)  # a shadow assignment: not committed...
        add_event(s, ids[6], "shadow.ok", after + timedelta(seconds=1), sha256=sha2)  # ... shadow.ok it is
    with sessions.begin() as s:
        view = collect.load_view(s, rid, now, 300)
        changes = collect.refresh_members(s, view, now)
    assert {c.device_id: c.status for c in changes} == {ids[0]: "updated", ids[2]: "failed", ids[4]: "updated",
                                                       ids[6]: "updated"}
    with sessions() as s:
        rows = {m.device_id: m for m in s.scalars(select(RolloutMember).where(RolloutMember.rollout_id == rid))}
        view = collect.load_view(s, rid, now, 300)
    assert {d: rows[d].status for d in ids} == {
        ids[0]: "updated", ids[1]: "assigned", ids[2]: "failed", ids[3]: "assigned", ids[4]: "updated",
        ids[5]: "assigned", ids[6]: "updated", ids[7]: "waiting"}
    assert rows[ids[2]].detail == "update.refused: selftest: output mismatch"
    assert rows[ids[0]].updated_at == T0 + timedelta(seconds=30)
    byid = {m.device_id: m for m in view.members}
    assert byid[ids[0]].updated_at == (T0 + timedelta(seconds=30)).timestamp()
    assert byid[ids[2]].updated_at is None  # "seen running": only for updated members
    with sessions.begin() as s:  # a second pass changes nothing
        assert collect.refresh_members(s, collect.load_view(s, rid, now, 300), now) == []


def test_view_online_tags_and_previous_version(sessions: sessionmaker[Session]) -> None:
    now = T0
    with sessions.begin() as s:
        ids, v1, v2 = _fleet(s, 3)
        s.execute(Device.__table__.update().where(Device.id == ids[0])
                  .values(last_seen=now - timedelta(seconds=301), tags=["lab", "eu"]))
        r = make_rollout(s, MODEL, v2, ids, Gates(stages=(100,)), T0, v1)
        rid = r.id
    with sessions() as s:
        view = collect.load_view(s, rid, now, 300)
        with pytest.raises(LookupError):
            collect.load_view(s, rid + 1000, now, 300)
    assert view.version == "2.0.0" and view.previous == "1.0.0" and view.model == MODEL
    assert [(m.device_id, m.online, m.tags, m.previous) for m in view.members] == [
        (ids[0], False, ("lab", "eu"), "1.0.0"), (ids[1], True, (), "1.0.0"), (ids[2], True, (), "1.0.0")]


def test_the_shadow_block_of_telemetry_is_summed_into_its_rollup(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as s:
        _fleet(s, 1)

    def msg(seq: int, shadow: dict[str, Any] | None) -> TelemetryIn:
        model: dict[str, Any] = {"name": MODEL, "version": "1.0.0", "inferences": 10, "errors": 0,
                                 "latency": {"counts": [0] * LATENCY_BUCKETS, "sum_s": 0.0}}
        if shadow is not None:
            model["shadow"] = shadow
        return TelemetryIn.model_validate({"schema": 1, "device_id": "dev-00000", "at": T0.isoformat(),
                                           "epoch": "0" * 16, "seq": seq, "models": [model]})

    sh = {"version": "2.0.0", "compared": 40, "agreed": 39, "skipped": 3, "abs_error_sum": 0.5}
    batch = rollups.accumulate([msg(1, sh), msg(2, sh), msg(3, None)], T0)
    with sessions.begin() as s:
        rollups.upsert(s, batch)
    with sessions.begin() as s:  # a later batch into the same window adds to it
        rollups.upsert(s, rollups.accumulate([msg(4, {**sh, "compared": 1, "agreed": 0})], T0))
    with sessions() as s:
        rows = s.execute(select(TelemetryShadowRollup)).scalars().all()
    assert [(r.device_id, r.version, r.candidate, r.bucket, r.compared, r.agreed, r.skipped) for r in rows] == [
        ("dev-00000", "1.0.0", "2.0.0", rollups.bucket_of(T0, T0), 81, 78, 9)]
    assert rows[0].abs_error_sum == pytest.approx(1.5)


def test_figures_and_refresh_for_10000_members_take_a_fixed_number_of_queries(
        sessions: sessionmaker[Session], db_url: str) -> None:  # noqa: F811
    n = 10_000
    now = T0 + timedelta(minutes=15)
    with sessions.begin() as s:
        v1, v2 = add_version(s, MODEL, "1.0.0"), add_version(s, MODEL, "2.0.0")
        ids = [f"dev-{i:05d}" for i in range(n)]
        base: dict[str, Any] = {"tags": [], "cert_serial": "00", "cert_pem": "-", "cert_not_after": NOW,
                                "enrolled_at": NOW, "last_seen": NOW, "running": [], "desired_etag": "-"}
        s.execute(Device.__table__.insert(), [{"id": d, **base} for d in ids])
        r = make_rollout(s, MODEL, v2, [], Gates(stages=(10, 100)), T0, v1)
        rid = r.id
        s.execute(RolloutMember.__table__.insert(), [
            {"rollout_id": rid, "device_id": d, "rank": i, "arm": "a", "status": "updated" if i < 1000 else "waiting",
             "previous_version_id": v1.id, "previous_source": "operator", "assigned_at": T0, "updated_at": T0,
             "detail": ""} for i, d in enumerate(ids)])
        from edgefleet.server.models import Assignment, TelemetryRollup
        s.execute(Assignment.__table__.insert(), [
            {"device_id": d, "model_name": MODEL, "version_id": v2.id if i < 1000 else v1.id,
             "source": assign_mod.rollout_source(rid) if i < 1000 else "operator", "updated_at": T0,
             "shadow_version_id": None} for i, d in enumerate(ids)])
        lat = {f"lat{i:02d}": 1 for i in range(LATENCY_BUCKETS)}
        s.execute(TelemetryRollup.__table__.insert(), [
            {"device_id": d, "model": MODEL, "version": "2.0.0" if i < 1000 else "1.0.0", "bucket": b, "reports": 1,
             "inferences": 16, "errors": 0, "latency_sum": 0.0, "drift_reports": 0, "drift_samples": 0,
             "psi_mean_wsum": 0.0, "accuracy_wsum": 0.0, "accuracy_window": 0, **lat}
            for i, d in enumerate(ids) for b in (_ts(T0), _ts(T0) + BUCKET)])
    engine = sessions.kw["bind"]
    statements: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        with sessions.begin() as s:
            view = collect.load_view(s, rid, now, 300)
            loaded = len(statements)
            assert collect.refresh_members(s, view, now) == []
            refreshed = len(statements)
            figs = collect.figures(s, view, now, BUCKET)
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert loaded <= 4, statements  # the rollout, its version, the members (+ BEGIN on some drivers)
    assert refreshed - loaded <= 2, statements[loaded:]  # what was assigned, the events
    assert len(statements) - refreshed <= 2, statements[refreshed:]  # candidate, baseline (no shadow phase)
    assert len(figs.candidate) == 1000 and len(figs.baseline) == 9000
    assert figs.candidate["dev-00000"].inferences == 32 and figs.baseline["dev-09999"].inferences == 32
    _ = db_url, UTC
