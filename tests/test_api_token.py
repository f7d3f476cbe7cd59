"""The local API beyond loopback: an API token is required, sent as ``Authorization: Bearer``."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import tritonclient.http as triton
from _server import running_api
from _support import MODELS, free_port

from edgefleet.agent.config import config_from_dict, is_loopback, parse_config
from edgefleet.errors import ConfigError

EDGEFLEET = shutil.which("edgefleet", path=str(Path(sys.executable).parent)) or "edgefleet"
TOKEN = "s3cret-token-0123456789abcdef"


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.53", "localhost", "::1", "[::1]"])
def test_loopback_needs_no_token(host: str) -> None:
    assert is_loopback(host)
    assert config_from_dict({"api": {"host": host}}).api.token is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "192.168.1.20", "pi-0042.local"])
def test_listening_beyond_loopback_without_a_token_is_an_error_naming_the_setting(host: str) -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict({"api": {"host": host}}, env={})
    assert "api.token: listening on" in str(e.value) and "requires an API token" in str(e.value)
    assert "token_file" in str(e.value)
    assert config_from_dict({"api": {"host": host, "token": TOKEN}}, env={}).api.has_token


def test_token_settings_are_checked_and_the_token_never_printed() -> None:
    with pytest.raises(ConfigError, match=r"api\.token \(line 3\): must be at least 16 characters"):
        parse_config('[api]\nhost = "0.0.0.0"\ntoken = "short"\n', env={})
    with pytest.raises(ConfigError, match=r"api\.token \(line 2\): give token or token_file, not both"):
        parse_config(f'[api]\ntoken = "{TOKEN}"\ntoken_file = "/etc/t"\n', env={})
    cfg = parse_config(f'[api]\nhost = "0.0.0.0"\ntoken = "{TOKEN}"\n', env={})
    assert TOKEN not in repr(cfg) and TOKEN not in str(cfg.model_dump(mode="json"))
    # a token makes the Host allow-list unneeded (a rebinding browser cannot send it) unless one is given
    assert cfg.api.limits().allowed_hosts == frozenset({"*"})
    cfg = parse_config(f'[api]\nhost = "0.0.0.0"\ntoken = "{TOKEN}"\nallowed_hosts = ["pi.local"]\n', env={})
    assert "pi.local" in cfg.api.limits().allowed_hosts and "*" not in cfg.api.limits().allowed_hosts


def test_token_file_from_the_environment_reaches_the_config(tmp_path: Path) -> None:
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")
    cfg = config_from_dict({"api": {"host": "0.0.0.0"}}, env={"EDGEFLEET_AGENT__API__TOKEN_FILE": str(f)})
    assert cfg.api.token_file == f


@pytest.fixture
def token_api() -> Iterator[str]:
    with running_api({"multi": MODELS / "multi_io.onnx"}, token=TOKEN.encode()) as (url, _):
        yield url


def test_with_a_token_every_request_but_liveness_is_401_json_without_it(token_api: str) -> None:
    base = f"http://{token_api}"
    good = {"authorization": f"Bearer {TOKEN}"}
    assert httpx.get(f"{base}/v2/health/live").status_code == 200
    for method, path in [
        ("GET", "/v2"),
        ("GET", "/v2/health/ready"),
        ("GET", "/v2/models/multi"),
        ("POST", "/v2/models/multi/infer"),
        ("POST", "/v2/models/multi/predict"),
        ("GET", "/metrics"),
        ("GET", "/v2/models/unknown"),
    ]:
        for headers in ({}, {"authorization": "Bearer wrong-token-0123456789"}, {"authorization": f"Basic {TOKEN}"}):
            r = httpx.request(method, base + path, headers=headers, json={})
            assert r.status_code == 401, (path, headers, r.text)
            assert r.headers["www-authenticate"].startswith("Bearer") and "error" in r.json()
            assert TOKEN not in r.text
        assert httpx.request(method, base + path, headers=good, json={}).status_code != 401
    assert "needs a token" in httpx.get(f"{base}/v2").json()["error"]
    assert "wrong API token" in httpx.get(f"{base}/v2", headers={"authorization": "Bearer nope"}).json()["error"]
    assert httpx.get(f"{base}/v2", headers={"authorization": f"bearer  {TOKEN}"}).status_code == 200


def test_tritonclient_works_with_the_token_as_a_header(token_api: str) -> None:
    client = triton.InferenceServerClient(url=token_api)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        assert client.is_server_live()
        assert client.is_server_ready(headers=auth)
        assert client.get_model_metadata("multi", headers=auth)["name"] == "multi"
        with pytest.raises(triton.InferenceServerException, match="needs a token"):
            client.get_model_metadata("multi")
    finally:
        client.close()


def _serve(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [EDGEFLEET, "agent", "serve", str(MODELS / "multi_io.onnx"), *args],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_agent_serve_on_all_addresses_without_a_token_is_one_line_naming_the_setting() -> None:
    proc = _serve("--host", "0.0.0.0", "--port", str(free_port()))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "api.token" in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize(("content", "needle"), [(None, "cannot read"), ("short\n", "holds no token of at least 16")])
def test_a_bad_token_file_is_one_line_naming_it(tmp_path: Path, content: str | None, needle: str) -> None:
    f = tmp_path / "token"
    if content is not None:
        f.write_text(content)
    proc = _serve("--host", "0.0.0.0", "--port", "0", env={"EDGEFLEET_AGENT__API__TOKEN_FILE": str(f)})
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"error: api.token_file: {f}" in lines[0] and needle in lines[0], err


def _outward_address() -> str | None:
    """This machine's address on its default route (no packet is sent), or None without one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: only picks the route
        except OSError:
            return None
        addr = str(s.getsockname()[0])
    return None if addr.startswith("127.") or addr == "0.0.0.0" else addr


