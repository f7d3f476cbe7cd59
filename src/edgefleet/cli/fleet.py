"""The operator's side of the CLI, against a fleet server: ``device``, ``token``, the registry commands
for ``model`` (``push``, ``list``, ``show``), and the ``server`` group.

The server URL comes from ``--server``, ``$EDGEFLEET_SERVER`` or the CLI config file; the API token from
``$EDGEFLEET_TOKEN`` or the config file (``~/.config/edgefleet/cli.toml``, or ``$EDGEFLEET_CLI_CONFIG``)::

    server = "https://fleet.example.com:8400"
    token = "efo_..."
    ca_cert = "/etc/edgefleet/ca.crt"   # optional: verify the server with the fleet CA

Every command has ``--json``. A refusal from the server becomes one line naming the field. A command
waits up to :data:`WAIT_FOR_SERVER` seconds for a server that refuses connections (one that is still
starting), then fails with one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import typer

from edgefleet.bundle.manifest import shown
from edgefleet.errors import ConfigError, EdgefleetError

__all__ = ["WAIT_FOR_SERVER", "ApiClientError", "device_app", "list_models", "push", "register", "show", "token_app"]

device_app = typer.Typer(help="Enrolled devices: list, show, tag, revoke; enrollment tokens.", no_args_is_help=True)
token_app = typer.Typer(help="Operator API tokens (admin).", no_args_is_help=True)

_SERVER = typer.Option(None, "--server", "-s", help="fleet server URL [env: EDGEFLEET_SERVER, or the config file]")
_JSON = typer.Option(False, "--json", help="print JSON")
_CHUNK = 1 << 20  # upload chunk, bytes
WAIT_FOR_SERVER = 10.0  # seconds a command retries a refused connection (a server that is starting)
_SCHEME = re.compile(r"\Ahttps?://[^/]", re.IGNORECASE)


class ApiClientError(EdgefleetError):
    """The server refused a request or could not be reached."""


def _cli_config() -> dict[str, Any]:
    path = Path(os.environ.get("EDGEFLEET_CLI_CONFIG", Path.home() / ".config" / "edgefleet" / "cli.toml"))
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the CLI config: {e}") from e


def _client(server: str | None) -> Any:
    import httpx

    cfg = _cli_config()
    url = server or os.environ.get("EDGEFLEET_SERVER") or cfg.get("server")
    if not url:
        raise ConfigError("server: give --server URL, set EDGEFLEET_SERVER, or put server = ... in the CLI config")
    url = str(url).strip()
    if not _SCHEME.match(url):
        raise ConfigError(
            f"server: {shown(url)} is not a URL; add http:// or https:// (e.g. --server http://{url[:80]})"
        )
    token = os.environ.get("EDGEFLEET_TOKEN") or cfg.get("token")
    if not token:
        raise ConfigError("token: set EDGEFLEET_TOKEN or put token = ... in the CLI config")
    ca_cert = os.environ.get("EDGEFLEET_CA_CERT") or cfg.get("ca_cert")
    verify: Any = True
    if ca_cert:
        import ssl

        try:
            verify = ssl.create_default_context(cafile=str(ca_cert))
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"ca_cert: {ca_cert}: cannot load the CA certificate: {e.strerror or e}") from e
    try:
        return httpx.Client(
            base_url=url.rstrip("/"), headers={"Authorization": f"Bearer {token}"}, timeout=60.0, verify=verify
        )
    except (httpx.InvalidURL, ValueError) as e:
        raise ConfigError(f"server: {shown(url)} is not a valid URL: {_one_line(e)}") from e


def _refused(e: BaseException) -> bool:
    """Whether a connect error is, underneath, a refused connection (nothing listens yet)."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError):
            return True
        seen = seen.__cause__ or seen.__context__
    return "connection refused" in str(e).lower()


def _send(c: Any, method: str, path: str, body: Callable[[], Iterator[bytes]] | None = None, **kwargs: Any) -> Any:
    """One request; a refused connection is retried for :data:`WAIT_FOR_SERVER` seconds (the body, made
    by ``body()``, is made afresh each time). Raises :class:`ApiClientError` for any transport failure."""
    import httpx

    deadline = time.monotonic() + WAIT_FOR_SERVER
    pause = 0.1
    while True:
        try:
            if body is not None:
                kwargs["content"] = body()
            return c.request(method, path, **kwargs)
        except httpx.ConnectError as e:
            if _refused(e) and time.monotonic() + pause < deadline:
                time.sleep(pause)
                pause = min(pause * 2, 1.0)
                continue
            hint = f" (refused for {WAIT_FOR_SERVER:g} s: is the server running?)" if _refused(e) else ""
            raise ApiClientError(f"{c.base_url}: cannot connect: {_one_line(e)}{hint}") from e
        except httpx.HTTPError as e:
            raise ApiClientError(f"{c.base_url}: {type(e).__name__}: {_one_line(e)}") from e


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


