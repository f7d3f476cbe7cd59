"""An operator's actions on live rollouts, against 40 virtual devices (``edgefleet sim``: the real agent's
enrollment, check-in, TUF verification, download, install machine and telemetry) and a real fleet
server process whose rollout controller judges every 0.5 s, with a private Mosquitto.

34 devices talk to the server through a reverse proxy (tests/updater/_proxy.py) that can hold a
bundle's download half way, so an abort can land while devices are in phase ``download``; 6 more
(the "late" fleet) talk to it directly and are stopped and started again to be offline for a while.

Each test starts from whatever the previous one left (every device idle, serving some version of
``digits``) and says what it expects relative to that: a pause that holds a stage past its soak, an
abort in the middle of downloads, a promote over a long soak, pins and operator assignments during a
rollout, stages that advance without their offline members (who catch up when they come back), and
``rollout show`` in JSON and in words. (Rollouts of two models at once: tests/rollouts/test_service.py.)

The gates that compare figures (p95, error rate) are off here: these tests are about what the
operator's commands do, not about judging telemetry (tests/rollouts/test_scenarios.py is).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from updater._fleet import Fleet, models, run_cli
from updater._proxy import Proxy, Reply, Request

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from telemetry._mqtt import Broker, mosquitto_binary

from edgefleet.sim import SimFleet, default_updates

pytestmark = pytest.mark.slow

MODEL, OTHER = "digits", "gauge"  # OTHER: a second model the same devices serve
BASE = "1.0.0"
PAUSED, HELD, PROMOTED, PINNED, MULTI, OFFLINE, OFFLINE_LAST, SHOWN = (
    "2.0.0", "3.0.0", "4.0.0", "5.0.0", "6.0.0", "7.0.0", "8.0.0", "9.0.0")
N_MAIN, N_LATE = 34, 6
ONLINE_WINDOW = 10  # s: the server's online window (its minimum), so a stopped device is offline soon
# Only soak and failure are judged: the comparative gates are off (they need telemetry volumes).
GATES: dict[str, Any] = {"soak": 3, "max_p95_ratio": None, "max_error_rate": None, "stage_timeout": 900,
                         "min_devices": 2}
TIMEOUT = 240.0  # s: the machine is shared; every wait is for a state, this only bounds a hang



class Hold:
    """A proxy hook for one bundle's download: while closed, the first half of the body is sent and the
    rest held back until :meth:`release` (the device sits in phase ``download``, its ``.part`` file
    half written). Open (the default), the download goes through untouched."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.open.set()
        self.lock = threading.Lock()
        self.waiting = 0  # downloads held right now

    def close(self) -> None:
        self.open.clear()

    def release(self) -> None:
        self.open.set()

    def __call__(self, req: Request, proxy: Proxy) -> Reply:
        reply = proxy.forward(req)
        if reply.status != 200 or self.open.is_set() or len(reply.body) < 2:
            return reply
        half = len(reply.body) // 2

        def rest() -> Iterator[bytes]:
            with self.lock:
                self.waiting += 1
            try:
                while not self.open.wait(0.1):
                    if proxy.closing.is_set():
                        return
            finally:
                with self.lock:
                    self.waiting -= 1
            yield reply.body[half:]

        return reply.replace(body=reply.body[:half], then=rest())


def target_route(version: str, model: str = MODEL) -> str:
    return rf"/tuf/image/targets/[0-9a-f]{{64}}\.{model}-{version.replace('.', '[.]')}\.efb"


