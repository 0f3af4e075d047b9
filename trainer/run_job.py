"""Train one job in this process: ``python -m trainer.run_job --base-dir REALM --job SIDECAR``.

The daemon runs this as a child process. It resolves the job's config (six layers), trains
from the campaign's latest checkpoint, and reports through the job protocol
(``daemon.protocol``): it advances the liveness counter after each setup phase and each
optimizer step, and writes everything it has to say (kind, reason, results, resume point) into
its outcome file; it never writes the job's sidecar (the daemon records the outcome when it
moves the job). It exits with a code from ``core.exitcodes``: completed, stopped (resumable),
permanent or retryable failure, no space. SIGTERM/SIGINT (or the daemon's stop file) request a
stop at the next step boundary (with a checkpoint).

Under torch's elastic launcher (``daemon --devices 0,1`` or ``cpu:2``) every rank runs this
module; rank 0 alone advances the counter, takes the campaign's lock and writes the outcome
file; every rank exits 0 once an outcome is decided (a crash exits non-zero, which makes the
launcher tear the group down).

Test-only hooks (environment): ``REALM_TEST_NAN_AT=RANK:STEP`` makes that rank's loss NaN once,
at that step; ``REALM_TEST_HANG=setup|step`` hangs rank 0 after its model is loaded, or after
its first optimizer step, without a sign of life; ``REALM_TEST_ENOSPC=STEP`` raises ENOSPC after
that optimizer step; ``REALM_TEST_LOGITS=FILE`` saves the trained model's logits for fixed ids
(``_test_logits_hook``).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import os
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

import structlog

from config.flags import add_common_flags, cli_layer_from
from core import exitcodes
from core.errors import InputError
from core.job import Job
from core.logsetup import configure
from core.paths import RealmPaths, resolve_base
from core.queue_scan import read_sidecar_json
from daemon.protocol import CODE_OF_KIND, Alive, JobFiles, Outcome
from daemon.supervisor import die_with_parent
from guild.campaigns import code_version, find_campaign
from guild.heroes import load_hero
from guild.selection import resolve_for


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
    from trainer.engine import JobSpec

    if not job.dataset_sha256:
        raise InputError(f"job {job.id}: its sidecar records no dataset_sha256, so realm cannot "
                         "check that it trains the bytes it adopted; add the dataset again with "
                         "`realm queue add`.")
    resolved = resolve_for(paths, job=job, cli=cli)
    if resolved.campaign is None:
        raise InputError("no campaign for this job: create one with `realm campaign create NAME "
                         "--hero HERO` (it becomes active), or set campaign_id in the sidecar.")
    campaign = find_campaign(paths, resolved.campaign)
    return JobSpec(job_id=job.id, dataset=paths.base / job.dataset_path,
                   dataset_sha256=job.dataset_sha256, config=resolved.config,
                   locked=resolved.locked, hero=load_hero(paths, resolved.hero_id),
                   checkpoint_root=campaign.path.parent / "checkpoints",
                   cache_root=paths.base / "cache" / "tokens", config_hash=resolved.config_hash,
                   status_path=JobFiles.of(paths.status, job.id).progress,
                   base_dir=paths.base, config_record=resolved.record(),
                   tensorboard_dir=paths.logs / "tensorboard" / campaign.hero_id / campaign.name
                   if resolved.config.logging.report_to == "tensorboard" else None), resolved


def _results(job: Job, result=None, resolved=None, governor: dict | None = None) -> dict:
    """The job fields this attempt reports (``daemon.protocol.RESULT_FIELDS``)."""
    out: dict = {}
    if resolved is not None:
        out.update(config_hash=resolved.config_hash, git_commit=code_version(),
                   resolved_config=resolved.record())
    if result is not None:
        out.update(start_step=result.start_step, final_step=result.final_step,
                   final_loss=result.final_loss, final_val_loss=result.final_val_loss,
                   tokens_per_sec_avg=round(result.tokens_per_sec_avg, 1),
                   trained_tokens_per_sec_avg=round(result.trained_tokens_per_sec_avg, 1),
                   governor=result.governor or None,
                   metadata={**job.metadata, "data": result.data,
                             "resumed_from": result.resumed_from,
                             "checkpoint": str(result.checkpoint.path) if result.checkpoint
                             else None})
    if governor is not None:
        out["governor"] = governor
    return out


def run(paths: RealmPaths, sidecar: Path, cli=None, stop: _StopFlag | None = None,
        group=None) -> int:
    from trainer.distributed import Group

    group = group or Group()
    job = Job.from_dict(read_sidecar_json(sidecar), source=str(sidecar))
    files = JobFiles.of(paths.status, job.id)
    stop = stop or _StopFlag()
    if group.active:  # a group stops by file (a single child gets SIGTERM): no stat per step else
        stop.stop_file = files.stop
    alive = Alive(files.alive) if group.main else None  # rank 0 speaks for the group
    if alive is not None:
        alive.advance("started")
    outcome = _run(paths, job, alive, cli, stop, group)
    if group.main:
        try:
            files.write_outcome(outcome)
        except OSError as exc:  # e.g. ENOSPC: the exit code still says what happened
            print(f"warning: could not write the outcome file: {exc}", file=sys.stderr)
    return outcome.code


class StoppedWaiting(Exception):
    """A stop arrived while this job waited for its campaign."""


@contextlib.contextmanager
def campaign_turn(checkpoint_root: Path, stop: "_StopFlag", poll: float = 0.2, group=None,
                  alive: Alive | None = None):
    """One job per campaign at a time, whichever daemon runs it: an ``flock`` on
    ``<campaign>/.training.lock``, held by rank 0 for the group. Waiting advances the liveness
    counter on each poll (a wait is a sign of life, not a hang) and gives up on a stop request;
    the other ranks wait in short all-reduces, never in one long collective. Without it two
    daemons could both continue from the same checkpoint and fork the campaign's lineage."""
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
            if alive is not None:
                alive.advance("campaign_wait")
            time.sleep(poll)
        if alive is not None:
            alive.advance("campaign")
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _test_nan_hook(group):
    """``REALM_TEST_NAN_AT=RANK:STEP[,RANK:STEP...]``: that rank's loss is NaN once, at that
    step."""
    spec = os.environ.get("REALM_TEST_NAN_AT")
    if not spec:
        return None
    armed = {tuple(int(x) for x in pair.split(":")) for pair in spec.split(",")}

    def hook(at: int, loss: float) -> float:
        if (group.rank, at) in armed:
            armed.discard((group.rank, at))
            return float("nan")
        return loss

    return hook


