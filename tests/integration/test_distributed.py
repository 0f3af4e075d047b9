"""Jobs on several processes: real torch.distributed.run, gloo on CPU, real signals."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import psutil
import pytest
import torch

from core.fsutil import host_name
from core.job import Job
from core.training_queue import TrainingQueue
from tests.integration.test_daemon import FAST_DAEMON, realm_cmd, start_daemon, wait_for
from tests.trainer.test_training import ckpt_root, make_realm
from trainer.data.synthetic import write_dataset

pytestmark = pytest.mark.slow


def realm(base: Path, micro_batch_size: int, n: int = 150, max_length: int = 128,
          governor: dict | None = None, **training) -> Path:
    overrides = {"training": {"micro_batch_size": micro_batch_size, "grad_accum": 2,
                              "warmup_steps": 2, **training},
                 "data": {"max_length": max_length, "packing": False, "val_fraction": 0.0},
                 "checkpoint": {"save_steps": 3, "keep_last": 10},
                 "governor": {"snapshot_steps": 2, **(governor or {})},
                 "logging": {"level": "debug", "status_every_seconds": 0}}
    paths = make_realm(base, overrides)
    (paths.base / "config.json").write_text(json.dumps(FAST_DAEMON))
    write_dataset(paths.state_dir("normal") / "job.jsonl", n)
    return paths


def only_job(paths, folder="completed") -> Job:
    jobs = TrainingQueue(paths.base).jobs_in(folder)
    assert len(jobs) == 1, [j.id for j in TrainingQueue(paths.base).jobs_in("failed")]
    return jobs[0]


def events(log: Path, name: str) -> list[dict]:
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    return [e for e in lines if e.get("event") == name]


def step_losses(paths, job: Job) -> list[float]:
    return [e["loss"] for e in events(paths.logs / "jobs" / f"{job.id}.log", "train.step")]


@pytest.mark.slow(seconds=20)
def test_two_gloo_ranks_match_one_process_with_the_same_global_batch(tmp_path):
    # 1 epoch of 149 unpacked rows: the last global microbatch (4 rows) holds a single row,
    # so rank 1 runs the zero-weight row there and the curves must still agree
    one = realm(tmp_path / "one", micro_batch_size=4, n=149, max_length=512, epochs=1)
    two = realm(tmp_path / "two", micro_batch_size=2, n=149, max_length=512, epochs=1)
    assert realm_cmd(one.base, "daemon", "--once", "--devices", "cpu").returncode == 0
    out = realm_cmd(two.base, "daemon", "--once", "--devices", "cpu:2")
    assert out.returncode == 0, out.stderr
    a, b = only_job(one), only_job(two)
    rows = a.metadata["data"]["rows"]
    assert rows % 4 == 1 and b.metadata["data"]["rows"] == rows
    assert b.metadata["data"]["world_size"] == 2
    assert b.metadata["data"]["ranks"] == {"world": 2, "rollbacks_per_rank": [0, 0],
                                           "parallelism": "ddp", "nodes": 1,
                                           "hosts": [host_name()] * 2, "weights_agree": True}
    la, lb = step_losses(one, a), step_losses(two, b)
    assert len(la) == len(lb) == a.final_step == math.ceil(math.ceil(rows / 4) / 2)
    assert max(abs(x - y) for x, y in zip(la, lb)) <= 1e-5, (la, lb)
    assert abs(a.final_loss - b.final_loss) <= 1e-5
    rank1_log = two.logs / "jobs" / f"{b.id}.rank1.log"
    assert events(rank1_log, "data.ready") and not list(
        (two.campaigns / "tiny-qwen3" / "c1" / "checkpoints").glob(".step-*"))


def ranks_of(daemon: psutil.Process) -> dict[int, psutil.Process]:
    out = {}
    for p in daemon.children(recursive=True):
        try:
            env = p.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "RANK" in env and "trainer.run_job" in " ".join(p.cmdline()):
            out[int(env["RANK"])] = p
    return out


def status_step(paths) -> int:
    for progress in (paths.status / "jobs").glob("*.progress.json"):
        try:
            return json.loads(progress.read_text()).get("step", 0)
        except (OSError, ValueError):
            pass
    return 0


def at_step(paths, daemon, step: int, act) -> tuple[str, str]:
    """Once the running job passes ``step``, ``act()``; then wait for the daemon to exit."""
    try:
        wait_for(lambda: status_step(paths) >= step, timeout=180, what=f"step {step}")
        act()
        return daemon.communicate(timeout=300)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.communicate()


@pytest.mark.slow(seconds=19)
def test_killing_one_rank_tears_the_group_down_and_the_retry_resumes(tmp_path):
    paths = realm(tmp_path / "r", micro_batch_size=2, max_steps=30, epochs=3)
    daemon = start_daemon(paths.base, "--once", "--devices", "cpu:2")
    ranks = {}

    def kill_rank_one():
        # a checkpoint is committed once the next step's loss approves it: wait for the marker
        wait_for(lambda: list(ckpt_root(paths).glob("step-*/COMPLETE")), what="a checkpoint")
        ranks.update(wait_for(lambda: ranks_of(psutil.Process(daemon.pid)), what="ranks"))
        assert set(ranks) == {0, 1}
        ranks[1].send_signal(signal.SIGKILL)

    _, err = at_step(paths, daemon, 4, kill_rank_one)  # checkpoint 3 exists
    assert daemon.returncode == 0, err
    job = only_job(paths)
    assert job.attempts == 1 and job.last_error.startswith("crashed:")
    assert job.metadata["resumed_from"] >= 3 and job.final_step == 30
    # the launcher saw rank 1 die and tore the group down (its report is in the job log)
    assert "Signal 9 (SIGKILL)" in (paths.logs / "jobs" / f"{job.id}.log").read_text()
    assert job.metadata["data"]["ranks"]["weights_agree"] is True
    ledger = [json.loads(line) for line in paths.ledger.read_text().splitlines()]
    retry = [e for e in ledger if e["from"] == "processing" and e["to"] == "queued"]
    assert len(retry) == 1 and "retryable failure, attempt 1/3" in retry[0]["reason"]
    assert sum(e["to"] == "completed" for e in ledger) == 1
    for rank in ranks.values():  # the whole first group is gone (no orphans)
        assert not rank.is_running() or rank.status() == psutil.STATUS_ZOMBIE


@pytest.mark.parametrize("memory_gb", [None, 1e-6])  # default: two slots; tiny: disk mode
def test_nan_on_rank_one_rolls_back_every_rank(tmp_path, memory_gb):
    paths = realm(tmp_path / "r", micro_batch_size=2, max_steps=12,
                  governor={"snapshot_memory_gb": memory_gb})
    env = {**os.environ, "REALM_TEST_NAN_AT": "1:5"}
    env.pop("REALM_DEBUG", None)
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "cli", "--base-dir", str(paths.base),
                          "daemon", "--once", "--devices", "cpu:2"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    job = only_job(paths)
    assert job.governor["rollbacks"] == 1 and job.governor["panics"]["nan"] == 1
    assert job.governor["snapshot_mode"] == ("disk" if memory_gb else "two_slots")
    ranks = job.metadata["data"]["ranks"]
    assert ranks["rollbacks_per_rank"] == [1, 1] and ranks["weights_agree"] is True
    assert list((paths.status / "jobs").iterdir()) == []  # the job's status files are gone
    for log in (paths.logs / "jobs" / f"{job.id}.log",
                paths.logs / "jobs" / f"{job.id}.rank1.log"):
        (rollback,) = events(log, "governor.rollback")
        assert rollback["reason"] == "nan" and rollback["step"] == 5
        # state 4 was proposed, but step 5's loss (NaN) judged it: back to approved state 3
        # (in disk mode: its checkpoint, read by both ranks)
        assert rollback["snapshot_step"] == 3
        assert len(events(log, "governor.restored_from_disk")) == (1 if memory_gb else 0)
    # nothing non-finite was written: every checkpoint's weights are finite
    from safetensors.torch import load_file

    for ckpt in (paths.campaigns / "tiny-qwen3" / "c1" / "checkpoints").glob("step-*"):
        assert all(t.isfinite().all() for t in load_file(ckpt / "model.safetensors").values())


def final_weights(paths, job: Job) -> dict:
    from safetensors.torch import load_file

    return load_file(Path(job.metadata["checkpoint"]) / "model.safetensors")


@pytest.mark.slow(seconds=25)
def test_warm_stop_of_a_group_resumes_exactly(tmp_path):
    straight = realm(tmp_path / "straight", micro_batch_size=2, max_steps=16, epochs=3)
    assert realm_cmd(straight.base, "daemon", "--once", "--devices", "cpu:2").returncode == 0
    stopped = realm(tmp_path / "stopped", micro_batch_size=2, max_steps=16, epochs=3)
    daemon = start_daemon(stopped.base, "--devices", "cpu:2")
    # warm stop: the daemon's stop file, agreed by both ranks
    _, err = at_step(stopped, daemon, 5, lambda: daemon.send_signal(signal.SIGTERM))
    assert daemon.returncode == 0, err
    waiting = only_job(stopped, "normal")
    assert waiting.attempts == 0 and 5 <= waiting.resume["step"] < 16
    assert realm_cmd(stopped.base, "daemon", "--once", "--devices", "cpu:2").returncode == 0
    a, b = only_job(straight), only_job(stopped)
    assert b.metadata["resumed_from"] == waiting.resume["step"] and b.final_step == 16
    wa, wb = final_weights(straight, a), final_weights(stopped, b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow(seconds=20)
def test_a_lora_job_on_two_ranks_builds_one_base_and_the_ranks_agree(tmp_path):
    """Rank 0 alone builds a random-init hero's base (both ranks building it raced: the second
    rename failed and the group hung); both ranks then train the same adapter."""
    paths = realm(tmp_path / "two", micro_batch_size=2, n=60, max_length=256, epochs=1)
    campaign = paths.campaigns / "tiny-qwen3" / "c1" / "campaign.json"
    data = json.loads(campaign.read_text())
    data["overrides"]["adapter"] = {"method": "lora", "r": 4}
    campaign.write_text(json.dumps(data))
    out = realm_cmd(paths.base, "daemon", "--once", "--devices", "cpu:2")
    assert out.returncode == 0, out.stderr[-2000:]
    job = only_job(paths)
    assert job.metadata["data"]["ranks"] == {"world": 2, "rollbacks_per_rank": [0, 0],
                                             "parallelism": "ddp", "weights_agree": True,
                                             "nodes": 1, "hosts": [host_name()] * 2}
    folder = paths.campaigns / "tiny-qwen3" / "c1"
    assert (folder / "base" / "model.safetensors").exists()
    assert not list(folder.glob(".base.tmp-*")), "no scratch base left behind"
    head = Path(job.metadata["checkpoint"])
    assert (head / "adapter_model.safetensors").exists() and not (head / "model.safetensors").exists()