class World:
    """The server (controller every 0.5 s, online window 10 s), the broker, every version pushed and
    signed, the proxy, and 40 simulated devices serving ``digits`` 1.0.0."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.broker = Broker(mosquitto_binary(), root / "broker")
        self.mqtt = f"mqtt://127.0.0.1:{self.broker.port}"
        env = {"EDGEFLEET_SERVER_MQTT_URL": self.mqtt, "EDGEFLEET_SERVER_ROLLOUT_INTERVAL": "0.5",
               "EDGEFLEET_SERVER_ROLLOUT_LEASE": "5", "EDGEFLEET_SERVER_ONLINE_WINDOW": str(ONLINE_WINDOW),
               "EDGEFLEET_SERVER_LAST_SEEN_GRANULARITY": "1"}
        self.proxy: Proxy | None = None
        self.main: SimFleet | None = None
        self.late: SimFleet | None = None
        self.fleet = Fleet(root / "fleet", server_env=env)
        try:
            self._start(root)
        except BaseException:
            self.close()  # a set-up that fails leaves no server, broker, proxy or simulated devices behind
            raise

    def _start(self, root: Path) -> None:
        self.fleet.start()
        bundles = root / "bundles"
        for v in (BASE, PAUSED, HELD, PROMOTED, PINNED, MULTI, OFFLINE, OFFLINE_LAST, SHOWN):
            self.fleet.push(models.bundle("good", v, bundles / v))
        self.fleet.push(models.bundle("good", BASE, bundles / OTHER, name=OTHER))
        self.token = str(self.fleet.cli("device", "enroll-token", "--keys", self.fleet.keys, "--max-uses",
                                        str(N_MAIN + N_LATE))["token"])
        self.hold = Hold()
        self.proxy = Proxy(self.fleet.server.url).start()
        self.proxy.on(target_route(HELD), self.hold)
        # a device alone lets a 5x latency by in probation: the shared machine is slow at times
        self.updates = default_updates(2.0).model_copy(update={"max_latency_ratio": 5.0})
        self.main = SimFleet(self.proxy.url, self.token, N_MAIN, state=root / "sim-main", broker=self.mqtt,
                             interval=1.0, updates=self.updates, workers=8, seed=21).start()
        self.start_late()
        for i in self.ids:
            self.put(f"/api/v1/devices/{i}/models/{MODEL}", {"version": BASE})
        self.idle(lambda s: s["running"].get(MODEL) == BASE)

    # the late fleet: 6 devices straight to the server, stopped and started on the same state folder ---

    def start_late(self) -> None:
        assert self.late is None
        self.late = SimFleet(self.fleet.server.url, self.token, N_LATE, state=self.root / "sim-late",
                             broker=self.mqtt, interval=1.0, updates=self.updates, workers=3, seed=22).start()

    def stop_late(self) -> list[str]:
        assert self.late is not None
        ids = [s["device_id"] for s in self.late.snapshot()]
        self.late.stop()
        self.late = None
        return ids

    def late_ids(self) -> list[str]:
        assert self.late is not None
        return [s["device_id"] for s in self.late.snapshot()]

    # views ---------------------------------------------------------------------------------------------

    def snapshot(self) -> list[dict[str, Any]]:
        return [s for f in (self.main, self.late) if f is not None for s in f.snapshot()]

    @property
    def ids(self) -> list[str]:
        return sorted(s["device_id"] for s in self.snapshot())

    def running(self, model: str = MODEL) -> dict[str, str | None]:
        return {s["device_id"]: s["running"].get(model) for s in self.snapshot()}

    def wait(self, predicate: Callable[[], Any], what: str | Callable[[], str], timeout: float = TIMEOUT,
             poll: float = 0.25) -> Any:
        """Poll ``predicate`` until truthy (returned); ``what`` (or what it returns, at the timeout) says
        what was awaited."""
        deadline = time.monotonic() + timeout
        while True:
            got = predicate()
            if got:
                return got
            if time.monotonic() >= deadline:
                raise AssertionError(f"not in {timeout:g} s: {what() if callable(what) else what}")
            time.sleep(poll)

    def idle(self, ok: Callable[[dict[str, Any]], bool], ids: set[str] | None = None,
             what: str = "the devices") -> None:
        """Wait until every device (of ``ids``) is idle and ``ok``."""
        def done() -> bool:
            snap = [s for s in self.snapshot() if ids is None or s["device_id"] in ids]
            return all(s["phase"] == "idle" and ok(s) for s in snap)

        self.wait(done, lambda: f"{what}: {self.summary()}")

    def summary(self) -> dict[str, Any]:
        return {name: f.summary() for name, f in (("main", self.main), ("late", self.late)) if f is not None}

    # the operator --------------------------------------------------------------------------------------

    @property
    def http(self) -> Any:
        return self.fleet.http

    def put(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = self.http.put(path, json=body)
        assert r.status_code == 200, r.text
        return dict(r.json())

    def post(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        r = self.http.post(path, json=body or {})
        assert r.status_code == 200, r.text
        return dict(r.json())

    def rollout(self, version: str, model: str = MODEL, **gates: Any) -> dict[str, Any]:
        r = self.http.post("/api/v1/rollouts", json={"model": model, "version": version, **GATES, **gates})
        assert r.status_code == 201, r.text
        return dict(r.json())

    def show(self, rid: int) -> dict[str, Any]:
        r = self.http.get(f"/api/v1/rollouts/{rid}")
        assert r.status_code == 200, r.text
        return dict(r.json())

    def members(self, rid: int) -> dict[str, dict[str, Any]]:
        r = self.http.get(f"/api/v1/rollouts/{rid}/members", params={"limit": 1000})
        assert r.status_code == 200, r.text
        return {m["device_id"]: m for m in r.json()}

    def audit(self, rid: int) -> list[dict[str, Any]]:
        return self.audit_of(f"rollout:{rid}")

    def audit_of(self, target: str) -> list[dict[str, Any]]:
        r = self.http.get("/api/v1/audit", params={"limit": 1000})
        assert r.status_code == 200, r.text
        return sorted((e for e in r.json() if e["target"] == target), key=lambda e: e["id"])

    def until_ended(self, rid: int, timeout: float = TIMEOUT) -> dict[str, Any]:
        return dict(self.wait(lambda: (lambda o: o if o["state"] != "running" else None)(self.show(rid)),
                              lambda: f"rollout {rid} to end: {self.show(rid)['explanation']}", timeout))

    def desired(self, device_id: str, model: str = MODEL) -> dict[str, Any] | None:
        """The device's assignment of ``model`` as the server has it (``device show``'s desired state)."""
        r = self.http.get(f"/api/v1/devices/{device_id}")
        assert r.status_code == 200, r.text
        return next((m for m in (r.json()["desired"] or {}).get("models", []) if m["name"] == model), None)

    def online(self, device_id: str) -> bool:
        r = self.http.get(f"/api/v1/devices/{device_id}")
        assert r.status_code == 200, r.text
        return bool(r.json()["online"])

    def director_targets(self, device_id: str) -> dict[str, Any]:
        """The device's current director targets (path -> target), read as an operator: timestamp, then
        the snapshot it names, then the targets that names."""
        ts = self.http.get(f"/tuf/director/{device_id}/timestamp.json").json()["signed"]
        snap = self.http.get(f"/tuf/director/{device_id}/{ts['meta']['snapshot.json']['version']}.snapshot.json")
        tv = snap.json()["signed"]["meta"]["targets.json"]["version"]
        return dict(self.http.get(f"/tuf/director/{device_id}/{tv}.targets.json").json()["signed"]["targets"])

    def actor(self) -> str:
        """How the audit log names the admin token's holder (what ``created_by`` says)."""
        r = self.http.get("/api/v1/rollouts", params={"limit": 1})
        assert r.status_code == 200 and r.json(), r.text
        return str(r.json()[0]["created_by"])

    def cli(self, *args: str) -> Any:
        return self.fleet.cli(*args)

    def cli_text(self, *args: str) -> str:
        return run_cli(*args, env=self.fleet.env).stdout

    def close(self) -> None:
        try:
            for f in (self.main, self.late):
                if f is not None:
                    f.stop()
        finally:
            try:
                if self.proxy is not None:
                    self.hold.release()
                    self.proxy.close()
                self.fleet.close()
            finally:
                self.broker.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("rollout-ops"))
    try:
        yield w
    finally:
        w.close()


