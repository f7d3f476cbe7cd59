"""What can go wrong in an update, split by what the agent does next.

- :class:`Transient`: try again later (network down, server busy, disk full, a 5xx): the state machine
  stays where it is and retries with back-off, up to a bound.
- :class:`Refused`: this target must not be installed (bad signature, hash mismatch, a self-test or
  probation failure): the agent rolls back if needed, remembers the target's hash and reports the
  reason; it is not tried again until the assignment changes.

``reason`` is a short machine-friendly word (``hash_mismatch``, ``selftest_failed``...), ``str(e)`` a
sentence for people. Both go into the event the server stores.
"""

from __future__ import annotations

from edgefleet.errors import EdgefleetError

__all__ = ["Refused", "Transient", "UpdateError"]


class UpdateError(EdgefleetError):
    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class Transient(UpdateError):
    """Retry later; ``retry_after`` seconds when the server said (429/503 Retry-After)."""

    def __init__(self, message: str, reason: str = "transient", retry_after: float | None = None) -> None:
        super().__init__(message, reason)
        self.retry_after = retry_after


class Refused(UpdateError):
    """Never install this target (until the assignment changes)."""
