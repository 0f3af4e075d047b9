"""The daemon/child protocol (daemon.protocol) with real children, files and signals: liveness
by the daemon's clock, typed outcomes, ENOSPC, faults in the middle of a job, the --once guard.

Children are made to hang or fail with test-only hooks (REALM_TEST_HANG, REALM_TEST_ENOSPC) so
each case costs one short child, not a huge file or a full disk."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from core import exitcodes
from core.errors import InputError
from core.job import JobState
from daemon.protocol import AliveWatch, JobFiles, Outcome
from daemon.training_daemon import Daemon, record_outcome
from tests.conftest import drop
from tests.integration.test_daemon import (FAST_DAEMON, job_state, realm_with_job, wait_for)
from config.schema import DaemonConfig
from trainer.data.synthetic import write_dataset


def daemon_env(**hooks) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "REALM_DEBUG"}
    return {**env, **hooks}


def realm_run(base, *args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "cli", "--base-dir", str(base), *args],
                          capture_output=True, text=True, env=env or daemon_env(),
                          timeout=timeout)


def set_daemon(paths, **values):
    config = json.loads((paths.base / "config.json").read_text())
    config["daemon"].update(values)
    (paths.base / "config.json").write_text(json.dumps(config))


# --- unit pieces: no child ------------------------------------------------------------------

class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_liveness_is_the_counter_changing_on_the_daemons_clock_not_file_times(tmp_path):
    path = tmp_path / "j.alive"
    clock = Clock()
    watch = AliveWatch(path, clock)
    clock.now += 5
    assert watch.poll() == 5 and not watch.stepped, "no file yet: silent since the start"
    path.write_text("1 model\n")
    assert watch.poll() == 0 and watch.last_phase == "model"
    clock.now += 30
    os.utime(path, (time.time() + 3600, time.time() + 3600))  # a clock step / forged mtime
    assert watch.poll() == 30, "a future mtime is no sign of life"
    path.write_text("2 step:1\n")
    assert watch.poll() == 0 and watch.stepped


def test_outcome_kinds_decide_permanent_retryable_and_no_space(realm, queue):
    from trainer.checkpoint import UnsafeCheckpoint
    from trainer.data.reader import DataError
    from trainer.run_job import classify

    wrapped = RuntimeError("PytorchStreamWriter failed writing file data/0")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert classify(wrapped)[0] == "no_space"
    assert classify(DataError("d.jsonl:3: bad"))[0] == "data"
    assert classify(UnsafeCheckpoint("x"))[0] == "unsafe_checkpoint"
    assert classify(InputError("bad config"))[0] == "config"
    assert classify(MemoryError())[0] == "oom"
    assert classify(KeyError("x"))[0] == "crash"

    drop(realm, "normal", "a.jsonl")
    job = queue.claim_next()
    resume = {"checkpoint": "campaigns/h/c/checkpoints/step-3", "step": 3}
    moved = record_outcome(queue, job, Outcome(exitcodes.NO_SPACE, "no_space", "disk full",
                                               resume=resume), 3)
    assert moved.status is JobState.QUEUED and moved.attempts == 0 and moved.resume == resume
    moved = record_outcome(queue, queue.claim_next(), Outcome(
        exitcodes.PERMANENT, "unsafe_checkpoint", "refusing checkpoint X"), 3)
    assert moved.status is JobState.FAILED and moved.last_error == "refusing checkpoint X"
    assert moved.attempts == 0, "an unsafe checkpoint is never retried"


def test_after_enospc_the_guard_waits_for_more_than_the_floor(realm):
    daemon = Daemon(realm, DaemonConfig(min_free_disk_gb=0.001), keep_last=3)
    assert daemon.resources_ok()
    free = shutil.disk_usage(realm.base).free
    daemon.no_space_seen(Outcome(exitcodes.NO_SPACE, "no_space", "full", free_bytes=free))
    assert not daemon.resources_ok()
    assert "ran out of space" in daemon._guard_said
    daemon._space_wanted = (0.0, "freed")  # what freeing the space does to the comparison
    assert daemon.resources_ok() and daemon._space_wanted is None


def test_a_symlinked_inbox_is_refused_at_start_with_the_reason(tmp_path):
    from tests.trainer.test_training import make_realm

    paths = make_realm(tmp_path / "r")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.jsonl").write_text('{"text": "outside"}\n')
    paths.state_dir("low").rmdir()
    paths.state_dir("low").symlink_to(outside)
    out = realm_run(paths.base, "daemon", "--once")
    assert out.returncode == 2 and "queue/low is a symlink" in out.stderr
    assert (outside / "x.jsonl").read_text() == '{"text": "outside"}\n'
    assert sorted(p.name for p in outside.iterdir()) == ["x.jsonl"]


# --- real children --------------------------------------------------------------------------

@pytest.mark.slow
def test_a_child_stuck_in_setup_is_killed_after_the_setup_limit(tmp_path):
    paths = realm_with_job(tmp_path)
    set_daemon(paths, job_timeout=1, max_attempts=1)
    out = realm_run(paths.base, "daemon", "--once",
                    env=daemon_env(REALM_TEST_HANG="setup", REALM_TEST_STARTUP_GRACE="8"))
    assert out.returncode == 1, out.stdout + out.stderr[-2000:]
    status, job = job_state(paths)["job.jsonl"]
    assert status == "failed" and job.attempts == 1
    assert "timeout: no sign of life for" in job.last_error and "during setup" in job.last_error
    assert "startup grace 8 s" in job.last_error
    assert not list((paths.status / "jobs").glob("*.alive")), "the job's files are cleaned up"


@pytest.mark.slow
def test_a_future_mtime_on_the_counter_does_not_keep_a_stuck_child_alive(tmp_path):
    paths = realm_with_job(tmp_path)
    set_daemon(paths, job_timeout=2, max_attempts=1)
    stop = threading.Event()

    def forge_mtime():  # what a clock step does to every file time the child leaves
        while not stop.is_set():
            for f in (paths.status / "jobs").glob("*.alive"):
                future = time.time() + 3600
                try:
                    os.utime(f, (future, future))
                except FileNotFoundError:
                    pass
            time.sleep(0.1)

    forger = threading.Thread(target=forge_mtime)
    forger.start()
    try:
        out = realm_run(paths.base, "daemon", "--once", env=daemon_env(REALM_TEST_HANG="step"))
    finally:
        stop.set()
        forger.join()
    assert out.returncode == 1, out.stdout + out.stderr[-2000:]
    status, job = job_state(paths)["job.jsonl"]
    assert status == "failed"
    assert "while training (daemon.job_timeout 2 s; last sign: step:1)" in job.last_error


@pytest.mark.slow
def test_enospc_requeues_with_the_resume_point_and_once_says_the_guard_left_it(tmp_path):
    paths = realm_with_job(tmp_path)  # daemon.min_free_disk_gb 1 (default): wait for +1 GB
    out = realm_run(paths.base, "daemon", "--once", env=daemon_env(REALM_TEST_ENOSPC="5"))
    assert out.returncode == exitcodes.ONCE_LEFT_QUEUED, out.stdout + out.stderr[-2000:]
    assert "0 requeued" not in out.stdout and "1 job(s) left queued: not claiming: free disk" \
        in out.stdout and "ran out of space" in out.stdout
    status, job = job_state(paths)["job.jsonl"]
    assert status == "queued" and job.attempts == 0
    assert job.resume and job.resume["step"] == 3 and job.resume["checkpoint"].endswith("step-3")
    assert "no space left on device" in job.history[-1]["reason"]
    assert job.final_step is None and job.last_error is None, "requeued, not failed"


@pytest.mark.slow
def test_faults_in_the_middle_of_a_job_leave_the_daemon_running(tmp_path):
    paths = realm_with_job(tmp_path)
    set_daemon(paths, max_attempts=1)
    daemon = subprocess.Popen([sys.executable, "-m", "cli", "--base-dir", str(paths.base),
                               "daemon", "--poll", "0.3", "--max-steps", "4"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=daemon_env())
    try:
        sidecar = paths.state_dir("processing") / "job.jsonl.job.json"
        wait_for(lambda: any("step:" in f.read_text() for f in
                             (paths.status / "jobs").glob("*.alive")), what="a training step")
        genuine = sidecar.read_text()
        sidecar.write_text("{not json")  # a person (or a script) overwrote the record
        wait_for(lambda: not list((paths.status / "jobs").glob("*.alive")), what="job end")
        assert daemon.poll() is None, "the daemon survived a garbage sidecar"
        if sidecar.exists() and sidecar.read_text() == "{not json":
            sidecar.write_text(genuine)  # fixed in place: the daemon records it next round
        wait_for(lambda: (paths.state_dir("completed") / "job.jsonl.job.json").exists(),
                 what="the first job recorded as completed")
        done = json.loads((paths.state_dir("completed") / "job.jsonl.job.json").read_text())
        assert done["final_step"] == 4 and done["final_loss"] is not None
        shutil.rmtree(paths.state_dir("processing"))  # queue/processing removed
        (paths.state_dir("normal") / "next.jsonl.job.json").write_text('{"campaign_id": "nope"}')
        write_dataset(paths.state_dir("normal") / "next.jsonl", 4)
        failed_record = paths.state_dir("failed") / "next.jsonl.job.json"
        # the record is final once rewritten after the pair moved (readers take no lock)
        def final() -> bool:
            try:
                record = json.loads(failed_record.read_text())
            except (OSError, ValueError):
                return False
            return record.get("status") == "failed" and bool(record.get("last_error"))

        wait_for(final, what="the next job to run and fail on its unknown campaign")
        assert daemon.poll() is None and paths.state_dir("processing").is_dir()
        failed = json.loads((paths.state_dir("failed") / "next.jsonl.job.json").read_text())
        assert "nope" in failed["last_error"]
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
        out, err = daemon.communicate()
    assert "Traceback" not in err

