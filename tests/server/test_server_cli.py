"""`edgefleet server init|tls|token create` through the real CLI: secrets private whatever the umask,
recovery without a running server, TLS after init, and one-line errors for every failure."""

from __future__ import annotations

import json
import os
import signal
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from _support import assert_one_line_error, free_port, run_cli, wait_until
from cryptography import x509
from sqlalchemy import select

from edgefleet.server.models import ApiToken, AuditEntry
from edgefleet.server.settings import Settings
from edgefleet.server.state import open_state

EDGEFLEET = str(Path(sys.executable).parent / "edgefleet")


def modes(root: Path) -> dict[str, int]:
    """Every path under ``root`` (root included) and its permission bits."""
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for p in root.rglob("*"):
        out[str(p.relative_to(root))] = stat.S_IMODE(p.lstat().st_mode)
    return out


def assert_private(root: Path) -> dict[str, int]:
    seen = modes(root)
    assert seen["."] == 0o700, oct(seen["."])
    loose = {p: oct(m) for p, m in seen.items() if m & 0o077 and (root / p).is_file()}
    assert not loose, loose
    return seen


def init(capsys: pytest.CaptureFixture[str], data: Path, *extra: str) -> dict[str, str]:
    code, out, err = run_cli(capsys, "server", "init", "--data", data, "--json", *extra)
    assert code == 0, err
    result: dict[str, str] = json.loads(out)
    return result


@pytest.fixture
def pg_url(clean_db: str) -> str:
    """The session's database (SQLite or PostgreSQL), emptied: `--db` for the CLI."""
    return clean_db


# ---------------------------------------------------------------- secrets private whatever the umask


