"""A camera, a video stream or a video file, read with OpenCV's ``VideoCapture``.

Live sources (a device index, an ``rtsp://``/``http://`` URL) are read continuously on a capture
thread, so the driver's buffer never fills with old frames. Frames go to a one-frame slot; a
second thread hands the slot's frame to the flow, waiting while the flow is busy. A frame that is
replaced in the slot before it was handed on is *stale*: it is dropped and counted, never queued.
So when inference is slower than the camera, the model always gets the newest frame.

A file is played in real time by default (paced at its own frame rate, dropping stale frames like
a camera); with ``realtime = false`` every frame is handed on in order, waiting for the flow (a
recording processed in full). ``fps`` caps the frames handed on per second of video time. At the
end of a file the source stops cleanly, unless ``loop``. A live source that fails is reopened.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from edgefleet.agent.sources.base import Counters, Emit, Item, _Strict
from edgefleet.errors import ConfigError

__all__ = ["CameraSource", "CameraSourceConfig"]

log = logging.getLogger(__name__)


class CameraSourceConfig(_Strict):
    """A camera (device index), a stream URL or a video file."""

    type: Literal["camera"]
    name: str = Field(default="camera", description="name in counters, logs and result meta")
    device: int | str = Field(description="camera index (0 is /dev/video0), a video file path, or an rtsp:// URL")
    fps: float | None = Field(default=None, gt=0, le=1000, description="most frames handed on per second; none: all")
    loop: bool = Field(default=False, description="for a file: start again at its end instead of stopping")
    realtime: bool = Field(
        default=True, description="for a file: play at its own frame rate, dropping stale frames; false: every frame"
    )
    width: int | None = Field(default=None, ge=1, le=16384, description="capture width asked of a camera, pixels")
    height: int | None = Field(default=None, ge=1, le=16384, description="capture height asked of a camera, pixels")
    reconnect_delay: float = Field(default=2.0, gt=0, le=300, description="seconds before reopening a failed camera")

    @field_validator("device")
    @classmethod
    def _index(cls, v: int | str) -> int | str:
        if isinstance(v, str) and v.strip().isdigit():
            return int(v)
        if isinstance(v, int) and v < 0:
            raise ValueError("a camera index is 0 or more")
        if isinstance(v, str) and not v.strip():
            raise ValueError("empty device")
        return v

    @property
    def is_file(self) -> bool:
        return isinstance(self.device, str) and "://" not in self.device


class CameraSource:
    """Frames as BGR uint8 arrays, with ``meta["frame"]`` (index in the stream) and ``pos_ms``."""

    can_wait = True

    def __init__(self, config: CameraSourceConfig) -> None:
        self.config = config
        self.name = config.name
        self.ended = threading.Event()
        self.eof = threading.Event()  # capture is over: the end of a file (not looping), or stopped
        self.last_error: str | None = None
        self._counters = Counters("received", "emitted", "dropped_stale", "skipped_fps", "errors", "reopened")
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._slot: tuple[np.ndarray[Any, Any], dict[str, Any], float] | None = None
        self._slot_cond = threading.Condition()
        self._interval = 1.0 / config.fps if config.fps else 0.0
        self._next_due = -math.inf
        self._cap: Any = None

    def counters(self) -> dict[str, int]:
        return self._counters.snapshot()

    def start(self, emit: Emit) -> None:
        if self._threads:
            raise RuntimeError(f"source {self.name}: already started")
        try:
            import cv2  # noqa: F401
        except ImportError as e:
            raise ConfigError(f"source {self.name}: the camera source needs opencv-python-headless") from e
        if self.config.is_file:
            if not Path(str(self.config.device)).is_file():
                raise ConfigError(f"source {self.name}: device: no such video file {self.config.device}")
            self._cap = self._open()
            if self._cap is None:
                raise ConfigError(f"source {self.name}: device: OpenCV cannot read {self.config.device}")
        if self.config.is_file and not self.config.realtime:
            targets = [self._run_in_order]
        else:
            targets = [self._capture, self._deliver]
        for target in targets:
            t = threading.Thread(target=target, args=(emit,), name=f"source-{self.name}", daemon=True)
            self._threads.append(t)
            t.start()

    def stop(self) -> None:
        self._stop.set()
        with self._slot_cond:
            self._slot_cond.notify_all()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=10.0)  # a hung stream can block read() for long: the thread is a daemon
                if t.is_alive():
                    log.warning("source %s: %s did not stop within 10 s", self.name, t.name)
        self.ended.set()

    # -- reading ---------------------------------------------------------------------------------

    def _open(self) -> Any:
        import cv2

        cap = cv2.VideoCapture(self.config.device)
        if not cap.isOpened():
            cap.release()
            return None
        if not self.config.is_file:
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # where the backend allows: no backlog in the driver
            if self.config.width:
                cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.config.width)
            if self.config.height:
                cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.config.height)
        return cap

    def _frames(self) -> Iterator[tuple[np.ndarray[Any, Any], dict[str, Any], float]]:
        """Yield ``(frame, meta, video time in seconds)``; paces a real-time file; reopens a camera."""
        import cv2

        index = rewound = 0
        start = time.monotonic()
        while not self._stop.is_set():
            cap = self._cap
            if cap is None:
                cap = self._cap = self._open()
                if cap is None:
                    self._error(f"cannot open {self.config.device}; retrying in {self.config.reconnect_delay} s")
                    self._stop.wait(self.config.reconnect_delay)
                    continue
            file_fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0) if self.config.is_file else 0.0
            ok, frame = cap.read()
            if not ok or frame is None:
                if self.config.is_file and self.config.loop and index > rewound:
                    cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                    rewound = index
                    continue
                cap.release()
                self._cap = None
                if self.config.is_file:
                    self.eof.set()
                    return
                self._counters.inc("reopened")
                self._error(f"no frame from {self.config.device}; reopening in {self.config.reconnect_delay} s")
                self._stop.wait(self.config.reconnect_delay)
                continue
            self._counters.inc("received")
            if self.config.is_file and math.isfinite(file_fps) and file_fps > 0:
                t = index / file_fps  # video time: deterministic fps cap for files
                if self.config.realtime:
                    self._stop.wait(max(0.0, start + t - time.monotonic()))
            else:
                t = time.monotonic()
            meta = {"source": self.name, "received_at": time.time(), "frame": index}
            if self.config.is_file:
                meta["pos_ms"] = round(t * 1000, 3)
            index += 1
            yield frame, meta, t
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def _admit(self, t: float) -> bool:
        """The fps cap: keep a frame when it is (within a quarter interval) due."""
        if not self._interval:
            return True
        if t < self._next_due - self._interval * 0.25:
            self._counters.inc("skipped_fps")
            return False
        self._next_due = (self._next_due if t - self._next_due < self._interval else t) + self._interval
        return True

    def _error(self, msg: str) -> None:
        self._counters.inc("errors")
        self.last_error = msg
        log.warning("source %s: %s", self.name, msg)

    # -- threads ---------------------------------------------------------------------------------

    def _run_in_order(self, emit: Emit) -> None:
        try:
            for frame, meta, t in self._frames():
                if self._admit(t):
                    self._counters.inc("emitted")
                    emit(Item(frame, meta))
        except Exception as e:
            self._error(f"stopped by an unexpected error: {e!r}")
        finally:
            self.ended.set()

    def _capture(self, emit: Emit) -> None:
        try:
            for frame, meta, t in self._frames():
                if not self._admit(t):
                    continue
                with self._slot_cond:
                    if self._slot is not None:
                        self._counters.inc("dropped_stale")
                    self._slot = (frame, meta, time.monotonic())
                    self._slot_cond.notify_all()
        except Exception as e:
            self._error(f"stopped by an unexpected error: {e!r}")
        finally:
            self.eof.set()
            with self._slot_cond:
                self._slot_cond.notify_all()

    def _deliver(self, emit: Emit) -> None:
        try:
            while True:
                with self._slot_cond:
                    while self._slot is None and not self.eof.is_set() and not self._stop.is_set():
                        self._slot_cond.wait()
                    if self._stop.is_set() or self._slot is None:
                        return
                    frame, meta, received = self._slot
                    self._slot = None
                self._counters.inc("emitted")
                emit(Item(frame, meta, received=received))
        finally:
            self.ended.set()
