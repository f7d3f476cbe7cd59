"""``edgefleet server init|run|migrate|tls|token create``: prepare, run, migrate and recover the fleet server.

``init`` makes the data folder (0700), database, fleet CA and a first admin token. Recovery works without
a running server: ``token create`` writes an operator token straight into the database (audited), and
``tls`` (or ``init --tls-hostname`` on an initialised folder) issues a TLS certificate from the fleet CA.
Every failure is one ``error: ...`` line (:class:`edgefleet.errors.EdgefleetError`), never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from edgefleet.errors import ConfigError

if TYPE_CHECKING:
    from edgefleet.server.settings import Settings

__all__ = ["app"]

app = typer.Typer(
    help="The fleet server: init a data folder, run it, migrate its database, recover access.", no_args_is_help=True
)
token_app = typer.Typer(help="Operator API tokens made offline, straight in the database.", no_args_is_help=True)
app.add_typer(token_app, name="token")

_DATA = typer.Option(None, "--data", help="data folder: SQLite database, bundles, fleet CA [default: edgefleet-data]")
_DB = typer.Option(None, "--db", help="database URL: postgresql+psycopg://user@host/db [default: SQLite in --data]")
_CONFIG = typer.Option(None, "--config", "-c", help="server.toml (EDGEFLEET_SERVER_* variables override it)")
_JSON = typer.Option(False, "--json", help="print the result as JSON")


def _settings(config: Path | None, **overrides: object) -> Settings:
    from edgefleet.server.settings import load_settings

    return load_settings(config, None, **overrides)


@contextlib.contextmanager
def _one_line(what: str) -> Iterator[None]:
    """Turn the file-system and database errors a command can meet into one-line ConfigErrors."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        raise ConfigError(f"{what}: {where}{e.strerror or e}") from e
    except SQLAlchemyError as e:
        orig = getattr(e, "orig", None)
        lines = str(orig if orig is not None else e).strip().splitlines()
        raise ConfigError(f"{what}: database: {lines[0] if lines else type(e).__name__}") from e


def _toml_str(path: Path) -> str:
    return json.dumps(str(path))  # a TOML basic string (JSON escapes are TOML's)


def _tls_settings_hint(settings: Settings, config: Path | None, cert: Path, key: Path) -> str:
    """Which settings make the server use ``cert``/``key``, and where they go."""
    cert, key = cert.resolve(), key.resolve()
    if settings.tls_certfile and settings.tls_keyfile and (
        settings.tls_certfile.resolve(), settings.tls_keyfile.resolve()
    ) == (cert, key):
        return "TLS: the settings already name this certificate; restart `edgefleet server run` to use it"
    where = str(config) if config else "server.toml (then run the server with --config server.toml)"
    return (
        f"TLS: add tls_certfile = {_toml_str(cert)} and tls_keyfile = {_toml_str(key)} to {where}, "
        f"or set EDGEFLEET_SERVER_TLS_CERTFILE={cert} and EDGEFLEET_SERVER_TLS_KEYFILE={key}; "
        "then (re)start `edgefleet server run`"
    )


def _issue_tls(settings: Settings, config: Path | None, hostnames: list[str], days: int) -> dict[str, object]:
    from edgefleet.server.ca import write_server_cert

    cert, key = write_server_cert(settings.data_dir, hostnames, days)
    return {
        "tls_certfile": str(cert.resolve()),
        "tls_keyfile": str(key.resolve()),
        "hostnames": hostnames,
        "settings_hint": _tls_settings_hint(settings, config, cert, key),
    }


@app.command()
def init(
    data: Path | None = _DATA,
    db: str | None = _DB,
    config: Path | None = _CONFIG,
    admin_name: str = typer.Option("admin", help="name of the first admin token (recorded in the audit log)"),
    tls_hostname: list[str] = typer.Option(
        [], "--tls-hostname",
        help="also issue a TLS server certificate from the fleet CA for these names/IPs; on an initialised "
        "folder, issue only that certificate",
    ),
    as_json: bool = _JSON,
) -> None:
    """Create the data folder (0700), database, fleet CA, online TUF keys and a first admin token (printed once).

    Only the token's hash is kept. On an already initialised folder it refuses, unless --tls-hostname
    asks only for a TLS certificate, or the folder lacks the online TUF keys (made before TUF): then it
    adds only those.
    """
    from edgefleet.server.ca import CA_CERT, check_hostnames
    from edgefleet.server.state import init_server, is_initialised

    settings = _settings(config, data_dir=data, db_url=db)
    if tls_hostname:
        check_hostnames(tls_hostname)  # before init: a bad name must not cost the admin token
    out: dict[str, object] = {"data_dir": str(settings.data_dir.resolve())}
    with _one_line(f"server init {settings.data_dir}"):
        if tls_hostname and is_initialised(settings):
            out.update(initialised=False, **_issue_tls(settings, config, tls_hostname, 825))
            if as_json:
                typer.echo(json.dumps(out, indent=2))
                return
            typer.echo(f"{settings.data_dir}: already initialised; issued only the TLS certificate")
            typer.echo(f"TLS certificate: {out['tls_certfile']} (key {out['tls_keyfile']})")
            typer.echo(str(out["settings_hint"]))
            return
        if is_initialised(settings) and _add_online_keys(settings, out, as_json):
            return  # a server initialised before TUF: only its online keys were missing
        token = init_server(settings, admin_name)
        out.update(initialised=True, admin_token=token, ca_certificate=str((settings.data_dir / CA_CERT).resolve()))
        if tls_hostname:
            out.update(_issue_tls(settings, config, tls_hostname, 825))
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    typer.echo(f"initialised {settings.data_dir} (mode 0700; the database and keys in it are 0600)")
    typer.echo(f"fleet CA certificate (devices pin it: agent enroll --ca): {out['ca_certificate']}")
    if tls_hostname:
        typer.echo(f"TLS certificate: {out['tls_certfile']} (key {out['tls_keyfile']})")
        typer.echo(str(out["settings_hint"]))
    else:
        typer.echo(
            "TLS: devices need HTTPS; issue a certificate with "
            f"`edgefleet server tls --data {settings.data_dir} --hostname NAME` (it says which settings to add)"
        )
    typer.echo(f"run it: edgefleet server run --data {settings.data_dir}")
    typer.echo("first admin token (shown once, store it now; a lost one: `edgefleet server token create`):")
    typer.echo(f"  {token}")


