"""The real thing: `edgefleet server init/run`, the operator CLI and `edgefleet agent enroll` against a
server process on a free loopback port; then SIGKILL in the middle of an upload and a restart."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from _fleet import CLI, Server, make_bundle

pytestmark = pytest.mark.slow


def _cli(*args: str, env: dict[str, str] | None = None) -> str:
    r = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})})
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r.stdout


@pytest.fixture
def server(clean_db: str, tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path / "data", clean_db)
    yield srv
    srv.stop()


def test_cli_init_run_push_enroll_and_sigkill_mid_upload_loses_nothing(server: Server, tmp_path: Path) -> None:
    init = json.loads(_cli("server", "init", "--data", str(server.data), "--db", server.db, "--json"))
    admin = init["admin_token"]
    assert stat.S_IMODE((server.data / "ca" / "ca.key").stat().st_mode) == 0o600
    server.start()
    env = {"EDGEFLEET_SERVER": server.url, "EDGEFLEET_TOKEN": admin}

    bundle = make_bundle(tmp_path / "b", "digits", "1.0.0", 10_000)
    # `edgefleet model push` is registered by cli/model.py; run the same function standalone here.
    push = [sys.executable, "-c", "import typer; from edgefleet.cli.fleet import push; typer.run(push)"]
    r = subprocess.run(
        [*push, str(bundle), "--json"], capture_output=True, text=True, timeout=60, env={**os.environ, **env}
    )
    assert r.returncode == 0, r.stderr
    committed = json.loads(r.stdout)["sha256"]
    assert committed == hashlib.sha256(bundle.read_bytes()).hexdigest()

    keys = tmp_path / "keys"  # the operator's keyring publishes the roots; its token pins the image root
    _cli("keys", "init", "--keys", str(keys), "--server", server.url, env=env)
    enroll = json.loads(_cli("device", "enroll-token", "--tag", "lab", "--keys", str(keys), "--json", env=env))
    state = tmp_path / "device-state"
    dev = json.loads(
        _cli(
            "agent",
            "enroll",
            "--server",
            server.url,
            "--token",
            enroll["token"],
            "--state-dir",
            str(state),
            "--allow-http",
            "--json",
        )
    )
    assert stat.S_IMODE((state / "identity" / "device.key").stat().st_mode) == 0o600
    devices = json.loads(_cli("device", "list", "--json", env=env))
    assert [(d["id"], d["tags"]) for d in devices] == [(dev["device_id"], ["lab"])]

    # An upload cut off by SIGKILL: headers and part of the body sent, then the server dies.
    big = make_bundle(tmp_path / "big", "big", "2.0.0", 3_000_000).read_bytes()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(
        f"POST /api/v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {admin}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {len(big)}\r\n\r\n".encode()
    )
    sock.sendall(big[: len(big) // 2])
    tmp = server.data / "tmp"
    deadline = time.monotonic() + 10
    while not any(p.stat().st_size > 0 for p in tmp.glob("upload-*")) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert any(tmp.glob("upload-*")), "the upload never reached the temp folder"
    server.kill()
    sock.close()

    server.start()
    assert list(tmp.iterdir()) == []  # the partial upload was swept
    blobs = sorted(p.name for p in (server.data / "blobs" / "sha256").rglob("*") if p.is_file())
    assert blobs == [committed]
    h = {"Authorization": f"Bearer {admin}"}
    listed = httpx.get(f"{server.url}/api/v1/models", headers=h).json()
    assert [(v["name"], v["version"]) for v in listed] == [("digits", "1.0.0")]
    got = httpx.get(f"{server.url}/api/v1/blobs/{committed}", headers=h)
    assert hashlib.sha256(got.content).hexdigest() == committed
    assert [d["id"] for d in httpx.get(f"{server.url}/api/v1/devices", headers=h).json()] == [dev["device_id"]]

    # the rest of the operator CLI, in-process, against the restarted server
    from typer.testing import CliRunner

    from edgefleet.cli.main import app

    def cli(*args: str) -> dict | list:
        r = CliRunner().invoke(app, [*args, "--json"], env=env)
        assert r.exit_code == 0, (args, r.output)
        return json.loads(r.output)

    viewer = cli("token", "create", "--name", "grafana", "--role", "viewer")
    assert viewer["role"] == "viewer" and viewer["token"].startswith("efo_")
    assert cli("device", "tag", dev["device_id"], "lab", "floor-2")["tags"] == ["floor-2", "lab"]
    assert cli("device", "show", dev["device_id"])["online"] is False
    assert cli("device", "revoke", dev["device_id"])["revoked"] is True
    refused = CliRunner().invoke(
        app, ["device", "revoke", dev["device_id"]], env={**env, "EDGEFLEET_TOKEN": viewer["token"]}
    )
    assert refused.exit_code != 0
    logged = server.stop()
    for secret in (admin, viewer["token"], enroll["token"].split(".")[0]):  # the server's part of the token
        assert secret not in logged


def test_server_run_on_a_busy_port_is_a_one_line_error(clean_db: str, tmp_path: Path) -> None:
    from edgefleet.server.settings import Settings
    from edgefleet.server.state import init_server

    init_server(Settings(data_dir=tmp_path / "data", db_url=clean_db))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run(
            [*CLI, "server", "run", "--data", str(tmp_path / "data"), "--db", clean_db, "--port", str(port)],
            capture_output=True, text=True, timeout=60,
        )
    assert r.returncode == 1, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines == [f"error: port {port} on 127.0.0.1 is in use (set --port or port in server.toml)"], r.stderr


def test_sigterm_stops_the_server_cleanly_with_exit_0(server: Server) -> None:
    """systemd's stop: a graceful shutdown and exit status 0, not death by the re-raised signal (143)."""
    from edgefleet.server.settings import Settings
    from edgefleet.server.state import init_server

    init_server(Settings(data_dir=server.data, db_url=server.db))
    server.start()
    assert server.proc is not None
    server.proc.terminate()
    assert server.proc.wait(20) == 0, server.stop()
