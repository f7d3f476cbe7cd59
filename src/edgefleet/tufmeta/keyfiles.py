"""Private key files: ed25519 signers written 0600 into a 0700 folder whatever the umask, and read back.

Used by the operator's ``edgefleet keys`` (offline root and release keys) and by ``server init`` (the
online snapshot, timestamp and director keys). A private key file never leaves the machine it was
made on.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner, SSlibKey  # type: ignore[attr-defined]

from edgefleet.durable import atomic_write_bytes
from edgefleet.errors import ConfigError

__all__ = ["new_signer", "private_folder", "read_signer", "write_signer"]


def new_signer() -> CryptoSigner:
    """A fresh ed25519 key pair."""
    return CryptoSigner.generate_ed25519()


def private_folder(path: Path) -> None:
    """Create ``path`` (and parents) and make it exactly 0700, whatever the umask. Raises ConfigError
    when it cannot (not a folder, not ours)."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        if stat.S_IMODE(path.stat().st_mode) != 0o700:
            os.chmod(path, 0o700)
    except OSError as e:
        raise ConfigError(f"{path}: cannot make a private folder: {e.strerror or e}") from e


def write_signer(path: Path, signer: CryptoSigner) -> None:
    """Write the signer's private key (PKCS#8 PEM) to ``path``: atomically, mode 0600, in a 0700 folder.
    Refuses to replace an existing file. Raises ConfigError."""
    private_folder(path.parent)
    if path.exists():
        raise ConfigError(f"{path}: a key file already exists; refusing to replace it")
    try:
        atomic_write_bytes(path, signer.private_bytes, mode=0o600)
    except OSError as e:
        raise ConfigError(f"{path}: cannot write the key: {e.strerror or e}") from e


def read_signer(path: Path) -> CryptoSigner:
    """The ed25519 signer in ``path``. Raises ConfigError when it is missing, unreadable, readable by
    others, or not an ed25519 private key."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: no such key file") from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the key: {e.strerror or e}") from e
    if mode & 0o077:
        raise ConfigError(f"{path}: the private key is readable by others (mode {mode:o}); chmod 600 it")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path}: not a PEM private key: {e}") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: expected an ed25519 private key")
    return CryptoSigner(key, SSlibKey.from_crypto(key.public_key()))