@pytest.fixture(autouse=True)
def tidy(world: World) -> Iterator[None]:
    """After each test, pass or fail: no active rollout, no pin, the late fleet running, and every device
    idle on what the server assigns it, so the next test starts from a settled fleet."""
    yield
    world.hold.release()
    if world.late is None:
        world.start_late()
    r = world.http.get("/api/v1/rollouts", params={"limit": 1000})
    for x in r.json():
        if x["state"] in ("running", "paused"):
            world.http.post(f"/api/v1/rollouts/{x['id']}/abort", json={"reason": "test cleanup"})
    for d in world.ids:
        world.http.delete(f"/api/v1/devices/{d}/pins/{MODEL}")

    def settled() -> bool:
        snap = world.snapshot()
        if not all(s["phase"] == "idle" for s in snap):
            return False
        return all((world.desired(s["device_id"]) or {}).get("version") == s["running"].get(MODEL) for s in snap)

    world.wait(settled, lambda: f"the fleet settled after the test: {world.summary()}", poll=1.0)


def _actions(world: World, rid: int) -> list[str]:
    return [e["action"] for e in world.audit(rid)]


def _by_status(members: dict[str, dict[str, Any]], *statuses: str) -> set[str]:
    return {d for d, m in members.items() if m["status"] in statuses}


