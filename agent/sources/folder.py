"""A watched folder: images, ``.npy`` arrays and JSON payloads dropped in it are fed to the model.

The folder is polled (no extra dependency, works on every file system). A file is picked up once
its size and modification time are the same on two polls in a row, so a file still being written
is left alone; writers that can should write ``.name.tmp`` and rename (hidden files are ignored).
After the flow has handled a file it goes to ``done/`` (or ``failed/`` when it could not be read
or inference failed), or is deleted. A file is never processed twice while the agent runs; one the
flow had to drop at shutdown stays where it is and is processed on the next start.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from edgefleet.agent.sources.base import Counters, Emit, Item, Outcome, PayloadError, _Strict, parse_payload_bytes
from edgefleet.errors import EdgefleetError

__all__ = ["FolderSource", "FolderSourceConfig"]

log = logging.getLogger(__name__)

_IMAGES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".pgm", ".ppm")


class FolderSourceConfig(_Strict):
    """Poll a folder for input files."""

    type: Literal["folder"]
    name: str = Field(default="folder", description="name in counters, logs and result meta")
    path: Path = Field(description="the watched folder (created if missing)")
    suffixes: list[str] = Field(
        default=[".png", ".jpg", ".jpeg", ".npy", ".json"],
        min_length=1,
        description="file name endings picked up, case-insensitive (images, .npy, .json)",
    )
    poll_interval: float = Field(default=0.5, gt=0, le=60, description="seconds between two scans of the folder")
    after: Literal["move", "delete"] = Field(
        default="move", description="what to do with a handled file: move to done_dir/failed_dir, or delete it"
    )
    done_dir: Path = Field(default=Path("done"), description="handled files go here (relative to path)")
    failed_dir: Path = Field(default=Path("failed"), description="files that failed go here (relative to path)")
    max_file_bytes: int = Field(default=64 << 20, ge=1, description="larger files fail without being read, bytes")


def read_input(path: Path) -> Any:
    """One file to the data of an item. Raises an :class:`EdgefleetError` naming the file."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        data, _ = parse_payload_bytes(path.read_bytes(), where=path.name)
        return data
    if suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise PayloadError(f"{path.name}: not a readable .npy array ({e})") from e
        if not isinstance(arr, np.ndarray):
            raise PayloadError(f"{path.name}: expected one array")
        return arr
    if suffix in _IMAGES:
        from edgefleet.agent.pipeline import decode_image

        return decode_image(path.read_bytes(), where=path.name)
    raise PayloadError(f"{path.name}: unsupported file type {suffix!r} (images, .npy, .json)")


class FolderSource:
    """Emits one item per file; waits (does not drop) while the flow is full."""

    can_wait = True

    def __init__(self, config: FolderSourceConfig) -> None:
        self.config = config
        self.name = config.name
        self.ended = threading.Event()
        self.last_error: str | None = None
        self._suffixes = tuple(s.lower() for s in config.suffixes)
        self._counters = Counters("received", "done", "failed", "errors", "requeued")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._busy: set[str] = set()  # handed to the flow, not yet acknowledged
        self._stuck: set[str] = set()  # could not be moved away: never picked up again
        self._seen: dict[str, tuple[int, int]] = {}  # name -> (size, mtime_ns) at the last poll

    def _dir(self, sub: Path) -> Path:
        return sub if sub.is_absolute() else self.config.path / sub

    def start(self, emit: Emit) -> None:
        if self._thread is not None:
            raise RuntimeError(f"source {self.name}: already started")
        try:
            self.config.path.mkdir(parents=True, exist_ok=True)
            if self.config.after == "move":
                self._dir(self.config.done_dir).mkdir(parents=True, exist_ok=True)
                self._dir(self.config.failed_dir).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise EdgefleetError(f"source {self.name}: cannot use folder {self.config.path}: {e.strerror or e}") from e
        self._thread = threading.Thread(target=self._run, args=(emit,), name=f"source-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self.ended.set()

    def counters(self) -> dict[str, int]:
        return self._counters.snapshot()

    def _run(self, emit: Emit) -> None:
        try:
            while not self._stop.is_set():
                for path in self._ready():
                    if self._stop.is_set():
                        break
                    self._handle(path, emit)
                self._stop.wait(self.config.poll_interval)
        except Exception:  # never expected; keep the reason in the log
            log.exception("source %s: stopped by an unexpected error", self.name)
        finally:
            self.ended.set()

    def _ready(self) -> list[Path]:
        """Files whose size and mtime did not change since the last poll, oldest first."""
        seen: dict[str, tuple[int, int]] = {}
        ready: list[tuple[int, str]] = []
        try:
            entries = list(os.scandir(self.config.path))
        except OSError as e:
            self._error(f"cannot list {self.config.path}: {e.strerror or e}")
            return []
        with self._lock:
            skip = self._busy | self._stuck
        for entry in entries:
            name = entry.name
            if name.startswith(".") or not name.lower().endswith(self._suffixes) or name in skip:
                continue
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue  # gone meanwhile
            sig = (st.st_size, st.st_mtime_ns)
            seen[name] = sig
            if self._seen.get(name) == sig:
                ready.append((st.st_mtime_ns, name))
        self._seen = seen
        return [self.config.path / name for _, name in sorted(ready)]

    def _handle(self, path: Path, emit: Emit) -> None:
        self._counters.inc("received")
        try:
            size = path.stat().st_size
            if size > self.config.max_file_bytes:
                raise PayloadError(f"{path.name}: {size} bytes is over the limit of {self.config.max_file_bytes}")
            data = read_input(path)
        except FileNotFoundError:
            return  # taken away by someone else
        except (EdgefleetError, OSError) as e:
            self._error(str(e) if isinstance(e, EdgefleetError) else f"{path.name}: {e.strerror or e}")
            self._finish(path, "error")
            return
        with self._lock:
            self._busy.add(path.name)
        meta = {"source": self.name, "received_at": time.time(), "path": str(path), "file": path.name}
        emit(Item(data, meta, ack=lambda outcome: self._finish(path, outcome)))

    def _error(self, msg: str) -> None:
        self._counters.inc("errors")
        self.last_error = msg
        log.warning("source %s: %s", self.name, msg)

    def _finish(self, path: Path, outcome: Outcome) -> None:
        """Move or delete a handled file (called by the flow's worker once per item)."""
        if outcome == "dropped":
            self._counters.inc("requeued")
            with self._lock:
                self._busy.discard(path.name)
            return
        self._counters.inc("done" if outcome == "ok" else "failed")
        try:
            if self.config.after == "delete":
                path.unlink(missing_ok=True)
            else:
                folder = self._dir(self.config.done_dir if outcome == "ok" else self.config.failed_dir)
                os.replace(path, _free_name(folder, path.name))
            stuck = False
        except OSError as e:
            stuck = True
            self._error(
                f"{path.name}: cannot {self.config.after} it ({e.strerror or e}); it will not be processed again"
            )
        with self._lock:
            self._busy.discard(path.name)
            if stuck:
                self._stuck.add(path.name)


def _free_name(folder: Path, name: str) -> Path:
    """``folder/name``, or ``folder/stem.N.suffix`` when that exists already."""
    target = folder / name
    stem, suffix = os.path.splitext(name)
    n = 1
    while target.exists():
        target = folder / f"{stem}.{n}{suffix}"
        n += 1
    return target
