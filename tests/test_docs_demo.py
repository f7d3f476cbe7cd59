"""``edgefleet demo`` as a newcomer sees it: what it prints is true (issues 8 and 10).

A wrong prediction is labelled wrong, the latency ratio says what it divides, and no URL is printed
for a server the demo has already stopped; ``--keep-running`` prints the fleet server's URL while it
is up and stops it cleanly on Ctrl-C. The fleet updater part: a real agent process switches from
digits 1.0.0 to 2.0.0 under load with no failed inference, refuses the bad 3.0.0 with its reason
(``selftest_failed``, from the server's events, ``device show`` and ``agent status``) and keeps
serving 2.0.0; then it is stopped. Real processes throughout.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
from _support import wait_until

EXE = Path(sys.executable).with_name("edgefleet")
ENV = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
SERVED = re.compile(r"true (\w+)\s+predicted (\w+) \((right|WRONG)\)")
ANSWERED_BY = re.compile(r"POST /v2/models/digits/infer .*answered by digits (\S+)")
LOAD = re.compile(r"load thread (while it updated|while it tried 3\.0\.0 and after): (\d+) inferences, answered by "
                  r"(.*?); (no inference failed|\d+ inferences failed).*?; the answering version changed (\d+) time")
PER_VERSION = re.compile(r"(\d+\.\d+\.\d+) × (\d+) \(\d+% right\)")


def _cells(line: str) -> list[str]:
    """The cells of a rich table row (│) or header (┃)."""
    return [c.strip() for c in re.split("[│┃]", line.strip().strip("│┃"))]


@pytest.mark.slow
def test_demo_labels_each_prediction_truly_and_prints_no_link_to_a_stopped_server() -> None:
    r = subprocess.run(
        [str(EXE), "demo", "--runs", "10"], capture_output=True, text=True, timeout=300, env=ENV, stdin=subprocess.DEVNULL
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    # The held-out predictions table: every row says right or WRONG, and says it truly.
    header = next(line for line in out.splitlines() if "right?" in line)
    cols = _cells(header)
    rows = [
        _cells(line)
        for line in out.splitlines()
        if line.startswith("│") and len(_cells(line)) == len(cols) and _cells(line)[0].isdigit()
    ]
    assert len(rows) == 5, out
    for row in rows:
        true, top1, verdict = row[cols.index("true")], row[cols.index("top-1")], row[cols.index("right?")]
        assert verdict == ("right" if true == top1 else "WRONG"), row
    # The agents' answers over the Open Inference Protocol (3 from agent serve, 2 from agent run), likewise.
    served = SERVED.findall(out)
    assert len(served) == 5, out
    for true, predicted, verdict in served:
        assert verdict == ("right" if true == predicted else "WRONG"), (true, predicted, verdict)
    # The ratio column says what it is.
    assert "agent/bare" in out and "ratio of the two p50s" in out
    # Both servers were stopped before the demo ended: no URL of either is offered.
    assert "http://" not in out and "/docs" in out  # /docs only as a hint to --keep-running
    assert "fleet server stopped" in out and out.count("agent stopped on SIGTERM (exit 0)") == 2
    _check_updates(out)


def _event(out: str, kind: str, version: str) -> re.Match[str] | None:
    """The timeline line of an update event: ``+0.69 s  switch.ok  digits 2.0.0 ...``."""
    return re.search(rf"^\s+\+\d+\.\d+ s\s+{re.escape(kind)}\s+digits {re.escape(version)}\b(.*)$", out, re.M)


def _check_updates(out: str) -> None:
    """The fleet updater part of the demo's output says what happened, and it is what should happen."""
    # Signed from the start: a keyring, signed pushes, a pinned token.
    assert re.search(r"edgefleet keys init --keys keys .*-> image root 1, fingerprint [0-9a-f]{16}", out), out
    assert re.search(r"model push digits-1\.0\.0\.efb --keys keys .*signed into the image targets", out), out
    assert "a token pinning image root 1" in out, out
    # A real agent process, its pid printed; it is gone once the demo has ended.
    pid = re.search(r"\$ edgefleet agent run --config agent\.toml\s+-> pid (\d+): ready: 1 model", out)
    assert pid, out
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid.group(1)), 0)
    assert re.search(r"update\.committed in \d+\.\d s", out), out  # 1.0.0 from the updater itself
    # 2.0.0: every step an event from the server, the switch seen by the load thread, committed.
    for kind in ("update.started", "download.ok", "install.ok", "selftest.ok", "switch.ok", "probation.ok",
                 "update.committed"):
        assert _event(out, kind, "2.0.0"), (kind, out)
    first = re.search(r"load thread\s+first answer from 2\.0\.0 \((\d+) answers before it, from 1\.0\.0\)", out)
    assert first and int(first.group(1)) > 0, out
    loads = {m.group(1): m for m in LOAD.finditer(out)}
    assert set(loads) == {"while it updated", "while it tried 3.0.0 and after"}, out
    for when, m in loads.items():
        per = {v: int(n) for v, n in PER_VERSION.findall(m.group(3))}
        assert m.group(4) == "no inference failed" and sum(per.values()) == int(m.group(2)), (when, m.group(0))
        if when == "while it updated":  # from 1.0.0 to 2.0.0, once
            assert list(per) == ["1.0.0", "2.0.0"] and min(per.values()) > 0 and m.group(5) == "1", m.group(0)
        else:  # 3.0.0 never answered
            assert list(per) == ["2.0.0"] and m.group(5) == "0", m.group(0)
    assert "inferences failed" not in out
    # 3.0.0: refused by its self-test, with the reason, everywhere it is shown; 2.0.0 kept serving.
    refused = _event(out, "update.refused", "3.0.0")
    assert refused and "reason selftest_failed" in refused.group(1), out
    assert not _event(out, "switch.ok", "3.0.0") and not _event(out, "update.committed", "3.0.0"), out
    assert re.search(r"\$ edgefleet device show \S+\s+-> running digits 2\.0\.0; update\.refused digits 3\.0\.0: "
                     r"reason selftest_failed", out), out
    assert re.search(r"detail: self-test: .*differs", out), out
    assert re.search(r"^\s+running: digits 2\.0\.0 \(sha256 [0-9a-f]{12}…\), previous 1\.0\.0 kept", out, re.M), out
    assert re.search(r"^\s+refused: digits-3\.0\.0\.efb: selftest_failed$", out, re.M), out
    assert ANSWERED_BY.findall(out) == ["1.0.0", "2.0.0"], out
    assert re.search(r"│ dev-\S+\s+│ demo\s+│ True\s+│ False\s+│ digits@2\.0\.0", out), out


