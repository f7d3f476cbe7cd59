"""Shadow mode: a candidate version runs beside the served one on a sample of live inputs, off the
serving path, and how often the two agree goes into telemetry.

::

    serving thread: Model.predict -> ModelStats.observe -> ShadowRunner.offer(feeds, outputs)
                    (token bucket and slot check under a short lock; copy the kept input; never waits)
    shadow thread:  candidate.predict(copy) -> compare with the served answer -> counters

The served caller never waits for the candidate: ``offer`` takes a lock only to count and to reserve a
slot (no lock is held while the candidate runs), and whatever the candidate does (raise, return the
wrong shape) is counted as a disagreement in the shadow thread, never seen by the caller. Memory is
bounded: at most ``queue`` copied inputs exist at once (the one the candidate is running included).

Comparison, on the served model's first output: *classifier-shaped* (``[K]`` or ``[B, K]`` with
``K > 1``: a vector per sample) -> each sample agrees when both give the same argmax; otherwise the
call agrees when ``mean |served - candidate| <= tolerance``: the constructor's ``tolerance``, else the
candidate bundle's golden tolerance (``atol + rtol * mean |served|``), else ``1e-3`` of the served
output's range. ``abs_error_sum`` adds the mean absolute difference of each compared sample.

:meth:`ShadowRunner.take` returns the counters of the interval and starts a new one (the telemetry
``models[].shadow`` block: ``version``, ``compared``, ``agreed``, ``skipped``, ``abs_error_sum``, and
``errors``, the candidate runs that raised or gave an output that cannot be compared).
"""

from __future__ import annotations

import collections
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from edgefleet.agent.runtime import Model

__all__ = ["DEFAULT_MAX_RATE", "DEFAULT_QUEUE", "ServedSpec", "ShadowRunner"]

log = logging.getLogger(__name__)

DEFAULT_MAX_RATE = 5.0  # inputs per second run on the candidate, at most
DEFAULT_QUEUE = 2  # copied inputs held at once (waiting or running on the candidate)
RANGE_TOLERANCE = 1e-3  # dense outputs without a golden tolerance: this fraction of the served output's range
_NICE = 10  # the shadow thread's niceness over the process's (Linux): serving threads win the CPU

Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class ServedSpec:
    """What the runner needs to know of the served model: its first output's name, and the (scale, zero
    point) of its quantized inputs and outputs (the served call hands over raw integer tensors)."""

    first_output: str | None = None
    quant_in: Mapping[str, tuple[float, int]] = field(default_factory=dict)
    quant_out: Mapping[str, tuple[float, int]] = field(default_factory=dict)

    @classmethod
    def of(cls, model: Model) -> ServedSpec:
        return cls(
            first_output=model.outputs[0].name if model.outputs else None,
            quant_in={s.name: (s.quantization.scale, s.quantization.zero_point)
                      for s in model.inputs if s.quantization is not None},
            quant_out={s.name: (s.quantization.scale, s.quantization.zero_point)
                       for s in model.outputs if s.quantization is not None},
        )


_PLAIN = ServedSpec()


