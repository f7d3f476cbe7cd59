"""Attacks from the network: a hostile proxy (``_proxy.py``) between a real agent process and the real
fleet server tampers with, swaps, stretches, replays and freezes what the agent downloads.

In every test the agent keeps serving the version it had (a load thread sends inferences all through
the attack: no failure, only that version answers), the bytes or metadata are refused, the refusal
reaches the server as an event with its reason, and ``edgefleet agent status --json`` shows it
(``last_failure``, ``refused``). Every device is its own (a refused target is remembered per device);
one server serves the module. The freeze tests move the clocks of a second server and of their agents
with libfaketime (skipped where it is not installed): a timestamp replayed until it expires is what a
device sees only once time has passed, and a test cannot wait a day.

The agent talks to the proxy because its identity file (``STATE/identity/identity.json``, the
``server_url`` that ``agent run`` takes over agent.toml's) is pointed at it after enrollment.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from updater._fleet import Agent, Fleet, Load, models, run_cli, wait_for
from updater._proxy import Proxy, Reply, endless, not_modified, replay, rewrite, serve, served_from

from edgefleet.agent.config import identity_path
from edgefleet.agent.updater.client import DeviceClient
from edgefleet.agent.updater.errors import Refused
from edgefleet.agent.updater.status import describe
from edgefleet.bundle import read_manifest
from edgefleet.durable import atomic_write_bytes

FAST = {"checkin_interval": 0.5, "probation_inferences": 20, "probation_seconds": 1.0}
AGE = {"max_metadata_age": 2.0}  # refresh every 2 s even when the check-in says nothing changed
TIMESTAMP_MAX = 16384  # ngclient's UpdaterConfig.timestamp_max_length: a longer timestamp.json is refused
LIBFAKETIME = next(iter(sorted(glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1")
                               + glob.glob("/usr/lib/faketime/libfaketimeMT.so.1"))), None)


# ------------------------------------------------------------------------------------------ helpers


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def target_route(target: str) -> str:
    """The pattern of a target file's URL path, any sha256 (``/tuf/image/targets/{sha}.{target}``)."""
    return rf"/tuf/image/targets/[0-9a-f]{{64}}\.{re.escape(target)}"


def director_route(device_id: str, name: str = "timestamp.json") -> str:
    return f"/tuf/director/{device_id}/{name}"


def checkin_route(device_id: str) -> str:
    return f"/api/v1/devices/{device_id}/desired"


def point_at(agent: Agent, url: str) -> None:
    """Make the enrolled agent talk to ``url``: the identity's ``server_url`` (what ``agent run`` uses)."""
    path = identity_path(agent.state_dir)
    ident = json.loads(path.read_bytes())
    ident["server_url"] = url
    atomic_write_bytes(path, json.dumps(ident, indent=2).encode() + b"\n", mode=0o600)


@contextlib.contextmanager
def environ(extra: Mapping[str, str]) -> Iterator[None]:
    """``extra`` in this process's environment while the block runs (what the agent process inherits;
    the harness's Agent takes no environment of its own)."""
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def status(agent: Agent) -> dict[str, Any]:
    """``edgefleet agent status --json`` for the agent's state directory."""
    out: dict[str, Any] = json.loads(run_cli("agent", "status", "--state-dir", agent.state_dir, "--json").stdout)
    return out


def refreshed(agent: Agent) -> bool:
    """Whether the agent has verified both repositories at least once (its own state says so)."""
    return describe(agent.state_dir)["last_refresh"] is not None


def assert_served_only(load: Load, version: str) -> None:
    """The load saw answers, every one from ``version``, and no failure and no unanswered request."""
    samples = load.stop()
    assert samples, "no inference was sent during the attack"
    assert not load.failures(), load.failures()[:3]
    assert not load.unanswered(), load.unanswered()[:3]
    assert set(load.versions()) == {version}, load.versions()


