"""A flow: one source feeds one model through its pipeline, and every result goes to the sinks.

::

    source thread(s) --emit--> bounded queue --> worker thread --> pipeline.run --> sinks --> ack

The worker asks ``get_pipeline()`` for the pipeline on every item, so a model swapped in the
registry is used from the next item on; it takes whatever is queued in one go (one wake-up per
batch, not per item). When the queue is full, a source that can wait (folder, stdin, camera) is
made to wait: files stay in the folder, stdin is not read, and a camera keeps only its newest
frame, counting the stale ones it drops. A source that cannot wait (MQTT) never blocks:

- an item it *holds upstream* (``Item.held``: an MQTT QoS 1/2 message acknowledged only once it
  has been processed) is always queued and never dropped for a full queue: the broker keeps the
  rest of a burst and sends at most the source's window (receive-maximum) unacknowledged;
- any other item (QoS 0, or past the window) goes by the drop policy: the flow drops the
  ``oldest`` queued item that is not held, or the ``newest`` one, per ``drop``, and counts it in
  ``dropped_queue_full``. ``queue_size`` bounds these items.

An item that fails (bad input, a model error) is counted, logged and acknowledged; the flow goes
on. ``queued_max`` is the most items that were queued at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgefleet.agent.sinks import Sink, SinkConfig, build_sink
from edgefleet.agent.sources import Item, Source, SourceConfig, build_source
from edgefleet.agent.sources.base import Counters, Outcome
from edgefleet.errors import EdgefleetError

__all__ = ["Flow", "FlowConfig", "Runner"]

log = logging.getLogger(__name__)


class Runner(Protocol):
    """What a flow needs of a :class:`~edgefleet.agent.pipeline.Pipeline`."""

    def run(self, data: Any, raw_outputs: bool | list[str] | None = None) -> dict[str, Any]: ...


class FlowConfig(BaseModel):
    """``[[flows]]`` in ``agent.toml``: a source, the served model it feeds, and the sinks."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="", max_length=64, description="name in logs, counters and meta; default: source-model")
    model: str = Field(min_length=1, description="name of a served model")
    source: SourceConfig
    sinks: list[SinkConfig] = Field(min_length=1, description="every result goes to each of these")
    queue_size: int = Field(
        default=16,
        ge=1,
        le=100_000,
        description="items waiting for the model; default 1 for a camera (freshest frame); MQTT QoS 1/2 messages "
        "are not counted here: they wait in the broker (the source's receive_maximum bounds them)",
    )
    drop: Literal["oldest", "newest"] = Field(
        default="oldest",
        description="when the queue is full and the source cannot wait (MQTT QoS 0, or QoS 1/2 past the source's "
        "max_held): drop the oldest or the new item; counted in dropped_queue_full",
    )
    send_errors: bool = Field(default=False, description='also send {"error": ..., "meta": ...} for failed inputs')
    raw_outputs: bool | list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(
        default=None,
        description="add the model's raw outputs to each result: true for all, or the names wanted; default: the "
        "bundle pipeline's raw_outputs (off), since a detector's raw outputs are hundreds of KB per result",
    )
    drain_timeout: float = Field(default=10.0, ge=0, le=600, description="seconds stop() spends on queued items")

    @model_validator(mode="before")
    @classmethod
    def _camera_queue(cls, data: Any) -> Any:
        if isinstance(data, dict) and "queue_size" not in data:
            src = data.get("source")
            kind = src.get("type") if isinstance(src, dict) else getattr(src, "type", None)
            if kind == "camera":
                data = {**data, "queue_size": 1}
        return data

    @model_validator(mode="after")
    def _default_name(self) -> FlowConfig:
        if not self.name:
            self.name = f"{self.source.type}-{self.model}"
        return self


