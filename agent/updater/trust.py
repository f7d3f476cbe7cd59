"""What the device trusts: the image and director repositories, refreshed with python-tuf's ngclient.

Both roots come from enrollment (``STATE/identity/image-root.json``, ``director-root.json``; see
:mod:`.bootstrap`); ngclient keeps the metadata it verified in ``STATE/tuf/image/`` and
``STATE/tuf/director/`` (root history included), and a refresh walks root rotations, checks versions
only grow (rollback, replay), expiries (freeze), snapshot against targets (mix-and-match) and lengths
(endless data). A target is installed only when both repositories list it with the same length and
hashes (:func:`resolve`): the director (online keys, per device) says *what this device runs*; the image
repository (the release key, offline) says *it is a model an operator signed and still lists*.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefleet.agent.updater.errors import Refused, Transient

__all__ = ["Assigned", "Trusted", "refresh", "resolve", "trust_summary"]

log = logging.getLogger(__name__)

IMAGE_ROOT = "image-root.json"
DIRECTOR_ROOT = "director-root.json"


@dataclass(frozen=True)
class Assigned:
    """A target the device must run: both repositories agree on it."""

    name: str
    version: str
    target: str
    sha256: str
    length: int
    role: str


@dataclass
class Trusted:
    """The two refreshed repositories (ngclient Updaters, after ``refresh()``)."""

    image: Any
    director: Any
    device_id: str

    def director_targets(self) -> dict[str, Any]:
        return dict(self.director._trusted_set.targets.targets)  # top-level: the director delegates nothing

    def timestamp_version(self) -> int:
        return int(self.director._trusted_set.timestamp.version)


def _root(state_dir: Path, name: str) -> bytes:
    path = state_dir / "identity" / name
    try:
        return path.read_bytes()
    except FileNotFoundError as e:
        raise Refused(f"{path}: no trusted root; enroll with a pinned token or run `edgefleet agent trust`",
                      "no_trusted_root") from e


def refresh(state_dir: Path, server_url: str, device_id: str, fetcher: Any) -> Trusted:
    """Refresh both repositories. Raises Transient for a download failure (network, 5xx) and Refused
    with reason ``metadata`` for metadata that fails verification (expired, rolled back, badly signed,
    inconsistent): the agent keeps what it trusts, keeps serving, and reports it."""
    from tuf.api import exceptions as tex
    from tuf.ngclient import Updater, UpdaterConfig  # type: ignore[attr-defined]

    base = server_url.rstrip("/")
    config = UpdaterConfig(prefix_targets_with_hash=True)
    out: list[Any] = []
    for repo, url, root in (("image", f"{base}/tuf/image/", IMAGE_ROOT),
                            ("director", f"{base}/tuf/director/{device_id}/", DIRECTOR_ROOT)):
        folder = state_dir / "tuf" / repo
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            up = Updater(str(folder), url, target_base_url=f"{base}/tuf/image/targets/", fetcher=fetcher,
                         config=config, bootstrap=_root(state_dir, root))
            up.refresh()
        except tex.DownloadHTTPError as e:
            if e.status_code in (401, 403):
                raise Refused(f"{repo} metadata: the server refused ({e.status_code}): {e}",
                              "metadata_forbidden") from e
            raise Transient(f"{repo} metadata: {e}", "metadata_download") from e
        except tex.DownloadError as e:
            if isinstance(e, tex.DownloadLengthMismatchError):
                raise Refused(f"{repo} metadata: {e}", "metadata_too_long") from e
            raise Transient(f"{repo} metadata: {type(e).__name__}: {e}", "metadata_download") from e
        except tex.ExpiredMetadataError as e:
            raise Refused(f"{repo} metadata: {e} (a freeze, or the server stopped signing)", "metadata_expired") from e
        except tex.BadVersionNumberError as e:
            raise Refused(f"{repo} metadata: {e} (a rollback or replay)", "metadata_rollback") from e
        except tex.RepositoryError as e:
            raise Refused(f"{repo} metadata: {type(e).__name__}: {e}", "metadata_invalid") from e
        except Transient:
            raise
        except Refused:
            raise
        except OSError as e:
            raise Transient(f"{repo} metadata: {folder}: {e.strerror or e}", "io_error") from e
        out.append(up)
    return Trusted(out[0], out[1], device_id)


def resolve(trusted: Trusted) -> tuple[list[Assigned], list[tuple[str, Refused]]]:
    """The director's targets that the image repository lists with the same length and hashes, and
    for each one it does not, the target path and why it is refused."""
    from tuf.api import exceptions as tex

    ok: list[Assigned] = []
    bad: list[tuple[str, Refused]] = []
    for path, info in sorted(trusted.director_targets().items()):
        custom = (info.unrecognized_fields or {}).get("custom", {}) if hasattr(info, "unrecognized_fields") else {}
        name = custom.get("model") if isinstance(custom, dict) else None
        role = custom.get("role", "serve") if isinstance(custom, dict) else "serve"
        device = custom.get("device") if isinstance(custom, dict) else None
        sha = info.hashes.get("sha256")
        if device is not None and device != trusted.device_id:
            bad.append((path, Refused(f"director target {path}: assigned to {device}, not this device",
                                      "other_device")))
            continue
        if not isinstance(name, str) or not path.startswith(f"{name}-") or not path.endswith(".efb") or sha is None:
            bad.append((path, Refused(f"director target {path}: no model name, or not NAME-VERSION.efb with a sha256",
                                      "bad_assignment")))
            continue
        try:
            image = trusted.image.get_targetinfo(path)
        except tex.RepositoryError as e:
            bad.append((path, Refused(f"image metadata for {path}: {e}", "metadata_invalid")))
            continue
        if image is None:
            bad.append((path, Refused(f"{path}: assigned by the director, but the image repository does not list it "
                                      "(never signed by the release key, or withdrawn)", "not_in_image")))
            continue
        if image.length != info.length or image.hashes != info.hashes:
            bad.append((path, Refused(f"{path}: the director says {info.length} bytes {info.hashes}, the image "
                                      f"repository {image.length} bytes {image.hashes}", "director_image_mismatch")))
            continue
        version = path[len(name) + 1 : -len(".efb")]
        ok.append(Assigned(name, version, path, sha, int(info.length), str(role)))
    return ok, bad


def trust_summary(state_dir: Path) -> dict[str, Any]:
    """Versions and expiries of the metadata this device trusts (read from ``STATE/tuf/``, no network)."""
    import json

    out: dict[str, Any] = {}
    for repo in ("image", "director"):
        info: dict[str, Any] = {}
        for role in ("root", "timestamp", "snapshot", "targets"):
            path = state_dir / "tuf" / repo / f"{role}.json"
            try:
                signed = json.loads(path.read_bytes())["signed"]
                info[role] = {"version": signed["version"], "expires": signed["expires"]}
            except (OSError, ValueError, KeyError, TypeError):
                info[role] = None
        out[repo] = info
    return out
