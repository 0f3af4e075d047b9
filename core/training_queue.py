"""The file-backed priority queue: adoption, ordering, claims and every job move.

State is location + sidecar: ``queue/{high,normal,low}/`` hold queued jobs, and
``queue/{processing,completed,failed,skipped,cancelled}/`` the rest. There is no global metadata
file. Every mutation (adopt, claim, move, sidecar rewrite) runs under one ``flock`` on
``queue/.queue.lock`` and moves the pair sidecar-first with no-replace renames, so among any number
of processes on one file system exactly one claims a job, and a crash between the two renames is
repaired on the next mutation (the sidecar still records where its dataset was). Nothing is
deleted; a name collision gets a ``name.2.jsonl`` suffix.

Entry point: ``python -m core.training_queue status`` (same as ``realm queue status``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import structlog

from core.errors import ClaimLost, InputError, JobNotFound, JobRunning, SidecarError, UsageError
from core.fsutil import host_name, locked, rename_noreplace, unique_name, write_json_atomic
from core.job import TERMINAL, Job, JobState, check_user_sidecar, new_job_id, transition, utc_now
from core.job_ledger import JobLedger
from core.paths import (DATASET_SUFFIX, PRIORITIES, SIDECAR_SUFFIX, STATE_FOLDERS, RealmPaths,
                        resolve_base, sidecar_of)
from core.queue_scan import (Listing, SidecarCache, digest_file, estimate_tokens, folder_state,
                             parse_sidecar, read_sidecar_json, scan_folder, shown)
from core.settle import Settler
from core.sidecar import RealmKey
from core.validate import check_file_name

log = structlog.get_logger("realm.queue")
MID_MOVE_READS, MID_MOVE_PAUSE = 40, 0.005
"""A record read mid-move is read again up to 40 times, 5 ms apart (``_after_move``)."""





def worker_identity() -> dict:
    return {"host": host_name(), "pid": os.getpid()}


class TrainingQueue:
    """One realm's queue. Reads are lock-free; every write holds the queue lock."""

    def __init__(self, base: str | os.PathLike | None = None, *, settle_seconds: float = 2.0,
                 settler: Settler | None = None):
        self.paths = RealmPaths(resolve_base(base))
        self.settler = settler or Settler(settle_seconds)
        self.ledger = JobLedger(self.paths.ledger)
        self.key = RealmKey(self.paths)
        self.cache = SidecarCache(self.key)

    # --- reading ---------------------------------------------------------------------------

    def listing(self, folder: str) -> Listing:
        return scan_folder(self.paths, folder)

    def jobs_in(self, folder: str, problems: list | None = None) -> list[Job]:
        """Adopted jobs in ``folder``; unreadable sidecars go to ``problems``."""
        return self._split(self.listing(folder), problems).jobs

    def _split(self, listing: Listing, problems: list | None = None) -> "_Split":
        """Sort a folder's datasets into adopted jobs, new datasets and blocked ones."""
        split, state = _Split(), folder_state(listing.folder)
        for name, entry in listing.datasets.items():
            sidecar = listing.sidecars.get(name)
            loaded = {} if sidecar is None else self._load(sidecar, problems)
            if loaded is None and sidecar is not None and not os.path.exists(sidecar.path):
                continue  # the pair moved on (another process claimed it): not ours to show
            if isinstance(loaded, Job):
                if loaded.status is not state:  # read between a move's rename and rewrite
                    loaded = self._after_move(Path(sidecar.path), state) or loaded
                # the folder is the truth: a sidecar read between a move's rename and its
                # rewrite still names its previous folder
                loaded.status = state
                loaded.dataset_path = self.paths.relative(Path(entry.path))
                split.jobs.append(loaded)
            elif isinstance(loaded, dict):
                split.new.append((name, loaded))
            else:
                split.blocked.append(name)
        for name in set(listing.sidecars) - set(listing.datasets):
            loaded = self._load(listing.sidecars[name], problems)
            if isinstance(loaded, Job) and state is not JobState.QUEUED:
                # its dataset vanished (deleted during training, or a move a crash cut short):
                # the record stays visible where it is
                loaded.status = state
                split.jobs.append(loaded)
            elif isinstance(loaded, Job):
                split.orphans.append(name)
        if problems is not None:
            problems.extend(listing.problems)
        return split

    def _load(self, entry: os.DirEntry, problems: list | None) -> Job | dict | None:
        try:
            return self.cache.load(entry)
        except SidecarError as exc:
            if problems is not None:
                rel = shown(self.paths.relative(Path(entry.path)))
                problem = str(exc).replace(shown(entry.path), rel)
                folder = Path(entry.path).parent.name
                if folder not in PRIORITIES:
                    problem += (f" Do not delete it: in queue/{folder}/ the sidecar is the job's "
                                "record; logs/jobs.jsonl holds its history.")
                else:
                    problem += " (Deleting it makes realm adopt the dataset as a new job.)"
                problems.append({"path": rel, "problem": problem})
            return None

    def _after_move(self, path: Path, state: JobState) -> Job | None:
        """The record a move is writing. A sidecar read between a move's rename and its rewrite
        is the record as it was before the move: its previous state, and none of what the move
        records (a completed job's steps and loss, a failure's reason). The mover holds the
        queue lock and rewrites it at once, so read it again for a moment; None when it does
        not settle (a move a crash cut short: the folder stays the truth)."""
        for _ in range(MID_MOVE_READS):
            time.sleep(MID_MOVE_PAUSE)
            try:
                job = parse_sidecar(path, self.key)
            except (FileNotFoundError, SidecarError):
                return None
            if isinstance(job, Job) and job.status is state:
                return job
        return None

    def queued(self, problems: list | None = None) -> list[Job]:
        """Adopted queued jobs in the exact order they will be claimed."""
        return [job for p in PRIORITIES for job in claim_order(self.jobs_in(p, problems))]

    def waiting(self, priority: str) -> list[tuple[str, str]]:
        """Inbox datasets with no adopted sidecar yet, in adoption (name) order, each with
        ``waiting`` (will be adopted once settled) or ``blocked`` (its sidecar is invalid)."""
        split = self._split(self.listing(priority))
        rows = [(n, "waiting") for n, _ in split.new] + [(n, "blocked") for n in split.blocked]
        return sorted(rows)

    def all_jobs(self, problems: list | None = None) -> Iterator[Job]:
        yield from self.queued(problems)
        for folder in STATE_FOLDERS:
            yield from self.jobs_in(folder, problems)

    def _distinct(self, jobs: Iterator[Job]) -> list[Job]:
        """One record per job id. A scan that lists folders one after another can meet a job
        twice while another process moves it (its sidecar renamed between two listings): the
        copy whose sidecar is still where it was read is the current one."""
        by_id: dict[str, list[Job]] = {}
        for job in jobs:
            by_id.setdefault(job.id, []).append(job)
        out = []
        for copies in by_id.values():
            if len(copies) > 1:
                here = [j for j in copies
                        if sidecar_of(self.paths.queue_entry(j.dataset_path)).exists()]
                copies = here or copies
            out.append(copies[-1])
        return out

    def find(self, ref: str) -> Job:
        """A job by id, current dataset file name or path, dataset stem (``addition-a`` for
        ``addition-a.jsonl``, the name it was added under or the one it has now), or unique id
        prefix; the first of these that matches anything decides."""
        jobs = self._distinct(self.all_jobs())
        for match in (lambda j: ref in (j.id, Path(j.dataset_path).name, j.dataset_path),
                      lambda j: ref in (_stem(j.dataset_name), _stem(Path(j.dataset_path).name)),
                      lambda j: j.id.startswith(ref)):
            matches = [j for j in jobs if match(j)]
            if matches:
                break
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise JobNotFound(
                f"no job matches {ref!r} (by id, id prefix, dataset file name or stem); "
                "`realm queue list --state all` shows every job.")
        listed = "\n".join(f"  {j.id}  {j.status.value:<10} {j.dataset_path}"
                           for j in matches[:10])
        more = f"\n  ... and {len(matches) - 10} more" if len(matches) > 10 else ""
        raise JobNotFound(f"{ref!r} matches {len(matches)} jobs:\n{listed}{more}\ngive one of "
                          "these job ids (or a longer prefix of one).")

    # --- adoption -----------------------------------------------------------------------------

    def adopt_new(self, splits: dict[str, "_Split"] | None = None) -> list[Job]:
        """Write sidecars for settled new datasets in the inboxes; return the new jobs.

        ``splits`` (inbox -> _Split) lets ``claim_next`` share one scan; tiers that gained jobs
        are scanned again in place.
        """
        splits = splits if splits is not None else {}
        candidates = []
        for priority in PRIORITIES:
            if priority not in splits:
                splits[priority] = self._split(self.listing(priority))
            split = splits[priority]
            for name, user in sorted(split.new):
                path = self.paths.state_dir(priority) / name
                try:
                    st = os.stat(path, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if self.settler.is_settled(str(path), st.st_size, st.st_mtime_ns):
                    try:
                        digest = digest_file(path)  # outside the lock: may be slow
                    except (FileNotFoundError, InputError):
                        continue  # moved meanwhile, or replaced by something not a file
                    candidates.append((priority, name, st, user, digest))
        if not candidates:
            return []
        discovered_at = utc_now()  # one stamp per scan: ties within it break by name
        with self._locked():
            # A dataset without a sidecar may be the second half of a move a crash interrupted:
            # finish such moves before treating anything as new.
            self._repair_locked()
            adopted = [job for c in candidates if (job := self._adopt_one(c, discovered_at))]
        for priority in {c[0] for c in candidates}:  # adopted here or by another process
            splits[priority] = self._split(self.listing(priority))
        return adopted

    def _adopt_one(self, candidate: tuple, discovered_at: str) -> Job | None:
        """Adopt one file; a file that cannot be adopted is logged and left, never fatal."""
        try:
            return self._adopt_locked(*candidate, discovered_at)
        except OSError as exc:
            log.warning("queue.adopt_failed", path=f"queue/{candidate[0]}/{candidate[1]}",
                        error=str(exc))
            return None

    def _adopt_locked(self, priority, name, st, user, digest, discovered_at) -> Job | None:
        path = self.paths.state_dir(priority) / name
        try:
            now_st = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if (now_st.st_size, now_st.st_mtime_ns, now_st.st_ino) != (st.st_size, st.st_mtime_ns,
                                                                    st.st_ino):
            return None  # changed since we hashed it: the settle rule will see it again
        sidecar = sidecar_of(path)
        if os.path.lexists(sidecar):
            try:  # a pre-written sidecar must still be the one we read, and not yet adopted
                if check_user_sidecar(read_sidecar_json(sidecar), str(sidecar)) != user:
                    return None
            except SidecarError:
                return None
        elif user:
            return None
        job = self._new_job(path, priority, digest, discovered_at, user)
        job.dataset_mtime_ns = st.st_mtime_ns
        self._write_sidecar(sidecar, job, replace=bool(user))
        self.ledger.append(job, job.history[-1])
        self.settler.forget(str(path))
        return job

    def _new_job(self, path: Path, priority: str, digest, created_at: str, user: dict) -> Job:
        job = Job(
            id=new_job_id(path.name),
            dataset_path=self.paths.relative(path),
            dataset_name=path.name,
            priority=priority,
            dataset_sha256=digest.sha256,
            num_bytes=digest.num_bytes,
            num_examples=digest.num_examples,
            estimated_tokens=estimate_tokens(digest.num_bytes),
            created_at=created_at,
            **user,
        )
        how = "pre-written sidecar merged" if user else "sidecar created"
        job.history.append({"from": None, "to": "queued", "at": created_at,
                            "reason": f"adopted from queue/{priority}/ ({how})"})
        return job

    # --- adding from the command line ---------------------------------------------------------

    def add(self, source: Path, *, priority: str = "normal", hero_id: str | None = None,
            campaign_id: str | None = None, overrides: dict | None = None) -> Job:
        """Copy ``source`` into an inbox atomically (temp name, then rename) as a queued job."""
        source = Path(source)
        if priority not in PRIORITIES:
            raise UsageError(f"--priority {priority!r}: choose high, normal or low.")
        if not source.is_file():
            raise UsageError(f"{source}: no such file; give the path of a .jsonl dataset.")
        if not source.name.endswith(DATASET_SUFFIX) or source.name.startswith("."):
            raise UsageError(f"{source}: datasets must be visible .jsonl files; rename it to "
                             f"end in .jsonl.")
        if (bad := check_file_name(source.name, str(source.parent))):
            raise UsageError(f"{bad}.")
        inbox = self.paths.state_dir(priority)
        tmp = inbox / f".{source.name}.{os.getpid()}.part"
        shutil.copyfile(source, tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        digest = digest_file(tmp)
        with self._locked():
            name = unique_name(inbox, source.name)
            final = inbox / name
            user = {"hero_id": hero_id, "campaign_id": campaign_id, "overrides": overrides or {}}
            job = self._new_job(final, priority, digest, utc_now(), user)
            job.dataset_mtime_ns = os.stat(tmp).st_mtime_ns
            job.history[-1]["reason"] = f"added by realm queue add from {source}"
            # Sidecar first: a dataset never sits in an inbox without its record.
            self._write_sidecar(sidecar_of(final), job, replace=False)
            rename_noreplace(tmp, final)
            self.ledger.append(job, job.history[-1])
        return job

    # --- claims and moves ---------------------------------------------------------------------

    def claim_next(self, worker: dict | None = None,
                   defer: Callable[[Job], bool] | None = None) -> Job | None:
        """Adopt what is new, then claim the first queued job; None when the queue is empty.
        Jobs for which ``defer`` says True are taken only when no other job is queued."""
        splits = {p: self._split(self.listing(p)) for p in PRIORITIES}  # one scan, two uses
        if any(split.orphans for split in splits.values()):
            self.repair_half_moves()
            splits = {p: self._split(self.listing(p)) for p in PRIORITIES}
        self.adopt_new(splits)
        for skip in ([defer, None] if defer is not None else [None]):
            for priority in PRIORITIES:
                for job in _claim_candidates([j for j in splits[priority].jobs if not j.held]):
                    if skip is not None and skip(job):
                        continue
                    if not self._unchanged_since_adoption(job):
                        continue
                    try:
                        return self._move(job, JobState.PROCESSING,
                                          reason=f"claimed by {_who(worker)}",
                                          mutate=lambda j: _stamp_worker(j, worker),
                                          guard=_not_held)
                    except ClaimLost:
                        continue  # another process won this one: take the next
                    except SidecarError:  # changed in place since it was cached: re-read later
                        self.cache.forget(str(sidecar_of(self.paths.base / job.dataset_path)))
                        continue
        return None

    def complete(self, job: Job, *, reason: str = "training finished", **results) -> Job:
        """processing -> completed, recording final_step, final_loss and friends."""
        return self._move(job, JobState.COMPLETED, reason=reason,
                          mutate=lambda j: _apply_results(j, results))

    def fail(self, job: Job, reason: str, *, retryable: bool = False,
             max_attempts: int = 3, same_lease: bool = False,
             results: dict | None = None) -> Job:
        """A retryable failure requeues until ``max_attempts``; anything else fails for good.

        ``same_lease``: only if the sidecar still holds the lease ``job`` shows (same worker,
        same heartbeat), checked under the queue lock; otherwise ClaimLost. A reaper works from
        a listing that may be stale: without this it could reap a claim made after it looked.
        """
        def lease_unchanged(j: Job) -> None:
            if (j.worker, j.heartbeat_at) != (job.worker, job.heartbeat_at):
                raise ClaimLost(f"{job.id}: its lease changed after it was judged expired")

        guard = lease_unchanged if same_lease else None

        def record(j: Job) -> None:
            _apply_results(j, results or {})
            j.last_error = reason
            if retryable:
                j.attempts += 1

        attempts_after = job.attempts + (1 if retryable else 0)
        if retryable and attempts_after < max_attempts:
            return self._move(job, JobState.QUEUED, mutate=record, guard=guard,
                              reason=f"retryable failure, attempt {attempts_after}/{max_attempts}"
                                     f": {reason}")
        if retryable:
            reason = f"gave up after {attempts_after} attempts: {reason}"
        return self._move(job, JobState.FAILED, reason=reason, mutate=record, guard=guard)

    def skip(self, job: Job, reason: str = "skipped by user") -> Job:
        """queued -> skipped: set aside by a person, kept with its record and never claimed
        until ``retry`` queues it again (cancel withdraws a job; skip only defers it)."""
        self._refuse_running(job, "skip")
        return self._move(job, JobState.SKIPPED, reason=reason)

    def requeue(self, job: Job, reason: str, *, resume: dict | None = None,
                results: dict | None = None) -> Job:
        """processing -> queued in the job's own priority folder, keeping its resume point."""
        def keep_resume(j: Job) -> None:
            _apply_results(j, results or {})
            if resume is not None:
                j.resume = resume

        return self._move(job, JobState.QUEUED, reason=reason, mutate=keep_resume)

    def hold(self, job: Job, reason: str = "held by user") -> Job:
        """Keep a queued job where it is but never claim it until ``release``; recorded in the
        sidecar (``held``) and its history, under the queue lock like every other write."""
        return self._mark_held(job, reason, hold=True)

    def release(self, job: Job, reason: str = "released by user") -> Job:
        """A held job becomes claimable again, in its old place (its claim order is unchanged)."""
        return self._mark_held(job, reason, hold=False)

    def _mark_held(self, job: Job, reason: str, *, hold: bool) -> Job:
        verb = "hold" if hold else "release"
        with self._locked():
            fresh = self._fresh(job)
            if fresh.status is not JobState.QUEUED:
                raise UsageError(f"job {job.id} is {fresh.status.value}; `queue {verb}` applies "
                                 "to queued jobs only"
                                 + (" (`realm queue retry` queues it again)."
                                    if fresh.status in TERMINAL else "."))
            if bool(fresh.held) == hold:
                raise UsageError(f"job {job.id} is {'already held: ' + fresh.held if hold else 'not held'}"
                                 f"; nothing to {verb}.")
            fresh.held = reason if hold else None
            entry = {"from": "queued", "to": "queued", "at": utc_now(),
                     "reason": f"{'held' if hold else 'released'}: {reason}"}
            fresh.history.append(entry)
            self._write_sidecar(sidecar_of(self.paths.queue_entry(fresh.dataset_path)), fresh)
            self.ledger.append(fresh, entry)
            return fresh

    def retry(self, job: Job, reason: str = "retry requested") -> Job:
        """failed, skipped or cancelled -> queued; the attempt budget starts again."""
        previous = job.attempts

        def reset(j: Job) -> None:
            j.attempts = 0

        return self._move(job, JobState.QUEUED, mutate=reset,
                          reason=f"{reason} (attempts reset from {previous})")

    def cancel(self, job: Job, reason: str = "cancelled by user", *, running: bool = False,
               same_lease: bool = False, results: dict | None = None) -> Job:
        """-> cancelled. A queued job at once; a processing one only with ``running`` (its
        daemon, after the child stopped, or the CLI when the owner is gone): everyone else asks
        the owning daemon with a cancel request (``realm queue cancel``). Judged on the sidecar
        as it is under the lock, so a job claimed since the caller looked is refused, never
        pulled from under its daemon. ``same_lease`` as in ``fail``."""
        def check(j: Job) -> None:
            if not running:
                self._refuse_running(j, "cancel")
            if same_lease and (j.worker, j.heartbeat_at) != (job.worker, job.heartbeat_at):
                raise ClaimLost(f"{job.id}: its lease changed after it was judged expired")

        return self._move(job, JobState.CANCELLED, reason=reason, guard=check,
                          mutate=lambda j: _apply_results(j, results or {}))

    @staticmethod
    def _refuse_running(job: Job, verb: str) -> None:
        if job.status is not JobState.PROCESSING:
            return
        fix = ("`realm queue cancel` of a running job asks its daemon to stop it at the next "
               "step boundary" if verb == "cancel" else
               f"Stop the daemon (SIGTERM returns the job to queued), then {verb} it")
        raise JobRunning(f"job {job.id} is processing on {_who(job.worker)}; `queue {verb}` "
                         f"moves queued jobs only. {fix}.")

    def rewrite(self, job: Job, mutate: Callable[[Job], None]) -> Job:
        """Read-modify-write a job's sidecar in place (heartbeats, progress), under the lock."""
        with self._locked():
            fresh = self._fresh(job, restore=True)
            mutate(fresh)
            self._write_sidecar(sidecar_of(self.paths.queue_entry(fresh.dataset_path)), fresh)
            return fresh

    def _fresh(self, job: Job, *, restore: bool = False) -> Job:
        """The job as its sidecar says now; ClaimLost if it is no longer where ``job`` says.

        ``restore``: the caller's ``job`` is the record realm last wrote (the daemon holding a
        lease): a sidecar someone overwrote with garbage is rewritten from it instead of failing.
        """
        path = self.paths.queue_entry(job.dataset_path)
        try:
            fresh = parse_sidecar(sidecar_of(path), self.key)
        except FileNotFoundError:
            raise ClaimLost(job.id) from None
        except SidecarError as exc:
            if not restore:
                raise
            log.warning("sidecar.restored", job_id=job.id, problem=str(exc))
            fresh = Job.from_dict(job.to_dict())
        if not isinstance(fresh, Job) or fresh.id != job.id:
            raise ClaimLost(job.id)
        fresh.status = folder_state(path.parent.name)
        return fresh

    def _write_sidecar(self, path: Path, job: Job, *, replace: bool = True) -> None:
        write_json_atomic(path, self.key.sealed(job.to_dict()), replace=replace)

    def _unchanged_since_adoption(self, job: Job) -> bool:
        """False (and the record refreshed once the file settles again) when the dataset's size
        or mtime differ from what was hashed: a file replaced or still being appended to is
        never trained under the old hash."""
        path = self.paths.queue_entry(job.dataset_path)
        try:
            st = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        recorded = (job.num_bytes, job.dataset_mtime_ns or st.st_mtime_ns)
        if (st.st_size, st.st_mtime_ns) == recorded:
            return True
        return self.settler.is_settled(str(path), st.st_size, st.st_mtime_ns) and \
            self._readopt(job, path, st)

    def _readopt(self, job: Job, path: Path, st: os.stat_result) -> bool:
        """Hash the changed file again and record it; True when the record now matches."""
        try:
            digest = digest_file(path)
        except (FileNotFoundError, InputError):
            return False
        before = job.num_bytes

        def refresh(j: Job) -> None:
            if os.stat(path, follow_symlinks=False).st_mtime_ns != st.st_mtime_ns:
                raise ClaimLost(f"{j.id}: changed again while hashed")
            j.dataset_sha256, j.num_bytes, j.num_examples = (digest.sha256, digest.num_bytes,
                                                             digest.num_examples)
            j.estimated_tokens = estimate_tokens(digest.num_bytes)
            j.dataset_mtime_ns = st.st_mtime_ns
            j.history.append({"from": "queued", "to": "queued", "at": utc_now(),
                              "reason": f"re-adopted: the dataset changed after adoption "
                                        f"({before} -> {digest.num_bytes} bytes); hashed again"})

        try:
            self.rewrite(job, refresh)
        except (ClaimLost, FileNotFoundError):
            return False
        self.settler.forget(str(path))
        return True

    def _move(self, job: Job, to: JobState, *, reason: str,
              mutate: Callable[[Job], None] | None = None,
              guard: Callable[[Job], None] | None = None) -> Job:
        with self._locked():
            fresh = self._fresh(job, restore=to is not JobState.PROCESSING)
            if guard:
                guard(fresh)  # may refuse (ClaimLost) before anything changes
            src = self.paths.queue_entry(fresh.dataset_path)
            vanished = not os.path.lexists(src)
            if vanished:  # deleted under us: the record moves alone and stays visible
                if to is JobState.PROCESSING:
                    raise ClaimLost(f"{job.id}: its dataset {fresh.dataset_path} is gone")
                reason += f" (its dataset {fresh.dataset_path} vanished: the record moved alone)"
                if to is JobState.QUEUED and fresh.status is not JobState.PROCESSING:
                    raise UsageError(f"job {job.id}: its dataset {fresh.dataset_path} is gone, "
                                     "so it cannot be queued again; add the file again with "
                                     "`realm queue add FILE`.")
                if to is JobState.QUEUED:
                    to, reason = JobState.FAILED, f"{reason}; it cannot be queued again"
            entry = transition(fresh, to, reason=reason)  # raises before anything moves
            if to is not JobState.QUEUED:
                fresh.held = None  # a hold belongs to the queue: cancel or skip ends it
            if mutate:
                mutate(fresh)
            if vanished and to is JobState.FAILED:
                fresh.last_error = reason
            folder = fresh.priority if to is JobState.QUEUED else to.value
            dst = self._move_pair(src, self.paths.state_dir(folder))
            fresh.dataset_path = self.paths.relative(dst)
            self._relocate_reasons(fresh, entry, src, dst)
            self._write_sidecar(sidecar_of(dst), fresh)
            self.ledger.append(fresh, entry)
            return fresh

    def _relocate_reasons(self, job: Job, entry: dict, src: Path, dst: Path) -> None:
        """A reason written before the move (a child's ``queue/processing/x.jsonl:2: ...``)
        names the file where it lies now, so a person can open the line it names."""
        if src == dst:
            return
        pairs = [(str(src), str(dst)), (self.paths.relative(src), self.paths.relative(dst))]

        def moved(text: str | None) -> str | None:
            if not text:
                return text
            for old, new in pairs:
                text = re.sub(re.escape(old) + r"(?![\w-]|\.\w)", new.replace("\\", r"\\"), text)
            return text

        entry["reason"] = moved(entry["reason"])
        job.last_error = moved(job.last_error)

    def _move_pair(self, src: Path, dst_dir: Path) -> Path:
        """Sidecar first (it is the record and the claim), then the dataset; never overwrite.
        A missing destination folder is made again (someone removed ``queue/processing``)."""
        dst_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            dst = dst_dir / unique_name(dst_dir, src.name)
            try:
                rename_noreplace(sidecar_of(src), sidecar_of(dst))
            except FileExistsError:
                continue  # someone dropped that name just now: pick the next suffix
            except FileNotFoundError:
                raise ClaimLost(str(src)) from None
            with contextlib.suppress(FileNotFoundError):  # a vanished dataset: record alone
                rename_noreplace(src, dst)
            return dst
        raise RuntimeError(f"could not find a free name for {src.name} in {dst_dir}")

    # --- locking and crash repair -------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.paths.queue.mkdir(parents=True, exist_ok=True)
        with locked(self.paths.queue_lock):
            yield

    def repair_half_moves(self) -> list[str]:
        """Finish pair moves that a crash interrupted between the sidecar and dataset renames."""
        with self._locked():
            return self._repair_locked()

    def _repair_locked(self) -> list[str]:
        """A sidecar whose dataset is missing still records where the dataset was; if a dataset
        without a sidecar is there, move it next to its sidecar. Caller holds the lock."""
        repaired = []
        for folder in PRIORITIES + STATE_FOLDERS:
            listing = self.listing(folder)
            for name in set(listing.sidecars) - set(listing.datasets):
                if (moved := self._repair_one(Path(listing.sidecars[name].path), name)):
                    repaired.append(moved)
        return repaired

    def _repair_one(self, sidecar: Path, name: str) -> str | None:
        """Only a sealed record is trusted, and only to move a file inside the queue."""
        try:
            job = parse_sidecar(sidecar, self.key)
            old = self.paths.queue_entry(job.dataset_path) if isinstance(job, Job) else None
        except (SidecarError, UsageError, FileNotFoundError):
            return None
        here = sidecar.parent / name
        if not isinstance(job, Job) or os.path.lexists(here):
            return None
        if old == here or os.path.lexists(sidecar_of(old)) or os.path.islink(old) \
                or not os.path.isfile(old):
            return self._orphaned(here, job)
        rename_noreplace(old, here)
        if here.parent.name == "processing" and job.status is not JobState.PROCESSING:
            # a claim cut between its two renames never started training: undo it
            back = self._move_pair(here, self.paths.state_dir(job.priority))
            job.dataset_path = self.paths.relative(back)
            self._write_sidecar(sidecar_of(back), job)
            return str(back)
        return str(here)

    def _orphaned(self, here: Path, job: Job) -> str | None:
        """A queued record whose dataset is nowhere: fail it visibly (it can never train).
        Records in other folders stay where they are (a processing one belongs to its owner)."""
        if here.parent.name not in PRIORITIES:
            return None
        reason = f"its dataset {job.dataset_path} vanished while it was queued"
        job.status = JobState.QUEUED
        entry = transition(job, JobState.FAILED, reason=reason)
        job.last_error = reason
        dst = self._move_pair(here, self.paths.state_dir("failed"))
        job.dataset_path = self.paths.relative(dst)
        self._write_sidecar(sidecar_of(dst), job)
        self.ledger.append(job, entry)
        return str(dst)


@dataclass
class _Split:
    jobs: list[Job] = field(default_factory=list)
    new: list[tuple[str, dict]] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    """Adopted records whose dataset is not beside them (a cut move, or a deleted file)."""


def _order_key(job: Job) -> tuple:
    return job.created_at, job.dataset_name, job.id


def claim_order(jobs: list[Job]) -> list[Job]:
    """Within one tier: first discovered first, ties by name."""
    return sorted(jobs, key=_order_key)


def _claim_candidates(jobs: list[Job]) -> Iterator[Job]:
    """The first job in claim order, then (only if it was lost to a race) the rest."""
    if not jobs:
        return
    first = min(jobs, key=_order_key)
    yield first
    yield from (j for j in claim_order(jobs) if j is not first)


def _not_held(job: Job) -> None:
    """Checked under the lock at claim: a hold written after the claimer's listing wins."""
    if job.held:
        raise ClaimLost(f"{job.id} was held after it was listed")


def _stem(name: str) -> str:
    return name.removesuffix(DATASET_SUFFIX)


def _who(worker: dict | None) -> str:
    worker = worker or worker_identity()
    return f"{worker.get('host')}:{worker.get('pid')}"


def _stamp_worker(job: Job, worker: dict | None) -> None:
    job.worker = worker or worker_identity()
    job.heartbeat_at = job.started_at


def _apply_results(job: Job, results: dict) -> None:
    for key, value in results.items():
        if not hasattr(job, key):
            raise TypeError(f"unknown job result field {key!r}")
        setattr(job, key, value)


if __name__ == "__main__":
    # The design card's module form (``python -m core.training_queue status``) runs the command
    # line by name: the foundation never imports the ``cli`` package above it.
    import runpy
    import sys

    sys.argv[1:1] = ["queue"]
    runpy.run_module("cli", run_name="__main__", alter_sys=True)
