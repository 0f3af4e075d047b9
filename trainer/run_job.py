"""Train one job in this process: ``python -m trainer.run_job --base-dir REALM --job SIDECAR``.

The daemon runs this as a child process. It resolves the job's config (six layers), trains
from the campaign's latest checkpoint, writes the results into the job's sidecar, and exits with
a code from ``core.exitcodes``: completed, stopped (resumable), permanent or retryable failure.
SIGTERM/SIGINT (or the daemon's stop file) request a stop at the next step boundary (with a
checkpoint).

Under torch's elastic launcher (``daemon --devices 0,1`` or ``cpu:2``) every rank runs this
module; rank 0 alone beats the heartbeat, takes the campaign's lock, records the results and
writes the outcome file; every rank exits 0 once an outcome is decided (a crash exits non-zero,
which makes the launcher tear the group down). Test-only hook: ``REALM_TEST_NAN_AT=RANK:STEP``
makes that rank's loss NaN once, at that step.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import structlog

from core import exitcodes
from core.errors import InputError
from core.job import Job
from core.logsetup import configure
from core.paths import RealmPaths, resolve_base


class _StopFlag:
    def __init__(self, stop_file: Path | None = None) -> None:
        self.requested = False
        self.stop_file = stop_file

    def __call__(self, *_args) -> bool:
        if not self.requested and self.stop_file is not None and self.stop_file.exists():
            self.requested = True
        return self.requested

    def set(self, *_args) -> None:
        self.requested = True


def build_spec(paths: RealmPaths, job: Job, cli=None):
    from core.supervisor import JobFiles
    from guild.campaigns import find_campaign
    from guild.heroes import load_hero
    from trainer.config.realm_config import resolve_for
    from trainer.engine import JobSpec

    resolved = resolve_for(paths, job=job, cli=cli)
    if resolved.campaign is None:
        raise InputError("no campaign for this job: create one with `realm campaign create NAME "
                         "--hero HERO` (it becomes active), or set campaign_id in the sidecar.")
    campaign = find_campaign(paths, resolved.campaign)
    return JobSpec(job_id=job.id, dataset=paths.base / job.dataset_path,
                   dataset_sha256=job.dataset_sha256 or "", config=resolved.config,
                   locked=resolved.locked, hero=load_hero(paths, resolved.hero_id),
                   checkpoint_root=campaign.path.parent / "checkpoints",
                   cache_root=paths.base / "cache" / "tokens", config_hash=resolved.config_hash,
                   status_path=JobFiles.of(paths.status, job.id).progress), resolved


def _record(paths: RealmPaths, job: Job, result=None, stopped=None, error: str | None = None,
            resolved=None, governor: dict | None = None):
    from core.training_queue import TrainingQueue
    from guild.campaigns import code_version

    def apply(j: Job) -> None:
        if resolved is not None:
            j.config_hash, j.git_commit = resolved.config_hash, code_version()
        if result is not None:
            j.start_step, j.final_step = result.start_step, result.final_step
            j.final_loss, j.final_val_loss = result.final_loss, result.final_val_loss
            j.tokens_per_sec_avg = round(result.tokens_per_sec_avg, 1)
            j.governor = result.governor or None
            j.metadata = {**j.metadata, "data": result.data, "resumed_from": result.resumed_from,
                          "checkpoint": str(result.checkpoint.path) if result.checkpoint else None}
        if stopped is not None:
            j.resume = {"checkpoint": paths.relative(stopped.path), "step": stopped.step}
        if error is not None:
            j.last_error = error
        if governor is not None:
            j.governor = governor

    try:
        TrainingQueue(paths.base).rewrite(job, apply)
    except Exception as exc:  # the sidecar moved (e.g. the daemon reaped it): say so, keep going
        print(f"warning: could not record results in the sidecar: {exc}", file=sys.stderr)


class Heartbeat:
    """Touches ``status/jobs/<job>.heartbeat`` after every step, and from a thread during setup
    (tokenizing a large file can take minutes without a step)."""

    def __init__(self, path: Path, every: float = 5.0):
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()
        self._setup_done = threading.Event()
        self._thread = threading.Thread(target=self._during_setup, args=(every,), daemon=True)
        self._thread.start()

    def _during_setup(self, every: float) -> None:
        while not self._setup_done.wait(every):
            self.path.touch()

    def __call__(self) -> None:
        self._setup_done.set()
        self.path.touch()

    def close(self) -> None:
        self._setup_done.set()
        self._thread.join()


def run(paths: RealmPaths, sidecar: Path, cli=None, stop: _StopFlag | None = None,
        group=None) -> int:
    from core.queue_scan import read_sidecar_json
    from core.supervisor import JobFiles
    from trainer.distributed import Group

    group = group or Group()
    job = Job.from_dict(read_sidecar_json(sidecar), source=str(sidecar))
    files = JobFiles.of(paths.status, job.id)
    stop = stop or _StopFlag()
    if group.active:  # a group stops by file (a single child gets SIGTERM): no stat per step else
        stop.stop_file = files.stop
    # alive from here on, setup included (rank 0 speaks for the group)
    beat = Heartbeat(files.heartbeat, every=1.0) if group.main else None
    try:
        code = _run(paths, job, beat or (lambda: None), cli, stop, group)
        if group.active and group.main:  # the launcher folds exit codes into 0 or 1
            files.write_outcome(code)
        return code
    finally:
        if beat is not None:
            beat.close()


class StoppedWaiting(Exception):
    """A stop arrived while this job waited for its campaign."""


@contextlib.contextmanager
def campaign_turn(checkpoint_root: Path, stop: "_StopFlag", poll: float = 0.2, group=None):
    """One job per campaign at a time, whichever daemon runs it: an ``flock`` on
    ``<campaign>/.training.lock``, held by rank 0 for the group. Waiting keeps heartbeating (the
    setup thread still runs) and gives up on a stop request; the other ranks wait in short
    all-reduces, never in one long collective. Without it two daemons could both continue from
    the same checkpoint and fork the campaign's lineage."""
    from trainer.distributed import Group

    group = group or Group()
    fd = None
    if group.main:
        path = checkpoint_root.parent / ".training.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        while True:
            got = False
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    got = True
                except BlockingIOError:
                    pass
            asked = False if got else stop()
            got, stopping = group.max([float(got), float(asked)])
            if got:
                break
            if stopping:
                raise StoppedWaiting()
            time.sleep(poll)
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _test_nan_hook(group):
    """``REALM_TEST_NAN_AT=RANK:STEP``: that rank's loss is NaN once, at that step."""
    spec = os.environ.get("REALM_TEST_NAN_AT")
    if not spec:
        return None
    rank, step = (int(x) for x in spec.split(":"))
    fired = []

    def hook(at: int, loss: float) -> float:
        if group.rank == rank and at == step and not fired:
            fired.append(at)
            return float("nan")
        return loss

    return hook


