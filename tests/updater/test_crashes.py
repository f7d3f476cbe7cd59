"""Power cuts, a full disk and cut downloads: the device always serves a complete model and gets there.

Everything is real: a server process, an enrolled ``edgefleet agent run`` process killed with SIGKILL
(what a power cut is to a process: nothing flushed, nothing closed; the page cache survives, as it does
for a process), a tmpfs that really fills up, and a loopback reverse proxy (:class:`CountingProxy`) in
front of the server that counts the bytes of every target it relays, and can pace or cut them.

* :func:`test_sigkill_at_random_instants_of_every_phase_never_serves_a_partial_model_and_converges`:
  60 kills at random instants chosen by phase (``pending.phase`` of ``update.json``: download, install,
  selftest, switch, probation, commit, and idle = check-in / TUF refresh), alternating the assignment
  between 1.0.0 and the ~5 MB ``big`` 5.0.0, while a load checks every answer against the reference
  output of the version that says it gave it.
* disk full: the state directory on a 3 MiB tmpfs that holds an installed 1.0.0 but not 5.0.0.
* resume: a download cut by the network, and an agent killed mid-download, each fetch only the bytes
  that are missing.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import http.client
import json
import os
import random
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from updater._fleet import Agent, Fleet, models
from updater._procs import tail

from edgefleet.agent.runtime import load_model
from edgefleet.bundle import read_manifest

MODEL = models.MODEL_NAME
# Latency is not what these tests judge (2 busy cores, restarts, a 5 MB model): a wide latency bound.
UPDATES: dict[str, Any] = {"checkin_interval": 0.5, "probation_inferences": 20, "probation_seconds": 1.0,
                           "max_latency_ratio": 1000, "latency_slack_ms": 1000}
INPUTS = 16  # held-out digits the loads cycle through (reference outputs computed for each)


# ================================================================================ checked answers


class References:
    """The output every version gives for each of the :data:`INPUTS` held-out digits, run here by
    onnxruntime from the very bundles the operator pushed."""

    def __init__(self, bundles: list[Path]) -> None:
        self.probs: dict[str, list[np.ndarray[Any, Any]]] = {}
        for path in bundles:
            m = load_model(path)
            self.probs[read_manifest(path).version] = [m.predict({"x": models.sample_input(i)})["probs"]
                                                       for i in range(INPUTS)]

    def check(self, i: int, answer: dict[str, Any]) -> str | None:
        """None when ``answer`` (an OIP response to input ``i``) is a probs vector of a known version
        equal to that version's reference; else what is wrong with it."""
        version = str(answer.get("model_version"))
        if version not in self.probs:
            return f"input {i}: answered by {version}, expected one of {sorted(self.probs)}"
        out = {o["name"]: o for o in answer.get("outputs", [])}.get("probs")
        if out is None or out.get("shape") != [1, 10] or len(out.get("data", ())) != 10:
            return f"input {i}: {version} answered no [1, 10] probs: {str(answer)[:300]}"
        got = np.asarray(out["data"], np.float32).reshape(1, 10)
        if not np.allclose(got, self.probs[version][i], atol=1e-4):
            return f"input {i}: {version} answered {got.round(4).tolist()}, its reference is " \
                   f"{self.probs[version][i].round(4).tolist()}"
        return None


def _request(i: int) -> dict[str, Any]:
    x = models.sample_input(i)
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 64], "data": x.ravel().tolist()}]}


class CheckedLoad:
    """Inferences at ``rate`` per second from a thread, through every restart; each answer is checked
    with :meth:`References.check`. Connection failures (the agent is down) are counted, not errors; an
    HTTP error or a wrong answer is recorded in :attr:`bad`."""

    def __init__(self, agent: Agent, refs: References, rate: float = 50.0) -> None:
        self.agent, self.refs, self.rate = agent, refs, rate
        self.answered: collections.Counter[str] = collections.Counter()
        self.down = 0
        self.bad: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="checked-load", daemon=True)

    def __enter__(self) -> CheckedLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def _run(self) -> None:
        started, i = time.monotonic(), 0
        with httpx.Client(timeout=30) as client:
            while not self._stop.wait(max(0.0, started + i / self.rate - time.monotonic())):
                k = i % INPUTS
                i += 1
                try:
                    r = client.post(f"{self.agent.url}/v2/models/{MODEL}/infer", json=_request(k))
                except httpx.HTTPError:
                    self.down += 1
                    continue
                if r.status_code != 200:
                    self.bad.append(f"input {k}: HTTP {r.status_code}: {r.text[:300]}")
                    continue
                problem = self.refs.check(k, r.json())
                if problem is None:
                    self.answered[str(r.json()["model_version"])] += 1
                else:
                    self.bad.append(problem)


