"""An enrolled agent with ``[mqtt.fleet]`` publishes telemetry of what it serves (measured on every
inference) through its on-disk outbox, and the server's ``cmd`` makes it check in at once even with an
hour-long poll interval."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from updater._fleet import Fleet, models

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from telemetry._mqtt import Broker, Subscriber, mosquitto_binary


def test_an_agent_publishes_telemetry_the_server_stores_and_an_assignment_reaches_it_through_cmd_at_once(
    update_models: dict[str, Path], tmp_path: Path
) -> None:
    broker = Broker(mosquitto_binary(), tmp_path / "broker")
    sub = Subscriber(broker.port)
    env = {"EDGEFLEET_SERVER_MQTT_URL": f"mqtt://127.0.0.1:{broker.port}"}
    try:
        with Fleet(tmp_path / "fleet", server_env=env) as fleet:
            fleet.push(update_models["good"])
            fleet.push(update_models["good2"])
            mqtt = {"fleet": {"host": "127.0.0.1", "port": broker.port, "tls": False, "telemetry_interval_s": 1.0}}
            # an hour between polls: only the server's cmd can bring the assignment quickly
            agent = fleet.agent(update_models["good"], config={"mqtt": mqtt}, updates={
                "checkin_interval": 3600, "probation_inferences": 0, "probation_seconds": 0.5})
            assert agent.device_id is not None
            for i in range(30):
                agent.infer(models.sample_input(i))
            def telemetry_with_calls() -> list[dict[str, Any]] | None:
                got = [m.body for m in sub.on("/telemetry")]
                return [b for b in got if any(m["inferences"] for m in b["models"])] or None

            body = fleet.wait_for(telemetry_with_calls, 30, "telemetry with inferences")[0]
            assert body["device_id"] == agent.device_id and body["schema"] == 1 and body["seq"] >= 1
            m = next(m for m in body["models"] if m["inferences"])
            assert (m["name"], m["version"], m["errors"]) == ("digits", "1.0.0", 0)
            assert sum(m["latency"]["counts"]) == m["inferences"] and m["classes"]
            assert body["device"]["memory_rss_bytes"] > 0 and body["device"]["agent_version"]
            seqs = [m.body["seq"] for m in sub.on("/telemetry")]
            assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
            assert [m.body for m in sub.on("/status")][-1]["state"] == "online"

            # the server ingested it: its rollups count the 30 inferences
            def stored() -> int:
                r = fleet.http.get(f"/api/v1/devices/{agent.device_id}/telemetry", params={"step": 60})
                assert r.status_code == 200, r.text
                return sum(p.get("inferences") or 0 for s in r.json().get("series", []) for p in s.get("points", []))

            fleet.wait_for(lambda: stored() >= 30, 30, "the server's telemetry rollups")

            time.sleep(1.0)  # past the agent's first check-in
            t0 = time.monotonic()
            fleet.assign(agent.device_id, "digits", "2.0.0")
            fleet.wait_event(agent.device_id, "switch.ok", timeout=30, version="2.0.0")
            print(f"assign -> switch through cmd: {time.monotonic() - t0:.2f} s (poll interval 3600 s)")
            assert [m.body["action"] for m in sub.on("/cmd")] == ["check-in"]
            # update events go over MQTT too, under the one sequence telemetry uses; the HTTP report (the
            # fallback) carries the same seq, so the server holds each event once
            fleet.wait_for(lambda: any(m.body["kind"] == "switch.ok" for m in sub.on("/events")), 30, "events")
            mqtt_events = {m.body["seq"]: m.body["kind"] for m in sub.on("/events")}
            all_seqs = [m.body["seq"] for m in sub.on("/events") + sub.on("/telemetry")]
            assert len(set(all_seqs)) == len(all_seqs)  # one sequence, no seq used twice
            on_server = {e["seq"]: e["kind"] for e in fleet.events(agent.device_id)}
            switch = next(seq for seq, kind in mqtt_events.items() if kind == "switch.ok")
            assert on_server.get(switch) == "switch.ok"
            assert list(on_server.values()).count("switch.ok") == 1
            agent.stop()
            assert [m.body for m in sub.on("/status")][-1]["state"] == "offline"
    finally:
        sub.close()
        broker.stop()


def test_feedback_published_on_the_local_broker_lands_in_the_live_accuracy_of_the_version_that_predicted(
    tmp_path: Path,
) -> None:
    from edgefleet.agent.registry import RecentPredictions
    from edgefleet.agent.telemetry.config import MqttLocalConfig
    from edgefleet.agent.telemetry.feedback import Feedback
    from edgefleet.agent.telemetry.local import FeedbackSubscriber
    from edgefleet.agent.telemetry.measure import TelemetryRegistry

    broker = Broker(mosquitto_binary(), tmp_path / "broker")
    sub = Subscriber(broker.port)
    predictions, stats = RecentPredictions(), TelemetryRegistry()
    truth = [3, 3, 5, 1, 3]
    for i, predicted in enumerate([3, 5, 5, 1, 0]):
        predictions.add(f"p{i}", "digits", "2.0.0", {"class": predicted})
    fb = FeedbackSubscriber(MqttLocalConfig(port=broker.port), "dev-00000000000000aa",
                            Feedback(predictions, stats, lambda name, version: None))
    try:
        fb.start()
        time.sleep(0.5)
        for i, label in enumerate(truth):
            sub.publish("edgefleet/v1/dev-00000000000000aa/feedback",
                        json.dumps({"schema": 1, "device_id": "dev-00000000000000aa", "id": f"p{i}", "label": label}))
        sub.publish("edgefleet/v1/dev-00000000000000aa/feedback",  # another device's: refused
                    json.dumps({"schema": 1, "device_id": "dev-00000000000000bb", "id": "p0", "label": 3}))
        deadline = time.monotonic() + 10
        while fb.counters.get("received") < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (fb.counters.get("accepted"), fb.counters.get("refused")) == (5, 1)
        got = stats.get("digits", "2.0.0")
        assert got is not None
        acc = got.snapshot()["accuracy"]
        assert acc["window"] == 5 and acc["accuracy"] == 3 / 5  # p0, p2, p3 right
    finally:
        fb.stop()
        sub.close()
        broker.stop()
