"""``edgefleet agent ...``: the device agent and its quick-start server."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

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
    max_body_bytes: int | None = typer.Option(None, help="Binary request body limit, bytes [default: 64 MiB]."),
    max_json_bytes: int | None = typer.Option(None, help="JSON request body limit, bytes [default: 4 MiB]."),
    max_buffered_bytes: int | None = typer.Option(
        None, help="Request bytes buffered over all connections, bytes [default: 96 MiB]."
    ),
    max_connections: int | None = typer.Option(None, help="Open connections at once [default: 64]."),
    token_file: Path | None = typer.Option(
        None, "--token-file", help="API token file (first line); needed with a --host beyond loopback."
    ),
) -> None:
    """Serve models over the Open Inference Protocol, with no fleet and no config file.

    Any other [api] setting can be given as EDGEFLEET_AGENT__API__<KEY> (see docs/environment.md)."""
    from edgefleet.agent.config import config_from_dict
    from edgefleet.agent.service import AgentService

    limits = {
        "max_body_bytes": max_body_bytes,
        "max_json_bytes": max_json_bytes,
        "max_buffered_bytes": max_buffered_bytes,
        "max_connections": max_connections,
        "token_file": token_file,
    }
    cfg = config_from_dict(
        {
            "api": {"host": host, "port": port, "uds": uds, **{k: v for k, v in limits.items() if v is not None}},
            "models": [{"path": m.resolve(), "threads": threads} for m in models],
            "log_level": log_level,
        }
    )
    _logging(cfg.log_level)
    raise typer.Exit(AgentService(cfg).run())


@app.command()
def batch(
    model: Path = typer.Argument(
        ..., help="A .efb bundle (runs its pipeline) or a .onnx/.tflite model (runs it directly)."
    ),
    inputs: list[Path] = typer.Argument(..., help="Files and folders: images, .npz, .jsonl/.ndjson, .csv."),
    out: Path = typer.Option(..., "-o", "--out", help="OUT.jsonl: one JSON object a line, appended; a rerun resumes."),
    direct: bool = typer.Option(
        False, "--direct", help="Run a bundle's model directly (raw outputs), not its pipeline."
    ),
    batch_size: int | None = typer.Option(
        None, "--batch-size", min=1, help="Samples per call [default: 32 if the batch dim is dynamic, else 1]."
    ),
    sync_every: int = typer.Option(
        1000, "--sync-every", min=1, help="fsync OUT every this many lines (and every second, and at the end)."
    ),
    threads: int | None = typer.Option(None, min=1, help="Runtime threads."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Run a model over files of inputs into OUT.jsonl, resumable after a crash.

    Each line: {"input": {"path", "index", "size", "mtime_ns"}, "model", "version", "result" or
    "error"}. Images go through the bundle's pipeline; samples in .npz (the sample layout: one array
    per input, (N, *input shape), scalars (N,)), JSON lines ({input: list} or, for one input, a list)
    and CSV (a row of numbers per sample) are the model's inputs, and get its postprocess.

    A done input is identified by (path, index within the file, size, mtime_ns): a rerun reads OUT's
    complete lines (a torn last line is cut off), skips every sample they record and appends the
    rest, so nothing is written twice; a file changed since (size or mtime) is run again. OUT of
    another model or version is refused."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from edgefleet.agent.batch import run_batch
    from edgefleet.agent.runtime import load_model

    m = load_model(model, threads=threads)
    columns = (TextColumn("batch"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("batch", total=None)
        summary = run_batch(
            m,
            inputs,
            out,
            direct=direct,
            batch_size=batch_size,
            sync_every=sync_every,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    s = summary.to_dict()
    if as_json:
        typer.echo(json.dumps({"out": str(out), **s}, indent=2))
        return
    typer.echo(
        f"{out}: {summary.written} written ({summary.errors} errors), {summary.skipped} done before; "
        f"{summary.samples} samples in {summary.files} files; {summary.written} in {summary.seconds:.2f} s: "
        f"{s['throughput_per_s']:.0f} samples/s"
    )


@app.command("check-config")
def check_config(
    config: Path = typer.Argument(..., help="agent.toml"),
    as_json: bool = typer.Option(False, "--json", help="Print the validated config as JSON."),
) -> None:
    """Validate agent.toml (and EDGEFLEET_AGENT__* overrides, and the enrolled identity); errors name
    the key and line. Every model file must exist."""
    from edgefleet.agent.config import load_config
    from edgefleet.errors import ConfigError

    cfg = load_config(config)
    for i, m in enumerate(cfg.models):
        if not m.path.is_file():
            why = "is a folder, not a model file" if m.path.is_dir() else "does not exist"
            raise ConfigError(f"{config}: models.{i}.path: {m.path} {why}")
    if as_json:
        typer.echo(json.dumps(cfg.model_dump(mode="json"), indent=2))
    else:
        typer.echo(f"{config}: ok ({len(cfg.models)} model(s), {len(cfg.flows)} flow(s), api port {cfg.api.port})")


@app.command()
def enroll(
    server: str | None = typer.Option(None, "--server", help="fleet server URL [default: server_url from --config]"),
    token: str = typer.Option(..., "--token", envvar="EDGEFLEET_ENROLL_TOKEN",
                              help="enrollment token, pinned: efe_....N.SHA256 (`device enroll-token --keys DIR`)"),
    image_root: Path | None = typer.Option(None, "--image-root", help="the image root file the operator gave "
                                           "(for a token without a pin); its fingerprint is what this device trusts"),
    config: Path | None = typer.Option(None, "--config", "-c", help="agent.toml (gives state_dir and server_url)"),
    state_dir: Path | None = typer.Option(None, "--state-dir", help="where the identity goes [default: config's]"),
    ca: Path | None = typer.Option(None, "--ca", help="CA to verify an https server with [default: system CAs]"),
    allow_http: bool = typer.Option(False, "--allow-http", help="allow a plain-http server (tests on loopback)"),
    force: bool = typer.Option(False, "--force", help="replace an existing identity"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Enroll this device: make its own key (0600, never sent), send a CSR with the token, keep the
    certificate and the fleet CA the server returns, and the image and director TUF roots, under
    STATE_DIR/identity/.

    The image root is the one the token pins (or --image-root FILE): the server's copy must have that
    fingerprint and the director root must be signed by its root keys, else nothing is written."""
    import urllib.error
    import urllib.request

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from edgefleet.agent.config import identity_path
    from edgefleet.agent.updater.bootstrap import fetch_roots, install_roots
    from edgefleet.durable import atomic_write_bytes
    from edgefleet.errors import ConfigError
    from edgefleet.tufmeta import TrustError

    cfg = None
    if config is not None:
        from edgefleet.agent.config import load_config

        cfg = load_config(config, identity=False)  # enrolling (again) makes the identity
    if cfg is not None and cfg.server_url and server and server.rstrip("/") != cfg.server_url.rstrip("/"):
        raise ConfigError(
            f"--server: {server} is not {config}'s server_url {cfg.server_url}; `agent run` would refuse the "
            "identity: give one server"
        )
    url = server or (cfg.server_url if cfg else None)
    folder = state_dir or (cfg.state_dir if cfg else None)
    if not url or folder is None:
        raise ConfigError("enroll: give --server and --state-dir, or --config with server_url and state_dir")
    _check_url(url, allow_http)
    identity = folder / "identity"
    if ((identity / "device.key").exists() or identity_path(folder).exists()) and not force:
        raise ConfigError(f"{identity}: this device is already enrolled (--force replaces its identity)")
    server_token, pin = _trust_anchor(token, image_root)  # refused here, before anything is sent
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgefleet-device")]))
        .sign(key, hashes.SHA256())
    )
    body = json.dumps({"token": server_token, "csr": csr.public_bytes(serialization.Encoding.PEM).decode()}).encode()
    request = urllib.request.Request(
        url.rstrip("/") + "/api/v1/enroll", data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    context = _tls(url, ca)
    try:
        out = _post_waiting(request, context)
    except urllib.error.HTTPError as e:
        reason = json.loads(e.read() or b"{}").get("error", e.reason)
        raise ConfigError(f"enroll: the server refused: {e.code}: {reason}") from e
    except (urllib.error.URLError, OSError) as e:
        raise ConfigError(f"--server: cannot reach {url}: {e}") from e
    try:
        out_id, out_cert, out_ca = str(out["device_id"]), str(out["certificate"]), str(out["ca_certificate"])
    except (KeyError, TypeError) as e:
        raise ConfigError(f"enroll: {url} answered without a device id, certificate and CA ({e})") from e
    try:
        roots = fetch_roots(url, out_id, key, pin, context)  # with the new certificate; nothing written yet
    except (TrustError, ConfigError) as e:
        note = f" (nothing was written here; the server enrolled {out_id}: `edgefleet device revoke {out_id}` drops it)"
        if isinstance(e, TrustError):
            raise TrustError(f"{e}{note}", e.field) from e
        raise ConfigError(f"{e}{note}") from e
    _private_dir(folder, identity)
    if force:
        identity_path(folder).unlink(missing_ok=True)  # a cut below leaves "not enrolled", never a mixed identity
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    atomic_write_bytes(identity / "device.key", pem, mode=0o600)
    atomic_write_bytes(identity / "device.crt", out_cert.encode(), mode=0o600)
    atomic_write_bytes(identity / "ca.crt", out_ca.encode(), mode=0o600)
    install_roots(folder, roots.image, roots.director)
    info = {
        "schema": 1,
        "device_id": out_id,
        "server_url": url,
        "ca_cert": str((identity / "ca.crt").resolve()),
        "certificate": str((identity / "device.crt").resolve()),
        "key": str((identity / "device.key").resolve()),
        "tags": out.get("tags", []),
    }
    # Written last: its presence says the enrollment is complete, and `agent run` takes it from here.
    atomic_write_bytes(identity_path(folder), json.dumps(info, indent=2).encode() + b"\n", mode=0o600)
    if as_json:
        typer.echo(json.dumps({**info, "identity": str(identity), **_roots_json(roots)}, indent=2))
    else:
        typer.echo(f"enrolled as {out_id}, trusting image root {roots.image_version} ({roots.image_fingerprint}); "
                   f"`edgefleet agent run` reads the identity from {identity_path(folder)}")


@app.command()
def trust(
    state_dir: Path = typer.Option(..., "--state-dir", help="the enrolled device's state folder"),
    image_root: Path | None = typer.Option(None, "--image-root", help="the image root file the operator gave"),
    pin: str | None = typer.Option(None, "--pin", help="N.SHA256: image root N and its fingerprint (`edgefleet keys "
                                   "show --keys DIR`)"),
    server: str | None = typer.Option(None, "--server", help="fleet server URL [default: the identity's]"),
    ca: Path | None = typer.Option(None, "--ca", help="CA to verify an https server with [default: the identity's "
                                   "fleet CA]"),
    allow_http: bool = typer.Option(False, "--allow-http", help="allow a plain-http server (tests on loopback)"),
    force: bool = typer.Option(False, "--force", help="replace trust roots this device already has"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Give a device enrolled without TUF roots (before signed updates) its image and director roots,
    checked as `agent enroll` checks them, with its existing key; the identity is kept."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from edgefleet.agent.config import identity_path
    from edgefleet.agent.updater.bootstrap import fetch_roots, has_roots, install_roots
    from edgefleet.errors import ConfigError

    if (image_root is None) == (pin is None):
        raise ConfigError("trust: give --image-root FILE or --pin N.SHA256 (one of them)")
    path = identity_path(state_dir)
    try:
        ident = json.loads(path.read_bytes())
        device_id, url, key_file = str(ident["device_id"]), str(server or ident["server_url"]), Path(ident["key"])
        fleet_ca = Path(ident["ca_cert"]) if ident.get("ca_cert") else None
    except FileNotFoundError as e:
        raise ConfigError(f"--state-dir: {path} does not exist: this device is not enrolled (`edgefleet agent "
                          "enroll` gets the roots itself)") from e
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: not a device identity ({type(e).__name__}: {e})") from e
    if has_roots(state_dir) and not force:
        raise ConfigError(f"{state_dir / 'identity'}: this device already has its trust roots (--force replaces "
                          "them)")
    _check_url(url, allow_http)
    _, root_pin = _trust_anchor(f"x.{pin}" if pin is not None else "x", image_root, "--pin")
    try:
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"{path}: key: cannot read the device key {key_file}: {e}") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{path}: key: {key_file} is not an ECDSA key")
    roots = fetch_roots(url, device_id, key, root_pin, _tls(url, ca or fleet_ca))
    install_roots(state_dir, roots.image, roots.director)
    if as_json:
        typer.echo(json.dumps({"device_id": device_id, "identity": str(state_dir / "identity"), **_roots_json(roots)},
                              indent=2))
    else:
        typer.echo(f"{device_id}: trusting image root {roots.image_version} ({roots.image_fingerprint}) and director "
                   f"root {roots.director_version}")


def _check_url(url: str, allow_http: bool) -> None:
    from edgefleet.errors import ConfigError

    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"--server: {url[:100]!r} is not a URL; add http:// or https:// (e.g. https://{url[:80]})")
    if url.startswith("http://") and not allow_http:
        raise ConfigError(f"--server: {url} is plain http; use https (or --allow-http on a trusted loopback)")


def _tls(url: str, ca: Path | None) -> Any:
    """The TLS context for an https ``url`` (verified against ``ca``, else the system CAs); None for http."""
    import ssl

    from edgefleet.errors import ConfigError

    if not url.startswith("https"):
        return None
    try:
        return ssl.create_default_context(cafile=str(ca) if ca else None)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"--ca: cannot use {ca}: {e}") from e