def _probe(agent: Agent, refs: References) -> str:
    """One inference right after a start: it must be a complete model's right answer; its version."""
    answer = agent.infer(models.sample_input(3))
    problem = refs.check(3, answer)
    assert problem is None, problem
    return str(answer["model_version"])


# ================================================================================ the state on disk


def _state(state_dir: Path) -> dict[str, Any]:
    """``update.json``; an AssertionError if it does not parse as this agent's schema."""
    raw = (state_dir / "update.json").read_bytes()
    try:
        data: dict[str, Any] = json.loads(raw)
    except ValueError as e:
        raise AssertionError(f"update.json does not parse ({e}): {raw[:300]!r}") from e
    assert data.get("schema") == 1, data
    return data


def _phase(st: dict[str, Any]) -> str:
    return str(st["pending"]["phase"]) if st.get("pending") else "idle"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _installed(state_dir: Path) -> dict[str, str]:
    """Every version folder of ``models/digits/`` (dot-folders are installs cut before their rename,
    not versions): asserts each is complete (``target.json``, and a ``bundle.efb`` of its length and
    sha256); version -> sha256."""
    out: dict[str, str] = {}
    folder = state_dir / "models" / MODEL
    for d in sorted(folder.iterdir()) if folder.is_dir() else []:
        if d.name.startswith("."):
            continue
        target = json.loads((d / "target.json").read_bytes())
        bundle = d / "bundle.efb"
        assert bundle.stat().st_size == target["length"] and _sha256(bundle) == target["sha256"], d
        assert target["version"] == d.name, target
        out[d.name] = target["sha256"]
    return out


def _no_corrupt_state(state_dir: Path) -> None:
    aside = sorted(p.name for p in state_dir.glob("update.json.corrupt-*"))
    assert not aside, f"the agent found update.json unreadable and moved it aside: {aside}"


# ================================================================================ kills by phase

KILLS = 36  # 6 a required phase on average; a restart costs 0.3-1.1 s, each kill waits for its phase
MAX_KILLS = 72  # more, only while a required phase has fewer than MIN_HITS kills
MIN_HITS = 3  # kills each phase must get (the phases below)
ORDER = ("idle", "download", "install", "selftest", "switch", "probation", "commit")
REQUIRED = ("idle", "download", "install", "selftest", "switch", "probation")
# Seconds a kill waits, at most, after its phase shows in update.json: about that phase's length here
# (a 5 MB download on loopback, its copy and fsync, the model's load and golden run, 1 s of probation);
# shortened whenever a kill lands past its phase. "idle": after the assignment changed, during the
# check-in and the TUF refresh of both repositories.
DELAYS = {"idle": 0.6, "download": 0.03, "install": 0.02, "selftest": 0.03, "switch": 0.0, "probation": 1.0,
          "commit": 0.0}
POLL = 0.0005  # seconds between two reads of update.json while a phase is awaited (switch lasts ~1 ms)
PHASE_TIMEOUT = 20.0  # seconds a kill waits for its phase (a dozen updates) before it lands anywhere
CONVERGE_TIMEOUT = 60.0  # seconds the device may take to commit its assignment after the last kill


@dataclass
class Kill:
    aimed: str  # the phase the kill waited for
    landed: str  # the phase update.json showed after the kill
    assigned: str


