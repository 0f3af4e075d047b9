"""The governor on the real engine with tiny-qwen3."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from core import exitcodes
from core.training_queue import TrainingQueue
from trainer.run_job import build_spec, run
from trainer.engine import Trainer
from core.job import Job
from tests.trainer.test_training import ckpt_root, claim, make_realm


def all_checkpoints_finite(root) -> bool:
    for weights in root.glob("step-*/model.safetensors"):
        if not all(torch.isfinite(t).all() for t in load_file(weights).values()):
            return False
    return True


def test_absurd_learning_rate_fails_with_the_governors_reason(tmp_path):
    paths = make_realm(tmp_path / "r")
    assert run(paths, claim(paths)) == exitcodes.COMPLETED
    before = sorted(p.name for p in ckpt_root(paths).glob("step-*"))
    queue = TrainingQueue(paths.base)
    queue.complete(queue.jobs_in("processing")[0])
    src = paths.base / "hot.jsonl"
    src.write_text((paths.base / "d.jsonl").read_text())
    TrainingQueue(paths.base).add(src, overrides={"training": {"learning_rate": 50.0,
                                                               "max_steps": 40}})
    job = TrainingQueue(paths.base).claim_next()
    sidecar = paths.base / (job.dataset_path + ".job.json")
    assert run(paths, sidecar) == exitcodes.PERMANENT
    record = json.loads(sidecar.read_text())
    assert record["last_error"].startswith("governor gave up after 3 rollbacks")
    assert "Lower training.learning_rate (it was 50)" in record["last_error"]
    assert record["governor"]["rollbacks"] == 3
    assert sorted(p.name for p in ckpt_root(paths).glob("step-*")) == before, \
        "the campaign's latest checkpoint is the one from before the job"
    assert all_checkpoints_finite(ckpt_root(paths))


def test_injected_two_step_spike_is_absorbed_by_one_rollback(tmp_path):
    overrides = {"training": {"micro_batch_size": 2, "max_steps": 40, "warmup_steps": 2},
                 "data": {"max_length": 128}, "checkpoint": {"save_steps": 100},
                 "governor": {"min_panics": 2, "snapshot_steps": 5, "min_history": 5,
                              "window": 10}}
    paths = make_realm(tmp_path / "r", overrides)
    sidecar = claim(paths, n=200)
    spec, _ = build_spec(paths, Job.from_dict(json.loads(sidecar.read_text())))
    trainer = Trainer(spec)
    calls = {"n": 0}

    def spike(step, loss):  # the 22nd and 23rd steps the job runs, once (like a bad batch)
        calls["n"] += 1
        return loss * 40 if calls["n"] in (22, 23) else loss

    trainer.loss_hook = spike
    result = trainer.train()
    g = result.governor
    assert g["rollbacks"] == 1 and g["panics"]["divergence"] == 1
    assert g["batches_skipped"] == 3, "steps 21-23 ran after the step-20 snapshot"
    assert result.final_step == 40 and result.checkpoint is not None  # 43 steps of data, 40 kept
    assert trainer.micro_done == 43 * 1, "one microbatch per step: the skipped window is not re-read"
    assert all_checkpoints_finite(ckpt_root(paths))


def test_disabled_governor_is_recorded_on_the_job(tmp_path):
    paths = make_realm(tmp_path / "r", {"training": {"max_steps": 3, "micro_batch_size": 2},
                                        "data": {"max_length": 128},
                                        "governor": {"enabled": False}})
    sidecar = claim(paths, n=40)
    assert run(paths, sidecar) == exitcodes.COMPLETED
    assert json.loads(sidecar.read_text())["governor"] == {"enabled": False}
