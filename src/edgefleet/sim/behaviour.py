"""The simulator's cost model: what one model version costs and does on a virtual device. Pure (no I/O,
no clock): everything random comes from the ``numpy.random.Generator`` the caller passes, everything
per device from a hash of the device id and the version.

Per version ``V`` (a version not named in a mapping gets the default):

- **latency** of one inference: lognormal, median ``base_latency_s * slow[V]`` (default 1.0), shape
  ``sigma`` (so every quantile scales with ``slow[V]``: a version with ``slow=2`` has twice the p95);
- **errors**: each inference fails with probability ``errors[V]`` (default ``error_rate``);
- **self-test**: fails on a deterministic fraction ``fail[V]`` of the devices, those whose
  ``sha256(device_id NUL V)`` falls below it (the same devices every run: 0.3 is the same 30% each
  time, 1.0 every device, 0 none);
- **shadow agreement**: a compared input agrees with the served version with probability
  ``1 - disagree[V]`` (V the candidate); ``abs_error_sum`` adds a small difference for an agreement,
  a large one for a disagreement;
- **live accuracy**: a prediction is right with probability ``accuracy[V]`` (default
  ``default_accuracy``), and a fraction ``feedback`` of the successful predictions get their label back.

``rate`` is the inferences per second of one device (Poisson arrivals); ``shadow_rate`` the most
inputs per second a shadow candidate is run on (the agent's token bucket; the rest are ``skipped``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgefleet.agent.metrics import BUCKETS
from edgefleet.errors import ConfigError

__all__ = ["Behaviour", "Interval", "ShadowFigures", "parse_overrides"]

Array = np.ndarray[Any, Any]
CLASSES = 10  # class indices of the simulated classifier (labels fed back are 0..9)
_AGREE_DIFF = 0.002  # mean |served - candidate| of an agreeing comparison (about)
_DISAGREE_DIFF = 0.3  # ... and of a disagreeing one


@dataclass(frozen=True)
class Interval:
    """What one served version did over a stretch of simulated time."""

    inferences: int  # calls, failed ones included
    errors: int
    latencies: Array  # seconds of each successful call (len == inferences - errors)
    counts: list[int]  # the latencies binned on BUCKETS (counts[i]: > BUCKETS[i-1], <= BUCKETS[i]; last: above)
    feedback: list[tuple[int, int]]  # (predicted, true) class pairs of the predictions given a label


@dataclass(frozen=True)
class ShadowFigures:
    compared: int
    agreed: int
    skipped: int
    abs_error_sum: float


def _check_map(name: str, m: Mapping[str, float], lo: float, hi: float | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in m.items():
        v = float(v)
        if not math.isfinite(v) or v < lo or (hi is not None and v > hi):
            bound = f"{lo}..{hi}" if hi is not None else f">= {lo}"
            raise ConfigError(f"{name}: {k}={v} is out of range ({bound})")
        out[str(k)] = v
    return out


@dataclass(frozen=True)
class Behaviour:
    base_latency_s: float = 0.005
    sigma: float = 0.25
    error_rate: float = 0.0001
    rate: float = 20.0
    shadow_rate: float = 5.0
    default_accuracy: float = 0.95
    feedback: float = 0.1
    slow: Mapping[str, float] = field(default_factory=dict)
    fail: Mapping[str, float] = field(default_factory=dict)
    disagree: Mapping[str, float] = field(default_factory=dict)
    accuracy: Mapping[str, float] = field(default_factory=dict)
    errors: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, v, lo, hi in (("base_latency_s", self.base_latency_s, 1e-7, 10.0), ("sigma", self.sigma, 0.0, 3.0),
                                ("error_rate", self.error_rate, 0.0, 1.0), ("rate", self.rate, 0.0, 1e6),
                                ("shadow_rate", self.shadow_rate, 0.0, 1e6),
                                ("default_accuracy", self.default_accuracy, 0.0, 1.0),
                                ("feedback", self.feedback, 0.0, 1.0)):
            if not (math.isfinite(v) and lo <= v <= hi):
                raise ConfigError(f"{name}: {v} is out of range ({lo}..{hi})")
        object.__setattr__(self, "slow", _check_map("slow", self.slow, 1e-6, 1e6))
        object.__setattr__(self, "fail", _check_map("fail", self.fail, 0.0, 1.0))
        object.__setattr__(self, "disagree", _check_map("disagree", self.disagree, 0.0, 1.0))
        object.__setattr__(self, "accuracy", _check_map("accuracy", self.accuracy, 0.0, 1.0))
        object.__setattr__(self, "errors", _check_map("errors", self.errors, 0.0, 1.0))

    # per version -------------------------------------------------------------------------------

    def median_latency(self, version: str) -> float:
        return self.base_latency_s * self.slow.get(version, 1.0)

    def latency_quantile(self, version: str, q: float) -> float:
        """The exact ``q``-quantile of one inference's latency (the lognormal's)."""
        from statistics import NormalDist

        return self.median_latency(version) * math.exp(self.sigma * NormalDist().inv_cdf(q))

    def error_probability(self, version: str) -> float:
        return self.errors.get(version, self.error_rate)

    def accuracy_of(self, version: str) -> float:
        return self.accuracy.get(version, self.default_accuracy)

    def agreement(self, candidate: str) -> float:
        return 1.0 - self.disagree.get(candidate, 0.0)

    def selftest_fails(self, device_id: str, version: str) -> bool:
        """Whether ``device_id``'s self-test of ``version`` fails: the same answer every time."""
        rate = self.fail.get(version, 0.0)
        if rate <= 0.0:
            return False
        if rate >= 1.0:
            return True
        return device_fraction(device_id, version) < rate

    # random draws --------------------------------------------------------------------------------

    def calls(self, seconds: float, rng: np.random.Generator) -> int:
        """Inferences arriving in ``seconds`` (Poisson, mean ``rate * seconds``)."""
        if seconds <= 0 or self.rate <= 0:
            return 0
        return int(rng.poisson(self.rate * seconds))

    def serve(self, version: str, n: int, rng: np.random.Generator) -> Interval:
        """``n`` inferences of ``version``: failures, latencies, binned latencies, labelled predictions."""
        errors = int(rng.binomial(n, self.error_probability(version))) if n else 0
        ok = n - errors
        lat = self.median_latency(version) * np.exp(self.sigma * rng.standard_normal(ok)) if ok else np.empty(0)
        counts = np.bincount(np.searchsorted(BUCKETS, lat, side="left"), minlength=len(BUCKETS) + 1)
        labelled = int(rng.binomial(ok, self.feedback)) if ok else 0
        pairs: list[tuple[int, int]] = []
        if labelled:
            true = rng.integers(0, CLASSES, labelled)
            right = rng.random(labelled) < self.accuracy_of(version)
            wrong = (true + rng.integers(1, CLASSES, labelled)) % CLASSES
            pred = np.where(right, true, wrong)
            pairs = list(zip(pred.tolist(), true.tolist(), strict=True))
        return Interval(n, errors, lat, [int(c) for c in counts], pairs)

    def shadow(self, candidate: str, offered: int, seconds: float, rng: np.random.Generator) -> ShadowFigures:
        """Of ``offered`` live inputs over ``seconds``, what a shadow ``candidate`` compared (at most
        ``shadow_rate`` a second), agreed on, skipped, and the sum of the mean differences."""
        if offered <= 0:
            return ShadowFigures(0, 0, 0, 0.0)
        budget = int(rng.poisson(self.shadow_rate * seconds)) if seconds > 0 else 0
        compared = min(offered, budget)
        agreed = int(rng.binomial(compared, self.agreement(candidate))) if compared else 0
        diff = (agreed * _AGREE_DIFF * float(rng.uniform(0.5, 1.5)) +
                (compared - agreed) * _DISAGREE_DIFF * float(rng.uniform(0.5, 1.5)))
        return ShadowFigures(compared, agreed, offered - compared, diff)


def device_fraction(device_id: str, version: str) -> float:
    """A number in [0, 1) fixed by (device, version): which devices a fraction picks."""
    h = hashlib.sha256(f"{device_id}\0{version}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def parse_overrides(option: str, items: Sequence[str]) -> dict[str, float]:
    """``["2.0.0=0.3", "3.0.0=1"]`` (the repeatable ``--fail-rate VERSION=X`` options) as a dict.
    Raises ConfigError naming ``option`` and the item."""
    out: dict[str, float] = {}
    for item in items:
        for part in item.split(","):
            part = part.strip()
            if not part:
                continue
            version, sep, value = part.partition("=")
            try:
                if not sep or not version:
                    raise ValueError
                out[version.strip()] = float(value)
            except ValueError:
                raise ConfigError(f"{option}: {part!r} is not VERSION=NUMBER (e.g. 2.0.0=0.3)") from None
    return out
