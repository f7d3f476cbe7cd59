"""agent.toml: validation errors name the key and the line; environment overrides."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgefleet.agent.config import load_config, parse_config
from edgefleet.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[1] / "deploy" / "agent.example.toml"
EDGEFLEET = shutil.which("edgefleet", path=str(Path(sys.executable).parent)) or "edgefleet"

GOOD = """\
device_id = "pi-01"
state_dir = "state"

[api]
port = 9000
uds = "/run/edgefleet/agent.sock"

[[models]]
path = "models/digits.efb"

[[models]]
path = "/opt/m/other.onnx"
threads = 2
"""


def test_the_shipped_example_is_valid() -> None:
    cfg = load_config(EXAMPLE, env={})
    assert cfg.api.port == 8500 and cfg.api.host == "127.0.0.1"


def test_relative_paths_are_taken_from_the_config_folder(tmp_path: Path) -> None:
    p = tmp_path / "agent.toml"
    p.write_text(GOOD)
    cfg = load_config(p, env={})
    assert cfg.models[0].path == tmp_path / "models" / "digits.efb"
    assert cfg.models[1].path == Path("/opt/m/other.onnx") and cfg.models[1].threads == 2
    assert cfg.state_dir == tmp_path / "state"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (GOOD.replace("port = 9000", "port = 99999"), "api.port (line 5): Input should be less than or equal to 65535"),
        (
            GOOD.replace("threads = 2", "threads = 0"),
            "models.1.threads (line 13): Input should be greater than or equal to 1",
        ),
        (GOOD.replace("port = 9000", "prot = 9000"), "api.prot (line 5): unknown field"),
        (GOOD + "\n[hardware]\nprofile = 3\n", "hardware.profile (line 16): Input should be a valid string"),
        (GOOD.replace('path = "models/digits.efb"', "paht = 1"), "models.0.paht (line 9): unknown field"),
        ("[api\nport = 1", "not valid TOML"),
        (
            GOOD + '\n[[models]]\npath = "/x/other.onnx"\n',
            "models: /opt/m/other.onnx and /x/other.onnx are both served as 'other'",
        ),
    ],
)
def test_errors_name_the_key_and_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=r"agent\.toml: ") as e:
        parse_config(text, "agent.toml", env={})
    assert message in str(e.value)


def test_environment_overrides_nested_keys() -> None:
    env = {"EDGEFLEET_AGENT__API__PORT": "9100", "EDGEFLEET_AGENT__DEVICE_ID": "pi-99", "OTHER": "x"}
    cfg = parse_config(GOOD, env=env)
    assert cfg.api.port == 9100 and cfg.device_id == "pi-99"


def test_old_environment_form_still_works_with_a_warning_naming_the_new_one(caplog: pytest.LogCaptureFixture) -> None:
    cfg = parse_config(GOOD, env={"EDGEFLEET_API__PORT": "9100", "EDGEFLEET_DEVICE_ID": "pi-99"})
    assert cfg.api.port == 9100 and cfg.device_id == "pi-99"
    assert "EDGEFLEET_API__PORT is deprecated" in caplog.text and "use EDGEFLEET_AGENT__API__PORT" in caplog.text
    assert "use EDGEFLEET_AGENT__DEVICE_ID" in caplog.text


def test_other_commands_variables_never_break_the_agent() -> None:
    env = {
        "EDGEFLEET_SERVER": "https://fleet.example",
        "EDGEFLEET_TOKEN": "eft_x",
        "EDGEFLEET_CA_CERT": "/etc/ca.pem",
        "EDGEFLEET_ENROLL_TOKEN": "efe_x",
        "EDGEFLEET_CLI_CONFIG": "/x/cli.toml",
        "EDGEFLEET_SERVER_PORT": "9999",
        "EDGEFLEET_SERVER_URL": "https://elsewhere",
        "EDGEFLEET_SERVER_DB": "sqlite:///x.db",
    }
    cfg = parse_config(GOOD, env=env)
    assert cfg.api.port == 9000 and cfg.server_url is None


def test_bad_environment_override_is_named() -> None:
    with pytest.raises(
        ConfigError, match=r"api.port \(from \$EDGEFLEET_AGENT__API__PORT\): Input should be a valid integer"
    ):
        parse_config(GOOD, env={"EDGEFLEET_AGENT__API__PORT": "lots"})
    with pytest.raises(ConfigError, match=r"api.prot \(from \$EDGEFLEET_AGENT__API__PROT\): unknown field"):
        parse_config(GOOD, env={"EDGEFLEET_AGENT__API__PROT": "1"})


def test_check_config_command(tmp_path: Path, models_dir: Path) -> None:
    p = tmp_path / "agent.toml"
    (tmp_path / "models").mkdir()
    shutil.copy(models_dir / "digits_cnn_float.onnx", tmp_path / "models" / "digits.onnx")
    p.write_text(
        GOOD.replace("models/digits.efb", "models/digits.onnx")
        .replace("/opt/m/other.onnx", "models/digits.onnx")
        .replace("threads = 2", 'threads = 2\nname = "other"')
    )
    r = subprocess.run(
        [EDGEFLEET, "agent", "check-config", str(p), "--json"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["api"]["port"] == 9000
    p.write_text(GOOD.replace("port = 9000", "port = -1"))
    r = subprocess.run([EDGEFLEET, "agent", "check-config", str(p)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "api.port (line 5)" in r.stderr and "Traceback" not in r.stderr


def test_agent_run_entry_points(tmp_path: Path) -> None:
    """`agent run` starts without the interactive CLI, yet errors and --help behave as elsewhere."""
    r = subprocess.run(
        [EDGEFLEET, "agent", "run", "--config", str(tmp_path / "missing.toml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "error: " in r.stderr and "missing.toml: cannot read config" in r.stderr
    r = subprocess.run([EDGEFLEET, "agent", "run", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--config" in r.stdout
    r = subprocess.run([EDGEFLEET, "agent", "run"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--config" in r.stderr
    probe = "import sys; import edgefleet.cli.entry, edgefleet.agent.service; print('typer' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "False"


def test_flow_errors_name_the_key_and_line() -> None:
    text = (
        GOOD
        + '\n[[flows]]\nmodel = "digits"\nsource = { type = "folder", path = "/in" }\nsinks = [{ type = "jsonl" }]\n'
    )
    with pytest.raises(ConfigError) as e:
        parse_config(text, "agent.toml", env={})
    assert "flows.0.sinks.0.jsonl.path (line 18): Field required" in str(e.value)
    text = GOOD + '\n[[flows]]\nmodel = "digits"\nsource = { type = "webcam" }\nsinks = [{ type = "stdout" }]\n'
    with pytest.raises(ConfigError, match=r"flows\.0\.source \(line 17\): Input tag 'webcam'"):
        parse_config(text, "agent.toml", env={})
