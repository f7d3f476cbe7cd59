"""The operator's side of the CLI, against a fleet server: ``device``, ``token``, the registry commands
for ``model`` (``push``, ``list``, ``show``, and ``sign``, ``withdraw``), and the ``server`` group.

Pushing is a signing protocol: ``model push BUNDLE --keys DIR`` uploads the bundle, then lists it in the
image repository's targets signed with the operator's release key (:func:`edgefleet.cli.keys.
change_targets`); devices install only what those targets list. ``model sign`` lists a bundle already in
the registry, ``model withdraw`` signs targets without it. ``--keys`` also comes from
``$EDGEFLEET_KEYS``; ``device enroll-token --keys DIR`` pins the token to the keyring's image root.

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
from urllib.parse import quote

import typer

from edgefleet.bundle.manifest import shown
from edgefleet.errors import ConfigError, EdgefleetError

__all__ = ["WAIT_FOR_SERVER", "ApiClientError", "device_app", "list_models", "push", "register", "show", "sign",
           "token_app", "withdraw"]

device_app = typer.Typer(help="Enrolled devices: list, show, tag, revoke; enrollment tokens.", no_args_is_help=True)
token_app = typer.Typer(help="Operator API tokens (admin).", no_args_is_help=True)

_SERVER = typer.Option(None, "--server", "-s", help="fleet server URL [env: EDGEFLEET_SERVER, or the config file]")
_JSON = typer.Option(False, "--json", help="print JSON")
_SIGN_KEYS = typer.Option(None, "--keys", envvar="EDGEFLEET_KEYS",
                          help="the operator's keyring (`edgefleet keys init`): sign with its release key")
_KEYS_REQUIRED = typer.Option(..., "--keys", envvar="EDGEFLEET_KEYS",
                              help="the operator's keyring (`edgefleet keys init`)")
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def push(
    bundle: Path = typer.Argument(..., exists=True, dir_okay=False, help="the .efb bundle to upload"),
    keys: Path | None = _SIGN_KEYS,
    server: str | None = _SERVER,
    as_json: bool = _JSON,
) -> None:
    """Upload a bundle to the registry (streamed, with a progress bar); with --keys, sign it into the
    image targets so devices may install it.

    The bundle is checked here first, then the server is asked, with no body (a dry run), whether it
    would take it: a bad token, a role that may not push, or a version that exists with other content
    is refused before any of the body is sent, and the same bytes pushed again are a no-op. With --keys
    the keyring is checked before the upload; after it, the entry NAME-VERSION.efb (the length and
    sha256 hashed here) is added to the current image targets, signed with the release key and
    published (retried when another operator published in between); already listed, nothing is signed.
    Without --keys devices will not install it until `model sign` lists it."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from edgefleet.bundle import read_manifest
    from edgefleet.cli.keys import signing_keyring

    manifest = read_manifest(bundle)
    signing = signing_keyring(keys) if keys is not None else None  # a bad keyring fails before the upload
    size = bundle.stat().st_size
    sha = _sha256(bundle)
    headers = {"X-Content-SHA256": sha, "X-Model-Name": manifest.name, "X-Model-Version": manifest.version}
    with _client(server) as c:
        # A dry run first: the token, the role and the version are checked with no body sent; 200 means
        # these bytes are already this version.
        check = _send(c, "POST", "/api/v1/models", params={"dry_run": "true"}, headers=headers)
        if check.status_code == 200:
            out, unchanged = _result(check), True
        elif check.status_code != 204:
            _result(check)  # 401, 403, 409, ...: raises
            raise ApiClientError(f"POST /api/v1/models?dry_run=true: unexpected {check.status_code}")
        else:
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
            out, unchanged = _result(r), r.status_code == 200
        change = None
        if signing is not None:
            try:
                change = _sign_into_targets(c, signing, manifest.name, manifest.version, size, sha)
            except EdgefleetError as e:
                raise ApiClientError(
                    f"{manifest.name} {manifest.version} is in the registry but not signed ({e}); finish with "
                    f"`edgefleet model sign {manifest.name} {manifest.version} --keys {keys}`") from e
    _pushed(out, as_json, unchanged, change)


def _sign_into_targets(c: Any, signing: tuple[Any, Any], name: str, version: str, size: int, sha: str) -> Any:
    """List bundle NAME-VERSION (``size`` bytes, ``sha``) in the image targets; a TargetsChange."""
    from edgefleet.cli.keys import change_targets
    from edgefleet.tufmeta.roles import bundle_target

    ring, root = signing
    return change_targets(c, ring, root.signed, _listing(bundle_target(name, version, size, sha)))