def _wait_phase(agent: Agent, target: str, assigned: list[str], fleet: Fleet, pause: threading.Event) -> bool:
    """Return True as soon as update.json shows ``target``; whenever the device has converged on its
    assignment, switch the assignment to the other version (``assigned`` holds it; 1.0.0 <-> 5.0.0).
    For ``idle`` return right after such a switch (the check-in and refresh that follow). False when
    ``target`` did not show in PHASE_TIMEOUT (a phase of a millisecond missed update after update):
    the kill then lands wherever the agent is, and is recorded as such. Nothing is refused here: a
    refusal fails at once."""
    assert agent.device_id is not None
    deadline = time.monotonic() + PHASE_TIMEOUT
    while time.monotonic() < deadline:
        st = _state(agent.state_dir)
        assert not st["refused"], f"refused: {st['refused']}\n{tail(agent.log)}"
        phase = _phase(st)
        if phase == "idle" and st["current"].get(MODEL, {}).get("version") == assigned[0]:
            assigned[0] = "1.0.0" if assigned[0] == "5.0.0" else "5.0.0"
            fleet.assign(agent.device_id, MODEL, assigned[0])
            if target == "idle":
                return True
            continue
        if phase == target and target != "idle":
            return True
        pause.wait(POLL)
    return False


@contextlib.contextmanager
def _noted(note: str) -> Iterator[None]:
    """Add ``note`` (the seed, the kill) to an AssertionError raised inside."""
    try:
        yield
    except AssertionError as e:
        e.add_note(note)
        raise


def _choose(rng: random.Random, hits: collections.Counter[str], now: str) -> str:
    """The next phase to kill in: first the required ones still short of MIN_HITS (those reachable in
    the update under way first: after a restart it resumes at ``now``), then any phase at random."""
    short = [p for p in REQUIRED if hits[p] < MIN_HITS]
    if not short:
        return rng.choice(ORDER)
    reachable = [p for p in short if ORDER.index(p) > ORDER.index(now) or (p == now and p != "idle")]
    pool = reachable or short
    least = min(hits[p] for p in pool)
    return rng.choice([p for p in pool if hits[p] == least])


def test_sigkill_at_random_instants_of_every_phase_never_serves_a_partial_model_and_converges(
    fleet: Fleet, update_models: dict[str, Path]
) -> None:
    v1, big = update_models["good"], update_models["big"]
    fleet.push(v1)
    fleet.push(big)
    refs = References([v1, big])
    assert any(not np.allclose(refs.probs["1.0.0"][i], refs.probs["5.0.0"][i], atol=1e-3) for i in range(INPUTS))
    seed = int(os.environ.get("CRASH_SEED") or random.SystemRandom().randrange(1 << 32))
    rng = random.Random(seed)
    agent = fleet.agent(v1, updates={**UPDATES, "max_probation_restarts": 100})
    assert agent.device_id is not None
    delays = dict(DELAYS)
    hits: collections.Counter[str] = collections.Counter()
    kills: list[Kill] = []
    pause = threading.Event()  # never set: a wait that is not a bare sleep
    assigned = ["5.0.0"]
    fleet.assign(agent.device_id, MODEL, "5.0.0")
    restarts: list[float] = []
    with CheckedLoad(agent, refs) as load:
        now = "idle"
        while len(kills) < KILLS or (len(kills) < MAX_KILLS and any(hits[p] < MIN_HITS for p in REQUIRED)):
            aimed = _choose(rng, hits, now)
            with _noted(f"seed {seed} (CRASH_SEED), kill {len(kills) + 1} aimed at {aimed}"):
                _wait_phase(agent, aimed, assigned, fleet, pause)
                pause.wait(rng.uniform(0, delays[aimed]))
                agent.kill()
                landed = _phase(_state(agent.state_dir))  # it parses, whatever the instant
                kills.append(Kill(aimed, landed, assigned[0]))
                hits[landed] += 1
                if landed != aimed:
                    delays[aimed] *= 0.7  # past its phase: aim earlier next time
                _no_corrupt_state(agent.state_dir)
                _installed(agent.state_dir)  # every version folder is complete, at every instant
                t = time.monotonic()
                agent.start()
                restarts.append(time.monotonic() - t)
                assert _probe(agent, refs) in ("1.0.0", "5.0.0")
                now = _phase(_state(agent.state_dir))
        # The last kill was the last: the device converges on its assignment.
        fleet.wait_for(lambda: _phase(_state(agent.state_dir)) == "idle"
                       and _state(agent.state_dir)["current"].get(MODEL, {}).get("version") == assigned[0],
                       CONVERGE_TIMEOUT, f"the device to commit {assigned[0]} after the last kill")
        fleet.wait_event(agent.device_id, "update.committed", version=assigned[0])
    summary = (f"seed {seed}; kills by phase {dict(hits)}; aimed/landed "
               f"{collections.Counter((k.aimed, k.landed) for k in kills)}; restarts took "
               f"{min(restarts):.2f}-{max(restarts):.2f} s; answers {dict(load.answered)}, down {load.down}")
    print(summary)
    assert not load.bad, f"{load.bad[:5]} ({len(load.bad)} bad answers; {summary})"
    assert all(hits[p] >= MIN_HITS for p in REQUIRED), summary
    assert set(load.answered) == {"1.0.0", "5.0.0"}, summary
    assert agent.served_version() == assigned[0]
    installed = _installed(agent.state_dir)
    assert assigned[0] in installed and len(installed) <= 2, installed  # the current one and the previous
    leftovers = [p.name for p in (agent.state_dir / "models" / MODEL).iterdir() if p.name.startswith(".")]
    assert not leftovers, f"cut installs left behind: {leftovers}"
    staging = agent.state_dir / "staging"
    assert not staging.is_dir() or not list(staging.iterdir()), list(staging.iterdir())
    events = fleet.events(agent.device_id)
    kinds = collections.Counter(e["kind"] for e in events)
    assert not kinds["update.refused"] and not kinds["update.rolled_back"], (kinds, summary)
    commits = [e for e in events if e["kind"] == "update.committed"]
    assert len(commits) >= 3 and commits[-1]["version"] == assigned[0], (commits, summary)  # it alternated
    assert fleet.device(agent.device_id)["update"]["state"] == "idle"


