"""The systemd notification protocol (``sd_notify``): READY, WATCHDOG, STATUS, STOPPING.

A datagram of ``KEY=value`` lines to the ``AF_UNIX`` socket named by ``NOTIFY_SOCKET`` (a path, or
an abstract name starting with ``@``). Without ``NOTIFY_SOCKET`` (not under systemd, or
``Type=simple``) every call does nothing, so the daemon runs the same by hand, in tests and in
the demo. The watchdog interval is half of ``WATCHDOG_USEC`` (systemd's advice), and only when
``WATCHDOG_PID`` is unset or names this process. No library needed: the protocol is these few
lines (python-systemd would pull libsystemd bindings onto the device for them).
"""

from __future__ import annotations

import contextlib
import os
import socket


class SystemdNotifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        if address and address.startswith("@"):
            address = "\0" + address[1:]
        self._address = address
        self.watchdog_interval_s: float | None = None
        usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
        if usec and usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval_s = int(usec) / 1e6 / 2

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, **fields: object) -> None:
        if self._address is None:
            return
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        # systemd gone (shutting down): nothing to tell, nothing to lose
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, contextlib.suppress(OSError):
            sock.sendto(message, self._address)

    def ready(self, status: str) -> None:
        self.notify(READY=1, STATUS=status)

    def watchdog(self) -> None:
        self.notify(WATCHDOG=1)

    def status(self, text: str) -> None:
        self.notify(STATUS=text.replace("\n", " "))

    def stopping(self, status: str) -> None:
        self.notify(STOPPING=1, STATUS=status)
