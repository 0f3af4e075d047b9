"""What a job ran with (its recorded config) and cancelling a running job, with a real daemon,
real training children and the tiny hero."""

from __future__ import annotations

import json
import signal
import subprocess

import pytest

from config.schema import DaemonConfig
from core import exitcodes
from core.job import JobState
from core.training_queue import TrainingQueue
from daemon.protocol import CancelRequest, JobFiles, Outcome
from daemon.training_daemon import Daemon, record_outcome
from cli.queue_cmds import cancel_job
from tests.conftest import drop
from tests.integration.test_daemon import FAST_DAEMON, realm_cmd, start_daemon, wait_for
from tests.trainer.test_training import ckpt_root, make_realm
from trainer.checkpoint import CONFIG_FILE, complete_checkpoints
from trainer.data.synthetic import write_dataset

CAMPAIGN = {"training": {"micro_batch_size": 4, "max_steps": 3, "warmup_steps": 2},
            "data": {"max_length": 128}, "checkpoint": {"save_steps": 2, "keep_last": 10},
            "logging": {"status_every_seconds": 0}}


def realm_for(tmp_path):
    paths = make_realm(tmp_path / "r", CAMPAIGN)
    (paths.base / "config.json").write_text(json.dumps(FAST_DAEMON))
    return paths


def rows_of(explain: list[dict]) -> dict[str, tuple]:
    return {r["key"]: (r["value"], r["layer"], r["source"]) for r in explain}


# --- provenance -------------------------------------------------------------------------------

@pytest.mark.slow(seconds=40)
def test_a_job_records_the_config_it_trained_with_and_every_view_prints_that(tmp_path):
    paths = realm_for(tmp_path)
    write_dataset(paths.base / "d.jsonl", 40)
    added = realm_cmd(paths.base, "queue", "add", str(paths.base / "d.jsonl"),
                      "--set", "training.learning_rate=0.002")
    assert added.returncode == 0, added.stderr
    before = realm_cmd(paths.base, "config", "show", "--job", "d.jsonl", "--json")
    assert before.returncode == 0, before.stderr
    assert json.loads(before.stdout)["recorded"] is False
    text = realm_cmd(paths.base, "config", "show", "--job", "d.jsonl").stdout
    assert "has not trained yet: today's resolution of its layers" in text

    out = realm_cmd(paths.base, "daemon", "--once", "--max-steps", "3", "--batch-size", "2",
                    "--set", "data.max_length=64")
    assert out.returncode == 0, out.stderr[-3000:]
    [job] = TrainingQueue(paths.base).jobs_in("completed")
    expected = {"training.max_steps": (3, "cli", "--max-steps"),
                "training.micro_batch_size": (2, "cli", "--batch-size"),
                "data.max_length": (64, "cli", "--set")}

    shown = json.loads(realm_cmd(paths.base, "queue", "show", job.id, "--json").stdout)
    record = shown["resolved_config"]
    rows = rows_of(record["explain"])
    assert {k: rows[k] for k in expected} == expected
    assert rows["training.learning_rate"][:2] == (0.002, "job")
    assert rows["training.warmup_steps"][:2] == (2, "campaign")
    assert rows["training.seed"][1] == "schema"
    assert record["config"]["training"]["max_steps"] == 3
    assert record["config_hash"] == shown["config_hash"]

    config = realm_cmd(paths.base, "config", "show", "--job", job.id, "--json", "--explain")
    assert config.returncode == 0, config.stderr
    printed = json.loads(config.stdout)
    assert printed["recorded"] is True and printed["job"] == job.id
    assert printed["explain"] == record["explain"] and printed["config"] == record["config"]
    assert printed["config_hash"] == shown["config_hash"]

    ckpts = complete_checkpoints(ckpt_root(paths))
    assert ckpts and all((c.path / CONFIG_FILE).is_file() for c in ckpts)
    final = ckpts[-1]
    assert json.loads((final.path / CONFIG_FILE).read_text()) == record
    assert final.state()["config_hash"] == shown["config_hash"]

    table = realm_cmd(paths.base, "config", "show", "--job", job.id, "--explain").stdout
    assert f"# job {job.id} as it trained (recorded by its last attempt)" in table
    assert any(line.split()[:4] == ["training.max_steps", "3", "cli", "--max-steps"]
               for line in table.splitlines()), table
    text = realm_cmd(paths.base, "queue", "show", job.id).stdout
    assert f"config  as it trained: hero tiny-qwen3, campaign tiny-qwen3/c1, " \
           f"{shown['config_hash']}" in text
    assert any(line.split() == ["data.max_length", "64", "cli", "--set"]
               for line in text.splitlines()), text

    changed = realm_cmd(paths.base, "config", "show", "--job", job.id, "--max-steps", "9")
    assert changed.returncode == 2
    assert "prints the config it recorded then; --max-steps cannot change that" in changed.stderr


