"""Fleet check-in cost: 10,000 simulated devices checking in with an unchanged desired state (ETag ->
304) against one server process, beside a bare FastAPI handler that answers 304, in the same run.

Devices are pre-created in the database and their access tokens minted directly (the challenge
exchange is not what is measured). Each device first checks in once (which writes its last_seen);
then ``--passes`` rounds of 10,000 conditional GETs are timed. Clients are ``--clients`` processes,
each keeping ``--connections`` HTTP/1.1 keep-alive connections on loopback, written on raw asyncio
streams so that the client costs little of the two cores it shares with the server. Goal (issue 5):
>= 2,000 check-ins/s and >= half the bare handler's rate.

``--tuf`` (issue 10) runs it as a fleet with updates: the operator's roots are published (``edgefleet
keys init --server``), a bundle pushed and signed into the image targets (``model push --keys``) and
assigned to every device, each assignment signing that device's director metadata in its transaction
(``desired.refresh_etag``, what the assign route calls, run here in-process 500 devices a
transaction). Every device's ETag is then its director timestamp version (``ts-N``), and one device's
``/tuf/director/{id}/timestamp.json`` is read back to check it names that version.

    .venv/bin/python bench/fleet_checkin.py [--devices 10000] [--passes 3] [--db URL] [--tuf]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request, Response

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "from edgefleet.cli.main import main; main()"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


# ------------------------------------------------------------------ the bare handler (its own process)


def bare_server(port: int) -> None:
    import uvicorn

    app = FastAPI()

    @app.get("/api/v1/devices/{device_id}/desired")
    async def desired(device_id: str, request: Request) -> Response:
        return Response(status_code=304, headers={"etag": request.headers.get("if-none-match", '"x"')})

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="off")


# ------------------------------------------------------------------ the fleet


def prepare(data: Path, db: str | None, n: int) -> tuple[list[tuple[str, str, str]], dict[str, str], str]:
    """Init a server, insert ``n`` devices, mint their tokens: [(id, token, etag)], the server env and
    the admin token."""
    from sqlalchemy import insert

    from edgefleet.server.db import make_engine
    from edgefleet.server.desired import etag_of
    from edgefleet.server.models import Device, utcnow
    from edgefleet.server.settings import Settings
    from edgefleet.server.state import init_server, open_state
    from edgefleet.server.tokens import seal

    settings = Settings(data_dir=data, db_url=db, allow_plain_http_devices=True)
    admin = init_server(settings)
    state = open_state(settings)
    now = utcnow()
    devices, rows = [], []
    for i in range(n):
        did = f"dev-{i:016x}"
        etag = etag_of({"device_id": did, "models": []})
        rows.append(
            {"id": did, "tags": ["bench"], "cert_serial": f"{i:x}", "cert_pem": "-", "cert_not_after": now,
             "enrolled_at": now, "enrollment_token_id": None, "revoked_at": None, "last_seen": None,
             "reported_at": None, "agent_version": None, "hardware_profile": None, "running": [],
             "desired_etag": etag}
        )
        token = seal(state.mac_key, {"p": "dev", "sub": did, "ser": f"{i:x}", "exp": int(time.time()) + 3600})
        devices.append((did, token, f'"{etag}"'))
    engine = make_engine(settings.database_url())
    with engine.begin() as c:
        c.execute(insert(Device), rows)
    engine.dispose()
    state.engine.dispose()
    env = {"EDGEFLEET_SERVER_ALLOW_PLAIN_HTTP_DEVICES": "true"}
    if db:
        env["EDGEFLEET_SERVER_DB_URL"] = json.dumps(db)
    return devices, env, admin


def publish_tuf(
    work: Path, data: Path, db: str | None, url: str, admin: str, devices: list[tuple[str, str, str]]
) -> tuple[list[tuple[str, str, str]], float]:
    """Roots published, one bundle pushed and signed, assigned to every device with its director metadata
    signed (see the module docstring): the devices with their new ``ts-N`` ETags, and the seconds the
    assignments took. Raises RuntimeError when a CLI step fails or an ETag is not a timestamp one."""
    from sqlalchemy import insert, select

    sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
    import make_update_models

    from edgefleet.server.db import make_engine, make_sessionmaker
    from edgefleet.server.desired import refresh_etag
    from edgefleet.server.models import Assignment, Device, ModelVersion, utcnow
    from edgefleet.server.settings import Settings
    from edgefleet.server.tuf.director import DirectorRepository
    from edgefleet.server.tuf.keys import load_online_keys

    env = {**os.environ, "EDGEFLEET_SERVER": url, "EDGEFLEET_TOKEN": admin,
           "EDGEFLEET_CLI_CONFIG": str(work / "no-cli.toml")}
    bundle = make_update_models.bundle("good", "1.0.0", work / "bundle")
    for args in (["keys", "init", "--keys", str(work / "keys"), "--server", url],
                 ["model", "push", str(bundle), "--keys", str(work / "keys")]):
        r = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"edgefleet {' '.join(args)}: exit {r.returncode}: {r.stderr[-2000:]}")
    engine = make_engine(Settings(data_dir=data, db_url=db).database_url())
    sessions = make_sessionmaker(engine)
    director = DirectorRepository(sessions, load_online_keys(data))
    t0 = time.perf_counter()
    with sessions() as s:
        vid = s.scalar(select(ModelVersion.id).where(ModelVersion.name == make_update_models.MODEL_NAME,
                                                     ModelVersion.version == "1.0.0"))
    ids = [d for d, _, _ in devices]
    for i in range(0, len(ids), 500):
        with sessions.begin() as s:
            now = utcnow()
            s.execute(insert(Assignment), [{"device_id": d, "model_name": make_update_models.MODEL_NAME,
                                            "version_id": vid, "source": "operator", "updated_at": now}
                                           for d in ids[i:i + 500]])
            s.flush()
            for d in ids[i:i + 500]:
                refresh_etag(s, d, director)
    took = time.perf_counter() - t0
    with sessions() as s:
        etags = {d: e for d, e in s.execute(select(Device.id, Device.desired_etag))}
    engine.dispose()
    bad = [d for d in ids if not str(etags.get(d, "")).startswith("ts-")]
    if bad:
        raise RuntimeError(f"{len(bad)} devices have no director ETag (first: {bad[0]} {etags.get(bad[0])!r})")
    did, token, _ = devices[0]
    ts = httpx.get(f"{url}/tuf/director/{did}/timestamp.json", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    if ts.status_code != 200 or f"ts-{ts.json()['signed']['version']}" != etags[did]:
        raise RuntimeError(f"{did}: director timestamp {ts.status_code} {ts.text[:200]} does not match {etags[did]}")
    return [(d, t, f'"{etags[d]}"') for d, t, _ in devices], took


# ------------------------------------------------------------------ the client (raw HTTP/1.1 keep-alive)


async def _conn_worker(port: int, jobs: list[tuple[str, str, str]], lat: list[float], expect: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for did, token, etag in jobs:
            req = (
                f"GET /api/v1/devices/{did}/desired HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Authorization: Bearer {token}\r\nIf-None-Match: {etag}\r\n\r\n"
            ).encode()
            t0 = time.perf_counter()
            writer.write(req)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if length:
                await reader.readexactly(length)
            lat.append(time.perf_counter() - t0)
            if status != expect:
                raise RuntimeError(f"{did}: HTTP {status}, expected {expect}")
    finally:
        writer.close()


def _client_proc(port: int, jobs: list[tuple[str, str, str]], connections: int, expect: int, out: Any) -> None:
    lat: list[float] = []

    async def main() -> None:
        shares = [jobs[i::connections] for i in range(connections)]
        await asyncio.gather(*(_conn_worker(port, s, lat, expect) for s in shares if s))

    try:
        asyncio.run(main())
    except Exception as e:
        out.put(f"{type(e).__name__}: {e}")
        raise
    out.put(lat)


def run_load(port: int, jobs: list[tuple[str, str, str]], clients: int, connections: int, expect: int = 304
             ) -> dict[str, float]:
    q: Any = mp.get_context("fork").Queue()
    procs = [
        mp.get_context("fork").Process(target=_client_proc, args=(port, jobs[i::clients], connections, expect, q))
        for i in range(clients)
    ]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    lat: list[float] = []
    for _ in procs:
        got = q.get(timeout=600)
        if isinstance(got, str):
            for p in procs:
                p.kill()
            raise RuntimeError(f"client failed: {got}")
        lat += got
    wall = time.perf_counter() - t0
    for p in procs:
        p.join(30)
        if p.exitcode != 0:
            raise RuntimeError(f"client process failed with {p.exitcode}")
    lat.sort()
    return {
        "requests": len(lat),
        "per_s": len(lat) / wall,
        "p50_ms": lat[len(lat) // 2] * 1e3,
        "p99_ms": lat[int(len(lat) * 0.99)] * 1e3,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--passes", type=int, default=3, help="timed rounds over all devices (bounded)")
    ap.add_argument("--clients", type=int, default=2, help="client processes")
    ap.add_argument("--connections", type=int, default=8, help="keep-alive connections per client process")
    ap.add_argument("--db", default=None, help="database URL (default: SQLite in a temp folder)")
    ap.add_argument("--tuf", action="store_true",
                    help="roots published and a signed bundle assigned to every device (ETag ts-N); see above")
    ap.add_argument("--bare-server", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare_server is not None:
        bare_server(args.bare_server)
        return
    passes = max(1, min(args.passes, 20))
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp:
        devices, env, admin = prepare(Path(tmp) / "data", args.db, args.devices)
        port, bare_port = free_port(), free_port()
        server = subprocess.Popen(
            [*CLI, "server", "run", "--data", str(Path(tmp) / "data"), "--port", str(port), "--log-level", "warning"],
            env={**os.environ, **env},
        )
        bare = subprocess.Popen([sys.executable, __file__, "--bare-server", str(bare_port)])
        try:
            wait_http(f"http://127.0.0.1:{port}/healthz")
            wait_http(f"http://127.0.0.1:{bare_port}/docs")
            assign_s = None
            if args.tuf:
                devices, assign_s = publish_tuf(Path(tmp), Path(tmp) / "data", args.db, f"http://127.0.0.1:{port}",
                                                admin, devices)
            warm = run_load(port, devices, args.clients, args.connections)  # first check-in: writes last_seen
            fleet = run_load(port, devices * passes, args.clients, args.connections)
            base = run_load(bare_port, devices * passes, args.clients, args.connections)
        finally:
            for p in (server, bare):
                p.terminate()
                p.wait(10)
    result = {
        "devices": args.devices,
        "db": "postgresql" if args.db else "sqlite",
        "etag": "director timestamp (ts-N)" if args.tuf else "hash of the desired state",
        **({"assign_and_sign_s": round(assign_s, 1)} if assign_s is not None else {}),
        "clients": f"{args.clients} processes x {args.connections} keep-alive connections",
        "first_checkin_per_s": round(warm["per_s"]),
        "fleet": {k: round(v, 3) for k, v in fleet.items()},
        "bare_fastapi_304": {k: round(v, 3) for k, v in base.items()},
        "ratio": round(fleet["per_s"] / base["per_s"], 3),
        "goal_met": fleet["per_s"] >= 2000 and fleet["per_s"] >= 0.5 * base["per_s"],
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
