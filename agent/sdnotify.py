"""The systemd notification protocol (``sd_notify(3)``), with the standard library only.

A ``Type=notify`` service tells systemd it is up (``READY=1``), what it is doing (``STATUS=…``), that
it is still alive (``WATCHDOG=1``, at least once per ``WatchdogSec=``) and that it is shutting down
(``STOPPING=1``). Each message is one datagram of ``KEY=value`` lines sent to the ``AF_UNIX`` socket
named by ``$NOTIFY_SOCKET``: a path, or an abstract socket written with a leading ``@``.

::

    notifier = Notifier()                    # from os.environ; a no-op when not started by systemd
    interval = notifier.watchdog_interval()  # seconds, or None when no watchdog is asked for
    notifier.ready(status="serving 2 models")
    ...                                      # main loop: notifier.watchdog() every interval / 2
    notifier.stopping()

Nothing here raises on a failed send: a notification that cannot be delivered is logged and
dropped, because a service must not die for want of telling systemd how it is. Only a misuse
(a field name that is not ``UPPER_CASE``) raises ``ValueError``.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections.abc import Mapping

__all__ = ["Notifier", "watchdog_interval"]

log = logging.getLogger(__name__)

_FIELD = re.compile(r"[A-Z][A-Z0-9_]*\Z")
# A send should never block the main loop: the datagram goes to PID 1, which reads it at once.
_SEND_TIMEOUT = 2.0  # seconds


class Notifier:
    """Sends notifications to systemd's ``$NOTIFY_SOCKET``, or does nothing when there is none.

    Built from ``environ`` (default ``os.environ``, read once here): ``NOTIFY_SOCKET`` is an absolute
    path, or ``@name`` for an abstract socket; unset (or an unsupported form, which is logged) makes
    every method a no-op that returns False. Every method returns True when the datagram was sent.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._watchdog_env = {k: env[k] for k in ("WATCHDOG_USEC", "WATCHDOG_PID") if k in env}
        self._address: str | None = None
        self._failing = False  # log the first failure of a run of failures as a warning, the rest at debug
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@") and len(address) > 1:
            self._address = "\0" + address[1:]
        elif address.startswith("/"):
            self._address = address
        elif address:
            log.warning("NOTIFY_SOCKET=%r is neither a path nor an abstract socket: not notifying systemd", address)

    @property
    def enabled(self) -> bool:
        """True when there is a socket to send to (the service was started by systemd as notify)."""
        return self._address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` fields in one datagram, e.g. ``notify(READY=1, STATUS="up")``.

        Newlines in values become spaces (a newline would start a new field). Raises ValueError when a
        field name is not ``UPPER_CASE``; never raises for a failed send.
        """
        for key in fields:
            if not _FIELD.match(key):
                raise ValueError(f"sd_notify field {key!r}: expected an UPPER_CASE name such as READY or STATUS")
        if self._address is None or not fields:
            return False
        message = "\n".join(f"{k}={_one_line(str(v))}" for k, v in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.settimeout(_SEND_TIMEOUT)
                sock.sendto(message, self._address)
        except OSError as e:
            level = logging.DEBUG if self._failing else logging.WARNING
            log.log(level, "sd_notify to %s failed (%s): %s", self._printable_address, ", ".join(fields), e)
            self._failing = True
            return False
        if self._failing:
            log.info("sd_notify to %s works again", self._printable_address)
            self._failing = False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Start-up is finished (``READY=1``), optionally with a status line."""
        return self.notify(READY=1) if status is None else self.notify(READY=1, STATUS=status)

    def status(self, text: str) -> bool:
        """A one-line status that ``systemctl status`` shows (``STATUS=…``)."""
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        """Keep-alive for ``WatchdogSec=`` (``WATCHDOG=1``): send at about half of `watchdog_interval`."""
        return self.notify(WATCHDOG=1)

    def stopping(self) -> bool:
        """Shutdown has begun (``STOPPING=1``)."""
        return self.notify(STOPPING=1)

    def reloading(self) -> bool:
        """Reloading configuration (``RELOADING=1``); send `ready` again when done.

        Carries ``MONOTONIC_USEC`` (``CLOCK_MONOTONIC`` in µs), which ``Type=notify-reload`` requires.
        """
        return self.notify(RELOADING=1, MONOTONIC_USEC=time.monotonic_ns() // 1000)

    def watchdog_interval(self) -> float | None:
        """`watchdog_interval` for the environment this notifier was built from."""
        return watchdog_interval(self._watchdog_env)

    @property
    def _printable_address(self) -> str:
        return "@" + self._address[1:] if self._address and self._address.startswith("\0") else str(self._address)


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """``WatchdogSec=`` in seconds from ``$WATCHDOG_USEC``, or None when this process need not ping.

    None when ``WATCHDOG_USEC`` is unset, not a positive integer (logged), or when ``WATCHDOG_PID``
    is set to another process's id (the variable was inherited, the watchdog is not ours).
    Ping with `Notifier.watchdog` at half this interval.
    """
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            log.warning("WATCHDOG_PID=%r is not a process id: ignoring the watchdog", pid)
            return None
    try:
        value = int(usec)
    except ValueError:
        value = 0
    if value <= 0:
        log.warning("WATCHDOG_USEC=%r is not a positive number of microseconds: ignoring the watchdog", usec)
        return None
    return value / 1_000_000


def _one_line(value: str) -> str:
    return value.replace("\r", " ").replace("\n", " ")