def _listing(entry: Any) -> Callable[[Any], bool]:
    """An edit for :func:`~edgefleet.cli.keys.change_targets` that lists ``entry`` (a TargetFile): nothing
    to do when the targets list that path with the same length and sha256; refused (ConfigError) when
    they list it with other bytes, since a signed version's bytes never change."""

    def edit(targets: Any) -> bool:
        have = targets.targets.get(entry.path)
        if have is not None:
            if (have.length, have.hashes.get("sha256")) == (entry.length, entry.hashes["sha256"]):
                return False
            name, version = entry.custom["model"], entry.custom["version"]
            raise ConfigError(
                f"signed.targets.{entry.path}: image targets {targets.version} already list it with sha256 "
                f"{have.hashes.get('sha256')} ({have.length} bytes), not {entry.hashes['sha256']} ({entry.length} "
                f"bytes); a signed version's bytes never change: push a new version, or withdraw this one first "
                f"(`edgefleet model withdraw {name} {version} --keys DIR`)")
        targets.targets[entry.path] = entry
        return True

    return edit


def _unlisting(path: str) -> Callable[[Any], bool]:
    """An edit that removes target ``path`` (nothing to do when it is not listed)."""

    def edit(targets: Any) -> bool:
        return targets.targets.pop(path, None) is not None

    return edit


def _signed_json(change: Any) -> dict[str, Any]:
    if change is None:
        return {"signed": False, "targets_version": None, "targets_changed": False}
    return {"signed": True, "targets_version": change.version, "targets_changed": change.changed}


def _signed_line(name: str, version: str, change: Any) -> str:
    if change is None:
        return (f"not signed: devices will not install {name} {version} until the image targets list it; sign it "
                f"with `edgefleet model sign {name} {version} --keys DIR` (or push with --keys DIR)")
    if change.changed:
        return f"signed {name} {version} into image targets {change.version}: devices may install it"
    return f"{name} {version} is already in image targets {change.version} with these hashes: nothing signed"


def _pushed(out: dict[str, Any], as_json: bool, unchanged: bool, change: Any) -> None:
    if as_json:
        _echo({**out, "unchanged": unchanged, **_signed_json(change)}, True)
        return
    if unchanged:
        typer.echo(f"{out['name']} {out['version']} is already in the registry with these bytes (sha256 "
                   f"{out['sha256']}): nothing to push")
    else:
        typer.echo(f"pushed {out['name']} {out['version']} ({out['size']} bytes, sha256 {out['sha256']})")
    typer.echo(_signed_line(out["name"], out["version"], change))


def _model_path(name: str, version: str) -> str:
    return f"/api/v1/models/{quote(name, safe='')}/{quote(version, safe='')}"


def sign(
    name: str = typer.Argument(..., help="model name"),
    version: str = typer.Argument(..., help="version (already in the registry)"),
    keys: Path = _KEYS_REQUIRED,
    bundle: Path | None = typer.Option(None, "--bundle", exists=True, dir_okay=False,
                                       help="the operator's copy of the bundle: sign only if the registry's "
                                            "bytes are these"),
    server: str | None = _SERVER,
    as_json: bool = _JSON,
) -> None:
    """List a registry bundle in the image targets, signed with the release key, so devices may install it.

    The length and sha256 are the registry's (printed); --bundle FILE checks them against your own copy
    first. Already listed with these hashes: nothing is signed."""
    from edgefleet.cli.keys import signing_keyring

    signing = signing_keyring(keys)
    with _client(server) as c:
        rec = _result(_send(c, "GET", _model_path(name, version)))
        size, sha = int(rec["size"]), str(rec["sha256"])
        if bundle is not None and (bundle.stat().st_size, _sha256(bundle)) != (size, sha):
            raise ConfigError(f"--bundle: {bundle} is not the registry's {name} {version} (sha256 {sha}, {size} "
                              "bytes); nothing signed")
        change = _sign_into_targets(c, signing, name, version, size, sha)
    if as_json:
        _echo({"name": name, "version": version, "size": size, "sha256": sha, **_signed_json(change)}, True)
    else:
        typer.echo(f"{name} {version}: {size} bytes, sha256 {sha}")
        typer.echo(_signed_line(name, version, change))


def withdraw(
    name: str = typer.Argument(..., help="model name"),
    version: str = typer.Argument(..., help="version to withdraw"),
    keys: Path = _KEYS_REQUIRED,
    server: str | None = _SERVER,
    as_json: bool = _JSON,
) -> None:
    """Withdraw a version: publish image targets without it, signed with the release key.

    Devices stop installing it (the device installs only what the image targets still list); the bundle
    stays in the registry. Not listed: nothing is signed."""
    from edgefleet.cli.keys import change_targets, signing_keyring
    from edgefleet.tufmeta import target_path

    ring, root = signing_keyring(keys)
    with _client(server) as c:
        change = change_targets(c, ring, root.signed, _unlisting(target_path(name, version)))
    out = {"name": name, "version": version, "withdrawn": change.changed, "targets_version": change.version}
    if as_json:
        _echo(out, True)
    elif change.changed:
        typer.echo(f"withdrew {name} {version}: image targets {change.version} no longer list it (the bundle stays "
                   "in the registry)")
    else:
        typer.echo(f"{name} {version} is not listed in image targets {change.version}: nothing to withdraw")


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
    """Show a device: identity, last report, desired state, update state and its last events."""
    out = _call("GET", f"/api/v1/devices/{device_id}", server)
    if as_json or not isinstance(out, dict):
        _echo(out, as_json)
        return
    events = out.pop("events", None) or []
    _echo(out, False)
    if events:
        _echo(events, False, ["seq", "at", "kind", "model", "version", "reason", "detail"],
              "last events (newest first)")


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