# --- cancel: the request and who acts on it ---------------------------------------------------

def test_cancel_of_a_queued_job_is_immediate_and_of_a_running_one_is_a_request(realm, queue):
    drop(realm, "normal", "waiting.jsonl")
    drop(realm, "normal", "running.jsonl")
    queue.adopt_new()
    waiting = queue.find("waiting.jsonl")
    moved, said = cancel_job(queue, waiting, "not needed", who="ana@box")
    assert moved.status is JobState.CANCELLED and said.endswith("cancelled, now "
                                                                "queue/cancelled/waiting.jsonl")

    running = queue.claim_next()  # held by this (live) process, as a daemon holds it
    same, said = cancel_job(queue, running, "wrong data", who="ana@box")
    assert same.status is JobState.PROCESSING
    assert queue.find(running.id).status is JobState.PROCESSING, "never pulled from its daemon"
    assert "cancel requested; its daemon" in said and "next step boundary" in said
    files = JobFiles.of(realm.status, running.id)
    request = files.cancel_request(running.started_at)
    assert (request.by, request.reason) == ("ana@box", "wrong data")
    assert files.cancel_request("2000-01-01T00:00:00+00:00") is None, \
        "a request for another claim of the job is not this claim's"
    assert request.describe(7) == "cancelled by ana@box at step 7 while processing: wrong data"

    done = record_outcome(queue, running, Outcome(exitcodes.STOPPED, "cancelled",
                                                  request.describe(7)), max_attempts=3)
    assert done.status is JobState.CANCELLED
    assert done.history[-1]["reason"] == "cancelled by ana@box at step 7 while processing: " \
                                         "wrong data"


def test_skip_still_refuses_a_running_job(realm, queue):
    drop(realm, "normal", "a.jsonl")
    job = queue.claim_next()
    from core.errors import UsageError

    with pytest.raises(UsageError, match="Stop the daemon .* then skip it"):
        queue.skip(job)


def dead_worker() -> dict:
    proc = subprocess.Popen(["true"])
    proc.wait()
    from core.fsutil import host_name

    return {"host": host_name(), "pid": proc.pid, "started": 1.0, "devices": "cpu"}


def test_cancel_of_a_job_whose_daemon_is_gone_is_done_at_once(realm, queue):
    drop(realm, "normal", "a.jsonl")
    job = queue.claim_next(dead_worker())
    moved, said = cancel_job(queue, job, "abandoned", who="ana@box")
    assert moved.status is JobState.CANCELLED
    assert "is no longer running; cancelled, now queue/cancelled/a.jsonl" in said
    assert "cancelled by ana@box while processing: abandoned; its daemon" in \
        moved.history[-1]["reason"]


def test_a_reaped_job_with_a_cancel_request_is_cancelled_not_requeued(realm, queue):
    drop(realm, "normal", "a.jsonl")
    job = queue.claim_next(dead_worker())
    CancelRequest("ana@box", "stop it", "now", job.started_at).write(
        JobFiles.of(realm.status, job.id))
    [reaped] = Daemon(realm, DaemonConfig(min_free_disk_gb=0.0001)).recover()
    assert reaped.status is JobState.CANCELLED and reaped.attempts == 0
    assert reaped.history[-1]["reason"].startswith("cancelled by ana@box while processing: "
                                                   "stop it; owner ")
    assert not JobFiles.of(realm.status, job.id).cancel.exists()


