"""Trust at enrollment: the two TUF roots a device starts from, and where they go on disk.

A device must learn whom to trust from the operator, never from the server it is learning to distrust:

- the **image root** is the one the enrollment token pins (``TOKEN.N.SHA256``: root version N and the
  sha256 of its canonical JSON, appended by the operator's CLI from its own keyring; see
  :mod:`edgefleet.tufmeta.pin`), or a root file the operator hands to ``agent enroll --image-root``. The
  server's copy of root N is fetched and accepted only when its fingerprint is the pinned one and a
  threshold of its own root keys signs it (:func:`fetch_pinned_root`);
- the **director root** (one for every device, signed by the same offline root keys) is accepted only
  when a threshold of the image root's root keys signs it and it names exactly those root keys
  (:func:`check_director_root`). Nothing the server signs online can pass either check.

Both are written under ``STATE/identity/`` and seeded as ``root.json`` into the metadata folders
ngclient refreshes from (``STATE/tuf/image/``, ``STATE/tuf/director/``) by :func:`install_roots`. Newer
roots (rotations) are ngclient's to walk at refresh time, each verified by the one before.

The checks are pure (bytes in, metadata or :class:`~edgefleet.tufmeta.TrustError` out); the fetching is
a ``fetch(path) -> bytes | None`` callable (None: 404), so tests and the CLI plug in what they have.
:func:`fetch_roots` is the whole sequence over HTTP with the device's own key (challenge/token auth).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuf.api.metadata import Metadata, Root  # type: ignore[attr-defined]

from edgefleet.durable import atomic_write_bytes, fsync_dir
from edgefleet.errors import ConfigError
from edgefleet.tufmeta import TrustError, canonical_bytes, fingerprint, parse_metadata
from edgefleet.tufmeta.pin import RootPin

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

__all__ = [
    "DIRECTOR_ROOT_FILE",
    "IMAGE_ROOT_FILE",
    "MAX_DIRECTOR_ROOTS",
    "MAX_ROOT_BYTES",
    "Fetch",
    "Roots",
    "check_director_root",
    "check_root_file",
    "fetch_director_root",
    "fetch_pinned_root",
    "fetch_roots",
    "has_roots",
    "install_roots",
]

Fetch = Callable[[str], bytes | None]  # GET a server path: its body, None for a 404; raises ConfigError
IMAGE_ROOT_FILE = "image-root.json"  # under STATE/identity/
DIRECTOR_ROOT_FILE = "director-root.json"
MAX_ROOT_BYTES = 512_000  # bytes: ngclient's own limit for a root file (UpdaterConfig.root_max_length)
MAX_DIRECTOR_ROOTS = 256  # director root versions looked at (ngclient's max_root_rotations)
TIMEOUT = 30.0  # seconds per HTTP request


@dataclass(frozen=True)
class Roots:
    """The two roots a device trusts, as canonical JSON (their sha256 is their fingerprint)."""

    image: bytes
    director: bytes

    @property
    def image_version(self) -> int:
        return int(json.loads(self.image)["signed"]["version"])

    @property
    def image_fingerprint(self) -> str:
        return fingerprint(self.image)

    @property
    def director_version(self) -> int:
        return int(json.loads(self.director)["signed"]["version"])


# checks (pure) ------------------------------------------------------------------------------------


def check_root_file(data: bytes, what: str) -> Metadata[Root]:
    """``data`` as root metadata signed by a threshold of its own root keys (what a first root must be).
    Raises TrustError naming ``what`` when it is not root metadata or not self-signed."""
    md = parse_metadata(data, Root.type, Root, what)
    result = md.signed.get_verification_result(Root.type, md.signed_bytes, md.signatures)
    if not result.verified:
        raise TrustError(f"{what}: signatures: root {md.signed.version} is signed by {len(result.signed)} of its "
                         f"own root keys; the threshold is {result.threshold}", "signatures")
    return md


def fetch_pinned_root(fetch: Fetch, pin: RootPin) -> bytes:
    """GET ``/tuf/image/{N}.root.json`` for the pin's N and return it as canonical JSON, once its
    fingerprint is the pinned one and it is validly self-signed. Raises TrustError naming what differs
    (``fingerprint``, ``signed.version``, ``signatures``), ConfigError when it cannot be fetched."""
    path = f"/tuf/image/{pin.version}.root.json"
    data = fetch(path)
    if data is None:
        raise TrustError(f"{path}: the server has no image root {pin.version}, which the token pins; is this the "
                         "server the operator's keys publish to?", "image_root")
    md = parse_metadata(data, Root.type, Root, path)
    if md.signed.version != pin.version:
        raise TrustError(f"{path}: signed.version is {md.signed.version}, the pin names root {pin.version}",
                         "signed.version")
    served = fingerprint(data)
    if served != pin.fingerprint:
        raise TrustError(f"{path}: fingerprint {served} is not the pinned {pin.fingerprint}: this server does not "
                         "serve the operator's image root", "fingerprint")
    return canonical_bytes(check_root_file(data, path))


def check_director_root(director_root_bytes: bytes, image_root: Metadata[Root], what: str = "director root"
                        ) -> Metadata[Root]:
    """Accept the director root only when a threshold of ``image_root``'s root keys signs it and its root
    role names exactly those keys with the same threshold (the operator's offline keys govern both
    repositories). Raises TrustError naming ``what`` and the field (``signatures``, ``signed.roles.root``)."""
    md = parse_metadata(director_root_bytes, Root.type, Root, what)
    image = image_root.signed
    result = image.get_verification_result(Root.type, md.signed_bytes, md.signatures)
    if not result.verified:
        raise TrustError(
            f"{what}: signatures: director root {md.signed.version} is signed by {len(result.signed)} of image root "
            f"{image.version}'s root keys; the threshold is {result.threshold}", "signatures")
    mine, theirs = md.signed.roles[Root.type], image.roles[Root.type]
    same_keys = set(mine.keyids) == set(theirs.keyids) and all(
        md.signed.keys[k].to_dict() == image.keys[k].to_dict() for k in theirs.keyids)
    if not same_keys or mine.threshold != theirs.threshold:
        raise TrustError(
            f"{what}: signed.roles.root: director root {md.signed.version} names root keys {sorted(mine.keyids)} "
            f"(threshold {mine.threshold}), not image root {image.version}'s {sorted(theirs.keyids)} (threshold "
            f"{theirs.threshold})", "signed.roles.root")
    return md


def fetch_director_root(fetch: Fetch, device_id: str, image_root: Metadata[Root]) -> bytes:
    """The newest of the device's director roots (``/tuf/director/{id}/{N}.root.json``, N = 1, 2, ... up
    to the first 404) that :func:`check_director_root` accepts under ``image_root``, as canonical JSON:
    after a root key rotation, the director root of the pinned image root's keys. Raises TrustError
    (the reason the newest one was refused) when none is accepted."""
    accepted: bytes | None = None
    refusal: TrustError | None = None
    for version in range(1, MAX_DIRECTOR_ROOTS + 1):
        path = f"/tuf/director/{device_id}/{version}.root.json"
        data = fetch(path)
        if data is None:
            break
        try:
            md = check_director_root(data, image_root, path)
        except TrustError as e:
            refusal = e
            continue
        if md.signed.version != version:
            raise TrustError(f"{path}: signed.version is {md.signed.version}", "signed.version")
        accepted, refusal = canonical_bytes(md), None
    if accepted is not None:
        return accepted
    if refusal is not None:
        raise refusal
    raise TrustError(f"/tuf/director/{device_id}/1.root.json: the server has no director root yet (the "
                     "operator runs `edgefleet keys init --server URL`)", "director_root")


# disk ---------------------------------------------------------------------------------------------


def has_roots(state_dir: Path) -> bool:
    """Whether ``state_dir`` holds both enrollment roots."""
    identity = state_dir / "identity"
    return (identity / IMAGE_ROOT_FILE).is_file() and (identity / DIRECTOR_ROOT_FILE).is_file()


def install_roots(state_dir: Path, image_root_bytes: bytes, director_root_bytes: bytes) -> None:
    """Write ``identity/image-root.json`` and ``identity/director-root.json`` (0600 like everything in the
    0700 ``identity/``, whatever the umask), and seed ngclient's metadata folders ``tuf/image/`` and
    ``tuf/director/`` with them as ``root.json``, each atomically (edgefleet.durable). Metadata trusted
    under an earlier identity (a re-enrollment) is removed first: it was verified against other roots.
    Raises ConfigError naming the folder that cannot be written."""
    identity = state_dir / "identity"
    try:
        identity.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(identity, 0o700)
        atomic_write_bytes(identity / IMAGE_ROOT_FILE, image_root_bytes, mode=0o600)
        atomic_write_bytes(identity / DIRECTOR_ROOT_FILE, director_root_bytes, mode=0o600)
        tuf = state_dir / "tuf"
        for name, data in (("image", image_root_bytes), ("director", director_root_bytes)):
            folder = tuf / name
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True, mode=0o700)
            atomic_write_bytes(folder / "root.json", data, mode=0o600)
        fsync_dir(tuf)
    except OSError as e:
        raise ConfigError(f"--state-dir: cannot write the trust roots under {e.filename or state_dir}: "
                          f"{e.strerror or e}") from e


# HTTP ---------------------------------------------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are refused (an HTTPError): the device's token goes to the server it enrolled with only."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class _DeviceReader:
    """GETs on the fleet server as the device: an access token by challenge/token (the device signs
    the challenge with its key, ECDSA P-256 SHA-256), then Bearer. urllib only: enrollment must not
    pull in the updater's client. Bodies are bounded by :data:`MAX_ROOT_BYTES`."""

    def __init__(self, url: str, device_id: str, key: ec.EllipticCurvePrivateKey,
                 context: ssl.SSLContext | None) -> None:
        self.url, self.device_id, self.key = url.rstrip("/"), device_id, key
        handlers: list[Any] = [_NoRedirect()]
        if context is not None:
            handlers.append(urllib.request.HTTPSHandler(context=context))
        self._opener = urllib.request.build_opener(*handlers)
        self._token: str | None = None

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> bytes | None:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token}"
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with self._opener.open(request, timeout=TIMEOUT) as resp:
                out: bytes = resp.read(MAX_ROOT_BYTES + 1)
        except urllib.error.HTTPError as e:
            if e.code == 404 and method == "GET":
                return None
            try:
                reason = json.loads(e.read(4096) or b"{}").get("error", e.reason)
            except ValueError:
                reason = e.reason
            raise ConfigError(f"{method} {path}: the server refused: {e.code}: {reason}") from e
        except (urllib.error.URLError, OSError) as e:
            raise ConfigError(f"--server: cannot reach {self.url}: {getattr(e, 'reason', e)}") from e
        if len(out) > MAX_ROOT_BYTES:
            raise TrustError(f"{path}: longer than {MAX_ROOT_BYTES} bytes", "length")
        return out

    def _json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        raw = self._call("POST", path, body)
        try:
            out = json.loads(raw or b"")
            if not isinstance(out, dict):
                raise ValueError("not an object")
        except ValueError as e:
            raise ConfigError(f"POST {path}: the server answered with no JSON object ({e})") from e
        return out

    def authenticate(self) -> None:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        try:
            challenge = str(self._json("/api/v1/device-auth/challenge", {"device_id": self.device_id})["challenge"])
            signature = base64.b64encode(self.key.sign(challenge.encode(), ec.ECDSA(hashes.SHA256()))).decode()
            out = self._json("/api/v1/device-auth/token",
                             {"device_id": self.device_id, "challenge": challenge, "signature": signature})
            self._token = str(out["access_token"])
        except KeyError as e:
            raise ConfigError(f"{self.url}: device-auth answered without {e}") from e

    def get(self, path: str) -> bytes | None:
        if self._token is None:
            self.authenticate()
        return self._call("GET", path)


def fetch_roots(url: str, device_id: str, key: ec.EllipticCurvePrivateKey, pin: RootPin,
                context: ssl.SSLContext | None = None) -> Roots:
    """Authenticate as ``device_id`` with ``key`` and fetch both roots: image root N by ``pin``
    (:func:`fetch_pinned_root`), then the director root it accepts (:func:`fetch_director_root`).
    Nothing is written. Raises TrustError for a root that must not be trusted, ConfigError for a server
    that cannot be reached or refuses."""
    reader = _DeviceReader(url, device_id, key, context)
    image = fetch_pinned_root(reader.get, pin)
    director = fetch_director_root(reader.get, device_id, parse_metadata(image, Root.type, Root, "image root"))
    return Roots(image, director)
