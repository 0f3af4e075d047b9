"""The training daemon: ``realm daemon`` (module form: ``python -m core.training_daemon``).

    Daemon.run():  lock -> recover -> loop { wait for a wake-up -> reap dead leases ->
                   resource guard -> claim -> train in a child -> record the outcome } -> release

Wake-ups are watchdog events on the three inboxes (handlers only set an event and note open /
closed files for the settle rule) plus a periodic rescan every ``daemon.poll_interval``;
``--poll`` uses the rescan alone (network file systems deliver no inotify events). Each job runs
in a child process (``daemon.supervisor``); the daemon renews the job's lease in its sidecar every
``daemon.heartbeat_seconds`` and watches the child's liveness counter (``daemon.protocol``) on
its own monotonic clock. The daemon is the only writer of sidecars: the child reports in its
outcome file and the daemon records it when it moves the job. First SIGTERM/SIGINT: stop
claiming, ask the child to checkpoint and stop, requeue the job with its resume point, exit 0.
A second signal kills the child. A fault while renewing a lease or recording an outcome (a
sidecar overwritten with garbage, a dataset or folder deleted) is logged and the daemon goes on;
missing layout folders are recreated at the top of every round. Never imports torch.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import structlog
from watchdog.events import FileClosedEvent, FileMovedEvent, FileSystemEventHandler
from watchdog.observers import Observer

from core import exitcodes
from core.errors import ClaimLost, UsageError
from core.fsutil import host_name, write_json_atomic
from core.job import Job, JobState, utc_now
from core.paths import PRIORITIES, RealmPaths, init_layout, layout_problems, sidecar_of
from core.queue_scan import read_sidecar_json
from core.training_queue import TrainingQueue
from daemon.hooks import run_job_end_hook
from daemon.lease import LeaseWatch
from daemon.lock import DaemonLock, DeviceSet, device_label
from daemon.nodes import MemberWatch, Rendezvous, node_log, this_address, withdraw
from daemon.pause import describe, paused
from daemon.protocol import CancelRequest, JobFiles, Outcome
from daemon.supervisor import Child, ChildEnd, child_command, setup_limit
from guild.selection import CampaignOf

log = structlog.get_logger("realm.daemon")


@dataclass
class DrainSummary:
    completed: list[Job] = field(default_factory=list)
    failed: list[Job] = field(default_factory=list)
    requeued: list[Job] = field(default_factory=list)
    cancelled: list[Job] = field(default_factory=list)
    """Running jobs cancelled by a request (``realm queue cancel``)."""
    left_queued: int = 0
    """--once: jobs still queued (or settling in an inbox) when the disk/memory guard stopped
    the drain."""
    guard: str | None = None
    """--once: why the guard claimed nothing (None when it did not stop the drain)."""


def record_outcome(queue: TrainingQueue, job: Job, outcome: Outcome | int,
                   max_attempts: int) -> Job:
    """Move the job by what its child reported (an exit code alone is read as the outcome a
    child without an outcome file has). The daemon's in-memory ``job`` is what the queue moves:
    the sidecar on disk may have been damaged meanwhile."""
    if isinstance(outcome, int):
        outcome = Outcome.without_file(outcome, f"training child exited with code {outcome}") \
            if outcome not in (exitcodes.COMPLETED, exitcodes.STOPPED) else \
            Outcome(outcome, "completed" if outcome == exitcodes.COMPLETED else "stopped")
    results = outcome.results
    reason = outcome.reason or f"training child ended ({outcome.kind}, code {outcome.code})"
    if outcome.kind == "completed":
        return queue.complete(job, reason=f"trained to step {results.get('final_step')}",
                              **results)
    if outcome.kind == "cancelled":
        return queue.cancel(job, reason, running=True, results=results)
    if outcome.kind == "stopped":
        return queue.requeue(job, "stopped at a step boundary; resumes from its checkpoint",
                             resume=outcome.resume, results=results)
    if outcome.kind == "no_space":
        return queue.requeue(job, f"no space left on device ({reason}); requeued with its "
                             "resume point, not counted as an attempt; the daemon waits for "
                             "free disk space", resume=outcome.resume, results=results)
    if outcome.permanent:
        return queue.fail(job, reason, results=results)
    return queue.fail(job, reason, retryable=True, max_attempts=max_attempts, results=results)


class _Wakeups:
    """Watchdog on the inboxes: events only wake the loop and feed the settle rule."""

    def __init__(self, paths: RealmPaths, settler, poll_only: bool):
        self.event = threading.Event()
        self.observer = None
        if poll_only:
            return
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
                 extra_args: list[str] | None = None, say=print, keep_last: int = 3,
                 nodes: int | None = None, join: bool | None = None):
        self.paths, self.cfg = paths, daemon_cfg
        self.device_set = DeviceSet.parse(devices or daemon_cfg.devices)
        self.devices = self.device_set.spec
        self.kind = self.device_set.kind
        self.join = daemon_cfg.join if join is None else join
        """A member: claims nothing, joins the jobs other daemons claim across hosts."""
        self.nodes = 1 if self.join else (nodes or daemon_cfg.nodes)
        """Hosts each job this daemon claims spans (daemon.nodes)."""
        self.address = this_address(daemon_cfg.address)
        self.members = MemberWatch(daemon_cfg.lease_seconds, time.monotonic)
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
        self._paused_said: str | None = None
        """Why claiming is paused (realm daemon pause), while it is."""
        self._round_failed = False
        self._space_wanted: tuple[float, str] | None = None
        """After a job met ENOSPC: (free GB to wait for, why), until the disk has it."""
        self._unrecorded: list[tuple[Job, ChildEnd, Outcome]] = []
        """Outcomes whose recording failed (a damaged sidecar...): tried again every round."""
        self.keep_last = keep_last
        self.progress = ProgressView()
        self._cancels: dict[str, CancelRequest] = {}
        """Cancel requests seen for the jobs this daemon trains (job id -> request)."""
        self._refusals_said: dict[str, str] = {}
        """A member: the rendezvous files it refused, as said (said again only when they change)."""
        self.say = self.progress.writer(say)

    # --- the spine ------------------------------------------------------------------------

    def run(self) -> DrainSummary:
        problems = layout_problems(self.paths)
        if problems:
            raise UsageError("refusing to serve this realm's queue:\n" +
                             "\n".join(f"  - {p}" for p in problems))
        self.lock.acquire()
        self._install_signal_handlers()
        wakeups = _Wakeups(self.paths, self.queue.settler, poll_only=self.poll is not None)
        log.info("daemon.start", devices=self.devices, pid=os.getpid(), once=self.once,
                 mode="poll" if self.poll is not None else "inotify+rescan")
        try:
            self._guarded(self.recover)
            failures = 0
            while not self.stop_requests:
                trained = self._one_round()
                failures = failures + 1 if self._round_failed else 0
                held_back = self._paused_said or self._guard_said
                if self.once and not trained and (held_back or failures >= 3 or
                                                  not self._guarded(self._has_work, True)):
                    break  # --once: nothing left to train (or nothing may be claimed now)
                if not self.stop_requests:
                    wakeups.wait(self._wait_seconds())
            if self.once and (self._paused_said or self._guard_said):
                self.summary.guard = self._paused_said or self._guard_said
                self.summary.left_queued = self._guarded(self._left_queued, 0)
        finally:
            wakeups.close()
            held_back = self._paused_said or self._guard_said
            last = {"reason": f"not claiming: {held_back}"} if held_back else {}
            self._write_status("stopped", **last)
            self.lock.release()
            log.info("daemon.stop", **{k: len(v) for k, v in vars(self.summary).items()
                                       if isinstance(v, list)})
        return self.summary

    def _one_round(self) -> bool:
        """One round, never fatal: a fault is logged and the next round tries again."""
        self._round_failed = False
        return self._guarded(self._round, False)

    def _guarded(self, step, default=None):
        try:
            return step()
        except Exception as exc:  # noqa: BLE001 - the daemon outlives any one bad file
            self._round_failed = True
            log.error("daemon.round_failed", step=step.__name__,
                      error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
            self.say(f"error in {step.__name__.strip('_')} (the daemon keeps running): "
                     f"{type(exc).__name__}: {exc}")
            return default

    def _round(self) -> bool:
        """Reap, guard, claim and train one job; False when nothing was trained."""
        created = init_layout(self.paths)
        if created:
            log.warning("daemon.layout_recreated", folders=[str(p) for p in created])
        self._record_again()
        self.reap_dead_leases()
        if self.join:
            return self._join_round()
        if self.claiming_paused() or not self.resources_ok():
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
        return self._settling() or any(not job.held for job in self.queue.queued())

    def _left_queued(self) -> int:
        """Queued jobs and files still settling in an inbox."""
        settling = sum(why == "waiting" for p in PRIORITIES for _, why in self.queue.waiting(p))
        return sum(not job.held for job in self.queue.queued()) + settling

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
                moved = self._reap(job, why)
            except ClaimLost:
                continue  # another daemon reaped it first, or its owner renewed it
            log.warning("job.reaped", job_id=job.id, reason=why, to=moved.status.value)
            self.say(f"recovered {job.id}: {why} -> {moved.status.value}")
            reaped.append(moved)
            self._job_ended(moved)
        return reaped

    def _reap_claim(self, job: Job, why: str) -> Job:
        """A dead owner's job goes back to its queue (a retryable failure), or to cancelled
        when someone asked to cancel it (its checkpoints: the campaign's next job discards
        them, as any unfinished attempt's)."""
        files = JobFiles.of(self.paths.status, job.id)
        cancel = files.cancel_request(job.started_at)
        if cancel is None:
            return self.queue.fail(job, why, retryable=True, max_attempts=self.cfg.max_attempts,
                                   same_lease=True)
        moved = self.queue.cancel(job, cancel.describe(note=f"; {why}"), running=True,
                                  same_lease=True)
        with contextlib.suppress(OSError):
            files.remove()
        return moved

    def _reap(self, job: Job, why: str) -> Job:
        moved = self._reap_claim(job, why)
        with contextlib.suppress(OSError):
            withdraw(self.paths.status, job.id)  # a dead claimer's rendezvous: nobody joins it
        return moved

    # --- pause and resource guard ------------------------------------------------------

    def claiming_paused(self) -> bool:
        """``realm daemon pause`` (status/paused.json): claim nothing, say so once, and show
        ``paused`` in the status file; --once stops as it does for the resource guard."""
        info = paused(self.paths)
        if info is None:
            if self._paused_said:
                self.say("resumed: claiming again")
                log.info("daemon.resumed")
                self._paused_said = None
            return False
        why = describe(info)
        if why != self._paused_said:
            log.warning("daemon.paused", reason=why)
            self.say(f"{why}; `realm daemon resume` claims again")
        self._paused_said = why
        self._write_status("paused", reason=why)
        return True


    def disk_floor_gb(self) -> tuple[float, str]:
        """max(daemon.min_free_disk_gb, room for the checkpoints still to be written): the
        newest checkpoint's size x the checkpoints its campaign may still add before retention
        removes any (keep_last + 1 minus those already there, at least one). Those already on
        disk are paid for: counting them again would stop a daemon with plenty of room."""
        floor, why = self.cfg.min_free_disk_gb, "daemon.min_free_disk_gb"
        newest = max(self.paths.campaigns.glob("*/*/checkpoints/step-*/COMPLETE"),
                     key=lambda p: p.stat().st_mtime, default=None)
        if newest is not None:
            size = sum(f.stat().st_size for f in newest.parent.iterdir() if f.is_file()) / 2**30
            there = sum(1 for _ in newest.parent.parent.glob("step-*/COMPLETE"))
            to_come = max(1, self.keep_last + 1 - there)
            needed = size * to_come
            if needed > floor:
                floor, why = needed, (f"checkpoint size {size:.2f} GB x {to_come} still to be "
                                      f"written (keep_last + 1 - {there} on disk)")
        return floor, why

    def no_space_seen(self, outcome: Outcome) -> None:
        """A job met ENOSPC: claim nothing until the free space exceeds what it was at the
        failure by what a job needs (the disk floor: the newest checkpoint x (keep_last + 1),
        at least daemon.min_free_disk_gb), even when it is above the floor now: the job that
        filled the disk would fill it again."""
        seen = psutil.disk_usage(str(self.paths.base)).free
        if outcome.free_bytes is not None:
            seen = max(seen, outcome.free_bytes)
        need, why = self.disk_floor_gb()
        want = seen / 2**30 + need
        self._space_wanted = (want, f"a job ran out of space with {seen / 2**30:.1f} GB free; "
                                    f"waiting for that + {need:.1f} GB ({why})")
        log.warning("daemon.no_space", wanted_gb=round(want, 2), reason=self._space_wanted[1])

    def resources_ok(self) -> bool:
        disk = psutil.disk_usage(str(self.paths.base)).free / 2**30
        mem = psutil.virtual_memory().available / 2**30
        problems = []
        floor, why = self.disk_floor_gb()
        if self._space_wanted is not None:
            if disk >= self._space_wanted[0]:
                self._space_wanted = None  # freed: the ENOSPC wait is over
            elif self._space_wanted[0] > floor:
                floor, why = self._space_wanted
        if disk < floor:
            problems.append(f"free disk {disk:.1f} GB < {floor:.1f} GB ({why})")
        if mem < self.cfg.min_free_memory_gb:
            problems.append(f"available memory {mem:.1f} GB < daemon.min_free_memory_gb "
                            f"{self.cfg.min_free_memory_gb}")
        if self.nodes > 1:
            idle, wanted, by = self._free_members()
            if idle - wanted < self.nodes - 1:
                others = (f"; {wanted} of the {idle} idle are wanted by job(s) other daemons "
                          f"claimed and wait for members ({', '.join(by)})") if wanted else ""
                problems.append(
                    f"{max(0, idle - wanted)} of {self.nodes - 1} member daemon(s) idle for "
                    f"daemon.nodes {self.nodes} ({self.device_set.ranks} {self.kind} "
                    f"process(es) per host){others}: start `realm daemon --join --devices "
                    f"{self.devices}` on another host sharing this realm")
        reason = "; ".join(problems) or None
        if reason and reason.split(" GB")[0] != (self._guard_said or "").split(" GB")[0]:
            log.warning("daemon.resources_low", reason=reason)
            self.say(f"waiting: {reason}")
        self._guard_said = reason
        if reason:
            self._write_status("waiting", reason=f"not claiming: {reason}")
        return reason is None

    def _free_members(self) -> tuple[int, int, list[str]]:
        """(idle members of this device set, node slots still open in the rendezvous of
        claims other daemons made, those jobs): a member that one claim waits for is not free
        for another (both would claim, and one would wait out daemon.rendezvous_timeout and
        spend an attempt of its job). A member that took a slot counts as taken even before
        its status file says so."""
        ranks = self.device_set.ranks
        idle = self.members.idle(self.paths.status, ranks, self.kind)
        wanted, by, taken = 0, [], set()
        for rdzv in Rendezvous.published(self.paths.status):
            joined = rdzv.joined(self.paths.status)
            taken |= {(m.get("host"), m.get("pid")) for m in joined}
            if rdzv.leader.get("pid") == self.worker["pid"] and \
                    rdzv.leader.get("host") == self.worker["host"]:
                continue  # our own (withdrawn when its job ends)
            if rdzv.nproc != ranks or rdzv.kind != self.kind or \
                    not rdzv.still_claimed(self.paths.base):
                continue
            open_slots = max(0, rdzv.nodes - 1 - len(joined))
            if open_slots:
                wanted += open_slots
                by.append(rdzv.job_id)
        idle = [m for m in idle if (m.get("host"), m.get("pid")) not in taken]
        return len(idle), min(wanted, len(idle)), by

    # --- one job --------------------------------------------------------------------------

    def train(self, job: Job) -> Job:
        self.say(f"training {job.id} ({job.dataset_name}, {job.num_examples} examples, "
                 f"{job.priority})")
        sidecar = sidecar_of(self.paths.base / job.dataset_path)
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": self.device_set.visible}
        ranks, rdzv = self.device_set.ranks, None
        try:
            if self.nodes > 1:
                rdzv = Rendezvous.for_claim(
                    job, self.paths.relative(sidecar), nodes=self.nodes, nproc=ranks,
                    kind=self.kind, address=self.address, flags=self.extra_args,
                    leader=self.worker, timeout=self.cfg.rendezvous_timeout)
                rdzv.publish(self.paths.status)
                cmd = rdzv.launcher(self.paths.base, hosts_store=True, address=self.address)
                log_path = node_log(self.paths.logs, job.id, self.devices)
                self.say(f"  waiting for {self.nodes - 1} member node(s) at {rdzv.endpoint}")
            else:
                cmd = child_command(self.paths.base, sidecar, self.extra_args, ranks)
                log_path = self.paths.logs / "jobs" / f"{job.id}.log"
            child = Child(cmd, log_path, JobFiles.of(self.paths.status, job.id), env,
                          group=ranks > 1 or rdzv is not None)
        except OSError as exc:  # e.g. ENOSPC on the job log: the job goes back, visibly
            if rdzv is not None:
                withdraw(self.paths.status, job.id)
            why = f"could not start the training child: {exc}"
            kind = "no_space" if exc.errno == errno.ENOSPC else "crash"
            moved = self._record(job, ChildEnd(None, None, why), Outcome(
                exitcodes.CRASHED, kind, why, resume=job.resume))
            self._job_ended(moved)
            return moved
        log.info("job.started", job_id=job.id, child_pid=child.pid)
        self._write_status("training", job_id=job.id, child_pid=child.pid)
        try:
            self._supervise(job, child)
        except Exception as exc:  # noqa: BLE001 - never leave a child unwatched
            log.error("job.supervise_failed", job_id=job.id, traceback=traceback.format_exc())
            child.kill(f"the daemon failed while supervising it: {type(exc).__name__}: {exc}")
        end = child.end()
        self.progress.close()
        outcome = child.outcome(end)
        if rdzv is not None:  # never keeps the outcome from being recorded
            outcome = self._guarded(lambda: self._rendezvous_ended(rdzv, outcome), outcome)
        moved = self._record(job, end, outcome)
        self.say(_describe(moved, outcome))
        self._job_ended(moved)
        return moved

    def _rendezvous_ended(self, rdzv: Rendezvous, outcome: Outcome) -> Outcome:
        """Withdraw the claim's rendezvous; a group that died before every node joined says
        so (the usual cause: a member went away after the claim)."""
        joined = rdzv.joined(self.paths.status)
        with contextlib.suppress(OSError):
            withdraw(self.paths.status, rdzv.job_id)
        silent = JobFiles.of(self.paths.status, rdzv.job_id).read_outcome() is None
        if outcome.kind in ("crash", "timeout") and silent:  # rank 0 said nothing
            outcome.reason = (f"{outcome.reason or 'the group failed'}; each host's launcher "
                              f"wrote logs/jobs/{rdzv.job_id}.node-<host>-<devices>.log")
        if outcome.kind in ("crash", "timeout") and len(joined) < rdzv.nodes - 1:
            outcome.reason = (
                f"the job's {rdzv.nodes} nodes never met: {len(joined)} of {rdzv.nodes - 1} "
                f"member node(s) joined the rendezvous at {rdzv.endpoint} (daemon."
                f"rendezvous_timeout {rdzv.timeout:g} s); is `realm daemon --join` running on "
                f"another host, and can it reach {rdzv.endpoint}? {outcome.reason or ''}")
        return outcome

    # --- a member node of jobs spanning hosts ---------------------------------------------

    def _join_round(self) -> bool:
        """A member: join the first published rendezvous this device set fits (same processes
        per node, same device kind) whose claim is still running and has a free node slot."""
        damaged: dict[Path, str] = {}
        published = Rendezvous.published(self.paths.status, damaged)
        refused = {str(path): f"ignoring a damaged rendezvous file: {why}"
                   for path, why in damaged.items()}
        for rdzv in published:
            if rdzv.nproc != self.device_set.ranks or rdzv.kind != self.kind:
                continue
            problem = rdzv.problem(self.paths)
            if problem:
                refused[rdzv.job_id] = f"refusing the rendezvous of {rdzv.job_id}: {problem}"
                continue
            if not rdzv.still_claimed(self.paths.base):
                continue
            node = rdzv.take_slot(self.paths.status, self.worker)
            if node is not None:
                self._say_refusals(refused)
                self._serve_node(rdzv, node)
                return True
        self._say_refusals(refused)
        self._write_status("idle")
        return False

    def _say_refusals(self, refused: dict[str, str]) -> None:
        """Say (and log) each rendezvous a member will not join once, not every round."""
        for key, why in refused.items():
            if self._refusals_said.get(key) != why:
                log.warning("rendezvous.refused", file=key, problem=why)
                self.say(why)
        self._refusals_said = refused

    def _serve_node(self, rdzv: Rendezvous, node: int) -> None:
        """Run this host's launcher for node ``node`` of the job until it ends. A stop signal
        is a warm stop of the whole job (the stop file every rank reads: a node is leaving);
        the claim ending under it (recorded, reaped) stops it after a grace."""
        leader = f"{rdzv.leader.get('host')}:{rdzv.leader.get('pid')}"
        self.say(f"joining {rdzv.job_id} as node {node + 1} of {rdzv.nodes} (claimed by "
                 f"{leader}, rendezvous {rdzv.endpoint})")
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": self.device_set.visible}
        child = Child(rdzv.launcher(self.paths.base, hosts_store=False, address=self.address),
                      node_log(self.paths.logs, rdzv.job_id, self.devices),
                      JobFiles.of(self.paths.status, rdzv.job_id), env, group=True, clear=False)
        log.info("node.joined", job_id=rdzv.job_id, node=node, child_pid=child.pid,
                 leader=leader)
        self._write_status("joined", job_id=rdzv.job_id, node=node, child_pid=child.pid)
        over_since = None
        try:
            while not child.wait(timeout=self.cfg.heartbeat_seconds):
                # a fresh stamp while joined: status views and claimers see a live member
                self._write_status("joined", job_id=rdzv.job_id, node=node, child_pid=child.pid)
                if self.stop_requests >= 2:
                    child.kill("second stop signal (cold stop)")
                elif self.stop_requests == 1:
                    child.request_stop()  # the whole job checkpoints and stops; it is requeued
                if rdzv.still_claimed(self.paths.base):
                    over_since = None
                    continue
                over_since = over_since or time.monotonic()
                if time.monotonic() - over_since > NODE_GRACE:
                    child.kill(f"the claim this node joined has ended (job {rdzv.job_id} is "
                               f"no longer in processing under claim {rdzv.claim})")
        except Exception as exc:  # noqa: BLE001 - never leave a launcher unwatched
            log.error("node.supervise_failed", job_id=rdzv.job_id,
                      traceback=traceback.format_exc())
            child.kill(f"the daemon failed while supervising it: {type(exc).__name__}: {exc}")
        end = child.end()
        log.info("node.left", job_id=rdzv.job_id, node=node, code=end.code, signal=end.signal)
        ended = "its launcher exited 0" if end.code == 0 else end.reason
        self.say(f"  left {rdzv.job_id} (node {node + 1}): {ended}; the claiming daemon "
                 f"{leader} records the outcome")

    def _job_ended(self, job: Job) -> None:
        """daemon.on_job_end, once the job's outcome is recorded (never fatal)."""
        if job.status is JobState.PROCESSING or not self.cfg.on_job_end:
            return
        # while stopping, the hook gets a few seconds at most: the service manager's stop
        # timeout (contrib/realm-daemon.service) budgets the child's grace, not the hook's
        timeout = min(self.cfg.on_job_end_timeout, 5.0) if self.stop_requests else \
            self.cfg.on_job_end_timeout
        try:
            run_job_end_hook(self.cfg.on_job_end, timeout, self.paths, job, self.say)
        except Exception as exc:  # noqa: BLE001 - a notice must never stop the daemon
            log.error("hook.failed", job_id=job.id, hook="on_job_end",
                      error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())

    def _supervise(self, job: Job, child: Child) -> None:
        limit_setup, setup_why = setup_limit(self.cfg)
        beat = self.cfg.heartbeat_seconds
        tick = min(beat, PROGRESS_SECONDS) if self.progress.enabled else beat
        next_beat = time.monotonic() + beat
        while not child.wait(timeout=tick):
            self.progress.update(job, child.files.progress)
            on_beat = time.monotonic() >= next_beat
            if not on_beat and self.stop_requests == 0:
                continue  # a bar-only tick: stop requests are still acted on at once
            if on_beat:  # the lease and the cancel check stay on the heartbeat
                next_beat = time.monotonic() + beat
                if not self._renew_lease(job):
                    child.kill("lease lost: another daemon reaped this job (see logs/jobs.jsonl)")
                    return
                self._notice_cancel(job, child)
            if self.stop_requests >= 2:
                child.kill("second stop signal (cold stop)")
            elif self.stop_requests == 1 or self._cancel_for(job) is not None:
                child.request_stop()
                if child.stop_sent_at is not None and \
                        time.monotonic() - child.stop_sent_at > self.cfg.stop_grace_seconds:
                    child.kill(f"no clean stop within daemon.stop_grace_seconds "
                               f"({self.cfg.stop_grace_seconds:g} s)")
            else:
                self._judge_liveness(child, limit_setup, setup_why)

    def _cancel_for(self, job: Job) -> CancelRequest | None:
        """The cancel request seen for this claim of ``job`` (a request is for one claim: one
        left from an earlier attempt of the same job never stops a retry)."""
        request = self._cancels.get(job.id)
        return request if request is not None and request.started_at == job.started_at else None

    def _notice_cancel(self, job: Job, child: Child) -> None:
        """A cancel request for this claim (``realm queue cancel``): ask the child to stop at
        the next step boundary; it removes its own checkpoints and reports ``cancelled``."""
        if self._cancel_for(job) is not None:
            return
        request = child.files.cancel_request(job.started_at)
        if request is not None:
            self._cancels[job.id] = request
            log.warning("job.cancel_requested", job_id=job.id, by=request.by,
                        reason=request.reason, last_sign=child.alive.last_phase)
            self.say(f"cancel of {job.id} requested by {request.by}: stopping it at the next "
                     "step boundary")

    def _judge_liveness(self, child: Child, limit_setup: float, setup_why: str) -> None:
        """Kill a child whose counter has not changed for too long, by this daemon's clock."""
        silent = child.alive.poll()
        if child.alive.stepped:
            limit, why = self.cfg.job_timeout, f"daemon.job_timeout {self.cfg.job_timeout:g} s"
            during = "while training"
        else:
            limit, why, during = limit_setup, setup_why, "during setup"
        if silent > limit:
            child.kill(f"timeout: no sign of life for {silent:.0f} s {during} ({why}; last "
                       f"sign: {child.alive.last_phase})", kind="timeout")

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
            if self._still_ours(job):  # e.g. its dataset vanished: the record will say so
                log.warning("job.lease_not_renewed", job_id=job.id, reason=str(exc))
                return True
            log.error("job.lease_lost", job_id=job.id, reason=str(exc))
            return False
        except Exception as exc:  # noqa: BLE001 - a damaged sidecar must not stop the daemon
            log.error("job.lease_not_renewed", job_id=job.id,
                      error=f"{type(exc).__name__}: {exc}")
            return True

    def _still_ours(self, job: Job) -> bool:
        """The sidecar where we left it still names this daemon (unreadable counts as ours:
        nobody else could have claimed it)."""
        try:
            current = Job.from_dict(read_sidecar_json(sidecar_of(self.paths.base /
                                                                   job.dataset_path)))
        except FileNotFoundError:
            return False
        except Exception:  # noqa: BLE001 - garbage in the sidecar: the queue restores it
            return True
        return self._ours(current)

    def _record(self, job: Job, end: ChildEnd, outcome: Outcome) -> Job:
        """Move the job by its outcome; a fault here is logged, never fatal (the job stays
        where it is, visible, and a later reap or a restart deals with it)."""
        try:
            moved = self._move_by_outcome(job, end, outcome)
        except Exception as exc:  # noqa: BLE001 - SidecarError, OSError, ClaimLost, ...
            log.error("job.record_failed", job_id=job.id, outcome=outcome.to_dict(),
                      error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
            self.say(f"  could not record {job.id} ({outcome.kind}: {outcome.reason}): "
                     f"{type(exc).__name__}: {exc}; trying again every round")
            self._unrecorded.append((job, end, outcome))
            moved = job
        with contextlib.suppress(OSError):
            JobFiles.of(self.paths.status, job.id).remove()  # alive, stop, outcome, progress
        return moved

    def _record_again(self) -> None:
        """Outcomes that could not be recorded: try again (the sidecar may be fixed or
        restored now); a job that is no longer ours is dropped by ``_move_by_outcome``."""
        pending, self._unrecorded = self._unrecorded, []
        for job, end, outcome in pending:
            try:
                moved = self._move_by_outcome(job, end, outcome)
                self.say(_describe(moved, outcome))
                self._job_ended(moved)
            except Exception as exc:  # noqa: BLE001 - still blocked: keep it, quietly
                log.debug("job.record_still_failing", job_id=job.id, error=str(exc))
                self._unrecorded.append((job, end, outcome))

    def _move_by_outcome(self, job: Job, end: ChildEnd, outcome: Outcome) -> Job:
        try:
            return self._move_ours(job, end, outcome)
        finally:
            if self._cancels.get(job.id) is not None and \
                    self._cancels[job.id].started_at == job.started_at:
                del self._cancels[job.id]  # whatever happened to it, this claim is over

    def _move_ours(self, job: Job, end: ChildEnd, outcome: Outcome) -> Job:
        if not self._still_ours(job):  # fenced: never move a job another daemon holds now
            log.error("job.lease_lost", job_id=job.id, reason=end.reason)
            self.say(f"  lost {job.id}: another daemon reaped it (or its sidecar vanished); "
                     "its outcome here is dropped")
            return job
        cancel = self._cancel_of(job, outcome)
        if cancel is not None:
            note = (f"; the child ended without removing its checkpoints ("
                    f"{outcome.reason or outcome.kind}): the campaign's next job discards them")
            moved = self.queue.cancel(job, cancel.describe(note=note), running=True,
                                      results=outcome.results)
        elif end.signal is not None and self.stop_requests and \
                outcome.kind not in ("completed", "cancelled"):
            moved = self.queue.requeue(job, f"daemon stopped: {end.reason}",
                                       resume=outcome.resume, results=outcome.results)
        else:
            moved = record_outcome(self.queue, job, outcome, self.cfg.max_attempts)
        if outcome.kind == "no_space":
            self.no_space_seen(outcome)
        bucket = {JobState.COMPLETED: self.summary.completed, JobState.FAILED: self.summary.failed,
                  JobState.CANCELLED: self.summary.cancelled}.get(moved.status,
                                                                   self.summary.requeued)
        bucket.append(moved)
        log.info("job.finished", job_id=moved.id, status=moved.status.value,
                 kind=outcome.kind, reason=outcome.reason or end.reason)
        return moved

    def _cancel_of(self, job: Job, outcome: Outcome) -> CancelRequest | None:
        """The cancel request that decides this job's end when its child did not report
        ``cancelled`` itself (killed after the grace, crashed, stopped before it saw the
        request); None when there is none, or the outcome stands: completed, cancelled (the
        child's own reason), or a permanent failure."""
        if outcome.kind in ("completed", "cancelled") or outcome.permanent:
            return None
        return self._cancel_for(job) or \
            JobFiles.of(self.paths.status, job.id).cancel_request(job.started_at)

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
        try:
            self.status_path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.status_path, {
                "schema": 1, "state": state, "pid": os.getpid(), "host": host_name(),
                "started": self.worker["started"], "devices": self.devices,
                "role": "member" if self.join else "claims", "ranks": self.device_set.ranks,
                "kind": self.kind, "nodes": self.nodes, "updated_at": utc_now(), **fields},
                fsync=False)
        except OSError as exc:  # a full disk or a removed status/ must not stop the daemon
            log.error("daemon.status_not_written", state=state, error=str(exc))


NODE_GRACE = 30.0
"""Seconds a member's launcher may outlive the claim it joined (a group ending on its own
finishes well within it) before the member kills it."""
PROGRESS_SECONDS = 0.2
"""How often the terminal bar reads the child's progress file (the lease is still renewed every
``daemon.heartbeat_seconds``)."""


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


class ProgressView:
    """A progress bar for the running job, on a terminal only (tqdm), fed from the child's
    ``status/jobs/<job>.progress.json``: the child's own step, total, step time and ETA (tqdm's
    rate guess is never shown: a first frame would read thousands of steps a second). The bar
    appears with the child's first step. ``say`` messages go above the bar (``external_write_mode``
    clears it first, also wiping an echoed ``^C``), so they never tear it."""

    BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.enabled = self.stream.isatty()
        self.bar = None

    def writer(self, say):
        """``say`` that clears the bar, prints, and draws the bar again below the message."""
        def write(message: str) -> None:
            if self.bar is None:
                if self.enabled:  # a bar being drawn, or an echoed ^C: start on a clean line
                    self.stream.write("\r\x1b[2K")
                say(message)
                return
            import tqdm

            with tqdm.tqdm.external_write_mode(file=self.stream):
                say(message)
                self.stream.flush()
        return write

    def update(self, job: Job, status_file: Path) -> None:
        """Never raises: a terminal that goes away (EIO after a hang-up) turns the bar off, it
        does not take the job down."""
        if not self.enabled:
            return
        try:
            self._update(job, status_file)
        except Exception as exc:  # noqa: BLE001 - a display must not stop training
            log.warning("progress.disabled", error=f"{type(exc).__name__}: {exc}")
            self.enabled = False

    def _update(self, job: Job, status_file: Path) -> None:
        try:
            status = json.loads(status_file.read_text())
        except (OSError, ValueError):
            return
        if status.get("job_id") != job.id or not isinstance(status.get("total_steps"), int):
            return
        if self.bar is None:
            import tqdm

            tqdm.tqdm.monitor_interval = 0  # no monitor thread
            # the first frame already shows the child's step and numbers (never 0/N, no rate)
            self.bar = tqdm.tqdm(total=status["total_steps"], desc=job.dataset_name,
                                 initial=status.get("job_step") or 0, unit="step",
                                 postfix=self.postfix(status), file=self.stream, leave=False,
                                 bar_format=self.BAR_FORMAT, dynamic_ncols=True)
            return
        self.bar.total = status["total_steps"]
        self.bar.n = status.get("job_step") or 0
        self.bar.set_postfix_str(self.postfix(status), refresh=False)
        self.bar.refresh()

    @staticmethod
    def postfix(status: dict) -> str:
        """The child's ETA and step time, then loss and throughput."""
        metrics = status.get("metrics") or {}
        parts = [f"eta {_clock(status.get('eta_seconds'))}"]
        if metrics.get("step_latency_ms"):
            parts.append(f"{metrics['step_latency_ms'] / 1000:.2f} s/step")
        if isinstance(metrics.get("loss"), (int, float)):
            parts.append(f"loss {metrics['loss']:.4f}")
        if metrics.get("tokens_per_sec"):
            parts.append(f"{metrics['tokens_per_sec']:,.0f} tok/s")
        return ", ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _describe(job: Job, outcome: Outcome) -> str:
    if job.status is JobState.COMPLETED:
        loss = f"{job.final_loss:.4f}" if job.final_loss is not None else "n/a"
        return (f"  completed {job.id}: steps {job.start_step} -> {job.final_step}, "
                f"final loss {loss}, {job.tokens_per_sec_avg or 0:,.0f} tokens/s")
    if job.status is JobState.PROCESSING:  # could not be recorded (said above)
        return f"  {job.id} left in processing: {outcome.reason or outcome.kind}"
    return f"  {job.status.value} {job.id}: {outcome.reason or job.last_error or outcome.kind}"


def drain(paths: RealmPaths, daemon_cfg, *, extra_args: list[str] | None = None,
          say=print) -> DrainSummary:
    """``realm daemon --once``: train until the queue is empty (waiting for settling files)."""
    return Daemon(paths, daemon_cfg, once=True, extra_args=extra_args, say=say,
                  join=False).run()  # a member never drains: it claims nothing
