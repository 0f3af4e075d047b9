"""One daemon per realm, host and device set: an ``flock`` on
``status/daemon-<host>-<devices>.lock``.

Not a check-then-write pid file: the kernel holds the lock for exactly as long as the process
lives. The locked file also names its holder (pid, host, since) so a second daemon can say who
is in the way.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from core.errors import UsageError
from core.fsutil import host_name
from core.job import utc_now


def device_label(devices: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", devices).strip("-") or "cpu"


@dataclass(frozen=True)
class DeviceSet:
    spec: str
    ranks: int
    """Processes per job (more than one: a torch.distributed group)."""
    visible: str
    """CUDA_VISIBLE_DEVICES for the job ("" hides every GPU)."""

    @property
    def kind(self) -> str:
        """``cuda`` or ``cpu``."""
        return "cuda" if self.visible else "cpu"

    @classmethod
    def parse(cls, spec: str) -> "DeviceSet":
        """``cpu``, ``cpu:N``, or comma-separated CUDA ids (``0``, ``0,1``)."""
        text = spec.strip()
        m = re.fullmatch(r"cpu(?::(\d+))?", text)
        if m:
            n = int(m.group(1) or 1)
            if n >= 1:
                return cls(text, n, "")
        elif re.fullmatch(r"\d+(,\d+)*", text):
            ids = text.split(",")
            if len(set(ids)) == len(ids):
                return cls(text, len(ids), text)
        raise UsageError(f"--devices / daemon.devices {spec!r} is not a device set: use cpu, "
                         f"cpu:N for N processes on CPU, or distinct CUDA ids such as 0 or 0,1.")


class DaemonBusy(UsageError):
    """Another daemon holds this realm and device set."""


class DaemonLock:
    def __init__(self, status_dir: Path, devices: str):
        # per host: a realm shared by several hosts has a device 0 on each of them
        self.path = status_dir / f"daemon-{host_name()}-{device_label(devices)}.lock"
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
        holder = {"pid": os.getpid(), "host": host_name(), "since": utc_now(),
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
