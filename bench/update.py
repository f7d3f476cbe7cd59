"""Fleet updater benchmarks (issue 10): a real ``edgefleet server run``, the operator's CLI and keyring,
and real ``edgefleet agent run`` processes (the harness of ``tests/updater/_fleet.py``). Sections:

``--latency``  time from ``device assign`` (the operator API's PUT; t0 just before it) to the first
               inference answered by the new version (the agent's local API polled at 100 Hz), a small
               model, ``checkin_interval`` 1 s; split by the agent's own events (their ``at``) and
               ``update.json``'s ``last_checkin`` (the start of the check-in that saw the change):
               assign call, check-in wait, check-in + TUF refresh of both repositories, download,
               install, self-test, switch, first answer. ``--runs`` updates alternating 2.0.0 / 1.0.0.
               Goal: <= 2 s beyond the download.
``--download`` ``DeviceClient.download`` (Range-resumable, bounded by the signed length, sha256 while it
               writes, fsync every 4 MiB) against a bare ``httpx`` stream written to a file, the same
               ``/tuf/image/targets/...`` URL of a ~64 MB bundle, the same device token, alternating
               runs in a shuffled order; median and best MB/s, the ratio (goal >= 0.9x) and the client's
               CPU time; then where the time goes: httpx doing the same hash + fsync, the download with
               1 MiB chunks, fsync every 16 MiB, no sha256 (a copy of ``client.py`` loaded under another
               name with other module globals; the file is untouched), and sha256 / write / fsync costs
               measured alone on the same bytes.
``--rss``      VmRSS and VmHWM of the agent process (``/proc/PID/status``) at 200 Hz from before the
               assign of the ~5 MB ``big`` model until its commit, with the phase from ``update.json``;
               idle, peak, peak - idle and its ratio to the bundle size (goal <= 2x), peak per phase;
               then ``load_model`` of that bundle traced session by session in fresh processes, as is
               and with the proposed fixes patched in (first session freed first, ``malloc_trim``).
``--checkin``  ``bench/fleet_checkin.py --tuf`` (10,000 devices with director metadata against a bare
               FastAPI 304), printed as it prints it.

No section asserts a figure: each prints what it measured. With no section flag, all run.

    .venv/bin/python bench/update.py [--latency] [--download] [--rss] [--checkin] [--runs 10]
        [--download-runs 7] [--megabytes 64] [--rss-runs 2] [--devices 10000] [--passes 2]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))

from updater._fleet import Agent, Fleet, models, running_fleet, wait_for  # noqa: E402

MB = 1e6  # throughput in MB/s (10^6 bytes); sizes of bundles in MB too
FAST = {"checkin_interval": 1.0, "probation_inferences": 20, "probation_seconds": 1.0}
POLL_HZ = 100.0  # local API polls per second while waiting for the new version
RSS_HZ = 200.0  # /proc samples per second


# ------------------------------------------------------------------ helpers


def machine_line() -> str:
    import onnxruntime

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if "model name" in ln), platform.processor())
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"machine: {cpu}, {len(os.sched_getaffinity(0))} cores, "
            f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB; Linux "
            f"{platform.release()}; Python {platform.python_version()}, numpy {np.__version__}, onnxruntime "
            f"{onnxruntime.__version__}, urllib3 {_version('urllib3')}, httpx {httpx.__version__}; "
            f"load average {load}")


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def _at(event: dict[str, Any]) -> float:
    """An event's ``at`` (the agent's wall clock, ISO 8601) as epoch seconds."""
    return datetime.fromisoformat(str(event["at"]).replace("Z", "+00:00")).timestamp()


def _state(agent: Agent) -> dict[str, Any]:
    """The agent's ``update.json`` (written atomically: a read sees a whole file); {} before it exists."""
    try:
        out: dict[str, Any] = json.loads((agent.state_dir / "update.json").read_bytes())
        return out
    except (FileNotFoundError, ValueError):
        return {}


