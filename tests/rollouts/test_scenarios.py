"""Staged rollouts end to end: 200 virtual devices (``edgefleet sim``: the real agent's enrollment, check-in,
TUF verification, download, install state machine and telemetry; inference replaced by a cost model)
against a real fleet server process (its rollout controller judging every 0.5 s) and a real Mosquitto
carrying the telemetry the server ingests.

The fleet starts on 1.0.0. Then, one rollout at a time, stages 5% → 25% → 100% with durations in
seconds:

- a good version (2.0.0) rolls out to every device with no operator action;
- a version whose self-test fails everywhere (3.0.0) stops in the first stage, touching only that
  stage's devices, which stay on the previous version;
- a version twice as slow (4.0.0) passes every device's self-test and probation (the devices allow 5x)
  but is stopped by the p95 gate, comparing its devices with the baseline cohort;
- a version that disagrees with the served one on 30% of inputs (5.0.0) is stopped by the shadow gate
  before it serves anyone;
- a version whose live accuracy falls (6.0.0; labels fed back for 30% of predictions) is stopped by
  the accuracy gate;
- an A/B stage (7.0.0 against the slow 4.0.0 on disjoint halves of the first stage) is held, its
  comparison says the p95 difference is significant, and the rollout then completes on 7.0.0.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from updater._fleet import Fleet, models

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from telemetry._mqtt import Broker, mosquitto_binary

from edgefleet.sim import Behaviour, SimFleet, default_updates

pytestmark = pytest.mark.slow

N = 200
MODEL = "digits"
BASE, GOOD, BROKEN, SLOW, DISAGREE, INACCURATE, NEXT = (
    "1.0.0", "2.0.0", "3.0.0", "4.0.0", "5.0.0", "6.0.0", "7.0.0")
STAGES = [5, 25, 100]
FIRST = 10  # devices in the first stage: ceil(5% of 200)
GATES: dict[str, Any] = {  # durations in seconds, so the scenarios take seconds
    "stages": STAGES, "soak": 3, "stage_timeout": 300, "min_samples": 40, "min_devices": 3,
}



class World:
    """A fleet server with telemetry ingestion from a private broker, the operator's keys, every version
    pushed and signed, and 200 simulated devices serving 1.0.0."""

    def __init__(self, root: Path) -> None:
        self.broker = Broker(mosquitto_binary(), root / "broker")
        env = {"EDGEFLEET_SERVER_MQTT_URL": f"mqtt://127.0.0.1:{self.broker.port}",
               "EDGEFLEET_SERVER_ROLLOUT_INTERVAL": "0.5", "EDGEFLEET_SERVER_ROLLOUT_LEASE": "5"}
        self.sim: SimFleet | None = None
        self.fleet = Fleet(root / "fleet", server_env=env)
        try:
            self._start(root)
        except BaseException:
            self.close()  # a set-up that fails leaves no server, broker or simulated devices behind
            raise

    def _start(self, root: Path) -> None:
        self.fleet.start()
        bundles = root / "bundles"
        for v in (BASE, GOOD, BROKEN, SLOW, DISAGREE, INACCURATE, NEXT):
            self.fleet.push(models.bundle("good", v, bundles / v))
        token = str(self.fleet.cli("device", "enroll-token", "--keys", self.fleet.keys, "--max-uses", str(N))["token"])
        behaviour = Behaviour(fail={BROKEN: 1.0}, slow={SLOW: 2.0}, disagree={DISAGREE: 0.3},
                              accuracy={INACCURATE: 0.6}, feedback=0.3, rate=40.0)
        # check-ins every 10 s: an assignment reaches a device at once through `cmd`; the check-ins keep it
        # online and catch up a lost command (at 2 s, 200 devices made 100 check-ins a second of the server)
        updates = default_updates(10.0).model_copy(update={"max_latency_ratio": 5.0})  # a device alone lets 2x by
        self.sim = SimFleet(self.fleet.server.url, token, N, behaviour=behaviour, state=root / "sim",
                            broker=f"mqtt://127.0.0.1:{self.broker.port}", interval=1.0, updates=updates,
                            workers=8, seed=12)
        self.sim.start()
        self.ids = sorted(s["device_id"] for s in self.sim.snapshot())
        for i in self.ids:
            self.put(f"/api/v1/devices/{i}/models/{MODEL}", {"version": BASE})
        self.on(BASE)

    def put(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = self.fleet.http.put(path, json=body)
        assert r.status_code == 200, r.text
        return dict(r.json())

    def running(self) -> dict[str, str | None]:
        assert self.sim is not None
        return {s["device_id"]: s["running"].get(MODEL) for s in self.sim.snapshot()}

    def on(self, version: str, ids: set[str] | None = None, timeout: float = 600.0) -> None:
        assert self.sim is not None
        ok = self.sim.wait(lambda snap: all(s["running"].get(MODEL) == version and s["phase"] == "idle"
                                            for s in snap if ids is None or s["device_id"] in ids), timeout)
        assert ok, f"not every device runs {version}: {self.sim.summary()}"

    def rollout(self, version: str, **gates: Any) -> dict[str, Any]:
        r = self.fleet.http.post("/api/v1/rollouts", json={"model": MODEL, "version": version, **GATES, **gates})
        assert r.status_code == 201, r.text
        return dict(r.json())

    def show(self, rid: int) -> dict[str, Any]:
        r = self.fleet.http.get(f"/api/v1/rollouts/{rid}")
        assert r.status_code == 200, r.text
        return dict(r.json())

    def until_ended(self, rid: int, timeout: float = 600.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            out = self.show(rid)
            if out["state"] != "running":
                return out
            assert time.monotonic() < deadline, f"rollout {rid} still running: {out['explanation']}"
            time.sleep(0.5)

    def members(self, rid: int) -> list[dict[str, Any]]:
        r = self.fleet.http.get(f"/api/v1/rollouts/{rid}/members", params={"limit": 1000})
        assert r.status_code == 200, r.text
        return list(r.json())

    def audit(self, rid: int) -> list[dict[str, Any]]:
        r = self.fleet.http.get("/api/v1/audit", params={"limit": 1000})
        assert r.status_code == 200, r.text
        return [e for e in r.json() if e["target"] == f"rollout:{rid}"]

    def close(self) -> None:
        try:
            if self.sim is not None:
                self.sim.stop()
        finally:
            try:
                self.fleet.close()
            finally:
                self.broker.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("rollouts"))
    try:
        yield w
    finally:
        w.close()


def _actions(world: World, rid: int) -> list[str]:
    return [e["action"] for e in sorted(world.audit(rid), key=lambda e: e["id"])]


def _gate(out: dict[str, Any], name: str) -> dict[str, Any]:
    found = [g for g in out["last_gates"] if g["name"] == name]
    assert found, f"no {name} gate in {out['last_gates']}"
    return found[0]


def _stopped_in_first_stage(world: World, rid: int, gate: str, before: dict[str, str | None]) -> dict[str, Any]:
    out = world.until_ended(rid)
    assert out["state"] == "aborted", out["explanation"]
    assert out["stage"] == 0, out["explanation"]
    assert _gate(out, gate)["status"] == "fail", out["last_gates"]
    touched = {m["device_id"] for m in world.members(rid) if m["status"] in ("assigned", "updated", "failed")}
    assert 0 < len(touched) <= FIRST, touched
    world.on(before[world.ids[0]] or BASE)  # every device serves what it served before
    assert world.running() == before
    return out


def test_a_good_version_rolls_out_5_25_100_with_no_operator_action(world: World) -> None:
    out = world.rollout(GOOD, on_fail="abort")
    rid = out["id"]
    done = world.until_ended(rid)
    assert done["state"] == "completed", done["explanation"]
    world.on(GOOD)
    acts = _actions(world, rid)
    assert acts.count("rollout.advance") == 2 and acts.count("rollout.complete") == 1, acts
    assert "rollout.pause" not in acts and "rollout.abort" not in acts
    # each advance was judged on figures: the p95 gate compared the stage with the baseline cohort
    advances = [e for e in world.audit(rid) if e["action"] == "rollout.advance"]
    p95 = next(g for g in advances[0]["after"]["decision"]["gates"] if g["name"] == "p95_ratio")
    assert p95["status"] in ("pass", "skip"), p95
    assert all(m["status"] == "updated" for m in world.members(rid)), world.members(rid)[:3]


def test_a_version_failing_its_self_test_stops_in_the_first_stage(world: World) -> None:
    before = world.running()
    out = world.rollout(BROKEN, on_fail="abort")
    done = _stopped_in_first_stage(world, out["id"], "failure", before)
    failed = [m for m in world.members(out["id"]) if m["status"] == "failed"]
    assert failed and all("selftest" in m["detail"] for m in failed), failed[:3]
    assert "failure" in done["reason"] or "failed" in done["reason"], done["reason"]


def test_a_version_twice_as_slow_is_stopped_by_the_p95_gate(world: World) -> None:
    before = world.running()
    out = world.rollout(SLOW, on_fail="abort", max_p95_ratio=1.2)
    done = _stopped_in_first_stage(world, out["id"], "p95_ratio", before)
    g = _gate(done, "p95_ratio")
    assert g["low"] > 1.2 and 1.5 < g["estimate"] < 2.6 and g["p_value"] < 0.05, g
    assert not [m for m in world.members(out["id"]) if m["status"] == "failed"]  # no device refused it


def test_a_version_that_disagrees_is_stopped_by_the_shadow_gate(world: World) -> None:
    before = world.running()
    out = world.rollout(DISAGREE, on_fail="abort", shadow=3, min_agreement=0.95)
    done = _stopped_in_first_stage(world, out["id"], "agreement", before)
    g = _gate(done, "agreement")
    assert g["high"] < 0.95 and 0.6 < g["estimate"] < 0.8, g
    assert done["phase"] == "shadow"
    events = world.fleet.events(next(m["device_id"] for m in world.members(out["id"])
                                     if m["status"] in ("assigned", "updated")))
    assert not [e for e in events if e["kind"] == "switch.ok" and e.get("version") == DISAGREE]  # never served


def test_a_version_whose_live_accuracy_falls_is_stopped_by_the_accuracy_gate(world: World) -> None:
    before = world.running()
    out = world.rollout(INACCURATE, on_fail="abort", min_accuracy_ratio=0.9, min_samples=20)
    done = _stopped_in_first_stage(world, out["id"], "accuracy_ratio", before)
    g = _gate(done, "accuracy_ratio")
    assert g["high"] < 0.9, g


def test_an_ab_stage_is_held_with_two_versions_and_its_comparison_is_significant(world: World) -> None:
    out = world.rollout(NEXT, on_fail="abort", stages=[10, 100], version_b=SLOW, hold=3)
    rid = out["id"]
    done = world.until_ended(rid)
    assert done["state"] == "completed", done["explanation"]
    first = [m for m in world.members(rid) if m["stage"] == 1]
    arms = {m["arm"] for m in first}
    assert arms == {"a", "b"} and abs(sum(m["arm"] == "b" for m in first) - len(first) / 2) <= 1, first
    # the decision that ended the hold carries the A/B comparison it was made on (read from the audit log,
    # not from a `show` that would have to land inside the 3 s hold)
    entries = sorted(world.audit(rid), key=lambda e: e["id"])
    acts = [e["action"] for e in entries]
    assert "rollout.hold" in acts, acts
    after_hold = next(e for e in entries[acts.index("rollout.hold") + 1:] if e["action"] == "rollout.advance")
    assert "A/B hold" in after_hold["after"]["decision"]["reason"], after_hold["after"]["decision"]
    gates = [g for g in after_hold["after"]["decision"]["gates"] if g["name"] == "ab"]
    ab = {g["detail"].split(" ")[1]: g for g in gates}  # "A/B p95 ratio b/a 2.01 [...]: significant"
    p95 = ab["p95"]
    assert p95["estimate"] > 1.5 and p95["low"] > 1 and "significant" in p95["detail"], gates
    assert "not significant" not in p95["detail"], p95
    world.on(NEXT)  # leaving the A/B stage, arm b was given version a
