"""The training daemon: ``realm daemon`` (``python -m core.training_daemon``).

    Daemon.run():  lock -> recover -> loop { wait for a wake-up -> reap dead leases ->
                   resource guard -> claim -> train in a child -> record the outcome } -> release

Wake-ups are watchdog events on the three inboxes (handlers only set an event and note open /
closed files for the settle rule) plus a periodic rescan every ``daemon.poll_interval``;
``--poll`` uses the rescan alone (network file systems deliver no inotify events). Each job runs
in a child process (``core.supervisor``); the daemon renews the job's lease in its sidecar every
``daemon.heartbeat_seconds`` and watches the child's heartbeat file. First SIGTERM/SIGINT: stop
claiming, ask the child to checkpoint and stop, requeue the job with its resume point, exit 0.
A second signal kills the child. Never imports torch.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import structlog

from core import exitcodes
from core.daemon_lock import DaemonLock, DeviceSet, device_label, process_alive
from core.errors import ClaimLost, SidecarError
from core.fsutil import host_name, write_json_atomic
from core.job import Job, JobState, utc_now
from core.paths import PRIORITIES, RealmPaths
from core.queue_scan import read_sidecar_json
from core.supervisor import STARTUP_GRACE, Child, ChildEnd, JobFiles, child_command
from core.training_queue import TrainingQueue

log = structlog.get_logger("realm.daemon")


@dataclass
class DrainSummary:
    completed: list[Job] = field(default_factory=list)
    failed: list[Job] = field(default_factory=list)
    requeued: list[Job] = field(default_factory=list)


def record_outcome(queue: TrainingQueue, job: Job, code: int, max_attempts: int,
                   end: ChildEnd | None = None) -> Job:
    """Move the job by the child's exit code (its results are already in the sidecar)."""
    fresh = Job.from_dict(read_sidecar_json(queue.paths.base / (job.dataset_path + ".job.json")))
    # the child's own words if it wrote any in this attempt (not the last attempt's)
    wrote = fresh.last_error if fresh.last_error != job.last_error else None
    error = (end.reason if end and end.signal else None) or wrote or \
        (end.reason if end else None) or f"training child exited with code {code}"
    if code == exitcodes.COMPLETED:
        return queue.complete(fresh, reason=f"trained to step {fresh.final_step}")
    if code == exitcodes.STOPPED:
        return queue.requeue(fresh, "stopped at a step boundary; resumes from its checkpoint")
    if code == exitcodes.PERMANENT:
        return queue.fail(fresh, error)
    return queue.fail(fresh, error, retryable=True, max_attempts=max_attempts)


class LeaseWatch:
    """Whether a lease is still held, judged by this daemon's own clock.

    Same host: the owning process exists. Other host: the lease's ``heartbeat_at`` *changed*
    within the last ``lease_seconds`` of this daemon's monotonic clock. The timestamp is only
    compared with its previous value, never with this host's wall clock, so clock skew between
    hosts never makes a live lease look expired (or a dead one look alive); the price is that a
    daemon watches a foreign lease for ``lease_seconds`` before it reaps it, even when the
    timestamp is hours old.
    """

    def __init__(self, lease_seconds: float, clock=time.monotonic):
        self.lease_seconds, self.clock = lease_seconds, clock
        self._seen: dict[str, tuple[str | None, float]] = {}

    def alive(self, job: Job) -> bool:
        worker = job.worker or {}
        if worker.get("host") == host_name():
            return process_alive(worker)
        now = self.clock()
        stamp = job.heartbeat_at or job.started_at
        seen = self._seen.get(job.id)
        if seen is None or seen[0] != stamp:
            self._seen[job.id] = (stamp, now)
            return True
        return now - seen[1] < self.lease_seconds

    def silent_for(self, job: Job) -> float:
        seen = self._seen.get(job.id)
        return 0.0 if seen is None else self.clock() - seen[1]

    def forget(self, keep: set[str]) -> None:
        self._seen = {k: v for k, v in self._seen.items() if k in keep}


class _Wakeups:
    """Watchdog on the inboxes: events only wake the loop and feed the settle rule."""

    def __init__(self, paths: RealmPaths, settler, poll_only: bool):
        self.event = threading.Event()
        self.observer = None
        if poll_only:
            return
        from watchdog.events import FileClosedEvent, FileSystemEventHandler, FileMovedEvent
        from watchdog.observers import Observer

        wake, note = self.event, settler

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event):
                path = getattr(event, "dest_path", "") or event.src_path
                if isinstance(event, FileClosedEvent):
                    note.note_closed(path)
                elif not isinstance(event, FileMovedEvent) and event.event_type in (
                        "created", "modified"):
                    note.note_written(path)
                wake.set()

        self.observer = Observer()
        for priority in PRIORITIES:
            self.observer.schedule(Handler(), str(paths.state_dir(priority)), recursive=False)
        self.observer.start()

    def wait(self, timeout: float) -> None:
        self.event.wait(timeout)
        self.event.clear()

    def close(self) -> None:
        if self.observer is not None:
            self.observer.stop()
            self.observer.join()