def _test_logits_hook(trainer, group) -> None:
    """``REALM_TEST_LOGITS=FILE``: once the job has trained, the live model's logits for two
    fixed rows of 24 token ids (seed 0) go to FILE (every rank computes, rank 0 saves): a
    sharded job's logits, to compare with its consolidated folder's."""
    out = os.environ.get("REALM_TEST_LOGITS")
    if not out:
        return
    import torch

    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    logits = trainer.logits(ids)
    if group.main:
        torch.save(logits, out)


def _test_fault_hooks(alive: Alive | None):
    """The liveness callback, wrapped by ``REALM_TEST_HANG`` / ``REALM_TEST_ENOSPC`` when set."""
    beat = alive.advance if alive is not None else (lambda _phase: None)
    hang, enospc = os.environ.get("REALM_TEST_HANG"), os.environ.get("REALM_TEST_ENOSPC")
    if alive is None or not (hang or enospc):
        return beat

    def hooked(phase: str) -> None:
        beat(phase)
        if (hang == "setup" and phase == "model") or (hang == "step" and phase.startswith(
                "step")):
            while True:  # stuck, silent: only the daemon's timeout (SIGKILL) ends this
                time.sleep(3600)
        if enospc and phase == f"step:{enospc}":
            raise OSError(errno.ENOSPC, "No space left on device (REALM_TEST_ENOSPC)")

    return hooked


def _no_space(exc: BaseException | None) -> bool:
    """ENOSPC anywhere in the chain (torch and safetensors wrap the OSError of a full disk)."""
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(exc):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def classify(exc: BaseException) -> tuple[str, str]:
    """(outcome kind, reason) of a failure: permanent kinds never retry (daemon.protocol)."""
    from trainer.checkpoint import UnsafeCheckpoint
    from trainer.data.reader import DataError
    from trainer.engine import PERMANENT_FAILURES
    from trainer.governor import GovernorGaveUp
    from trainer.guard import NonFiniteLoss

    if _no_space(exc):
        return "no_space", f"no space left on device: {exc}"
    if isinstance(exc, UnsafeCheckpoint):
        return "unsafe_checkpoint", str(exc)
    if isinstance(exc, DataError):
        return "data", str(exc)
    if isinstance(exc, (GovernorGaveUp, NonFiniteLoss)):
        return "governor", str(exc)
    if isinstance(exc, PERMANENT_FAILURES):  # bad config or input
        return "config", str(exc)
    if isinstance(exc, MemoryError):
        return "oom", f"out of memory: {exc}"
    if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
        return "oom", f"CUDA out of memory: {exc}"
    return "crash", f"crashed: {type(exc).__name__}: {exc}"


def _own_resume_point(paths: RealmPaths, spec, job: Job) -> dict | None:
    """This job's newest unfinished checkpoint: where a requeued attempt will continue."""
    from trainer.checkpoint import complete_checkpoints

    if spec is None:
        return None
    try:
        mine = [c for c in complete_checkpoints(spec.checkpoint_root)
                if c.lineage() == (job.id, False)]
    except OSError:
        return None
    return {"checkpoint": paths.relative(mine[-1].path), "step": mine[-1].step} if mine else None


