"""What a device signs with its current key to renew its certificate; the server checks the same bytes.

Shared by the agent (which signs) and the fleet server (which verifies), so the two cannot drift.
"""

from __future__ import annotations

import hashlib

__all__ = ["renewal_message"]


def renewal_message(challenge: str, csr_pem: str) -> bytes:
    """The bytes a device signs with its current key to renew: ties the server's challenge to this CSR."""
    return f"edgefleet-renew-v1.{challenge}.{hashlib.sha256(csr_pem.encode()).hexdigest()}".encode()
