"""The training child as the daemon sees it: spawn, watch, stop, and name how it ended.

The child is ``python -m trainer.run_job`` in its own session (a terminal's Ctrl-C reaches only
the daemon, which decides what the child gets). On Linux the child asks the kernel for SIGKILL
when its parent dies (``PR_SET_PDEATHSIG``), so a daemon killed with SIGKILL leaves no orphan
training on. Liveness is the heartbeat file the child touches after every step (and every second
while it sets up); a child silent for ``daemon.job_timeout`` is killed. Before its first beat
(interpreter start, imports) it gets at least ``STARTUP_GRACE`` seconds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

_PR_SET_PDEATHSIG = 1
STARTUP_GRACE = 120.0
"""Seconds a child may take to beat for the first time (imports), whatever job_timeout says."""


def _die_with_parent(parent_pid: int):
    def prepare() -> None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except OSError:
            pass
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return prepare


@dataclass
class ChildEnd:
    code: int | None
    """The exit code, or None when a signal ended it."""
    signal: int | None
    reason: str


class Child:
    """One running training child."""

    def __init__(self, cmd: list[str], log_path: Path, heartbeat: Path, env: dict | None = None):
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.heartbeat = heartbeat
        self.started = time.time()
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env,
                                         start_new_session=True,
                                         preexec_fn=_die_with_parent(os.getpid()))
        self.stop_sent_at: float | None = None
        self.killed_for: str | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait(self, timeout: float) -> bool:
        """True once the child has exited."""
        try:
            self.proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def silent_for(self) -> tuple[float, bool]:
        """(seconds since the last sign of life, whether the child has beaten at all)."""
        try:
            last = self.heartbeat.stat().st_mtime
        except FileNotFoundError:
            return time.time() - self.started, False
        return time.time() - max(last, self.started), last >= self.started - 1

    def request_stop(self) -> None:
        """Warm stop: the child checkpoints at its next step boundary and exits."""
        if self.stop_sent_at is None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.stop_sent_at = time.monotonic()

    def kill(self, why: str) -> None:
        if self.proc.poll() is None:
            self.killed_for = why
            self.proc.kill()
            self.proc.wait()

    def end(self) -> ChildEnd:
        code = self.proc.wait()
        if code < 0:
            sig = -code
            name = signal.Signals(sig).name
            why = f"training child (pid {self.pid}) was killed by signal {sig} ({name})"
            if self.killed_for:
                why += f": {self.killed_for}"
            return ChildEnd(None, sig, why)
        return ChildEnd(code, None, f"training child exited with code {code}")


def child_command(base: Path, sidecar: Path, extra_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "trainer.run_job", "--base-dir", str(base), "--job",
            str(sidecar), *extra_args]
