"""``edgefleet sim`` against a real fleet server process (tests/updater/_fleet.py: ``server run`` with a
private Mosquitto for telemetry ingestion, the operator's keyring, pushed and signed bundles, a pinned
enrollment token): 30 virtual devices enroll through ``agent enroll``'s own code; an operator's
assignment reaches every one through the real TUF path; a version whose self-test fails on every
device is refused by every device (the events are on the server); the telemetry every device
publishes is valid (``payloads.parse``) and lands in the server's rollups, where a version twice as
slow shows about twice the p95; the CLI runs for a few seconds and prints its final snapshot as JSON.

Plus the cost model alone (pure: no server)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from updater._fleet import CLI, Fleet, models
from updater._procs import clean_env

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from telemetry._mqtt import Broker, Subscriber, mosquitto_binary

from edgefleet.agent.telemetry.measure import LatencyHistogram
from edgefleet.errors import ConfigError
from edgefleet.server.telemetry.payloads import parse
from edgefleet.sim import Behaviour, SimFleet, default_updates, parse_overrides
from edgefleet.sim.behaviour import device_fraction

N = 30
MODEL = "digits"
BASE, NEXT, BROKEN, SLOW = "1.0.0", "2.0.0", "3.0.0", "4.0.0"



# the cost model ---------------------------------------------------------------------------------


def test_the_self_test_fails_on_a_fixed_fraction_of_devices() -> None:
    b = Behaviour(fail={"2.0.0": 0.3, "3.0.0": 1.0})
    ids = [f"dev-{i:016x}" for i in range(2000)]
    failing = [d for d in ids if b.selftest_fails(d, "2.0.0")]
    assert 0.25 < len(failing) / len(ids) < 0.35
    assert failing == [d for d in ids if Behaviour(fail={"2.0.0": 0.3}).selftest_fails(d, "2.0.0")]  # same ones
    assert all(b.selftest_fails(d, "3.0.0") for d in ids)
    assert not any(b.selftest_fails(d, "1.0.0") for d in ids)
    assert 0 <= device_fraction(ids[0], "2.0.0") < 1


def test_latency_scales_with_slow_model_and_errors_feedback_shadow_follow_their_rates() -> None:
    b = Behaviour(slow={"2.0.0": 2.0}, errors={"2.0.0": 0.1}, accuracy={"2.0.0": 0.6}, disagree={"2.0.0": 0.25},
                  feedback=0.5)
    rng = np.random.default_rng(1)
    a, s = b.serve("1.0.0", 20000, rng), b.serve("2.0.0", 20000, rng)
    ratio = float(np.quantile(s.latencies, 0.95) / np.quantile(a.latencies, 0.95))
    assert 1.9 < ratio < 2.1
    assert b.latency_quantile("2.0.0", 0.95) == pytest.approx(2 * b.latency_quantile("1.0.0", 0.95))
    assert sum(a.counts) == a.inferences - a.errors and len(a.counts) == 16
    assert 0.08 < s.errors / s.inferences < 0.12 and a.errors / a.inferences < 0.01
    right = sum(p == t for p, t in s.feedback) / len(s.feedback)
    assert 0.55 < right < 0.65 and 0.45 < len(s.feedback) / (s.inferences - s.errors) < 0.55
    f = b.shadow("2.0.0", 1000, 10.0, rng)  # 5/s for 10 s: about 50 compared, the rest skipped
    assert 30 < f.compared < 75 and f.compared + f.skipped == 1000 and f.agreed <= f.compared
    assert b.shadow("1.0.0", 100, 100.0, rng).agreed == 100  # no disagreement configured
    assert b.calls(0, rng) == 0 and 150 < b.calls(10.0, rng) < 250


def test_overrides_parse_and_bad_values_are_refused() -> None:
    assert parse_overrides("--fail-rate", ["2.0.0=0.3", "3.0.0=1,4.0.0=0"]) == {"2.0.0": 0.3, "3.0.0": 1.0,
                                                                                "4.0.0": 0.0}
    with pytest.raises(ConfigError, match="--slow-model"):
        parse_overrides("--slow-model", ["2.0.0"])
    with pytest.raises(ConfigError, match="fail"):
        Behaviour(fail={"2.0.0": 1.5})


# against a real server ---------------------------------------------------------------------------


class World:
    def __init__(self, root: Path) -> None:
        self.broker = Broker(mosquitto_binary(), root / "broker")
        self.sub = Subscriber(self.broker.port, topic="edgefleet/v1/+/telemetry")
        env = {"EDGEFLEET_SERVER_MQTT_URL": f"mqtt://127.0.0.1:{self.broker.port}"}
        self.fleet = Fleet(root / "fleet", server_env=env).start()
        bundles = root / "bundles"
        for v in (BASE, NEXT, BROKEN, SLOW):
            self.fleet.push(models.bundle("good", v, bundles / v))

    def token(self, uses: int) -> str:
        return str(self.fleet.cli("device", "enroll-token", "--keys", self.fleet.keys, "--max-uses", str(uses))["token"])

    def assign(self, device_id: str, version: str) -> None:
        r = self.fleet.http.put(f"/api/v1/devices/{device_id}/models/{MODEL}", json={"version": version})
        assert r.status_code == 200, r.text

    def close(self) -> None:
        try:
            self.fleet.close()
        finally:
            self.sub.close()
            self.broker.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("sim"))
    try:
        yield w
    finally:
        w.close()


@pytest.fixture(scope="module")
def sim(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimFleet]:
    behaviour = Behaviour(fail={BROKEN: 1.0}, slow={SLOW: 2.0}, rate=40.0)
    updates = default_updates(1.0).model_copy(update={"max_latency_ratio": 5.0})  # the slow one passes probation
    fleet = SimFleet(world.fleet.server.url, world.token(N), N, behaviour=behaviour,
                     state=tmp_path_factory.mktemp("sim-state"), broker=f"mqtt://127.0.0.1:{world.broker.port}",
                     interval=1.0, updates=updates, workers=6, seed=7)
    with fleet:
        yield fleet


def _running(snap: list[dict[str, Any]], version: str, ids: set[str] | None = None) -> bool:
    return all(s["running"].get(MODEL) == version and s["phase"] == "idle"
               for s in snap if ids is None or s["device_id"] in ids)


def _on(sim: SimFleet, world: World, version: str, ids: set[str] | None = None, timeout: float = 90.0) -> None:
    assert sim.wait(lambda snap: _running(snap, version, ids), timeout), (
        f"not every device runs {version}: {sim.summary()}; "
        f"{[s for s in sim.snapshot() if s['running'].get(MODEL) != version][:3]}")


def _serving(sim: SimFleet, world: World) -> None:
    """Every device serves some version (run alone, a test starts from devices that serve nothing)."""
    idle = {s["device_id"] for s in sim.snapshot() if MODEL not in s["running"]}
    for i in idle:
        world.assign(i, BASE)
    if idle:
        _on(sim, world, BASE, idle)


def _p95(world: World, version: str) -> tuple[float | None, int]:
    r = world.fleet.http.get(f"/api/v1/models/{MODEL}/{version}/telemetry", params={"since": "1800", "step": 1800})
    assert r.status_code == 200, r.text
    h = LatencyHistogram()
    for p in r.json()["points"]:
        h.merge(LatencyHistogram.from_dict(p["latency"]))
    return h.quantile(0.95), h.count


def test_telemetry_is_valid_and_a_twice_as_slow_version_shows_twice_the_p95_in_the_rollups(
        sim: SimFleet, world: World) -> None:
    _serving(sim, world)
    ids = sorted(s["device_id"] for s in sim.snapshot())
    slow, rest = set(ids[: N // 2]), set(ids[N // 2:])
    baseline = {s["running"][MODEL] for s in sim.snapshot() if s["device_id"] in rest}
    assert len(baseline) == 1
    base = baseline.pop()
    for i in slow:
        world.assign(i, SLOW)
    _on(sim, world, SLOW, slow)
    t0 = time.monotonic()
    assert world.sub.wait_for(lambda msgs: len(msgs) >= 3 * N, 30)

    def enough() -> bool:
        return _p95(world, SLOW)[1] >= 2000 and _p95(world, base)[1] >= 2000

    world.fleet.wait_for(enough, 90, "slow and baseline inferences in the rollups")
    (p_slow, n_slow), (p_base, n_base) = _p95(world, SLOW), _p95(world, base)
    assert p_slow is not None and p_base is not None
    ratio = p_slow / p_base
    print(f"rollup p95: {SLOW} {p_slow * 1000:.2f} ms ({n_slow} calls), {base} {p_base * 1000:.2f} ms ({n_base} calls),"
          f" ratio {ratio:.2f} after {time.monotonic() - t0:.1f} s")
    assert 1.6 < ratio < 3.2  # 2x per call; the rollups' bucket interpolation (5, 10, 25 ms bounds) widens it
    msgs = world.sub.on("/telemetry")
    for m in msgs:  # every message the sim sent is the wire format the server parses
        parsed = parse(m.topic, json.dumps(m.body).encode(), 1 << 20)
        assert parsed.topic == "telemetry" and parsed.body.device_id in set(ids)
    with_calls = [m.body for m in msgs if any(x["inferences"] for x in m.body["models"])]
    assert with_calls
    assert any(x.get("accuracy") and x["accuracy"]["window"] > 0 for b in with_calls for x in b["models"])
    by_device: dict[str, list[int]] = {}
    for m in msgs:
        by_device.setdefault(m.body["device_id"], []).append(m.body["seq"])
    assert set(by_device) == set(ids) and all(sorted(s) == list(range(1, len(s) + 1)) for s in by_device.values())


def test_the_cli_runs_for_a_few_seconds_and_prints_the_final_snapshot_as_json(world: World, tmp_path: Path) -> None:
    token = world.token(3)
    r = subprocess.run([*CLI, "sim", "--devices", "3", "--server", world.fleet.server.url, "--enroll-token", token,
                        "--broker", f"mqtt://127.0.0.1:{world.broker.port}", "--duration", "4", "--interval", "1",
                        "--checkin", "1", "--state", str(tmp_path / "state"), "--slow-model", "2.0.0=2",
                        "--json"], capture_output=True, text=True, timeout=180, env=clean_env({}))
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert len(out["devices"]) == 3 and out["summary"]["devices"] == 3
    assert all(d["device_id"].startswith("dev-") and d["telemetry_sent"] >= 1 for d in out["devices"])
    assert (tmp_path / "state" / "dev-00000" / "identity" / "identity.json").is_file()