def _committed(agent: Agent, version: str) -> bool:
    st = _state(agent)
    cur = st.get("current", {}).get(models.MODEL_NAME)
    return st.get("pending") is None and cur is not None and cur["version"] == version


def _last_seq(fleet: Fleet, device_id: str) -> int:
    return max((e["seq"] or 0 for e in fleet.events(device_id)), default=0)


def _events_since(fleet: Fleet, device_id: str, seq: int, until: str, version: str) -> dict[str, dict[str, Any]]:
    """The first event of each kind after ``seq``, once the server has ``until`` for ``version``."""
    def got() -> dict[str, dict[str, Any]] | None:
        out: dict[str, dict[str, Any]] = {}
        for e in fleet.events(device_id):
            if (e["seq"] or 0) > seq:
                out.setdefault(e["kind"], e)
        done = until in out and out[until].get("version") == version
        return out if done else None

    events: dict[str, dict[str, Any]] = fleet.wait_for(got, 60, f"{until} {version} on the server")
    return events


def _assign(fleet: Fleet, device_id: str, version: str) -> None:
    """``device assign`` through the operator API (the CLI's own call, without its process start)."""
    r = fleet.http.put(f"/api/v1/devices/{device_id}/models/{models.MODEL_NAME}", json={"version": version})
    if r.status_code != 200:
        raise RuntimeError(f"assign {version}: {r.status_code} {r.text[:300]}")


def _stat(xs: list[float]) -> tuple[float, float]:
    return statistics.median(xs), max(xs)


# ------------------------------------------------------------------ 1. assign -> serving


PHASES = [  # (column, from, to): each a key of the marks in _latency_run
    ("assign", "t0", "put"),
    ("wait", "put", "checkin"),
    ("refresh", "checkin", "update.started"),
    ("download", "update.started", "download.ok"),
    ("install", "download.ok", "install.ok"),
    ("selftest", "install.ok", "selftest.ok"),
    ("switch", "selftest.ok", "switch.ok"),
    ("answer", "switch.ok", "t1"),
]


def _latency_run(fleet: Fleet, agent: Agent, client: httpx.Client, version: str) -> dict[str, float]:
    """One update to ``version``: the marks (epoch seconds) and the phases between them (seconds)."""
    assert agent.device_id is not None
    seq = _last_seq(fleet, agent.device_id)
    x = agent._infer_request(models.sample_input(3))
    url = f"{agent.url}/v2/models/{models.MODEL_NAME}/infer"
    # The agent checks in right after a commit; an assign at a random moment of its interval is what an
    # operator's is (right after the commit it would wait the whole interval every time).
    time.sleep(random.uniform(0, float(FAST["checkin_interval"])))
    marks: dict[str, float] = {"t0": time.time()}
    _assign(fleet, agent.device_id, version)
    marks["put"] = time.time()
    period, nxt, seen = 1.0 / POLL_HZ, time.monotonic(), False
    deadline = nxt + 120
    while True:  # 100 Hz until the new version answers, then until it is committed (probation needs calls)
        r = client.post(url, json=x)
        if not seen and r.status_code == 200 and r.json().get("model_version") == version:
            marks["t1"], seen = time.time(), True
            marks["checkin"] = float(_state(agent)["last_checkin"])  # not rewritten while an update runs
        if seen and _committed(agent, version):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{version}: not served and committed within 120 s; see {agent.log}")
        nxt += period
        time.sleep(max(0.0, nxt - time.monotonic()))
    events = _events_since(fleet, agent.device_id, seq, "update.committed", version)
    for kind in ("update.started", "download.ok", "install.ok", "selftest.ok", "switch.ok", "probation.ok"):
        marks[kind] = _at(events[kind])
    out = {name: marks[b] - marks[a] for name, a, b in PHASES}
    out["total"] = marks["t1"] - marks["t0"]
    out["beyond_download"] = out["total"] - out["download"]
    out["commit"] = _at(events["update.committed"]) - marks["t0"]
    return out