def _call(method: str, path: str, server: str | None, **kwargs: Any) -> Any:
    with _client(server) as c:
        return _result(_send(c, method, path, **kwargs))


def _result(r: Any) -> Any:
    if r.status_code >= 400:
        try:
            body = r.json()
            msg = body.get("error") or body.get("detail") or r.text
        except (ValueError, AttributeError):
            msg = f"{r.reason_phrase} (not an edgefleet answer: is {r.request.url.host} a fleet server?)"
        msg = " ".join(str(msg).split())[:500]
        raise ApiClientError(f"{r.request.method} {r.request.url.path}: {r.status_code}: {msg}")
    if not r.content:
        return None
    try:
        return r.json()
    except ValueError as e:
        raise ApiClientError(
            f"{r.request.method} {r.request.url.path}: {r.status_code} but not JSON: is {r.request.url.host} a fleet "
            "server?"
        ) from e


def _echo(data: Any, as_json: bool, columns: list[str] | None = None, title: str | None = None) -> None:
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    rows = data if isinstance(data, list) else [data]
    if columns is None:
        for key, value in (data or {}).items():
            typer.echo(f"{key}: {json.dumps(value) if isinstance(value, dict | list) else value}")
        return
    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        cells = [row.get(c) for c in columns]
        table.add_row(*[", ".join(map(str, v)) if isinstance(v, list) else "" if v is None else str(v) for v in cells])
    Console().print(table)


# ---------------------------------------------------------------- model (registered by cli/model.py)


def push(
    bundle: Path = typer.Argument(..., exists=True, dir_okay=False, help="the .efb bundle to upload"),
    server: str | None = _SERVER,
    as_json: bool = _JSON,
) -> None:
    """Upload a bundle to the registry (streamed, with a progress bar); the server validates it.

    The bundle is checked here first, then the server is asked, with no body (a dry run), whether it
    would take it: a bad token, a role that may not push, or a version that exists with other content
    is refused before any of the body is sent, and the same bytes pushed again are a no-op."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from edgefleet.bundle import read_manifest

    manifest = read_manifest(bundle)
    size = bundle.stat().st_size
    digest = hashlib.sha256()
    with bundle.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    sha = digest.hexdigest()
    headers = {"X-Content-SHA256": sha, "X-Model-Name": manifest.name, "X-Model-Version": manifest.version}
    with _client(server) as c:
        # A dry run first: the token, the role and the version are checked with no body sent; 200 means
        # these bytes are already this version.
        check = _send(c, "POST", "/api/v1/models", params={"dry_run": "true"}, headers=headers)
        if check.status_code == 200:
            _pushed(_result(check), as_json, unchanged=True)
            return
        if check.status_code != 204:
            _result(check)  # 401, 403, 409, ...: raises
            raise ApiClientError(f"POST /api/v1/models?dry_run=true: unexpected {check.status_code}")
        with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                      TransferSpeedColumn(), disable=as_json, transient=True) as progress:
            task = progress.add_task(f"push {bundle.name}", total=size)

            def chunks() -> Iterator[bytes]:
                progress.reset(task)
                with bundle.open("rb") as f:
                    while chunk := f.read(_CHUNK):
                        progress.advance(task, len(chunk))
                        yield chunk

            headers.update({"Content-Type": "application/octet-stream", "Content-Length": str(size)})
            r = _send(c, "POST", "/api/v1/models", body=chunks, headers=headers, timeout=None)
    _pushed(_result(r), as_json, unchanged=r.status_code == 200)


def _pushed(out: dict[str, Any], as_json: bool, unchanged: bool) -> None:
    if as_json:
        _echo({**out, "unchanged": unchanged}, True)
    elif unchanged:
        typer.echo(f"{out['name']} {out['version']} is already in the registry with these bytes (sha256 "
                   f"{out['sha256']}): nothing to push")
    else:
        typer.echo(f"pushed {out['name']} {out['version']} ({out['size']} bytes, sha256 {out['sha256']})")


def list_models(
    name: str | None = typer.Option(None, "--name", help="only this model"),
    server: str | None = _SERVER,
    as_json: bool = _JSON,
) -> None:
    """List the model versions in the registry."""
    out = _call("GET", "/api/v1/models", server, params={"name": name} if name else None)
    _echo(out, as_json, ["name", "version", "runtime", "size", "sha256", "created_at"], "model versions")


def show(
    name: str = typer.Argument(..., help="model name"),
    version: str = typer.Argument(..., help="version"),
    server: str | None = _SERVER,
    as_json: bool = _JSON,
) -> None:
    """Show one version, with its manifest."""
    _echo(_call("GET", f"/api/v1/models/{name}/{version}", server), as_json)


# ---------------------------------------------------------------- device

_DEVICE_COLUMNS = ["id", "tags", "online", "revoked", "last_seen", "agent_version", "running"]


@device_app.command("list")
def device_list(
    tag: str | None = typer.Option(None, help="only devices with this tag"),
    online: bool | None = typer.Option(None, "--online/--offline", help="only online (or offline) devices"),
    server: str | None = _SERVER,
    as_json: bool = _JSON,
) -> None:
    """List devices."""
    params = {k: v for k, v in {"tag": tag, "online": online}.items() if v is not None}
    out = _call("GET", "/api/v1/devices", server, params=params)
    for d in out:
        d["running"] = [f"{m['name']}@{m['version']}" for m in d["running"]]
    _echo(out, as_json, _DEVICE_COLUMNS, "devices")


@device_app.command("show")
def device_show(device_id: str = typer.Argument(...), server: str | None = _SERVER, as_json: bool = _JSON) -> None:
    """Show a device: identity, last report, desired state."""
    _echo(_call("GET", f"/api/v1/devices/{device_id}", server), as_json)


@device_app.command("tag")
def device_tag(
    device_id: str = typer.Argument(...),
    tags: list[str] = typer.Argument(None, help="the device's tags (replacing the current ones)"),
    server: str | None = _SERVER,
    as_json: bool = _JSON,
) -> None:
    """Set a device's tags."""
    out = _call("PUT", f"/api/v1/devices/{device_id}/tags", server, json={"tags": tags or []})
    _echo(out, as_json) if as_json else typer.echo(f"{device_id}: tags {', '.join(out['tags']) or '(none)'}")


