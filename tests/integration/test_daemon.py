"""The long-running daemon with real processes and real signals."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from core.fsutil import host_name
from core.training_queue import TrainingQueue
from tests.conftest import tree
from tests.trainer.test_training import ckpt_root, make_realm
from trainer.data.synthetic import write_dataset

FAST_DAEMON = {"daemon": {"settle_seconds": 0.2, "heartbeat_seconds": 0.2, "lease_seconds": 5,
                          "poll_interval": 0.5, "stop_grace_seconds": 60}}


def env():
    return {k: v for k, v in os.environ.items() if k != "REALM_DEBUG"}


def start_daemon(base: Path, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cli", "--base-dir", str(base), "daemon",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env())


def realm_cmd(base, *args, timeout=300, extra_env=None):
    return subprocess.run([sys.executable, "-m", "cli", "--base-dir", str(base), *args],
                          capture_output=True, text=True, env={**env(), **(extra_env or {})},
                          timeout=timeout)


def wait_for(predicate, timeout=120, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def realm_with_job(tmp_path, n=120, steps=12):
    paths = make_realm(tmp_path / "r", {"training": {"micro_batch_size": 4, "max_steps": steps,
                                                     "warmup_steps": 2},
                                        "data": {"max_length": 128},
                                        "checkpoint": {"save_steps": 3, "keep_last": 10}})
    (paths.base / "config.json").write_text(json.dumps(FAST_DAEMON))
    write_dataset(paths.state_dir("normal") / "job.jsonl", n)
    return paths


def job_state(paths):
    q = TrainingQueue(paths.base)
    return {j.dataset_name: (j.status.value, j) for f in ("normal", "processing", "completed",
                                                          "failed") for j in q.jobs_in(f)}


def state_of(paths, name):
    """The job's state, or None while a move between folders hides it from this (folder by
    folder, not atomic) listing: a scan of 'normal' then 'processing' can miss a job the daemon
    requeues in between."""
    found = job_state(paths).get(name)
    return found[0] if found else None


def completions(paths, job_id):
    return [e for e in map(json.loads, paths.ledger.read_text().splitlines())
            if e["job_id"] == job_id and e["to"] == "completed"]


def daemon_status_file(paths, devices: str = "cpu"):
    return paths.status / f"daemon-{host_name()}-{devices}.json"


def child_pid(paths) -> int:
    status = json.loads(daemon_status_file(paths).read_text())
    return status.get("child_pid") if status.get("state") == "training" else None


def child_past_first_checkpoint(paths) -> int:
    """Wait for the job's step-3 checkpoint; then the training child's pid."""
    wait_for(lambda: (ckpt_root(paths) / "step-3" / "COMPLETE").exists(), what="step-3")
    return wait_for(lambda: child_pid(paths), what="child pid")


@pytest.mark.slow
def test_sigterm_requeues_with_resume_point_and_next_run_finishes(tmp_path):
    paths = realm_with_job(tmp_path, steps=30)
    daemon = start_daemon(paths.base)
    try:
        wait_for(lambda: (ckpt_root(paths) / "step-3" / "COMPLETE").exists(), what="step-3")
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0
    finally:
        daemon.kill()
        daemon.communicate()
    status, job = job_state(paths)["job.jsonl"]
    assert status == "queued" and job.dataset_path == "queue/normal/job.jsonl"
    assert job.resume and job.resume["step"] >= 3
    resumed_at = job.resume["step"]
    out = realm_cmd(paths.base, "daemon", "--once")
    assert out.returncode == 0, out.stderr
    status, job = job_state(paths)["job.jsonl"]
    assert status == "completed" and job.final_step > resumed_at
    log = (paths.logs / "jobs" / f"{job.id}.log").read_text()
    assert '"event": "job.resumed"' in log


@pytest.mark.slow
def test_kill_9_of_the_child_is_recorded_and_the_retry_resumes(tmp_path):
    paths = realm_with_job(tmp_path, steps=30)
    daemon = start_daemon(paths.base, "--poll", "0.3")
    try:
        os.kill(child_past_first_checkpoint(paths), signal.SIGKILL)
        wait_for(lambda: state_of(paths, "job.jsonl") == "completed", timeout=180,
                 what="completion after retry")
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0
    finally:
        daemon.kill()
        daemon.communicate()
    job = job_state(paths)["job.jsonl"][1]
    kills = [h for h in job.history if "signal 9 (SIGKILL)" in h["reason"]]
    assert kills and kills[0]["to"] == "queued" and job.attempts == 1
    assert '"event": "job.resumed"' in (paths.logs / "jobs" / f"{job.id}.log").read_text()


@pytest.mark.slow
def test_kill_9_of_the_daemon_leaves_no_orphan_and_restart_completes_once(tmp_path):
    paths = realm_with_job(tmp_path, steps=30)
    daemon = start_daemon(paths.base)
    try:
        pid = child_past_first_checkpoint(paths)
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(timeout=10)
        wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() ==
                 psutil.STATUS_ZOMBIE, timeout=10, what="the orphan to die")
    finally:
        daemon.kill()
        daemon.communicate()
    status = json.loads(realm_cmd(paths.base, "queue", "status", "--json").stdout)
    assert [(d["state"], d["last_state"]) for d in status["daemons"]] == [("gone", "training")]
    assert "] gone: job" in realm_cmd(paths.base, "queue", "status").stdout
    out = realm_cmd(paths.base, "daemon", "--once")
    assert out.returncode == 0, out.stderr
    assert "recovered" in out.stdout
    status, job = job_state(paths)["job.jsonl"]
    assert status == "completed" and job.final_step > 3
    assert len(completions(paths, job.id)) == 1
    assert '"event": "job.resumed"' in (paths.logs / "jobs" / f"{job.id}.log").read_text()


def test_second_daemon_on_the_same_devices_exits_2_naming_the_first(tmp_path):
    paths = make_realm(tmp_path / "r")
    (paths.base / "config.json").write_text(json.dumps(FAST_DAEMON))
    first = start_daemon(paths.base, "--poll", "0.5")
    try:
        wait_for(lambda: daemon_status_file(paths).exists(), what="first daemon")
        second = realm_cmd(paths.base, "daemon", "--once", timeout=60)
        assert second.returncode == 2
        assert f"pid {first.pid}" in second.stderr and "another daemon" in second.stderr
        other = realm_cmd(paths.base, "daemon", "--once", "--devices", "1", timeout=60)
        assert other.returncode == 0, other.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=30)
        first.communicate()


def test_plan_changes_nothing_and_lists_problems(tmp_path):
    paths = make_realm(tmp_path / "r")
    write_dataset(paths.state_dir("high") / "good.jsonl", 40)
    (paths.state_dir("normal") / "broken.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n')
    (paths.state_dir("low") / "hero.jsonl").write_text('{"text": "ok"}\n')
    (paths.state_dir("low") / "hero.jsonl.job.json").write_text('{"hero_id": "nobody"}')
    before = tree(paths.base)
    out = realm_cmd(paths.base, "daemon", "--plan", "--json")
    assert out.returncode == 0, out.stderr
    assert tree(paths.base) == before, "--plan wrote or moved something"
    plan = json.loads(out.stdout)
    rows = {r["file"]: r for r in plan["jobs"]}
    assert [r["file"] for r in plan["jobs"]] == ["queue/high/good.jsonl",
                                                 "queue/normal/broken.jsonl",
                                                 "queue/low/hero.jsonl"]
    good = rows["queue/high/good.jsonl"]
    assert good["problems"] == [] and good["estimated_steps"] >= 1
    assert good["settings"]["training.micro_batch_size"] == {"value": 4, "layer": "campaign"}
    assert any("broken.jsonl:2: none of 'text'" in p for p in rows["queue/normal/broken.jsonl"]
               ["problems"])
    assert any("unknown hero 'nobody'" in p for p in rows["queue/low/hero.jsonl"]["problems"])
    text = realm_cmd(paths.base, "daemon", "--plan").stdout
    assert "problem:" in text and "good.jsonl" in text
    two = json.loads(realm_cmd(paths.base, "daemon", "--plan", "--json", "--devices",
                               "cpu:2").stdout)
    assert (two["devices"], two["ranks_per_job"]) == ("cpu:2", 2)
    assert two["jobs"][0]["global_batch"] == 2 * good["global_batch"]
    assert two["jobs"][0]["estimated_steps"] <= good["estimated_steps"]
    bad = json.loads(realm_cmd(paths.base, "daemon", "--plan", "--json", "--devices",
                               "gpu").stdout)
    assert any("not a device set" in p["problem"] for p in bad["problems"])
    refused = realm_cmd(paths.base, "daemon", "--once", "--devices", "0,0")
    assert refused.returncode == 2 and "distinct CUDA ids" in refused.stderr
    assert tree(paths.base) == before


def test_disk_floor_blocks_claims_and_says_why(tmp_path):
    paths = make_realm(tmp_path / "r")
    (paths.base / "config.json").write_text(json.dumps(
        {"daemon": {"settle_seconds": 0.1, "min_free_disk_gb": 1e9}}))
    write_dataset(paths.state_dir("normal") / "a.jsonl", 20)
    out = realm_cmd(paths.base, "daemon", "--once")
    assert out.returncode == 3 and "waiting: free disk" in out.stdout  # exit 3: jobs left queued
    assert "1 job(s) left queued: not claiming: free disk" in out.stdout
    status = json.loads(realm_cmd(paths.base, "queue", "status", "--json").stdout)
    assert status["counts"]["queued"] == 1 and status["counts"]["processing"] == 0
    assert "daemon.min_free_disk_gb" in status["daemons"][0]["reason"]
    assert "not claiming: free disk" in realm_cmd(paths.base, "queue", "status").stdout


@pytest.mark.slow
def test_cp_of_a_large_file_is_never_trained_truncated(tmp_path):
    paths = make_realm(tmp_path / "r")
    (paths.base / "config.json").write_text(json.dumps(
        {"daemon": {"settle_seconds": 0.5, "poll_interval": 0.2}}))
    src = tmp_path / "big.jsonl"
    line = json.dumps({"text": "x" * 1000}) + "\n"
    src.write_text(line * 40_000)  # ~40 MB
    (paths.state_dir("normal") / "big.jsonl.job.json").write_text('{"campaign_id": "nope"}')
    daemon = start_daemon(paths.base)
    try:
        time.sleep(1.0)
        subprocess.run(["cp", str(src), str(paths.state_dir("normal") / "big.jsonl")], check=True)
        wait_for(lambda: list(paths.state_dir("failed").glob("big.jsonl.job.json")), timeout=120,
                 what="the job to run (and fail on its unknown campaign)")
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
        daemon.communicate()
    job = json.loads((paths.state_dir("failed") / "big.jsonl.job.json").read_text())
    assert job["num_bytes"] == src.stat().st_size
    assert job["dataset_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert job["num_examples"] == 40_000


@pytest.mark.slow(seconds=36)
def test_two_daemons_on_distinct_devices_complete_every_job_once(tmp_path):
    JOBS = 6  # enough for both daemons to interleave claims on one campaign
    paths = make_realm(tmp_path / "r", {"training": {"micro_batch_size": 2, "max_steps": 1},
                                        "data": {"max_length": 64},
                                        "checkpoint": {"save_steps": 100, "keep_last": 100}})
    (paths.base / "config.json").write_text(json.dumps(FAST_DAEMON))
    for i in range(JOBS):
        write_dataset(paths.state_dir(("high", "normal", "low")[i % 3]) / f"j{i:02d}.jsonl", 4, i)
    daemons = [start_daemon(paths.base, "--once", "--devices", d) for d in ("0", "1")]
    for d in daemons:
        out, err = d.communicate(timeout=600)
        assert d.returncode == 0, err[-3000:]
    q = TrainingQueue(paths.base)
    done = q.jobs_in("completed")
    assert len(done) == JOBS and not q.jobs_in("failed") and not q.jobs_in("processing")
    assert all(len(completions(paths, j.id)) == 1 for j in done)
    # one campaign: the daemons take turns as it comes (backfill passes over a busy campaign,
    # so which daemon trains how many is timing; test_shared_realm covers the two-campaign case)
    steps = sorted(j.final_step for j in done)
    assert steps == list(range(1, JOBS + 1)), "one linear lineage: no two jobs forked the campaign"


@pytest.mark.slow
def test_second_signal_kills_the_child_and_requeues(tmp_path):
    paths = realm_with_job(tmp_path, steps=30)
    daemon = start_daemon(paths.base)
    try:
        pid = child_past_first_checkpoint(paths)
        os.kill(pid, signal.SIGSTOP)  # a child that would never reach its step boundary
        daemon.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
    finally:
        daemon.kill()
        out, _ = daemon.communicate()
    assert "cold stop" in out
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    status, job = job_state(paths)["job.jsonl"]
    assert status == "queued" and "daemon stopped" in job.history[-1]["reason"]
    assert "signal 9 (SIGKILL): second stop signal" in job.history[-1]["reason"]


@pytest.mark.slow
def test_a_silent_child_is_killed_after_job_timeout_and_retried(tmp_path):
    paths = realm_with_job(tmp_path, steps=30)
    config = json.loads((paths.base / "config.json").read_text())
    config["daemon"]["job_timeout"] = 2
    (paths.base / "config.json").write_text(json.dumps(config))
    daemon = start_daemon(paths.base)
    try:
        os.kill(child_past_first_checkpoint(paths), signal.SIGSTOP)
        wait_for(lambda: state_of(paths, "job.jsonl") == "completed", timeout=180,
                 what="the retry to complete")
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
    finally:
        daemon.kill()
        daemon.communicate()
    job = job_state(paths)["job.jsonl"][1]
    timeouts = [h for h in job.history if "timeout: no sign of life for" in h["reason"]]
    assert timeouts and "while training (daemon.job_timeout 2 s" in timeouts[0]["reason"]
    assert job.attempts == 1
