"""The training child as the daemon sees it: spawn, watch, stop, and name how it ended.

The child is ``python -m trainer.run_job`` in its own session (a terminal's Ctrl-C reaches only
the daemon, which decides what the child gets). On Linux the child asks the kernel for SIGKILL
when its parent dies (``PR_SET_PDEATHSIG``), so a daemon killed with SIGKILL leaves no orphan
training on. Liveness is the heartbeat file the child touches after every step (and every second
while it sets up); a child silent for ``daemon.job_timeout`` is killed. Before its first beat
(interpreter start, imports) it gets at least ``STARTUP_GRACE`` seconds.

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

_PR_SET_PDEATHSIG = 1
STARTUP_GRACE = 120.0
"""Seconds a child may take to beat for the first time (imports), whatever job_timeout says."""


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
class JobFiles:
    """The files a running job and its daemon talk through, in ``status/jobs/``: one set per
    job, so daemons sharing a realm never read each other's."""

    heartbeat: Path
    """Touched by the child (rank 0) after every step."""
    stop: Path
    """Created by the daemon: stop at the next step boundary with a checkpoint."""
    outcome: Path
    """Written by rank 0 of a group last: its exit code as JSON (a single child's exit code
    says it directly)."""
    progress: Path
    """The child's throttled training status (step, loss, ETA) for ``queue status``."""

    @classmethod
    def of(cls, status_dir: Path, job_id: str) -> "JobFiles":
        d = status_dir / "jobs"
        return cls(d / f"{job_id}.heartbeat", d / f"{job_id}.stop", d / f"{job_id}.outcome",
                   d / f"{job_id}.progress.json")

    def clear(self) -> None:
        for p in (self.stop, self.outcome):
            p.unlink(missing_ok=True)

    def remove(self) -> None:
        for p in (self.heartbeat, self.stop, self.outcome, self.progress):
            p.unlink(missing_ok=True)

    def write_outcome(self, code: int) -> None:
        from core.fsutil import write_json_atomic

        write_json_atomic(self.outcome, {"code": code, "pid": os.getpid()}, fsync=False)

    def read_outcome(self) -> int | None:
        import json

        try:
            return int(json.loads(self.outcome.read_text())["code"])
        except (OSError, ValueError, KeyError, TypeError):
            return None


@dataclass
class ChildEnd:
    code: int | None
    """The exit code, or None when a signal ended it."""
    signal: int | None
    reason: str


class Child:
    """One running training child."""

    def __init__(self, cmd: list[str], log_path: Path, files: JobFiles, env: dict | None = None,
                 *, group: bool = False):
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.files, self.heartbeat, self.group = files, files.heartbeat, group
        files.heartbeat.parent.mkdir(parents=True, exist_ok=True)  # a stop may come at once
        files.clear()
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
            if self.group:
                self.files.stop.touch()
            else:
                self.proc.send_signal(signal.SIGTERM)
            self.stop_sent_at = time.monotonic()

    def kill(self, why: str) -> None:
        if self.proc.poll() is None:
            self.killed_for = why
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
        written = self.files.read_outcome() if self.group else None
        if written is not None:
            # rank 0 decided (completed / stopped / failed); the launcher's 0-or-1 says less
            return ChildEnd(written, None, f"training group ended: rank 0 reported code {written}"
                            f" (launcher exit {code})")
        if code < 0:
            sig = -code
            name = signal.Signals(sig).name
            why = f"training child (pid {self.pid}) was killed by signal {sig} ({name})"
            if self.killed_for:
                why += f": {self.killed_for}"
            return ChildEnd(None, sig, why)
        if self.group:
            return ChildEnd(exitcodes.CRASHED, None, f"training group failed (launcher exit "
                            f"{code}, no outcome from rank 0): a rank died or crashed; see the "
                            f"job log")
        return ChildEnd(code, None, f"training child exited with code {code}")


def child_command(base: Path, sidecar: Path, extra_args: list[str], nproc: int = 1
                  ) -> list[str]:
    job = ["-m", "trainer.run_job", "--base-dir", str(base), "--job", str(sidecar), *extra_args]
    if nproc <= 1:
        return [sys.executable, *job]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
            "--nproc-per-node", str(nproc), "--max-restarts", "0", "--monitor-interval", "0.2",
            "--shutdown-timeout", "10", *job]
