"""Shadow mode's cost to serving (issue 12): the served model's p50/p99 with and without a shadow
candidate, in one run.

The path measured is the agent's runtime call as served: ``Model.predict`` with its telemetry
``ModelStats`` attached (what every served call pays), whose ``observe`` offers each call to the
:class:`~edgefleet.agent.shadow.ShadowRunner` when a candidate is attached; the candidate runs in the
runner's thread. Both sides run in the same process, in rounds that alternate (shuffled) so both see the
same machine state. Rows per model:

- ``paced``: calls at ``--rate`` per second (a device's load: the candidate runs between calls);
- ``back to back``: calls with no pause (the candidate's run competes with serving for the cores);
- with the default shadow rate (5 inputs/s compared) and with ``--stress-rate`` (50/s), what a
  shadow costs when far more of the live inputs are compared.

Models: ``digits`` (the updater's test classifier, [1, 64] -> [1, 10], tens of µs; candidate: another
version) and ``dense`` (``bench/_models.py``: 32 x 512, four dense layers, about 1 ms a call; candidate:
the same network loaded again). Figures are printed, never asserted.

    .venv/bin/python bench/shadow.py [--seconds 1.5] [--rounds 4] [--rate 200] [--stress-rate 50]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
sys.path.insert(0, str(ROOT / "bench"))

from edgefleet.agent import load_model  # noqa: E402
from edgefleet.agent.runtime import Model  # noqa: E402
from edgefleet.agent.shadow import DEFAULT_MAX_RATE, ShadowRunner  # noqa: E402
from edgefleet.agent.telemetry.measure import ModelStats  # noqa: E402


def machine_line() -> str:
    import onnxruntime

    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln),
        platform.processor(),
    )
    load = os.getloadavg()
    return (f"machine: {cpu}, {len(os.sched_getaffinity(0))} cores; Linux {platform.release()}; Python "
            f"{platform.python_version()}, numpy {np.__version__}, onnxruntime {onnxruntime.__version__}; "
            f"load average at start {load[0]:.2f}")


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def serve(model: Model, feeds: dict[str, Any], seconds: float, rate: float | None) -> list[float]:
    """Served calls for ``seconds`` (paced at ``rate`` a second, or back to back); each call's seconds."""
    lat: list[float] = []
    step = 1.0 / rate if rate else 0.0
    nxt = time.perf_counter()
    end = nxt + seconds
    while time.perf_counter() < end:
        if step:
            nxt += step
            pause = nxt - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
        t0 = time.perf_counter()
        model.predict(feeds)
        lat.append(time.perf_counter() - t0)
    return lat


def models(tmp: Path) -> dict[str, tuple[Model, Model, dict[str, Any]]]:
    import _models
    import make_update_models as upd

    served = load_model(upd.bundle("good", "1.0.0", tmp / "d1"))
    cand = load_model(upd.bundle("good", "2.0.0", tmp / "d2"))
    dense = _models.dense_onnx(tmp / "dense.onnx")
    rng = np.random.default_rng(0)
    return {
        "digits": (served, cand, {"x": upd.sample_input(3)}),
        "dense": (load_model(dense), load_model(dense),
                  {"x": rng.standard_normal((32, 512)).astype(np.float32)}),
    }


def run_case(served: Model, cand: Model, feeds: dict[str, Any], shadow_rate: float, rate: float | None,
             seconds: float, rounds: int) -> dict[str, Any]:
    stats = ModelStats.from_model("m", "1", served, baseline=False)
    served.telemetry = stats
    runner = ShadowRunner("m", cand, "2", max_rate=shadow_rate).start()
    lat: dict[str, list[float]] = {"off": [], "on": []}
    serve(served, feeds, 0.2, rate)  # warm
    try:
        for _ in range(rounds):
            sides = ["off", "on"]
            random.shuffle(sides)
            for side in sides:
                stats.shadow = runner if side == "on" else None
                runner.wait_idle(10)
                lat[side] += serve(served, feeds, seconds, rate)
        stats.shadow = None
        runner.wait_idle(10)
        block = runner.take()
    finally:
        runner.stop()
        served.telemetry = None
    out: dict[str, Any] = {"shadow": block, "calls": len(lat["on"])}
    for side, v in lat.items():
        out[side] = {"p50": pct(v, 0.50) * 1e6, "p99": pct(v, 0.99) * 1e6, "mean": statistics.fmean(v) * 1e6}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=1.5, help="seconds of calls per side per round")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--rate", type=float, default=200.0, help="paced rows: served calls per second")
    ap.add_argument("--stress-rate", type=float, default=50.0, help="the stress rows' shadow inputs per second")
    args = ap.parse_args()
    print(machine_line())
    print(f"{args.seconds:g} s of calls per side per round, {args.rounds} rounds; latencies in µs of Model.predict "
          "with telemetry attached; 'on' = a shadow candidate attached; compared/skipped: the runner's counts "
          "(samples: rows of a batch count one each)")
    head = (f"{'model':7} {'load':13} {'shadow/s':>8} {'calls':>7} {'off p50':>8} {'on p50':>8} {'ratio':>6} "
            f"{'off p99':>8} {'on p99':>8} {'ratio':>6} {'compared':>8} {'skipped':>8}")
    print(head)
    print("-" * len(head))
    with tempfile.TemporaryDirectory(prefix="bench-shadow-") as tmp:
        for name, (served, cand, feeds) in models(Path(tmp)).items():
            for load, rate in (("paced", args.rate), ("back to back", None)):
                for shadow_rate in (DEFAULT_MAX_RATE, args.stress_rate):
                    r = run_case(served, cand, feeds, shadow_rate, rate, args.seconds, args.rounds)
                    off, on, sh = r["off"], r["on"], r["shadow"]
                    print(f"{name:7} {load:13} {shadow_rate:8g} {r['calls']:7d} {off['p50']:8.1f} {on['p50']:8.1f} "
                          f"{on['p50'] / off['p50']:6.3f} {off['p99']:8.1f} {on['p99']:8.1f} "
                          f"{on['p99'] / off['p99']:6.3f} {sh['compared']:8d} {sh['skipped']:8d}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
