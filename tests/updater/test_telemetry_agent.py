"""An enrolled agent with ``[mqtt.fleet]`` publishes telemetry of what it serves (measured on every
inference) through its on-disk outbox, and the server's ``cmd`` makes it check in at once even with an
hour-long poll interval."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
from updater._fleet import Fleet, models

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from telemetry._mqtt import Broker, Subscriber


def _mosquitto() -> str:
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the mosquitto binary is not installed (CI=true: not skipping)")
        pytest.skip("the mosquitto binary is not installed")
    return exe


def test_an_agent_publishes_telemetry_of_its_model_and_a_cmd_makes_it_check_in_at_once(
    fleet: Fleet, update_models: dict[str, Path], tmp_path: Path
) -> None:
    broker = Broker(_mosquitto(), tmp_path / "broker")
    sub = Subscriber(broker.port)
    try:
        fleet.push(update_models["good"])
        fleet.push(update_models["good2"])
        mqtt = {"fleet": {"host": "127.0.0.1", "port": broker.port, "tls": False, "telemetry_interval_s": 1.0}}
        agent = fleet.agent(update_models["good"], config={"mqtt": mqtt},
                            updates={"checkin_interval": 3600, "probation_inferences": 0, "probation_seconds": 0.5})
        assert agent.device_id is not None
        for i in range(30):
            agent.infer(models.sample_input(i))

        def telemetry_with_calls() -> list[dict] | None:
            got = [m.body for m in sub.on("/telemetry")]
            hits = [b for b in got if any(m["inferences"] for m in b["models"])]
            return hits or None

        hits = fleet.wait_for(telemetry_with_calls, 30, "telemetry with inferences")
        body = hits[0]
        assert body["device_id"] == agent.device_id and body["schema"] == 1 and body["seq"] >= 1
        m = next(m for m in body["models"] if m["inferences"])
        assert (m["name"], m["version"], m["errors"]) == ("digits", "1.0.0", 0)
        assert sum(m["latency"]["counts"]) == m["inferences"] and m["classes"]
        assert body["device"]["memory_rss_bytes"] > 0 and body["device"]["agent_version"]
        seqs = [m.body["seq"] for m in sub.on("/telemetry")]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        status = [m.body for m in sub.on("/status")]
        assert status and status[-1]["state"] == "online"

        # The poll is an hour: only the cmd can make the agent check in now.
        time.sleep(1.0)  # past the agent's first check-in
        fleet.assign(agent.device_id, "digits", "2.0.0")
        sub.publish(f"edgefleet/v1/{agent.device_id}/cmd", json.dumps(
            {"schema": 1, "device_id": agent.device_id, "at": "2026-12-01T00:00:00Z", "action": "check-in"}))
        fleet.wait_event(agent.device_id, "update.committed", timeout=30, version="2.0.0")
        agent.stop()
        offline = [m.body for m in sub.on("/status")]
        assert offline[-1]["state"] == "offline"
    finally:
        sub.close()
        broker.stop()
