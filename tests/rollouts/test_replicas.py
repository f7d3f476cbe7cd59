"""Two real server processes (``edgefleet server run``) on the real PostgreSQL drive one rollout with a
short controller interval and lease: the audit log shows each stage's decision exactly once. Then the
lease holder is SIGSTOPped past its lease, the other replica takes over and decides, and the first is
let go on (SIGCONT): whatever it had read is stale, and no decision is doubled or lost. Devices and
telemetry are written straight into the database (what enrollment and ingestion write)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from server._fleet import CLI
from server.conftest import postgres_url  # noqa: F401
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from edgefleet.server.db import make_engine, make_sessionmaker
from edgefleet.server.models import (
    LATENCY_BUCKETS,
    Assignment,
    AuditEntry,
    ControllerLease,
    Device,
    ModelVersion,
    Rollout,
    RolloutMember,
    TelemetryRollup,
    upsert_insert,
)
from edgefleet.server.rollouts.controller import LEASE
from edgefleet.server.rollouts.types import Gates
from edgefleet.server.telemetry.rollups import WINDOW
from rollouts._ctl import add_event, make_rollout
from rollouts._ops import add_device, add_version, assign, clean_rollouts

pytestmark = pytest.mark.slow

MODEL = "digits"
GATES = Gates(stages=(25, 50, 100), soak_s=1, max_p95_ratio=1.2, max_error_rate=0.02, min_devices=3,
              min_samples=50, confidence=0.9, stage_timeout_s=3600)
ENV = {"EDGEFLEET_SERVER_ROLLOUT_INTERVAL": "0.3", "EDGEFLEET_SERVER_ROLLOUT_LEASE": "2"}
FAST = [0, 0, 0, 0, 0, 50, 45, 5] + [0] * (LATENCY_BUCKETS - 8)


class Replica:
    """``edgefleet server run`` on a free port, its log in a file (a pipe nobody reads would fill)."""

    def __init__(self, data: Path, db: str, log: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.data, self.db, self.log = data, db, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "EDGEFLEET_SERVER_ALLOW_PLAIN_HTTP_DEVICES": "true", **ENV}
        with self.log.open("ab") as err:
            self.proc = subprocess.Popen(
                [*CLI, "server", "run", "--data", str(self.data), "--db", self.db, "--port", str(self.port)],
                env=env, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise AssertionError(f"server did not start: {self.log.read_text()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> str:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)  # a stopped process cannot handle SIGTERM
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.log.read_text() if self.log.exists() else ""


@pytest.fixture
def pg(postgres_url: str) -> Iterator[str]:  # noqa: F811
    clean_rollouts(postgres_url)
    yield postgres_url
    clean_rollouts(postgres_url)


@pytest.fixture
def replicas(pg: str, tmp_path: Path) -> Iterator[Callable[[], Replica]]:
    data = tmp_path / "data"  # one data folder (CA, TUF keys, blobs), as replicas share a volume
    r = subprocess.run([*CLI, "server", "init", "--data", str(data), "--db", pg, "--json"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    json.loads(r.stdout)
    made: list[Replica] = []

    def make() -> Replica:
        made.append(Replica(data, pg, tmp_path / f"replica{len(made)}.log"))
        made[-1].start()
        return made[-1]

    yield make
    for rep in made:
        rep.stop()


def _setup(sessions: sessionmaker[Session], n: int) -> int:
    now = datetime.now(UTC)
    with sessions.begin() as s:
        v1, v2 = add_version(s, MODEL, "1.0.0"), add_version(s, MODEL, "2.0.0")
        ids = [f"dev-{i:03d}" for i in range(n)]
        for d in ids:
            add_device(s, d)
            assign(s, d, v1)
        return make_rollout(s, MODEL, v2, ids, GATES, now, v1).id


def _fleet_step(sessions: sessionmaker[Session], rid: int, reported: set[tuple[str, str]]) -> None:
    """The fleet as ingestion sees it: every device online, telemetry for what it serves in the current
    window, and an update.committed from each member the rollout assigned (once per sha256)."""
    now = datetime.now(UTC)
    bucket = int(now.timestamp()) // WINDOW * WINDOW
    with sessions.begin() as s:
        s.execute(update(Device).values(last_seen=now))
        versions = {v.id: (v.version, v.sha256) for v in s.scalars(select(ModelVersion))}
        rows = []
        for dev, vid in s.execute(select(Assignment.device_id, Assignment.version_id)
                                  .where(Assignment.model_name == MODEL)):
            row: dict[str, Any] = {"device_id": dev, "model": MODEL, "version": versions[vid][0], "bucket": bucket,
                                   "reports": 1, "inferences": 100, "errors": 0, "latency_sum": 0.0,
                                   "drift_reports": 0, "drift_samples": 0, "psi_mean_wsum": 0.0,
                                   "accuracy_wsum": 0.0, "accuracy_window": 0}
            row.update({f"lat{i:02d}": c for i, c in enumerate(FAST)})
            rows.append(row)
        s.execute(upsert_insert(s, TelemetryRollup).on_conflict_do_nothing(), rows)
        for m in s.scalars(select(RolloutMember).where(RolloutMember.rollout_id == rid,
                                                       RolloutMember.status == "assigned")):
            a = s.get(Assignment, (m.device_id, MODEL))
            assert a is not None
            sha = versions[a.version_id][1]
            if (m.device_id, sha) not in reported:
                reported.add((m.device_id, sha))
                add_event(s, m.device_id, "update.committed", now, sha256=sha)


def _until(what: Callable[[], bool], step: Callable[[], None], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        step()
        time.sleep(0.1)


def test_two_replicas_decide_each_stage_once_across_a_sigstopped_lease_holder(
        replicas: Callable[[], Replica], pg: str) -> None:
    engine = make_engine(pg)
    sessions = make_sessionmaker(engine)
    try:
        rid = _setup(sessions, 24)
        reported: set[tuple[str, str]] = set()

        def rollout() -> Rollout:
            with sessions() as s:
                r = s.get(Rollout, rid)
                assert r is not None
                return r

        def holder() -> tuple[str, int] | None:
            with sessions() as s:
                row = s.get(ControllerLease, LEASE)
                return None if row is None else (row.holder, int(row.token))

        def step() -> None:
            _fleet_step(sessions, rid, reported)

        a = replicas()
        _until(lambda: (holder() or ("", 0))[0].split(":")[1:2] == [str(a.pid)], step)
        b = replicas()
        _until(lambda: rollout().stage >= 1, step)  # stage 1 passed, decided by a (b waits for the lease)

        first = holder()
        assert first is not None
        stopped = a if first[0].split(":")[1] == str(a.pid) else b
        other = b if stopped is a else a
        os.kill(stopped.pid, signal.SIGSTOP)
        try:
            version = rollout().state_version
            _until(lambda: (holder() or ("", 0))[0].split(":")[1] == str(other.pid), step)
            taken = holder()
            assert taken is not None and taken[1] > first[1]  # the takeover raised the fencing token
            _until(lambda: rollout().state_version > version, step)  # the new holder decided
        finally:
            os.kill(stopped.pid, signal.SIGCONT)
        _until(lambda: rollout().state != "running", step)
        r = rollout()
        assert (r.state, r.stage) == ("completed", 2), r.reason
        time.sleep(1.5)  # a few more ticks of both replicas: nothing may follow the completion

        with sessions() as s:
            audit = list(s.scalars(select(AuditEntry).where(AuditEntry.target == f"rollout:{rid}")
                                   .order_by(AuditEntry.id)))
        actions = [e.action for e in audit]
        assert actions == ["rollout.assign", "rollout.advance", "rollout.assign", "rollout.advance",
                           "rollout.assign", "rollout.complete"], [e.after for e in audit]
        versions = [e.after["state_version"] for e in audit if e.after]
        assert len(versions) == len(set(versions)) == 6  # each from its own state: none doubled
        assert [len(e.after["decision"]["assign"]) for e in audit if e.action == "rollout.assign"] == [6, 6, 12]
        with sessions() as s:
            got = {x.device_id: (x.version_id, x.source) for x in s.scalars(select(Assignment))}
            v2 = s.scalar(select(ModelVersion.id).where(ModelVersion.version == "2.0.0"))
        assert set(got.values()) == {(v2, f"rollout:{rid}")}
    finally:
        engine.dispose()
    woke, took = stopped.stop(), other.stop()
    assert "Traceback" not in woke + took, woke + took
    # On waking, the stopped replica found the lease gone (its pending work, if any, refused with it).
    assert "the lease is held by another replica" in woke or "not applied" in woke, woke
