"""A staged rollout at fleet scale (issue 12): a real ``edgefleet server run`` (SQLite in its data folder, or
the local PostgreSQL in a schema of its own, dropped at the end), a private Mosquitto carrying the
telemetry the server ingests, two versions pushed and signed with the operator's keyring (the harness of
``tests/updater/_fleet.py``), and N virtual devices (``edgefleet.sim.SimFleet``: the real agent's
enrollment, check-in, TUF verification, download, install state machine and telemetry; inference
replaced by the cost model) in this process.

Phases, each timed:

1. enrollment of N devices with one token (``edgefleet agent enroll`` as a function, ``--workers``
   threads), then the devices opened: enrollments per second;
2. v1 to every device: a first rollout, one stage of 100%, no comparative gate and no soak (the way a
   fleet gets its first version without N ``device assign`` calls); until completed and every device
   serves v1, idle;
3. the rollout measured: v2 with ``--stages`` and ``--soak``, the default gates (failure 5%, p95 ratio
   1.2, error rate +1%), until completed. Measured over it: the time to each stage (the audit log's
   ``rollout.advance`` / ``rollout.complete`` entries; the first stage from ``create``), the server
   process's CPU seconds (``/proc/PID/stat``, utime + stime) and, on PostgreSQL, its backends' (the
   server's own connections, matched by port in ``pg_stat_activity``); check-ins answered
   (``edgefleet_checkins_total`` on ``/metrics``) per second against the devices' nominal rate
   (N / ``--checkin``); telemetry stored per second against N / ``--interval``; the controller's time
   per pass (consecutive ``last_judged_at`` values, read from the database at 5 Hz, minus the
   controller's interval: lease + read + judge + commit), split by what the pass decided (an ``assign``
   pass signs every assigned device's director metadata); the sim process's RSS per device.

Prints a progress line every ``--every`` seconds and the table at the end. Figures are printed, never
asserted.

    .venv/bin/python bench/rollout.py --devices 10000 --db sqlite|postgresql [--stages 1,10,50,100]
        [--soak 5] [--checkin 30] [--interval 10] [--workers 16] [--rate 20] [--min-pause 0.25]
        [--rollout-interval 1] [--every 30]
        [--work DIR] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import os
import platform
import secrets
import shutil
import signal
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))

from updater._fleet import Fleet, models  # noqa: E402

from edgefleet.errors import ConfigError  # noqa: E402
from edgefleet.sim import Behaviour, SimFleet, default_updates  # noqa: E402


def _load(name: str, path: Path) -> Any:
    """A module of the tests by its file: ``tests/telemetry`` has no ``__init__.py``, and this folder's
    ``telemetry.py`` (on ``sys.path`` first) would hide that namespace package."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


Broker = _load("_bench_mqtt", ROOT / "tests" / "telemetry" / "_mqtt.py").Broker
MODEL = models.MODEL_NAME
V1, V2 = "1.0.0", "2.0.0"
PG_ADMIN = os.environ.get("EDGEFLEET_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
CLK_TCK = os.sysconf("SC_CLK_TCK")
POLL = 0.2  # s between reads of the rollout's row
ENROLL_RETRIES = 20  # enrollment passes after a 503 (the server's "database busy, retry later")


# ------------------------------------------------------------------ measuring


def machine_line() -> str:
    from importlib.metadata import version

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if "model name" in ln), platform.processor())
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"machine: {cpu}, {len(os.sched_getaffinity(0))} cores, "
            f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB; Linux "
            f"{platform.release()}; Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
            f"SQLAlchemy {version('sqlalchemy')}, psycopg {version('psycopg')}, paho-mqtt {version('paho-mqtt')}, "
            f"urllib3 {version('urllib3')}; load average {load}")


def cpu_seconds(pid: int | str) -> float:
    """utime + stime of process ``pid`` (all its threads), seconds; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def metrics_of(url: str) -> dict[str, float]:
    """The server's ``/metrics`` as {"name{labels}": value} (empty when it does not answer)."""
    try:
        body = httpx.get(f"{url}/metrics", timeout=30).text
    except httpx.HTTPError:
        return {}
    out: dict[str, float] = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[key] = float(value)
    return out


