"""Roles, expiries, fingerprints and the acceptance checks for uploaded root and targets metadata.

Pure functions over bytes and ``tuf.api.metadata`` objects: no I/O, no clock of their own (``now`` is
passed in), so the server, the operator's CLI and later the device agree on one definition.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta
from typing import Any, TypeVar

from securesystemslib.formats import encode_canonical
from tuf.api.metadata import (  # type: ignore[attr-defined]
    Metadata,
    Root,
    Signed,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization import DeserializationError

from edgefleet.errors import EdgefleetError

__all__ = [
    "EXPIRY",
    "ONLINE_ROLES",
    "TOP_ROLES",
    "TrustError",
    "bundle_target",
    "canonical_bytes",
    "check_root_update",
    "check_targets_update",
    "expiry_from",
    "fingerprint",
    "needs_resign",
    "parse_metadata",
    "target_path",
]

TOP_ROLES = (Root.type, Targets.type, Snapshot.type, Timestamp.type)
ONLINE_ROLES = (Snapshot.type, Timestamp.type)  # signed by the server; root and targets never are
# How long each role's metadata is valid. Devices may be offline for weeks: they keep serving on expired
# metadata (updates stop, serving never does) and catch up once they can fetch fresh metadata. The online
# roles are short but re-signed by the server once half their lifetime has passed.
EXPIRY: dict[str, timedelta] = {
    Root.type: timedelta(days=365),
    Targets.type: timedelta(days=90),
    Snapshot.type: timedelta(days=7),
    Timestamp.type: timedelta(days=1),
}
_CLASSES: dict[str, type[Signed]] = {Root.type: Root, Targets.type: Targets, Snapshot.type: Snapshot,
                                     Timestamp.type: Timestamp}
T = TypeVar("T", Root, Timestamp, Snapshot, Targets)  # as tuf.api.metadata.T


class TrustError(EdgefleetError):
    """Metadata that is malformed, wrongly signed, expired or out of order. ``field`` names what is
    wrong (``signed.version``, ``signatures``, ``signed.targets.NAME``...); ``conflict`` is True when the
    metadata is fine but not the next version (a client should fetch the current one and retry)."""

    def __init__(self, message: str, field: str, conflict: bool = False) -> None:
        super().__init__(message)
        self.field = field
        self.conflict = conflict


def parse_metadata(data: bytes, role: str, cls: type[T], what: str = "body") -> Metadata[T]:
    """Parse ``data`` as ``role`` metadata through tuf's Metadata API. Raises TrustError naming ``what``
    (or the field) when it is not JSON, not TUF metadata, or metadata of another role."""
    try:
        md = Metadata.from_bytes(data)
    except DeserializationError as e:
        cause = e.__cause__ or e
        raise TrustError(f"{what}: not valid TUF {role} metadata: {_reason(cause)}", what) from e
    if md.signed.type != role or not isinstance(md.signed, cls):
        raise TrustError(f"{what}: signed._type is {md.signed.type!r}, expected {role!r}", "signed._type")
    return md


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def canonical_bytes(md: Metadata[Any]) -> bytes:
    """The metadata (signed part and signatures) as canonical JSON: the form edgefleet writes root files
    in, so the file's sha256 is the fingerprint."""
    text = encode_canonical(md.to_dict())
    assert text is not None  # None only when it writes to a callback
    return text.encode()


def fingerprint(root_file: bytes) -> str:
    """The root's fingerprint: sha256 (hex) of its canonical JSON, whatever whitespace the file has.
    Raises TrustError when ``root_file`` is not root metadata."""
    md = parse_metadata(root_file, Root.type, Root, "root")
    return hashlib.sha256(canonical_bytes(md)).hexdigest()


def expiry_from(now: datetime, role: str, expiries: dict[str, timedelta] | None = None) -> datetime:
    """When metadata of ``role`` signed at ``now`` expires (whole seconds, as TUF writes them)."""
    return (now + (expiries or EXPIRY)[role]).replace(microsecond=0)