def _in_stage(members: dict[str, dict[str, Any]], stage: int) -> set[str]:
    """Members whose stage (1-based) is ``stage`` exactly (not the earlier stages it also holds)."""
    return {d for d, m in members.items() if m["stage"] == stage}


def _first_assigned(world: World, rid: int) -> dict[str, dict[str, Any]]:
    """Poll until the controller assigned the first stage (one decision assigns all its due members)."""
    return dict(world.wait(lambda: (lambda ms: ms if _by_status(ms, "assigned", "updated") else None)(
        world.members(rid)), f"rollout {rid}: the first stage assigned", poll=0.1))


# pause / resume ------------------------------------------------------------------------------------------


def test_pause_holds_a_stage_past_its_soak_and_resume_runs_it_to_completion(world: World) -> None:
    soak = 6
    out = world.rollout(PAUSED, stages=[10, 100], soak=soak)
    rid = out["id"]
    first = _first_assigned(world, rid)
    paused = world.cli("rollout", "pause", str(rid), "--reason", "plant shutdown")
    assert paused["state"] == "paused" and paused["stage"] == 0, paused
    stage1 = _in_stage(first, 1)
    assert stage1 and _by_status(first, "assigned", "updated") == stage1, first
    rest = set(first) - stage1

    # members still move on while paused (the controller follows what the devices report) ...
    world.wait(lambda: _by_status(world.members(rid), "updated") == stage1, "the first stage updated while paused")
    # ... but nothing is assigned or judged: well past the soak, the rollout is where the pause left it
    time.sleep(soak + 4)
    shown = world.show(rid)
    assert shown["state"] == "paused" and shown["stage"] == 0, shown["explanation"]
    assert "plant shutdown" in shown["reason"], shown["reason"]
    members = world.members(rid)
    assert _by_status(members, "waiting") == rest, members
    assert not {d for d, v in world.running().items() if v == PAUSED} - stage1
    assert not {s["device_id"] for s in world.snapshot() if s["target"] and PAUSED in s["target"]} - stage1
    acts = _actions(world, rid)
    assert acts[-1] == "rollout.pause" and "rollout.advance" not in acts, acts
    pause = world.audit(rid)[-1]
    assert pause["actor"] == shown["created_by"] and pause["after"]["state"] == "paused", pause
    assert acts.count("rollout.assign") == 1, acts  # the first stage's, before the pause

    resumed = world.cli("rollout", "resume", str(rid))
    assert resumed["state"] == "running", resumed
    done = world.until_ended(rid)
    assert done["state"] == "completed", done["explanation"]
    world.idle(lambda s: s["running"].get(MODEL) == PAUSED)
    acts = _actions(world, rid)
    assert acts.index("rollout.resume") < acts.index("rollout.advance") < acts.index("rollout.complete"), acts


# abort while downloading ---------------------------------------------------------------------------------