def _trust_anchor(token: str, image_root: Path | None, pin_option: str = "--token") -> tuple[str, Any]:
    """The server's token and the image root pin the device will trust: the token's pin, or the
    fingerprint of the ``--image-root`` file (validly self-signed; it must agree with a pin the token
    also carries). Raises ConfigError/TrustError naming the option before anything is sent."""
    from edgefleet.agent.updater.bootstrap import MAX_ROOT_BYTES, check_root_file
    from edgefleet.errors import ConfigError
    from edgefleet.tufmeta import fingerprint
    from edgefleet.tufmeta.pin import RootPin, split_pin

    try:
        server_token, pin = split_pin(token)
    except ConfigError as e:
        if pin_option == "--token":
            raise
        raise ConfigError(f"--pin: {token[2:][:100]!r} is not N.SHA256 (root version, sha256 of its canonical "
                          "JSON, as `edgefleet keys show` prints them)") from e
    if image_root is not None:
        try:
            with image_root.open("rb") as f:
                data = f.read(MAX_ROOT_BYTES + 1)
        except OSError as e:
            raise ConfigError(f"--image-root: cannot read {image_root}: {e.strerror or e}") from e
        if len(data) > MAX_ROOT_BYTES:
            raise ConfigError(f"--image-root: {image_root} is larger than {MAX_ROOT_BYTES} bytes; not a root file")
        md = check_root_file(data, f"--image-root {image_root}")
        given = RootPin(md.signed.version, fingerprint(data))
        if pin is not None and pin != given:
            raise ConfigError(f"--image-root: {image_root} is root {given.version} ({given.fingerprint}), but the "
                              f"token pins root {pin.version} ({pin.fingerprint}); give the root the operator pinned")
        pin = given
    if pin is None:
        raise ConfigError("token: the token carries no image root pin: make it with `edgefleet device enroll-token "
                          "--keys DIR` (it appends .N.SHA256), or give --image-root FILE")
    return server_token, pin


