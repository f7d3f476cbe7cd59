"""The ``<!-- doctest: container -->`` blocks of the docs, run as written in a booted Debian 12 with a real systemd.

A container test boots a throw-away overlay of a cached Debian 12 root (tests/_container.py) with
``systemd-nspawn --boot``, copies in the wheel ``make wheel`` builds (as ``dist/edgefleet-VERSION-py3-none-any.whl``)
and the checkout's ``deploy/`` folder, and runs the doc's container blocks in order from that folder, each
under ``set -e -o pipefail`` in a fresh bash as root (``sudo`` works as root). ``sudoedit`` opens no editor
(``SUDO_EDITOR=true``: the reader's edit is a no-op). A block marked ``<!-- doctest: container fresh -->`` starts
a new container: it is an alternative to the blocks before it (installing by hand instead of with the script),
not a step after them.

pip reaches PyPI with this machine's pip settings and CA certificates (copied into each container), and keeps
its cache in ``/var/cache/edgefleet-test/pip`` across runs. The container shares the host's network (pip and
apt need it), where other tests may hold the example config's port 8500, so before the blocks run the test adds
a drop-in, as a reader would with ``systemctl edit``, giving the agent a free port
(``EDGEFLEET_AGENT__API__PORT=0``); it shows in ``systemctl status`` as ``Drop-In:``.

Without root or the tools (debootstrap, systemd-nspawn) these tests skip, saying what is missing; under
``CI=true`` they fail instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import _container
import pytest
from test_docs import SHELL_LANGS, Block, console_commands, parse

REPO = Path(__file__).resolve().parents[1]
INSTALL_DOC = REPO / "docs" / "install-pi.md"
WORKDIR = "/root/edgefleet"  # inside: dist/ and deploy/ side by side, as in a copy of the source
PIP_CACHE = _container.CACHE / "pip"
BLOCK_TIMEOUT = 600  # s, for one block (a cold pip install of the agent extra is most of it)
DROP_IN = "etc/systemd/system/edgefleet-agent.service.d/50-doctest-free-port.conf"
LISTENING = re.compile(r" on http://127\.0\.0\.1:(\d+)")
BLOCK_ENV = {"SUDO_EDITOR": "true", "EDITOR": "true", "VISUAL": "true", "DEBIAN_FRONTEND": "noninteractive"}
CONTAINER_REASONS = {"", "fresh"}


def container_runs(doc: Path) -> list[list[Block]]:
    """The container blocks of ``doc`` grouped by container: a ``container fresh`` block starts a new one."""
    runs: list[list[Block]] = []
    for b in parse(doc)[0]:
        if b.mode != "container" or b.lang not in SHELL_LANGS:
            continue
        if not runs or b.reason == "fresh":
            runs.append([])
        runs[-1].append(b)
    return runs


def _need_containers() -> None:
    reason = _container.unavailable()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"the container doc-test cannot run: {reason} (CI=true: not skipping)")
    pytest.skip(f"the container doc-test needs a systemd container: {reason}")


# --- No container needed ----------------------------------------------------------------------------


def test_container_markers_say_only_whether_a_new_container_starts() -> None:
    bad = [
        f"{b.where}: 'doctest: container {b.reason}' (expected nothing or 'fresh' after 'container')"
        for d in [REPO / "README.md", *(REPO / "docs").glob("*.md")]
        for b in parse(d)[0]
        if b.mode == "container" and b.reason not in CONTAINER_REASONS
    ]
    assert not bad, "\n".join(bad)


def test_every_container_block_is_run_by_these_tests() -> None:
    """Only docs/install-pi.md's shell blocks are run in a container below: a container block elsewhere would
    never run (mark it run or skip, or add its doc here)."""
    unrun = [
        f"{b.where}: ```{b.lang} 'doctest: container' block that no container test runs"
        for d in [REPO / "README.md", *(REPO / "docs").glob("*.md")]
        for b in parse(d)[0]
        if b.mode == "container" and (d != INSTALL_DOC or b.lang not in SHELL_LANGS)
    ]
    assert not unrun, "\n".join(unrun)


def test_install_doc_has_a_script_path_and_a_by_hand_path() -> None:
    """What the two container tests below run: if the doc is rearranged, they must be rearranged with it."""
    runs = container_runs(INSTALL_DOC)
    assert len(runs) == 2, [[b.where for b in r] for r in runs]
    script, by_hand = ("\n".join(b.text for b in r) for r in runs)
    assert "deploy/install-agent.sh" in script and "useradd" not in script
    assert "useradd" in by_hand and "install-agent.sh" not in by_hand
    assert "userdel" in runs[1][-1].text, "the by-hand run should end with the removal block"


# --- In a container --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the one wheel ``make wheel`` builds."""
    _need_containers()
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run(
        ["make", "--no-print-directory", "wheel", f"DIST={out}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert len(list(out.glob("edgefleet-*.whl"))) == 1, sorted(p.name for p in out.iterdir())
    return out


@pytest.fixture
def container(dist: Path, tmp_path: Path) -> Iterator[_container.Container]:
    """A booted Debian 12 with the wheel in WORKDIR/dist and the checkout's deploy/ in WORKDIR/deploy."""
    try:
        root = _container.cached_root()
    except _container.ContainerError as e:
        pytest.fail(f"building the Debian 12 root failed: {e}")
    PIP_CACHE.mkdir(parents=True, exist_ok=True)
    with _container.booted(binds={PIP_CACHE: "/root/.cache/pip"}, workdir=tmp_path) as c:
        assert c.root != root
        work = c.root / WORKDIR.lstrip("/")
        shutil.copytree(REPO / "deploy", work / "deploy", symlinks=True)
        shutil.copytree(dist, work / "dist")
        drop_in = c.root / DROP_IN
        drop_in.parent.mkdir(parents=True)
        drop_in.write_text(
            "# the doc-test: any free port, not 8500 (the network is the host's)\n"
            "[Service]\nEnvironment=EDGEFLEET_AGENT__API__PORT=0\n"
        )
        yield c


def run_block(c: _container.Container, block: Block) -> str:
    """One doc block, as written, from WORKDIR; fails the test with its output and the agent's journal."""
    text = console_commands(block.text) if block.lang == "console" else block.text
    r = c.run(f"set -e -o pipefail\n{text}", cwd=WORKDIR, timeout=BLOCK_TIMEOUT, env=BLOCK_ENV)
    if r.returncode != 0:
        journal = c.journal("edgefleet-agent", lines=40)
        pytest.fail(
            f"{block.where}: the block failed (exit {r.returncode}):\n{r.output[-4000:]}\n"
            f"--- journalctl -u edgefleet-agent:\n{journal}"
        )
    return r.output


def prop(c: _container.Container, unit: str, name: str) -> str:
    return c.check(f"systemctl show -p {name} --value {unit}").strip()


def assert_agent_serving(c: _container.Container) -> None:
    """Active under systemd only after its own READY=1, as user edgefleet, with the local API answering."""
    unit = "edgefleet-agent"
    state = c.run(f"systemctl is-active {unit}").output.strip()
    assert state == "active", f"{unit} is {state!r}:\n{c.journal(unit, 60)}"
    status = prop(c, unit, "StatusText")
    assert status.startswith("ready: "), f"the status line is not the agent's own: {status!r}"
    assert prop(c, unit, "Type") == "notify"
    assert prop(c, unit, "NRestarts") == "0", c.journal(unit, 60)
    pid = prop(c, unit, "MainPID")
    assert c.check(f"ps -o user= -p {pid}").strip() == "edgefleet"
    port = LISTENING.search(status)
    assert port, status
    c.check(f"curl -sf --retry 10 --retry-delay 1 --retry-connrefused http://127.0.0.1:{port[1]}/v2/health/live")
    # The example config serves no model yet, so the agent is live but not ready (503, in JSON).
    ready = c.check("curl -s --unix-socket /run/edgefleet/agent.sock http://localhost/v2/health/ready")
    assert json.loads(ready) == {"ready": False}, ready


@pytest.mark.slow
def test_script_install_blocks_leave_the_agent_active_under_systemd(container: _container.Container) -> None:
    script_run = container_runs(INSTALL_DOC)[0]
    outputs = [run_block(container, b) for b in script_run]
    assert "dry run: nothing was changed" in outputs[0]
    assert_agent_serving(container)
    # The unit the script installed is the checkout's, and its sandbox is what the doc describes.
    installed = container.check("cat /etc/systemd/system/edgefleet-agent.service")
    assert installed == (REPO / "deploy/systemd/edgefleet-agent.service").read_text()
    assert prop(container, "edgefleet-agent", "ProtectSystem") == "strict"
    assert container.check("stat -c '%U %a' /var/lib/edgefleet").strip() == "edgefleet 750"


@pytest.mark.slow
def test_by_hand_check_and_remove_blocks_install_the_agent_then_leave_nothing(
    container: _container.Container,
) -> None:
    install, *rest = container_runs(INSTALL_DOC)[1]
    run_block(container, install)
    assert_agent_serving(container)
    for block in rest:
        output = run_block(container, block)
        if "systemctl status" in block.text:
            assert 'Status: "ready: ' in output, output
            assert "-- No entries --" not in output, output
    assert container.run("systemctl cat edgefleet-agent").returncode != 0, "the unit is still there"
    assert container.run("id edgefleet").returncode != 0, "the user edgefleet is still there"
    left = container.check("ls /opt /var/lib /var/cache /etc").split()
    assert "edgefleet" not in left, "a folder of the agent is still there"
    assert container.run("pgrep -f 'edgefleet agent run'").returncode == 1, "an agent process is still running"
    assert container.run("test -e /run/edgefleet/agent.sock").returncode != 0, "the agent's socket is still there"