def assert_not_installed(agent: Agent, version: str) -> None:
    assert not (agent.state_dir / "models" / models.MODEL_NAME / version).exists()
    assert not list((agent.state_dir / "models").glob(f"{models.MODEL_NAME}/.{version}.*"))


def signed(reply: Reply) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(reply.body)["signed"]
    return out


def expires(fleet: Fleet, path: str) -> datetime:
    """The expiry of the metadata the server serves at ``path`` (read as the operator)."""
    r = fleet.http.get(path)
    assert r.status_code == 200, f"{path}: {r.status_code} {r.text[:300]}"
    return datetime.fromisoformat(r.json()["signed"]["expires"].replace("Z", "+00:00"))


class StagingWatch:
    """The largest file seen in an agent's ``staging/`` folder, sampled from a thread until stopped."""

    def __init__(self, state_dir: Path) -> None:
        self.folder = state_dir / "staging"
        self.largest = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="staging-watch", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for p in self.folder.glob("*") if self.folder.is_dir() else ():
                with contextlib.suppress(OSError):
                    self.largest = max(self.largest, p.stat().st_size)
            self._stop.wait(0.002)

    def __enter__(self) -> StagingWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


# ----------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory, update_models: dict[str, Path]) -> Iterator[Fleet]:
    """One server for the module with ``digits`` 1.0.0 and 2.0.0 signed into the image repository."""
    fleet = Fleet(tmp_path_factory.mktemp("net") / "fleet")
    try:
        fleet.start()
        fleet.push(update_models["good"])
        fleet.push(update_models["good2"])
        yield fleet
    finally:
        fleet.close()


@pytest.fixture
def proxy(net: Fleet) -> Iterator[Proxy]:
    with Proxy(net.server.url) as p:
        yield p


AgentFactory = Callable[..., Agent]


@pytest.fixture
def behind() -> Iterator[AgentFactory]:
    """``behind(fleet, proxy, model, updates=None, env=None, before=None)``: a new enrolled device whose
    agent serves ``model`` and talks to the server through ``proxy`` (``updates`` on top of FAST; ``env``
    for its process; ``before(device_id)`` runs before it starts, to set hooks); killed after the test."""
    made: list[Agent] = []

    def make(fleet: Fleet, proxy: Proxy, model: Path, updates: Mapping[str, Any] | None = None,
             env: Mapping[str, str] | None = None, before: Callable[[str], None] | None = None) -> Agent:
        agent = fleet.agent(model, updates={**FAST, **(updates or {})}, start=False)
        made.append(agent)
        point_at(agent, proxy.url)
        if before is not None:
            assert agent.device_id is not None
            before(agent.device_id)
        with environ(env or {}):
            agent.start()
        return agent

    yield make
    for agent in made:
        agent.close()


# ---------------------------------------------------------------------- 1, 2: the bundle's bytes


