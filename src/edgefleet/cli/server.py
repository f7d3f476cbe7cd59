"""``edgefleet server init|run|migrate``: prepare, run and migrate the fleet server."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from edgefleet.server.settings import Settings

__all__ = ["app"]

app = typer.Typer(help="The fleet server: init a data folder, run it, migrate its database.", no_args_is_help=True)

_DATA = typer.Option(None, "--data", help="data folder: SQLite database, bundles, fleet CA [default: edgefleet-data]")
_DB = typer.Option(None, "--db", help="database URL: postgresql+psycopg://user@host/db [default: SQLite in --data]")
_CONFIG = typer.Option(None, "--config", "-c", help="server.toml (EDGEFLEET_SERVER_* variables override it)")


def _settings(config: Path | None, **overrides: object) -> Settings:
    from edgefleet.server.settings import load_settings

    return load_settings(config, None, **overrides)


@app.command()
def init(
    data: Path | None = _DATA,
    db: str | None = _DB,
    config: Path | None = _CONFIG,
    admin_name: str = typer.Option("admin", help="name of the first admin token (recorded in the audit log)"),
    tls_hostname: list[str] = typer.Option(
        [], "--tls-hostname", help="also issue a TLS server certificate from the fleet CA for these names/IPs"
    ),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Create the database, the fleet CA and a first admin token, printed once (only its hash is kept)."""
    from edgefleet.durable import atomic_write_bytes
    from edgefleet.server.ca import CA_CERT, load_ca
    from edgefleet.server.state import init_server

    settings = _settings(config, data_dir=data, db_url=db)
    token = init_server(settings, admin_name)
    out: dict[str, object] = {"admin_token": token, "ca_certificate": str(settings.data_dir / CA_CERT)}
    if tls_hostname:
        cert, key = load_ca(settings.data_dir).issue_server_cert(tls_hostname)
        tls = settings.data_dir / "tls"
        tls.mkdir(mode=0o700, exist_ok=True)
        atomic_write_bytes(tls / "server.crt", cert)
        atomic_write_bytes(tls / "server.key", key, mode=0o600)
        out.update(tls_certfile=str(tls / "server.crt"), tls_keyfile=str(tls / "server.key"))
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    typer.echo(f"initialised {settings.data_dir}")
    typer.echo(f"fleet CA certificate: {out['ca_certificate']}")
    if tls_hostname:
        typer.echo(f"TLS: set tls_certfile = {out['tls_certfile']!r} and tls_keyfile = {out['tls_keyfile']!r}")
    typer.echo("first admin token (shown once, store it now):")
    typer.echo(f"  {token}")


@app.command()
def migrate(data: Path | None = _DATA, db: str | None = _DB, config: Path | None = _CONFIG) -> None:
    """Apply the database migrations (the server also does this at start unless migrate_on_start = false)."""
    from edgefleet.server.db import make_engine
    from edgefleet.server.db import migrate as run_migrations

    settings = _settings(config, data_dir=data, db_url=db)
    engine = make_engine(settings.database_url())
    try:
        run_migrations(engine)
    finally:
        engine.dispose()
    typer.echo("database schema is current")


@app.command()
def run(
    data: Path | None = _DATA,
    db: str | None = _DB,
    config: Path | None = _CONFIG,
    host: str | None = typer.Option(None, help="address to listen on [default: 127.0.0.1]"),
    port: int | None = typer.Option(None, min=0, max=65535, help="TCP port [default: 8400]"),
    log_level: str = typer.Option("info", help="debug, info, warning or error"),
    access_log: bool = typer.Option(False, help="log every request (paths only; never headers)"),
) -> None:
    """Run the fleet server (uvicorn, in this process); tells systemd READY=1 once listening."""
    settings = _settings(config, data_dir=data, db_url=db, host=host, port=port)
    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    raise typer.Exit(asyncio.run(_serve(settings, log_level, access_log)))


async def _serve(settings: Settings, log_level: str, access_log: bool) -> int:
    from edgefleet.server.serve import serve

    return await serve(settings, log_level, access_log)