def needs_resign(signed: Signed, now: datetime, lifetime: timedelta) -> bool:
    """True once less than half of ``lifetime`` is left before ``signed`` expires (or it has expired)."""
    return signed.expires - now < lifetime / 2


def target_path(name: str, version: str) -> str:
    """The TUF target path of a bundle: ``NAME-VERSION.efb``."""
    return f"{name}-{version}.efb"


def bundle_target(name: str, version: str, length: int, sha256: str) -> TargetFile:
    """The image targets entry of bundle NAME-VERSION: its length and sha256, and ``custom`` fields
    ``{"model": NAME, "version": VERSION}`` (what the operator's CLI signs and a device may read back).
    Raises ValueError for a negative length or an empty hash (tuf's own checks)."""
    return TargetFile(length=length, hashes={"sha256": sha256}, path=target_path(name, version),
                      unrecognized_fields={"custom": {"model": name, "version": version}})


def check_root_update(
    current: Root | None, new: Metadata[Root], now: datetime, online_keyids: dict[str, str] | None = None
) -> None:
    """Accept ``new`` as the root after ``current`` (None: ``new`` must be root 1, signed by itself).

    The version must be exactly the current one + 1; a threshold of the current root's keys AND a
    threshold of the new root's keys must sign it; it must not be expired and must use consistent
    snapshots; ``online_keyids`` (role -> keyid), when given, are the only keys of those roles.
    Raises TrustError naming the field (``conflict`` set for a version that is not the next).
    """
    root = new.signed
    expected = 1 if current is None else current.version + 1
    if root.version != expected:
        raise TrustError(f"signed.version: root version {root.version}, expected {expected} (the current "
                         f"root is {expected - 1})", "signed.version", conflict=True)
    result = root.get_root_verification_result(current, new.signed_bytes, new.signatures)
    if not result.first.verified:
        which = "the current root's" if current is not None else "its own"
        raise TrustError(
            f"signatures: root {root.version} is signed by {len(result.first.signed)} of {which} root keys; "
            f"the threshold is {result.first.threshold}", "signatures")
    if not result.second.verified:
        raise TrustError(
            f"signatures: root {root.version} is signed by {len(result.second.signed)} of its own root keys; "
            f"the threshold is {result.second.threshold}", "signatures")
    if root.is_expired(now):
        raise TrustError(f"signed.expires: root {root.version} expired at {root.expires.isoformat()}",
                         "signed.expires")
    if not root.consistent_snapshot:
        raise TrustError("signed.consistent_snapshot: must be true (metadata is served by version)",
                         "signed.consistent_snapshot")
    for role, keyid in (online_keyids or {}).items():
        r = root.roles[role]
        if r.keyids != [keyid] or r.threshold != 1:
            raise TrustError(f"signed.roles.{role}: must be exactly the server's online {role} key {keyid} with "
                             f"threshold 1 (fetch them with `edgefleet keys init --server URL`)",
                             f"signed.roles.{role}")


def check_targets_update(root: Root, current_version: int, new: Metadata[Targets], now: datetime) -> None:
    """Accept ``new`` as the targets after version ``current_version`` (0: none yet), under ``root``:
    signed by a threshold of the targets keys ``root`` names, version exactly current + 1, not expired.
    Raises TrustError naming the field (``conflict`` set for a version that is not the next)."""
    targets = new.signed
    result = root.get_verification_result(Targets.type, new.signed_bytes, new.signatures)
    if not result.verified:
        raise TrustError(
            f"signatures: targets {targets.version} is signed by {len(result.signed)} of the release (targets) "
            f"keys the root names; the threshold is {result.threshold}", "signatures")
    if targets.version != current_version + 1:
        raise TrustError(f"signed.version: targets version {targets.version}, expected {current_version + 1} "
                         f"(the current targets is {current_version}); fetch it, add your change, sign again",
                         "signed.version", conflict=True)
    if targets.is_expired(now):
        raise TrustError(f"signed.expires: targets {targets.version} expired at {targets.expires.isoformat()}",
                         "signed.expires")
    if targets.delegations is not None:
        raise TrustError("signed.delegations: delegations are not supported yet", "signed.delegations")
