"""The daemon/child protocol: everything a training child and its daemon say to each other.

One job, one set of files in ``status/jobs/`` (so daemons sharing a realm never read each
other's):

- ``<job>.alive``: the liveness counter. The child (rank 0 of a group) rewrites it atomically as
  one line ``"<count> <phase>"`` after each setup phase (``config``, ``campaign_wait`` on each
  poll of the campaign lock, ``campaign``, ``model``, ``data`` every ``DATA_TICK_SECONDS`` while
  it reads or tokenizes, ``optimizer``, ``restore``) and after each optimizer step (``step:N``).
  The daemon reads it every ``daemon.heartbeat_seconds`` and judges liveness by its OWN
  monotonic clock: the last time it saw the count change (``AliveWatch``). File times are never
  read, so a clock step or a forged mtime can neither keep a stuck child alive nor kill a live
  one. Until the first ``step:`` the setup limit applies, after it ``daemon.job_timeout``.
- ``<job>.stop``: created by the daemon: stop at the next step boundary with a checkpoint (a
  group; a single child gets SIGTERM).
- ``<job>.outcome``: written by the child last (atomic JSON, ``Outcome``): exit code, kind,
  reason, results, resume point. The child never writes the job's sidecar: the daemon is the
  only writer of sidecars and applies the outcome when it moves the job.
- ``<job>.progress.json``: the child's throttled training status for ``queue status``.
- ``<job>.cancel``: a cancel request (``CancelRequest``), written by ``realm queue cancel`` for a
  processing job. The owning daemon sees it within a heartbeat and asks the child to stop; the
  child, stopped, finds it, removes its own checkpoints and reports kind ``cancelled``; the
  daemon moves the job to ``cancelled``. It names the claim it was meant for (the job's
  ``started_at``), so a request left over from an earlier claim never cancels a later one.

Exit codes live in ``core.exitcodes``; ``KINDS`` says which outcome kinds are permanent. A child
that dies without writing an outcome is a crash (retryable), named by its exit code or signal.
Torch-free: the daemon imports it.
"""

from __future__ import annotations

import errno
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from core import exitcodes
from core.fsutil import write_json_atomic

OUTCOME_SCHEMA = 1
DATA_TICK_SECONDS = 0.5
"""While the child reads or tokenizes a dataset it advances the counter at most this often."""

PERMANENT_KINDS = frozenset({"data", "config", "unsafe_checkpoint", "governor"})
"""Retrying cannot help: bad data (also a dataset changed after adoption), bad config or input,
a checkpoint a safe load refuses, the governor gave up."""
RETRYABLE_KINDS = frozenset({"crash", "oom", "timeout"})
"""Try again (counts as an attempt)."""
OTHER_KINDS = frozenset({"completed", "stopped", "no_space", "cancelled"})
"""completed; stopped (warm stop, resumes); no_space (requeued with its resume point, not an
attempt; the daemon then waits for free space); cancelled (stopped at a step boundary for a
cancel request, its own checkpoints removed: the job moves to cancelled)."""
KINDS = PERMANENT_KINDS | RETRYABLE_KINDS | OTHER_KINDS

RESULT_FIELDS = frozenset({"start_step", "final_step", "final_loss", "final_val_loss",
                           "tokens_per_sec_avg", "trained_tokens_per_sec_avg", "governor",
                           "metadata", "config_hash", "git_commit", "resolved_config"})
"""Job fields a child may report; anything else in an outcome is ignored."""

CODE_OF_KIND = {"completed": exitcodes.COMPLETED, "stopped": exitcodes.STOPPED,
                "cancelled": exitcodes.STOPPED,
                "crash": exitcodes.CRASHED, "oom": exitcodes.RETRYABLE,
                "timeout": exitcodes.RETRYABLE, "no_space": exitcodes.NO_SPACE,
                **{k: exitcodes.PERMANENT for k in PERMANENT_KINDS}}
KIND_OF_CODE = {exitcodes.COMPLETED: "completed", exitcodes.STOPPED: "stopped",
                exitcodes.PERMANENT: "config", exitcodes.RETRYABLE: "oom",
                exitcodes.NO_SPACE: "no_space"}


@dataclass
class Outcome:
    """What a child has to say when it ends (the ``<job>.outcome`` file)."""

    code: int
    kind: str
    reason: str | None = None
    """Why it failed or stopped (becomes the job's last_error on a failure)."""
    results: dict = field(default_factory=dict)
    """Job fields to record (``RESULT_FIELDS``)."""
    resume: dict | None = None
    """``{"checkpoint": realm-relative path, "step": N}`` when the job can resume."""
    free_bytes: int | None = None
    """no_space: free bytes the child saw on the realm's file system when it failed."""
    pid: int = 0
    schema: int = OUTCOME_SCHEMA

    @property
    def permanent(self) -> bool:
        return self.kind in PERMANENT_KINDS

    @property
    def retryable(self) -> bool:
        return self.kind in RETRYABLE_KINDS

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Outcome":
        """A tolerant reader: unknown kinds become crashes, unknown result keys are dropped."""
        code = int(data["code"])
        kind = data.get("kind") if data.get("kind") in KINDS else KIND_OF_CODE.get(code, "crash")
        results = data.get("results") if isinstance(data.get("results"), dict) else {}
        resume = data.get("resume") if isinstance(data.get("resume"), dict) else None
        reason = data.get("reason")
        free = data.get("free_bytes")
        return cls(code, kind, str(reason) if reason is not None else None,
                   {k: v for k, v in results.items() if k in RESULT_FIELDS}, resume,
                   int(free) if isinstance(free, (int, float)) else None, int(data.get("pid", 0)))

    @classmethod
    def without_file(cls, code: int | None, reason: str) -> "Outcome":
        """A child that ended without writing an outcome: a crash named by its exit code or
        signal (its exit code NO_SPACE still says no_space: the disk may have been too full
        for the outcome file)."""
        if code == exitcodes.NO_SPACE:
            return cls(code, "no_space", reason)
        return cls(exitcodes.CRASHED if code in (None, 0) else code, "crash", reason)