class Flow:
    """Runs a :class:`FlowConfig`. ``source`` and ``sinks`` may be given instead of built from it."""

    def __init__(
        self,
        config: FlowConfig,
        get_pipeline: Callable[[], Runner],
        device_id: str = "",
        *,
        source: Source | None = None,
        sinks: Sequence[Sink] | None = None,
        remember: Callable[[dict[str, Any]], str | None] | None = None,
    ) -> None:
        self.config = config
        # remember(result) -> the prediction's id (kept for feedback on it, as the API's are), or None
        self._remember = remember
        self.name = config.name
        self.device_id = device_id
        self.source: Source = source if source is not None else build_source(config.source)
        self.sinks: dict[str, Sink] = {}
        self.last_error: str | None = None
        self._given_sinks = list(sinks) if sinks is not None else None
        self._get_pipeline = get_pipeline
        self._items: deque[Item] = deque()  # the queue, guarded by _cond
        self._unheld = 0  # items in _items that are not held upstream: at most queue_size
        self._queued_max = 0
        self._cond = threading.Condition()
        self._counters = Counters(
            "received", "processed", "errors", "dropped_queue_full", "dropped_on_stop", "sink_errors"
        )
        self._idle = threading.Condition()
        self._pending = 0  # items in the queue or being processed
        self._stopping = threading.Event()  # no more items are taken in
        self._closing = threading.Event()  # the worker exits once the queue is empty
        self._abort = threading.Event()  # the worker drops what is left
        self._worker: threading.Thread | None = None
        self._stopped = False
        self._stop_lock = threading.Lock()

    # -- life cycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Open the sinks, start the worker, then the source. Raises :class:`EdgefleetError`."""
        if self._worker is not None or self._stopped:
            raise RuntimeError(f"flow {self.name}: already started")
        try:
            given = self._given_sinks
            built = given if given is not None else (build_sink(c, self.device_id) for c in self.config.sinks)
            for i, sink in enumerate(built):  # each one kept at once, so that stop() closes it
                key = sink.name if sink.name not in self.sinks else f"{sink.name}-{i}"
                self.sinks[key] = sink
            self._worker = threading.Thread(target=self._work, name=f"flow-{self.name}", daemon=True)
            self._worker.start()
            self.source.start(self._emit)
        except BaseException:
            self.stop()
            raise
        log.info("flow %s: %s -> %s -> %s", self.name, self.source.name, self.config.model, ", ".join(self.sinks))

    def stop(self) -> None:
        """Stop the source, finish queued items (for up to ``drain_timeout`` seconds, then drop the
        rest), close the sinks. Idempotent."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        self._stopping.set()  # a source blocked in emit gives up its item
        try:
            self.source.stop()
        except Exception:
            log.exception("flow %s: stopping source %s failed", self.name, self.source.name)
        self._closing.set()
        worker = self._worker
        if worker is not None:
            worker.join(self.config.drain_timeout)
            if worker.is_alive():
                self._abort.set()
                worker.join(60.0)
                if worker.is_alive():
                    log.warning("flow %s: an inference did not finish within 60 s; leaving it", self.name)
        for name, sink in self.sinks.items():
            try:
                sink.close()
            except Exception:
                log.exception("flow %s: closing sink %s failed", self.name, name)
        c = self._counters.snapshot()
        log.info("flow %s: stopped; %s", self.name, ", ".join(f"{k} {v}" for k, v in c.items()))

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the source has ended and every item it emitted was handled; true if so."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self.source.ended.wait(timeout):
            return False
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, left)

    def counters(self) -> dict[str, Any]:
        """The flow's counters, with ``queued`` (now), ``source`` and ``sinks`` (by name)."""
        c: dict[str, Any] = self._counters.snapshot()
        with self._cond:
            c["queued"], c["queued_max"] = len(self._items), self._queued_max
        c["source"] = self.source.counters()
        c["sinks"] = {name: s.counters() for name, s in self.sinks.items()}
        return c

    # -- source side -----------------------------------------------------------------------------

    def _emit(self, item: Item) -> None:
        self._counters.inc("received")
        if self._stopping.is_set():
            self._drop(item, "dropped_on_stop")
            return
        with self._idle:
            self._pending += 1
        dropped: Item | None = None
        with self._cond:
            if not item.held:
                if self.source.can_wait:
                    while self._unheld >= self.config.queue_size and not self._stopping.is_set():
                        self._cond.wait(0.1)
                    if self._stopping.is_set():
                        dropped = item
                elif self._unheld >= self.config.queue_size:
                    if self.config.drop == "newest":
                        dropped = item
                    else:
                        dropped = next(old for old in self._items if not old.held)
                        self._items.remove(dropped)  # by identity (Item has no __eq__)
                        self._unheld -= 1
                if dropped is not item:
                    self._unheld += 1
            if dropped is not item:
                self._items.append(item)
                self._queued_max = max(self._queued_max, len(self._items))
                self._cond.notify_all()
        if dropped is not None:
            stop = dropped is item and self.source.can_wait
            self._drop(dropped, "dropped_on_stop" if stop else "dropped_queue_full", pending=True)

    def _drop(self, item: Item, counter: str, pending: bool = False) -> None:
        self._counters.inc(counter)
        self._ack(item, "dropped")
        if pending:
            self._done_one()

    def _done_one(self) -> None:
        with self._idle:
            self._pending -= 1
            if self._pending == 0:
                self._idle.notify_all()

    def _ack(self, item: Item, outcome: Outcome) -> None:
        if item.ack is None:
            return
        try:
            item.ack(outcome)
        except Exception:
            log.exception("flow %s: acknowledging an item from %s failed", self.name, self.source.name)

    # -- worker ----------------------------------------------------------------------------------

    def _take(self) -> list[Item] | None:
        """Everything queued now (waiting for an item); None once closing and empty."""
        with self._cond:
            while not self._items:
                if self._closing.is_set():
                    return None
                self._cond.wait(0.1)
            batch = list(self._items)
            self._items.clear()
            self._unheld = 0
            self._cond.notify_all()  # a waiting source may go on
        return batch

    def _work(self) -> None:
        while (batch := self._take()) is not None:
            for item in batch:
                if self._abort.is_set():
                    self._drop(item, "dropped_on_stop", pending=True)
                    continue
                try:
                    self._process(item)
                except Exception:  # a bug here must not end the flow
                    self._counters.inc("errors")
                    log.exception("flow %s: unexpected error", self.name)
                finally:
                    self._done_one()

    def _process(self, item: Item) -> None:
        t0 = time.monotonic()
        try:
            result = self._get_pipeline().run(item.data, raw_outputs=self.config.raw_outputs)
        except Exception as e:
            msg = str(e) if isinstance(e, EdgefleetError) else f"{type(e).__name__}: {e}"
            self._counters.inc("errors")
            self.last_error = msg
            log.warning("flow %s: %s: %s", self.name, _describe(item), msg, exc_info=not isinstance(e, EdgefleetError))
            self._ack(item, "error")
            if self.config.send_errors:
                self._send({"error": msg, "model": self.config.model, "meta": self._meta(item, t0)})
            return
        result["meta"] = self._meta(item, t0)
        if self._remember is not None:
            pid = self._remember(result)
            if pid is not None:
                result["id"] = pid
        self._send(result)
        self._counters.inc("processed")
        self._ack(item, "ok")

    def _meta(self, item: Item, t0: float) -> dict[str, Any]:
        t1 = time.monotonic()
        return {
            **item.meta,
            "flow": self.name,
            "finished_at": time.time(),
            "latency_ms": round((t1 - item.received) * 1000, 3),
            "inference_ms": round((t1 - t0) * 1000, 3),
        }

    def _send(self, result: dict[str, Any]) -> None:
        for name, sink in self.sinks.items():
            try:
                sink.send(result)
            except Exception:
                self._counters.inc("sink_errors")
                log.exception("flow %s: sink %s failed", self.name, name)


def _describe(item: Item) -> str:
    m = item.meta
    for key in ("path", "topic", "frame", "line"):
        if key in m:
            extra = f" (id {m['id']})" if "id" in m else ""
            return f"{m.get('source', 'input')} {key} {m[key]}{extra}"
    return str(m.get("source", "input"))