class ShadowRunner:
    """Run ``candidate`` (version ``version``) beside the model served as ``served_name``.

    ``max_rate``: inputs per second offered to the candidate at most (a token bucket holding up to
    ``queue`` tokens; 0 runs none); ``queue``: copied inputs held at once; ``tolerance``: the dense
    outputs' bound on the mean absolute difference (None: see the module docstring). ``clock`` is
    monotonic seconds. Call :meth:`start` before offering, :meth:`stop` when the shadow ends.
    """

    def __init__(
        self,
        served_name: str,
        candidate: Model,
        version: str,
        max_rate: float = DEFAULT_MAX_RATE,
        queue: int = DEFAULT_QUEUE,
        tolerance: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_rate < 0 or not math.isfinite(max_rate):
            raise ValueError(f"max_rate: expected a finite number >= 0 per second, got {max_rate!r}")
        if queue < 1:
            raise ValueError(f"queue: expected at least 1, got {queue!r}")
        if tolerance is not None and not (tolerance >= 0 and math.isfinite(tolerance)):
            raise ValueError(f"tolerance: expected a finite number >= 0, got {tolerance!r}")
        self.served_name = served_name
        self.candidate = candidate
        self.version = version
        self.max_rate = float(max_rate)
        self.queue = int(queue)
        self.tolerance = tolerance
        golden = candidate.manifest.golden if candidate.manifest is not None else None
        self._golden = (golden.atol, golden.rtol) if golden is not None else None
        self._clock = clock
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)  # an input is queued (or stop): the shadow thread waits
        self._done = threading.Condition(self._lock)  # an input was compared: wait_idle waits
        self._items: collections.deque[tuple[dict[str, Array], Array | None, ServedSpec]] = collections.deque()
        self._held = 0  # inputs copied or being copied, queued, or running on the candidate (<= queue)
        self._tokens = float(min(self.queue, max(1.0, self.max_rate)))
        self._refilled = clock()
        self._next_token = -math.inf if self.max_rate > 0 else math.inf  # when the bucket holds a token again
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._zero()

    def _zero(self) -> None:
        self.compared = 0
        self.agreed = 0
        self.skipped = 0
        self.errors = 0
        self.abs_error_sum = 0.0

    # lifecycle -----------------------------------------------------------------------------------

    def start(self) -> ShadowRunner:
        """Start the shadow thread (a daemon); returns self."""
        with self._lock:
            if self._thread is not None:
                return self
            self._thread = threading.Thread(target=self._run, name=f"shadow-{self.served_name}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop taking inputs, drop the queued ones, and wait up to ``timeout`` seconds for a candidate
        run in progress (the thread is a daemon: a candidate that hangs does not hold the agent)."""
        with self._lock:
            self._stopped = True
            self._next_token = math.inf
            self._held -= len(self._items)
            self._items.clear()
            self._ready.notify_all()
            self._done.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopped

    @property
    def held(self) -> int:
        """Copied inputs held now (queued or running on the candidate): never more than ``queue``."""
        return self._held

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every kept input was compared (for tests and benchmarks); False on timeout."""
        with self._lock:
            return self._done.wait_for(lambda: self._held == 0 or self._stopped, timeout)

    # the serving side ----------------------------------------------------------------------------

    def offer(self, feeds: Mapping[str, Array], outputs: Mapping[str, Array], spec: ServedSpec | None = None) -> bool:
        """An answer the served model just computed for ``feeds``. Kept (copied) for the candidate when
        the rate allows and a slot is free, else counted as skipped; returns whether it was kept.
        Never raises for what the inputs are, never waits for the candidate."""
        # Fast path, no lock (most calls: the bucket is empty): a race between serving threads loses a
        # skipped count at worst, as the runtime's Watch may lose a sample.
        if self._clock() < self._next_token or self._held >= self.queue:
            self.skipped += 1
            return False
        spec = spec or _PLAIN
        with self._lock:
            if self._stopped or self._held >= self.queue or not self._take_token():
                self.skipped += 1
                return False
            self._held += 1
        try:  # outside the lock: copying a large input must not hold other serving threads
            name = spec.first_output if spec.first_output in outputs else next(iter(outputs), None)
            first = None if name is None else np.array(outputs[name], copy=True)
            item = ({k: np.array(v, copy=True) for k, v in feeds.items()}, first, spec)
        except Exception:  # an odd tensor the served model took: not compared
            with self._lock:
                self._held -= 1
                self.skipped += 1
                self._done.notify_all()
            return False
        with self._lock:
            if self._stopped:
                self._held -= 1
                self.skipped += 1
                self._done.notify_all()
                return False
            self._items.append(item)
            self._ready.notify()
        return True

    def _take_token(self) -> bool:
        """The token bucket (called under the lock): ``max_rate`` tokens a second, up to ``queue``."""
        if self.max_rate <= 0:
            return False
        now = self._clock()
        cap = float(min(self.queue, max(1.0, self.max_rate)))
        self._tokens = min(cap, self._tokens + (now - self._refilled) * self.max_rate)
        self._refilled = now
        if self._tokens < 1.0:
            self._next_token = now + (1.0 - self._tokens) / self.max_rate
            return False
        self._tokens -= 1.0
        if self._tokens < 1.0:
            self._next_token = now + (1.0 - self._tokens) / self.max_rate
        return True

    # telemetry -----------------------------------------------------------------------------------

    def take(self, reset: bool = True) -> dict[str, Any]:
        """The telemetry ``shadow`` block of the interval; ``reset`` starts a new interval."""
        with self._lock:
            out: dict[str, Any] = {
                "version": self.version,
                "compared": self.compared,
                "agreed": self.agreed,
                "skipped": self.skipped,
                "abs_error_sum": float(f"{self.abs_error_sum:.6g}"),
                "errors": self.errors,
            }
            if reset:
                self._zero()
        return out

    # the shadow thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        _lower_priority()
        while True:
            with self._lock:
                while not self._items and not self._stopped:
                    self._ready.wait()
                if self._stopped:
                    return
                feeds, served, spec = self._items.popleft()
            try:
                compared, agreed, err, failed = self._compare(feeds, served, spec)
            except Exception as e:  # a candidate that raises is a disagreement, never the caller's problem
                log.debug("shadow %s %s: candidate failed: %s", self.served_name, self.version, e)
                compared, agreed, err, failed = 1, 0, 0.0, True
            with self._lock:
                self._held -= 1
                self._done.notify_all()
                if self._stopped:
                    return
                self.compared += compared
                self.agreed += agreed
                self.abs_error_sum += err
                self.errors += int(failed)

    def _compare(self, feeds: dict[str, Array], served: Array | None, spec: ServedSpec) -> tuple[int, int, float, bool]:
        """(compared, agreed, sum of mean |a - b|, failed) for one offered call."""
        for name, (scale, zp) in spec.quant_in.items():  # the candidate gets the real values
            if name in feeds and feeds[name].dtype.kind in "iu":
                feeds[name] = ((feeds[name].astype(np.float32) - np.float32(zp)) * np.float32(scale))
        result = self.candidate.predict(feeds, dequantize_outputs=True)
        if served is None or not result:
            return 1, 0, 0.0, True
        name = spec.first_output if spec.first_output in result else next(iter(result))
        got = np.asarray(result[name])
        q = spec.quant_out.get(spec.first_output or "")
        a = served.astype(np.float64)
        if q is not None and served.dtype.kind in "iu":
            a = (a - q[1]) * q[0]
        if got.shape != a.shape or got.dtype.kind not in "biuf" or a.dtype.kind not in "biuf":
            return 1, 0, 0.0, True
        b = got.astype(np.float64)
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            return 1, 0, 0.0, True
        if a.ndim in (1, 2) and a.shape[-1] > 1:  # a vector per sample: top-1
            rows_a, rows_b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
            same = rows_a.argmax(axis=-1) == rows_b.argmax(axis=-1)
            diff = np.abs(rows_a - rows_b).mean(axis=-1)
            return len(same), int(same.sum()), float(diff.sum()), False
        d = float(np.abs(a - b).mean()) if a.size else 0.0
        return 1, int(d <= self._tolerance_for(a)), d, False

    def _tolerance_for(self, served: Array) -> float:
        if self.tolerance is not None:
            return self.tolerance
        if not served.size:
            return 0.0
        if self._golden is not None:
            atol, rtol = self._golden
            return float(atol + rtol * np.abs(served).mean())
        return float(RANGE_TOLERANCE * (served.max() - served.min()))


def _lower_priority() -> None:
    """Nice the calling thread (Linux: a thread is a task with its own niceness); elsewhere nothing."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + _NICE))
    except (AttributeError, OSError):
        pass
