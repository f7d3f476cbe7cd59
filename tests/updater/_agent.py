"""A device's agent process for the updater's harness (see ``_fleet.py``): :class:`Agent` (agent.toml,
``edgefleet agent run``, the local inference API, SIGKILL / SIGTERM / restart) and :class:`Load`
(inferences from a thread, each recorded as a :class:`Sample` with the version that answered)."""

from __future__ import annotations

import collections
import json
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from updater._procs import CLI, START_TIMEOUT, STOP_TIMEOUT, ChildProcess, clean_env, tail, wait_for

from edgefleet.bundle import read_manifest

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
if str(FIXTURES) not in sys.path:
    sys.path.insert(0, str(FIXTURES))
import make_update_models as models  # noqa: E402

__all__ = ["Agent", "Load", "Sample", "models"]


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
        self._proc: ChildProcess | None = None
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
        self._proc = ChildProcess([*CLI, "agent", "run", "--config", str(self.config_path)], self.log, clean_env(),
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