class Daemon:
    def __init__(self, paths: RealmPaths, daemon_cfg, *, devices: str | None = None,
                 poll: float | None = None, once: bool = False,
                 extra_args: list[str] | None = None, say=print, keep_last: int = 3):
        self.paths, self.cfg = paths, daemon_cfg
        self.device_set = DeviceSet.parse(devices or daemon_cfg.devices)
        self.devices = self.device_set.spec
        self.poll, self.once, self.extra_args, self.say = poll, once, extra_args or [], say
        self.queue = TrainingQueue(paths.base, settle_seconds=daemon_cfg.settle_seconds)
        self.lock = DaemonLock(paths.status, self.devices)
        self.status_path = paths.status / f"daemon-{host_name()}-{device_label(self.devices)}.json"
        self.stop_requests = 0
        self.summary = DrainSummary()
        self.worker = {"host": host_name(), "pid": os.getpid(),
                       "started": psutil.Process().create_time(), "devices": self.devices}
        self.leases = LeaseWatch(daemon_cfg.lease_seconds)
        self.others_training: list[Job] = []
        """Jobs other live daemons are training, as of the last reaping round."""
        self._guard_said: str | None = None
        self.keep_last = keep_last
        self.progress = ProgressView()

    # --- the spine ------------------------------------------------------------------------

    def run(self) -> DrainSummary:
        self.lock.acquire()
        self._install_signal_handlers()
        wakeups = _Wakeups(self.paths, self.queue.settler, poll_only=self.poll is not None)
        log.info("daemon.start", devices=self.devices, pid=os.getpid(), once=self.once,
                 mode="poll" if self.poll is not None else "inotify+rescan")
        try:
            self.recover()
            while not self.stop_requests:
                trained = self._one_round()
                if self.once and not trained and (self._guard_said or not self._has_work()):
                    break  # --once: nothing left to train (or nothing may be claimed now)
                if not self.stop_requests:
                    wakeups.wait(self._wait_seconds())
        finally:
            wakeups.close()
            last = {"reason": f"not claiming: {self._guard_said}"} if self._guard_said else {}
            self._write_status("stopped", **last)
            self.lock.release()
            log.info("daemon.stop", **{k: len(v) for k, v in vars(self.summary).items()})
        return self.summary

    def _one_round(self) -> bool:
        """Reap, guard, claim and train one job; False when nothing was trained."""
        self.reap_dead_leases()
        if not self.resources_ok():
            return False
        job = self.queue.claim_next(self.worker, defer=self._campaign_busy())
        if job is None:
            self._write_status("idle")
            return False
        self.train(job)
        return True

    def _campaign_busy(self):
        """Backfill: prefer jobs of campaigns no other daemon is training right now; a job of a
        busy campaign would only wait for the campaign's lock. Taken anyway when nothing else is
        queued (its child then waits with its imports done). None when no other daemon trains."""
        from trainer.config.realm_config import CampaignOf

        if not self.others_training:
            return None
        campaign_of = CampaignOf(self.paths)
        busy = {campaign_of(j) for j in self.others_training} - {None}
        return (lambda job: campaign_of(job) in busy) if busy else None

    def _wait_seconds(self) -> float:
        interval = self.poll if self.poll is not None else self.cfg.poll_interval
        if self._settling():
            return min(interval, max(0.05, self.cfg.settle_seconds / 4))
        return interval

    def _has_work(self) -> bool:
        """Files still settling, or queued jobs (another daemon may have adopted them between
        our scan and our claim)."""
        return self._settling() or bool(self.queue.queued())

    def _settling(self) -> bool:
        return any(why == "waiting" for p in PRIORITIES for _, why in self.queue.waiting(p))

    # --- recovery and leases --------------------------------------------------------------

    def recover(self) -> list[Job]:
        """Jobs left in processing/ by a dead owner go back to their queue (or to failed)."""
        return self.reap_dead_leases(at_start=True)

    def reap_dead_leases(self, at_start: bool = False) -> list[Job]:
        """Reap the jobs of dead owners; the live ones of other daemons are kept in
        ``self.others_training`` (the backfill reads them, no second listing)."""
        reaped, self.others_training = [], []
        processing = self.queue.jobs_in("processing")
        self.leases.forget({j.id for j in processing})
        for job in processing:
            worker = job.worker or {}
            if worker.get("pid") == os.getpid() and worker.get("host") == host_name():
                continue  # ours
            if self.leases.alive(job):
                self.others_training.append(job)
                continue
            who = f"{worker.get('host')}:{worker.get('pid')}"
            if worker.get("host") == host_name():
                gone = "is no longer running"
            else:
                gone = (f"has not renewed its lease for {self.leases.silent_for(job):.0f} s "
                        f"(daemon.lease_seconds {self.cfg.lease_seconds:g})")
            why = (f"owner {who} {gone}; last heartbeat {job.heartbeat_at}; "
                   f"{'recovered at daemon start' if at_start else 'lease reaped'} by "
                   f"{host_name()}:{os.getpid()}")
            try:
                moved = self.queue.fail(job, why, retryable=True,
                                        max_attempts=self.cfg.max_attempts, same_lease=True)
            except ClaimLost:
                continue  # another daemon reaped it first, or its owner renewed it
            log.warning("job.reaped", job_id=job.id, reason=why, to=moved.status.value)
            self.say(f"recovered {job.id}: {why} -> {moved.status.value}")
            reaped.append(moved)
        return reaped

    # --- resource guard -------------------------------------------------------------------

    def disk_floor_gb(self) -> tuple[float, str]:
        """max(daemon.min_free_disk_gb, newest checkpoint size x (keep_last + 1))."""
        floor, why = self.cfg.min_free_disk_gb, "daemon.min_free_disk_gb"
        newest = max(self.paths.campaigns.glob("*/*/checkpoints/step-*/COMPLETE"),
                     key=lambda p: p.stat().st_mtime, default=None)
        if newest is not None:
            size = sum(f.stat().st_size for f in newest.parent.iterdir() if f.is_file()) / 2**30
            needed = size * (self.keep_last + 1)
            if needed > floor:
                floor, why = needed, f"checkpoint size {size:.2f} GB x (keep_last + 1)"
        return floor, why

    def resources_ok(self) -> bool:
        disk = psutil.disk_usage(str(self.paths.base)).free / 2**30
        mem = psutil.virtual_memory().available / 2**30
        problems = []
        floor, why = self.disk_floor_gb()
        if disk < floor:
            problems.append(f"free disk {disk:.1f} GB < {floor:.1f} GB ({why})")
        if mem < self.cfg.min_free_memory_gb:
            problems.append(f"available memory {mem:.1f} GB < daemon.min_free_memory_gb "
                            f"{self.cfg.min_free_memory_gb}")
        reason = "; ".join(problems) or None
        if reason and reason.split(" GB")[0] != (self._guard_said or "").split(" GB")[0]:
            log.warning("daemon.resources_low", reason=reason)
            self.say(f"waiting: {reason}")
        self._guard_said = reason
        if reason:
            self._write_status("waiting", reason=f"not claiming: {reason}")
        return reason is None

    # --- one job --------------------------------------------------------------------------

    def train(self, job: Job) -> Job:
        self.say(f"training {job.id} ({job.dataset_name}, {job.num_examples} examples, "
                 f"{job.priority})")
        sidecar = self.paths.base / (job.dataset_path + ".job.json")
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": self.device_set.visible}
        ranks = self.device_set.ranks
        child = Child(child_command(self.paths.base, sidecar, self.extra_args, ranks),
                      self.paths.logs / "jobs" / f"{job.id}.log",
                      JobFiles.of(self.paths.status, job.id), env, group=ranks > 1)
        log.info("job.started", job_id=job.id, child_pid=child.pid)
        self._write_status("training", job_id=job.id, child_pid=child.pid)
        self._supervise(job, child)
        end = child.end()
        self.progress.close()
        moved = self._record(job, end)
        self.say(_describe(moved, end))
        return moved

    def _supervise(self, job: Job, child: Child) -> None:
        while not child.wait(timeout=self.cfg.heartbeat_seconds):
            if not self._renew_lease(job):
                child.kill("lease lost: another daemon reaped this job (see logs/jobs.jsonl)")
                return
            self.progress.update(job, child.files.progress)
            if self.stop_requests >= 2:
                child.kill("second stop signal (cold stop)")
            elif self.stop_requests == 1:
                child.request_stop()
                if child.stop_sent_at is not None and \
                        time.monotonic() - child.stop_sent_at > self.cfg.stop_grace_seconds:
                    child.kill(f"no clean stop within daemon.stop_grace_seconds "
                               f"({self.cfg.stop_grace_seconds:g} s)")
            else:
                silent, has_beaten = child.silent_for()
                limit = self.cfg.job_timeout if has_beaten else max(self.cfg.job_timeout,
                                                                     STARTUP_GRACE)
                if silent > limit:
                    child.kill(f"no heartbeat for {silent:.0f} s (daemon.job_timeout "
                               f"{self.cfg.job_timeout:g} s)")

    def _ours(self, job: Job) -> bool:
        w = job.worker or {}
        return w.get("host") == self.worker["host"] and w.get("pid") == self.worker["pid"]

    def _renew_lease(self, job: Job) -> bool:
        """Renew the lease; False when the job is no longer ours (reaped, perhaps re-claimed):
        then the child must stop training at once, the job's new owner has it."""
        def renew(j: Job) -> None:
            if not self._ours(j):
                raise ClaimLost(f"{j.id} is now held by {j.worker}")
            j.heartbeat_at = utc_now()

        try:
            self.queue.rewrite(job, renew)
            return True
        except ClaimLost as exc:
            log.error("job.lease_lost", job_id=job.id, reason=str(exc))
            return False

    def _record(self, job: Job, end: ChildEnd) -> Job:
        try:
            current = Job.from_dict(read_sidecar_json(self.paths.base / (job.dataset_path +
                                                                         ".job.json")))
            lost = not self._ours(current)
        except (OSError, ValueError, SidecarError):
            current, lost = job, True
        if lost:  # fenced: never move a job another daemon holds now
            log.error("job.lease_lost", job_id=job.id, reason=end.reason)
            self.say(f"  lost {job.id}: another daemon reaped it; its outcome here is dropped")
            return current
        if end.signal is not None and self.stop_requests:
            moved = self.queue.requeue(job, f"daemon stopped: {end.reason}")
        else:
            code = end.code if end.code is not None else exitcodes.CRASHED
            moved = record_outcome(self.queue, job, code, self.cfg.max_attempts, end)
        bucket = {JobState.COMPLETED: self.summary.completed,
                  JobState.FAILED: self.summary.failed}.get(moved.status, self.summary.requeued)
        bucket.append(moved)
        JobFiles.of(self.paths.status, job.id).remove()  # heartbeat, stop, outcome, progress
        log.info("job.finished", job_id=moved.id, status=moved.status.value, reason=end.reason)
        return moved

    # --- signals and status ---------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        def on_signal(signum, _frame):
            self.stop_requests += 1
            what = "warm stop: finishing at the next step boundary" if self.stop_requests == 1 \
                else "cold stop: killing the training child"
            self.say(f"{signal.Signals(signum).name}: {what}")

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def _write_status(self, state: str, **fields) -> None:
        write_json_atomic(self.status_path, {
            "schema": 1, "state": state, "pid": os.getpid(), "host": host_name(),
            "started": self.worker["started"],
            "devices": self.devices, "updated_at": utc_now(), **fields}, fsync=False)


