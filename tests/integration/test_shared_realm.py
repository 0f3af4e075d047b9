"""Several daemons, standing in for several hosts (REALM_HOST), on one realm in --poll mode."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import psutil
import pytest

from core.training_queue import TrainingQueue
from tests.integration.test_daemon import FAST_DAEMON, realm_with_job, wait_for

pytestmark = pytest.mark.slow


def start_host(base, host: str, *args) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "REALM_DEBUG"}
    env["REALM_HOST"] = host
    return subprocess.Popen([sys.executable, "-m", "cli", "--base-dir", str(base), "daemon",
                             "--poll", "0.2", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def test_a_dead_hosts_lease_is_reaped_once_and_the_job_completes_once(tmp_path):
    paths = realm_with_job(tmp_path, steps=6)
    (paths.base / "config.json").write_text(json.dumps(
        {"daemon": {**FAST_DAEMON["daemon"], "lease_seconds": 2}}))
    q = TrainingQueue(paths.base, settle_seconds=0)
    # a host that died mid-job: its lease names a process that exists nowhere, renewed long ago
    job = q.claim_next({"host": "dead-host", "pid": 4242, "started": 0.0, "devices": "0"})
    q.rewrite(job, lambda j: setattr(j, "heartbeat_at", "2026-01-01T00:00:00.000000+00:00"))
    daemons = [start_host(paths.base, host) for host in ("host-a", "host-b")]
    try:
        done = wait_for(lambda: q.jobs_in("completed"), timeout=180, what="the job completed")
    finally:
        for d in daemons:
            d.send_signal(signal.SIGTERM)
        outs = [d.communicate(timeout=60) for d in daemons]
    assert [d.returncode for d in daemons] == [0, 0], outs
    assert [j.id for j in done] == [job.id]
    ledger = [json.loads(line) for line in paths.ledger.read_text().splitlines()
              if json.loads(line)["job_id"] == job.id]
    reaps = [e for e in ledger if e["from"] == "processing" and e["to"] == "queued"]
    assert len(reaps) == 1, reaps
    reason = reaps[0]["reason"]
    assert "dead-host:4242 has not renewed its lease" in reason and "lease reaped by host-" in reason
    assert sum(e["to"] == "completed" for e in ledger) == 1
    assert done[0].worker["host"] in ("host-a", "host-b") and done[0].attempts == 1


def test_a_daemon_that_lost_its_lease_kills_its_child_and_records_nothing(tmp_path):
    paths = realm_with_job(tmp_path, steps=400)
    q = TrainingQueue(paths.base)
    daemon = start_host(paths.base, "host-a")
    try:
        job = wait_for(lambda: q.jobs_in("processing"), what="a claim")[0]
        progress = paths.status / "jobs" / f"{job.id}.progress.json"
        wait_for(progress.exists, timeout=120, what="training under way")
        # what a reaper on another host does after a network partition: the job is its now
        usurper = {"host": "host-b", "pid": 777, "started": 0.0, "devices": "cpu"}
        q.rewrite(job, lambda j: setattr(j, "worker", usurper))
        wait_for(lambda: "lost " in (paths.logs / "daemon.jsonl").read_text() or
                 '"job.lease_lost"' in (paths.logs / "daemon.jsonl").read_text(),
                 timeout=60, what="the lease loss noticed")
        wait_for(lambda: not [c for c in psutil.Process(daemon.pid).children()
                              if c.is_running() and c.status() != psutil.STATUS_ZOMBIE],
                 timeout=30, what="the child killed")
        assert daemon.poll() is None, "the daemon keeps running"
    finally:
        daemon.send_signal(signal.SIGTERM)
        out, err = daemon.communicate(timeout=60)
    assert daemon.returncode == 0, err
    (still,) = q.jobs_in("processing")
    assert still.id == job.id and still.worker == usurper, "fenced: nothing moved or recorded"
    ledger = [json.loads(line) for line in paths.ledger.read_text().splitlines()]
    assert [e["to"] for e in ledger if e["job_id"] == job.id] == ["queued", "processing"]
    assert "another daemon reaped it" in out


def test_a_second_daemon_backfills_another_campaign_instead_of_waiting(tmp_path):
    from guild.campaigns import create_campaign
    from tests.trainer.test_training import make_realm
    from trainer.data.synthetic import write_dataset

    fast = {"training": {"micro_batch_size": 2, "max_steps": 40}, "data": {"max_length": 64},
            "checkpoint": {"save_steps": 100}}
    paths = make_realm(tmp_path / "r", fast)  # c1, active
    create_campaign(paths, "c2", "tiny-qwen3", overrides=fast, activate_it=False)
    (paths.base / "config.json").write_text(json.dumps(FAST_DAEMON))
    for i in range(2):  # high priority, campaign c1
        write_dataset(paths.state_dir("high") / f"c1-{i}.jsonl", 30, i)
    (paths.state_dir("low") / "c2.jsonl.job.json").write_text('{"campaign_id": "c2"}')
    write_dataset(paths.state_dir("low") / "c2.jsonl", 30, 9)
    q = TrainingQueue(paths.base)
    first = start_host(paths.base, "host-a", "--once", "--devices", "0")
    wait_for(lambda: q.jobs_in("processing"), what="host-a's first claim")
    second = start_host(paths.base, "host-b", "--once", "--devices", "1")
    outs = [d.communicate(timeout=300) for d in (first, second)]
    assert [d.returncode for d in (first, second)] == [0, 0], outs
    done = {j.dataset_name: j for j in q.jobs_in("completed")}
    assert set(done) == {"c1-0.jsonl", "c1-1.jsonl", "c2.jsonl"}
    # host-b passed over c1-1 (high priority, but its campaign was busy) and trained the low
    # priority c2 alongside c1's first job instead of waiting for c1's lock
    assert done["c2.jsonl"].worker["host"] == "host-b"
    ledger = [json.loads(line) for line in paths.ledger.read_text().splitlines()]
    claimed = {e["job_id"]: e["at"] for e in ledger if e["to"] == "processing"}
    completed = {e["job_id"]: e["at"] for e in ledger if e["to"] == "completed"}
    c1 = [done[f"c1-{i}.jsonl"].id for i in range(2)]
    assert claimed[done["c2.jsonl"].id] < min(claimed[c1[1]], completed[c1[0]])
