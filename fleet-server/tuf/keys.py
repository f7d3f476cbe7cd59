"""The server's online TUF keys: private ed25519 files under ``DATA/tuf/`` (folder 0700, files 0600).

``snapshot`` and ``timestamp`` sign the image repository's online roles; ``director-targets`` will sign
the per-device director repositories. The release (targets) and root keys are the operator's and never
reach the server: with only these keys, an attacker holding the whole data folder can freeze or
re-order what the server serves, never make a device accept a bundle no operator signed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from securesystemslib.signer import CryptoSigner  # type: ignore[attr-defined]

from edgefleet.errors import ConfigError
from edgefleet.tufmeta.keyfiles import new_signer, private_folder, read_signer, write_signer

__all__ = ["ONLINE_KEY_NAMES", "OnlineKeys", "create_online_keys", "has_online_keys", "load_online_keys"]

ONLINE_KEY_NAMES = ("snapshot", "timestamp", "director-targets")
KEY_DIR = "tuf"


def _path(data_dir: Path, name: str) -> Path:
    return data_dir / KEY_DIR / f"{name}.key"


@dataclass(frozen=True)
class OnlineKeys:
    snapshot: CryptoSigner
    timestamp: CryptoSigner
    director_targets: CryptoSigner

    def public(self) -> dict[str, dict[str, object]]:
        """Public halves by role name, as TUF key dicts with their keyid."""
        return {
            name: {"keyid": s.public_key.keyid, **s.public_key.to_dict()}
            for name, s in (("snapshot", self.snapshot), ("timestamp", self.timestamp),
                            ("director-targets", self.director_targets))
        }


def has_online_keys(data_dir: Path) -> bool:
    return all(_path(data_dir, n).exists() for n in ONLINE_KEY_NAMES)


def create_online_keys(data_dir: Path) -> OnlineKeys:
    """Make the missing online keys under ``DATA/tuf/`` (0600 files in a 0700 folder, whatever the umask)
    and return all of them. Raises ConfigError when a file cannot be written or read."""
    private_folder(data_dir / KEY_DIR)
    for name in ONLINE_KEY_NAMES:
        if not _path(data_dir, name).exists():
            write_signer(_path(data_dir, name), new_signer())
    return load_online_keys(data_dir)


def load_online_keys(data_dir: Path) -> OnlineKeys:
    """The online keys under ``DATA/tuf/``. Raises ConfigError when one is missing (a server initialised
    before TUF: run ``edgefleet server init`` on its folder again), unreadable or readable by others."""
    if not has_online_keys(data_dir):
        raise ConfigError(
            f"{data_dir / KEY_DIR}: this server has no online TUF keys; run `edgefleet server init --data "
            f"{data_dir}` again to add them")
    s, t, d = (read_signer(_path(data_dir, n)) for n in ONLINE_KEY_NAMES)
    return OnlineKeys(s, t, d)
