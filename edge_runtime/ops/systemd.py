"""The systemd notification protocol (sd_notify), without libsystemd: READY, STATUS, WATCHDOG, STOPPING.

Does nothing when the service was not started by systemd (no ``NOTIFY_SOCKET`` in the environment).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None):
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # abstract namespace socket
            address = "\0" + address[1:]
        self.address = address or None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        watchdog_for_us = usec.isdigit() and (not pid or pid == str(os.getpid()))
        self.watchdog_interval = int(usec) / 2e6 if watchdog_for_us else None
        self._stop = threading.Event()

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *fields: str) -> bool:
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.sendto("\n".join(fields).encode(), self.address)
            return True
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", self.address.lstrip("\0"), exc.strerror)
            return False

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def stopping(self) -> None:
        self._stop.set()
        self.notify("STOPPING=1", "STATUS=stopping")

    def start_watchdog(self, healthy: Callable[[], bool]) -> None:
        """Ping the watchdog at half its interval for as long as ``healthy()`` says so."""
        if self.watchdog_interval is None or self.address is None:
            return
        interval = self.watchdog_interval

        def loop() -> None:
            while not self._stop.wait(interval):
                if healthy():
                    self.notify("WATCHDOG=1")
                else:
                    log.error("a service thread died; withholding the watchdog ping so systemd restarts us")

        threading.Thread(target=loop, name="watchdog", daemon=True).start()


def termination_requested() -> threading.Event:
    """An event set by SIGTERM (systemd's stop) or SIGINT (Ctrl-C); install it before starting anything, so a stop
    that arrives during start-up is a clean stop too. Call from the main thread."""
    requested = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s", signal.Signals(signum).name)
        requested.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    return requested