def _sum(m: dict[str, float], prefix: str, has: str = "") -> float:
    return sum(v for k, v in m.items() if k.startswith(prefix) and has in k)


def checkins(m: dict[str, float]) -> float:
    return _sum(m, "edgefleet_checkins_total")


def stored(m: dict[str, float]) -> float:
    return _sum(m, "edgefleet_telemetry_messages_total{", 'result="stored"')


def passes(m: dict[str, float]) -> float:
    return _sum(m, "edgefleet_rollout_decisions_total")


class PgBackends:
    """CPU of the PostgreSQL backends serving the server process: its TCP connections to port 5432
    (``/proc/PID/fd`` socket inodes matched in ``/proc/PID/net/tcp``), their local ports looked up in
    ``pg_stat_activity.client_port``, each backend's ``/proc/PID/stat``. The last value seen of every
    backend is kept, so one that closes keeps its CPU in the sum."""

    def __init__(self, server_pid: int) -> None:
        import psycopg

        self.pid = server_pid
        self.conn = psycopg.connect(PG_ADMIN, autocommit=True)
        self.seen: dict[int, float] = {}

    def _ports(self) -> list[int]:
        inodes: set[str] = set()
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{self.pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
        ports: list[int] = []
        for table in ("tcp", "tcp6"):
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{self.pid}/net/{table}").read_text().splitlines()[1:]:
                    f = line.split()
                    if f[9] in inodes and f[2].endswith(":1538"):  # remote port 5432
                        ports.append(int(f[1].rsplit(":", 1)[1], 16))
        return ports

    def sample(self) -> float:
        ports = self._ports()
        if ports:
            rows = self.conn.execute("SELECT pid FROM pg_stat_activity WHERE client_port = ANY(%s)", [ports])
            for (pid,) in rows.fetchall():
                cpu = cpu_seconds(pid)
                if cpu:
                    self.seen[int(pid)] = cpu
        return sum(self.seen.values())

    def close(self) -> None:
        self.conn.close()


class Sampler:
    """A thread: every ``period`` s, the PostgreSQL backends' CPU (their last values are kept) and the
    sim process's peak RSS."""

    def __init__(self, pg: PgBackends | None, period: float = 2.0) -> None:
        self.pg, self.period = pg, period
        self.peak_rss = rss_mb()
        self.pg_cpu = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.peak_rss = max(self.peak_rss, rss_mb())
            if self.pg is not None:
                with contextlib.suppress(Exception):
                    self.pg_cpu = self.pg.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


# ------------------------------------------------------------------ the world


@contextlib.contextmanager
def database(kind: str) -> Iterator[str | None]:
    """``None`` (the server's SQLite in its data folder) or a PostgreSQL URL with a fresh schema of its own
    (``ef_bench_<hex>``, dropped on exit, whatever happens): the test database is left as found."""
    if kind == "sqlite":
        yield None
        return
    import psycopg

    schema = f"ef_bench_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN, connect_timeout=5, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
        try:
            url = PG_ADMIN.replace("postgresql://", "postgresql+psycopg://", 1)
            yield f"{url}?options=-csearch_path%3D{schema}"
        finally:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
            print(f"dropped schema {schema}", flush=True)


def mosquitto() -> str:
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
    if exe is None:
        raise SystemExit("bench/rollout.py needs the mosquitto binary (apt-get install mosquitto)")
    return exe


def at(value: Any) -> float:
    """A datetime from the database (naive means UTC, as SQLite returns them) as epoch seconds."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime), value
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, db: str | None) -> None:
        self.args, self.work = args, work
        self.n: int = args.devices
        self.broker = Broker(mosquitto(), work / "broker")
        env = {"EDGEFLEET_SERVER_MQTT_URL": f"mqtt://127.0.0.1:{self.broker.port}",
               "EDGEFLEET_SERVER_ROLLOUT_INTERVAL": str(args.rollout_interval),
               "EDGEFLEET_SERVER_ROLLOUT_LEASE": str(max(15.0, 3 * args.rollout_interval))}
        self.fleet = Fleet(work / "fleet", db=db, server_env=env)
        self.sim: SimFleet | None = None
        self.db_url = db or f"sqlite:///{(self.fleet.server.data / 'edgefleet.db').resolve()}"
        self.engine: Engine | None = None
        self.pg: PgBackends | None = None
        self.sampler: Sampler | None = None
        self.rows: list[tuple[str, str]] = []  # (what, figure) for the final table
        self.t_start = time.monotonic()

    # --------------------------------------------------------------- plumbing

    def say(self, msg: str) -> None:
        # sys.__stdout__: SimFleet.enroll redirects sys.stdout (what ``agent enroll`` prints) meanwhile
        print(f"[{time.monotonic() - self.t_start:7.1f} s] {msg}", file=sys.__stdout__, flush=True)

    def row(self, what: str, figure: str) -> None:
        self.rows.append((what, figure))
        self.say(f"{what}: {figure}")

    def q(self, sql: str, **params: Any) -> list[Any]:
        assert self.engine is not None
        with self.engine.connect() as c:
            return list(c.execute(text(sql), params).fetchall())

    def progress(self, label: str) -> str:
        assert self.sim is not None
        s = self.sim.summary()
        mq = s["mqtt"] or {}
        return (f"{label} | serving {s['running']} | phases {s['phases']} | steps {s['steps']} errors {s['errors']}"
                f" | telemetry {s['telemetry_sent']} (mqtt {mq}) | server CPU "
                f"{cpu_seconds(self.fleet.server.pid):.0f} s | sim RSS {rss_mb():.0f} MB | load "
                f"{os.getloadavg()[0]:.1f}")

    def close(self) -> None:
        steps = [self.sampler.stop if self.sampler else None, self.sim.stop if self.sim else None,
                 self.pg.close if self.pg else None, self.engine.dispose if self.engine else None,
                 self.fleet.close, self.broker.stop]
        for step in steps:
            try:
                if step is not None:
                    step()
            except Exception as e:  # every piece is stopped, whatever one of them raised
                print(f"cleanup: {e!r}", flush=True)

    # --------------------------------------------------------------- phases

    def setup(self) -> None:
        t = time.monotonic()
        self.fleet.start()
        bundles = self.work / "bundles"
        for v in (V1, V2):
            self.fleet.push(models.bundle("good", v, bundles / v))
        self.engine = create_engine(self.db_url.replace("postgresql://", "postgresql+psycopg://", 1))
        if self.args.db == "postgresql":
            self.pg = PgBackends(self.fleet.server.pid)
        self.say(f"server up (pid {self.fleet.server.pid}, {self.args.db}), {V1} and {V2} pushed and signed in "
                 f"{time.monotonic() - t:.1f} s")

    def enroll(self) -> None:
        token = str(self.fleet.cli("device", "enroll-token", "--keys", self.fleet.keys, "--max-uses",
                                   str(self.n + ENROLL_RETRIES * self.args.workers))["token"])
        updates = default_updates(float(self.args.checkin))
        self.rss0 = rss_mb()
        self.sim = SimFleet(self.fleet.server.url, token, self.n, behaviour=Behaviour(rate=float(self.args.rate)),
                            state=self.work / "sim", broker=f"mqtt://127.0.0.1:{self.broker.port}",
                            interval=float(self.args.interval), updates=updates, workers=self.args.workers,
                            min_pause=float(self.args.min_pause), seed=12)
        self.sampler = Sampler(self.pg)
        cpu0, t = cpu_seconds(self.fleet.server.pid), time.monotonic()
        stop = threading.Event()

        def count() -> None:  # enrollment progress from the state folder (identity files written)
            while not stop.wait(self.args.every):
                done = sum(1 for _ in (self.work / "sim").glob("dev-*/identity/identity.json"))
                self.say(f"enrolling: {done} of {self.n} ({done / (time.monotonic() - t):.1f}/s), server CPU "
                         f"{cpu_seconds(self.fleet.server.pid) - cpu0:.0f} s, load {os.getloadavg()[0]:.1f}")

        counter = threading.Thread(target=count, daemon=True)
        counter.start()
        refused: list[str] = []
        try:
            while True:  # a 503 ("retry later") is retried, as a device would: enroll() skips the enrolled ones
                try:
                    self.sim.enroll()
                    break
                except ConfigError as e:
                    if ": 503:" not in str(e) or len(refused) >= ENROLL_RETRIES:
                        raise
                    refused.append(str(e))
                    done = sum(1 for _ in (self.work / "sim").glob("dev-*/identity/identity.json"))
                    self.say(f"enrollment refused after {done} devices, {time.monotonic() - t:.0f} s: {e}; retrying")
        finally:
            stop.set()
        took = time.monotonic() - t
        cpu = cpu_seconds(self.fleet.server.pid) - cpu0
        self.row("enrollment (enroll + open the devices)",
                 f"{self.n} devices in {took:.1f} s = {self.n / took:.1f}/s; server CPU {cpu:.1f} s = "
                 f"{1000 * cpu / self.n:.1f} ms a device; 503 answers retried: {len(refused)}")
        self.sim.start()
        self.say(f"sim started: {self.args.workers} workers, check-in {self.args.checkin} s, telemetry "
                 f"{self.args.interval} s")

    def rollout(self, version: str, body: dict[str, Any]) -> int:
        r = self.fleet.http.post("/api/v1/rollouts", json={"model": MODEL, "version": version, **body},
                                 timeout=600)
        if r.status_code != 201:
            raise RuntimeError(f"rollout create {version}: {r.status_code} {r.text[:500]}")
        return int(r.json()["id"])

    def follow(self, rid: int, label: str, timeout: float) -> dict[str, Any]:
        """Read the rollout's row at 5 Hz until it ends: every ``last_judged_at`` seen (in order), the
        stage changes as seen, progress lines. Returns what was seen."""
        assert self.sim is not None
        judged: list[float] = []
        stages: list[tuple[int, float]] = []
        state, deadline, last_print = "running", time.monotonic() + timeout, time.monotonic()
        while True:
            rows = self.q("SELECT state, stage, last_judged_at FROM rollouts WHERE id = :id", id=rid)
            state, stage, lj = rows[0][0], int(rows[0][1]), rows[0][2]
            if lj is not None and (not judged or at(lj) != judged[-1]):
                judged.append(at(lj))
            if not stages or stages[-1][0] != stage:
                stages.append((stage, time.time()))
            if state != "running":
                break
            if time.monotonic() - last_print >= self.args.every:
                last_print = time.monotonic()
                counts = dict(self.q("SELECT status, count(*) FROM rollout_members WHERE rollout_id = :id "
                                     "GROUP BY status", id=rid))
                self.say(self.progress(f"{label}: stage {stage} members {counts}"))
            if time.monotonic() > deadline:
                raise RuntimeError(f"{label}: rollout {rid} still {state} after {timeout:.0f} s")
            time.sleep(POLL)
        if state != "completed":
            reason = self.q("SELECT reason FROM rollouts WHERE id = :id", id=rid)[0][0]
            raise RuntimeError(f"{label}: rollout {rid} ended {state}: {reason}")
        return {"judged": judged, "stages": stages}

    def until_serving(self, version: str, timeout: float) -> float:
        assert self.sim is not None
        t = time.monotonic()
        ok = self.sim.wait(lambda snap: all(s["running"].get(MODEL) == version and s["phase"] == "idle"
                                            for s in snap), timeout, poll=1.0)
        if not ok:
            raise RuntimeError(f"not every device serves {version}: {self.sim.summary()}")
        return time.monotonic() - t

    def first_version(self) -> None:
        cpu0, t = cpu_seconds(self.fleet.server.pid), time.monotonic()
        rid = self.rollout(V1, {"stages": [100], "soak": 0, "max_p95_ratio": None, "max_error_rate": None,
                                "max_failure": 1.0, "stage_timeout": 86400})
        created = time.monotonic() - t
        self.follow(rid, f"v1 rollout {rid}", self.args.timeout)
        done = time.monotonic() - t
        settle = self.until_serving(V1, self.args.timeout)
        cpu = cpu_seconds(self.fleet.server.pid) - cpu0
        self.row(f"{V1} to every device (a rollout of one stage, 100%, no gates)",
                 f"create {created:.1f} s, completed {done:.1f} s, every device idle on {V1} +{settle:.1f} s; "
                 f"server CPU {cpu:.1f} s = {1000 * cpu / self.n:.1f} ms a device")

    def measured(self) -> None:
        a = self.args
        stages = [int(x) for x in a.stages.split(",")]
        server = self.fleet.server
        m0, cpu0, pg0 = metrics_of(server.url), cpu_seconds(server.pid), self.pg_cpu()
        sim_cpu0, steps0, t0w, t = cpu_seconds("self"), self.sim.steps if self.sim else 0, time.time(), time.monotonic()
        rid = self.rollout(V2, {"stages": stages, "soak": a.soak, "stage_timeout": 86400})
        created = time.monotonic() - t
        seen = self.follow(rid, f"v2 rollout {rid}", a.timeout)
        took = time.monotonic() - t
        m1, cpu1, pg1 = metrics_of(server.url), cpu_seconds(server.pid), self.pg_cpu()
        sim_cpu, steps = cpu_seconds("self") - sim_cpu0, (self.sim.steps if self.sim else 0) - steps0
        settle = self.until_serving(V2, a.timeout)
        # stage times from the audit log: create, then each advance and the completion
        audit = self.q("SELECT action, at FROM audit_log WHERE target = :t ORDER BY id", t=f"rollout:{rid}")
        marks = [(str(action), at(when)) for action, when in audit]
        t_create = next(w for act, w in marks if act == "rollout.create")
        ends = [w for act, w in marks if act in ("rollout.advance", "rollout.complete")]
        assigns = [w for act, w in marks if act == "rollout.assign"]
        n_members = int(self.q("SELECT count(*) FROM rollout_members WHERE rollout_id = :id "
                               "AND status != 'skipped'", id=rid)[0][0])
        prev = t_create
        for k, (pct, end) in enumerate(zip(stages, ends, strict=False)):
            size = -(-pct * n_members // 100)
            self.row(f"stage {k + 1} ({pct}%, {size} devices)",
                     f"{end - prev:.1f} s (ended {end - t_create:.1f} s after create)")
            prev = end
        self.row(f"{V2}: create to completed", f"{took:.1f} s (create call {created:.2f} s; every device idle on "
                 f"{V2} +{settle:.1f} s)")
        cpu = cpu1 - cpu0
        self.row("server CPU over the rollout", f"{cpu:.1f} s = {100 * cpu / took:.0f}% of a core; "
                 f"{1000 * cpu / self.n:.2f} ms a device")
        if self.pg is not None:
            pg = pg1 - pg0
            self.row("PostgreSQL backends' CPU (the server's connections)",
                     f"{pg:.1f} s = {100 * pg / took:.0f}% of a core; {1000 * pg / self.n:.2f} ms a device")
        ck = checkins(m1) - checkins(m0)
        nominal = self.n / a.checkin
        self.row("check-ins answered", f"{ck:.0f} = {ck / took:.1f}/s; nominal N/checkin {nominal:.1f}/s; "
                 f"ratio {ck / took / nominal:.2f}; sim machine steps {steps} ({steps / took:.1f}/s)")
        tm = stored(m1) - stored(m0)
        self.row("telemetry stored", f"{tm:.0f} = {tm / took:.1f}/s; nominal N/interval {self.n / a.interval:.1f}/s; "
                 f"ratio {tm / took / (self.n / a.interval):.2f}")
        np_ = passes(m1) - passes(m0)
        if np_:
            self.row("controller passes (decisions counter)",
                     f"{np_:.0f} in {took:.1f} s = one every {took / np_:.2f} s (interval {a.rollout_interval} s)")
        self.judgements(seen["judged"], marks, t0w)
        self.row("sim process CPU over the rollout", f"{sim_cpu:.1f} s = {100 * sim_cpu / took:.0f}% of a core; "
                 f"{1000 * sim_cpu / self.n:.2f} ms a device")
        rss = rss_mb()
        peak = self.sampler.peak_rss if self.sampler else rss
        self.row("sim RSS", f"{rss:.0f} MB (peak {peak:.0f} MB), {rss - self.rss0:.0f} MB above the process "
                 f"before the devices = {1024 * (rss - self.rss0) / self.n:.0f} kB a device")
        self.row("assign decisions", f"{len(assigns)} (audit rollout.assign)")

    def judgements(self, judged: list[float], marks: list[tuple[str, float]], since: float) -> None:
        """Consecutive ``last_judged_at`` values: each gap is one controller pass plus the interval; a pass
        that decided something wrote its audit entry inside its gap (``wait`` writes none)."""
        interval = float(self.args.rollout_interval)
        by: dict[str, list[float]] = {}
        for a, b in itertools.pairwise(judged):
            if a < since:
                continue
            act = next((act for act, w in marks if a <= w < b and act != "rollout.create"), "wait")
            by.setdefault(act.removeprefix("rollout."), []).append(max(0.0, b - a - interval))
        for act, xs in sorted(by.items()):
            self.row(f"controller pass deciding {act} (last_judged_at gaps - {interval:g} s)",
                     f"n {len(xs)}, median {statistics.median(xs):.2f} s, max {max(xs):.2f} s")

    def pg_cpu(self) -> float:
        if self.pg is None:
            return 0.0
        with contextlib.suppress(Exception):
            return self.pg.sample()
        return self.sampler.pg_cpu if self.sampler else 0.0

    def table(self) -> None:
        print(f"\nrollout to {self.n} simulated devices, {self.args.db}; stages {self.args.stages}, soak "
              f"{self.args.soak} s, check-in {self.args.checkin} s, telemetry {self.args.interval} s, sim workers "
              f"{self.args.workers}, rate {self.args.rate:g}/s, min pause {self.args.min_pause:g} s, controller "
              f"interval {self.args.rollout_interval} s; total "
              f"{time.monotonic() - self.t_start:.0f} s")
        width = max((len(w) for w, _ in self.rows), default=0)
        for what, fig in self.rows:
            print(f"  {what:<{width}}  {fig}")
        print(machine_line(), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite")
    ap.add_argument("--stages", default="1,10,50,100")
    ap.add_argument("--soak", type=float, default=5.0, help="s (the rollout's soak gate)")
    ap.add_argument("--checkin", type=float, default=30.0, help="s between a device's check-ins")
    ap.add_argument("--interval", type=float, default=10.0, help="s between a device's telemetry messages")
    ap.add_argument("--workers", type=int, default=16, help="sim threads")
    ap.add_argument("--rate", type=float, default=20.0, help="inferences a second per device (the cost model)")
    ap.add_argument("--min-pause", type=float, default=0.25,
                    help="s: shorter pauses of a device's machine (probation's 0.1 s poll) are stretched to this")
    ap.add_argument("--rollout-interval", type=float, default=1.0, help="the server's rollout_interval, s")
    ap.add_argument("--timeout", type=float, default=3600.0, help="s each rollout may take")
    ap.add_argument("--every", type=float, default=30.0, help="s between progress lines")
    ap.add_argument("--work", type=Path, help="the working folder (default: a temporary one, deleted)")
    ap.add_argument("--keep", action="store_true", help="keep the working folder")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` stops us: clean up (schema, processes)
    print(machine_line(), flush=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="rollout-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    bench: Bench | None = None
    try:
        with database(args.db) as db:
            bench = Bench(args, work, db)
            try:
                bench.setup()
                bench.enroll()
                bench.first_version()
                bench.measured()
            finally:
                try:
                    bench.table()
                finally:
                    bench.close()  # the server, the broker and the sim, whatever the table raised
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
