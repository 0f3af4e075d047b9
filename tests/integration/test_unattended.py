"""Unattended queues (issue 15): `queue retry --all-failed`, `queue hold` / `release`,
`daemon pause` / `resume` on a running daemon, and `daemon.on_job_end`. Real subprocesses, a real
daemon training the tiny model for one step."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from core.job import JobState
from core.errors import ClaimLost
from core.training_queue import TrainingQueue, _not_held
from tests.conftest import drop, write_dataset
from tests.integration.test_cli import realm_cmd
from tests.trainer.test_training import make_realm


def _fail(queue: TrainingQueue, name: str, why: str):
    drop(queue.paths, "normal", name)
    queue.adopt_new()
    return queue.fail(queue.claim_next(), why)


def test_retry_all_failed_requeues_every_failed_job_and_says_how_many(realm, queue):
    first, second = _fail(queue, "a.jsonl", "boom a"), _fail(queue, "b.jsonl", "boom b")
    out = realm_cmd(realm.base, "queue", "retry", "--all-failed", "--reason", "after the fix")
    assert out.returncode == 0, out.stderr
    assert "requeued 2 failed job(s)" in out.stdout and "(failed: boom a)" in out.stdout
    assert queue.jobs_in("failed") == []
    requeued = {j.id: j for j in queue.queued()}
    assert set(requeued) == {first.id, second.id}
    assert requeued[first.id].history[-1]["reason"].startswith("after the fix")
    again = realm_cmd(realm.base, "queue", "retry", "--all-failed")
    assert again.returncode == 0 and "no failed jobs: nothing to retry" in again.stdout
    both = realm_cmd(realm.base, "queue", "retry", first.id, "--all-failed")
    neither = realm_cmd(realm.base, "queue", "retry")
    for out in (both, neither):
        assert out.returncode == 2 and "give one JOB or --all-failed" in out.stderr


def test_a_held_job_stays_in_place_and_is_never_claimed_until_released(realm, queue):
    drop(realm, "high", "first.jsonl")
    drop(realm, "normal", "second.jsonl")
    queue.adopt_new()
    out = realm_cmd(realm.base, "queue", "hold", "first", "--reason", "waiting for review")
    assert out.returncode == 0, out.stderr
    assert "never claimed until `realm queue release" in out.stdout
    held = queue.find("first")
    assert held.held == "waiting for review" and held.dataset_path == "queue/high/first.jsonl"
    assert held.history[-1]["reason"] == "held: waiting for review"
    listing = realm_cmd(realm.base, "queue", "list").stdout
    assert any(" held " in line and "first.jsonl" in line for line in listing.splitlines())
    assert "1 held (`realm queue release JOB`)" in realm_cmd(realm.base, "queue", "status").stdout
    plan = realm_cmd(realm.base, "daemon", "--plan").stdout
    assert f"held, not claimed until `realm queue release {held.id}`" in plan
    again = realm_cmd(realm.base, "queue", "hold", "first")
    assert again.returncode == 2 and "already held: waiting for review" in again.stderr
    assert queue.claim_next().dataset_name == "second.jsonl", "the held high job is passed over"
    assert queue.claim_next() is None, "only the held job is left: nothing to claim"
    busy = realm_cmd(realm.base, "queue", "hold", "second")
    assert busy.returncode == 2 and "is processing; `queue hold` applies to queued jobs" \
        in busy.stderr
    out = realm_cmd(realm.base, "queue", "release", "first")
    assert out.returncode == 0 and "released" in out.stdout
    claimed = queue.claim_next()
    assert claimed.id == held.id and claimed.held is None
    assert realm_cmd(realm.base, "queue", "release", "first").returncode == 2


def test_cancelling_a_held_job_ends_the_hold(realm, queue):
    drop(realm, "normal", "a.jsonl")
    queue.adopt_new()
    job = queue.hold(queue.find("a"), "later")
    cancelled = queue.cancel(job)
    assert cancelled.held is None
    assert queue.retry(cancelled).held is None, "a retried job is claimable at once"


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := predicate()):
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _daemon_state(paths) -> str | None:
    for path in paths.status.glob("daemon-*.json"):
        try:
            return json.loads(path.read_text()).get("state")
        except (OSError, ValueError):
            return None
    return None


@pytest.mark.slow(seconds=45)
def test_pause_and_resume_a_running_daemon_without_restarting_it(tmp_path):
    paths = make_realm(tmp_path / "r")
    (paths.base / "config.json").write_text(json.dumps({"daemon": {"settle_seconds": 0.1}}))
    env = {k: v for k, v in os.environ.items() if k != "REALM_DEBUG"}
    daemon = subprocess.Popen([sys.executable, "-m", "cli", "--base-dir", str(paths.base),
                               "daemon", "--poll", "0.2", "--max-steps", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        _wait(lambda: _daemon_state(paths) == "idle", 60, "the daemon to start")
        out = realm_cmd(paths.base, "daemon", "pause", "--reason", "swapping disks")
        assert out.returncode == 0 and "claiming paused" in out.stdout
        _wait(lambda: _daemon_state(paths) == "paused", 30, "the daemon to see the pause")
        job = TrainingQueue(paths.base).add(write_dataset(tmp_path / "d.jsonl", n=8))
        time.sleep(1.5)  # several rounds of --poll 0.2: a claim would have happened by now
        queue = TrainingQueue(paths.base)
        assert queue.find(job.id).status is JobState.QUEUED
        status = realm_cmd(paths.base, "queue", "status").stdout
        assert "PAUSED: claiming paused" in status and "swapping disks" in status
        assert "paused: claiming paused" in status, "the daemon's own line says paused too"
        out = realm_cmd(paths.base, "daemon", "resume")
        assert out.returncode == 0 and "claiming resumed" in out.stdout
        _wait(lambda: _daemon_state(paths) == "training", 60, "the job to be claimed")
        # paused while a job trains: that job goes on to the end, the next one waits
        assert realm_cmd(paths.base, "daemon", "pause").returncode == 0
        later = queue.add(write_dataset(tmp_path / "later.jsonl", n=8))
        _wait(lambda: queue.find(job.id).status is JobState.COMPLETED, 120,
              "the running job to finish despite the pause")
        _wait(lambda: _daemon_state(paths) == "paused", 30, "the daemon to pause after it")
        time.sleep(1.0)
        assert queue.find(later.id).status is JobState.QUEUED
        assert realm_cmd(paths.base, "daemon", "resume").returncode == 0
        _wait(lambda: queue.find(later.id).status is JobState.COMPLETED, 120,
              "the second job after the second resume")
    finally:
        daemon.send_signal(signal.SIGTERM)
        output = daemon.communicate(timeout=60)[0]
    assert daemon.returncode == 0, output
    assert "claiming paused since" in output and "swapping disks" in output
    assert "resumed: claiming again" in output
    assert output.index("resumed") < output.index(f"completed {job.id}")


def test_once_on_a_paused_realm_leaves_the_queue_and_says_why(tmp_path):
    paths = make_realm(tmp_path / "r")
    TrainingQueue(paths.base).add(write_dataset(tmp_path / "d.jsonl"))
    assert realm_cmd(paths.base, "daemon", "pause").returncode == 0
    out = realm_cmd(paths.base, "daemon", "--once")
    assert out.returncode == 3, out.stderr
    assert "1 job(s) left queued: not claiming: claiming paused" in out.stdout


HOOK = textwrap.dedent("""\
    import json, os, sys
    keep = {k: v for k, v in os.environ.items() if k.startswith("REALM_JOB") or k == "REALM_BASE_DIR"}
    keep["cwd"] = os.getcwd()
    with open(sys.argv[1], "a") as fh:
        fh.write(json.dumps(keep) + "\\n")
    if keep["REALM_JOB_STATE"] == "failed":
        print("hook refuses failed jobs", file=sys.stderr)
        sys.exit(3)
    """)


@pytest.mark.slow(seconds=20)
def test_on_job_end_runs_an_argv_with_the_job_in_its_environment(tmp_path):
    paths = make_realm(tmp_path / "r")
    hook, record = tmp_path / "hook.py", tmp_path / "ends.jsonl"
    hook.write_text(HOOK)
    command = f"{shlex.quote(sys.executable)} {shlex.quote(str(hook))} {shlex.quote(str(record))}"
    (paths.base / "config.json").write_text(json.dumps(
        {"daemon": {"settle_seconds": 0.1, "on_job_end": command, "on_job_end_timeout": 30}}))
    queue = TrainingQueue(paths.base)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"oops": 1}\n')
    bad = queue.add(tmp_path / "bad.jsonl", priority="high")  # first, and its hook fails
    good = queue.add(write_dataset(tmp_path / "good.jsonl", n=8))
    out = realm_cmd(paths.base, "daemon", "--once", "--max-steps", "1")
    assert out.returncode == 1, out.stderr  # one job failed; the daemon went on to the next
    assert "1 completed, 1 failed" in out.stdout
    assert (f"daemon.on_job_end for {bad.id} exited with code 3: hook refuses failed jobs "
            "(the daemon goes on)") in out.stdout
    ends = [json.loads(line) for line in record.read_text().splitlines()]
    assert [(e["REALM_JOB_ID"], e["REALM_JOB_STATE"]) for e in ends] == [
        (bad.id, "failed"), (good.id, "completed")]
    assert "bad.jsonl:2" in ends[0]["REALM_JOB_REASON"]
    assert ends[1]["REALM_JOB_REASON"] == "trained to step 1"
    assert ends[1]["REALM_JOB_DATASET"] == str(paths.base / "queue/completed/good.jsonl")
    assert ends[1]["REALM_BASE_DIR"] == str(paths.base) == ends[1]["cwd"]


def test_on_job_end_is_never_a_shell_and_a_bad_one_is_refused_before_any_claim(tmp_path):
    paths = make_realm(tmp_path / "r")
    TrainingQueue(paths.base).add(write_dataset(tmp_path / "d.jsonl"))
    out = realm_cmd(paths.base, "daemon", "--once", "--set", 'daemon.on_job_end=notify "x')
    assert out.returncode == 2
    assert "daemon.on_job_end: 'notify \"x' cannot be split into words (No closing quotation)" \
        in out.stderr
    assert TrainingQueue(paths.base).queued(), "nothing was claimed"


def test_a_hook_that_cannot_start_or_hangs_is_logged_and_the_daemon_goes_on(realm, tmp_path):
    from daemon.hooks import run_job_end_hook

    drop(realm, "normal", "a.jsonl")
    queue = TrainingQueue(realm.base, settle_seconds=0)
    job = queue.complete(queue.claim_next(), reason="trained to step 1")
    said = []
    marker = tmp_path / "shell-ran"
    # a shell would run the second command; as an argv it is only an argument to echo
    assert run_job_end_hook(f"echo hi ; touch {marker}", 10, realm, job, said.append) == 0
    assert not marker.exists()
    assert run_job_end_hook("/no/such/notifier", 10, realm, job, said.append) is None
    assert run_job_end_hook(f"{shlex.quote(sys.executable)} -c 'import time; time.sleep(30)'",
                            0.5, realm, job, said.append) is None
    assert "could not start: [Errno 2]" in said[0]
    assert "did not finish within daemon.on_job_end_timeout (0.5 s)" in said[1]


def test_a_hold_written_after_the_claimers_listing_still_wins(realm, queue):
    drop(realm, "normal", "a.jsonl")
    queue.adopt_new()
    listed = queue.queued()  # what a claimer saw before the hold
    TrainingQueue(realm.base).hold(listed[0], "just now")
    with pytest.raises(ClaimLost, match="was held after it was listed"):
        queue._move(listed[0], JobState.PROCESSING, reason="claim", guard=_not_held)
    assert queue.claim_next() is None and queue.find("a").held == "just now"
