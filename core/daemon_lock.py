"""One daemon per realm and device set: an ``flock`` on ``status/daemon-<devices>.lock``.

Not a check-then-write pid file: the kernel holds the lock for exactly as long as the process
lives. The locked file also names its holder (pid, host, since) so a second daemon can say who
is in the way.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
from pathlib import Path

from core.errors import UsageError
from core.job import utc_now


def device_label(devices: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", devices).strip("-") or "cpu"


class DaemonBusy(UsageError):
    """Another daemon holds this realm and device set."""


class DaemonLock:
    def __init__(self, status_dir: Path, devices: str):
        self.path = status_dir / f"daemon-{device_label(devices)}.lock"
        self.devices = devices
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DaemonBusy(self._busy_message()) from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": utc_now(),
                  "devices": self.devices}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self.fd = fd

    def _busy_message(self) -> str:
        try:
            h = json.loads(self.path.read_text())
            who = f"pid {h['pid']} on {h['host']}, running since {h['since']}"
        except (OSError, ValueError, KeyError):
            who = "another process"
        return (f"another daemon already serves this realm on devices '{self.devices}' ({who}; "
                f"lock {self.path}). Stop it first, or start this one with other --devices.")

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
