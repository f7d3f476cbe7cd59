"""TUF metadata helpers both sides need: role names, expiries, the root fingerprint, parsing that names
the field, and the checks a repository makes before it accepts an uploaded root or targets.

Everything here is pure (bytes in, objects or :class:`TrustError` out) except :mod:`.keyfiles`, which
reads and writes private key files.
"""

from __future__ import annotations

from edgefleet.tufmeta.roles import (
    EXPIRY,
    ONLINE_ROLES,
    TOP_ROLES,
    TrustError,
    canonical_bytes,
    check_root_update,
    check_targets_update,
    expiry_from,
    fingerprint,
    needs_resign,
    parse_metadata,
    target_path,
)

__all__ = [
    "EXPIRY",
    "ONLINE_ROLES",
    "TOP_ROLES",
    "TrustError",
    "canonical_bytes",
    "check_root_update",
    "check_targets_update",
    "expiry_from",
    "fingerprint",
    "needs_resign",
    "parse_metadata",
    "target_path",
]
