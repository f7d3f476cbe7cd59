"""The agent as a systemd service: sd_notify over a real socket, the units, the install script."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.agent.sdnotify import Notifier, watchdog_interval

REPO = Path(__file__).resolve().parents[1]
UNITS = REPO / "deploy" / "systemd"
INSTALL_SCRIPT = REPO / "deploy" / "install-agent.sh"
INSTALLED_BIN = "/opt/edgefleet/venv/bin/edgefleet"


# --- sd_notify ------------------------------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound at a path, as systemd's; yields it and the NOTIFY_SOCKET value."""
    path = tmp_path / "notify.sock"
    short_dir: str | None = None
    if len(os.fsencode(path)) >= 100:  # sun_path holds 108 bytes; a deep basetemp would not fit
        short_dir = tempfile.mkdtemp(prefix="ef-")
        path = Path(short_dir) / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(10)
    sock.bind(str(path))
    try:
        yield sock, str(path)
    finally:
        sock.close()
        if short_dir is not None:
            shutil.rmtree(short_dir, ignore_errors=True)


@pytest.fixture
def abstract_socket() -> Iterator[tuple[socket.socket, str]]:
    name = f"edgefleet-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(10)
    sock.bind("\0" + name)
    try:
        yield sock, "@" + name
    finally:
        sock.close()


def _fields(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().split("\n"))


def test_ready_arrives_as_one_datagram(
    notify_socket: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, address = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    notifier = Notifier()
    assert notifier.enabled
    assert notifier.ready() is True
    assert sock.recv(4096) == b"READY=1"


def test_ready_with_status_sends_both_fields_together(notify_socket: tuple[socket.socket, str]) -> None:
    sock, address = notify_socket
    Notifier({"NOTIFY_SOCKET": address}).ready(status="serving 2 models")
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving 2 models"


def test_status_watchdog_stopping_each_arrive_in_order(notify_socket: tuple[socket.socket, str]) -> None:
    sock, address = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": address})
    assert notifier.status("loading digits_cnn_int8.tflite")
    assert notifier.watchdog()
    assert notifier.stopping()
    assert [sock.recv(4096) for _ in range(3)] == [
        b"STATUS=loading digits_cnn_int8.tflite",
        b"WATCHDOG=1",
        b"STOPPING=1",
    ]


def test_reloading_carries_a_monotonic_timestamp(notify_socket: tuple[socket.socket, str]) -> None:
    sock, address = notify_socket
    assert Notifier({"NOTIFY_SOCKET": address}).reloading()
    fields = _fields(sock.recv(4096))
    assert fields["RELOADING"] == "1"
    assert int(fields["MONOTONIC_USEC"]) > 0


def test_abstract_socket_receives_ready_and_watchdog(abstract_socket: tuple[socket.socket, str]) -> None:
    sock, address = abstract_socket
    assert address.startswith("@")
    notifier = Notifier({"NOTIFY_SOCKET": address})
    assert notifier.ready()
    assert notifier.watchdog()
    assert [sock.recv(4096), sock.recv(4096)] == [b"READY=1", b"WATCHDOG=1"]


def test_notify_sends_arbitrary_fields_and_flattens_newlines(notify_socket: tuple[socket.socket, str]) -> None:
    sock, address = notify_socket
    assert Notifier({"NOTIFY_SOCKET": address}).notify(
        STATUS="model failed:\nbad tensor", EXTEND_TIMEOUT_USEC=60_000_000
    )
    assert sock.recv(4096) == b"STATUS=model failed: bad tensor\nEXTEND_TIMEOUT_USEC=60000000"


def test_notify_rejects_a_field_name_that_is_not_upper_case(notify_socket: tuple[socket.socket, str]) -> None:
    _, address = notify_socket
    with pytest.raises(ValueError, match="'ready'"):
        Notifier({"NOTIFY_SOCKET": address}).notify(ready=1)


def test_datagram_comes_from_this_process_as_notify_access_main_requires(
    notify_socket: tuple[socket.socket, str],
) -> None:
    """systemd reads the sender's credentials; with NotifyAccess=main the pid must be the main one."""
    sock, address = notify_socket
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    Notifier({"NOTIFY_SOCKET": address}).watchdog()
    data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
    assert data == b"WATCHDOG=1"
    creds = [d for level, kind, d in ancillary if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS]
    assert len(creds) == 1
    pid, uid, _gid = struct.unpack("3i", creds[0][: struct.calcsize("3i")])
    assert (pid, uid) == (os.getpid(), os.getuid())


def test_without_notify_socket_every_call_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert not notifier.enabled
    assert [notifier.ready(), notifier.status("x"), notifier.watchdog(), notifier.stopping(), notifier.reloading()] == [
        False
    ] * 5


def test_unsupported_address_is_logged_and_ignored(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="edgefleet.agent.sdnotify"):
        notifier = Notifier({"NOTIFY_SOCKET": "relative/notify.sock"})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert "neither a path nor an abstract socket" in caplog.text


def test_send_failure_is_logged_once_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})  # nobody listens: ECONNREFUSED/ENOENT
    with caplog.at_level(logging.DEBUG, logger="edgefleet.agent.sdnotify"):
        assert notifier.watchdog() is False
        assert notifier.watchdog() is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "sd_notify" in warnings[0].getMessage()
    assert "WATCHDOG" in warnings[0].getMessage()


