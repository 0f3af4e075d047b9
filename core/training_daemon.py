"""The training daemon's drain loop: claim the next job, train it in a child process, record
the outcome. ``python -m core.training_daemon --once`` == ``realm daemon --once``.

This is the first part of SPEC section 9 (issue 6): the claim / child / outcome cycle and
``--once``. Still to come there: the long-running watch loop with watchdog wake-ups,
heartbeats and leases, the flock single-instance lock, start-up recovery, warm/cold stop,
the resource guard and ``--plan``. Never imports torch: training runs in the child.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field

from core import exitcodes
from core.job import Job
from core.paths import PRIORITIES, RealmPaths
from core.queue_scan import read_sidecar_json
from core.training_queue import TrainingQueue


@dataclass
class DrainSummary:
    completed: list[Job] = field(default_factory=list)
    failed: list[Job] = field(default_factory=list)
    requeued: list[Job] = field(default_factory=list)


def run_child(paths: RealmPaths, job: Job, extra_args: list[str]) -> int:
    """Train one job in a child process; its exit code says what happened."""
    sidecar = paths.base / (job.dataset_path + ".job.json")
    cmd = [sys.executable, "-m", "trainer.run_job", "--base-dir", str(paths.base), "--job",
           str(sidecar), *extra_args]
    log_dir = paths.logs / "jobs"
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f"{job.id}.log", "ab") as log:
        return subprocess.run(cmd, stdout=log, stderr=log).returncode


def record_outcome(queue: TrainingQueue, job: Job, code: int, max_attempts: int) -> Job:
    """Move the job according to the child's exit code (results are already in its sidecar)."""
    fresh = Job.from_dict(read_sidecar_json(queue.paths.base / (job.dataset_path + ".job.json")))
    error = fresh.last_error or f"training child exited with code {code}"
    if code == exitcodes.COMPLETED:
        return queue.complete(fresh, reason=f"trained to step {fresh.final_step}")
    if code == exitcodes.STOPPED:
        return queue.requeue(fresh, "stopped at a step boundary; resumes from its checkpoint")
    if code == exitcodes.PERMANENT:
        return queue.fail(fresh, error)
    return queue.fail(fresh, error, retryable=True, max_attempts=max_attempts)


def drain(paths: RealmPaths, *, settle_seconds: float, max_attempts: int,
          extra_args: list[str] | None = None, on_event=print) -> DrainSummary:
    """Train every queued job, waiting for files that are still settling; then return."""
    queue = TrainingQueue(paths.base, settle_seconds=settle_seconds)
    summary = DrainSummary()
    while True:
        job = queue.claim_next()
        if job is None:
            if any(queue.waiting(p) for p in PRIORITIES if _settling(queue, p)):
                time.sleep(min(0.5, max(0.05, settle_seconds / 4)))
                continue
            return summary
        on_event(f"training {job.id} ({job.dataset_name}, {job.num_examples} examples, "
                 f"{job.priority})")
        code = run_child(paths, job, extra_args or [])
        moved = record_outcome(queue, job, code, max_attempts)
        bucket = {"completed": summary.completed, "failed": summary.failed}.get(
            moved.status.value, summary.requeued)
        bucket.append(moved)
        on_event(_describe(moved))


def _settling(queue: TrainingQueue, priority: str) -> bool:
    return any(why == "waiting" for _, why in queue.waiting(priority))


def _describe(job: Job) -> str:
    if job.status.value == "completed":
        return (f"  completed {job.id}: steps {job.start_step} -> {job.final_step}, "
                f"final loss {job.final_loss:.4f}, {job.tokens_per_sec_avg:,.0f} tokens/s")
    return f"  {job.status.value} {job.id}: {job.last_error}"


def main(argv: list[str] | None = None) -> int:
    from core.cli import module_main

    return module_main("daemon", argv)


if __name__ == "__main__":
    sys.exit(main())

