"""An agent renews its certificate by itself before it expires, proving its current key, and goes on
checking in and updating with the new one."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from updater._fleet import Fleet, models


def test_an_agent_whose_certificate_expires_soon_renews_it_and_keeps_updating(
    tmp_path: Path, update_models: dict[str, Path]
) -> None:
    # Certificates valid 2 days, renewed 30 days before expiry: the agent renews at its first step.
    with Fleet(tmp_path / "fleet", server_env={"EDGEFLEET_SERVER_DEVICE_CERT_DAYS": "2"}) as fleet:
        fleet.push(update_models["good"])
        fleet.push(update_models["good2"])
        agent = fleet.agent(update_models["good"], updates={"checkin_interval": 0.5, "probation_inferences": 0,
                                                            "probation_seconds": 0.5, "renew_days_before": 30})
        assert agent.device_id is not None
        cert_file = agent.state_dir / "identity" / "device.crt"
        before = x509.load_pem_x509_certificate(cert_file.read_bytes()).serial_number
        fleet.wait_event(agent.device_id, "identity.renewed", timeout=60)
        after = x509.load_pem_x509_certificate(cert_file.read_bytes())
        assert after.serial_number != before
        assert fleet.device(agent.device_id)["cert_serial"] == format(after.serial_number, "x")
        key = (agent.state_dir / "identity" / "device.key")
        assert key.stat().st_mode & 0o777 == 0o600 and not key.with_name("device.key.new").exists()
        # the new identity works: an update after the renewal, and again after a restart
        fleet.assign(agent.device_id, models.MODEL_NAME, "2.0.0")
        fleet.wait_event(agent.device_id, "update.committed", timeout=60, version="2.0.0")
        agent.restart()
        assert agent.served_version() == "2.0.0"