class ProgressView:
    """A progress bar with ETA for the running job, on a terminal only (tqdm), fed from the
    child's ``status/jobs/<job>.progress.json``."""

    def __init__(self, stream=None):
        import sys

        self.stream = stream or sys.stdout
        self.enabled = self.stream.isatty()
        self.bar = None

    def update(self, job: Job, status_file: Path) -> None:
        if not self.enabled:
            return
        try:
            status = json.loads(status_file.read_text())
        except (OSError, ValueError):
            return
        if status.get("job_id") != job.id or "total_steps" not in status:
            return
        if self.bar is None:
            import tqdm

            tqdm.tqdm.monitor_interval = 0  # no monitor thread
            self.bar = tqdm.tqdm(total=status["total_steps"], desc=job.dataset_name,
                                 unit="step", file=self.stream, leave=False)
        self.bar.n = status["job_step"]
        metrics = status.get("metrics") or {}
        self.bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}",
                             tok_s=f"{metrics.get('tokens_per_sec', 0):,.0f}", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _describe(job: Job, end: ChildEnd) -> str:
    if job.status is JobState.COMPLETED:
        loss = f"{job.final_loss:.4f}" if job.final_loss is not None else "n/a"
        return (f"  completed {job.id}: steps {job.start_step} -> {job.final_step}, "
                f"final loss {loss}, {job.tokens_per_sec_avg or 0:,.0f} tokens/s")
    return f"  {job.status.value} {job.id}: {job.last_error or end.reason}"


def drain(paths: RealmPaths, daemon_cfg, *, extra_args: list[str] | None = None,
          say=print) -> DrainSummary:
    """``realm daemon --once``: train until the queue is empty (waiting for settling files)."""
    return Daemon(paths, daemon_cfg, once=True, extra_args=extra_args, say=say).run()


def main(argv: list[str] | None = None) -> int:
    import sys

    from core.cli import module_main

    return module_main("daemon", sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    import sys

    sys.exit(main())
