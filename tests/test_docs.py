"""The doc-test: every fenced command block in README.md and docs/*.md, run the way a reader pastes it.

Each command block (```sh, ```bash, ```console, ```shell, and ```python/```pycon) is preceded by
exactly one marker line saying how it is treated:

* ``<!-- doctest: run -->``: run here, in order with the other ``run`` blocks of the same file, as
  written, in one bash session per file (``export``, ``cd`` and ``&`` background servers carry over),
  under ``set -e -o pipefail``, with a fresh temporary HOME and TMPDIR and the repo's .venv/bin first
  on PATH. A ``run`` python block is fed to ``python -`` in that session.
* ``<!-- doctest: container -->``: needs a real systemd/root install; checked for bash syntax here, and
  run in order, as root, in a booted Debian 12 systemd container by tests/test_docs_container.py.
  ``<!-- doctest: container fresh -->`` starts a new container there: the block is an alternative to
  the ones before it (installing by hand instead of with the script), not a step after them.
* ``<!-- doctest: skip REASON -->``: never run; REASON says why.

A block without a marker, a marker without a block, and a fenced block without a language fail.
When a session ends (passed, failed or timed out) its whole process group is killed, so servers a
doc starts in the background never outlive the test.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from _support import wait_until

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])
SHELL_LANGS = {"sh", "bash", "console", "shell", "zsh"}
PYTHON_LANGS = {"python", "py", "pycon"}
COMMAND_LANGS = SHELL_LANGS | PYTHON_LANGS
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<lang>[^\s`{]*)")
MARKER = re.compile(r"^\s*<!--\s*doctest:\s*(?P<mode>\S+)(?:\s+(?P<reason>.*?))?\s*-->\s*$")
MODES = {"run", "container", "skip"}
SESSION_TIMEOUT = 600  # s, for one file's whole session
PORT = re.compile(r"--port[ =](\d{2,5})\b")


@dataclass(frozen=True)
class Block:
    """One fenced block: where it starts (1-based line of the fence), its language, marker and text."""

    doc: Path
    line: int
    lang: str
    mode: str | None
    reason: str
    text: str

    @property
    def where(self) -> str:
        return f"{_rel(self.doc)}:{self.line}"


def _rel(doc: Path) -> Path:
    return doc.relative_to(REPO) if doc.is_relative_to(REPO) else doc


def parse(doc: Path) -> tuple[list[Block], list[str]]:
    """Every fenced block of ``doc`` with its marker, and the problems found (unmarked, stray markers)."""
    lines = doc.read_text().splitlines()
    blocks: list[Block] = []
    problems: list[str] = []
    rel = _rel(doc)
    pending: tuple[int, str, str] | None = None  # a marker waiting for its block: line, mode, reason
    i = 0
    while i < len(lines):
        line = lines[i]
        marker = MARKER.match(line)
        if marker:
            if pending is not None:
                problems.append(f"{rel}:{pending[0]}: a doctest marker followed by another marker, not a block")
            pending = (i + 1, marker["mode"], (marker["reason"] or "").strip())
            i += 1
            continue
        fence = FENCE.match(line)
        if not fence:
            if line.strip() and pending is not None:
                problems.append(f"{rel}:{pending[0]}: a doctest marker not directly followed by a fenced block")
                pending = None
            i += 1
            continue
        close = re.compile(rf"^ {{0,3}}{re.escape(fence['fence'][0])}{{{len(fence['fence'])},}}\s*$")
        end = next((j for j in range(i + 1, len(lines)) if close.match(lines[j])), len(lines))
        lang = fence["lang"].lower()
        mode, reason = (pending[1], pending[2]) if pending else (None, "")
        blocks.append(Block(doc, i + 1, lang, mode, reason, "\n".join(lines[i + 1 : end]) + "\n"))
        pending = None
        i = end + 1
    if pending is not None:
        problems.append(f"{rel}:{pending[0]}: a doctest marker at the end of the file, with no block")
    for b in blocks:
        if b.lang in COMMAND_LANGS:
            if b.mode is None:
                problems.append(
                    f"{b.where}: ```{b.lang} block without a marker: put <!-- doctest: run -->, "
                    "<!-- doctest: container --> or <!-- doctest: skip REASON --> on the line before it"
                )
            elif b.mode not in MODES:
                problems.append(f"{b.where}: unknown doctest mode {b.mode!r} (expected run, container or skip)")
            elif b.mode == "skip" and not b.reason:
                problems.append(f"{b.where}: 'doctest: skip' needs a reason")
            elif b.mode == "run" and b.lang == "pycon":
                problems.append(f"{b.where}: a ```pycon transcript cannot be run: write it as ```python or skip it")
        elif b.mode is not None:
            problems.append(f"{b.where}: a doctest marker on a ```{b.lang or '(no language)'} block, not a command block")
        if b.mode == "run" and b.lang in SHELL_LANGS:
            problems.extend(_unwaited_background(b))
    return blocks, problems


# A background start is followed, in the same block, by a bounded wait for readiness.
BACKGROUND = re.compile(r"(?<![&|])&\s*(#.*)?$")
WAIT = re.compile(r"curl\b.*--retry|until\b.*curl|\bwait-for\b|edgefleet \S+ wait\b")


def _unwaited_background(b: Block) -> list[str]:
    lines = [line for line in b.text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    out = []
    for i, line in enumerate(lines):
        if BACKGROUND.search(line) and not any(WAIT.search(later) for later in lines[i + 1 :]):
            out.append(
                f"{b.where}: {line.strip()!r} starts something in the background with no wait for it to be "
                "ready after it in the block (e.g. curl -sf --retry 30 --retry-delay 1 --retry-connrefused URL)"
            )
    return out


def console_commands(text: str) -> str:
    """The commands of a ```console transcript: ``$ `` lines and their backslash continuations."""
    out: list[str] = []
    continuing = False
    for line in text.splitlines():
        if continuing:
            out.append(line)
        elif line.startswith("$ "):
            out.append(line[2:])
        else:
            continue
        continuing = line.rstrip().endswith("\\")
    return "\n".join(out) + "\n"


def session_script(blocks: list[Block], state: Path) -> str:
    """One bash script: every ``run`` block in order, each announced in ``state`` before it runs."""
    parts = ["set -e -o pipefail", "exec 2>&1", f"cd {_q(REPO)}"]
    for n, b in enumerate(blocks):
        parts.append(f"printf '%s\\n' {_q(b.where)} > {_q(state)}")
        if b.lang in PYTHON_LANGS:
            tag = f"EDGEFLEET_DOCTEST_PY_{n}"
            parts.append(f"python - <<'{tag}'\n{b.text}{tag}")
        elif b.lang == "console":
            parts.append(console_commands(b.text))
        else:
            parts.append(b.text)
    parts.append(f"printf 'done\\n' > {_q(state)}")
    return "\n".join(parts) + "\n"


def _q(s: object) -> str:
    return "'" + str(s).replace("'", "'\\''") + "'"


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _kill_group(pgid: int) -> None:
    """SIGTERM the session's process group, then SIGKILL whatever is left after 10 s."""

    def gone() -> bool:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        return False

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        if wait_until(gone, timeout=10):
            return


def _ids(docs: list[Path]) -> list[str]:
    return [str(d.relative_to(REPO)) for d in docs]


# --- Every block is marked ------------------------------------------------------------------------


@pytest.mark.parametrize("doc", DOCS, ids=_ids(DOCS))
def test_every_command_block_carries_one_doctest_marker(doc: Path) -> None:
    _, problems = parse(doc)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=_ids(DOCS))
def test_every_fenced_block_names_its_language(doc: Path) -> None:
    """An untagged block could hide commands from the doc-test: ```sh for commands, ```text for output."""
    blocks, _ = parse(doc)
    untagged = [b.where for b in blocks if not b.lang]
    assert not untagged, f"fenced blocks without a language (use ```sh + a marker, or ```text): {untagged}"


def test_parser_finds_unmarked_stray_and_reasonless_blocks(tmp_path: Path) -> None:
    doc = tmp_path / "probe.md"
    text = (
        "<!-- doctest: run -->\n```sh\necho ok\n```\n\n"
        "```bash\necho unmarked\n```\n\n"
        "<!-- doctest: skip -->\n```sh\necho no reason\n```\n\n"
        "<!-- doctest: run -->\nprose, not a block\n\n"
        "```toml\nkey = 1\n```\n\n"
        "````console\n$ edgefleet --version \\\n    --help\noutput\n```\nstill inside\n````\n\n"
        "<!-- doctest: run -->\n```sh\nedgefleet agent serve m.efb &\ncurl -s localhost:8500/v2/models/m\n```\n"
    )
    doc.write_text(text)
    blocks, problems = parse(doc)
    assert [(b.lang, b.mode) for b in blocks] == [
        ("sh", "run"),
        ("bash", None),
        ("sh", "skip"),
        ("toml", None),
        ("console", None),
        ("sh", "run"),
    ]
    assert any(":6: ```bash block without a marker" in p for p in problems), problems
    assert any("needs a reason" in p for p in problems), problems
    assert any(":15: a doctest marker not directly followed" in p for p in problems), problems
    assert any(":22: ```console block without a marker" in p for p in problems), problems
    assert console_commands(blocks[4].text) == "edgefleet --version \\\n    --help\n"
    assert any(":31: 'edgefleet agent serve m.efb &' starts something in the background" in p for p in problems), problems