def _rank_log(paths: RealmPaths, job: Job, group):
    """Rank 0 logs to the job log (the launcher's stdout); rank N>0 to ``<job>.rank<N>.log``
    beside it, so JSON lines from several processes never interleave."""
    if group.main:
        return None
    path = paths.logs / "jobs" / f"{job.id}.rank{group.rank}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "a", buffering=1)


def _run(paths: RealmPaths, job: Job, beat, cli, stop, group) -> int:
    from trainer.engine import PERMANENT_FAILURES, StopRequested, Trainer

    resolved = None
    record = _record if group.main else (lambda *a, **k: None)  # rank 0 writes the record
    try:
        spec, resolved = build_spec(paths, job, cli)
        configure(resolved.config.logging.level, _rank_log(paths, job, group))
        if group.active:
            structlog.contextvars.bind_contextvars(rank=group.rank)
        with campaign_turn(spec.checkpoint_root, stop, group=group):
            trainer = Trainer(spec, stop_requested=stop, group=group)
            trainer.heartbeat = beat
            trainer.loss_hook = _test_nan_hook(group)
            result = trainer.train()
    except StoppedWaiting:
        return exitcodes.STOPPED
    except StopRequested as stopped:
        if stopped.checkpoint is not None:
            record(paths, job, stopped=stopped.checkpoint, resolved=resolved)
        return exitcodes.STOPPED
    except PERMANENT_FAILURES as exc:  # bad data or config, the governor: retrying cannot help
        record(paths, job, error=str(exc), governor=getattr(exc, "counts", None))
        print(f"error: {exc}", file=sys.stderr)
        return exitcodes.PERMANENT
    except MemoryError as exc:
        record(paths, job, error=f"out of memory: {exc}")
        return exitcodes.RETRYABLE
    except Exception as exc:
        if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
            record(paths, job, error=f"CUDA out of memory: {exc}")
            return exitcodes.RETRYABLE
        traceback.print_exc()
        record(paths, job, error=f"crashed: {type(exc).__name__}: {exc}")
        return exitcodes.CRASHED
    record(paths, job, result=result, resolved=resolved)
    return exitcodes.COMPLETED


def main(argv: list[str] | None = None) -> int:
    from core.cli_common import add_common_flags, cli_layer_from

    parser = argparse.ArgumentParser(prog="python -m trainer.run_job", description=__doc__)
    parser.add_argument("--base-dir", default=None)
    parser.add_argument("--job", required=True, help="the job's sidecar (.job.json)")
    add_common_flags(parser)
    args = parser.parse_args(argv)
    configure("info")
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a rank: die with the launcher, never orphaned
        from core.supervisor import die_with_parent

        die_with_parent(os.getppid())
    import transformers

    from trainer.distributed import Group

    transformers.utils.logging.disable_progress_bar()
    stop = _StopFlag()
    signal.signal(signal.SIGTERM, stop.set)
    signal.signal(signal.SIGINT, stop.set)
    paths = RealmPaths(resolve_base(args.base_dir))
    group = Group.from_env()
    code = run(paths, Path(args.job), cli_layer_from(args), stop, group)
    group.barrier()  # rank 0 has recorded the outcome: the ranks leave together
    group.close()
    if group.active:  # the outcome is in rank 0's file; non-zero makes the launcher tear down
        return 0 if code != exitcodes.CRASHED else code
    return code


if __name__ == "__main__":
    sys.exit(main())
