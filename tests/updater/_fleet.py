"""The end-to-end harness for the updater's tests: a real fleet server process, the operator's keyring
and CLI, enrolled devices, and real ``edgefleet agent run`` processes.

Everything is the real thing, run as a user would run it:

* :class:`FleetServer` - ``edgefleet server init`` then ``edgefleet server run`` (SQLite in its data
  folder, or ``db``), on a free loopback port, ready when it says ``READY=1`` (sd_notify) and
  ``/healthz`` answers; plain-http devices are allowed (loopback). Its output goes to ``server.log``.
* :class:`Fleet` - the server plus the operator: ``edgefleet keys init --keys DIR --server URL``,
  :meth:`Fleet.push` (upload, then sign the bundle into the image targets with the release key),
  :meth:`Fleet.sign`, :meth:`Fleet.withdraw`, :meth:`Fleet.image_targets`, :meth:`Fleet.assign`, :meth:`Fleet.enroll` (an enrollment token, then
  ``edgefleet agent enroll --allow-http``), :meth:`Fleet.agent`, and the server's view of a device.
  Operator commands run the CLI as a subprocess with ``EDGEFLEET_SERVER`` / ``EDGEFLEET_TOKEN`` (the
  admin token from ``server init``).
* :class:`Agent` - an ``agent.toml`` and ``edgefleet agent run --config`` in its own process group,
  ready when it prints ``ready:``; :meth:`Agent.infer` and :meth:`Agent.served_version` over the
  local Open Inference Protocol API; :meth:`Agent.kill` (SIGKILL), :meth:`Agent.stop` (SIGTERM),
  :meth:`Agent.restart`; output appended to ``agent.log`` across restarts (a ``=== start N ===`` line
  before each); :meth:`Agent.load` sends inferences from a thread and records every answer with the
  version that gave it, and every failure (an agent that is down is a sample with ``status`` None).
* :func:`wait_for` - poll a condition the processes do not signal; on timeout an AssertionError says
  what was awaited, the last value or exception, and the tails of the logs.

The operator's signing goes through the CLI where it exists (``--help`` is read once per session,
:func:`cli_has_option`): ``model push --keys``, ``model sign``, ``model withdraw``; on a checkout
without them the same targets are signed here with :class:`edgefleet.tufmeta.keyring.Keyring`.
Likewise ``device enroll-token --keys`` pins the image root and ``agent enroll --image-root`` takes
the root file (see :meth:`Fleet.enroll`).

Cleanup: :meth:`Fleet.close` (the ``fleet`` fixture calls it, pass or fail) stops load threads, kills
every agent's process group and stops the server; an ``atexit`` hook kills any process group still
alive should the test process itself end first.

The test models (one interface, several behaviours) come from ``tests/fixtures/make_update_models.py``
(re-exported as ``models``). Import everything from here (``from updater._fleet import Fleet, Agent``);
the code is split by concept: ``_procs.py`` (the CLI as a process, child processes and their logs,
:func:`wait_for`), ``_agent.py`` (:class:`Agent`, :class:`Load`), this file (server and operator).
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import httpx
from updater._agent import Agent, Load, Sample, models
from updater._procs import (
    CLI,
    START_TIMEOUT,
    STOP_TIMEOUT,
    ChildProcess,
    CliError,
    clean_env,
    cli_has_option,
    free_port,
    run_cli,
    tail,
    wait_for,
)

from edgefleet.bundle import read_manifest

__all__ = [
    "CLI",
    "Agent",
    "CliError",
    "Fleet",
    "FleetServer",
    "Load",
    "Sample",
    "cli_has_option",
    "free_port",
    "models",
    "run_cli",
    "running_fleet",
    "wait_for",
]


class FleetServer:
    """``edgefleet server run`` on ``root`` (data folder ``root/data``, log ``root/server.log``).
    ``env``: more ``EDGEFLEET_SERVER_*`` settings."""

    def __init__(self, root: Path, db: str | None = None, env: Mapping[str, str] | None = None) -> None:
        self.root = root
        self.data = root / "data"
        self.log = root / "server.log"
        self.db = db
        self.env = dict(env or {})
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_token = ""
        self._proc: ChildProcess | None = None

    def init(self) -> str:
        """``edgefleet server init``; returns (and keeps) the first admin token."""
        self.root.mkdir(parents=True, exist_ok=True)
        db = ["--db", self.db] if self.db else []
        out = json.loads(run_cli("server", "init", "--data", self.data, *db, "--json").stdout)
        self.admin_token = str(out["admin_token"])
        return self.admin_token

    @property
    def pid(self) -> int:
        assert self._proc is not None, "the server is not running"
        return self._proc.proc.pid

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.alive

    def start(self) -> None:
        """Start; returns once it sent READY=1 and ``/healthz`` answers 200. Raises AssertionError with
        the log's tail when it exits first or takes longer than START_TIMEOUT."""
        assert not self.alive, "the server is already running"
        folder = Path(tempfile.mkdtemp(prefix="ef-notify-"))  # a short path: AF_UNIX allows ~100 bytes
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            notify.bind(str(folder / "s"))
            notify.settimeout(0.5)  # to notice a server that exits before it is ready
            env = clean_env({"EDGEFLEET_SERVER_ALLOW_PLAIN_HTTP_DEVICES": "true",
                              "NOTIFY_SOCKET": str(folder / "s"), **self.env})
            db = ["--db", self.db] if self.db else []
            with self.log.open("ab") as f:
                f.write(b"=== server start ===\n")
            argv = [*CLI, "server", "run", "--data", str(self.data), *db, "--port", str(self.port)]
            self._proc = ChildProcess(argv, self.log, env, re.compile(r"(?!)"))  # readiness: READY=1 below
            deadline = time.monotonic() + START_TIMEOUT
            while True:
                try:
                    if b"READY=1" in notify.recv(4096):
                        break
                except TimeoutError:
                    if not self._proc.alive:
                        code = self._proc.reap(10)
                        raise AssertionError(f"server exited ({code}) before it was ready\n{tail(self.log)}") from None
                    if time.monotonic() > deadline:
                        self._proc.kill()
                        raise AssertionError(f"server not ready in {START_TIMEOUT:g} s\n{tail(self.log)}") from None
        finally:
            notify.close()
            shutil.rmtree(folder, ignore_errors=True)
        wait_for(lambda: httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200, START_TIMEOUT,
                 "the server's /healthz", [self.log])

    def kill(self) -> None:
        """SIGKILL (a crash: nothing is flushed or closed)."""
        if self._proc is not None:
            self._proc.kill()

    def stop(self) -> int | None:
        """SIGTERM and wait; returns the exit code (None when it was not running)."""
        if self._proc is None or not self._proc.alive:
            return None
        return self._proc.terminate(STOP_TIMEOUT)

    def restart(self) -> None:
        self.stop()
        self.start()