# --- cancel of a running job, end to end ---------------------------------------------------------

@pytest.mark.slow(seconds=60)
def test_cancel_of_a_running_job_stops_it_and_the_next_job_starts_before_it(tmp_path):
    paths = realm_for(tmp_path)
    write_dataset(paths.state_dir("normal") / "first.jsonl", 40)
    assert realm_cmd(paths.base, "daemon", "--once").returncode == 0
    head = complete_checkpoints(ckpt_root(paths))[-1]
    assert head.lineage()[1] and head.step == 3

    for name, sets in (("long.jsonl", ["--set", "training.max_steps=100000",
                                       "--set", "training.epochs=1000"]), ("next.jsonl", [])):
        write_dataset(paths.base / name, 40)
        assert realm_cmd(paths.base, "queue", "add", str(paths.base / name), *sets).returncode == 0
    long_job = TrainingQueue(paths.base).find("long.jsonl")

    def long_checkpoint():
        return [c for c in complete_checkpoints(ckpt_root(paths))
                if c.lineage()[0] == long_job.id and c.step >= head.step + 4]

    daemon = start_daemon(paths.base)
    try:
        wait_for(long_checkpoint, what="a checkpoint of the long job past the head")
        out = realm_cmd(paths.base, "queue", "cancel", "long.jsonl", "--reason", "wrong data")
        assert out.returncode == 0 and f"{long_job.id}: cancel requested" in out.stdout, out.stderr
        wait_for(lambda: [j for j in TrainingQueue(paths.base).jobs_in("completed")
                          if j.dataset_name == "next.jsonl"], what="the next job")
        assert daemon.poll() is None, "the daemon kept running"
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0
    finally:
        daemon.kill()
        stdout, _ = daemon.communicate()
    q = TrainingQueue(paths.base)
    cancelled = q.find("long.jsonl")
    assert cancelled.status is JobState.CANCELLED, cancelled.history[-1]
    reason = cancelled.history[-1]["reason"]
    assert reason.startswith("cancelled by ") and "while processing: wrong data" in reason
    stopped_at = int(reason.split(" at step ")[1].split()[0])
    assert stopped_at >= head.step + 4
    assert f"cancel of {long_job.id} requested by" in stdout
    nxt = q.find("next.jsonl")
    assert nxt.start_step == head.step, "the next job continues from the head, not the cancel"
    assert not [c for c in complete_checkpoints(ckpt_root(paths))
                if c.lineage()[0] == long_job.id], "the cancelled job's checkpoints are gone"
    assert not JobFiles.of(paths.status, long_job.id).cancel.exists()


def test_a_cancelled_child_that_did_not_stop_cleanly_is_still_cancelled(realm, queue):
    """Killed after the grace (or crashed) with a cancel request: cancelled, not requeued as a
    retryable failure; a child that completed first stays completed."""
    from daemon.supervisor import ChildEnd

    daemon = Daemon(realm, DaemonConfig(min_free_disk_gb=0.0001))
    drop(realm, "normal", "a.jsonl")
    drop(realm, "normal", "b.jsonl")
    for name, outcome, state in (
            ("a.jsonl", Outcome(exitcodes.CRASHED, "crash", "killed by signal 9"),
             JobState.CANCELLED),
            ("b.jsonl", Outcome(exitcodes.COMPLETED, "completed", results={"final_step": 4}),
             JobState.COMPLETED)):
        job = queue.claim_next(daemon.worker)
        assert job.dataset_name == name
        CancelRequest("ana@box", "enough", "now", job.started_at).write(
            JobFiles.of(realm.status, job.id))
        moved = daemon._record(job, ChildEnd(None, 9, "killed"), outcome)
        assert moved.status is state and moved.attempts == 0
        assert not JobFiles.of(realm.status, job.id).cancel.exists()
    reason = queue.find("a.jsonl").history[-1]["reason"]
    assert reason == ("cancelled by ana@box while processing: enough; the child ended without "
                      "removing its checkpoints (killed by signal 9): the campaign's next job "
                      "discards them")