def test_abort_while_devices_download_gives_every_touched_device_its_previous_version(world: World) -> None:
    before = world.running()
    sha = world.http.get(f"/api/v1/models/{MODEL}/{HELD}").json()["sha256"]
    world.hold.close()
    try:
        out = world.rollout(HELD, stages=[10, 100])
        rid = out["id"]
        first = _first_assigned(world, rid)
        touched = _by_status(first, "assigned")
        assert touched, first

        def downloading() -> set[str]:
            snap = {s["device_id"]: s for s in world.snapshot()}
            return {d for d in touched if snap[d]["phase"] == "download" and HELD in (snap[d]["target"] or "")}

        # every touched device of the proxied fleet is in phase download, its bundle half received
        proxied = {d for d in touched if world.main is not None and d in world.main.by_id}
        world.wait(lambda: downloading() >= proxied and world.hold.waiting >= len(proxied),
                   f"the first stage's devices mid-download ({world.hold.waiting} held)")
        assert proxied, f"no member of the first stage is behind the proxy: {touched}"
        for d in proxied:
            assert world.running()[d] == before[d], d  # nothing half-downloaded is served
            part = world.main.by_id[d].state_dir / "staging" / f"{sha}.part"  # type: ignore[union-attr]
            assert part.is_file(), part  # the download is under way into staging, not installed

        aborted = world.cli("rollout", "abort", str(rid), "--reason", "saw it by hand")
        assert aborted["state"] == "aborted", aborted
    finally:
        world.hold.release()

    # the rollout's audit entry: an abort by the operator, the devices it changed
    entry = world.audit(rid)[-1]
    assert entry["action"] == "rollout.abort" and entry["actor"] == aborted["created_by"], entry
    assert entry["after"]["devices_changed"] == len(touched), (entry, touched)
    assert "saw it by hand" in entry["after"]["reason"], entry
    # the director no longer lists the candidate for them: their previous version again
    for d in touched:
        targets = world.director_targets(d)
        assert f"{MODEL}-{HELD}.efb" not in targets, (d, targets)
        assert f"{MODEL}-{before[d]}.efb" in targets, (d, targets)
        desired = world.desired(d)
        assert desired is not None and desired["version"] == before[d], (d, desired)
    members = world.members(rid)
    assert not _by_status(members, "waiting") & touched
    # every touched device ends on the version it had before, idle, nothing left in staging
    world.idle(lambda s: s["running"].get(MODEL) == before[s["device_id"]], touched, "the touched devices")
    assert world.running() == before
    for d in proxied:
        staging = world.main.by_id[d].state_dir / "staging"  # type: ignore[union-attr]
        assert not [p for p in staging.glob("*") if p.suffix == ".part"], list(staging.glob("*"))


# promote ------------------------------------------------------------------------------------------------


def test_promote_advances_a_stage_without_waiting_for_a_long_soak_and_audits_the_operator(world: World) -> None:
    out = world.rollout(PROMOTED, stages=[10, 100], soak=3600)
    rid = out["id"]
    first = _first_assigned(world, rid)
    stage1 = _in_stage(first, 1)
    world.wait(lambda: _by_status(world.members(rid), "updated") == stage1, "the first stage updated")
    soak = world.wait(lambda: next((g for g in world.show(rid)["last_gates"]
                                    if g["name"] == "soak" and g["estimate"] is not None), None), "a soak figure")
    assert soak["status"] == "wait" and soak["threshold"] == 3600, soak
    _shown_in_words_and_numbers(world, rid, stage1)

    promoted = world.cli("rollout", "promote", str(rid), "--reason", "looks fine")
    assert promoted["stage"] == 1 and promoted["state"] == "running", promoted
    entry = world.audit(rid)[-1]
    assert entry["action"] == "rollout.advance" and entry["actor"] == out["created_by"], entry
    assert "promoted by" in entry["after"]["reason"] and "skipped" in entry["after"]["reason"], entry
    assert entry["after"]["stage"] == 1 and entry["before"]["stage"] == 0, entry
    # the controller assigns the new stage; once every member runs it, the last stage is promoted too
    world.idle(lambda s: s["running"].get(MODEL) == PROMOTED)
    world.wait(lambda: _by_status(world.members(rid), "updated") == set(world.ids), "every member updated")
    done = world.cli("rollout", "promote", str(rid))
    assert done["state"] == "completed", done
    acts = _actions(world, rid)
    assert acts.count("rollout.advance") == 1 and acts[-1] == "rollout.complete", acts
    assert world.audit(rid)[-1]["actor"] == out["created_by"]


