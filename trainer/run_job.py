"""Train one job in this process: ``python -m trainer.run_job --base-dir REALM --job SIDECAR``.

The daemon runs this as a child process. It resolves the job's config (six layers), trains
from the campaign's latest checkpoint, writes the results into the job's sidecar, and exits with
a code from ``core.exitcodes``: completed, stopped (resumable), permanent or retryable failure.
SIGTERM/SIGINT request a stop at the next step boundary (with a checkpoint).
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

from core import exitcodes
from core.errors import InputError, RealmError
from core.job import Job
from core.logsetup import configure
from core.paths import RealmPaths, resolve_base


class _StopFlag:
    def __init__(self) -> None:
        self.requested = False

    def __call__(self, *_args) -> bool:
        return self.requested

    def set(self, *_args) -> None:
        self.requested = True


def build_spec(paths: RealmPaths, job: Job, cli=None):
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
                   status_path=paths.status / "training_status.json"), resolved


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
            j.metadata = {**j.metadata, "data": result.data,
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
    """Touches ``status/heartbeats/<job>`` after every step, and from a thread during setup
    (tokenizing a large file can take minutes without a step)."""

    def __init__(self, paths: RealmPaths, job_id: str, every: float = 5.0):
        self.path = paths.status / "heartbeats" / job_id
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


def run(paths: RealmPaths, sidecar: Path, cli=None, stop: _StopFlag | None = None) -> int:
    from core.queue_scan import read_sidecar_json

    job = Job.from_dict(read_sidecar_json(sidecar), source=str(sidecar))
    beat = Heartbeat(paths, job.id, every=1.0)  # alive from here on, setup included
    try:
        return _run(paths, job, beat, cli, stop)
    finally:
        beat.close()


class StoppedWaiting(Exception):
    """A stop arrived while this job waited for its campaign."""


@contextlib.contextmanager
def campaign_turn(checkpoint_root: Path, stop: "_StopFlag", poll: float = 0.2):
    """One job per campaign at a time, whichever daemon runs it: an ``flock`` on
    ``<campaign>/.training.lock``. Waiting keeps heartbeating (the setup thread still runs) and
    gives up on a stop request. Without it two daemons could both continue from the same
    checkpoint and fork the campaign's lineage."""
    path = checkpoint_root.parent / ".training.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if stop():
                    raise StoppedWaiting() from None
                time.sleep(poll)
        yield
    finally:
        os.close(fd)


def _run(paths: RealmPaths, job: Job, beat: "Heartbeat", cli, stop) -> int:
    from trainer.engine import StopRequested, Trainer
    from trainer.data.reader import DataError

    stop = stop or _StopFlag()
    resolved = None
    try:
        spec, resolved = build_spec(paths, job, cli)
        configure(resolved.config.logging.level)
        with campaign_turn(spec.checkpoint_root, stop):
            trainer = Trainer(spec, stop_requested=stop)
            trainer.heartbeat = beat
            result = trainer.train()
    except StoppedWaiting:
        return exitcodes.STOPPED
    except StopRequested as stopped:
        _record(paths, job, stopped=stopped.checkpoint, resolved=resolved)
        return exitcodes.STOPPED
    except (RealmError, DataError) as exc:
        _record(paths, job, error=str(exc))
        print(f"error: {exc}", file=sys.stderr)
        return exitcodes.PERMANENT
    except MemoryError as exc:
        _record(paths, job, error=f"out of memory: {exc}")
        return exitcodes.RETRYABLE
    except Exception as exc:
        if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
            _record(paths, job, error=f"CUDA out of memory: {exc}")
            return exitcodes.RETRYABLE
        if type(exc).__name__ in ("NonFiniteLoss", "GovernorGaveUp"):
            _record(paths, job, error=str(exc), governor=getattr(exc, "counts", None))
            return exitcodes.PERMANENT
        traceback.print_exc()
        _record(paths, job, error=f"crashed: {type(exc).__name__}: {exc}")
        return exitcodes.CRASHED
    _record(paths, job, result=result, resolved=resolved)
    return exitcodes.COMPLETED


def main(argv: list[str] | None = None) -> int:
    from core.cli_common import add_common_flags, cli_layer_from

    parser = argparse.ArgumentParser(prog="python -m trainer.run_job", description=__doc__)
    parser.add_argument("--base-dir", default=None)
    parser.add_argument("--job", required=True, help="the job's sidecar (.job.json)")
    add_common_flags(parser)
    args = parser.parse_args(argv)
    configure("info")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    stop = _StopFlag()
    signal.signal(signal.SIGTERM, stop.set)
    signal.signal(signal.SIGINT, stop.set)
    paths = RealmPaths(resolve_base(args.base_dir))
    return run(paths, Path(args.job), cli_layer_from(args), stop)


if __name__ == "__main__":
    sys.exit(main())
