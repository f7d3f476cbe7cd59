"""``edgefleet agent ...``: the device agent and its quick-start server."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import typer

__all__ = ["app"]

app = typer.Typer(help="The device agent: serve models, check config, show the hardware.", no_args_is_help=True)


def _logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@app.command()
def run(config: Path = typer.Option(..., "--config", "-c", help="agent.toml")) -> None:
    """Run the agent as configured (what the systemd unit starts)."""
    from edgefleet.agent.config import load_config
    from edgefleet.agent.service import AgentService

    cfg = load_config(config)
    _logging(cfg.log_level)
    raise typer.Exit(AgentService(cfg).run())


@app.command()
def serve(
    models: list[Path] = typer.Argument(
        ..., help="Models or bundles to serve (a file under its stem, a bundle under its name)."
    ),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8500, min=0, max=65535, help="TCP port (0: any free port)."),
    uds: Path | None = typer.Option(None, help="Also listen on this Unix socket."),
    threads: int | None = typer.Option(None, min=1, help="Runtime threads per model."),
    log_level: str = typer.Option("info", help="debug, info, warning or error."),
) -> None:
    """Serve models over the Open Inference Protocol, with no fleet and no config file."""
    from edgefleet.agent.config import AgentConfig
    from edgefleet.agent.service import AgentService

    cfg = AgentConfig.model_validate(
        {
            "api": {"host": host, "port": port, "uds": uds},
            "models": [{"path": m.resolve(), "threads": threads} for m in models],
            "log_level": log_level,
        }
    )
    _logging(cfg.log_level)
    raise typer.Exit(AgentService(cfg).run())


@app.command("check-config")
def check_config(
    config: Path = typer.Argument(..., help="agent.toml"),
    as_json: bool = typer.Option(False, "--json", help="Print the validated config as JSON."),
) -> None:
    """Validate agent.toml (and EDGEFLEET_* overrides); errors name the key and line."""
    from edgefleet.agent.config import load_config

    cfg = load_config(config)
    if as_json:
        typer.echo(json.dumps(cfg.model_dump(mode="json"), indent=2))
    else:
        typer.echo(f"{config}: ok ({len(cfg.models)} model(s), {len(cfg.flows)} flow(s), api port {cfg.api.port})")


@app.command()
def enroll(
    server: str | None = typer.Option(None, "--server", help="fleet server URL [default: server_url from --config]"),
    token: str = typer.Option(..., "--token", envvar="EDGEFLEET_ENROLL_TOKEN", help="enrollment token (efe_...)"),
    config: Path | None = typer.Option(None, "--config", "-c", help="agent.toml (gives state_dir and server_url)"),
    state_dir: Path | None = typer.Option(None, "--state-dir", help="where the identity goes [default: config's]"),
    ca: Path | None = typer.Option(None, "--ca", help="CA to verify an https server with [default: system CAs]"),
    allow_http: bool = typer.Option(False, "--allow-http", help="allow a plain-http server (tests on loopback)"),
    force: bool = typer.Option(False, "--force", help="replace an existing identity"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Enroll this device: make its own key (0600, never sent), send a CSR with the token, and keep the
    certificate and the fleet CA the server returns under STATE_DIR/identity/."""
    import ssl
    import urllib.error
    import urllib.request

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from edgefleet.durable import atomic_write_bytes
    from edgefleet.errors import ConfigError

    cfg = None
    if config is not None:
        from edgefleet.agent.config import load_config

        cfg = load_config(config)
    url = server or (cfg.server_url if cfg else None)
    folder = state_dir or (cfg.state_dir if cfg else None)
    if not url or folder is None:
        raise ConfigError("enroll: give --server and --state-dir, or --config with server_url and state_dir")
    if url.startswith("http://") and not allow_http:
        raise ConfigError(f"--server: {url} is plain http; use https (or --allow-http on a trusted loopback)")
    identity = folder / "identity"
    if (identity / "device.key").exists() and not force:
        raise ConfigError(f"{identity}: this device is already enrolled (--force replaces its identity)")
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgefleet-device")]))
        .sign(key, hashes.SHA256())
    )
    body = json.dumps({"token": token, "csr": csr.public_bytes(serialization.Encoding.PEM).decode()}).encode()
    request = urllib.request.Request(
        url.rstrip("/") + "/api/v1/enroll", data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    context = ssl.create_default_context(cafile=str(ca) if ca else None) if url.startswith("https") else None
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as resp:
            out = json.loads(resp.read())
    except urllib.error.HTTPError as e:
        reason = json.loads(e.read() or b"{}").get("error", e.reason)
        raise ConfigError(f"enroll: the server refused: {e.code}: {reason}") from e
    except (urllib.error.URLError, OSError) as e:
        raise ConfigError(f"--server: cannot reach {url}: {e}") from e
    identity.mkdir(parents=True, exist_ok=True, mode=0o700)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    atomic_write_bytes(identity / "device.key", pem, mode=0o600)
    atomic_write_bytes(identity / "device.crt", out["certificate"].encode())
    atomic_write_bytes(identity / "ca.crt", out["ca_certificate"].encode())
    info = {"device_id": out["device_id"], "server_url": url, "tags": out["tags"]}
    atomic_write_bytes(identity / "device.json", json.dumps(info, indent=2).encode() + b"\n")
    if as_json:
        typer.echo(json.dumps({**info, "identity": str(identity)}, indent=2))
    else:
        typer.echo(f"enrolled as {out['device_id']} (identity in {identity}); set device_id in agent.toml to it")


def _register_hardware() -> None:
    from edgefleet.cli.hardware import hardware

    app.command("hardware", help="Show the detected hardware profile and why.")(hardware)


_register_hardware()
