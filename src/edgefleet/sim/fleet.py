"""N virtual devices in one process, driven by a small worker pool from heap schedulers.

Updates: each device has one entry in a heap keyed by when its update machine next wants to run (the
seconds ``machine.step()`` returned: the agent's updater thread waits exactly that). A dispatcher
thread pops what is due and hands it to a pool of ``workers`` threads; a device's machine is never
run by two threads at once. One run (:meth:`SimFleet._tick`): draw the traffic since the device's
last run (what probation judges), then ``machine.step()``. A ``cmd`` from the server (over MQTT)
moves the device to the front, as the agent's ``wake()`` does. Pauses shorter than ``min_pause``
(the probation poll, 0.1 s) are stretched to it so thousands of devices in probation do not spin.

Telemetry: one thread with a second heap publishes each device's message every ``interval`` seconds
(:meth:`SimFleet._publish`), so a step waiting on a slow server never delays telemetry.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import urllib3

from edgefleet.agent.config import UpdatesConfig, identity_path
from edgefleet.errors import ConfigError
from edgefleet.sim.behaviour import Behaviour
from edgefleet.sim.device import SimDevice, enroll, quiet_stdout
from edgefleet.sim.telemetry import DeviceLinks, SharedLink, make_link

__all__ = ["SimFleet", "default_updates"]

log = logging.getLogger(__name__)


def default_updates(checkin: float) -> UpdatesConfig:
    """The simulated devices' ``[updates]``: check-ins every ``checkin`` seconds, a short probation
    (100 calls and 2 s; 30 s at most), the agent's defaults otherwise. Not fewer calls: the machine
    allows ``int(max_error_rate * max(calls, probation_inferences))`` errors, so with 50 calls or fewer
    a single runtime error (the cost model's base rate) rolls a good version back."""
    return UpdatesConfig(checkin_interval=checkin, probation_inferences=100, probation_seconds=2.0,
                         probation_max_seconds=30.0, backoff_max=30.0)


class SimFleet:
    """``devices`` virtual devices enrolled on ``server`` with ``enroll_token`` (pinned
    ``TOKEN.N.SHA256``, or give ``image_root``; it must allow ``devices`` uses unless the devices in
    ``state`` are enrolled already: a state folder is reused, device ``i`` in ``state/dev-i``).

    ``behaviour``: the cost model; ``broker``: ``mqtt://`` / ``mqtts://`` URL for telemetry and
    ``cmd`` (None: no telemetry); ``tags``: set on every device after enrollment (``PUT
    /api/v1/devices/{id}/tags``, which needs ``admin_token``), or a function of the device index;
    ``interval``: seconds between telemetry messages; ``checkin``: seconds between check-ins
    (``updates`` overrides the whole ``[updates]`` config); ``workers``: threads running devices
    (and enrolling them); ``seed``: the traffic's random seed. Use as a context manager, or
    :meth:`start` / :meth:`stop`."""

    def __init__(
        self,
        server: str,
        enroll_token: str | None,
        devices: int,
        *,
        behaviour: Behaviour | None = None,
        state: Path | None = None,
        image_root: Path | None = None,
        ca: Path | None = None,
        broker: str | None = None,
        tags: Sequence[str] | Callable[[int], Sequence[str]] = (),
        admin_token: str | None = None,
        interval: float = 5.0,
        checkin: float = 5.0,
        updates: UpdatesConfig | None = None,
        workers: int = 8,
        mqtt_connections: int = 4,
        min_pause: float = 0.25,
        seed: int | None = None,
    ) -> None:
        if devices < 1:
            raise ConfigError(f"--devices: {devices}; expected at least 1")
        if workers < 1:
            raise ConfigError(f"--workers: {workers}; expected at least 1")
        if not interval > 0 or not checkin > 0:
            raise ConfigError("--interval and --checkin: expected seconds above 0")
        if tags and not admin_token and not callable(tags):
            raise ConfigError("--tags: setting tags needs an operator token (EDGEFLEET_TOKEN or --admin-token)")
        self.server = server.rstrip("/")
        self.enroll_token = enroll_token
        self.n = devices
        self.behaviour = behaviour or Behaviour()
        self._own_state = state is None
        self.state = Path(tempfile.mkdtemp(prefix="efsim-")) if state is None else Path(state)
        self.image_root, self.ca = image_root, ca
        self.broker = broker
        self.tags = tags
        self.admin_token = admin_token
        self.interval = float(interval)
        self.updates = updates or default_updates(checkin)
        self.workers = workers
        self.mqtt_connections = mqtt_connections
        self.min_pause = min_pause
        self.devices: list[SimDevice] = []
        self.by_id: dict[str, SimDevice] = {}
        self.link: SharedLink | DeviceLinks | None = None
        self.pool = urllib3.PoolManager(num_pools=4, maxsize=max(4, workers), block=False, retries=False,
                                        timeout=urllib3.Timeout(connect=30.0, read=30.0), cert_reqs="CERT_REQUIRED",
                                        ca_certs=str(ca) if ca else None)
        self._seed = seed if seed is not None else random.SystemRandom().randrange(2**32)
        self._rngs = threading.local()
        self._rng_ids = itertools.count()
        self._heap: list[tuple[float, int, int, int]] = []  # (due, tiebreak, device index, token)
        self._tokens: list[int] = []
        self._running: list[bool] = []
        self._woken: list[bool] = []
        self._cond = threading.Condition()
        self._tiebreak = itertools.count()
        self._stop = threading.Event()
        self._executor: ThreadPoolExecutor | None = None
        self._dispatcher: threading.Thread | None = None
        self._telemetry: threading.Thread | None = None
        self._theap: list[tuple[float, int]] = []  # (due, device index): telemetry messages
        self.started_at: float | None = None
        self.steps = 0
        self.errors = 0

    # enrollment ----------------------------------------------------------------------------------

    def device_dir(self, i: int) -> Path:
        return self.state / f"dev-{i:05d}"

    def enroll(self) -> None:
        """Enroll every device not enrolled yet (in parallel over ``workers`` threads), set tags, and
        build the devices. Raises the first enrollment error."""
        if self.devices:
            return
        todo = [i for i in range(self.n) if not identity_path(self.device_dir(i)).is_file()]
        if todo and not self.enroll_token:
            raise ConfigError(f"--enroll-token: {len(todo)} devices under {self.state} are not enrolled")
        self.state.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        with quiet_stdout(), ThreadPoolExecutor(self.workers, thread_name_prefix="sim-enroll") as ex:
            assert self.enroll_token is not None or not todo
            list(ex.map(lambda i: enroll(self.device_dir(i), self.server, str(self.enroll_token), self.image_root,
                                         self.ca), todo))
            if todo:
                log.info("sim: enrolled %d devices in %.1f s", len(todo), time.monotonic() - t0)
            self.devices = list(ex.map(
                lambda i: SimDevice.open(i, self.device_dir(i), self.behaviour, self.updates, self.pool,
                                         self.interval), range(self.n)))
            self.by_id = {d.device_id: d for d in self.devices}
            if self.tags:
                list(ex.map(self._set_tags, self.devices))

    def _set_tags(self, d: SimDevice) -> None:
        import json

        tags = list(self.tags(d.index) if callable(self.tags) else self.tags)
        if not tags:
            return
        if not self.admin_token:
            raise ConfigError("--tags: setting tags needs an operator token (EDGEFLEET_TOKEN or --admin-token)")
        r = self.pool.request("PUT", f"{self.server}/api/v1/devices/{d.device_id}/tags",
                              body=json.dumps({"tags": tags}).encode(),
                              headers={"Authorization": f"Bearer {self.admin_token}",
                                       "Content-Type": "application/json"})
        if r.status != 200:
            raise ConfigError(f"--tags: PUT /api/v1/devices/{d.device_id}/tags: {r.status}: {r.data[:200]!r}")

    # running -------------------------------------------------------------------------------------

    def start(self) -> SimFleet:
        """Enroll (what is not yet), connect to the broker, start the scheduler."""
        self.enroll()
        if self.broker:
            self.link = make_link(self.broker, self.wake, self.mqtt_connections)
            for d in self.devices:
                self.link.add(d.device_id, d.state_dir / "identity")
        now = time.monotonic()
        self.started_at = now
        rnd = random.Random(self._seed)
        self._tokens = [0] * self.n
        self._running = [False] * self.n
        self._woken = [False] * self.n
        checkin = float(self.updates.checkin_interval or 60.0)
        for d in self.devices:
            d.last_traffic = now
            d.next_step = now + rnd.uniform(0, min(checkin, 2.0))  # spread the first check-ins
            d.next_telemetry = now + rnd.uniform(0.2, 1.0) * self.interval
            heapq.heappush(self._heap, (d.next_step, next(self._tiebreak), d.index, 0))
            self._theap.append((d.next_telemetry, d.index))
        heapq.heapify(self._theap)
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="sim-device")
        self._dispatcher = threading.Thread(target=self._dispatch, name="sim-dispatch", daemon=True)
        self._dispatcher.start()
        if self.link is not None:
            self._telemetry = threading.Thread(target=self._publish, name="sim-telemetry", daemon=True)
            self._telemetry.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the scheduler (runs in progress finish), close the broker links and the HTTP pool.
        A state folder the fleet made itself (no ``state`` given) is deleted."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for t in (self._dispatcher, self._telemetry):
            if t is not None:
                t.join(timeout)
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        if self.link is not None:
            self.link.close()
        for d in self.devices:
            d.close()
        self.pool.clear()
        if self._own_state:
            shutil.rmtree(self.state, ignore_errors=True)

    def __enter__(self) -> SimFleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wake(self, device_id: str) -> None:
        """Run the device's update machine now (a ``cmd`` from the server: check in now)."""
        d = self.by_id.get(device_id)
        if d is None or not self._tokens:
            return
        with self._cond:
            d.next_step = time.monotonic()
            if self._running[d.index]:
                self._woken[d.index] = True
                return
            self._tokens[d.index] += 1
            heapq.heappush(self._heap, (d.next_step, next(self._tiebreak), d.index, self._tokens[d.index]))
            self._cond.notify()

    def _dispatch(self) -> None:
        assert self._executor is not None
        while not self._stop.is_set():
            with self._cond:
                while not self._stop.is_set():
                    now = time.monotonic()
                    if self._heap and self._heap[0][0] <= now:
                        _, _, i, token = heapq.heappop(self._heap)
                        if token != self._tokens[i] or self._running[i]:
                            continue  # superseded by a wake
                        self._running[i] = True
                        break
                    self._cond.wait(min(1.0, self._heap[0][0] - now) if self._heap else 1.0)
                else:
                    return
            try:
                self._executor.submit(self._run, i)
            except RuntimeError:  # shut down
                return

    def _rng(self) -> np.random.Generator:
        g: np.random.Generator | None = getattr(self._rngs, "g", None)
        if g is None:
            g = self._rngs.g = np.random.default_rng([self._seed, next(self._rng_ids)])
        return g

    def _run(self, i: int) -> None:
        d = self.devices[i]
        try:
            due = self._tick(d)
        except Exception:  # a bug in one device must not stop the fleet
            log.exception("sim: device %s", d.device_id)
            self.errors += 1
            due = time.monotonic() + 1.0
        with self._cond:
            self._running[i] = False
            if self._woken[i]:
                self._woken[i] = False
                due = time.monotonic()
            self._tokens[i] += 1
            heapq.heappush(self._heap, (due, next(self._tiebreak), i, self._tokens[i]))
            self._cond.notify()

    def _tick(self, d: SimDevice) -> float:
        with d.lock:
            d.advance(time.monotonic(), self._rng())  # what probation judges
        if not self._stop.is_set():
            pause = d.machine.step()
            self.steps += 1
            if 0 < pause < self.min_pause:
                pause = self.min_pause
            d.next_step = time.monotonic() + max(0.0, pause)
        return d.next_step

    def _publish(self) -> None:
        """The telemetry thread: each device's message when due, whatever its machine is doing (a step
        waiting on the server never delays telemetry). Drawing the traffic and building the message
        take the device's lock; publishing does not."""
        link = self.link
        assert link is not None
        while not self._stop.is_set():
            now = time.monotonic()
            if not self._theap or self._theap[0][0] > now:
                self._stop.wait(min(0.5, self._theap[0][0] - now) if self._theap else 0.5)
                continue
            _, i = heapq.heappop(self._theap)
            d = self.devices[i]
            try:
                with d.lock:
                    d.advance(now, self._rng())
                    topic, payload = d.telemetry(time.time())
                link.publish(d.device_id, topic, payload)
            except Exception:
                log.exception("sim: telemetry of %s", d.device_id)
                self.errors += 1
            d.next_telemetry = max(d.next_telemetry + self.interval, now + self.interval / 2)
            heapq.heappush(self._theap, (d.next_telemetry, i))

    # views ---------------------------------------------------------------------------------------

    def snapshot(self) -> list[dict[str, Any]]:
        """Per device: ``device_id``, ``running`` ({model: version}), ``shadow`` ({model: version}),
        ``phase`` (the update machine's: idle, download, ..., probation), ``target``, ``events_sent``
        (delivered by reports), ``events_queued``, ``telemetry_sent``, ``refused`` ({sha256 or
        path: reason}), ``last_failure`` (a reason)."""
        return [d.snapshot() for d in self.devices]

    def summary(self, snap: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Counts over the fleet: versions served and in shadow, phases, refusals, events, telemetry."""
        snap = self.snapshot() if snap is None else snap
        running: Counter[str] = Counter()
        shadow: Counter[str] = Counter()
        for s in snap:
            running.update(f"{n} {v}" for n, v in s["running"].items())
            shadow.update(f"{n} {v}" for n, v in s["shadow"].items())
            if not s["running"]:
                running["(none)"] += 1
        return {
            "devices": len(snap),
            "elapsed_s": round(time.monotonic() - self.started_at, 1) if self.started_at else 0.0,
            "running": dict(sorted(running.items())),
            "shadow": dict(sorted(shadow.items())),
            "phases": dict(sorted(Counter(s["phase"] for s in snap).items())),
            "refusing": sum(1 for s in snap if s["refused"]),
            "events_sent": sum(s["events_sent"] for s in snap),
            "telemetry_sent": sum(s["telemetry_sent"] for s in snap),
            "mqtt": self.link.counters() if self.link is not None else None,
            "steps": self.steps,
            "errors": self.errors,
        }

    def wait(self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float, poll: float = 0.5) -> bool:
        """Poll ``predicate(snapshot)`` until it holds (True) or ``timeout`` seconds pass (False)."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate(self.snapshot()):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll)