def _add_online_keys(settings: Settings, out: dict[str, object], as_json: bool) -> bool:
    """On an initialised folder without online TUF keys (made before TUF), make them: whether it did."""
    from edgefleet.server.tuf.keys import KEY_DIR, create_online_keys, has_online_keys

    if has_online_keys(settings.data_dir):
        return False
    keys = create_online_keys(settings.data_dir)
    out.update(initialised=False, tuf_keys=keys.public())
    if as_json:
        typer.echo(json.dumps(out, indent=2))
    else:
        typer.echo(f"{settings.data_dir}: already initialised; added the online TUF keys in "
                   f"{settings.data_dir / KEY_DIR} (0600); publish the image root with `edgefleet keys init --server`")
    return True


@app.command()
def tls(
    data: Path | None = _DATA,
    config: Path | None = _CONFIG,
    hostname: list[str] = typer.Option(
        [], "--hostname", help="DNS name or IP address devices connect to (repeat for several)"
    ),
    days: int = typer.Option(825, "--days", help="validity in days (1 to 3650)"),
    as_json: bool = _JSON,
) -> None:
    """Issue a TLS server certificate from the fleet CA into DATA/tls/, and say which settings use it.

    The key is 0600; an earlier certificate is replaced. No running server is needed.
    """
    settings = _settings(config, data_dir=data)
    with _one_line(f"server tls {settings.data_dir}"):
        out = _issue_tls(settings, config, hostname, days)
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    typer.echo(f"TLS certificate for {', '.join(hostname)}: {out['tls_certfile']} (key {out['tls_keyfile']})")
    typer.echo(str(out["settings_hint"]))


@token_app.command("create")
def token_create(
    data: Path | None = _DATA,
    db: str | None = _DB,
    config: Path | None = _CONFIG,
    role: str = typer.Option("admin", "--role", help="viewer, operator or admin"),
    name: str = typer.Option("recovery", "--name", help="token name (recorded in the audit log)"),
    expires_in_days: int | None = typer.Option(None, "--expires-in-days", help="1 to 3650 [default: never]"),
    as_json: bool = _JSON,
) -> None:
    """Make an operator API token straight in the database, without a running server (a lost admin token).

    Audited as made offline by this OS user. The token is printed once.
    """
    from datetime import timedelta

    from pydantic import ValidationError

    from edgefleet.server.api.schemas import TokenIn
    from edgefleet.server.models import utcnow
    from edgefleet.server.state import create_token_offline

    try:
        TokenIn.model_validate({"name": name, "role": role, "expires_in_days": expires_in_days})
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"]).replace("_", "-")
        raise ConfigError(f"--{field}: {err['msg']}") from e
    settings = _settings(config, data_dir=data, db_url=db)
    expires = utcnow() + timedelta(days=expires_in_days) if expires_in_days else None
    with _one_line(f"server token create {settings.data_dir}"):
        token, token_id = create_token_offline(settings, name, role, expires)
    if as_json:
        typer.echo(json.dumps({
            "id": token_id, "name": name, "role": role, "token": token,
            "expires_at": expires.isoformat() if expires else None,
        }, indent=2))
        return
    typer.echo(f"{role} token {token_id} ({name!r}) made offline and audited; shown once, store it now:")
    typer.echo(f"  {token}")


@app.command()
def migrate(data: Path | None = _DATA, db: str | None = _DB, config: Path | None = _CONFIG) -> None:
    """Apply the database migrations (the server also does this at start unless migrate_on_start = false)."""
    from edgefleet.server.db import make_engine
    from edgefleet.server.db import migrate as run_migrations
    from edgefleet.server.state import private_sqlite_file

    settings = _settings(config, data_dir=data, db_url=db)
    with _one_line("server migrate"):
        private_sqlite_file(settings.database_url())
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