# ================================================================================ a full disk


@pytest.fixture
def small_state(fleet: Fleet) -> Iterator[Path]:
    """``devices/small/state`` of the fleet on a 3 MiB tmpfs (needs root; skipped when it cannot be
    mounted, failed under CI=true). Its agents are killed before it is unmounted."""
    state = fleet.root / "devices" / "small" / "state"
    state.mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m,mode=0700", "tmpfs", str(state)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        reason = f"cannot mount a 3 MiB tmpfs: {(r.stderr or r.stdout).strip() or r.returncode}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield state
    finally:
        for agent in fleet.agents:
            with contextlib.suppress(Exception):
                agent.close()
        subprocess.run(["umount", str(state)], check=False, capture_output=True)
        if os.path.ismount(state):
            subprocess.run(["umount", "-l", str(state)], check=False)


def test_a_download_that_fills_the_disk_is_retried_then_given_up_while_the_old_model_serves_and_updates_go_on(
    fleet: Fleet, update_models: dict[str, Path], small_state: Path
) -> None:
    v1, v2, big = update_models["good"], update_models["good2"], update_models["big"]
    for b in (v1, v2, big):
        fleet.push(b)
    attempts = 3
    agent = fleet.agent(v1, name="small", updates={**UPDATES, "max_attempts": attempts, "backoff_max": 0.5})
    device = agent.device_id
    assert device is not None and agent.state_dir == small_state
    refs = References([v1, v2, big])
    with CheckedLoad(agent, refs) as load:
        fleet.assign(device, MODEL, "1.0.0")  # installed on the small disk: it fits
        fleet.wait_event(device, "update.committed", version="1.0.0")
        fleet.assign(device, MODEL, "5.0.0")
        retry = fleet.wait_event(device, "update.retry", version="5.0.0", reason="disk_full")
        assert str(small_state / "staging") in retry["detail"] and "No space left" in retry["detail"], retry
        given_up = fleet.wait_event(device, "update.refused", version="5.0.0", reason="disk_full")
        assert f"gave up after {attempts} attempts" in given_up["detail"], given_up
        events = fleet.events(device)
        retries = [e for e in events if e["kind"] == "update.retry" and e.get("version") == "5.0.0"]
        assert len(retries) == attempts - 1 and all(e["reason"] == "disk_full" for e in retries), retries
        assert fleet.device(device)["update"]["last_failure"]["reason"] == "disk_full"
        # What the agent decided is on its disk (not only in memory), and it gave the space back.
        st = _state(small_state)
        assert st["pending"] is None, st["pending"]
        assert [r["reason"] for r in st["refused"].values()] == ["disk_full"], st["refused"]
        assert not list((small_state / "staging").iterdir()), list((small_state / "staging").iterdir())
        assert agent.served_version() == "1.0.0"
        agent.kill()  # and a power cut now changes nothing: 1.0.0 again, no new attempt
        agent.start()
        assert _probe(agent, refs) == "1.0.0" and _state(small_state)["pending"] is None
        assert set(load.answered) == {"1.0.0"}, load.answered  # the old model served all along
        # Space is freed (the tmpfs grows): a new assignment installs, and 5.0.0, assigned again, too.
        subprocess.run(["mount", "-o", "remount,size=32m", str(small_state)], check=True)
        fleet.assign(device, MODEL, "2.0.0")
        fleet.wait_event(device, "update.committed", version="2.0.0")
        fleet.assign(device, MODEL, "5.0.0")
        fleet.wait_event(device, "update.committed", version="5.0.0")
    assert not load.bad, load.bad[:5]
    assert agent.served_version() == "5.0.0"
    assert set(_installed(small_state)) == {"2.0.0", "5.0.0"}