def flip(data: bytes) -> bytes:
    """``data`` with a few bytes inverted (a tar's content, not its length)."""
    out = bytearray(data)
    for i in (len(out) // 3, len(out) // 2, len(out) - 700):
        out[i] ^= 0xFF
    return bytes(out)


def test_bundle_bytes_flipped_in_transit_are_refused_as_hash_mismatch(
    net: Fleet, proxy: Proxy, behind: AgentFactory, update_models: dict[str, Path]
) -> None:
    v1, v2 = update_models["good"], update_models["good2"]
    agent = behind(net, proxy, v1)
    dev = agent.device_id
    assert dev is not None
    route = target_route("digits-2.0.0.efb")
    proxy.on(route, rewrite(flip))
    with agent.load(rate=20) as load:
        net.assign(dev, "digits", "2.0.0")
        event = net.wait_event(dev, "update.refused", reason="hash_mismatch", target="digits-2.0.0.efb")
        assert agent.served_version() == "1.0.0"
    assert_served_only(load, "1.0.0")
    sent = proxy.exchanges(route)
    assert sent and sent[0].status == 200 and sent[0].sent == v2.stat().st_size, sent  # tampered, same length
    assert sha256(v2) in event["detail"], event
    assert_not_installed(agent, "2.0.0")
    kinds = [e["kind"] for e in net.events(dev)]
    assert "install.ok" not in kinds and "switch.ok" not in kinds, kinds
    st = status(agent)
    assert st["last_failure"]["reason"] == "hash_mismatch", st
    assert st["refused"][sha256(v2)]["reason"] == "hash_mismatch", st
    assert st["running"] == {} and st["update"] is None, st


def test_another_bundles_bytes_are_refused_whatever_their_length(
    net: Fleet, proxy: Proxy, behind: AgentFactory, update_models: dict[str, Path],
    make_bundle: Callable[[str, str], Path],
) -> None:
    """The proxy answers with a different, valid bundle: of the same length (a ``digits`` 2.0.0 whose
    manifest looks right), longer than the signed length, shorter than it."""
    v1, v2 = update_models["good"], update_models["good2"]
    same_length = make_bundle("bad_selftest", "2.0.0")
    longer = update_models["slow"]  # 3.0.0: twice the size of the others
    v21 = make_bundle("good", "2.1.0")
    net.push(longer)
    net.push(v21)
    assert read_manifest(same_length).version == "2.0.0" and same_length.stat().st_size == v2.stat().st_size
    assert sha256(same_length) != sha256(v2)
    assert longer.stat().st_size > v21.stat().st_size and v1.stat().st_size < longer.stat().st_size

    agent = behind(net, proxy, v1, {"max_attempts": 3, "backoff_max": 0.5})
    dev = agent.device_id
    assert dev is not None
    proxy.on(target_route("digits-2.0.0.efb"), serve(same_length.read_bytes()))
    proxy.on(target_route("digits-3.0.0.efb"), serve(v1.read_bytes()))  # shorter than 3.0.0
    proxy.on(target_route("digits-2.1.0.efb"), serve(longer.read_bytes()))  # longer than 2.1.0
    with agent.load(rate=20) as load:
        net.assign(dev, "digits", "2.0.0")
        net.wait_event(dev, "update.refused", reason="hash_mismatch", target="digits-2.0.0.efb")
        # Shorter: a body that ends before the signed length is a cut download; retried, then given up.
        net.assign(dev, "digits", "3.0.0")
        net.wait_event(dev, "update.retry", reason="download_interrupted", target="digits-3.0.0.efb")
        given_up = net.wait_event(dev, "update.refused", reason="download_interrupted", target="digits-3.0.0.efb")
        assert "gave up after 3 attempts" in given_up["detail"], given_up
        # Longer: the signed length is reached and more follows.
        net.assign(dev, "digits", "2.1.0")
        net.wait_event(dev, "update.refused", reason="endless_data", target="digits-2.1.0.efb")
        assert agent.served_version() == "1.0.0"
    assert_served_only(load, "1.0.0")
    for version in ("2.0.0", "3.0.0", "2.1.0"):
        assert_not_installed(agent, version)
    kinds = [e["kind"] for e in net.events(dev)]
    assert "install.ok" not in kinds and "switch.ok" not in kinds, kinds
    st = status(agent)
    assert st["last_failure"]["reason"] == "endless_data", st
    # Refusals of targets no longer assigned are forgotten (they may be assigned again later).
    assert {k: v["reason"] for k, v in st["refused"].items()} == {sha256(v21): "endless_data"}, st


# ------------------------------------------------------------------------------------ 3: endless


def test_an_endless_bundle_stops_at_the_signed_length_and_is_refused_as_endless_data(
    net: Fleet, proxy: Proxy, behind: AgentFactory, update_models: dict[str, Path]
) -> None:
    """The proxy sends the real ``big`` bundle (5 MB) and then zeros without end. The zeros are held
    back until the agent has written most of the bundle to staging, so the watch surely sees the file;
    from then on every size it sees must stay within the signed length."""
    v1, big = update_models["good"], update_models["big"]
    net.push(big)
    version, length = read_manifest(big).version, big.stat().st_size
    agent = behind(net, proxy, v1)
    dev = agent.device_id
    assert dev is not None
    route = target_route(f"digits-{version}.efb")
    go = threading.Event()
    proxy.on(route, endless(hold=go))
    part = agent.state_dir / "staging" / f"{sha256(big)}.part"
    with agent.load(rate=20) as load, StagingWatch(agent.state_dir) as staging:
        net.assign(dev, "digits", version)
        net.wait_for(lambda: part.is_file() and part.stat().st_size > length // 2, 60, "most of the bundle staged")
        go.set()
        event = net.wait_event(dev, "update.refused", reason="endless_data", target=f"digits-{version}.efb")
        # The agent hung up: the proxy's write failed (it was still sending, never told to stop).
        done = wait_for(lambda: [x for x in proxy.exchanges(route) if x.ended != "complete"], 30,
                        "the proxy's endless answer to end")
    assert_served_only(load, "1.0.0")
    assert done[0].ended.startswith("peer closed"), done
    assert done[0].sent > length, (done, length)  # more than the signed length went out...
    assert length // 2 < staging.largest <= length, (staging.largest, length)  # ...never more reached the disk
    assert f"signed {length} bytes" in event["detail"], event
    assert_not_installed(agent, version)
    assert not part.exists()
    st = status(agent)
    assert st["last_failure"]["reason"] == "endless_data", st
    assert st["refused"][sha256(big)]["reason"] == "endless_data", st


def test_an_endless_timestamp_is_refused_as_metadata_too_long_and_the_agent_recovers(
    net: Fleet, proxy: Proxy, behind: AgentFactory, update_models: dict[str, Path]
) -> None:
    v1 = update_models["good"]
    agent = behind(net, proxy, v1, AGE)
    dev = agent.device_id
    assert dev is not None
    net.wait_for(lambda: refreshed(agent), 60, "the agent's first metadata refresh")
    route = director_route(dev)
    proxy.on(route, endless(b" " * 4096))  # the real timestamp, then JSON whitespace without end
    with agent.load(rate=20) as load:
        event = net.wait_event(dev, "metadata.refused", reason="metadata_too_long")
        assert "director metadata" in event["detail"], event
        done = wait_for(lambda: [x for x in proxy.exchanges(route) if x.ended != "complete"], 30,
                        "the proxy's endless timestamp to end")
        st = status(agent)
        proxy.off(route)
        net.wait_event(dev, "metadata.ok")
    assert_served_only(load, "1.0.0")
    assert done[0].ended.startswith("peer closed") and done[0].sent > TIMESTAMP_MAX, done
    assert st["last_failure"]["reason"] == "metadata_too_long", st


# ---------------------------------------------------------------------------- 4, 5: assignments


def test_a_replayed_older_assignment_is_refused_as_metadata_rollback(
    net: Fleet, proxy: Proxy, behind: AgentFactory, update_models: dict[str, Path]
) -> None:
    """Recorded while the device was assigned 1.0.0 (check-in and director timestamp), replayed once it
    runs 2.0.0. Everything before the replay goes through the proxy untouched: a control that the proxy
    alone changes nothing."""
    v1 = update_models["good"]
    agent = behind(net, proxy, v1)
    dev = agent.device_id
    assert dev is not None
    with agent.load(rate=50) as setup:  # probation counts inferences
        net.assign(dev, "digits", "1.0.0")
        net.wait_event(dev, "update.committed", version="1.0.0")
        old_ts, old_checkin = proxy.last(director_route(dev)), proxy.last(checkin_route(dev))
        assert old_ts is not None and old_checkin is not None
        net.assign(dev, "digits", "2.0.0")
        net.wait_event(dev, "update.committed", version="2.0.0")
    assert not setup.failures() and not setup.unanswered(), setup.failures()[:3]
    trusted = describe(agent.state_dir)["trust"]["director"]["timestamp"]["version"]
    assert signed(old_ts)["version"] < trusted
    new_checkin = proxy.last(checkin_route(dev))
    assert new_checkin is not None and old_checkin.header("etag") != new_checkin.header("etag")  # "changed"

    with agent.load(rate=20) as load:
        proxy.on(checkin_route(dev), replay(old_checkin))
        proxy.on(director_route(dev), replay(old_ts))
        event = net.wait_event(dev, "metadata.refused", reason="metadata_rollback")
        assert "director metadata" in event["detail"], event
        assert agent.served_version() == "2.0.0"
    assert_served_only(load, "2.0.0")
    st = status(agent)
    assert st["last_failure"]["reason"] == "metadata_rollback", st
    assert st["running"]["digits"]["version"] == "2.0.0" and st["update"] is None, st
    assert st["trust"]["director"]["timestamp"]["version"] == trusted, st
    assert describe(agent.state_dir)["last_checkin"] is not None
    started = [e for e in net.events(dev) if e["kind"] == "update.started"]
    assert [e["version"] for e in started] == ["1.0.0", "2.0.0"], started  # 1.0.0 was never tried again


def test_another_devices_assignment_is_refused_as_other_device(
    net: Fleet, proxy: Proxy, behind: AgentFactory, update_models: dict[str, Path], tmp_path: Path
) -> None:
    """Y's director URLs answer with X's director metadata (signed with the same online keys under the
    shared director root, newer versions than Y's): its targets name X."""
    v1 = update_models["good"]
    x = net.enroll(tmp_path / "x")
    net.assign(x, "digits", "1.0.0")
    net.assign(x, "digits", "2.0.0")
    agent = behind(net, proxy, v1, AGE)
    y = agent.device_id
    assert y is not None
    net.wait_for(lambda: refreshed(agent), 60, "Y's first metadata refresh")
    ours = describe(agent.state_dir)["trust"]["director"]
    theirs = net.http.get(f"/tuf/director/{x}/timestamp.json").json()["signed"]["version"]
    assert theirs > ours["timestamp"]["version"], (theirs, ours)  # not a rollback: a substitution

    # The attacker holds X's credentials (an extracted key) and serves what X may read at Y's URLs.
    ident = json.loads(identity_path(tmp_path / "x").read_bytes())
    x_client = DeviceClient(net.server.url, x, Path(ident["key"]), Path(ident["certificate"]))
    as_x = {"authorization": f"Bearer {x_client.token()}"}
    x_client.close()
    proxy.on(rf"/tuf/director/{y}/.*", served_from(rf"^/tuf/director/{y}/", f"/tuf/director/{x}/", as_x))
    with agent.load(rate=20) as load:
        event = net.wait_event(y, "update.refused", reason="other_device", target="digits-2.0.0.efb")
        assert x in event["detail"], event
        assert agent.served_version() == "1.0.0"
    assert_served_only(load, "1.0.0")
    assert not proxy.exchanges(r"/tuf/image/targets/.*"), "Y downloaded X's bundle"
    st = status(agent)
    assert st["last_failure"]["reason"] == "other_device", st
    assert st["refused"]["path:digits-2.0.0.efb"]["reason"] == "other_device", st
    assert st["running"] == {} and st["update"] is None, st
    assert not [e for e in net.events(y) if e["kind"] == "update.started"]


# -------------------------------------------------------------------------- 7: foreign downloads


def test_a_device_cannot_download_a_target_it_is_not_assigned(
    net: Fleet, update_models: dict[str, Path], tmp_path: Path
) -> None:
    """With its own key, token and certificate (the agent's DeviceClient), a device asks the server
    directly for bundles assigned to another device, or to nobody: 403 every time, before the server says
    whether such a bundle exists. Its own assignment downloads."""
    v1, v2 = update_models["good"], update_models["good2"]
    secret = models.bundle("good", "1.0.0", tmp_path / "secret", name="secret")
    net.push(secret)
    x, y = net.enroll(tmp_path / "x"), net.enroll(tmp_path / "y")
    net.assign(x, "secret", "1.0.0")
    net.assign(y, "digits", "1.0.0")
    ident = json.loads(identity_path(tmp_path / "y").read_bytes())
    client = DeviceClient(net.server.url, y, Path(ident["key"]), Path(ident["certificate"]))
    try:
        s_secret, s1, s2 = sha256(secret), sha256(v1), sha256(v2)
        for path in (f"/tuf/image/targets/{s_secret}.secret-1.0.0.efb",  # X's
                     f"/api/v1/blobs/{s_secret}",
                     "/api/v1/models/secret/1.0.0/bundle",
                     f"/tuf/image/targets/{s2}.digits-2.0.0.efb",  # signed, assigned to nobody
                     f"/api/v1/blobs/{s2}",
                     f"/tuf/image/targets/{s_secret}.digits-1.0.0.efb",  # its own target's name, X's bytes
                     f"/tuf/image/targets/{'0' * 64}.secret-9.9.9.efb"):  # nothing at all: no oracle
            with pytest.raises(Refused) as refused:
                client.request("GET", path)
            assert refused.value.reason == "http_403", (path, refused.value)
        got = client.download(f"/tuf/image/targets/{s1}.digits-1.0.0.efb", tmp_path / "own.part",
                              v1.stat().st_size)
        assert got == v1.stat().st_size and (tmp_path / "own.part").read_bytes() == v1.read_bytes()
        assert client.request("GET", f"/api/v1/blobs/{s1}").data == v1.read_bytes()
    finally:
        client.close()


# ------------------------------------------------------------------------------------- 6: freeze


class Clock:
    """A libfaketime clock offset (whole days) in ``path``, which every process started with
    :meth:`env` reads back within a second; the monotonic clock is left alone (timeouts, probation).
    Caveat of libfaketime 0.9.10 with a real monotonic clock: ``time.sleep`` fails there with EINVAL
    (an absolute ``clock_nanosleep``); ``server run`` and ``agent run`` never call it (threads wait on
    events, asyncio on its selector), which is what these tests rely on."""

    def __init__(self, path: Path, days: int = 0) -> None:
        self.path, self.days = path, 0
        self.set(days)

    def set(self, days: int) -> None:
        atomic_write_bytes(self.path, f"+{days}d\n".encode(), mode=0o644)
        self.days = days

    def advance(self, days: int) -> None:
        self.set(self.days + days)

    def env(self) -> dict[str, str]:
        assert LIBFAKETIME is not None
        return {"LD_PRELOAD": LIBFAKETIME, "FAKETIME_TIMESTAMP_FILE": str(self.path),
                "FAKETIME_CACHE_DURATION": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


@pytest.fixture(scope="module")
def clocked(tmp_path_factory: pytest.TempPathFactory, update_models: dict[str, Path]) -> Iterator[tuple[Fleet, Clock]]:
    """A second server whose clock the test moves (libfaketime), with ``digits`` 1.0.0 signed."""
    if LIBFAKETIME is None:
        why = "libfaketime is not installed (apt-get install faketime): the freeze tests move clocks"
        if os.environ.get("CI") == "true":
            pytest.fail(why + " (.ci/run installs it)")
        pytest.skip(why)
    root = tmp_path_factory.mktemp("clocked")
    clock = Clock(root / "server-clock")
    fleet = Fleet(root / "fleet", server_env=clock.env())
    try:
        fleet.start()
        fleet.push(update_models["good"])
        yield fleet, clock
    finally:
        fleet.close()


def advance_world(fleet: Fleet, server: Clock, agent: Clock, device_id: str, days: int) -> None:
    """Move the server's clock ``days`` ahead, wait until it re-signed the image and the device's
    director timestamps (valid at the new time), then move the agent's clock: the agent never sees the
    server's own metadata expired, only a replay."""
    server.advance(days)
    later = datetime.now(UTC) + timedelta(days=server.days)
    for path in ("/tuf/image/timestamp.json", f"/tuf/director/{device_id}/timestamp.json"):
        def resigned(p: str = path) -> bool:
            return expires(fleet, p) > later

        fleet.wait_for(resigned, 30, f"the server re-signing {path} at +{server.days} d")
    agent.set(server.days)


def test_a_frozen_director_timestamp_is_refused_once_it_expires(
    clocked: tuple[Fleet, Clock], behind: AgentFactory, update_models: dict[str, Path], tmp_path: Path
) -> None:
    fleet, server_clock = clocked
    agent_clock = Clock(tmp_path / "agent-clock", server_clock.days)
    with Proxy(fleet.server.url) as proxy:
        agent = behind(fleet, proxy, update_models["good"], AGE, env=agent_clock.env())
        dev = agent.device_id
        assert dev is not None
        fleet.wait_for(lambda: refreshed(agent) and proxy.last(director_route(dev)), 60, "the first refresh")
        frozen = proxy.last(director_route(dev))
        assert frozen is not None
        with agent.load(rate=20) as load:
            proxy.on(director_route(dev), replay(frozen))
            advance_world(fleet, server_clock, agent_clock, dev, 2)  # past the timestamp's 1-day expiry
            event = fleet.wait_event(dev, "metadata.refused", reason="metadata_expired")
            assert "director metadata" in event["detail"], event
            st = status(agent)
            proxy.off(director_route(dev))  # the freeze ends: the server's fresh timestamp verifies
            fleet.wait_event(dev, "metadata.ok")
            assert agent.served_version() == "1.0.0"
        assert_served_only(load, "1.0.0")
    assert st["last_failure"]["reason"] == "metadata_expired", st
    assert st["trust"]["director"]["timestamp"]["version"] == signed(frozen)["version"], st


def test_a_freeze_is_detected_behind_a_proxy_that_answers_every_check_in_304(
    clocked: tuple[Fleet, Clock], behind: AgentFactory, update_models: dict[str, Path], tmp_path: Path
) -> None:
    """Check-ins always say "not modified": the agent refreshes anyway every ``max_metadata_age`` (2 s),
    so the frozen timestamp is found out all the same."""
    fleet, server_clock = clocked
    agent_clock = Clock(tmp_path / "agent-clock", server_clock.days)
    with Proxy(fleet.server.url) as proxy:
        agent = behind(fleet, proxy, update_models["good"], AGE, env=agent_clock.env(),
                       before=lambda dev: proxy.on(checkin_route(dev), not_modified()))
        dev = agent.device_id
        assert dev is not None
        ts = director_route(dev)
        # Three refreshes while every check-in said 304: the age alone makes the agent look.
        fleet.wait_for(lambda: len([x for x in proxy.exchanges(ts) if x.status == 200]) >= 3, 60,
                       "three metadata refreshes behind 304 check-ins")
        checkins = proxy.exchanges(checkin_route(dev))
        assert checkins and {x.status for x in checkins} == {304}, checkins
        frozen = proxy.last(ts)
        assert frozen is not None
        with agent.load(rate=20) as load:
            proxy.on(ts, replay(frozen))
            advance_world(fleet, server_clock, agent_clock, dev, 2)
            event = fleet.wait_event(dev, "metadata.refused", reason="metadata_expired")
            assert "director metadata" in event["detail"], event
            st = status(agent)
            assert agent.served_version() == "1.0.0"
        assert_served_only(load, "1.0.0")
        assert {x.status for x in proxy.exchanges(checkin_route(dev))} == {304}
    assert st["last_failure"]["reason"] == "metadata_expired", st