# pins and operator assignments --------------------------------------------------------------------------


def test_pins_and_operator_assignments_take_devices_out_of_a_rollout(world: World) -> None:
    before = world.running()
    ids = world.ids
    pinned_first = ids[0]
    world.cli("device", "pin", pinned_first, "--model", MODEL, "--version", before[pinned_first] or BASE)

    out = world.rollout(PINNED, stages=[10, 50, 100])
    rid = out["id"]
    members = world.members(rid)
    assert members[pinned_first]["status"] == "skipped" and "pinned" in members[pinned_first]["detail"], members
    assert any(x["device_id"] == pinned_first and "pinned" in x["detail"] for x in out["skipped"]), out["skipped"]
    # unpinned: an operator's assignment of the same version, which this rollout (made before) leaves be
    unpinned = world.cli("device", "unpin", pinned_first, "--model", MODEL)
    assert unpinned["changed"] and unpinned["source"] == "operator", unpinned
    desired = world.desired(pinned_first)
    assert desired is not None and desired["source"] == "operator" and desired["version"] == before[pinned_first]

    # an operator's assignment during the rollout releases a member of the last stage before it is reached
    by_hand = sorted(_in_stage(members, 3))[0]
    world.cli("device", "assign", by_hand, MODEL, BASE)

    # a member of the first stage, pinned once it runs the candidate, goes back and stays there
    first = _first_assigned(world, rid)
    pinned_during = sorted(_in_stage(first, 1))[0]
    world.idle(lambda s: s["running"].get(MODEL) == PINNED, {pinned_during}, "the pinned member")
    pin = world.cli("device", "pin", pinned_during, "--model", MODEL, "--version", before[pinned_during] or BASE)
    assert pin["released_from_rollouts"] == [rid], pin

    done = world.until_ended(rid)
    assert done["state"] == "completed", done["explanation"]
    members = world.members(rid)
    assert members[pinned_first]["status"] == "skipped", members[pinned_first]
    assert members[by_hand]["status"] == "released" and "assigned" in members[by_hand]["detail"], members[by_hand]
    assert members[pinned_during]["status"] == "released" and "pinned" in members[pinned_during]["detail"]
    expect: dict[str, str | None] = {d: PINNED for d in ids}
    expect.update({pinned_first: before[pinned_first], pinned_during: before[pinned_during], by_hand: BASE})
    world.idle(lambda s: s["running"].get(MODEL) == expect[s["device_id"]])
    desired = world.desired(pinned_during)
    assert desired is not None and desired["source"] == "pin" and desired["version"] == before[pinned_during]
    assert [e["action"] for e in world.audit_of(f"device:{pinned_during}/model:{MODEL}")][-1] == "device.pin"
    world.cli("device", "unpin", pinned_during, "--model", MODEL)  # leave no pin for the next tests


# offline members ----------------------------------------------------------------------------------------