# ================================================================================ resumed downloads


@dataclass(frozen=True)
class Transfer:
    """One target download relayed by the proxy: the request's Range header, the status, the body's
    Content-Length, and the body bytes written to the device's socket."""

    range: str | None
    status: int
    length: int
    sent: int


_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "host",
        "content-length"}
_PIECE = 64 * 1024


class CountingProxy:
    """A reverse proxy on loopback in front of the fleet server, for devices enrolled through it.
    Everything is relayed as is (one request per connection); for target files
    (``/tuf/image/targets/...``) it records a :class:`Transfer`, and can pace them (``rate`` bytes per
    second) or cut the first one after ``cut_after`` bytes (a clean close: every byte written arrives)."""

    def __init__(self, upstream: str, rate: float | None = None, cut_after: int | None = None) -> None:
        u = urlsplit(upstream)
        self.upstream = (u.hostname or "127.0.0.1", u.port or 80)
        self.rate, self.cut_after = rate, cut_after
        self.transfers: list[Transfer] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                proxy._relay(self)

            do_POST = do_PUT = do_DELETE = do_HEAD = do_GET

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="proxy", daemon=True)

    def __enter__(self) -> CountingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def targets(self) -> list[Transfer]:
        with self._lock:
            return list(self.transfers)

    def _relay(self, h: BaseHTTPRequestHandler) -> None:
        assert "chunked" not in (h.headers.get("Transfer-Encoding") or ""), "chunked request bodies are not relayed"
        n = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(n) if n else None
        headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP}
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            conn.request(h.command, h.path, body=body, headers=headers)
            resp = conn.getresponse()
            h.close_connection = True
            h.send_response_only(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in _HOP:
                    h.send_header(k, v)
            declared = resp.getheader("Content-Length")
            whole = None if declared is not None or h.command == "HEAD" else resp.read()
            length = len(whole) if whole is not None else int(declared or 0)
            h.send_header("Content-Length", str(length))
            h.send_header("Connection", "close")
            h.end_headers()
            if h.command == "HEAD":
                return
            if whole is not None:
                h.wfile.write(whole)
                return
            if h.path.startswith("/tuf/image/targets/"):
                self._relay_target(h, resp, length)
            else:
                while chunk := resp.read(_PIECE):
                    h.wfile.write(chunk)
        finally:
            conn.close()

    def _relay_target(self, h: BaseHTTPRequestHandler, resp: http.client.HTTPResponse, length: int) -> None:
        with self._lock:
            limit, self.cut_after = self.cut_after, None  # only the first target is cut
        sent, started = 0, time.monotonic()
        try:
            while limit is None or sent < limit:
                chunk = resp.read(_PIECE if limit is None else min(_PIECE, limit - sent))
                if not chunk:
                    break
                h.wfile.write(chunk)
                sent += len(chunk)
                if self.rate:
                    ahead = started + sent / self.rate - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)  # pacing the relay, not waiting for anything
        except OSError:
            pass  # the device went away (killed): what was written so far is what it was sent
        finally:
            with self._lock:
                self.transfers.append(Transfer(h.headers.get("Range"), resp.status, length, sent))


