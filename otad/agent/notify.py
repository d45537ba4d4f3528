"""sd_notify: tell systemd READY=1, STATUS=..., WATCHDOG=1 over the NOTIFY_SOCKET datagram socket.

A no-op when ``NOTIFY_SOCKET`` is unset (tests, the fleet simulator, a shell). Written here rather
than pulled from a library because the protocol is one datagram per message.
"""

from __future__ import annotations

import os
import re
import socket

import structlog

__layer__ = "adapter"

log = structlog.get_logger(__name__)

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class Notifier:
    """Sends notifications to the service manager named by ``NOTIFY_SOCKET`` (if any)."""

    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self._address: str | bytes | None = None
        if address:
            # A leading "@" names a socket in the abstract namespace (a NUL byte on the wire).
            self._address = "\0" + address[1:] if address.startswith("@") else address
        self.last_status: str | None = None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, *fields: str) -> bool:
        """Send ``fields`` (``"READY=1"``, ...) as one datagram; never raises."""
        if self._address is None:
            return False
        payload = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self._address)
                sock.sendall(payload)
        except OSError as exc:
            # systemd gone or socket not there: losing a status line must not stop an update.
            log.warning("sd_notify_failed", error=str(exc))
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        # one line: a newline would start another notify assignment
        text = _CONTROL.sub(" ", text)
        if text == self.last_status:
            return False
        self.last_status = text
        return self.send(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")


def watchdog_interval() -> float | None:
    """Half the watchdog period systemd asked for (``WATCHDOG_USEC``), or None when not set."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2_000_000 if value > 0 else None