def test_watchdog_interval_is_watchdog_usec_in_seconds() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid())}) == 0.5


def test_watchdog_interval_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 30.0


def test_notifier_watchdog_interval_uses_the_environment_it_was_built_from(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    from_os = Notifier()
    monkeypatch.delenv("WATCHDOG_USEC")
    assert from_os.watchdog_interval() == 30.0
    assert Notifier({"WATCHDOG_USEC": "20000000"}).watchdog_interval() == 20.0
    assert Notifier({}).watchdog_interval() is None


def test_watchdog_interval_is_none_when_the_watchdog_belongs_to_another_process() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}) is None


@pytest.mark.parametrize(
    "environ",
    [{}, {"WATCHDOG_USEC": ""}, {"WATCHDOG_USEC": "0"}, {"WATCHDOG_USEC": "-5"}, {"WATCHDOG_USEC": "soon"}],
    ids=["unset", "empty", "zero", "negative", "not-a-number"],
)
def test_watchdog_interval_is_none_without_a_valid_watchdog_usec(environ: dict[str, str]) -> None:
    assert watchdog_interval(environ) is None


def test_watchdog_interval_is_none_when_watchdog_pid_is_garbage() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "main"}) is None


# --- The units ------------------------------------------------------------------------------------


def _systemd_analyze() -> str:
    """The systemd-analyze binary; skips the test without it, except under CI=true where it fails."""
    found = shutil.which("systemd-analyze") or next(
        (p for p in ("/usr/bin/systemd-analyze", "/bin/systemd-analyze") if os.access(p, os.X_OK)), None
    )
    if found is None:
        reason = "systemd-analyze is not installed (Debian/Ubuntu: apt-get install systemd)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI=true requires it")
        pytest.skip(reason)
    return found


def _edgefleet_bin() -> Path:
    """The edgefleet console script of the environment running the tests."""
    beside = Path(sys.executable).parent / "edgefleet"
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which("edgefleet")
    assert found, "the edgefleet console script is not installed (pip install -e .)"
    return Path(found)


def _unit_for_verify(name: str, tmp_path: Path, binary: Path | None = None) -> Path:
    """A copy of the unit whose ExecStart runs ``binary`` (default: the installed edgefleet)."""
    text = (UNITS / name).read_text()
    exec_line = f"ExecStart={INSTALLED_BIN} "
    assert text.count(exec_line) == 1, f"{name}: expected one ExecStart={INSTALLED_BIN} ..."
    exe = str(binary or _edgefleet_bin())
    if any(c.isspace() for c in exe):
        exe = f'"{exe}"'
    copy = tmp_path / name
    copy.write_text(text.replace(exec_line, f"ExecStart={exe} "))
    return copy