def bench_latency(work: Path, runs: int) -> None:
    print(f"\n1. assign -> serving the new version; checkin_interval {FAST['checkin_interval']:g} s, "
          f"local API polled at {POLL_HZ:g} Hz; {runs} updates alternating 2.0.0 / 1.0.0")
    with running_fleet(work / "latency") as fleet:
        b1 = models.bundle("good", "1.0.0", work / "bundles")
        b2 = models.bundle("good", "2.0.0", work / "bundles")
        for b in (b1, b2):
            fleet.push(b)
        agent = fleet.agent(b1, updates=FAST)
        wait_for(lambda: _state(agent).get("last_refresh") is not None, 60, "the agent's first TUF refresh",
                 [agent.log])
        print(f"bundle: {b2.stat().st_size:,} bytes (model digits, ONNX)")
        cols = [name for name, _, _ in PHASES] + ["total", "beyond_download", "commit"]
        print(f"{'run':>3} {'version':>7} " + " ".join(f"{c:>8}" for c in cols[:-2]) + "  beyond_dl  commit")
        rows: list[dict[str, float]] = []
        with httpx.Client(timeout=30) as client:
            for i in range(runs):
                version = "2.0.0" if i % 2 == 0 else "1.0.0"
                row = _latency_run(fleet, agent, client, version)
                rows.append(row)
                print(f"{i + 1:>3} {version:>7} " + " ".join(f"{row[c]:8.3f}" for c in cols[:-2])
                      + f"  {row['beyond_download']:9.3f} {row['commit']:7.3f}")
        for label, pick in (("median", 0), ("max", 1)):
            print(f"{label:>11} " + " ".join(f"{_stat([r[c] for r in rows])[pick]:8.3f}" for c in cols[:-2])
                  + f"  {_stat([r['beyond_download'] for r in rows])[pick]:9.3f}"
                  + f" {_stat([r['commit'] for r in rows])[pick]:7.3f}")
        med = _stat([r["beyond_download"] for r in rows])
        print(f"seconds; beyond the download: median {med[0]:.3f} s, max {med[1]:.3f} s (goal <= 2 s); "
              f"wait = until the check-in that saw the change started (uniform in 0..interval); "
              f"refresh = that check-in + ngclient refresh of image and director + plan; "
              f"answer = switch.ok to the first poll answered by the new version")


# ------------------------------------------------------------------ 2. download throughput


