"""JSON lines from a text stream (standard input by default): one payload per line.

Lines are read only as fast as the flow takes them, so a writer piping into the agent is slowed by
the pipe rather than losing inputs. Blank lines are skipped; a malformed line is counted as an
error, logged with its line number and the field at fault, and reading goes on. The source ends at
the end of the stream.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Literal, TextIO

from pydantic import Field

from edgefleet.agent.sources.base import Counters, Emit, Item, PayloadError, _Strict, parse_payload_bytes

__all__ = ["StdinSource", "StdinSourceConfig"]

log = logging.getLogger(__name__)


class StdinSourceConfig(_Strict):
    """Read JSON payloads, one per line, from standard input."""

    type: Literal["stdin"]
    name: str = Field(default="stdin", description="name in counters, logs and result meta")
    max_line_bytes: int = Field(default=16 << 20, ge=16, description="longer lines are errors, characters")


class StdinSource:
    """``stream`` is any text stream (an ``io.StringIO`` in tests); ``None`` means ``sys.stdin``."""

    can_wait = True

    def __init__(self, config: StdinSourceConfig, stream: TextIO | None = None) -> None:
        self.config = config
        self.name = config.name
        self.ended = threading.Event()
        self.last_error: str | None = None
        self._stream = stream
        self._counters = Counters("received", "errors")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def counters(self) -> dict[str, int]:
        return self._counters.snapshot()

    def start(self, emit: Emit) -> None:
        if self._thread is not None:
            raise RuntimeError(f"source {self.name}: already started")
        stream = self._stream if self._stream is not None else sys.stdin
        self._thread = threading.Thread(target=self._run, args=(stream, emit), name=f"source-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop reading. A read blocked on an idle terminal or pipe cannot be interrupted: the
        thread is a daemon and is left behind after a short wait."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)
        self.ended.set()

    def _run(self, stream: TextIO, emit: Emit) -> None:
        limit = self.config.max_line_bytes
        try:
            lineno = 0
            while not self._stop.is_set():
                line = stream.readline(limit + 1)
                if not line:
                    break
                lineno += 1
                if len(line) > limit and not line.endswith("\n"):
                    while line and not line.endswith("\n"):  # skip the rest of the long line
                        line = stream.readline(limit + 1)
                    self._error(f"line {lineno}: longer than {limit} characters")
                    continue
                if not line.strip():
                    continue
                self._counters.inc("received")
                try:
                    data, meta = parse_payload_bytes(line, f"line {lineno}")
                except PayloadError as e:
                    self._error(str(e))
                    continue
                meta.update(source=self.name, received_at=time.time(), line=lineno)
                emit(Item(data, meta))
        except (OSError, ValueError) as e:  # a closed or broken stream
            self._error(f"cannot read: {e}")
        finally:
            self.ended.set()

    def _error(self, msg: str) -> None:
        self._counters.inc("errors")
        self.last_error = msg
        log.warning("source %s: %s", self.name, msg)