@pytest.mark.slow
def test_demo_keep_running_serves_its_printed_url_until_ctrl_c() -> None:
    proc = subprocess.Popen(
        [str(EXE), "demo", "--runs", "10", "--keep-running"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env=ENV,
        start_new_session=True,  # Ctrl-C in a terminal reaches the whole foreground group: so here
    )
    lines: queue.Queue[str] = queue.Queue()
    seen: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put("")

    threading.Thread(target=pump, daemon=True).start()
    try:
        url = None
        while url is None:
            line = lines.get(timeout=300)
            assert line, "demo ended before printing its URL:\n" + "".join(seen)
            seen.append(line)
            m = re.search(r"API docs at (http://127\.0\.0\.1:\d+)/docs", line)
            url = m.group(1) if m else None
        with urllib.request.urlopen(f"{url}/docs", timeout=10) as resp:
            assert resp.status == 200
        with urllib.request.urlopen(f"{url}/healthz", timeout=10) as resp:
            assert resp.status == 200
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    while (line := lines.get(timeout=30)) != "":
        seen.append(line)
    assert code == 0, "".join(seen)
    assert any("fleet server stopped" in line for line in seen), "".join(seen)

    def refused() -> bool:
        try:
            urllib.request.urlopen(f"{url}/healthz", timeout=2).close()
        except OSError:
            return True
        return False

    assert wait_until(refused, timeout=15), "the fleet server outlived the demo"


@pytest.mark.slow
def test_demo_interrupted_mid_update_stops_its_agent_and_server() -> None:
    """SIGINT to the demo alone (not its process group, so nothing else stops its children) while the
    agent is updating to 2.0.0: the demo's own cleanup stops the agent process and the fleet server."""
    proc = subprocess.Popen(
        [str(EXE), "demo", "--runs", "10"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env=ENV,
        start_new_session=True,
    )
    seen: list[str] = []
    agent_pid = server_port = None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if m := re.search(r"edgefleet server run --data fleet-data --port (\d+)", line):
                server_port = int(m.group(1))
            if m := re.search(r"edgefleet agent run --config agent\.toml\s+-> pid (\d+)", line):
                agent_pid = int(m.group(1))
            if re.search(r"edgefleet device assign \S+ digits 2\.0\.0", line):
                os.kill(proc.pid, signal.SIGINT)
                break
        else:
            pytest.fail("the demo ended before assigning 2.0.0:\n" + "".join(seen))
        rest, _ = proc.communicate(timeout=120)
        seen.append(rest)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    out = "".join(seen)
    assert proc.returncode != 0, out
    assert agent_pid is not None and server_port is not None, out
    assert "agent stopped on SIGTERM" in rest and "fleet server stopped" in rest, out
    with pytest.raises(ProcessLookupError):
        os.kill(agent_pid, 0)

    def refused() -> bool:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{server_port}/healthz", timeout=2).close()
        except OSError:
            return True
        return False

    assert wait_until(refused, timeout=15), "the fleet server outlived the demo"
