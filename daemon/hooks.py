"""``daemon.on_job_end``: a command the daemon runs after each job attempt ends (completed,
failed, or back in the queue after a warm stop or a retryable failure).

The command is an argv list, never a shell string: ``daemon.on_job_end`` is split with
``shlex`` (quotes group words; ``|``, ``>``, ``$VAR`` and ``;`` are plain characters) and run
with the job's facts in its environment: ``REALM_JOB_ID``, ``REALM_JOB_STATE`` (completed,
failed, queued...), ``REALM_JOB_REASON`` (the reason recorded in its history),
``REALM_JOB_DATASET`` (where its dataset lies now, absolute), ``REALM_BASE_DIR``. It runs in the
realm directory with ``daemon.on_job_end_timeout`` seconds to finish; a hook that fails, times
out or cannot start is logged (``hook.failed``) and said on the console, and the daemon goes on.
"""

from __future__ import annotations

import os
import shlex
import subprocess

import structlog

from core.job import Job
from core.paths import RealmPaths

log = structlog.get_logger("realm.daemon")


def hook_env(paths: RealmPaths, job: Job) -> dict[str, str]:
    reason = job.history[-1]["reason"] if job.history else ""
    return {"REALM_JOB_ID": job.id, "REALM_JOB_STATE": job.status.value,
            "REALM_JOB_REASON": str(reason), "REALM_BASE_DIR": str(paths.base),
            "REALM_JOB_DATASET": str(paths.base / job.dataset_path)}


def run_job_end_hook(command: str | None, timeout: float, paths: RealmPaths, job: Job,
                     say=print) -> int | None:
    """Run the hook for ``job``; its exit code, or None when there is none or it did not end."""
    if not command:
        return None
    argv = shlex.split(command)  # checked when the config was resolved (config.schema)
    try:
        done = subprocess.run(argv, cwd=paths.base, env={**os.environ, **hook_env(paths, job)},
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return _failed(say, job, argv, f"did not finish within daemon.on_job_end_timeout "
                                       f"({timeout:g} s); it was killed")
    except OSError as exc:
        return _failed(say, job, argv, f"could not start: {exc}")
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace").strip()[-500:]
        _failed(say, job, argv, f"exited with code {done.returncode}"
                                + (f": {tail}" if tail else ""))
    else:
        log.info("hook.done", job_id=job.id, hook="on_job_end", argv=argv)
    return done.returncode


def _failed(say, job: Job, argv: list[str], why: str) -> None:
    log.warning("hook.failed", job_id=job.id, hook="on_job_end", argv=argv, reason=why)
    say(f"  daemon.on_job_end for {job.id} {why} (the daemon goes on)")
    return None