def big_bundle(folder: Path, megabytes: float, version: str = "9.0.0") -> Path:
    """A bundle whose model member is a ~``megabytes`` MB ONNX file: ``x [1, 64]`` -> MatMul by a random
    ``[64, H]`` float32 matrix -> ReduceMean -> ``y [1, 1]`` (random weights: incompressible)."""
    from onnx import TensorProto, helper, numpy_helper

    from edgefleet.converters.package import package_model

    hidden = int(megabytes * MB / (64 * 4))
    w = np.random.default_rng(7).standard_normal((64, hidden)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("ReduceMean", ["h"], ["y"], axes=[1])],
        "bulk", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])], [numpy_helper.from_array(w, "W")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / "bulk.onnx"
    model.write_bytes(m.SerializeToString())
    x = np.random.default_rng(8).random((2, 1, 64), dtype=np.float32)
    path, _ = package_model(model, "bulk", version, out=folder, golden={"x": x}, description="download bench")
    model.unlink()
    return path


def _client_copy(name: str, **constants: Any) -> ModuleType:
    """A fresh copy of ``edgefleet.agent.updater.client`` (its file, loaded under ``name``) with module
    constants changed: the same code with another chunk size or fsync cadence, for the profile."""
    import edgefleet.agent.updater.client as real

    spec = importlib.util.spec_from_file_location(name, real.__file__)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    for k, v in constants.items():
        setattr(mod, k, v)
    return mod


def _updater_download(client: Any, url: str, dest: Path, length: int) -> tuple[float, float]:
    """(wall seconds, this thread's CPU seconds) of one ``client.download`` into a new file."""
    dest.unlink(missing_ok=True)
    t, c = time.perf_counter(), time.thread_time()
    got = client.download(url, dest, length)
    took, cpu = time.perf_counter() - t, time.thread_time() - c
    assert got == length, (got, length)
    return took, cpu


def _httpx_download(http: httpx.Client, url: str, token: str, dest: Path, length: int,
                    verify: bool = False) -> tuple[float, float]:
    """The floor: one streamed GET written to a file as it comes (no bound, no hash, no fsync in the
    timed part; the file is fsynced after it, so that no run leaves dirty pages to the next). ``verify``:
    the same guarantees done the plain way instead, sha256 while writing and one fsync at the end."""
    dest.unlink(missing_ok=True)
    t, c = time.perf_counter(), time.thread_time()
    n, digest = 0, hashlib.sha256()
    with http.stream("GET", url, headers={"Authorization": f"Bearer {token}"}) as r, dest.open("wb") as f:
        r.raise_for_status()
        for chunk in r.iter_raw():
            f.write(chunk)
            if verify:
                digest.update(chunk)
            n += len(chunk)
        if verify:
            f.flush()
            os.fsync(f.fileno())
        took, cpu = time.perf_counter() - t, time.thread_time() - c
        f.flush()
        os.fsync(f.fileno())
    assert n == length, (n, length)
    return took, cpu


class _NoHash:
    """A sha256 that hashes nothing: ``client.py`` with it is ``download`` minus its digest, which only an
    ``expected_sha256`` reads (the state machine passes none and hashes the staged file again)."""

    def update(self, data: bytes) -> None:
        pass

    def hexdigest(self) -> str:
        return ""


def _sha256_rate(data: bytes) -> float:
    t = time.perf_counter()
    hashlib.sha256(data).hexdigest()
    return len(data) / (time.perf_counter() - t) / MB


def _write_rate(folder: Path, data: bytes, chunk: int, fsync_every: int | None) -> float:
    """MB/s writing ``data`` to a new file in ``chunk`` pieces, fsyncing every ``fsync_every`` bytes
    and at the end (None: never)."""
    path = folder / "write-test"
    path.unlink(missing_ok=True)
    t = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        view, unsynced = memoryview(data), 0
        for i in range(0, len(data), chunk):
            os.write(fd, view[i:i + chunk])
            unsynced += chunk
            if fsync_every is not None and unsynced >= fsync_every:
                os.fsync(fd)
                unsynced = 0
        if fsync_every is not None:
            os.fsync(fd)
    finally:
        os.close(fd)
    took = time.perf_counter() - t
    path.unlink()
    return len(data) / took / MB


def bench_download(work: Path, runs: int, megabytes: float) -> None:
    print(f"\n2. download throughput: DeviceClient.download vs a bare httpx stream, a ~{megabytes:g} MB target, "
          f"{runs} alternating runs each")
    bundle = big_bundle(work / "bulk", megabytes)
    length = bundle.stat().st_size
    sha = hashlib.sha256(bundle.read_bytes()).hexdigest()
    with running_fleet(work / "download") as fleet:
        fleet.push(bundle)
        state = work / "download" / "device"
        device_id = fleet.enroll(state)
        fleet.assign(device_id, "bulk", "9.0.0")  # a device downloads only what its director targets name
        ident = json.loads((state / "identity" / "identity.json").read_bytes())
        from edgefleet.agent.updater.client import DeviceClient

        url = f"/tuf/image/targets/{sha}.bulk-9.0.0.efb"
        dest = work / "download" / "dl"
        dest.mkdir()
        variants: dict[str, Callable[[], tuple[float, float]]] = {}
        clients: list[Any] = []

        def updater(mod: Any) -> Callable[[], tuple[float, float]]:
            c = mod.DeviceClient(fleet.server.url, device_id, Path(ident["key"]), Path(ident["certificate"]))
            clients.append(c)
            return lambda: _updater_download(c, url, dest / "updater.part", length)

        main = DeviceClient(fleet.server.url, device_id, Path(ident["key"]), Path(ident["certificate"]))
        clients.append(main)
        token = main.token()
        with httpx.Client(base_url=fleet.server.url, timeout=60) as http:
            variants["updater"] = lambda: _updater_download(main, url, dest / "updater.part", length)
            variants["httpx"] = lambda: _httpx_download(http, url, token, dest / "httpx.bin", length)
            variants["httpx + sha256 + fsync at the end"] = lambda: _httpx_download(
                http, url, token, dest / "httpx.bin", length, verify=True)
            nohash = types.SimpleNamespace(sha256=_NoHash)
            variants["updater, 1 MiB chunks"] = updater(_client_copy("_client_1m", CHUNK=1 << 20))
            variants["updater, fsync every 16 MiB"] = updater(_client_copy("_client_16m", FSYNC_EVERY=16 << 20))
            variants["updater, no sha256"] = updater(_client_copy("_client_nohash", hashlib=nohash))
            variants["updater, no sha256, fsync every 16 MiB"] = updater(
                _client_copy("_client_nohash_16m", hashlib=nohash, FSYNC_EVERY=16 << 20))
            for f in variants.values():  # warm: the blob in the page cache, connections open
                f()
            times: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
            order, rng = list(variants), random.Random(1)
            for _ in range(runs):
                rng.shuffle(order)  # every round in another order: no variant always follows the same one
                for k in order:
                    times[k].append(variants[k]())
        for c in clients:
            c.close()
        got = hashlib.sha256((dest / "updater.part").read_bytes()).hexdigest()
        assert got == sha, "the updater's file does not hash to the target"
    rate = {k: length / statistics.median(w for w, _ in v) / MB for k, v in times.items()}
    best = {k: length / min(w for w, _ in v) / MB for k, v in times.items()}
    cpu = {k: statistics.median(c for _, c in v) * 1e3 for k, v in times.items()}
    print(f"target: {length:,} bytes; {runs} runs of each, in a shuffled order each round")
    print(f"  {'':40} {'MB/s p50':>8} {'x httpx':>7} {'best':>7} {'x httpx':>7} {'client CPU ms':>13}")
    for k in times:
        print(f"  {k:40} {rate[k]:8.1f} {rate[k] / rate['httpx']:7.2f} {best[k]:7.1f} {best[k] / best['httpx']:7.2f}"
              f" {cpu[k]:13.1f}")
    print(f"ratio updater / httpx: median {rate['updater'] / rate['httpx']:.2f}, best run "
          f"{best['updater'] / best['httpx']:.2f} (goal >= 0.9)")
    data = bundle.read_bytes()
    print("where the time goes: the same bytes without the network, ms per target (median of 5):")
    hash_ms = statistics.median(length / _sha256_rate(data) for _ in range(5)) * 1e3 / MB
    print(f"  {'sha256 in memory':40} {hash_ms:6.1f}")
    every: int | None
    for every, label in ((None, "write in 64 KiB pieces, no fsync"), (1 << 62, "the same, one fsync at the end"),
                         (4 << 20, "the same, fsync every 4 MiB + end"), (16 << 20, "the same, every 16 MiB + end")):
        ms = statistics.median(length / _write_rate(dest, data, 64 << 10, every) for _ in range(5)) * 1e3 / MB
        print(f"  {label:40} {ms:6.1f}")


# ------------------------------------------------------------------ 3. RSS during an update


def _rss_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in kB."""
    rss = hwm = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
    return rss, hwm


@contextlib.contextmanager
def _sampler(agent: Agent) -> Iterator[list[tuple[float, int, int, str]]]:
    """Samples (monotonic, VmRSS kB, VmHWM kB, phase) of the agent at RSS_HZ, in a thread, while inside."""
    samples: list[tuple[float, int, int, str]] = []
    stop = threading.Event()

    def run() -> None:
        period, nxt = 1.0 / RSS_HZ, time.monotonic()
        while not stop.is_set():
            rss, hwm = _rss_kb(agent.pid)
            pending = _state(agent).get("pending")
            samples.append((time.monotonic(), rss, hwm, pending["phase"] if pending else "idle"))
            nxt += period
            stop.wait(max(0.0, nxt - time.monotonic()))

    t = threading.Thread(target=run, name="rss", daemon=True)
    t.start()
    try:
        yield samples
    finally:
        stop.set()
        t.join(5)


def bench_rss(work: Path, runs: int) -> None:
    print(f"\n3. agent RSS while it updates to the ~5 MB `big` model (VmRSS at {RSS_HZ:g} Hz; idle = median of "
          "the 2 s before the assign, after = of the last 0.5 s, 1 s after the commit); load 50/s; alternating "
          "big 5.0.0 / good 1.0.0")
    with running_fleet(work / "rss") as fleet:
        good = models.bundle("good", "1.0.0", work / "bundles")
        big = models.bundle("big", "5.0.0", work / "bundles")
        for b in (good, big):
            fleet.push(b)
        size_mb = big.stat().st_size / MB
        agent = fleet.agent(good, updates={**FAST, "checkin_interval": 0.5})
        assert agent.device_id is not None
        wait_for(lambda: _state(agent).get("last_refresh") is not None, 60, "the agent's first TUF refresh",
                 [agent.log])
        print(f"big bundle: {big.stat().st_size:,} bytes")
        with agent.load(rate=50):
            time.sleep(2)  # the load's first calls allocate too: settle before measuring idle
            for i in range(runs):
                version = "5.0.0" if i % 2 == 0 else "1.0.0"
                with _sampler(agent) as samples:
                    time.sleep(2)
                    t_assign = time.monotonic()
                    _assign(fleet, agent.device_id, version)
                    wait_for(lambda v=version: _committed(agent, v), 120, f"commit of {version}", [agent.log])
                    t_commit = time.monotonic()
                    time.sleep(1)
                idle = statistics.median(s[1] for s in samples if s[0] < t_assign)
                during = [s for s in samples if t_assign <= s[0] <= t_commit]
                peak = max(s[1] for s in during)
                after = statistics.median(s[1] for s in samples[-int(RSS_HZ * 0.5):])
                by_phase: dict[str, int] = {}
                started = False  # "idle" after the assign: the check-in wait, then committed (before we saw it)
                for _, rss, _, phase in during:
                    started = started or phase != "idle"
                    key = phase if phase != "idle" else "committed" if started else "check-in wait"
                    by_phase[key] = max(by_phase.get(key, 0), rss)
                rise = (peak - idle) / 1000
                label = "big 5.0.0" if version == "5.0.0" else "back to good 1.0.0"
                print(f"  {label}: idle {idle / 1000:.1f} MB, peak {peak / 1000:.1f} MB, peak - idle {rise:.1f} MB"
                      + (f" = {rise / size_mb:.2f}x the bundle (goal <= 2x)" if version == "5.0.0" else "")
                      + f"; after {after / 1000:.1f} MB; VmHWM {samples[0][2] / 1000:.1f} -> "
                      f"{samples[-1][2] / 1000:.1f} MB; {len(samples)} samples")
                print("    peak by phase (MB): " + ", ".join(f"{p} {v / 1000:.1f}" for p, v in by_phase.items()))
    print("  where it goes: load_model(big) in a fresh process already serving good 1.0.0 (MB above that, "
          "VmRSS; each line its own process):")
    for variant in ("as is", "free first", "free first + trim", "as is + trim"):
        r = subprocess.run([sys.executable, __file__, "--load-profile", variant, str(good), str(big)],
                           capture_output=True, text=True, timeout=300)
        print(r.stdout.rstrip() if r.returncode == 0 else f"    {variant}: failed: {r.stderr[-500:]}")


def _rss_mb() -> float:
    return _rss_kb(os.getpid())[0] / 1000


def load_profile(variant: str, good: Path, big: Path) -> None:
    """(In a fresh process.) Serve ``good``, then load ``big`` as the updater's self-test does
    (``load_model``), tracing each ONNX Runtime session the backend builds. ``variant``: ``as is``;
    ``free first`` (the backend's ``adapt`` drops its first session before it builds the one with the
    measured threads: a patched method, the file is untouched); ``+ trim``: glibc's ``malloc_trim(0)``
    after the load (freed heap back to the system)."""
    import ctypes
    import gc

    from edgefleet.agent.backends import onnx as backend
    from edgefleet.agent.runtime import load_model

    x = {"x": np.random.default_rng(0).random((1, 64), dtype=np.float32)}
    served = load_model(good)
    served.predict(x)
    gc.collect()
    r0 = _rss_mb()
    steps: list[str] = [f"bundle member read {0.0:+.1f}"]
    new_session = backend.OnnxBackend._new_session

    def traced(self: Any, model: bytes | str) -> Any:
        if len(steps) == 1:
            steps[0] = f"model bytes {_rss_mb() - r0:+.1f}"
        session = new_session(self, model)
        steps.append(f"session ({self._threads} thread{'s' * (self._threads > 1)}) -> {_rss_mb() - r0:+.1f}")
        return session

    backend.OnnxBackend._new_session = traced  # type: ignore[method-assign]
    if variant.startswith("free first"):
        adapt = backend.OnnxBackend.adapt

        def adapt_freeing(self: Any, seconds: float | None) -> None:
            threads, spinning = backend.choose_threads(seconds, self._max_threads, self._cores) if seconds else (0, 0)
            if self._model is not None and not self._explicit and (threads, spinning) != (self._threads,
                                                                                           self._spinning):
                self._session = None  # what the proposal changes: the first session goes before the second
            adapt(self, seconds)

        backend.OnnxBackend.adapt = adapt_freeing  # type: ignore[method-assign]
    candidate = load_model(big)
    candidate.predict(x)
    gc.collect()
    loaded = _rss_mb() - r0
    if variant.endswith("trim"):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    print(f"    {variant:18} {', '.join(steps)}; loaded {loaded:+.1f}; settled {_rss_mb() - r0:+.1f}")
    del served, candidate


# ------------------------------------------------------------------ 4. check-in with TUF


def bench_checkin(passes: int, devices: int) -> None:
    print(f"\n4. check-in with director metadata: bench/fleet_checkin.py --tuf --devices {devices} --passes {passes}")
    subprocess.run([sys.executable, str(ROOT / "bench" / "fleet_checkin.py"), "--tuf", "--devices", str(devices),
                    "--passes", str(passes)], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for s in ("latency", "download", "rss", "checkin"):
        ap.add_argument(f"--{s}", action="store_true", help=f"run section {s}")
    ap.add_argument("--runs", type=int, default=10, help="updates in the latency section")
    ap.add_argument("--download-runs", type=int, default=7, help="runs per variant in the download section")
    ap.add_argument("--rss-runs", type=int, default=2, help="updates in the RSS section (big, back, big...)")
    ap.add_argument("--megabytes", type=float, default=64.0, help="download target size, MB")
    ap.add_argument("--passes", type=int, default=2, help="check-in passes over the devices")
    ap.add_argument("--devices", type=int, default=10_000, help="check-in devices")
    ap.add_argument("--load-profile", nargs=3, metavar=("VARIANT", "GOOD", "BIG"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load_profile:
        load_profile(args.load_profile[0], Path(args.load_profile[1]), Path(args.load_profile[2]))
        return
    chosen = [s for s in ("latency", "download", "rss", "checkin") if getattr(args, s)] or [
        "latency", "download", "rss", "checkin"]
    print(machine_line())
    with tempfile.TemporaryDirectory(prefix="update-bench-") as tmp:
        work = Path(tmp)
        for s in chosen:
            t = time.perf_counter()
            if s == "latency":
                bench_latency(work, max(1, args.runs))
            elif s == "download":
                bench_download(work, max(1, args.download_runs), args.megabytes)
            elif s == "rss":
                bench_rss(work, max(1, args.rss_runs))
            else:
                bench_checkin(args.passes, args.devices)
            print(f"({s}: {time.perf_counter() - t:.0f} s)")


if __name__ == "__main__":
    main()
