"""The fleet updater end to end: an operator signs and pushes a model, assigns it, and a real agent
process fetches, verifies, self-tests, switches and commits it while it keeps serving."""

from __future__ import annotations

from pathlib import Path

from updater._fleet import Fleet

FAST = {"checkin_interval": 0.5, "probation_inferences": 20, "probation_seconds": 1.0}


def test_an_assigned_version_is_fetched_verified_switched_and_committed_while_the_agent_serves(
    fleet: Fleet, update_models: dict[str, Path]
) -> None:
    v1, v2 = update_models["good"], update_models["good2"]
    fleet.push(v1)
    fleet.push(v2)
    agent = fleet.agent(v1, updates=FAST)
    assert agent.device_id is not None
    # the first report says what the device runs, before any update (agent.toml's 1.0.0)
    fleet.wait_for(lambda: fleet.device(agent.device_id)["running"], 30, "the first report")
    assert [m["version"] for m in fleet.device(agent.device_id)["running"]] == ["1.0.0"]
    with agent.load(rate=50) as load:
        fleet.assign(agent.device_id, "digits", "2.0.0")
        fleet.wait_event(agent.device_id, "update.committed", timeout=60, version="2.0.0")
        assert agent.served_version() == "2.0.0"
    assert not load.failures(), load.failures()[:3]
    assert {"1.0.0", "2.0.0"} <= set(load.versions())
    kinds = [e["kind"] for e in fleet.events(agent.device_id)]
    assert kinds[:1] == ["update.started"] and "switch.ok" in kinds and "probation.ok" in kinds, kinds
    running = fleet.device(agent.device_id)["running"]
    assert [(m["version"], bool(m.get("sha256"))) for m in running] == [("2.0.0", True)], running
    status = fleet.cli("agent", "status", "--state-dir", agent.state_dir)
    # 1.0.0 came from agent.toml (the operator's file, not the updater's to keep): no previous install
    assert status["running"]["digits"]["version"] == "2.0.0" and status["previous"] == {}
    assert status["update"] is None and status["trust"]["director"]["targets"]["version"] >= 1
    assert status["trust"]["image"]["timestamp"]["expires"]
    # A restart serves the committed version, not agent.toml's.
    agent.restart()
    assert agent.served_version() == "2.0.0"


def test_an_agent_with_no_model_of_its_own_installs_its_assignment_and_goes_back_to_the_kept_version_offline(
    fleet: Fleet, update_models: dict[str, Path]
) -> None:
    v1, v2 = update_models["good"], update_models["good2"]
    fleet.push(v1)
    fleet.push(v2)
    agent = fleet.agent(None, updates={**FAST, "probation_inferences": 0})
    assert agent.device_id is not None
    for version in ("1.0.0", "2.0.0"):
        fleet.assign(agent.device_id, "digits", version)
        fleet.wait_event(agent.device_id, "update.committed", timeout=60, version=version)
    assert agent.served_version() == "2.0.0"
    installed = sorted(p.name for p in (agent.state_dir / "models" / "digits").iterdir())
    assert installed == ["1.0.0", "2.0.0"]  # the previous version is kept, nothing older
    seen = len(fleet.events(agent.device_id))
    fleet.assign(agent.device_id, "digits", "1.0.0")

    def back_again() -> list[str] | None:
        kinds = [e["kind"] for e in fleet.events(agent.device_id)[seen:]]
        return kinds if "update.committed" in kinds else None

    back = fleet.wait_for(back_again, 60, "1.0.0 committed again")
    assert "download.ok" not in back and "selftest.ok" in back, back  # the kept bytes, tested again
    assert agent.served_version() == "1.0.0"
