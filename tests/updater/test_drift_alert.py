"""The whole monitoring loop: a flow on an agent serving a bundle with a drift baseline is fed a shifted
distribution by a sensor over MQTT; its telemetry goes through a real Mosquitto into the server's ingestion, which raises a
drift alert that reaches a webhook receiver (a real HTTP server, the signature checked the Standard
Webhooks way) and the alert topic; then a local app's ground truth (over the local broker, naming the
flow's prediction ids) shows the model wrong, and the fallen live accuracy raises an alert too."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
from updater._fleet import Fleet, models

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from telemetry._mqtt import Broker, Subscriber, mosquitto_binary

from edgefleet.bundle.manifest import PipelineSpec
from edgefleet.converters.package import package_model


class _Receiver:
    def __init__(self) -> None:
        self.hits: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                receiver.hits.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _signed(secret: str, headers: dict[str, str], body: bytes) -> bool:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    want = base64.b64encode(hmac.new(key, f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body,
                                     hashlib.sha256).digest()).decode()
    return any(s.partition(",")[2] == want for s in headers["webhook-signature"].split())


def test_a_shifted_input_distribution_raises_a_drift_alert_at_the_webhook_and_on_the_alert_topic(
    tmp_path: Path,
) -> None:
    model_file = tmp_path / "model.onnx"
    model_file.write_bytes(models.onnx_model("good", "1.0.0"))
    x = np.stack([models.sample_input(i) for i in range(200)])  # (200, 1, 64): the training-like data
    bundle, _ = package_model(model_file, "digits", "1.0.0", out=tmp_path / "bundle",
                              golden={"x": x[:8]}, baseline={"x": x},
                              pipeline=PipelineSpec.model_validate({"postprocess": [{"op": "topk", "k": 3}]}))
    broker = Broker(mosquitto_binary(), tmp_path / "broker")
    sub = Subscriber(broker.port)
    hook = _Receiver()
    env = {"EDGEFLEET_SERVER_MQTT_URL": f"mqtt://127.0.0.1:{broker.port}", "EDGEFLEET_SERVER_ALERT_DELIVERY_POLL": "0.2"}
    try:
        with Fleet(tmp_path / "fleet", server_env=env) as fleet:
            fleet.push(bundle)
            r = fleet.http.put("/api/v1/models/digits/alert-rules", json={"drift_psi_max": 0.5, "accuracy_min": 0.5,
                                                                           "min_samples": 5})
            assert r.status_code == 200, r.text
            r = fleet.http.post("/api/v1/webhooks", json={"url": hook.url})
            assert r.status_code == 201, r.text
            secret = r.json()["secret"]
            mqtt = {"fleet": {"host": "127.0.0.1", "port": broker.port, "tls": False, "telemetry_interval_s": 1.0}}
            # a flow: a sensor publishes on the local broker, the agent's pipeline runs each reading
            flow = {"name": "sensor", "model": "digits",
                    "source": {"type": "mqtt", "host": "127.0.0.1", "port": broker.port, "topics": ["sensors/digits"]},
                    "sinks": [{"type": "jsonl", "path": str(tmp_path / "results.jsonl")}]}
            mqtt["local"] = {"host": "127.0.0.1", "port": broker.port}  # where local apps send ground truth
            agent = fleet.agent(bundle, config={"mqtt": mqtt, "flows": [flow]})
            time.sleep(1.0)  # the flow's subscription
            for i in range(60):  # the distribution shifted: every pixel brighter by 8 (of 16)
                shifted = np.clip(models.sample_input(i) + 8.0, 0, 16)
                sub.publish("sensors/digits", json.dumps({"data": shifted.tolist()}))
                time.sleep(0.02)
            fleet.wait_for(lambda: (tmp_path / "results.jsonl").exists()
                           and len((tmp_path / "results.jsonl").read_text().splitlines()) >= 60, 30, "the flow's results")
            first = json.loads((tmp_path / "results.jsonl").read_text().splitlines()[0])
            assert first.get("id"), first  # flow predictions carry ids (feedback can name them)
            drift = [m.get("drift") for b in (x.body for x in sub.on("/telemetry")) for m in b["models"]]
            print("drift in telemetry:", [d for d in drift if d])
            fleet.wait_for(lambda: hook.hits, 60, "the drift alert at the webhook")
            headers, body = hook.hits[0]
            assert _signed(secret, headers, body)
            alert = json.loads(body)
            text = json.dumps(alert)
            assert "drift" in text and "digits" in text and "1.0.0" in text, alert
            on_topic = fleet.wait_for(lambda: [m for m in sub.on("/alerts/digits")] or None, 30, "the alert topic")
            assert "drift" in json.dumps(on_topic[0].body)
            listed = fleet.http.get("/api/v1/alerts", params={"state": "open"}).json()
            assert [a["kind"] for a in listed] == ["drift"], listed

            # ground truth arrives, and the model is wrong on all of it: live accuracy falls, an alert
            results = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
            for r in results[:20]:
                wrong = (int(r["top_k"][0]["index"]) + 1) % 10
                sub.publish(f"edgefleet/v1/{agent.device_id}/feedback", json.dumps(
                    {"schema": 1, "device_id": agent.device_id, "id": r["id"], "label": wrong}))

            def accuracy_alert() -> list[dict[str, Any]] | None:
                alerts = fleet.http.get("/api/v1/alerts", params={"state": "open"}).json()
                return [a for a in alerts if a["kind"] == "accuracy"] or None

            fleet.wait_for(accuracy_alert, 60, "the live-accuracy alert")
            fleet.wait_for(lambda: len(hook.hits) >= 2, 30, "the accuracy alert at the webhook")
    finally:
        hook.close()
        sub.close()
        broker.stop()