def _roots_json(roots: Any) -> dict[str, Any]:
    return {"image_root": {"version": roots.image_version, "fingerprint": roots.image_fingerprint},
            "director_root": {"version": roots.director_version}}


WAIT_FOR_SERVER = 10.0  # seconds a refused connection is retried: a server that is still starting


def _post_waiting(request: Any, context: Any) -> Any:
    """POST ``request`` and parse its JSON answer, retrying a refused connection (nothing listens yet)
    for :data:`WAIT_FOR_SERVER` seconds, as the operator commands do. Raises urllib's errors."""
    import time
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + WAIT_FOR_SERVER
    pause = 0.1
    while True:
        try:
            with urllib.request.urlopen(request, timeout=30, context=context) as resp:
                return json.loads(resp.read())
        except urllib.error.URLError as e:
            refused = isinstance(getattr(e, "reason", None), ConnectionRefusedError)
            if not refused or time.monotonic() + pause >= deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 1.0)


def _private_dir(state_dir: Path, identity: Path) -> None:
    """Make STATE_DIR/identity owner-only (0700) whatever the umask and whatever mode it had, and
    STATE_DIR too when this creates it. Raises ConfigError when that is not possible."""
    import os

    from edgefleet.errors import ConfigError

    try:
        if not state_dir.exists():
            state_dir.mkdir(parents=True, mode=0o700)
            os.chmod(state_dir, 0o700)
        identity.mkdir(exist_ok=True, mode=0o700)
        os.chmod(identity, 0o700)
    except OSError as e:
        raise ConfigError(f"--state-dir: cannot make {e.filename or identity} private: {e.strerror or e}") from e


def _register_hardware() -> None:
    from edgefleet.cli.hardware import hardware

    app.command("hardware", help="Show the detected hardware profile and why.")(hardware)


_register_hardware()


def _register_status() -> None:
    from edgefleet.cli.agent_status import status

    app.command("status")(status)


_register_status()
