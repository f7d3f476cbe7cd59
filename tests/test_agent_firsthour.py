"""The agent's first hour, as a new user meets it: environment variables, enrollment and the identity
file, the example config, and the one-line errors of the usual first mistakes. Real CLI invocations
(in this process with run_cli, or as subprocesses where the command serves), a real fleet server."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from _support import MODELS, assert_one_line_error, digits_bundle, free_port, run_cli

from edgefleet.agent.config import AgentConfig, ApiConfig, HardwareConfig, ModelConfig, UpdatesConfig
from edgefleet.agent.telemetry.config import MqttFleetConfig, MqttLocalConfig

REPO = Path(__file__).resolve().parents[1]
EDGEFLEET = str(Path(sys.executable).parent / "edgefleet")
EXAMPLE = REPO / "deploy" / "agent.example.toml"
ENV_DOC = REPO / "docs" / "environment.md"
SOURCES = [REPO / "agent", REPO / "fleet-server", REPO / "converters", REPO / "src" / "edgefleet", REPO / "deploy"]
OTHER_COMMANDS_ENV = {
    "EDGEFLEET_SERVER": "https://fleet.example:8400",
    "EDGEFLEET_TOKEN": "eft_not_a_real_token",
    "EDGEFLEET_CA_CERT": "/etc/edgefleet/ca.crt",
    "EDGEFLEET_ENROLL_TOKEN": "efe_not_a_real_token",
    "EDGEFLEET_CLI_CONFIG": "/nonexistent/cli.toml",
    "EDGEFLEET_SERVER_PORT": "1",
    "EDGEFLEET_SERVER_URL": "https://elsewhere.example",
    "EDGEFLEET_SERVER_DB_URL": "postgresql+psycopg://u@db/fleet",
}


def _agent_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    return {**env, **extra}


def _cli(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EDGEFLEET, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env or _agent_env()
    )


def _one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1 and lines, (r.returncode, r.stderr)
    assert lines[-1].startswith("error: "), r.stderr
    assert not any(line.startswith("error: ") for line in lines[:-1]), r.stderr
    for n in needles:
        assert n in lines[-1], (n, lines[-1])


def _config(folder: Path, body: str = "") -> Path:
    p = folder / "agent.toml"
    p.write_text(f'state_dir = "state"\n{body}\n[api]\nport = 8500\n')
    return p


# --- environment variables -------------------------------------------------------------------


def test_agent_toml_overrides_use_the_agent_prefix(tmp_path: Path) -> None:
    env = _agent_env(EDGEFLEET_AGENT__API__PORT="9100", EDGEFLEET_AGENT__LOG_LEVEL="debug")
    r = _cli("agent", "check-config", _config(tmp_path), "--json", env=env)
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)
    assert cfg["api"]["port"] == 9100 and cfg["log_level"] == "debug"
    assert "deprecated" not in r.stderr


def test_old_variable_form_works_for_one_release_with_a_warning_naming_the_new(tmp_path: Path) -> None:
    r = _cli("agent", "check-config", _config(tmp_path), "--json", env=_agent_env(EDGEFLEET_API__PORT="9200"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["api"]["port"] == 9200
    assert "EDGEFLEET_API__PORT is deprecated" in r.stderr and "EDGEFLEET_AGENT__API__PORT" in r.stderr


def test_variables_of_other_commands_never_break_the_agent(tmp_path: Path, models_dir: Path) -> None:
    env = _agent_env(**OTHER_COMMANDS_ENV)
    r = _cli("agent", "check-config", _config(tmp_path), "--json", env=env)
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)
    assert cfg["api"]["port"] == 8500 and cfg["server_url"] is None and r.stderr == ""
    # and `agent serve`, which reads EDGEFLEET_AGENT__* too, starts with them set
    port = free_port()
    proc = subprocess.Popen(
        [EDGEFLEET, "agent", "serve", str(models_dir / "multi_io.onnx"), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("ready:"), proc.stderr.read() if proc.stderr else line
        assert httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=10).json() == {"ready": True}
    finally:
        proc.terminate()
        proc.wait(30)
        if proc.stdout:
            proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()


def _table() -> str:
    text = ENV_DOC.read_text()
    return "\n".join(line for line in text.splitlines() if line.startswith("|"))


def test_every_variable_the_code_reads_is_in_the_one_table() -> None:
    """The code and docs/environment.md agree: every EDGEFLEET_ name in the sources is in the table,
    and so is every agent.toml key's and every server setting's variable."""
    from edgefleet.server.settings import Settings

    table = _table()
    in_code: set[str] = set()
    for root in SOURCES:
        for f in root.rglob("*"):
            if f.is_symlink() or not f.is_file() or f.suffix not in {".py", ".toml", ".sh", ".service", ""}:
                continue
            in_code |= set(re.findall(r"EDGEFLEET_[A-Z0-9_]*[A-Z0-9](?![A-Z0-9_<])", f.read_text(errors="replace")))
    assert in_code, "no EDGEFLEET_ names found: the scan is broken"
    missing = sorted(n for n in in_code if f"`{n}`" not in table)
    assert not missing, f"variables the code names but docs/environment.md's table does not: {missing}"
    keys = [f"EDGEFLEET_AGENT__{k.upper()}" for k in AgentConfig.model_fields
            if k not in ("api", "hardware", "updates", "mqtt")]
    keys += [f"EDGEFLEET_AGENT__API__{k.upper()}" for k in ApiConfig.model_fields]
    keys += [f"EDGEFLEET_AGENT__UPDATES__{k.upper()}" for k in UpdatesConfig.model_fields]
    keys += [f"EDGEFLEET_AGENT__MQTT__FLEET__{k.upper()}" for k in ("host", "port", "tls", "telemetry_interval_s")]
    keys += [f"EDGEFLEET_AGENT__HARDWARE__{k.upper()}" for k in HardwareConfig.model_fields]
    keys += [f"EDGEFLEET_SERVER_{k.upper()}" for k in Settings.model_fields]
    missing = [k for k in keys if f"`{k}`" not in table]
    assert not missing, f"settings without a row in docs/environment.md: {missing}"
    rows = set(re.findall(r"^\| `(EDGEFLEET_[A-Z0-9_]+)`", table, re.M))
    stale = sorted(r for r in rows if r not in keys and r not in in_code)
    assert not stale, f"rows for variables nothing reads: {stale}"


def test_the_example_config_documents_every_key() -> None:
    from edgefleet.agent.flow import FlowConfig

    text = EXAMPLE.read_text()
    tables = {"": AgentConfig, "api": ApiConfig, "hardware": HardwareConfig, "models": ModelConfig, "flows": FlowConfig,
              "updates": UpdatesConfig, "mqtt.fleet": MqttFleetConfig, "mqtt.local": MqttLocalConfig}
    missing = []
    for table, model in tables.items():
        for key in model.model_fields:
            if key in tables or any(t.startswith(f"{key}.") for t in tables):
                assert f"[{key}]" in text or f"[[{key}]]" in text or f"[{key}." in text, key
                continue
            if not re.search(rf"^#?\s*{key}\s*=", text, re.M):
                missing.append(f"{table}.{key}" if table else key)
    assert not missing, f"deploy/agent.example.toml does not show {missing}"


# --- enrollment and the identity file ---------------------------------------------------------


class Fleet:
    def __init__(self, folder: Path) -> None:
        self.data, self.port = folder / "server-data", free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db = f"sqlite:///{folder / 'fleet.db'}"
        self.proc: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str, **env: str) -> str:
        r = _cli(*args, env=_agent_env(EDGEFLEET_SERVER=self.url, **env))
        assert r.returncode == 0, (args, r.stderr)
        return r.stdout


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path)
    admin = json.loads(f.cli("server", "init", "--data", str(f.data), "--db", f.db, "--json"))["admin_token"]
    log = (tmp_path / "server.log").open("wb")
    f.proc = subprocess.Popen(
        [EDGEFLEET, "server", "run", "--data", str(f.data), "--db", f.db, "--port", str(f.port)],
        stdout=log,
        stderr=log,
        env=_agent_env(EDGEFLEET_SERVER_ALLOW_PLAIN_HTTP_DEVICES="true"),
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert f.proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(f"{f.url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the fleet server did not start"
            time.sleep(0.1)
        f.admin = admin  # type: ignore[attr-defined]
        yield f
    finally:
        f.proc.terminate()
        f.proc.wait(30)
        log.close()


def test_enroll_records_the_identity_where_agent_run_finds_it_and_it_wins(fleet: Fleet, tmp_path: Path) -> None:
    keys = str(tmp_path / "keys")  # the operator publishes the TUF roots; the token pins the image root
    fleet.cli("keys", "init", "--keys", keys, "--server", fleet.url, EDGEFLEET_TOKEN=fleet.admin)  # type: ignore[attr-defined]
    token = json.loads(fleet.cli("device", "enroll-token", "--keys", keys, "--json", EDGEFLEET_TOKEN=fleet.admin))["token"]  # type: ignore[attr-defined]
    device = tmp_path / "device"
    device.mkdir()
    config = _config(device, f'server_url = "{fleet.url}"')
    _one_line_error(
        _cli("agent", "enroll", "--config", config, "--server", "https://other.example", "--token", token),
        "--server",
        "https://other.example",
        fleet.url,
    )
    old = os.umask(0)  # whatever the umask, the identity is private
    try:
        r = _cli("agent", "enroll", "--config", config, "--token", token, "--allow-http", "--json")
    finally:
        os.umask(old)
    assert r.returncode == 0, r.stderr
    enrolled = json.loads(r.stdout)
    identity = device / "state" / "identity"
    ident = json.loads((identity / "identity.json").read_text())
    assert ident["device_id"] == enrolled["device_id"] and ident["server_url"] == fleet.url
    assert Path(ident["ca_cert"]) == (identity / "ca.crt").resolve() and Path(ident["ca_cert"]).is_file()
    assert stat.S_IMODE(identity.stat().st_mode) == 0o700
    for f in identity.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f

    # the agent reads it: device_id and ca_cert come from the identity, not from agent.toml
    r = _cli("agent", "check-config", config, "--json")
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)
    assert cfg["device_id"] == ident["device_id"] and cfg["ca_cert"] == ident["ca_cert"]

    # agent.toml repeating the enrolled values is fine; contradicting them is a one-line error
    config.write_text(config.read_text().replace("[api]", f'device_id = "{ident["device_id"]}"\n[api]'))
    assert _cli("agent", "check-config", config).returncode == 0
    config.write_text(config.read_text().replace(f'device_id = "{ident["device_id"]}"', 'device_id = "pi-other"'))
    for command in (("agent", "check-config", config), ("agent", "run", "--config", config)):
        _one_line_error(_cli(*command), "pi-other", ident["device_id"], str(config), "identity.json")
    config.write_text(
        config.read_text().replace('device_id = "pi-other"', "").replace(fleet.url, "https://other.example")
    )
    _one_line_error(_cli("agent", "run", "--config", config), "server_url", "https://other.example", fleet.url)

    # enrolling again without --force is refused, naming the identity
    _one_line_error(_cli("agent", "enroll", "--config", config, "--token", token, "--allow-http"), "already enrolled")


# --- one-line errors of the usual first mistakes ----------------------------------------------


def test_two_bundles_with_the_same_manifest_name_name_both_files(tmp_path: Path) -> None:
    a = digits_bundle(tmp_path / "a")
    b = digits_bundle(tmp_path / "b")
    r = _cli("agent", "serve", a, b, "--port", "0", "--log-level", "warning")
    _one_line_error(r, str(a), str(b), "'digits'")  # (after the TFLite runtime's own INFO line)


def test_a_model_file_and_a_bundle_under_one_name_name_both_files(tmp_path: Path) -> None:
    bundle = digits_bundle(tmp_path / "a")
    bare = tmp_path / "digits.onnx"
    shutil.copy(MODELS / "digits_cnn_float.onnx", bare)
    config = _config(tmp_path, "").read_text() + f'\n[[models]]\npath = "{bundle}"\n\n[[models]]\npath = "{bare}"\n'
    (tmp_path / "agent.toml").write_text(config)
    r = _cli("agent", "run", "--config", tmp_path / "agent.toml")
    _one_line_error(r, str(bundle), str(bare), "'digits'")


def test_two_files_with_one_stem_are_refused_by_check_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        shutil.copy(MODELS / "multi_io.onnx", tmp_path / d / "m.onnx")
    body = '[[models]]\npath = "a/m.onnx"\n\n[[models]]\npath = "b/m.onnx"\n'
    (tmp_path / "agent.toml").write_text(f'state_dir = "state"\n\n{body}')
    code, _, err = run_cli(capsys, "agent", "check-config", tmp_path / "agent.toml")
    assert_one_line_error(code, err, str(tmp_path / "agent.toml"), "a/m.onnx and b/m.onnx", "'m'")


def test_uds_under_a_missing_folder_is_refused_and_not_created(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder"
    r = _cli("agent", "serve", MODELS / "multi_io.onnx", "--port", "0", "--uds", missing / "agent.sock")
    _one_line_error(r, "api.uds", str(missing), "does not exist")
    assert not missing.exists()


def test_check_config_with_a_missing_model_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "agent.toml").write_text('state_dir = "state"\n\n[[models]]\npath = "models/nope.onnx"\n')
    code, _, err = run_cli(capsys, "agent", "check-config", tmp_path / "agent.toml")
    assert_one_line_error(code, err, "models.0.path", str(tmp_path / "models" / "nope.onnx"), "does not exist")


def test_enroll_with_a_server_without_a_scheme_is_one_line(tmp_path: Path) -> None:
    r = _cli("agent", "enroll", "--server", "127.0.0.1:8700", "--token", "efe_x", "--state-dir", tmp_path / "s")
    _one_line_error(r, "--server", "add http:// or https://")
    assert not (tmp_path / "s" / "identity").exists()
