"""The training child as the daemon sees it: spawn, watch, stop, and name how it ended.

The child is ``python -m trainer.run_job`` in its own session (a terminal's Ctrl-C reaches only
the daemon, which decides what the child gets). On Linux the child asks the kernel for SIGKILL
when its parent dies (``PR_SET_PDEATHSIG``), so a daemon killed with SIGKILL leaves no orphan
training on. Liveness is the counter the child advances after each setup phase and each
optimizer step (``daemon.protocol``), judged by the daemon's own monotonic clock: silent for
``daemon.job_timeout`` after its first step, or for the setup limit before it
(``setup_limit``), the child is killed. How it ended is its outcome file
(``daemon.protocol.Outcome``), or a crash named by its exit code or signal.

A job on several devices is a group: the child is torch's elastic launcher
(``python -m torch.distributed.run``) and the ranks are its children, each in its own session
(the launcher starts them so) and each asking for SIGKILL when the launcher dies. The group is
one job: a warm stop is a stop file every rank checks (the ranks agree on it and stop at the same
step; a SIGTERM to the launcher would start its own shutdown clock instead); a kill takes the
ranks and the launcher down together; the outcome is the file rank 0 writes, because the
launcher folds every rank's exit code into 0 or 1.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from core import exitcodes
from daemon.protocol import AliveWatch, JobFiles, Outcome  # noqa: F401  (JobFiles re-exported)

_PR_SET_PDEATHSIG = 1
STARTUP_GRACE = 120.0
"""Seconds a child may stay in setup (imports, model load, tokenizing between two signs of life)
before its first optimizer step, whatever job_timeout says. ``REALM_TEST_STARTUP_GRACE``
(test-only) replaces it, and wins over ``daemon.setup_timeout``."""


def setup_limit(daemon_cfg) -> tuple[float, str]:
    """(seconds, how it was chosen) a child may go without a sign of life before its first
    optimizer step: ``daemon.setup_timeout`` when set, else max(daemon.job_timeout, startup
    grace)."""
    explicit = daemon_cfg.setup_timeout
    test_grace = os.environ.get("REALM_TEST_STARTUP_GRACE")
    if explicit and not test_grace:
        return float(explicit), f"daemon.setup_timeout {explicit:g} s"
    grace = float(test_grace or STARTUP_GRACE)
    limit = max(daemon_cfg.job_timeout, grace)
    return limit, (f"setup limit {limit:g} s = max(daemon.job_timeout {daemon_cfg.job_timeout:g}"
                   f" s, startup grace {grace:g} s)")


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel for SIGKILL when the parent dies; exit now if it already has."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _die_with_parent(parent_pid: int):
    return lambda: die_with_parent(parent_pid)


@dataclass
class ChildEnd:
    code: int | None
    """The exit code, or None when a signal ended it."""
    signal: int | None
    reason: str


class Child:
    """One running training child."""

    def __init__(self, cmd: list[str], log_path: Path, files: JobFiles, env: dict | None = None,
                 *, group: bool = False, clear: bool = True):
        """``clear``: remove what an earlier attempt left in the job's files (False for a
        member node of a job spanning hosts: the claiming daemon cleared them, and its rank 0
        may already be speaking)."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.files, self.group = files, group
        files.alive.parent.mkdir(parents=True, exist_ok=True)  # a stop may come at once
        if clear:
            files.clear()
        self.alive = AliveWatch(files.alive)
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env,
                                         start_new_session=True,
                                         preexec_fn=_die_with_parent(os.getpid()))
        self.stop_sent_at: float | None = None
        self.killed_for: str | None = None
        self.kill_kind = "crash"
        """The outcome kind of a kill (timeout when it was killed for silence)."""

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

    def request_stop(self) -> None:
        """Warm stop: the child checkpoints at its next step boundary and exits."""
        if self.stop_sent_at is None and self.proc.poll() is None:
            if self.group:
                self.files.stop.touch()
            else:
                self.proc.send_signal(signal.SIGTERM)
            self.stop_sent_at = time.monotonic()

    def kill(self, why: str, kind: str = "crash") -> None:
        if self.proc.poll() is None:
            self.killed_for, self.kill_kind = why, kind
            for rank in self._ranks():
                with contextlib.suppress(psutil.NoSuchProcess):
                    rank.kill()
            self.proc.kill()
            self.proc.wait()

    def _ranks(self) -> list:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def end(self) -> ChildEnd:
        code = self.proc.wait()
        if code < 0:
            sig = -code
            name = signal.Signals(sig).name
            why = f"training child (pid {self.pid}) was killed by signal {sig} ({name})"
            if self.killed_for:
                why += f": {self.killed_for}"
            return ChildEnd(None, sig, why)
        if self.group:
            return ChildEnd(code, None, f"training group failed (launcher exit {code}, no "
                            "outcome from rank 0): a rank died or crashed; see the job log")
        return ChildEnd(code, None, f"training child exited with code {code} without "
                        "reporting an outcome; see the job log")

    def outcome(self, end: ChildEnd) -> Outcome:
        """What the child reported, else a crash (or the kill's kind) named by how it ended."""
        written = self.files.read_outcome()
        if written is not None:
            return written  # it decided (completed / stopped / failed) before it ended
        if end.signal is not None:
            return Outcome(exitcodes.CRASHED, self.kill_kind, end.reason)
        code = exitcodes.CRASHED if self.group else end.code
        return Outcome.without_file(code, end.reason)


def child_command(base: Path, sidecar: Path, extra_args: list[str], nproc: int = 1
                  ) -> list[str]:
    job = ["-m", "trainer.run_job", "--base-dir", str(base), "--job", str(sidecar), *extra_args]
    if nproc <= 1:
        return [sys.executable, *job]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
            "--nproc-per-node", str(nproc), "--max-restarts", "0", "--monitor-interval", "0.2",
            "--shutdown-timeout", "10", *job]
