"""Telemetry on the agent: what is measured, queued on disk and published over MQTT."""