def _verify(unit: Path) -> tuple[int, str, list[str]]:
    """Run ``systemd-analyze verify``; returns its exit code, its output and the lines about ``unit``.

    Unknown keys and bad values are only warnings (exit code 0), so the lines matter as much as the code.
    """
    r = subprocess.run(
        [_systemd_analyze(), "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=unit.parent,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""},
    )
    output = r.stdout + r.stderr
    return r.returncode, output, [line for line in output.splitlines() if unit.name in line]


@pytest.mark.parametrize("name", ["edgefleet-agent.service", "edgefleet-server.service"])
def test_unit_passes_systemd_analyze_verify(name: str, tmp_path: Path) -> None:
    code, output, about_unit = _verify(_unit_for_verify(name, tmp_path))
    assert code == 0, f"systemd-analyze verify exited {code}:\n{output}"
    assert about_unit == [], f"systemd-analyze verify warned about {name}:\n{output}"


def test_verify_check_reports_an_unknown_key_and_a_missing_binary(tmp_path: Path) -> None:
    """The check above is not vacuous: it sees warnings (exit code 0) and errors in this systemd."""
    unit = _unit_for_verify("edgefleet-agent.service", tmp_path)
    unit.write_text(unit.read_text().replace("[Service]\n", "[Service]\nWatchdogSeconds=30\n", 1))
    code, output, about_unit = _verify(unit)
    assert any("WatchdogSeconds" in line for line in about_unit), output

    missing = _unit_for_verify("edgefleet-agent.service", tmp_path, binary=tmp_path / "no" / "edgefleet")
    code, output, about_unit = _verify(missing)
    assert code != 0 and about_unit, output


def _settings(name: str) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit file (all sections; repeated keys keep every value)."""
    found: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


@pytest.mark.parametrize("name", ["edgefleet-agent.service", "edgefleet-server.service"])
def test_unit_is_notify_with_watchdog_restart_and_sandbox(name: str) -> None:
    s = _settings(name)
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "30",
        "Restart": "on-failure",
        "RestartSec": "5",
        "KillSignal": "SIGTERM",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "ProtectKernelTunables": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "Environment": "PYTHONUNBUFFERED=1",
    }
    for key, value in expected.items():
        assert value in s.get(key, []), f"{name}: expected {key}={value}, found {s.get(key)}"
    for key in ("User", "Group", "StateDirectory", "MemoryMax", "CPUQuota", "TimeoutStopSec"):
        assert s.get(key), f"{name}: {key}= is not set"
    assert s["User"] != ["root"]


def test_agent_unit_allows_cameras_coral_and_jetson_devices_only() -> None:
    s = _settings("edgefleet-agent.service")
    assert s["DevicePolicy"] == ["closed"]
    allowed = {v.split()[0] for v in s["DeviceAllow"]}
    assert {"char-video4linux", "char-apex", "char-nvhost*"} <= allowed
    assert s["SupplementaryGroups"] == ["video"]
    assert s["ExecStart"] == [f"{INSTALLED_BIN} agent run --config /etc/edgefleet/agent.toml"]
    assert s["User"] == ["edgefleet"]


# --- The install script ---------------------------------------------------------------------------

# Commands the script uses to change the system: under --dry-run none of them may run.
_SIDE_EFFECTS = ("apt-get", "groupadd", "useradd", "usermod", "install", "systemctl", "systemd-analyze", "pip")


def test_install_script_is_valid_bash() -> None:
    r = subprocess.run(["bash", "-n", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert os.access(INSTALL_SCRIPT, os.X_OK), "deploy/install-agent.sh is not executable"


def _dry_run(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run the script with --dry-run, side-effect commands replaced by stubs that record any call."""
    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    calls = tmp_path / "calls.log"
    for name in _SIDE_EFFECTS:
        stub = stubs / name
        stub.write_text(f'#!/bin/sh\necho "{name} $*" >> "{calls}"\nexit 97\n')
        stub.chmod(0o755)
    r = subprocess.run(
        ["bash", str(INSTALL_SCRIPT), "--dry-run", *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "PYTHON": sys.executable},
    )
    return r, calls.read_text().splitlines() if calls.exists() else []


def test_install_dry_run_prints_every_step_and_changes_nothing(tmp_path: Path) -> None:
    example = tmp_path / "agent.example.toml"
    example.write_text("# example\n")
    before = {p: os.path.exists(p) for p in ("/opt/edgefleet", "/etc/systemd/system/edgefleet-agent.service")}
    r, calls = _dry_run(tmp_path, "--example", str(example))
    assert r.returncode == 0, r.stdout + r.stderr
    assert calls == [], f"--dry-run ran {calls}"
    assert {p: os.path.exists(p) for p in before} == before
    out = r.stdout
    for expected in (
        f"+ {Path(INSTALLED_BIN).with_name('python')} -m pip install",  # into the venv the unit runs from
        f"{REPO}\\[agent\\]",  # no SOURCE: this checkout, never a name on an index; printed with %q
        "/etc/systemd/system/edgefleet-agent.service",
        "+ systemctl daemon-reload",
        "+ systemctl enable --now edgefleet-agent",
        "nothing was changed",
    ):
        assert expected in out, f"{expected!r} not in the dry run's output:\n{out}"
    # The binary the unit starts is the one the script installs.
    assert f"+ {INSTALLED_BIN} --version" in out
    if os.path.exists("/etc/edgefleet/agent.toml"):
        assert "left as it is" in out
    else:
        assert f"{example} /etc/edgefleet/agent.toml" in out


def test_install_dry_run_with_a_local_wheel_adds_the_agent_extra(tmp_path: Path) -> None:
    wheel = tmp_path / "edgefleet-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    example = tmp_path / "agent.example.toml"
    example.write_text("")
    r, calls = _dry_run(tmp_path, "--no-start", f"--example={example}", str(wheel))
    assert r.returncode == 0, r.stdout + r.stderr
    assert calls == []
    assert f"{wheel}\\[agent\\]" in r.stdout
    # The same version rebuilt must still replace what is installed.
    assert f"-m pip install --disable-pip-version-check --no-deps --force-reinstall {wheel}\n" in r.stdout
    assert "+ systemctl enable edgefleet-agent" in r.stdout
    assert "--now" not in r.stdout


def test_install_without_an_example_config_stops_before_changing_anything(tmp_path: Path) -> None:
    if os.path.exists("/etc/edgefleet/agent.toml"):
        pytest.skip("this machine has /etc/edgefleet/agent.toml, so no example is needed")
    r, calls = _dry_run(tmp_path, "--example", str(tmp_path / "missing.toml"))
    assert r.returncode == 1
    assert "missing.toml" in r.stderr
    assert "+ " not in r.stdout
    assert calls == []


def test_install_rejects_an_unknown_option(tmp_path: Path) -> None:
    r, calls = _dry_run(tmp_path, "--frobnicate")
    assert r.returncode == 1
    assert "unknown option --frobnicate" in r.stderr
    assert calls == []


def test_install_refuses_a_bare_package_name_that_an_index_would_resolve(tmp_path: Path) -> None:
    """edgefleet is on no package index, so a name there could be anyone's: only files and checkouts."""
    for name in ("edgefleet", "edgefleet[agent]", "edgefleet==0.1.0"):
        r, calls = _dry_run(tmp_path, name)
        assert r.returncode == 1, r.stdout
        assert "SOURCE must be a wheel file or a source checkout" in r.stderr and "make wheel" in r.stderr, r.stderr
        assert "+ " not in r.stdout and calls == []


def test_install_refuses_a_wheel_of_another_project_and_a_folder_without_pyproject(tmp_path: Path) -> None:
    other = tmp_path / "requests-2.0-py3-none-any.whl"
    other.write_bytes(b"")
    r, _ = _dry_run(tmp_path, str(other))
    assert r.returncode == 1 and "is not an edgefleet wheel" in r.stderr, r.stderr
    r, _ = _dry_run(tmp_path, str(tmp_path))
    assert r.returncode == 1 and "not an edgefleet checkout" in r.stderr, r.stderr


def test_install_keeps_extras_given_with_a_wheel(tmp_path: Path) -> None:
    wheel = tmp_path / "edgefleet-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    example = tmp_path / "agent.example.toml"
    example.write_text("")
    r, calls = _dry_run(tmp_path, f"--example={example}", f"{wheel}[agent,server]")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{wheel}\\[agent\\,server\\]" in r.stdout and calls == []  # printed with %q


def _python_310() -> str | None:
    found = shutil.which("python3.10")
    if found:
        return found
    return next((str(p) for p in Path.home().glob(".pyenv/versions/3.10*/bin/python3.10")), None)


def test_install_stops_on_python_older_than_3_11_and_says_how_to_get_it(tmp_path: Path) -> None:
    """The floor is 3.11 everywhere (pyproject, script, docs); JetPack 6 ships 3.10."""
    py310 = _python_310()
    if py310 is None:
        pytest.skip("no Python 3.10 interpreter on this machine to try the floor with")
    example = tmp_path / "agent.example.toml"
    example.write_text("")
    stubs = tmp_path / "stubs"
    r = subprocess.run(
        ["bash", str(INSTALL_SCRIPT), "--dry-run", "--example", str(example)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "PYTHON": py310},
    )
    assert r.returncode == 1, r.stdout
    assert "needs Python 3.11 or later" in r.stderr and "docs/install-pi.md" in r.stderr, r.stderr
    assert "+ " not in r.stdout