@pytest.mark.parametrize("given_by", ["environment", "flag"])
def test_agent_serve_on_all_addresses_with_a_token_file(tmp_path: Path, given_by: str) -> None:
    """A real `agent serve --host 0.0.0.0` with EDGEFLEET_AGENT__API__TOKEN_FILE or --token-file: 401
    without the token on loopback, on the machine's outward address and on the Unix socket, 200 with it,
    and the token in no log line."""
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")
    f.chmod(0o600)
    port, uds = free_port(), tmp_path / "agent.sock"
    proc = _serve(
        "--host",
        "0.0.0.0",
        "--port",
        str(port),
        "--uds",
        str(uds),
        "--log-level",
        "debug",
        *(["--token-file", str(f)] if given_by == "flag" else []),
        env={"EDGEFLEET_AGENT__API__TOKEN_FILE": str(f)} if given_by == "environment" else {},
    )
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline()
        assert ready.startswith("ready:"), ready
        hosts = ["127.0.0.1", *filter(None, [_outward_address()])]
        for host in hosts:
            base = f"http://{host}:{port}"
            assert httpx.get(f"{base}/v2/health/live").status_code == 200
            r = httpx.get(f"{base}/v2/models/multi_io")
            assert r.status_code == 401 and r.json()["error"].startswith("this agent's API needs a token")
            r = httpx.get(f"{base}/v2/models/multi_io", headers={"authorization": f"Bearer {TOKEN}"})
            assert r.status_code == 200, r.text
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(uds))) as c:  # every listener, the socket too
            assert c.get("http://agent/v2/models/multi_io").status_code == 401
            assert c.get("http://agent/v2/models/multi_io", headers={"authorization": f"Bearer {TOKEN}"}).is_success
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert TOKEN not in ready + out + err


def test_a_request_without_the_token_is_refused_before_its_body_is_read(token_api: str) -> None:
    """A client beyond loopback without the token cannot make the agent buffer anything: the 401 comes
    after the headers alone, with the 60 MB body never sent."""
    import socket

    host, port = token_api.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            b"POST /v2/models/multi/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
            b"Inference-Header-Content-Length: 10\r\nContent-Length: 60000000\r\n\r\n"
        )
        head = s.recv(65536).decode("latin-1")
    assert head.startswith("HTTP/1.1 401"), head
    assert "www-authenticate: bearer" in head.lower()
    assert '"error"' in head and "token" in head
