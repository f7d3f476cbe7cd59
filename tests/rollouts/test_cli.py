"""``edgefleet rollout ...`` and ``edgefleet device pin|unpin``: the real CLI against a real
``edgefleet server run`` process (SQLite; its controller off, so only the operator moves the rollout)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _support import run_cli
from server._fleet import CLI, Server
from sqlalchemy import select

from edgefleet.server.db import make_engine, make_sessionmaker
from edgefleet.server.models import Rollout
from edgefleet.server.rollouts.codec import gate_result_to_json
from edgefleet.server.rollouts.types import GateResult
from rollouts._ops import add_device, add_version, assign


class Served:
    def __init__(self, srv: Server, token: str) -> None:
        self.srv, self.token = srv, token
        self.engine = make_engine(srv.db)
        self.sessions = make_sessionmaker(self.engine)

    def api(self, method: str, path: str, **kw: Any) -> Any:
        r = httpx.request(method, f"{self.srv.url}{path}", headers={"Authorization": f"Bearer {self.token}"},
                          timeout=30, **kw)
        assert r.status_code < 300, r.text
        return r.json()


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    data = tmp_path / "data"
    db = f"sqlite:///{data / 'edgefleet.db'}"
    r = subprocess.run([*CLI, "server", "init", "--data", str(data), "--json"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    token = json.loads(r.stdout)["admin_token"]
    srv = Server(data, db, env={"EDGEFLEET_SERVER_ROLLOUT_ENABLED": "false"})
    out = Served(srv, token)
    with out.sessions.begin() as s:  # ten devices on digits 1.0.0 at site a, one elsewhere; 2.0.0 and 2.1.0
        v1 = add_version(s, "digits", "1.0.0")
        add_version(s, "digits", "2.0.0")
        add_version(s, "digits", "2.1.0")
        for i in range(10):
            d = add_device(s, f"dev-{i:02d}", ["site:a"])
            assign(s, d.id, v1)
        add_device(s, "far-away", ["site:b"])
    srv.start()
    monkeypatch.setenv("EDGEFLEET_SERVER", srv.url)
    monkeypatch.setenv("EDGEFLEET_TOKEN", token)
    monkeypatch.setenv("EDGEFLEET_CLI_CONFIG", str(tmp_path / "no-cli.toml"))
    monkeypatch.setenv("COLUMNS", "200")
    yield out
    srv.stop()
    out.engine.dispose()


def _ok(capsys: Any, *args: str) -> str:
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    return out


def test_create_show_list_pause_resume_promote_abort(capsys: Any, served: Served) -> None:
    _ok(capsys, "device", "pin", "dev-00", "--model", "digits", "--version", "1.0.0")
    out = _ok(capsys, "rollout", "create", "--model", "digits", "--version", "2.0.0", "--tags", "site:a",
              "--stages", "10,50,100", "--soak", "10m", "--max-failure", "5%", "--max-p95-ratio", "1.2",
              "--max-error-rate", "1%", "--max-drift", "0.2", "--min-accuracy-ratio", "0.98", "--stage-timeout", "1h",
              "--on-fail", "abort", "--max-concurrent", "3", "--window", "site:a=22:00-04:00")
    assert "rollout 1: digits 2.0.0 to 9 device(s) in stages 10% → 50% → 100%" in out, out
    assert "skipped 1 device(s): dev-00 (pinned)" in out
    assert "Stage 1 of 3 (10%, 1 of 9 devices)" in out
    shown = served.api("GET", "/api/v1/rollouts/1")
    assert shown["gates"]["max_drift"] == 0.2 and shown["gates"]["windows"] == [["site:a", "22:00-04:00"]]
    assert shown["gates"]["max_concurrent"] == 3 and shown["gates"]["on_fail"] == "abort"

    with served.sessions.begin() as s:  # a judgement, as the controller writes it
        r = s.scalar(select(Rollout))
        assert r is not None
        r.last_gates = [gate_result_to_json(GateResult(
            "p95_ratio", "wait", threshold=1.2, estimate=1.08, low=0.97, high=1.29, p_value=0.031, n_candidate=2,
            n_baseline=7, samples_candidate=900, samples_baseline=3100,
            detail="p95 ratio 1.08 [0.97, 1.29] <= 1.2? waiting for data"))]
        r.reason = "stage 1 (10%): waiting: p95 ratio 1.08 [0.97, 1.29]"
    out = _ok(capsys, "rollout", "show", "1")
    assert "rollout 1 of digits is running." in out and "Last decision: stage 1 (10%): waiting" in out
    for cell in ("p95_ratio", "wait", "1.08", "[0.97, 1.29]", "1.2", "2/7", "900/3100", "0.031"):
        assert cell in out, (cell, out)
    assert "skipped: dev-00 (pinned)" in out
    as_json = json.loads(_ok(capsys, "rollout", "show", "1", "--json"))
    assert as_json["last_gates"][0]["p_value"] == 0.031

    out = _ok(capsys, "rollout", "list", "--model", "digits")
    assert "digits" in out and "running" in out
    assert json.loads(_ok(capsys, "rollout", "list", "--state", "paused", "--json")) == []

    out = _ok(capsys, "rollout", "pause", "1", "--reason", "night shift")
    assert "rollout 1: paused" in out and "night shift" in out
    out = _ok(capsys, "rollout", "resume", "1")
    assert "rollout 1: running" in out and "stage clock restarts" in out
    out = _ok(capsys, "rollout", "promote", "1")
    assert "stage 2 (50%)" in out and "gates of stage 1 (10%) skipped" in out
    members = json.loads(_ok(capsys, "rollout", "members", "1", "--status", "skipped", "--json"))
    assert [m["device_id"] for m in members] == ["dev-00"]
    out = _ok(capsys, "rollout", "abort", "1", "--reason", "changed my mind")
    assert "rollout 1: aborted" in out and "changed my mind" in out

    code, _, err = run_cli(capsys, "rollout", "pause", "1")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "409" in err and "aborted" in err, err
    events = [e["action"] for e in served.api("GET", "/api/v1/audit", params={"limit": 50})
              if e["target"] == "rollout:1"]
    assert sorted(events) == sorted(["rollout.create", "rollout.pause", "rollout.resume", "rollout.advance",
                                     "rollout.abort"]), events


def test_refusals_are_one_line_naming_the_option_or_field(capsys: Any, served: Served) -> None:
    for args, needle in [
        (["--soak", "10x"], "--soak: duration '10x'"),
        (["--max-failure", "5"], "--max-failure: ratio '5'"),
        (["--stages", "1,ten"], "--stages: '1,ten'"),
        (["--window", "site:a"], "--window: 'site:a'"),
        (["--on-fail", "explode"], "--on-fail"),
        (["--stages", "10,5,100"], "body.stages"),
        (["--window", "site:a=25:00-26:00"], "body.windows.0.window"),
        (["--hold", "1d"], "needs version_b"),
    ]:
        code, _, err = run_cli(capsys, "rollout", "create", "--model", "digits", "--version", "2.0.0", *args)
        assert code == 1 and len(err.strip().splitlines()) == 1 and needle in err, (args, err)
    code, _, err = run_cli(capsys, "rollout", "create", "--model", "digits", "--version", "9.9.9")
    assert code == 1 and "404" in err and "no model digits version 9.9.9" in err
    code, _, err = run_cli(capsys, "rollout", "create", "--model", "digits", "--version", "1.0.0", "--tags", "site:a")
    assert code == 1 and "409" in err and "already run digits 1.0.0" in err


def test_device_pin_and_unpin(capsys: Any, served: Served) -> None:
    _ok(capsys, "rollout", "create", "--model", "digits", "--version", "2.0.0", "--tags", "site:a")
    out = _ok(capsys, "device", "pin", "dev-03", "--model", "digits", "--version", "1.0.0")
    assert out.strip() == "dev-03: digits 1.0.0 pinned (released from rollout 1)"
    members = {m["device_id"]: m for m in served.api("GET", "/api/v1/rollouts/1/members")}
    assert members["dev-03"]["status"] == "released"
    out = _ok(capsys, "device", "unpin", "dev-03", "--model", "digits")
    assert out.strip() == "dev-03: digits 1.0.0 unpinned (now an operator's assignment)"
    out = _ok(capsys, "device", "unpin", "dev-03", "--model", "digits")
    assert "was not pinned" in out and "source operator" in out
    pinned = json.loads(_ok(capsys, "device", "pin", "dev-04", "--model", "digits", "--version", "2.1.0", "--json"))
    assert pinned["source"] == "pin" and pinned["released_from_rollouts"] == [1]
    code, _, err = run_cli(capsys, "device", "unpin", "dev-04", "--model", "words")
    assert code == 1 and "404" in err


def _watcher(*args: str, env_from: Served) -> subprocess.Popen[str]:
    env = {**os.environ, "EDGEFLEET_SERVER": env_from.srv.url, "EDGEFLEET_TOKEN": env_from.token}
    return subprocess.Popen([*CLI, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_watch_exits_0_when_the_rollout_completes(served: Served) -> None:
    proc = _watcher("rollout", "create", "--model", "digits", "--version", "2.0.0", "--tags", "site:a",
                    "--stages", "50,100", "--watch", "--interval", "0.1", env_from=served)
    try:
        created = None
        for _ in range(600):  # the create answered: the rollout exists
            rows = httpx.get(f"{served.srv.url}/api/v1/rollouts", headers={"Authorization": f"Bearer {served.token}"},
                             timeout=30).json()
            if rows:
                created = rows[0]["id"]
                break
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.05)
        assert created is not None
        served.api("POST", f"/api/v1/rollouts/{created}/promote")
        served.api("POST", f"/api/v1/rollouts/{created}/promote")
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, (out, err)
    assert "completed" in out.splitlines()[-1], out
    assert "to 10 device(s) in stages 50% → 100%" in out


def test_watch_exits_1_when_the_rollout_is_aborted(served: Served) -> None:
    created = served.api("POST", "/api/v1/rollouts", json={"model": "digits", "version": "2.0.0"})["id"]
    served.api("POST", f"/api/v1/rollouts/{created}/abort", json={"reason": "p95 too high"})
    proc = _watcher("rollout", "watch", str(created), "--interval", "0.1", env_from=served)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, (out, err)
    last = out.splitlines()[-1]
    assert last.startswith(f"rollout {created} is aborted: aborted by admin") and last.endswith(": p95 too high"), out