# --- Running them ---------------------------------------------------------------------------------

RUN_DOCS = [d for d in DOCS if any(b.mode == "run" and b.lang in COMMAND_LANGS for b in parse(d)[0])]


@pytest.mark.slow
@pytest.mark.parametrize("doc", RUN_DOCS, ids=_ids(RUN_DOCS))
def test_run_blocks_pass_in_order_in_one_session(doc: Path, tmp_path: Path) -> None:
    blocks = [b for b in parse(doc)[0] if b.mode == "run" and b.lang in COMMAND_LANGS]
    if not (REPO / ".venv" / "bin" / "edgefleet").exists():
        pytest.fail("the docs run from the repo's .venv: create it with `make test` (or make demo) first")
    busy = sorted({int(p) for b in blocks for p in PORT.findall(b.text) if _port_in_use(int(p))})
    assert not busy, f"{doc.name} serves on ports already in use on 127.0.0.1: {busy} (another server left running?)"
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    state = tmp_path / "current-block"
    script = tmp_path / "session.sh"
    script.write_text(session_script(blocks, state))
    # The reader's shell, not this one: no edgefleet settings or virtualenv leak in.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGEFLEET_", "VIRTUAL_ENV", "PYTHON"))}
    env.update(
        HOME=str(home),
        TMPDIR=str(tmp),
        PATH=f"{REPO / '.venv' / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        NO_COLOR="1",
        COLUMNS="120",
    )
    proc = subprocess.Popen(
        ["bash", str(script)],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: background servers die with it
    )
    try:
        output, _ = proc.communicate(timeout=SESSION_TIMEOUT)
        timed_out = False
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        output, _ = proc.communicate()
        timed_out = True
    finally:
        _kill_group(proc.pid)
    last = state.read_text().strip() if state.exists() else "(before the first block)"
    tail = "\n".join(output.splitlines()[-60:])
    if timed_out:
        pytest.fail(f"{doc.name}: the session ran over {SESSION_TIMEOUT} s in the block at {last}:\n{tail}")
    assert proc.returncode == 0 and last == "done", (
        f"{doc.name}: the block at {last} failed (exit {proc.returncode}):\n{tail}"
    )


@pytest.mark.slow
def test_a_session_kills_the_servers_its_blocks_leave_running(tmp_path: Path) -> None:
    """What the runner promises: a background process a doc forgets to stop does not outlive the session."""
    pidfile = tmp_path / "pid"
    script = tmp_path / "s.sh"
    script.write_text(f"{sys.executable} -c 'import time; time.sleep(600)' &\necho $! > {_q(pidfile)}\n")
    proc = subprocess.Popen(["bash", str(script)], start_new_session=True)
    proc.wait(30)
    pid = int(pidfile.read_text())
    os.kill(pid, 0)  # still running after bash exited
    _kill_group(proc.pid)

    def dead() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    assert wait_until(dead, timeout=15)


CONTAINER = [b for d in DOCS for b in parse(d)[0] if b.mode == "container" and b.lang in SHELL_LANGS]


@pytest.mark.parametrize("block", CONTAINER, ids=[b.where for b in CONTAINER])
def test_container_blocks_are_valid_bash(block: Block) -> None:
    """Cheap and real: they parse. Running them needs systemd as PID 1 and root: tests/test_docs_container.py."""
    text = console_commands(block.text) if block.lang == "console" else block.text
    r = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"{block.where}: {r.stderr}"