@device_app.command("revoke")
def device_revoke(device_id: str = typer.Argument(...), server: str | None = _SERVER, as_json: bool = _JSON) -> None:
    """Revoke a device: the server refuses it from now on."""
    out = _call("POST", f"/api/v1/devices/{device_id}/revoke", server)
    _echo(out, as_json) if as_json else typer.echo(f"{device_id}: revoked")


@device_app.command("assign")
def device_assign(
    device_id: str = typer.Argument(...),
    model: str = typer.Argument(..., help="model name"),
    version: str = typer.Argument(..., help="version to run"),
    server: str | None = _SERVER,
    as_json: bool = _JSON,
) -> None:
    """Pin a model version on one device (rollouts do this for many)."""
    out = _call("PUT", f"/api/v1/devices/{device_id}/models/{model}", server, json={"version": version})
    _echo(out, as_json) if as_json else typer.echo(f"{device_id}: {model} {version}")


@device_app.command("enroll-token")
def enroll_token(
    tag: list[str] = typer.Option([], "--tag", help="tag given to devices enrolling with it (repeatable)"),
    expires_in_hours: float = typer.Option(24.0, help="hours until the token stops working"),
    max_uses: int = typer.Option(1, min=1, help="how many devices may enroll with it"),
    server: str | None = _SERVER,
    as_json: bool = _JSON,
) -> None:
    """Create an enrollment token for `edgefleet agent enroll` (printed once)."""
    body = {"tags": tag, "expires_in_hours": expires_in_hours, "max_uses": max_uses}
    out = _call("POST", "/api/v1/enrollment-tokens", server, json=body)
    if as_json:
        _echo(out, True)
    else:
        typer.echo(f"enrollment token (shown once; {max_uses} use(s), until {out['expires_at']}):")
        typer.echo(f"  {out['token']}")


# ---------------------------------------------------------------- token


@token_app.command("create")
def token_create(
    name: str = typer.Option(..., help="who or what uses it (recorded in the audit log)"),
    role: str = typer.Option("viewer", help="viewer, operator or admin"),
    expires_in_days: int | None = typer.Option(None, min=1, help="days until it expires [default: never]"),
    server: str | None = _SERVER,
    as_json: bool = _JSON,
) -> None:
    """Create an operator API token (admin only); printed once."""
    out = _call("POST", "/api/v1/tokens", server, json={"name": name, "role": role, "expires_in_days": expires_in_days})
    if as_json:
        _echo(out, True)
    else:
        typer.echo(f"{role} token {out['id']} for {name} (shown once):")
        typer.echo(f"  {out['token']}")


@token_app.command("list")
def token_list(server: str | None = _SERVER, as_json: bool = _JSON) -> None:
    """List operator API tokens (never their secrets)."""
    _echo(_call("GET", "/api/v1/tokens", server), as_json, ["id", "name", "role", "created_at", "expires_at",
                                                            "revoked_at"], "API tokens")


@token_app.command("revoke")
def token_revoke(token_id: str = typer.Argument(...), server: str | None = _SERVER) -> None:
    """Revoke an operator API token."""
    _call("DELETE", f"/api/v1/tokens/{token_id}", server)
    typer.echo(f"token {token_id}: revoked")


def register(app: typer.Typer) -> None:
    """Add the ``device``, ``token`` and ``server`` groups to the root CLI."""
    from edgefleet.cli import server as server_cmd

    app.add_typer(device_app, name="device")
    app.add_typer(token_app, name="token")
    app.add_typer(server_cmd.app, name="server")