def _agent_behind(fleet: Fleet, proxy: CountingProxy, model: Path, name: str) -> Agent:
    """A device enrolled with the proxy's URL as its server (pinned image root), its agent started."""
    folder = fleet.root / "devices" / name
    state = folder / "state"
    token = fleet.cli("device", "enroll-token", "--keys", fleet.keys)["token"]
    out = fleet.cli("agent", "enroll", "--server", proxy.url, "--token", token, "--state-dir", state, "--allow-http")
    agent = Agent(folder, state, model, updates=UPDATES, device_id=str(out["device_id"]))
    fleet.agents.append(agent)
    return agent.start()


def _download_ok(fleet: Fleet, device: str, version: str) -> str:
    ok = [e for e in fleet.events(device) if e["kind"] == "download.ok" and e.get("version") == version]
    assert len(ok) == 1, ok
    return str(ok[0]["detail"])


def test_a_download_cut_by_the_network_resumes_with_range_where_it_stopped_and_no_byte_is_sent_twice(
    fleet: Fleet, update_models: dict[str, Path]
) -> None:
    v1, big = update_models["good"], update_models["big"]
    fleet.push(v1)
    fleet.push(big)
    length = big.stat().st_size
    cut = length * 2 // 5
    with CountingProxy(fleet.server.url, cut_after=cut) as proxy:
        agent = _agent_behind(fleet, proxy, v1, "cut")
        assert agent.device_id is not None
        with agent.load(rate=50):  # probation's 20 calls
            fleet.assign(agent.device_id, MODEL, "5.0.0")
            fleet.wait_event(agent.device_id, "update.committed", version="5.0.0")
        retry = fleet.wait_event(agent.device_id, "update.retry", version="5.0.0", reason="network")
        assert f"cut after {cut} of {length} bytes" in retry["detail"], retry
        assert proxy.targets() == [Transfer(None, 200, length, cut), Transfer(f"bytes={cut}-", 206, length - cut,
                                                                              length - cut)]
        assert sum(t.sent for t in proxy.targets()) == length  # no byte twice
        assert _download_ok(fleet, agent.device_id, "5.0.0") == f"{length - cut} bytes received, resumed at {cut}"
        assert agent.served_version() == "5.0.0"


def test_an_agent_killed_mid_download_resumes_from_the_bytes_on_its_disk(
    fleet: Fleet, update_models: dict[str, Path]
) -> None:
    v1, big = update_models["good"], update_models["big"]
    fleet.push(v1)
    fleet.push(big)
    length = big.stat().st_size
    sha = hashlib.sha256(big.read_bytes()).hexdigest()
    with CountingProxy(fleet.server.url, rate=2e6) as proxy:  # ~2.5 s for the 5 MB target
        agent = _agent_behind(fleet, proxy, v1, "killed")
        assert agent.device_id is not None
        part = agent.state_dir / "staging" / f"{sha}.part"
        fleet.assign(agent.device_id, MODEL, "5.0.0")
        fleet.wait_for(lambda: part.is_file() and length // 5 <= part.stat().st_size <= length * 3 // 5, 60,
                       "a fifth to three fifths of the download on disk")
        agent.kill()
        kept = part.stat().st_size
        assert 0 < kept < length and _phase(_state(agent.state_dir)) == "download"
        assert part.read_bytes() == big.read_bytes()[:kept]  # what is on disk is the target's beginning
        agent.start()
        with agent.load(rate=50):
            fleet.wait_event(agent.device_id, "update.committed", version="5.0.0")
        first, second = proxy.targets()
        assert (first.range, first.status, second.range, second.status) == (None, 200, f"bytes={kept}-", 206)
        # The first run was sent what it kept plus what was in flight when it died; the second run is
        # sent exactly what was missing, so the device received the target's bytes once.
        assert first.sent >= kept and second.sent == second.length == length - kept, (first, second, kept)
        assert _download_ok(fleet, agent.device_id, "5.0.0") == f"{length - kept} bytes received, resumed at {kept}"
        assert agent.served_version() == "5.0.0"