def test_a_stage_advances_without_its_offline_members_and_they_catch_up_when_back(world: World) -> None:
    late = world.stop_late()
    try:
        world.wait(lambda: not any(world.online(d) for d in late), "the late devices offline", ONLINE_WINDOW + 60)
        out = world.rollout(OFFLINE, stages=[70, 100])
        rid = out["id"]
        members = world.members(rid)
        assert set(late) <= set(members), members
        offline_first = {d for d in late if members[d]["stage"] == 1}
        assert offline_first, members  # 6 of 40, 28 in the first stage: some of them (by hash, nearly sure)

        advanced = world.wait(lambda: (lambda o: o if o["stage"] >= 1 or o["state"] != "running" else None)(
            world.show(rid)), "the first stage advances without its offline members")
        assert advanced["state"] == "running" and advanced["stage"] == 1, advanced["explanation"]
        world.post(f"/api/v1/rollouts/{rid}/pause", {"reason": "wait for the late devices"})
        members = world.members(rid)
        assert _by_status(members, "waiting") >= offline_first, members
        entry = next(e for e in world.audit(rid) if e["action"] == "rollout.advance")
        soak = next(g for g in entry["after"]["decision"]["gates"] if g["name"] == "soak")
        assert soak["status"] == "pass", soak
    finally:
        world.start_late()
    world.wait(lambda: all(world.online(d) for d in late), "the late devices online again")
    world.post(f"/api/v1/rollouts/{rid}/resume")
    done = world.until_ended(rid)
    assert done["state"] == "completed", done["explanation"]
    world.idle(lambda s: s["running"].get(MODEL) == OFFLINE)  # the late ones too
    assert _by_status(world.members(rid), "updated") == set(world.ids)


def test_a_device_offline_through_a_whole_rollout_catches_up_when_back(world: World) -> None:
    late = world.stop_late()
    try:
        world.wait(lambda: not any(world.online(d) for d in late), "the late devices offline", ONLINE_WINDOW + 60)
        out = world.rollout(OFFLINE_LAST, stages=[50, 100])
        rid = out["id"]
        done = world.until_ended(rid)
        assert done["state"] == "completed", done["explanation"]  # the offline members held nothing back
    finally:
        world.start_late()
    world.wait(lambda: all(world.online(d) for d in late), "the late devices online again")
    # the server assigns them the version of the stage they belong to (the last: the candidate) ...
    world.wait(lambda: all((world.desired(d) or {}).get("version") == OFFLINE_LAST for d in late),
               lambda: f"the late devices assigned {OFFLINE_LAST}: members "
               f"{ {d: world.members(rid)[d]['status'] for d in late} }, assigned "
               f"{ {d: (world.desired(d) or {}).get('version') for d in late} }", timeout=60)
    # ... and they run it
    world.idle(lambda s: s["running"].get(MODEL) == OFFLINE_LAST, set(late), "the late devices, back")


def _shown_in_words_and_numbers(world: World, rid: int, stage1: set[str]) -> None:
    """``rollout show`` (JSON and text) of a rollout waiting in its first stage on a 3600 s soak."""
    n = len(world.ids)
    shown = world.cli("rollout", "show", str(rid))
    assert shown["id"] == rid and shown["state"] == "running" and shown["stage"] == 0, shown
    assert shown["members"]["updated"] == len(stage1) and shown["members"]["waiting"] == n - len(stage1), shown
    assert [(s["percent"], s["devices"], s["current"]) for s in shown["stages"]] == [
        (10, len(stage1), True), (100, n, False)], shown["stages"]
    words = shown["explanation"]
    assert f"rollout {rid} of {MODEL} is running" in words, words
    assert f"Stage 1 of 2 (10%, {len(stage1)} of {n} devices)" in words, words
    assert f"{len(stage1)} updated" in words and f"{n - len(stage1)} waiting" in words, words
    soak = next(g for g in shown["last_gates"] if g["name"] == "soak")
    assert soak["status"] == "wait" and soak["threshold"] == 3600 and 0 <= soak["estimate"] < 3600, soak
    assert f"{len(stage1)} online members serving" in soak["detail"], soak
    assert {g["name"] for g in shown["last_gates"]} >= {"soak", "failure"}, shown["last_gates"]

    text = world.cli_text("rollout", "show", str(rid))
    settled = words.split(" Last decision:")[0]  # the decision's words count the soak's seconds
    assert settled in text and "Last decision: stage 1 (10%): waiting: soak:" in text, text
    assert f"{MODEL} {PROMOTED}, state running, stage 1 (10%), phase serve" in text, text
    assert "gates (last judgement)" in text and "3.6e+03" in text, text  # the soak's threshold, 3600 s
    assert f"{len(stage1)} online members serving" in text, text