class Fleet:
    """A fleet server, the operator's keyring and CLI, and the agents made through it, under ``root``.
    Use :meth:`start` (or the ``fleet`` fixture), and :meth:`close` however the test ends."""

    def __init__(self, root: Path, db: str | None = None, server_env: Mapping[str, str] | None = None) -> None:
        self.root = root
        self.server = FleetServer(root / "server", db, server_env)
        self.keys = root / "keys"
        self.agents: list[Agent] = []
        self._http: httpx.Client | None = None

    def start(self) -> Fleet:
        """``server init``, ``server run``, then ``keys init --keys DIR --server URL`` (image root 1, empty
        targets 1, director root 1)."""
        self.server.init()
        self.server.start()
        self.cli("keys", "init", "--keys", self.keys, "--server", self.server.url)
        return self

    def close(self) -> None:
        """Stop every load, kill every agent, stop the server (killing it if it hangs)."""
        for agent in self.agents:
            with contextlib.suppress(Exception):
                agent.close()
        if self._http is not None:
            self._http.close()
        try:
            self.server.stop()
        finally:
            if self.server.alive:
                self.server.kill()

    def __enter__(self) -> Fleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def logs(self) -> list[Path]:
        return [self.server.log, *(a.log for a in self.agents)]

    def wait_for(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        """:func:`wait_for`, quoting the server's and every agent's log on timeout."""
        return wait_for(predicate, timeout, what, self.logs)

    # ------------------------------------------------------------------ operator

    @property
    def env(self) -> dict[str, str]:
        """What the operator's CLI reads: the server and the admin token (no user config file)."""
        return {"EDGEFLEET_SERVER": self.server.url, "EDGEFLEET_TOKEN": self.server.admin_token,
                "EDGEFLEET_CLI_CONFIG": str(self.root / "no-cli.toml")}

    def cli(self, *args: str | Path, check: bool = True) -> Any:
        """``edgefleet ARGS --json`` as the operator; its parsed output (None when empty)."""
        r = run_cli(*args, "--json", env=self.env, check=check)
        return json.loads(r.stdout) if r.stdout.strip() else None

    @property
    def http(self) -> httpx.Client:
        """An HTTP client on the server with the admin token."""
        if self._http is None:
            self._http = httpx.Client(base_url=self.server.url, timeout=30,
                                      headers={"Authorization": f"Bearer {self.server.admin_token}"})
        return self._http

    def push(self, bundle: Path, sign: bool = True) -> dict[str, Any]:
        """Upload ``bundle`` to the registry and (unless ``sign`` is false: uploaded, not installable)
        sign it into the image targets, target path ``NAME-VERSION.efb``. Returns the registry's answer."""
        if not sign:
            out: dict[str, Any] = self.cli("model", "push", bundle)
            return out
        if cli_has_option(("model", "push"), "--keys"):
            out = self.cli("model", "push", bundle, "--keys", self.keys)
            return out
        out = self.cli("model", "push", bundle)
        self.sign_targets(add=[bundle])
        return out

    def sign(self, bundle: Path) -> None:
        """List an uploaded bundle in the image targets (``model sign NAME VERSION --bundle FILE``)."""
        m = read_manifest(bundle)
        if cli_has_option(("model", "sign"), "--keys"):
            self.cli("model", "sign", m.name, m.version, "--bundle", bundle, "--keys", self.keys)
        else:
            self.sign_targets(add=[bundle])

    def withdraw(self, name: str, version: str) -> None:
        """Sign image targets without ``NAME-VERSION.efb`` (``model withdraw``): devices stop installing it."""
        if cli_has_option(("model", "withdraw"), "--keys"):
            self.cli("model", "withdraw", name, version, "--keys", self.keys)
        else:
            self.sign_targets(remove=[f"{name}-{version}.efb"])

    def image_targets(self) -> dict[str, Any]:
        """The image repository's current targets (path -> ``TargetFile``), verified against the
        keyring's latest root."""
        from edgefleet.cli.keys import current_targets
        from edgefleet.tufmeta.keyring import Keyring

        root = Keyring.load(self.keys).latest_root()
        assert root is not None, f"{self.keys}: no image root published"
        return dict(current_targets(self.http, root.signed).signed.targets)

    def sign_targets(self, add: Sequence[Path] = (), remove: Sequence[str] = ()) -> int:
        """Sign the next image targets with the release key here (:class:`Keyring`, no CLI), from the
        current ones (verified against the keyring's root) plus ``add`` (bundle files) minus ``remove``
        (target paths); returns its version. For targets the CLI would not sign."""
        from tuf.api.metadata import TargetFile  # type: ignore[attr-defined]

        from edgefleet.cli.keys import current_targets, publish
        from edgefleet.tufmeta import expiry_from
        from edgefleet.tufmeta.keyring import Keyring

        ring = Keyring.load(self.keys)
        root = ring.latest_root()
        assert root is not None, f"{self.keys}: no image root published"
        targets = copy.deepcopy(current_targets(self.http, root.signed).signed)
        targets.version += 1
        targets.expires = expiry_from(datetime.now(UTC), "targets")
        for b in add:
            targets.targets[b.name] = TargetFile.from_file(b.name, str(b), ["sha256"])
        for t in remove:
            targets.targets.pop(t, None)
        return publish(self.http, "targets", ring.sign_targets(targets))

    def assign(self, device_id: str, name: str, version: str) -> dict[str, Any]:
        """``edgefleet device assign DEVICE NAME VERSION``."""
        out: dict[str, Any] = self.cli("device", "assign", device_id, name, version)
        return out

    def unassign(self, device_id: str, name: str) -> None:
        r = self.http.delete(f"/api/v1/devices/{device_id}/models/{name}")
        assert r.status_code == 204, r.text

    def device(self, device_id: str) -> dict[str, Any]:
        """The server's view of a device (``device show``: running, desired, update block, events)."""
        out: dict[str, Any] = self.cli("device", "show", device_id)
        return out

    def events(self, device_id: str) -> list[dict[str, Any]]:
        """Every update event the server stored for the device, oldest first (``GET
        /api/v1/devices/{id}/events``, paged by ``before_seq``)."""
        out: list[dict[str, Any]] = []
        before: int | None = None
        while True:
            params: dict[str, Any] = {"limit": 500, **({"before_seq": before} if before else {})}
            r = self.http.get(f"/api/v1/devices/{device_id}/events", params=params)
            assert r.status_code == 200, f"events: {r.status_code}: {r.text[:500]}"
            page: list[dict[str, Any]] = r.json()
            out += page
            seqs = [e["seq"] for e in page if e.get("seq") is not None]
            if len(page) < 500 or not seqs or len(seqs) < len(page):
                return out[::-1]
            before = min(seqs)

    def wait_event(self, device_id: str, kind: str, timeout: float = 60.0, **match: Any) -> dict[str, Any]:
        """Wait until the server has an event of ``kind`` from the device whose fields equal ``match``
        (``version="2.0.0"``, ``reason="selftest_failed"``...); returns the first such event."""
        def found() -> dict[str, Any] | None:
            return next((e for e in self.events(device_id)
                         if e["kind"] == kind and all(e.get(k) == v for k, v in match.items())), None)

        event: dict[str, Any] = self.wait_for(found, timeout, f"event {kind} {match or ''} from {device_id}")
        return event

    def enroll(self, state_dir: Path, tags: Sequence[str] = (),
               trust: Literal["auto", "pin", "file", "none"] = "auto") -> str:
        """Enroll a device into ``state_dir``: an enrollment token, then ``agent enroll --allow-http``;
        returns its id. ``trust`` says how the device learns the image root: ``pin`` (the token carries
        it: ``enroll-token --keys``), ``file`` (``agent enroll --image-root KEYS/image/1.root.json``),
        ``none`` (neither: the CLI before either existed); ``auto`` is ``pin`` once both commands know
        pins, else ``file`` once ``agent enroll`` takes one, else ``none``."""
        if trust == "auto":
            file_ok = cli_has_option(("agent", "enroll"), "--image-root")
            pin_ok = file_ok and cli_has_option(("device", "enroll-token"), "--keys")
            trust = "pin" if pin_ok else "file" if file_ok else "none"
        args: list[str | Path] = ["device", "enroll-token"]
        for t in tags:
            args += ["--tag", t]
        if trust == "pin":
            args += ["--keys", self.keys]
        token = self.cli(*args)["token"]
        enroll: list[str | Path] = ["agent", "enroll", "--server", self.server.url, "--token", token,
                                    "--state-dir", state_dir, "--allow-http"]
        if trust == "file":
            enroll += ["--image-root", self.keys / "image" / "1.root.json"]
        return str(self.cli(*enroll)["device_id"])

    # ------------------------------------------------------------------ devices

    def agent(self, model: Path | None, name: str | None = None, enroll: bool = True,
              updates: Mapping[str, Any] | None = None, config: Mapping[str, Any] | None = None,
              start: bool = True, port: int = 0) -> Agent:
        """A device: its folder ``root/devices/NAME`` (state in ``state/``), enrolled unless ``enroll``
        is false, and its :class:`Agent` serving ``model`` first, started unless ``start`` is false.
        Cleaned up by :meth:`close`."""
        name = name or f"d{len(self.agents) + 1}"
        folder = self.root / "devices" / name
        state = folder / "state"
        device_id = self.enroll(state) if enroll else None
        agent = Agent(folder, state, model, updates=updates, config=config, port=port, device_id=device_id)
        self.agents.append(agent)
        return agent.start() if start else agent


@contextlib.contextmanager
def running_fleet(root: Path, **kwargs: Any) -> Iterator[Fleet]:
    """A started :class:`Fleet`, closed on exit whatever happens (for benchmarks and ``make demo``)."""
    fleet = Fleet(root, **kwargs)
    try:
        yield fleet.start()
    finally:
        fleet.close()
