"""Process plumbing of the updater's harness (see ``_fleet.py``): the ``edgefleet`` CLI as a process,
a child in its own process group whose output a thread appends to a log file, and :func:`wait_for`."""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

__all__ = [
    "CLI",
    "CLI_TIMEOUT",
    "LOG_TAIL",
    "START_TIMEOUT",
    "STOP_TIMEOUT",
    "ChildProcess",
    "CliError",
    "clean_env",
    "cli_has_option",
    "free_port",
    "run_cli",
    "tail",
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


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
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
    r = subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=timeout, env=clean_env(env))
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


class ChildProcess:
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
