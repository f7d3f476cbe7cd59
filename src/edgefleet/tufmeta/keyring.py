"""The operator's keyring: the offline root keys and the release (targets) key in one folder, and the
image repository's root history as the operator signed it.

Layout of ``--keys DIR`` (the folder and ``private/`` are 0700, private files 0600, whatever the umask)::

    keys.json               public: key ids and public keys by role, root threshold, server and its online keys
    private/KEYID.key       one ed25519 private key per file (PKCS#8 PEM); never sent anywhere
    image/N.root.json       every root version this keyring signed, canonical JSON (sha256 = fingerprint)
    director/N.root.json    the director repositories' root (shared by every device), canonical JSON

Signing happens here; HTTP does not (the CLI does that). Raises ConfigError for a keyring that is
missing, malformed or inconsistent, naming the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner, Key, SSlibKey  # type: ignore[attr-defined]
from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp  # type: ignore[attr-defined]

from edgefleet.durable import atomic_write_bytes
from edgefleet.errors import ConfigError
from edgefleet.tufmeta.keyfiles import new_signer, private_folder, read_signer, write_signer
from edgefleet.tufmeta.roles import EXPIRY, TrustError, canonical_bytes, expiry_from, fingerprint, parse_metadata

__all__ = ["DIRECTOR_TARGETS", "KEYS_FILE", "OFFLINE_ROLES", "Keyring"]

KEYS_FILE = "keys.json"
DIRECTOR_TARGETS = "director-targets"  # the server's online key that signs every device's director targets
OFFLINE_ROLES = (Root.type, Targets.type)  # the keyring's own; snapshot and timestamp are the server's
_SCHEMA = 1
MAX_ROOT_KEYS = 16


@dataclass
class Keyring:
    """The keyring in ``folder``. ``roles`` maps root/targets to their key ids; ``keys`` holds public key
    dicts by key id; ``online`` the server's public online keys (role -> TUF key dict with ``keyid``)."""

    folder: Path
    root_threshold: int
    roles: dict[str, list[str]]
    keys: dict[str, dict[str, Any]]
    server: str | None = None
    online: dict[str, dict[str, Any]] = field(default_factory=dict)

    # files -----------------------------------------------------------------------------------------

    @classmethod
    def create(cls, folder: Path, root_keys: int, root_threshold: int) -> Keyring:
        """Make ``root_keys`` root keys (threshold ``root_threshold``) and one release key in ``folder``.
        Raises ConfigError for bad numbers or a folder that already holds a keyring."""
        if not 1 <= root_keys <= MAX_ROOT_KEYS:
            raise ConfigError(f"--root-keys: {root_keys}; expected 1 to {MAX_ROOT_KEYS}")
        if not 1 <= root_threshold <= root_keys:
            raise ConfigError(f"--root-threshold: {root_threshold}; expected 1 to --root-keys ({root_keys})")
        if (folder / KEYS_FILE).exists():
            raise ConfigError(f"{folder / KEYS_FILE}: a keyring already exists here")
        private_folder(folder)
        ring = cls(folder, root_threshold, {Root.type: [], Targets.type: []}, {})
        for _ in range(root_keys):
            ring.new_key(Root.type)
        ring.new_key(Targets.type)
        ring.save()
        return ring

    @classmethod
    def load(cls, folder: Path) -> Keyring:
        """The keyring in ``folder``. Raises ConfigError when there is none or it is malformed."""
        path = folder / KEYS_FILE
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise ConfigError(f"{folder}: no keyring here; make one with `edgefleet keys init --keys {folder}`") from e
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: cannot read the keyring: {e}") from e
        try:
            if raw["schema"] != _SCHEMA:
                raise ConfigError(f"{path}: schema {raw['schema']!r}; this edgefleet reads schema {_SCHEMA}")
            ring = cls(folder, int(raw["root_threshold"]), {r: list(raw["roles"][r]) for r in OFFLINE_ROLES},
                       dict(raw["keys"]), raw.get("server"), dict(raw.get("online", {})))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{path}: malformed keyring ({type(e).__name__}: {e})") from e
        private_folder(folder)  # tighten a folder copied with a loose mode
        return ring

    def save(self) -> None:
        data = {"schema": _SCHEMA, "root_threshold": self.root_threshold, "roles": self.roles, "keys": self.keys,
                "server": self.server, "online": self.online}
        atomic_write_bytes(self.folder / KEYS_FILE, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode(),
                           mode=0o600)

    def _private(self, keyid: str) -> Path:
        return self.folder / "private" / f"{keyid}.key"

    def new_key(self, role: str) -> str:
        """Make a key for ``role`` (its private file 0600), record it, and return its key id. Not saved."""
        signer = new_signer()
        keyid = signer.public_key.keyid
        private_folder(self.folder / "private")
        write_signer(self._private(keyid), signer)
        self.keys[keyid] = signer.public_key.to_dict()
        self.roles[role].append(keyid)
        return keyid

    def retire(self, keyid: str) -> None:
        """Forget a key and delete its private file (after a rotation no root trusts it)."""
        for ids in self.roles.values():
            if keyid in ids:
                ids.remove(keyid)
        self.keys.pop(keyid, None)
        self._private(keyid).unlink(missing_ok=True)

    def public_key(self, keyid: str) -> Key:
        return SSlibKey.from_dict(keyid, dict(self.keys[keyid]))

    def signer(self, keyid: str) -> CryptoSigner:
        """The signer of ``keyid``. Raises ConfigError when its file is missing or holds another key."""
        signer = read_signer(self._private(keyid))
        if signer.public_key.keyid != keyid:
            raise ConfigError(f"{self._private(keyid)}: holds key {signer.public_key.keyid}, not {keyid}")
        return signer

    # roots -----------------------------------------------------------------------------------------

    def root_file(self, version: int) -> Path:
        return self.folder / "image" / f"{version}.root.json"

    def latest_root(self) -> Metadata[Root] | None:
        """The newest root this keyring signed (None before ``keys init --server``)."""
        versions = _versions(self.folder / "image")
        return self.root(versions[-1]) if versions else None

    def root(self, version: int) -> Metadata[Root] | None:
        """Root ``version`` as this keyring signed it (None when it has no such file)."""
        return _read_root(self.root_file(version))

    def save_root(self, md: Metadata[Root]) -> Path:
        """Write ``md`` as ``image/N.root.json`` (canonical JSON, so its sha256 is the fingerprint)."""
        return _write_root(self.root_file(md.signed.version), md)

    def fingerprint(self) -> str | None:
        md = self.latest_root()
        return None if md is None else fingerprint(canonical_bytes(md))

    def build_root(self, now: datetime, previous: Root | None = None) -> Root:
        """Root ``previous.version + 1`` (1 without ``previous``) naming this keyring's root and targets keys
        and the server's online snapshot and timestamp keys, expiring a year from ``now``."""
        missing = [r for r in (Snapshot.type, Timestamp.type) if r not in self.online]
        if missing:
            raise ConfigError(f"{self.folder / KEYS_FILE}: no online {', '.join(missing)} key of the server; run "
                              "`edgefleet keys init --server URL`")
        root = Root(version=1 if previous is None else previous.version + 1,
                    expires=expiry_from(now, Root.type), consistent_snapshot=True)
        for role in OFFLINE_ROLES:
            for keyid in self.roles[role]:
                root.add_key(self.public_key(keyid), role)
        for role in (Snapshot.type, Timestamp.type):
            key = dict(self.online[role])
            root.add_key(SSlibKey.from_dict(key.pop("keyid"), key), role)
        root.roles[Root.type].threshold = self.root_threshold
        return root

    def director_root_file(self, version: int) -> Path:
        return self.folder / "director" / f"{version}.root.json"

    def latest_director_root(self) -> Metadata[Root] | None:
        """The newest director root this keyring signed (None before ``keys init --server``)."""
        versions = _versions(self.folder / "director")
        return self.director_root(versions[-1]) if versions else None

    def director_root(self, version: int) -> Metadata[Root] | None:
        """Director root ``version`` as this keyring signed it (None when it has no such file)."""
        return _read_root(self.director_root_file(version))

    def save_director_root(self, md: Metadata[Root]) -> Path:
        """Write ``md`` as ``director/N.root.json`` (canonical JSON)."""
        return _write_root(self.director_root_file(md.signed.version), md)

    def build_director_root(self, now: datetime, previous: Root | None = None) -> Root:
        """The director root ``previous.version + 1`` (1 without ``previous``): this keyring's root keys,
        and the server's online director-targets, snapshot and timestamp keys, expiring a year from
        ``now``. Raises ConfigError when the keyring has not fetched the server's online keys."""
        missing = [r for r in (DIRECTOR_TARGETS, Snapshot.type, Timestamp.type) if r not in self.online]
        if missing:
            raise ConfigError(f"{self.folder / KEYS_FILE}: no online {', '.join(missing)} key of the server; run "
                              "`edgefleet keys init --server URL`")
        root = Root(version=1 if previous is None else previous.version + 1,
                    expires=expiry_from(now, Root.type), consistent_snapshot=True)
        for keyid in self.roles[Root.type]:
            root.add_key(self.public_key(keyid), Root.type)
        for role, online in ((Targets.type, DIRECTOR_TARGETS), (Snapshot.type, Snapshot.type),
                             (Timestamp.type, Timestamp.type)):
            key = dict(self.online[online])
            root.add_key(SSlibKey.from_dict(key.pop("keyid"), key), role)
        root.roles[Root.type].threshold = self.root_threshold
        return root

    def sign_root(self, root: Root, keyids: list[str]) -> Metadata[Root]:
        """``root`` signed by every key in ``keyids`` (old and new root keys on a rotation)."""
        md = Metadata(root)
        for keyid in dict.fromkeys(keyids):
            md.sign(self.signer(keyid), append=True)
        return md

    def release_signers(self) -> list[CryptoSigner]:
        """The release (targets) key signers, read now: a command that will sign targets calls this
        before it changes anything on the server, so a missing or loose key file fails first. Raises
        ConfigError naming the file, or when this keyring holds no release key."""
        if not self.roles[Targets.type]:
            raise ConfigError(f"{self.folder / KEYS_FILE}: no release (targets) key in this keyring")
        return [self.signer(keyid) for keyid in self.roles[Targets.type]]

    def sign_targets(self, targets: Targets) -> Metadata[Targets]:
        """``targets`` signed with the release key(s)."""
        md = Metadata(targets)
        for signer in self.release_signers():
            md.sign(signer, append=True)
        return md

    def describe(self) -> dict[str, Any]:
        """What ``keys show`` prints: key ids and thresholds by role, fingerprint and expiries."""
        md = self.latest_root()
        out: dict[str, Any] = {"keys_dir": str(self.folder.resolve()), "server": self.server}
        roles: dict[str, Any] = {}
        if md is None:
            roles = {Root.type: {"keyids": self.roles[Root.type], "threshold": self.root_threshold},
                     Targets.type: {"keyids": self.roles[Targets.type], "threshold": 1}}
            out.update(root_version=None, fingerprint=None, root_expires=None)
        else:
            root = md.signed
            for name, role in root.roles.items():
                roles[name] = {"keyids": role.keyids, "threshold": role.threshold,
                               "where": "offline (this keyring)" if name in OFFLINE_ROLES else "online (the server)"}
            out.update(root_version=root.version, fingerprint=self.fingerprint(), root_expires=root.expires.isoformat(),
                       root_file=str(self.root_file(root.version).resolve()))
        director = _versions(self.folder / "director")
        out["director_root_file"] = str(self.director_root_file(director[-1]).resolve()) if director else None
        out["roles"] = roles
        out["expiry_days"] = {r: EXPIRY[r].days for r in EXPIRY}
        return out


def _versions(folder: Path) -> list[int]:
    """The versions of the ``N.root.json`` files in ``folder``, ascending (pending files are not counted)."""
    if not folder.is_dir():
        return []
    return sorted(int(p.name.split(".")[0]) for p in folder.glob("*.root.json") if p.name.split(".")[0].isdigit())


def _read_root(path: Path) -> Metadata[Root] | None:
    """A root file this keyring wrote (None when there is none). Raises ConfigError naming the file."""
    if not path.is_file():
        return None
    try:
        return parse_metadata(path.read_bytes(), Root.type, Root, str(path))
    except TrustError as e:
        raise ConfigError(str(e)) from e


def _write_root(path: Path, md: Metadata[Root]) -> Path:
    """Write ``md`` to ``path`` as canonical JSON (its sha256 is the fingerprint), its folder private."""
    private_folder(path.parent)
    atomic_write_bytes(path, canonical_bytes(md), mode=0o644)
    return path