def _rank_log(paths: RealmPaths, job: Job, group):
    """Rank 0 logs to the job log (the launcher's stdout, or the file itself when the job spans
    hosts); rank N>0 to ``<job>.rank<N>.log`` beside it, so JSON lines from several processes
    never interleave."""
    if group.main and group.nodes <= 1:
        return None
    # a job spanning hosts: rank 0 writes the job log itself, wherever it runs (each host's
    # launcher writes <job>.node-<host>.log)
    name = f"{job.id}.log" if group.main else f"{job.id}.rank{group.rank}.log"
    path = paths.logs / "jobs" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "a", buffering=1)


def _train(paths: RealmPaths, job: Job, alive: Alive | None, cli, stop, group, box: dict):
    from trainer.engine import StopRequested, Trainer

    beat = _test_fault_hooks(alive)
    spec, resolved = build_spec(paths, job, cli)
    box.update(spec=spec, resolved=resolved)
    configure(resolved.config.logging.level, _rank_log(paths, job, group))
    if group.active:
        structlog.contextvars.bind_contextvars(rank=group.rank)
    beat("config")
    with campaign_turn(spec.checkpoint_root, stop, group=group, alive=alive):
        trainer = Trainer(spec, stop_requested=stop, group=group)
        trainer.heartbeat = beat
        trainer.data_tick = (lambda: alive.tick("data")) if alive is not None else trainer.data_tick
        trainer.loss_hook = _test_nan_hook(group)
        try:
            result = trainer.train()
            _test_logits_hook(trainer, group)
            return result
        except StopRequested:
            _drop_if_cancelled(paths, job, group, box)  # still holding the campaign's lock
            raise


def _run(paths: RealmPaths, job: Job, alive: Alive | None, cli, stop, group) -> Outcome:
    from trainer.engine import StopRequested

    box: dict = {}
    try:
        result = _train(paths, job, alive, cli, stop, group, box)
    except StoppedWaiting:
        return _cancelled(paths, job, box, None) or Outcome(
            exitcodes.STOPPED, "stopped", "stopped while waiting for its campaign")
    except StopRequested as stopped:
        cancelled = _cancelled(paths, job, box, stopped.step)
        if cancelled is not None:
            return cancelled
        ckpt = stopped.checkpoint
        resume = {"checkpoint": paths.relative(ckpt.path), "step": ckpt.step} if ckpt else None
        return Outcome(exitcodes.STOPPED, "stopped", str(stopped), resume=resume,
                       results=_results(job, resolved=box.get("resolved")))
    except Exception as exc:  # noqa: BLE001 - every failure becomes a typed outcome
        kind, reason = classify(exc)
        if kind == "crash":
            traceback.print_exc()
        else:
            print(f"error: {reason}", file=sys.stderr)
        free = shutil.disk_usage(paths.base).free if kind == "no_space" else None
        resume = _own_resume_point(paths, box.get("spec"), job) if kind == "no_space" else None
        return Outcome(CODE_OF_KIND[kind], kind, reason, resume=resume, free_bytes=free,
                       results=_results(job, resolved=box.get("resolved"),
                                        governor=getattr(exc, "counts", None)))
    return Outcome(exitcodes.COMPLETED, "completed",
                   results=_results(job, result=result, resolved=box.get("resolved")))


def _drop_if_cancelled(paths: RealmPaths, job: Job, group, box: dict) -> None:
    """A stop that was a cancel (``realm queue cancel`` of this claim): rank 0 removes the
    job's own resume points, the stop checkpoint included, as a failed job does, so nothing of
    it becomes the campaign's starting point. Called while the campaign's lock is held (another
    job's pruning or retention never races it)."""
    from trainer.checkpoint import remove_unfinished_of

    request = JobFiles.of(paths.status, job.id).cancel_request(job.started_at)
    if request is not None and group.main:
        box["cancel"] = request
        remove_unfinished_of(box["spec"].checkpoint_root, job.id,
                             "checkpoint.cancelled_job_removed")


def _cancelled(paths: RealmPaths, job: Job, box: dict, step: int | None) -> Outcome | None:
    """The outcome of a stop that was a cancel: who cancelled the job and at which step; None
    for a warm stop (the job resumes later). A stop while the job waited for its campaign
    wrote nothing to remove (its earlier attempt's resume point, if any, is pruned by the
    campaign's next job: it is not on the lineage)."""
    request = box.get("cancel") or JobFiles.of(paths.status, job.id).cancel_request(
        job.started_at)
    if request is None:
        return None
    return Outcome(CODE_OF_KIND["cancelled"], "cancelled", request.describe(step),
                   results=_results(job, resolved=box.get("resolved")))


# The trainer's modules (torch, seconds to import) are imported inside the functions that use them:
# the child installs its stop handlers and parent-death signal first, and the daemon sees the
# job's first sign of life before the import.
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.run_job", description=__doc__)
    parser.add_argument("--base-dir", default=None)
    parser.add_argument("--job", required=True, help="the job's sidecar (.job.json)")
    add_common_flags(parser)
    args = parser.parse_args(argv)
    configure("info")
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a rank: die with the launcher, never orphaned
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