@device_app.command("pin")
def device_pin(
    device_id: str = typer.Argument(...),
    model: str = typer.Option(..., "--model", help="model name"),
    version: str = typer.Option(..., "--version", help="the version it keeps running"),
    server: str | None = _SERVER,
    as_json: bool = _JSON,
) -> None:
    """Pin a model version on one device: no rollout changes it (a pin beats an operator's assignment
    beats a rollout); a rollout that governed the device lets it be."""
    out = _call("PUT", f"/api/v1/devices/{device_id}/pins/{model}", server, json={"version": version})
    if as_json:
        _echo(out, True)
        return
    released = out.get("released_from_rollouts") or []
    typer.echo(f"{device_id}: {model} {version} pinned"
               + (f" (released from rollout {', '.join(map(str, released))})" if released else ""))


@device_app.command("unpin")
def device_unpin(
    device_id: str = typer.Argument(...),
    model: str = typer.Option(..., "--model", help="model name"),
    server: str | None = _SERVER,
    as_json: bool = _JSON,
) -> None:
    """Unpin: the device keeps its version as an operator's assignment, which later rollouts may take."""
    out = _call("DELETE", f"/api/v1/devices/{device_id}/pins/{model}", server)
    if as_json:
        _echo(out, True)
    elif out["changed"]:
        typer.echo(f"{device_id}: {model} {out['version']} unpinned (now an operator's assignment)")
    else:
        typer.echo(f"{device_id}: {model} was not pinned ({out['version']}, source {out['source']}): nothing changed")


@device_app.command("enroll-token")
def enroll_token(
    tag: list[str] = typer.Option([], "--tag", help="tag given to devices enrolling with it (repeatable)"),
    expires_in_hours: float = typer.Option(24.0, help="hours until the token stops working"),
    max_uses: int = typer.Option(1, min=1, help="how many devices may enroll with it"),
    keys: Path | None = typer.Option(None, "--keys", envvar="EDGEFLEET_KEYS",
                                     help="the operator's keyring: the token carries its image root's fingerprint"),
    server: str | None = _SERVER,
    as_json: bool = _JSON,
) -> None:
    """Create an enrollment token for `edgefleet agent enroll` (printed once).

    With --keys the token is pinned, TOKEN.N.SHA256: image root N of your own keyring and its
    fingerprint, so the device trusts the root you signed and not whatever the server sends. Without,
    the device needs the root file instead (`agent enroll --image-root FILE`)."""
    pin = None
    if keys is not None:  # read before the server makes a token, so a bad keyring wastes none
        from edgefleet.tufmeta.keyring import Keyring

        ring = Keyring.load(keys)
        root, fp = ring.latest_root(), ring.fingerprint()
        if root is None or fp is None:
            raise ConfigError(f"--keys: {keys} has published no image root; run `edgefleet keys init --keys {keys} "
                              "--server URL` first")
        pin = (root.signed.version, fp)
    body = {"tags": tag, "expires_in_hours": expires_in_hours, "max_uses": max_uses}
    out = _call("POST", "/api/v1/enrollment-tokens", server, json=body)
    if pin is not None:
        from edgefleet.tufmeta.pin import pin_token

        out = {**out, "token": pin_token(out["token"], *pin), "image_root_version": pin[0],
               "image_root_fingerprint": pin[1]}
    out["pinned"] = pin is not None
    if as_json:
        _echo(out, True)
        return
    typer.echo(f"enrollment token (shown once; {max_uses} use(s), until {out['expires_at']}):")
    typer.echo(f"  {out['token']}")
    if pin is not None:
        typer.echo(f"it pins image root {pin[0]} (sha256 {pin[1]}) from {keys}")
    else:
        typer.echo("it pins no image root: the device then needs `edgefleet agent enroll --image-root FILE` (the "
                   "root file `edgefleet keys show` names), or make the token with --keys DIR")


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
    """Add the ``device``, ``token`` and ``server`` groups to the root CLI, and ``model sign`` and
    ``model withdraw`` to the model group (cli/model.py registers push, list and show)."""
    from edgefleet.cli import model as model_cmd
    from edgefleet.cli import server as server_cmd

    model_cmd.app.command("sign")(sign)
    model_cmd.app.command("withdraw")(withdraw)

    app.add_typer(device_app, name="device")
    app.add_typer(token_app, name="token")
    app.add_typer(server_cmd.app, name="server")
