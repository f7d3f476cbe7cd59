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

The test models (one interface, several behaviours) come from ``tests/fixtures/make_update_models.py``.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import copy
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
if str(FIXTURES) not in sys.path:
    sys.path.insert(0, str(FIXTURES))
import make_update_models as models  # noqa: E402

from edgefleet.bundle import read_manifest  # noqa: E402

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

# The console script's own entry point (edgefleet.cli.entry: `agent run` starts without typer, as on
# a device), run by this interpreter.
CLI = [sys.executable, "-c", "from edgefleet.cli.entry import main; main()"]
START_TIMEOUT = 60.0  # seconds a server or an agent may take to say it is ready (a loaded 2-core box)
STOP_TIMEOUT = 30.0  # seconds SIGTERM may take before the process is killed and the test fails
CLI_TIMEOUT = 60.0  # seconds one CLI command may take
LOG_TAIL = 40  # lines of each log quoted by a failure

_live_groups: set[int] = set()  # process groups this harness started and has not reaped


@atexit.register
def _kill_leftovers() -> None:
    for pgid in list(_live_groups):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail(path: Path, lines: int = LOG_TAIL) -> str:
    """The last ``lines`` lines of a log file ('' when there is none yet)."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class CliError(AssertionError):
    """An ``edgefleet`` command exited non-zero; ``returncode``, ``stdout`` and ``stderr`` are its."""

    def __init__(self, args: Sequence[str], r: subprocess.CompletedProcess[str]) -> None:
        super().__init__(f"edgefleet {' '.join(args)}: exit {r.returncode}\nstdout: {r.stdout[-2000:]}\n"
                         f"stderr: {r.stderr[-4000:]}")
        self.returncode, self.stdout, self.stderr = r.returncode, r.stdout, r.stderr


def _clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without the variables that would steer a child edgefleet elsewhere
    (agent.toml overrides, an operator's server and token, systemd's sockets)."""
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith("EDGEFLEET_") and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
    }
    env.update({"PYTHONUNBUFFERED": "1", "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})
    env.update(extra or {})
    return env


def run_cli(*args: str | Path, env: Mapping[str, str] | None = None, check: bool = True,
            timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run ``edgefleet ARGS`` as a process (``env`` on top of a clean environment). Raises
    :class:`CliError` on a non-zero exit when ``check``."""
    argv = [str(a) for a in args]
    r = subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=timeout, env=_clean_env(env))
    if check and r.returncode != 0:
        raise CliError(argv, r)
    return r


@cache
def cli_has_option(command: tuple[str, ...], option: str) -> bool:
    """Whether ``edgefleet COMMAND --help`` lists ``option`` (read once per session)."""
    out = run_cli(*command, "--help").stdout
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", out) is not None


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, logs: Sequence[Path] = (),
             interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy, and return that. An exception from it
    counts as not yet (a process that is restarting). On timeout, raise AssertionError naming
    ``what``, the last value or exception, and the tail of each of ``logs``."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()  # never set: a wait that is not a bare sleep
    last: Any = None
    while True:
        try:
            last = predicate()
            if last:
                return last
        except Exception as e:  # reported below if it never comes right
            last = e
        if time.monotonic() >= deadline:
            shown = f"{type(last).__name__}: {last}" if isinstance(last, BaseException) else repr(last)
            quoted = "".join(f"\n--- {p} (last {LOG_TAIL} lines) ---\n{tail(p)}" for p in logs)
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}; last: {shown[:1000]}{quoted}")
        pause.wait(interval)


class _Process:
    """A child in its own process group, its stdout and stderr appended to ``log`` line by line by a
    thread, which also sets :attr:`ready` at the first line matching ``ready`` (or at EOF)."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str], ready: re.Pattern[str]) -> None:
        self.log = log
        self.ready_match: re.Match[str] | None = None
        self.settled = threading.Event()  # the ready line was seen, or the output ended
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
        _live_groups.add(self.proc.pid)
        self._ready = ready
        self._reader = threading.Thread(target=self._read, name=f"log-{log.name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.log.open("ab", buffering=0) as out:
            for line in self.proc.stdout:
                out.write(line)
                if self.ready_match is None:
                    m = self._ready.search(line.decode(errors="replace"))
                    if m is not None:
                        self.ready_match = m
                        self.settled.set()
        self.settled.set()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int, group: bool = False) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig) if group else self.proc.send_signal(sig)

    def reap(self, timeout: float) -> int:
        """Wait for the exit (and the rest of the output); returns the exit code."""
        code = self.proc.wait(timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything it started dies with it
        _live_groups.discard(self.proc.pid)
        self._reader.join(10)
        return code

    def kill(self) -> int:
        self.signal(signal.SIGKILL, group=True)
        return self.reap(30)

    def terminate(self, timeout: float) -> int:
        """SIGTERM and wait; a process still alive after ``timeout`` is killed and AssertionError raised."""
        self.signal(signal.SIGTERM)
        try:
            return self.reap(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running {timeout:g} s after SIGTERM; killed\n{tail(self.log)}") from None


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
        self._proc: _Process | None = None

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
            env = _clean_env({"EDGEFLEET_SERVER_ALLOW_PLAIN_HTTP_DEVICES": "true",
                              "NOTIFY_SOCKET": str(folder / "s"), **self.env})
            db = ["--db", self.db] if self.db else []
            with self.log.open("ab") as f:
                f.write(b"=== server start ===\n")
            argv = [*CLI, "server", "run", "--data", str(self.data), *db, "--port", str(self.port)]
            self._proc = _Process(argv, self.log, env, re.compile(r"(?!)"))  # readiness: READY=1 below
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


@dataclass(frozen=True)
class Sample:
    """One inference sent by :class:`Load`: when (``time.monotonic()``), the version that answered,
    the HTTP status (None: no answer at all, the agent was down), and the error text if it failed."""

    at: float
    version: str | None
    status: int | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200


class Load:
    """Inferences sent to an agent from a thread, at ``rate`` per second (None: back to back), until
    :meth:`stop`; every one is recorded as a :class:`Sample`. ``inputs(i)`` gives the i-th input
    (default: the held-out digits in turn). A context manager: stops on exit."""

    def __init__(self, agent: Agent, rate: float | None, inputs: Callable[[int], np.ndarray[Any, Any]] | None = None,
                 model: str | None = None) -> None:
        self.agent, self.rate, self.model = agent, rate, model
        self.inputs = inputs or models.sample_input
        self._samples: list[Sample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)

    def start(self) -> Load:
        self._thread.start()
        return self

    def _run(self) -> None:
        started = time.monotonic()
        with httpx.Client(timeout=30) as client:
            i = 0
            while not self._stop.is_set():
                if self.rate:
                    self._stop.wait(max(0.0, started + i / self.rate - time.monotonic()))
                    if self._stop.is_set():
                        break
                s = self.agent.infer_sample(self.inputs(i), self.model, client)
                with self._lock:
                    self._samples.append(s)
                i += 1
                if s.status is None and not self.rate:
                    self._stop.wait(0.01)  # down: do not spin on refused connections

    def stop(self) -> list[Sample]:
        """Stop sending (after the request in flight); returns every sample."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(60)
        return self.samples

    def __enter__(self) -> Load:
        return self.start() if not self._thread.is_alive() else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def samples(self) -> list[Sample]:
        with self._lock:
            return list(self._samples)

    def versions(self) -> collections.Counter[str | None]:
        """Answers by the version that gave them (failures not counted)."""
        return collections.Counter(s.version for s in self.samples if s.ok)

    def failures(self) -> list[Sample]:
        """Requests the agent answered with an error (not those sent while it was down)."""
        return [s for s in self.samples if s.status is not None and not s.ok]

    def unanswered(self) -> list[Sample]:
        """Requests sent while the agent was down (connection refused or cut)."""
        return [s for s in self.samples if s.status is None]

    def wait_answers(self, n: int, timeout: float = 30.0, version: str | None = None,
                     after: float | None = None) -> None:
        """Wait until ``n`` answers were recorded (of ``version`` only, and sent after ``after``, a
        ``time.monotonic()``, if given)."""
        def count() -> int:
            return sum(1 for s in self.samples
                       if s.ok and version in (None, s.version) and (after is None or s.at > after))

        wait_for(lambda: count() >= n, timeout, f"{n} answers{f' from {version}' if version else ''} under load",
                 [self.agent.log])


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a JSON string is a TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML for {type(value).__name__}")


class Agent:
    """``edgefleet agent run`` for one state folder. Not started until :meth:`start`.

    ``model``: the bundle served from ``[[models]]`` (the device's initial model); ``updates``: the
    ``[updates]`` table, written only when given; ``config``: other top-level keys or tables of
    agent.toml (``{"log_level": "debug", "api": {"workers": 2}}``). ``port`` 0: any free port on the
    first start, the same one on every restart."""

    def __init__(self, root: Path, state_dir: Path, model: Path | None, updates: Mapping[str, Any] | None = None,
                 config: Mapping[str, Any] | None = None, port: int = 0, device_id: str | None = None) -> None:
        self.root, self.state_dir, self.model, self.device_id = root, state_dir, model, device_id
        self.updates = dict(updates) if updates is not None else None
        self.extra = dict(config or {})
        self.port = port
        self.model_name = read_manifest(model).name if model is not None else models.MODEL_NAME
        self.config_path = root / "agent.toml"
        self.log = root / "agent.log"
        self.starts = 0
        self._proc: _Process | None = None
        self._client = httpx.Client(timeout=30)
        self._loads: list[Load] = []
        root.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ process

    def write_config(self) -> Path:
        """Write agent.toml for the next start (the port found on the first start is kept)."""
        top = {"state_dir": self.state_dir, "log_level": "info",
               **{k: v for k, v in self.extra.items() if not isinstance(v, dict)}}
        tables: dict[str, dict[str, Any]] = {"api": {"host": "127.0.0.1"}}
        for k, v in self.extra.items():
            if isinstance(v, dict):
                tables.setdefault(k, {}).update(v)
        tables["api"]["port"] = self.port
        if self.updates is not None:
            tables["updates"] = self.updates
        lines = [f"{k} = {_toml(v)}" for k, v in top.items()]
        for name, table in tables.items():
            lines += ["", f"[{name}]", *(f"{k} = {_toml(v)}" for k, v in table.items())]
        if self.model is not None:
            lines += ["", "[[models]]", f"path = {_toml(self.model.resolve())}"]
        self.config_path.write_text("\n".join(lines) + "\n")
        return self.config_path

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.alive

    @property
    def pid(self) -> int:
        assert self._proc is not None, "the agent is not running"
        return self._proc.proc.pid

    def start(self, timeout: float = START_TIMEOUT) -> Agent:
        """Start and wait for its ``ready:`` line. Raises AssertionError with the log's tail when it
        exits first or is not ready within ``timeout``."""
        assert not self.alive, "the agent is already running"
        self.write_config()
        self.starts += 1
        with self.log.open("ab") as f:
            f.write(f"=== start {self.starts} ===\n".encode())
        self._proc = _Process([*CLI, "agent", "run", "--config", str(self.config_path)], self.log, _clean_env(),
                              re.compile(r"^ready: .*?http://127\.0\.0\.1:(\d+)"))
        if not self._proc.settled.wait(timeout):
            self._proc.kill()
            raise AssertionError(f"agent not ready in {timeout:g} s\n{tail(self.log)}")
        if self._proc.ready_match is None:
            code = self._proc.reap(30)
            raise AssertionError(f"agent exited ({code}) before it was ready\n{tail(self.log)}")
        self.port = int(self._proc.ready_match.group(1))
        return self

    def kill(self) -> int:
        """SIGKILL the agent's process group (a power cut, as far as the process is concerned)."""
        assert self._proc is not None, "the agent was never started"
        return self._proc.kill()

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM (systemd's stop) and wait; returns the exit code. A hang is killed and fails."""
        assert self._proc is not None, "the agent was never started"
        return self._proc.terminate(timeout) if self._proc.alive else self._proc.reap(1)

    def restart(self, timeout: float = START_TIMEOUT) -> Agent:
        """Stop it if it runs (SIGTERM), then start again on the same port."""
        if self.alive:
            self.stop()
        return self.start(timeout)

    def close(self) -> None:
        """Stop its loads and kill it (the harness's cleanup)."""
        for load in self._loads:
            load.stop()
        if self.alive:
            self.kill()
        self._client.close()

    # ------------------------------------------------------------------ local API

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _infer_request(self, x: np.ndarray[Any, Any]) -> dict[str, Any]:
        x = np.asarray(x, np.float32)
        return {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}

    def infer(self, x: np.ndarray[Any, Any] | None = None, model: str | None = None) -> dict[str, Any]:
        """POST ``/v2/models/MODEL/infer`` with ``x`` (default: a held-out digit); the OIP response
        (``model_version``, ``outputs``...). Raises AssertionError for any status but 200, with its body."""
        r = self._client.post(f"{self.url}/v2/models/{model or self.model_name}/infer",
                              json=self._infer_request(models.sample_input(0) if x is None else x))
        assert r.status_code == 200, f"infer: {r.status_code}: {r.text[:500]}"
        out: dict[str, Any] = r.json()
        return out

    def infer_sample(self, x: np.ndarray[Any, Any], model: str | None = None,
                     client: httpx.Client | None = None) -> Sample:
        """One inference, never raising: what answered, or why nothing did."""
        at = time.monotonic()
        try:
            r = (client or self._client).post(f"{self.url}/v2/models/{model or self.model_name}/infer",
                                              json=self._infer_request(x))
        except httpx.HTTPError as e:
            return Sample(at, None, None, f"{type(e).__name__}: {e}")
        if r.status_code != 200:
            return Sample(at, None, r.status_code, r.text[:500])
        return Sample(at, str(r.json().get("model_version")), 200)

    def probs(self, x: np.ndarray[Any, Any] | None = None) -> np.ndarray[Any, Any]:
        """The ``probs`` output for ``x`` as a [1, 10] array."""
        out = {o["name"]: o for o in self.infer(x)["outputs"]}["probs"]
        return np.asarray(out["data"], np.float32).reshape(out["shape"])

    def served_version(self, model: str | None = None) -> str | None:
        """The version ``GET /v2/models/MODEL`` reports; None when it serves no such model. Raises
        httpx's errors when the agent does not answer."""
        r = self._client.get(f"{self.url}/v2/models/{model or self.model_name}")
        if r.status_code == 404:
            return None
        assert r.status_code == 200, f"model metadata: {r.status_code}: {r.text[:500]}"
        return str(r.json()["versions"][0])

    def load(self, rate: float | None = 20.0, inputs: Callable[[int], np.ndarray[Any, Any]] | None = None,
             model: str | None = None) -> Load:
        """A started :class:`Load` on this agent (``with agent.load(20) as load: ...``; :meth:`close`
        stops it too)."""
        load = Load(self, rate, inputs, model)
        self._loads.append(load)
        return load.start()


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
