"""The governor through the command line: `realm daemon --once` at an absurd learning rate saves
nothing, and `realm queue retry` after lowering it starts from the campaign's head."""

from __future__ import annotations

import json

import pytest
import torch

from core.training_queue import TrainingQueue
from trainer.data.synthetic import write_dataset
from tests.integration.test_daemon_once import realm_cmd
from tests.trainer.test_governor_engine import head_job, tree
from tests.trainer.test_training import ckpt_root, make_realm


@pytest.mark.slow(seconds=25)
def test_daemon_once_at_learning_rate_50_saves_nothing_and_a_retry_starts_from_the_head(
        tmp_path):
    paths = make_realm(tmp_path / "r")
    head_job(paths)  # step-12, the campaign's head
    before = tree(ckpt_root(paths))
    (paths.base / "config.json").write_text(json.dumps({"daemon": {"settle_seconds": 0.2}}))
    for name, steps in (("one.jsonl", 1), ("three.jsonl", 3)):
        src = write_dataset(paths.base / name, 300, seed=3, kinds=("messages",))
        out = realm_cmd(paths.base, "queue", "add", str(src), "--set",
                        f"training.max_steps={steps}")
        assert out.returncode == 0, out.stderr

    out = realm_cmd(paths.base, "daemon", "--once", "--set", "training.learning_rate=50")
    assert out.returncode == 1 and "0 completed, 2 failed" in out.stdout, out.stdout + out.stderr
    failed = TrainingQueue(paths.base).jobs_in("failed")
    for job in failed:
        assert job.last_error.startswith("governor approved no state of this job"), job.last_error
        assert "Lower training.learning_rate (it was 50)" in job.last_error
    assert tree(ckpt_root(paths)) == before, "the campaign's checkpoints are exactly as they were"

    for job in failed:  # the fix the message recommends: the rate back down, then retry
        assert realm_cmd(paths.base, "queue", "retry", job.id).returncode == 0
    out = realm_cmd(paths.base, "daemon", "--once")
    assert out.returncode == 0 and "2 completed, 0 failed" in out.stdout, out.stdout + out.stderr
    done = sorted(TrainingQueue(paths.base).jobs_in("completed"), key=lambda j: j.start_step)
    done = [j for j in done if j.dataset_name != "d.jsonl"]
    assert done[0].start_step == 12, "continues from the head, not from anything the failure left"
    for job in done:
        assert job.governor["rollbacks"] == 0
        ckpt = ckpt_root(paths) / f"step-{job.final_step}"
        assert json.loads((ckpt / "trainer_state.json").read_text())["config_hash"] == \
            job.config_hash
        saved = torch.load(ckpt / "trainer_state.pt", weights_only=True)
        assert saved["optimizer"]["param_groups"][0]["initial_lr"] == pytest.approx(1e-3)
    assert not (ckpt_root(paths) / "step-0").exists()
