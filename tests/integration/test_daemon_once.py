"""`realm daemon --once` and `realm demo` with real child training processes."""

from __future__ import annotations

import pytest

import json
import os
import re
import subprocess
import sys

from core import exitcodes
from core.job import JobState
from daemon.training_daemon import record_outcome
from core.training_queue import TrainingQueue
from tests.conftest import drop
from tests.trainer.test_training import make_realm


def realm_cmd(base, *args):
    env = {k: v for k, v in os.environ.items() if k != "REALM_DEBUG"}
    return subprocess.run([sys.executable, "-m", "cli", "--base-dir", str(base), *args],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_once_trains_good_jobs_and_fails_bad_ones_with_the_reason(tmp_path):
    paths = make_realm(tmp_path / "r")
    from trainer.data.synthetic import write_dataset

    write_dataset(paths.state_dir("high") / "good.jsonl", 60)
    (paths.state_dir("normal") / "bad.jsonl").write_text('{"text": "ok"}\n{"oops": 1}\n')
    (paths.base / "config.json").write_text(json.dumps({"daemon": {"settle_seconds": 0.2}}))
    out = realm_cmd(paths.base, "daemon", "--once", "--max-steps", "4")
    assert out.returncode == 1, out.stderr  # one job failed
    assert "1 completed, 1 failed" in out.stdout
    q = TrainingQueue(paths.base)
    done, failed = q.jobs_in("completed"), q.jobs_in("failed")
    assert [j.dataset_name for j in done] == ["good.jsonl"] and done[0].final_step == 4
    assert [j.dataset_name for j in failed] == ["bad.jsonl"]
    assert "bad.jsonl:2: none of 'text'" in failed[0].last_error
    assert (paths.logs / "jobs" / f"{done[0].id}.log").exists()


def test_retryable_exit_codes_requeue_until_max_attempts(realm, queue):
    drop(realm, "high", "a.jsonl")
    job = queue.claim_next()
    job = record_outcome(queue, job, exitcodes.CRASHED, max_attempts=2)
    assert job.status is JobState.QUEUED and job.attempts == 1
    job = record_outcome(queue, queue.claim_next(), exitcodes.RETRYABLE, max_attempts=2)
    assert job.status is JobState.FAILED and "gave up after 2 attempts" in job.last_error


def test_stopped_child_requeues_with_its_priority(realm, queue):
    drop(realm, "low", "a.jsonl")
    job = record_outcome(queue, queue.claim_next(), exitcodes.STOPPED, max_attempts=3)
    assert job.status is JobState.QUEUED and job.dataset_path == "queue/low/a.jsonl"
    assert job.attempts == 0, "a warm stop does not use up an attempt"


@pytest.mark.slow(seconds=90)
def test_demo_end_to_end(tmp_path):
    out = realm_cmd(tmp_path, "demo", "--dir", str(tmp_path / "demo"))
    assert out.returncode == 0, out.stderr[-3000:]
    trained = re.findall(r"^  completed \d{8}-\d{6}-\S+: steps (\d+) -> (\d+)", out.stdout, re.M)
    assert len(trained) == 2 and "latest checkpoint:" in out.stdout
    assert f"realm serve --base-dir {tmp_path / 'demo'}" in out.stdout, "says how to watch"
    assert trained[1][0] == trained[0][1], "the second job continues from the first"
    start, end = map(float, re.search(r"loss: ([\d.]+) at the start -> ([\d.]+) at the end",
                                      out.stdout).groups())
    assert start > 5.0 and end < 1.0, "from near ln(512) to far below it"
    accuracy = float(re.search(r"held-out exact match \(greedy\): ([\d.]+)%", out.stdout)[1])
    assert accuracy > 50.0, f"held-out accuracy {accuracy}% should be far above chance (~1%)"
    assert re.search(r"loss curve \(2 jobs\): [▁▂▃▄▅▆▇█]{20,}", out.stdout)


@pytest.mark.slow(seconds=100)
def test_demo_with_a_lora_adapter_learns_the_skill_and_changes_only_the_adapter(tmp_path):
    out = realm_cmd(tmp_path, "demo", "--dir", str(tmp_path / "demo"), "--adapter", "lora")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "campaign tiny-qwen3/demo-lora" in out.stdout
    trained = re.findall(r"^  completed \d{8}-\d{6}-\S+: steps (\d+) -> (\d+)", out.stdout, re.M)
    assert len(trained) == 2 and trained[1][0] == trained[0][1]
    start, end = map(float, re.search(r"loss: ([\d.]+) at the start -> ([\d.]+) at the end",
                                      out.stdout).groups())
    assert start > 5.0 and end < 2.0, (start, end)
    accuracy = float(re.search(r"held-out exact match \(greedy\): ([\d.]+)%", out.stdout)[1])
    assert accuracy >= 4.0, f"held-out accuracy {accuracy}% should be well above chance (~1%)"
    campaign = tmp_path / "demo" / "campaigns" / "tiny-qwen3" / "demo-lora"
    head = max(campaign.glob("checkpoints/step-*"), key=lambda p: int(p.name.split("-")[1]))
    assert (head / "adapter_model.safetensors").exists()
    assert not (head / "model.safetensors").exists(), "the base is never saved again"
    assert (campaign / "base" / "model.safetensors").exists()
