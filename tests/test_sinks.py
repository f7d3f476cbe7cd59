"""Sinks: a JSON-lines file that survives a cut-off last line, stdout, and the MQTT sink's bounded
buffer while no broker is reachable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _support import free_port
from pydantic import ValidationError

from edgefleet.agent.sinks import JsonlSink, JsonlSinkConfig, MqttSink, MqttSinkConfig, StdoutSink, StdoutSinkConfig
from edgefleet.errors import ConfigError

# -- JSONL and stdout sinks ---------------------------------------------------------------------


def test_jsonl_sink_ends_a_partial_last_line_so_earlier_and_later_lines_stay_readable(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"n": 0}\n{"n": 1, "cut off by a power lo')
    sink = JsonlSink(JsonlSinkConfig(type="jsonl", path=path, fsync_every=1))
    sink.send({"n": 2, "score": float("nan")})
    sink.send({"n": 3})
    sink.close()
    sink.close()
    sink.send({"n": 4})  # after close: counted, not written
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {"n": 0}
    assert json.loads(lines[2]) == {"n": 2, "score": None} and json.loads(lines[3]) == {"n": 3}
    assert sink.counters() == {"sent": 2, "dropped": 1, "errors": 0}


def test_stdout_sink_writes_one_json_line_per_result(capsys: pytest.CaptureFixture[str]) -> None:
    sink = StdoutSink(StdoutSinkConfig(type="stdout"))
    sink.send({"label": "seven", "score": 0.9})
    sink.send({"bad": float("inf")})
    assert capsys.readouterr().out == '{"label":"seven","score":0.9}\n{"bad":null}\n'
    assert sink.counters()["sent"] == 2


def test_sink_config_errors_name_the_field_and_hide_the_password() -> None:
    with pytest.raises(ValidationError, match="devid"):
        MqttSinkConfig.model_validate({"type": "mqtt", "topic": "a/{devid}"})
    cfg = MqttSinkConfig.model_validate({"type": "mqtt", "username": "u", "password": "hunter2"})
    assert "hunter2" not in repr(cfg) and "hunter2" not in str(cfg.model_dump())
    with pytest.raises(ConfigError, match="device id"):
        MqttSink(cfg)


def test_mqtt_sink_with_no_broker_keeps_the_newest_results_in_a_bounded_buffer() -> None:
    cfg = MqttSinkConfig.model_validate({"type": "mqtt", "port": free_port(), "topic": "x/{model}", "buffer": 2})
    sink = MqttSink(cfg)
    for i in range(5):
        sink.send({"model": "m", "i": i})
    assert sink.counters() == {**sink.counters(), "sent": 0, "dropped": 3, "buffered": 2}
    sink.close()
    assert sink.counters() == {**sink.counters(), "sent": 0, "dropped": 5, "buffered": 0}
