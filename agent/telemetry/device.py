"""The device's figures for telemetry (the ``device`` object), read from /proc and the file system.

No psutil: a device install stays small, and these few figures are a line each in /proc.

- ``cpu_percent``: CPU time of this process (user + system, all threads; ``/proc/self/stat``) over the
  wall time since the previous sample, in percent of one core (so up to 100 x cores);
- ``memory_rss_bytes``: resident set of this process (``/proc/self/statm``), and ``memory_percent`` of
  the machine's ``MemTotal`` (``/proc/meminfo``);
- ``temperature_c``: the hardware profile's thermal zone (``read_sensors``), None without one;
- ``disk_free_bytes``: space free to unprivileged users on the state directory's file system
  (``statvfs``: ``f_bavail * f_frsize``, what ``df`` shows as available);
- ``uptime_s``: seconds since the agent started; ``agent_version``; ``queue_depth`` and ``dropped``
  come from the telemetry queue, passed in by the caller.

A figure that cannot be read is None; :meth:`DeviceSampler.sample` never raises for one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefleet import __version__

if TYPE_CHECKING:
    from edgefleet.agent.hardware import HardwareProfile

__all__ = ["DeviceSampler", "process_cpu_seconds"]


def _ticks() -> int:
    try:
        return os.sysconf("SC_CLK_TCK")
    except (ValueError, OSError, AttributeError):
        return 100


_TICKS = _ticks()
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def process_cpu_seconds(proc: Path = Path("/proc")) -> float:
    """User + system CPU seconds of this process from ``/proc/self/stat`` (fields 14 and 15, after the
    command name, which may hold spaces and parentheses); ``os.times()`` where /proc is unreadable."""
    try:
        text = (proc / "self" / "stat").read_text()
        fields = text[text.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime: fields 14, 15 of the line
    except (OSError, ValueError, IndexError):
        t = os.times()
        return t.user + t.system


def _rss_bytes(proc: Path) -> int | None:
    try:
        return int((proc / "self" / "statm").read_text().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def _mem_total_bytes(proc: Path) -> int | None:
    try:
        with open(proc / "meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _disk_free(path: Path) -> int | None:
    p = path
    while not p.exists() and p != p.parent:  # not made yet: the file system it will be on
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


class DeviceSampler:
    """Samples the ``device`` object of a telemetry message; CPU is measured between two samples
    (the first from the sampler's creation). ``proc`` and ``root`` (for the profile's sysfs paths)
    are there for tests; ``started`` is the agent's start on ``clock`` (default: now)."""

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        profile: HardwareProfile | None = None,
        started: float | None = None,
        *,
        proc: Path = Path("/proc"),
        root: Path = Path("/"),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.profile = profile
        self.proc = proc
        self.root = root
        self._clock = clock
        self.started = clock() if started is None else started
        self._mem_total = _mem_total_bytes(proc)
        self._last = (clock(), process_cpu_seconds(proc))

    def cpu_percent(self) -> float | None:
        """This process's CPU since the previous call, in percent of one core; None for no time passed."""
        now, cpu = self._clock(), process_cpu_seconds(self.proc)
        then, cpu_then = self._last
        self._last = (now, cpu)
        wall = now - then
        if wall <= 0:
            return None
        return round(max(cpu - cpu_then, 0.0) / wall * 100.0, 2)

    def temperature_c(self) -> float | None:
        if self.profile is None or self.profile.thermal_zone is None:
            return None
        from edgefleet.agent.hardware import read_sensors

        t = read_sensors(self.profile, self.root).get("temperature_c")
        return t if isinstance(t, float) else None

    def sample(self, queue_depth: int = 0, dropped: int = 0) -> dict[str, Any]:
        """The telemetry ``device`` object."""
        rss = _rss_bytes(self.proc)
        total = self._mem_total
        return {
            "cpu_percent": self.cpu_percent(),
            "memory_rss_bytes": rss,
            "memory_percent": round(rss / total * 100.0, 3) if rss is not None and total else None,
            "temperature_c": self.temperature_c(),
            "disk_free_bytes": _disk_free(self.state_dir),
            "uptime_s": round(self._clock() - self.started, 3),
            "queue_depth": queue_depth,
            "dropped": dropped,
            "agent_version": __version__,
        }
