"""Whole jobs on the tiny hero: continual training, stop/resume, SIGKILL/resume, exit codes."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core import exitcodes
from daemon.protocol import JobFiles
from core.paths import RealmPaths, init_layout
from core.training_queue import TrainingQueue
from guild.campaigns import create_campaign
from guild.heroes import install_shipped
from trainer.data.synthetic import write_dataset
from trainer.run_job import _StopFlag, run

FAST = {"training": {"micro_batch_size": 4, "max_steps": 12, "warmup_steps": 2},
        "data": {"max_length": 128}, "checkpoint": {"save_steps": 3, "keep_last": 10},
        "logging": {"status_every_seconds": 0}}


def make_realm(base: Path, overrides=FAST) -> RealmPaths:
    paths = RealmPaths(base)
    base.mkdir(parents=True, exist_ok=True)
    init_layout(paths)
    install_shipped(paths)
    create_campaign(paths, "c1", "tiny-qwen3", overrides=json.loads(json.dumps(overrides)))
    return paths


def claim(paths: RealmPaths, n: int = 120, seed: int = 0, name: str = "d.jsonl") -> Path:
    src = write_dataset(paths.base / name, n, seed)
    q = TrainingQueue(paths.base)
    q.add(src)
    job = q.claim_next()
    return paths.base / (job.dataset_path + ".job.json")


def record(paths: RealmPaths, sidecar: Path) -> dict:
    """What the child reported (it never writes the sidecar): the sidecar with the outcome's
    results, reason and resume point applied, as the daemon records them."""
    job = json.loads(sidecar.read_text())
    out = JobFiles.of(paths.status, job["id"]).read_outcome()
    assert out is not None, "the child wrote no outcome"
    assert job.get("final_step") is None and job.get("last_error") is None, \
        "the child wrote into the sidecar"
    return {**job, **out.results, "last_error": out.reason, "resume": out.resume,
            "kind": out.kind}


def ckpt_root(paths: RealmPaths) -> Path:
    return paths.campaigns / "tiny-qwen3" / "c1" / "checkpoints"


def final_weights(paths: RealmPaths) -> dict[str, torch.Tensor]:
    latest = max(ckpt_root(paths).glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    return load_file(latest / "model.safetensors")


def kill_after_first_checkpoint_then_resume(paths: RealmPaths, sidecar: Path, steps: int,
                                            wait: float = 1.0) -> None:
    """Run the job as a child, SIGKILL it at a random moment after its first checkpoint (step
    3), check it died before the end, then run it again to completion from its resume point."""
    cmd = [sys.executable, "-m", "trainer.run_job", "--base-dir", str(paths.base), "--job",
           str(sidecar)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (ckpt_root(paths) / "step-3" / "COMPLETE").exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(random.uniform(0, wait))  # a random step after the first checkpoint
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = sorted(int(p.name.split("-")[1]) for p in ckpt_root(paths).glob("step-*"))
    assert done and done[-1] < steps, f"killed too late to test anything: {done}"
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == exitcodes.COMPLETED, out.stderr[-2000:]
    assert '"event": "job.resumed"' in out.stderr


def test_job_trains_records_results_and_next_job_continues(tmp_path):
    paths = make_realm(tmp_path / "r")
    sidecar = claim(paths)
    assert run(paths, sidecar) == exitcodes.COMPLETED
    job = record(paths, sidecar)
    assert (job["start_step"], job["final_step"]) == (0, 12)
    assert job["final_loss"] < 5.5 and job["tokens_per_sec_avg"] > 0
    assert job["config_hash"].startswith("sha256:")
    assert 0 < job["metadata"]["data"]["packing_efficiency"] <= 1
    status = json.loads((paths.status / "jobs" / f"{job['id']}.progress.json").read_text())
    assert status["state"] == "finished" and status["step"] == 12
    TrainingQueue(paths.base).complete(TrainingQueue(paths.base).find(job["id"]))
    second = claim(paths, seed=1, name="e.jsonl")
    assert run(paths, second) == exitcodes.COMPLETED
    job2 = record(paths, second)
    assert (job2["start_step"], job2["final_step"]) == (12, 24), "job N+1 starts where N ended"


def test_stop_request_checkpoints_and_resume_matches_uninterrupted(tmp_path):
    straight = make_realm(tmp_path / "straight")
    assert run(straight, claim(straight)) == exitcodes.COMPLETED

    stopped = make_realm(tmp_path / "stopped")
    sidecar = claim(stopped)

    class StopAtStepFive(_StopFlag):
        """Asked once per optimizer step: the fifth answer is yes."""

        calls = 0

        def __call__(self, *_):
            self.calls += 1
            return self.calls >= 5

    assert run(stopped, sidecar, stop=StopAtStepFive()) == exitcodes.STOPPED
    resume = record(stopped, sidecar)["resume"]
    assert resume["step"] == 5 and resume["checkpoint"].endswith("checkpoints/step-5")
    assert run(stopped, sidecar) == exitcodes.COMPLETED
    a, b = final_weights(straight), final_weights(stopped)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow(seconds=20)
def test_sigkill_after_first_checkpoint_then_resume_gives_identical_weights(tmp_path):
    overrides = json.loads(json.dumps(FAST))
    overrides["training"]["max_steps"] = 30
    straight = make_realm(tmp_path / "straight", overrides)
    assert run(straight, claim(straight)) == exitcodes.COMPLETED

    killed = make_realm(tmp_path / "killed", overrides)
    kill_after_first_checkpoint_then_resume(killed, claim(killed), steps=30)
    a, b = final_weights(straight), final_weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_retry_after_the_final_checkpoint_does_not_train_the_dataset_again(tmp_path):
    # the child wrote its finished checkpoint and was killed before the daemon recorded the job
    paths = make_realm(tmp_path / "r")
    sidecar = claim(paths)
    assert run(paths, sidecar) == exitcodes.COMPLETED
    before = sorted(p.name for p in ckpt_root(paths).iterdir())
    weights = final_weights(paths)
    assert run(paths, sidecar) == exitcodes.COMPLETED  # the retry
    job = record(paths, sidecar)
    assert sorted(p.name for p in ckpt_root(paths).iterdir()) == before
    assert (job["start_step"], job["final_step"]) == (0, 12)
    assert job["metadata"]["data"]["already_trained"] is True and job["final_loss"] is not None
    again = final_weights(paths)
    assert all(torch.equal(weights[k], again[k]) for k in weights)


def test_bad_data_is_a_permanent_failure_with_the_line(tmp_path):
    paths = make_realm(tmp_path / "r")
    src = paths.base / "bad.jsonl"
    src.write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    q = TrainingQueue(paths.base)
    q.add(src)
    job = q.claim_next()
    sidecar = paths.base / (job.dataset_path + ".job.json")
    assert run(paths, sidecar) == exitcodes.PERMANENT
    error = record(paths, sidecar)["last_error"]
    assert "bad.jsonl:2: none of 'text'" in error


def test_mismatching_locked_checkpoint_is_refused_with_a_diff(tmp_path):
    paths = make_realm(tmp_path / "r")
    assert run(paths, claim(paths)) == exitcodes.COMPLETED
    ckpt = max(ckpt_root(paths).glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    locked = json.loads((ckpt / "locked.json").read_text())
    (ckpt / "locked.json").write_text(json.dumps({**locked, "vocab_size": 1024}))
    sidecar = claim(paths, name="again.jsonl")
    assert run(paths, sidecar) == exitcodes.PERMANENT
    error = record(paths, sidecar)["last_error"]
    assert "vocab_size: checkpoint has 1024, campaign has 512" in error


def test_no_campaign_is_a_clear_permanent_error(tmp_path):
    paths = RealmPaths(tmp_path / "r")
    paths.base.mkdir()
    init_layout(paths)
    sidecar = claim(paths)
    assert run(paths, sidecar) == exitcodes.PERMANENT
    assert "realm campaign create" in record(paths, sidecar)["last_error"]