class RunningServer:
    """``edgefleet server run`` as a real process under ``umask``, answering on a free loopback port."""

    def __init__(self, data: Path, umask: int, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [EDGEFLEET, "server", "run", "--data", str(data), "--port", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, umask=umask, env=env,
        )

    def up(self) -> bool:
        assert self.proc.poll() is None, self.proc.stderr.read().decode() if self.proc.stderr else ""
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def __enter__(self) -> RunningServer:
        assert wait_until(self.up, 30), "server did not start"
        return self

    def __exit__(self, *_: object) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


def init_process(data: Path, umask: int, *extra: str) -> str:
    r = subprocess.run([EDGEFLEET, "server", "init", "--data", str(data), "--json", *extra],
                       capture_output=True, text=True, timeout=60, umask=umask)
    assert r.returncode == 0, r.stderr
    token: str = json.loads(r.stdout)["admin_token"]
    return token


@pytest.mark.parametrize("umask", [0o022, 0o000], ids=["umask022", "umask000"])
def test_init_and_run_leave_no_secret_readable_by_others_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    data = tmp_path / "data"
    admin = init_process(data, umask, "--tls-hostname", "127.0.0.1")
    after_init = assert_private(data)
    assert {"edgefleet.db", "ca/ca.key", "ca/ca.crt", "tls/server.key", "tls/server.crt"} <= set(after_init)
    with RunningServer(data, umask) as srv:
        # a write, so that the WAL holds data
        r = httpx.post(f"{srv.url}/api/v1/enrollment-tokens", json={}, headers={"Authorization": f"Bearer {admin}"})
        assert r.status_code == 201, r.text
        running = assert_private(data)
        assert {"edgefleet.db-wal", "edgefleet.db-shm"} <= set(running), sorted(running)
        assert running["edgefleet.db-wal"] == running["edgefleet.db-shm"] == 0o600
    assert_private(data)


def test_uploaded_bundles_and_their_folders_are_private_too(tmp_path: Path) -> None:
    from _fleet import make_bundle

    data = tmp_path / "data"
    admin = init_process(data, 0o000)
    with RunningServer(data, 0o000) as srv:
        r = httpx.post(f"{srv.url}/api/v1/models", content=make_bundle(tmp_path / "b").read_bytes(),
                       headers={"Authorization": f"Bearer {admin}"})
        assert r.status_code == 201, r.text
    assert_private(data)
    loose = {p: oct(m) for p, m in modes(data).items() if m & 0o077}
    assert not loose, loose


def test_a_loose_data_folder_and_database_from_an_older_install_are_tightened_on_start(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    init(capsys, data)
    os.chmod(data, 0o755)
    os.chmod(data / "edgefleet.db", 0o644)
    state = open_state(Settings(data_dir=data))
    try:
        assert_private(data)
        assert "was mode 755, now 0700" in caplog.text and "was mode 644, now 0600" in caplog.text
    finally:
        state.loop_db.close()
        state.engine.dispose()


def test_a_ca_key_readable_by_others_stops_the_server_with_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    init(capsys, data)
    os.chmod(data / "ca" / "ca.key", 0o644)
    code, _, err = run_cli(capsys, "server", "token", "create", "--data", data)
    assert code == 0, err  # the token needs only the database
    r = subprocess.run([EDGEFLEET, "server", "run", "--data", str(data), "--port", str(free_port())],
                       capture_output=True, text=True, timeout=60)
    assert_one_line_error(r.returncode, r.stderr, "ca.key", "chmod 600")


# ---------------------------------------------------------------- init on an initialised folder


def test_init_on_an_initialised_folder_is_one_line_pointing_at_token_create(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    init(capsys, data)
    before = (data / "ca" / "ca.key").read_bytes()
    code, out, err = run_cli(capsys, "server", "init", "--data", data)
    assert_one_line_error(code, err, "already initialised", f"edgefleet server token create --data {data}")
    assert "efo_" not in out + err and (data / "ca" / "ca.key").read_bytes() == before


def test_init_on_a_database_another_server_initialised_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, pg_url: str
) -> None:
    init(capsys, tmp_path / "first", "--db", pg_url)
    code, out, err = run_cli(capsys, "server", "init", "--data", tmp_path / "second", "--db", pg_url)
    assert_one_line_error(code, err, "db_url", "already belongs to an initialised server")
    assert not (tmp_path / "second" / "ca").exists() and "efo_" not in out


def test_init_text_output_says_which_settings_to_add_and_where(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    data, toml = tmp_path / "data", tmp_path / "server.toml"
    toml.write_text(f"data_dir = {json.dumps(str(data))}\n")
    code, out, err = run_cli(capsys, "server", "init", "--config", toml, "--tls-hostname", "fleet.example.com")
    assert code == 0, err
    crt, key = (data / "tls" / "server.crt").resolve(), (data / "tls" / "server.key").resolve()
    assert f'add tls_certfile = "{crt}" and tls_keyfile = "{key}" to {toml}' in out
    assert f"EDGEFLEET_SERVER_TLS_CERTFILE={crt}" in out and f"EDGEFLEET_SERVER_TLS_KEYFILE={key}" in out
    assert "efo_" in out and "edgefleet server token create" in out


# ---------------------------------------------------------------- TLS after init


def test_tls_after_init_issues_a_certificate_the_server_then_serves(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    init(capsys, data)
    code, out, err = run_cli(capsys, "server", "tls", "--data", data, "--hostname", "localhost",
                             "--hostname", "127.0.0.1", "--json")
    assert code == 0, err
    issued = json.loads(out)
    assert "EDGEFLEET_SERVER_TLS_CERTFILE" in issued["settings_hint"]
    cert = x509.load_pem_x509_certificate(Path(issued["tls_certfile"]).read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate((data / "ca" / "ca.crt").read_bytes()))
    assert stat.S_IMODE(os.stat(issued["tls_keyfile"]).st_mode) == 0o600

    port = free_port()
    env = {**os.environ, "EDGEFLEET_SERVER_TLS_CERTFILE": issued["tls_certfile"],
           "EDGEFLEET_SERVER_TLS_KEYFILE": issued["tls_keyfile"]}
    proc = subprocess.Popen([EDGEFLEET, "server", "run", "--data", str(data), "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        pinned = ssl.create_default_context(cafile=str(data / "ca" / "ca.crt"))
        with httpx.Client(verify=pinned, timeout=1) as c:

            def up() -> bool:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                try:
                    return c.get(f"https://localhost:{port}/healthz").status_code == 200
                except httpx.HTTPError:
                    return False

            assert wait_until(up, 30), "the server did not answer over TLS verified by the fleet CA"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_init_with_tls_hostname_on_an_initialised_folder_issues_only_the_certificate(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    init(capsys, data)
    ca_key = (data / "ca" / "ca.key").read_bytes()
    code, out, err = run_cli(capsys, "server", "init", "--data", data, "--tls-hostname", "fleet.local")
    assert code == 0, err
    assert "issued only the TLS certificate" in out and "efo_" not in out
    assert (data / "tls" / "server.crt").exists() and (data / "ca" / "ca.key").read_bytes() == ca_key
    state = open_state(Settings(data_dir=data))
    try:
        with state.sessions() as s:
            assert len(s.scalars(select(ApiToken)).all()) == 1
    finally:
        state.loop_db.close()
        state.engine.dispose()


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        ((), ("hostname", "at least one")),
        (("--hostname", "bad host"), ("hostname", "'bad host'")),
        (("--hostname", "ok.example", "--days", "0"), ("days", "between 1 and 3650")),
    ],
    ids=["no-hostname", "bad-hostname", "zero-days"],
)
def test_tls_refusals_are_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, args: tuple[str, ...], needles: tuple[str, ...]
) -> None:
    data = tmp_path / "data"
    init(capsys, data)
    code, _, err = run_cli(capsys, "server", "tls", "--data", data, *args)
    assert_one_line_error(code, err, *needles)
    assert not (data / "tls").exists()


def test_tls_on_an_uninitialised_folder_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "server", "tls", "--data", tmp_path / "none", "--hostname", "x.example")
    assert_one_line_error(code, err, "no fleet CA", "edgefleet server init")


def test_init_with_a_bad_tls_hostname_creates_nothing(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "server", "init", "--data", tmp_path / "data", "--tls-hostname", "a..b")
    assert_one_line_error(code, err, "hostname", "'a..b'")
    assert not (tmp_path / "data").exists()


def test_init_where_the_folder_cannot_be_made_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _, err = run_cli(capsys, "server", "init", "--data", blocker / "data")
    assert_one_line_error(code, err, "data_dir", str(blocker / "data"))


# ---------------------------------------------------------------- offline admin token


def test_token_create_offline_makes_a_working_audited_admin_token(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, pg_url: str
) -> None:
    from fastapi.testclient import TestClient

    from edgefleet.server.app import create_app

    data = tmp_path / "data"
    init(capsys, data, "--db", pg_url)
    code, out, err = run_cli(capsys, "server", "token", "create", "--data", data, "--db", pg_url,
                             "--name", "lost-laptop", "--json")
    assert code == 0, err
    made = json.loads(out)
    assert made["role"] == "admin" and made["token"].startswith(f"efo_{made['id']}_")
    settings = Settings(data_dir=data, db_url=pg_url)
    state = open_state(settings)
    try:
        with TestClient(create_app(settings, state)) as c:
            r = c.get("/api/v1/tokens", headers={"Authorization": f"Bearer {made['token']}"})
            assert r.status_code == 200 and {t["name"] for t in r.json()} == {"admin", "lost-laptop"}
        with state.sessions() as s:
            entry = s.scalars(select(AuditEntry).where(AuditEntry.target == f"token:{made['id']}")).one()
        assert entry.action == "token.create" and entry.actor.startswith("server token create (offline, by ")
        assert entry.after == {"name": "lost-laptop", "role": "admin"}
    finally:
        state.loop_db.close()
        state.engine.dispose()


def test_token_create_with_a_role_and_expiry(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    data = tmp_path / "data"
    init(capsys, data)
    code, out, err = run_cli(capsys, "server", "token", "create", "--data", data, "--role", "viewer",
                             "--expires-in-days", "7")
    assert code == 0, err
    assert "viewer token" in out and "efo_" in out


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("--role", "root"), ("--role", "viewer")),
        (("--name", ""), ("--name",)),
        (("--name", "x" * 200), ("--name", "128")),
        (("--expires-in-days", "0"), ("--expires-in-days",)),
    ],
    ids=["bad-role", "empty-name", "long-name", "zero-days"],
)
def test_token_create_refusals_are_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, args: tuple[str, ...], needles: tuple[str, ...]
) -> None:
    data = tmp_path / "data"
    init(capsys, data)
    code, _, err = run_cli(capsys, "server", "token", "create", "--data", data, *args)
    assert_one_line_error(code, err, *needles)


def test_token_create_on_an_uninitialised_folder_creates_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = run_cli(capsys, "server", "token", "create", "--data", tmp_path / "none")
    assert_one_line_error(code, err, "not initialised", "edgefleet server init")
    assert not (tmp_path / "none").exists()


def test_token_create_against_an_unreachable_database_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    url = f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/none?connect_timeout=2"
    code, _, err = run_cli(capsys, "server", "token", "create", "--data", tmp_path, "--db", url)
    assert_one_line_error(code, err, "db_url", "Connection refused")