@dataclass
class JobFiles:
    """The files a running job and its daemon talk through, in ``status/jobs/``."""

    alive: Path
    """The liveness counter (rank 0 rewrites it after each setup phase and optimizer step)."""
    stop: Path
    """Created by the daemon: stop at the next step boundary with a checkpoint."""
    outcome: Path
    """Written by the child (rank 0 of a group) last: the ``Outcome`` as JSON."""
    progress: Path
    """The child's throttled training status (step, loss, ETA) for ``queue status``."""
    cancel: Path
    """Written by ``realm queue cancel``: a ``CancelRequest`` for the job's current claim."""

    @classmethod
    def of(cls, status_dir: Path, job_id: str) -> "JobFiles":
        d = status_dir / "jobs"
        return cls(d / f"{job_id}.alive", d / f"{job_id}.stop", d / f"{job_id}.outcome",
                   d / f"{job_id}.progress.json", d / f"{job_id}.cancel")

    def clear(self) -> None:
        """Before a child starts: nothing from an earlier attempt may speak for it (a cancel
        request stays: it names the claim it is for, and may arrive before the child starts)."""
        for p in (self.alive, self.stop, self.outcome):
            p.unlink(missing_ok=True)

    def remove(self) -> None:
        for p in (self.alive, self.stop, self.outcome, self.progress, self.cancel):
            p.unlink(missing_ok=True)

    def cancel_request(self, started_at: str | None) -> "CancelRequest | None":
        """The cancel request for the claim that started at ``started_at`` (None when there is
        none, it is unreadable, or it was meant for another claim)."""
        try:
            data = json.loads(self.cancel.read_bytes()[:1 << 16])
            request = CancelRequest(str(data["by"]), str(data["reason"]), str(data["at"]),
                                    data.get("started_at"))
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            return None
        return request if request.started_at == started_at else None

    def write_outcome(self, outcome: Outcome) -> None:
        outcome.pid = os.getpid()
        write_json_atomic(self.outcome, outcome.to_dict(), fsync=False)

    def read_outcome(self) -> Outcome | None:
        """The child's outcome, or None when it wrote none (or garbage)."""
        try:
            return Outcome.from_dict(json.loads(self.outcome.read_bytes()[:1 << 20]))
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            return None


@dataclass
class CancelRequest:
    """``realm queue cancel`` of a processing job: who asked, why, and for which claim."""

    by: str
    """``user@host`` of the person (or script) who asked."""
    reason: str
    at: str
    started_at: str | None
    """The ``started_at`` of the claim it cancels (a later claim of the job ignores it)."""

    def write(self, files: JobFiles) -> None:
        files.cancel.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(files.cancel, asdict(self), fsync=False)

    def describe(self, step: int | None = None, note: str = "") -> str:
        """The job's history reason: who cancelled it, at which (campaign) step, and why."""
        at = f" at step {step}" if step is not None else ""
        return f"cancelled by {self.by}{at} while processing: {self.reason}{note}"


class Alive:
    """The child's side of the liveness counter: ``advance(phase)`` rewrites ``<job>.alive``
    (temp file + rename, no fsync: the daemon on this host reads it, not a crash survivor)."""

    def __init__(self, path: Path):
        self.path, self.count = path, 0
        self._tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self._last = 0.0
        path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, phase: str = "step") -> None:
        self.advance(phase)

    def advance(self, phase: str) -> None:
        self.count += 1
        self._last = time.monotonic()
        try:
            self._tmp.write_text(f"{self.count} {phase}\n")
            os.replace(self._tmp, self.path)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:  # a full disk must not kill the step: the job will
                raise                      # meet ENOSPC where it matters (a checkpoint)

    def tick(self, phase: str) -> None:
        """Advance at most every ``DATA_TICK_SECONDS`` (per row of a long tokenizing pass)."""
        if time.monotonic() - self._last >= DATA_TICK_SECONDS:
            self.advance(phase)


def read_alive(path: Path) -> tuple[int, str] | None:
    """(count, phase) from a counter file, or None when absent or unreadable."""
    try:
        count, _, phase = path.read_bytes()[:256].decode("ascii", "replace").strip().partition(" ")
        return int(count), phase
    except (OSError, ValueError):
        return None


class AliveWatch:
    """The daemon's side: when the counter last changed, on the daemon's monotonic clock."""

    def __init__(self, path: Path, clock=time.monotonic):
        self.path, self.clock = path, clock
        self.last_change = clock()
        self.seen: tuple[int, str] | None = None
        self.stepped = False
        """True once the child reported an optimizer step (setup is over)."""

    def poll(self) -> float:
        """Seconds since the counter last changed (or since the child started)."""
        now = self.clock()
        value = read_alive(self.path)
        if value is not None and value != self.seen:
            self.seen, self.last_change = value, now
            self.stepped = self.stepped or value[1].startswith("step")
        return now - self.last_change

    @property
    def last_phase(self) -> str:
        return self.seen[1] if self.seen else "none yet (interpreter start, imports)"
