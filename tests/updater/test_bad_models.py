"""Bad models are turned away by the agent alone, once, and the server is told why.

Each scenario is a real server process and a real ``edgefleet agent run`` serving ``digits`` 1.0.0
under load; the operator signs and assigns a version whose fault shows only on the device:

* ``bad_selftest`` (6.0.0): its golden vectors disagree with its model -> ``update.refused``
  (``selftest_failed``) before any switch: every answer comes from 1.0.0;
* ``errors_in_probation`` (7.0.0): passes its self-test, then raises on some real inputs ->
  ``update.rolled_back`` (``probation_errors``) and 1.0.0 serves again;
* ``slow`` (3.0.0): right answers, tens of milliseconds each, against 1.0.0's baseline ->
  ``update.rolled_back`` (``probation_latency``).

A refused target is not tried again while it stays assigned: ``max_metadata_age`` is 1 s here, so
every check-in after a second refreshes the TUF metadata and re-plans (``last_refresh`` in
``update.json`` moves), and after a few such refreshes there is still one ``update.started`` for it.
The refusal is per target: a good version assigned next installs and commits.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from updater._fleet import Agent, Fleet, Load, models

# Fast check-ins and a short probation; metadata older than 1 s is refreshed at the next check-in, so
# that the agent re-plans (and would retry a refused target) every second or so.
FAST: dict[str, Any] = {"checkin_interval": 0.5, "probation_inferences": 20, "probation_seconds": 1.0,
                        "max_metadata_age": 1}
REFRESHES = 3  # full metadata refreshes (re-plans) watched after a refusal


def _state(agent: Agent) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((agent.state_dir / "update.json").read_bytes())
    return data


def _started(fleet: Fleet, device: str, version: str) -> list[dict[str, Any]]:
    return [e for e in fleet.events(device) if e["kind"] == "update.started" and e.get("version") == version]


def _assert_not_retried(fleet: Fleet, agent: Agent, version: str) -> None:
    """Watch :data:`REFRESHES` more metadata refreshes (each one re-plans from the director's targets,
    which still assign ``version``): the agent starts nothing, and the server has one
    ``update.started`` for ``version``."""
    assert agent.device_id is not None
    seen: set[float] = set()
    first = _state(agent)["last_refresh"]

    def refreshed() -> bool:
        st = _state(agent)
        assert st["pending"] is None, f"an update started again: {st['pending']}"
        if st["last_refresh"] != first:
            seen.add(st["last_refresh"])
        return len(seen) >= REFRESHES

    fleet.wait_for(refreshed, 60, f"{REFRESHES} metadata refreshes after refusing {version}")
    st = _state(agent)
    assert st["outbox"] == [], st["outbox"]  # every event the agent made has reached the server
    started = _started(fleet, agent.device_id, version)
    assert len(started) == 1, started


def _failure(fleet: Fleet, device: str) -> dict[str, Any]:
    failure: dict[str, Any] = fleet.device(device)["update"]["last_failure"]
    return failure


def _then_a_good_version_commits(fleet: Fleet, agent: Agent, load: Load) -> None:
    """The refusal is per target: 2.0.0 assigned now installs, switches and commits."""
    assert agent.device_id is not None
    fleet.assign(agent.device_id, "digits", "2.0.0")
    fleet.wait_event(agent.device_id, "update.committed", version="2.0.0")
    assert agent.served_version() == "2.0.0"
    load.wait_answers(5, version="2.0.0")


def _agent(fleet: Fleet, update_models: dict[str, Path], bad: str) -> Agent:
    """v1, v2 and the ``bad`` kind signed and pushed; an enrolled agent serving v1."""
    for key in ("good", "good2", bad):
        fleet.push(update_models[key])
    agent = fleet.agent(update_models["good"], updates=FAST)
    assert agent.device_id is not None
    return agent


def test_a_model_failing_its_golden_self_test_is_refused_before_it_serves_once_and_not_retried(
    fleet: Fleet, update_models: dict[str, Path]
) -> None:
    agent = _agent(fleet, update_models, "bad_selftest")
    device = agent.device_id
    assert device is not None
    with agent.load(rate=40) as load:
        load.wait_answers(5)
        fleet.assign(device, "digits", "6.0.0")
        refused = fleet.wait_event(device, "update.refused", version="6.0.0", reason="selftest_failed")
        assert "self-test" in refused["detail"], refused
        failure = _failure(fleet, device)
        assert failure["reason"] == "selftest_failed" and failure["target"] == "digits-6.0.0.efb", failure
        _assert_not_retried(fleet, agent, "6.0.0")
        kinds = [e["kind"] for e in fleet.events(device) if e.get("version") == "6.0.0"]
        assert kinds == ["update.started", "download.ok", "install.ok", "update.refused"], kinds
        assert agent.served_version() == "1.0.0"
        assert set(load.versions()) == {"1.0.0"}, load.versions()  # never switched, not for one request
        assert not load.failures(), load.failures()[:3]
        assert not (agent.state_dir / "models" / "digits" / "6.0.0").exists()  # not kept on disk
        _then_a_good_version_commits(fleet, agent, load)
    assert not load.failures(), load.failures()[:3]


def _some_failing(i: int) -> np.ndarray[Any, Any]:
    """Every fourth input is one ``errors_in_probation`` raises on (1.0.0 and 2.0.0 answer it)."""
    x: np.ndarray[Any, Any] = models.failing_input() if i % 4 == 0 else models.sample_input(i)
    return x


def test_a_model_raising_on_real_inputs_in_probation_is_rolled_back_to_the_previous_version_and_not_retried(
    fleet: Fleet, update_models: dict[str, Path]
) -> None:
    agent = _agent(fleet, update_models, "errors_in_probation")
    device = agent.device_id
    assert device is not None
    with agent.load(rate=40, inputs=_some_failing) as load:
        load.wait_answers(25)  # 1.0.0 answers the failing inputs too: its error rate is 0
        assert not load.failures(), load.failures()[:3]
        fleet.assign(device, "digits", "7.0.0")
        back = fleet.wait_event(device, "update.rolled_back", version="7.0.0", reason="probation_errors")
        after = time.monotonic()  # the agent reported the rollback: 1.0.0 serves what is sent from now
        assert "runtime errors" in back["detail"], back
        kinds = [e["kind"] for e in fleet.events(device) if e.get("version") == "7.0.0"]
        assert kinds[:4] == ["update.started", "download.ok", "install.ok", "selftest.ok"], kinds
        assert "switch.ok" in kinds and "probation.ok" not in kinds and "update.committed" not in kinds, kinds
        failure = _failure(fleet, device)
        assert failure["reason"] == "probation_errors" and failure["target"] == "digits-7.0.0.efb", failure
        assert agent.served_version() == "1.0.0"
        load.wait_answers(20, version="1.0.0", after=after)
        late = [s for s in load.samples if s.at > after]
        assert all(s.ok and s.version == "1.0.0" for s in late if s.status is not None), \
            [s for s in late if not s.ok][:3]
        assert load.failures(), "7.0.0 never failed a request, yet it was rolled back"
        _assert_not_retried(fleet, agent, "7.0.0")
        _then_a_good_version_commits(fleet, agent, load)
        # 2.0.0 answers the inputs 7.0.0 failed on.
        now = time.monotonic()
        load.wait_answers(8, version="2.0.0", after=now)
        assert all(s.ok for s in load.samples if s.at > now), [s for s in load.samples if s.at > now and not s.ok][:3]


def test_a_model_much_slower_than_the_previous_version_is_rolled_back_for_latency_and_not_retried(
    fleet: Fleet, update_models: dict[str, Path]
) -> None:
    agent = _agent(fleet, update_models, "slow")
    device = agent.device_id
    assert device is not None
    with agent.load(rate=40) as load:
        load.wait_answers(30)  # 1.0.0's baseline p95 needs at least 20 calls
        fleet.assign(device, "digits", "3.0.0")
        back = fleet.wait_event(device, "update.rolled_back", version="3.0.0", reason="probation_latency")
        assert "p95" in back["detail"], back
        failure = _failure(fleet, device)
        assert failure["reason"] == "probation_latency" and failure["target"] == "digits-3.0.0.efb", failure
        assert agent.served_version() == "1.0.0"
        assert "3.0.0" in load.versions(), "3.0.0 never served, yet its latency was judged"
        _assert_not_retried(fleet, agent, "3.0.0")
        _then_a_good_version_commits(fleet, agent, load)
    assert not load.failures(), load.failures()[:3]  # slow, never wrong
