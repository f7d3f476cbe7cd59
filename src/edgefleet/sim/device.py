"""One virtual device: the real agent's enrollment, HTTP client and update machine, with a host whose
"models" follow the cost model (:mod:`.behaviour`) instead of running.

- :func:`enroll` is ``edgefleet agent enroll`` itself (:func:`edgefleet.cli.agent.enroll`, called as a
  function): the device's own key, the CSR, ``/api/v1/enroll``, the pinned image root checked, the
  identity files and ``tuf/`` seeded.
- :class:`SimDeviceClient` is the agent's :class:`~edgefleet.agent.updater.client.DeviceClient` on a
  ``urllib3.PoolManager`` shared by every device (it counts the events its reports delivered).
- :class:`SimMachine` is the agent's :class:`~edgefleet.agent.updater.machine.UpdateMachine` with one
  seam: the self-test. The real one runs the bundle's golden vectors and pipeline through a runtime;
  here it is :meth:`SimHost.selftest` (the cost model's deterministic ``fail`` fraction), raised as the
  same ``Refused(..., "selftest_failed")``. Download, length and sha256 checks, install, switch,
  probation (on the simulated calls' :class:`~edgefleet.agent.runtime.Watch`), commit, rollback,
  refusals and the HTTP reports are the machine's own.
- :class:`SimHost` implements the machine's ``Host`` protocol (and ``set_shadow`` / ``clear_shadow``):
  ``load`` reads the installed bundle's manifest (a real file, a real manifest) and returns a
  :class:`SimModel`.
- :class:`SimDevice` ties them together and simulates the traffic lazily: every time the scheduler
  runs the device, the inferences since the last run are drawn (:meth:`SimDevice.advance`) into the
  agent's own :class:`~edgefleet.agent.telemetry.measure.TelemetryRegistry`, the served model's
  ``Watch`` (probation) and the shadow counters; :meth:`SimDevice.telemetry` is the telemetry message.

A device holds no thread and no socket of its own. Its machine is run by one scheduler job at a time;
the traffic and the telemetry message (:meth:`SimDevice.advance`, :meth:`SimDevice.telemetry`) are
also called by the fleet's telemetry thread, under ``SimDevice.lock``. A step swapping models while
the telemetry thread reads them is the race the agent has between its inference threads and its
updater (benign: a ``Watch`` may lose a sample).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import secrets
import threading
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import urllib3

from edgefleet import __version__
from edgefleet.agent.config import UpdatesConfig, identity_path
from edgefleet.agent.runtime import Watch
from edgefleet.agent.telemetry.measure import LatencyHistogram, ModelStats, TelemetryRegistry
from edgefleet.agent.telemetry.queue import device_topic, rfc3339
from edgefleet.agent.updater import install as inst_mod
from edgefleet.agent.updater.client import DeviceClient
from edgefleet.agent.updater.errors import Refused
from edgefleet.agent.updater.machine import UpdateMachine
from edgefleet.errors import ConfigError, EdgefleetError
from edgefleet.sim.behaviour import Behaviour

__all__ = ["SimDevice", "SimDeviceClient", "SimHost", "SimMachine", "SimModel", "enroll", "read_identity"]

log = logging.getLogger(__name__)

WATCH_WINDOW = 64  # latencies a model's Watch keeps (the agent's 512 would be ~16 kB a device)
WATCH_SAMPLES = 16  # latencies of one batch recorded into the Watch (the rest only counted)
ACCURACY_WINDOW = 100  # labelled predictions in the live accuracy window (the agent's: 1000)


# enrollment ---------------------------------------------------------------------------------------


def enroll(state_dir: Path, server: str, token: str, image_root: Path | None = None, ca: Path | None = None) -> None:
    """``edgefleet agent enroll --server SERVER --token TOKEN --state-dir STATE_DIR [--image-root FILE]``
    (plain http allowed for an http:// server: a loopback test server). Its one line of output is
    dropped by the caller (:class:`~.fleet.SimFleet` redirects stdout around the enrollment phase)."""
    from edgefleet.cli.agent import enroll as agent_enroll

    agent_enroll(server=server, token=token, image_root=image_root, config=None, state_dir=state_dir, ca=ca,
                 allow_http=server.startswith("http://"), force=False, as_json=False)


def read_identity(state_dir: Path) -> dict[str, Any]:
    """The ``identity.json`` enrollment wrote. Raises ConfigError when the device is not enrolled."""
    path = identity_path(state_dir)
    try:
        ident: dict[str, Any] = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not an enrolled device ({e})") from e
    return ident


@contextlib.contextmanager
def quiet_stdout() -> Any:
    """stdout dropped (what ``agent enroll`` prints, once per device) for the whole block: one
    redirect around all the parallel enrollments, never one per thread."""
    with contextlib.redirect_stdout(io.StringIO()) as sink:
        yield sink


# the agent's pieces ---------------------------------------------------------------------------------


class SimDeviceClient(DeviceClient):
    """The agent's client on a shared connection pool; counts the events delivered by reports."""

    def __init__(self, *args: Any, pool: urllib3.PoolManager | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        if pool is not None:
            self._pool.clear()
            self._pool = pool
        self._shared = pool is not None
        self.events_sent = 0
        self.reports = 0

    def report(self, body: dict[str, Any]) -> None:
        super().report(body)
        self.reports += 1
        self.events_sent += len(body.get("events") or ())

    def close(self) -> None:
        if not self._shared:
            super().close()


class _Manifest:
    """What the machine reads of a served model's manifest (``.version``), without keeping the whole."""

    __slots__ = ("name", "version")

    def __init__(self, name: str, version: str) -> None:
        self.name, self.version = name, version


class SimModel:
    """A loaded bundle as the machine sees a model: ``watch`` (probation), ``cost``, ``manifest``."""

    __slots__ = ("_watch", "cost", "manifest", "name", "source", "telemetry", "version")

    def __init__(self, name: str, version: str, source: str, cost: float) -> None:
        self.name, self.version, self.source, self.cost = name, version, source, cost
        self.manifest = _Manifest(name, version)
        self._watch: Watch | None = None
        self.telemetry: ModelStats | None = None

    @property
    def watch(self) -> Watch | None:
        return self._watch

    @watch.setter
    def watch(self, value: Watch | None) -> None:
        self._watch = None if value is None else Watch(WATCH_WINDOW)  # the machine's Watch(), smaller

    def __repr__(self) -> str:
        return f"<SimModel {self.name} {self.version}>"


class SimHost:
    """The machine's ``Host``: what the device serves (and runs in shadow), as :class:`SimModel` objects."""

    def __init__(self, device_id: str, behaviour: Behaviour, registry: TelemetryRegistry) -> None:
        self.device_id = device_id
        self.behaviour = behaviour
        self.registry = registry
        self.serving: dict[str, SimModel] = {}
        self.shadows: dict[str, SimModel] = {}

    def load(self, path: Path) -> SimModel:
        from edgefleet.bundle import read_manifest

        m = read_manifest(path)  # raises BundleError: the machine refuses the target
        return SimModel(m.name, m.version, str(path), self.behaviour.median_latency(m.version))

    def selftest(self, model: SimModel) -> None:
        """The simulated self-test: fails on the cost model's fraction of devices for this version."""
        if self.behaviour.selftest_fails(self.device_id, model.version):
            rate = self.behaviour.fail.get(model.version, 0.0)
            raise Refused(f"self-test: simulated failure of {model.name} {model.version} on this device "
                          f"(fail-rate {rate:g})", "selftest_failed")

    def swap(self, name: str, model: Any, version: str) -> SimModel | None:
        old = self.serving.get(name)
        model.version = version
        if model.watch is None:
            model.watch = Watch()
        stats = self.registry.get(name, version)
        if stats is None:
            stats = self.registry.track(ModelStats(name, version, accuracy_window=ACCURACY_WINDOW))
        else:
            self.registry.track(stats)  # served again (a rollback): keeps its accuracy window
        model.telemetry = stats
        self.serving[name] = model
        if old is not None and old.version != version:
            self.registry.retire(name, old.version)
        return old

    def served(self, name: str) -> SimModel | None:
        return self.serving.get(name)

    def running(self) -> dict[str, str]:
        return {name: m.version for name, m in self.serving.items()}

    def set_shadow(self, name: str, model: Any, version: str) -> None:
        model.version = version
        self.shadows[name] = model

    def clear_shadow(self, name: str) -> None:
        self.shadows.pop(name, None)


class SimMachine(UpdateMachine):
    """The agent's update machine; only the self-test is the simulator's (see the module docstring), and
    nothing is handed back to the system after an update: a simulated model holds no memory, and a full
    ``gc.collect()`` plus ``malloc_trim`` per update, in one process holding N devices (and, in a test,
    the whole test session's heap), cost O(N x heap): 12% of the sim's time with 200 devices."""

    def _release_memory(self) -> None:
        pass

    def _selftest(self, p: Any) -> Any:
        path = self.state_dir / "models" / p.name / p.version / inst_mod.BUNDLE
        host: Any = self.host  # a SimHost
        try:
            model = host.load(path)
            host.selftest(model)
        except Refused:
            raise
        except EdgefleetError as e:
            raise Refused(f"self-test: {e}", "selftest_failed") from e
        model.watch = Watch()
        return model


# the device ---------------------------------------------------------------------------------------


class SimDevice:
    """One enrolled virtual device (see the module docstring). Made by :meth:`open` from its state folder."""

    def __init__(self, index: int, state_dir: Path, ident: dict[str, Any], behaviour: Behaviour,
                 updates: UpdatesConfig, pool: urllib3.PoolManager | None, interval: float) -> None:
        self.index = index
        self.state_dir = state_dir
        self.device_id = str(ident["device_id"])
        self.server_url = str(ident["server_url"])
        self.behaviour = behaviour
        self.interval = interval
        self.registry = TelemetryRegistry(keep_retired=3, max_entries=8)
        self.host = SimHost(self.device_id, behaviour, self.registry)
        ca = Path(ident["ca_cert"]) if self.server_url.startswith("https") and ident.get("ca_cert") else None
        self.client = SimDeviceClient(self.server_url, self.device_id, Path(ident["key"]), Path(ident["certificate"]),
                                      ca, pool=pool)
        self.machine = SimMachine(state_dir, updates, self.client, cast(Any, self.host), self.device_id,
                                  self.server_url, agent_version=__version__)
        self.epoch = secrets.token_hex(8)
        self.seq = 0
        self.telemetry_sent = 0
        self.started = time.monotonic()
        self.lock = threading.Lock()  # advance() and telemetry(): the telemetry thread and a step's
        self.last_traffic = self.started
        self.next_step = 0.0
        self.next_telemetry = 0.0
        self._shadow: dict[str, list[float]] = {}  # served name -> [compared, agreed, skipped, abs_error_sum]
        self._shadow_version: dict[str, str] = {}
        for name, inst in self.machine.startup_models().items():  # what it committed in an earlier run
            try:
                model = self.host.load(state_dir / inst.path)
            except EdgefleetError as e:
                log.error("%s: installed %s %s does not load: %s", self.device_id, name, inst.version, e)
                continue
            self.host.swap(name, model, inst.version)

    @classmethod
    def open(cls, index: int, state_dir: Path, behaviour: Behaviour, updates: UpdatesConfig,
             pool: urllib3.PoolManager | None, interval: float) -> SimDevice:
        return cls(index, state_dir, read_identity(state_dir), behaviour, updates, pool, interval)

    # traffic ---------------------------------------------------------------------------------------

    def advance(self, now: float, rng: np.random.Generator) -> None:
        """Draw the inferences since the last call (monotonic ``now``) for every served model."""
        dt = now - self.last_traffic
        self.last_traffic = now
        if dt <= 0:
            return
        b = self.behaviour
        for name, model in list(self.host.serving.items()):
            n = b.calls(dt, rng)
            if not n:
                continue
            iv = b.serve(model.version, n, rng)
            stats = model.telemetry
            if stats is not None:
                h = LatencyHistogram()
                h.counts, h.sum_s = list(iv.counts), float(iv.latencies.sum())
                stats.inferences += iv.inferences
                stats.errors += iv.errors
                stats.latency.merge(h)
                for pred, true in iv.feedback:
                    stats.accuracy.record(pred, true)
            w = model.watch
            if w is not None:
                lat = iv.latencies
                for x in lat[:WATCH_SAMPLES].tolist():
                    w.record(x)
                w.calls += max(0, len(lat) - WATCH_SAMPLES) + iv.errors
                w.errors += iv.errors
            cand = self.host.shadows.get(name)
            if cand is not None:
                if self._shadow_version.get(name) != cand.version:
                    self._shadow_version[name] = cand.version
                    self._shadow[name] = [0, 0, 0, 0.0]
                f = b.shadow(cand.version, iv.inferences - iv.errors, dt, rng)
                acc = self._shadow[name]
                acc[0] += f.compared
                acc[1] += f.agreed
                acc[2] += f.skipped
                acc[3] += f.abs_error_sum

    # telemetry -------------------------------------------------------------------------------------

    def telemetry(self, wall: float) -> tuple[str, bytes]:
        """The next telemetry message (topic, payload) in the agent's wire format (schema 1, this
        run's epoch, the next seq), per-model figures from the registry, the ``shadow`` block of a
        served model with a candidate attached."""
        models = self.registry.snapshot()
        for entry in models:
            name = entry["name"]
            served = self.host.serving.get(name)
            cand = self.host.shadows.get(name)
            if served is None or served.version != entry["version"] or cand is None:
                continue
            acc = self._shadow.get(name) if self._shadow_version.get(name) == cand.version else None
            c, a, s, d = acc if acc is not None else (0, 0, 0, 0.0)
            entry["shadow"] = {"version": cand.version, "compared": int(c), "agreed": int(a), "skipped": int(s),
                               "abs_error_sum": round(float(d), 6)}
            self._shadow[name] = [0, 0, 0, 0.0]
        for name in [n for n in self._shadow if n not in self.host.shadows]:
            self._shadow.pop(name, None)
            self._shadow_version.pop(name, None)
        self.seq += 1
        uptime = time.monotonic() - self.started
        body = {
            "schema": 1, "device_id": self.device_id, "at": rfc3339(wall), "epoch": self.epoch, "seq": self.seq,
            "interval_s": self.interval, "models": models,
            "device": {"cpu_percent": round(3.0 + 2.0 * (self.index % 7), 1), "memory_rss_bytes": 48 << 20,
                       "memory_percent": 4.8, "temperature_c": None, "disk_free_bytes": 8 << 30,
                       "uptime_s": round(uptime, 3), "queue_depth": 0, "dropped": 0, "agent_version": __version__},
        }
        self.telemetry_sent += 1
        return device_topic(self.device_id, "telemetry"), json.dumps(body, separators=(",", ":")).encode()

    # view ------------------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Running and shadow versions, the update phase, events delivered, telemetry sent."""
        st = self.machine.st
        p = st.pending
        for _ in range(5):  # a step on another thread may change a dict while it is copied
            try:
                running = dict(self.host.running())
                shadow = {n: m.version for n, m in dict(self.host.shadows).items()}
                refused = {k: v.reason for k, v in dict(st.refused).items()}
                break
            except RuntimeError:
                continue
        else:
            running, shadow, refused = {}, {}, {}
        return {
            "index": self.index, "device_id": self.device_id, "running": running, "shadow": shadow,
            "phase": p.phase if p is not None else "idle", "target": p.target if p is not None else None,
            "events_sent": self.client.events_sent, "events_queued": len(st.outbox),
            "telemetry_sent": self.telemetry_sent, "refused": refused,
            "last_failure": (st.last_failure or {}).get("reason"),
        }

    def close(self) -> None:
        self.client.close()
