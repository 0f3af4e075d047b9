"""FSDP2 jobs (``training.parallelism: fsdp``) on two real gloo ranks: the same loss curve as
one process, a consolidated Hugging Face folder that loads and gives the same logits, a SIGKILL
of a rank retried into the same weights bit for bit, and a NaN on one rank rolled back on every
rank."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from core.training_queue import TrainingQueue
from tests.integration.test_daemon import realm_cmd, start_daemon, wait_for
from tests.integration.test_distributed import (at_step, events, final_weights, only_job,
                                                ranks_of, realm, step_losses)
from tests.trainer.test_training import ckpt_root

pytestmark = pytest.mark.slow

FSDP = {"parallelism": "fsdp", "precision": "fp32"}
GROUP = os.environ.get("REALM_FSDP_DEVICES", "cpu:2")
"""The two ranks' devices: gloo on CPU here; ``0,1`` runs the same tests on NCCL
(scripts/check_fsdp_nccl.sh, on a machine with two GPUs)."""
SINGLE = "cpu" if GROUP.startswith("cpu") else GROUP.split(",")[0]


def logits_of(folder, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()  # its monitor thread outlives the test
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.slow(seconds=60)
def test_fsdp_matches_one_process_loads_back_and_a_killed_rank_resumes_bit_identically(tmp_path):
    one = realm(tmp_path / "one", micro_batch_size=4, max_steps=10, epochs=3, precision="fp32")
    straight = realm(tmp_path / "straight", micro_batch_size=2, max_steps=10, epochs=3, **FSDP)
    killed = realm(tmp_path / "killed", micro_batch_size=2, max_steps=10, epochs=3, **FSDP)
    assert realm_cmd(one.base, "daemon", "--once", "--devices", SINGLE).returncode == 0
    live = tmp_path / "sharded-logits.pt"  # the live sharded model's, after its last step
    out = realm_cmd(straight.base, "daemon", "--once", "--devices", GROUP,
                    extra_env={"REALM_TEST_LOGITS": str(live)})
    assert out.returncode == 0, out.stderr
    a, b = only_job(one), only_job(straight)
    assert b.metadata["data"]["ranks"]["parallelism"] == "fsdp"
    assert events(straight.logs / "jobs" / f"{b.id}.log", "model.sharded")
    la, lb = step_losses(one, a), step_losses(straight, b)
    assert len(la) == len(lb) == 10
    assert max(abs(x - y) for x, y in zip(la, lb)) <= 1e-5, (la, lb)

    # the weights are whole, the AdamW state stays sharded (one file per rank, DCP)
    folder = Path(b.metadata["checkpoint"])
    assert (folder / "optimizer_shards" / ".metadata").is_file()
    assert len(list((folder / "optimizer_shards").glob("*.distcp"))) == 2
    assert torch.load(folder / "trainer_state.pt", weights_only=True)["optimizer"] is None
    assert not list(folder.parent.glob(".shards-*")), "every shard folder moved in or removed"
    # the consolidated folder is a plain Hugging Face model: same logits as one process's
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    from safetensors.torch import load_file

    assert load_file(f"{a.metadata['checkpoint']}/model.safetensors").keys() == \
        load_file(f"{b.metadata['checkpoint']}/model.safetensors").keys(), "the same tensors"
    fsdp_logits = logits_of(b.metadata["checkpoint"], ids)
    assert torch.allclose(fsdp_logits, torch.load(live), atol=1e-5), "folder == sharded model"
    assert torch.allclose(fsdp_logits, logits_of(a.metadata["checkpoint"], ids), atol=1e-4)

    daemon = start_daemon(killed.base, "--once", "--devices", GROUP)

    def kill_rank_one():
        wait_for(lambda: list(ckpt_root(killed).glob("step-*/COMPLETE")), what="a checkpoint")
        ranks = wait_for(lambda: ranks_of(psutil.Process(daemon.pid)), what="ranks")
        ranks[1].send_signal(signal.SIGKILL)

    _, err = at_step(killed, daemon, 4, kill_rank_one)
    assert daemon.returncode == 0, err
    c = only_job(killed)
    assert c.attempts == 1 and c.last_error.startswith("crashed:")
    assert c.metadata["resumed_from"] >= 3 and c.final_step == 10
    wb, wc = final_weights(straight, b), final_weights(killed, c)
    assert wb.keys() == wc.keys() and all(torch.equal(wb[k], wc[k]) for k in wb), \
        "the retry resumed the sharded optimizer and weights exactly"


@pytest.mark.slow(seconds=20)
def test_nan_on_one_fsdp_rank_rolls_back_every_rank(tmp_path):
    paths = realm(tmp_path / "r", micro_batch_size=2, max_steps=8, **FSDP)
    env = {**os.environ, "REALM_TEST_NAN_AT": "1:5"}
    env.pop("REALM_DEBUG", None)
    out = subprocess.run([sys.executable, "-m", "cli", "--base-dir", str(paths.base),
                          "daemon", "--once", "--devices", GROUP], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    job = only_job(paths)
    assert job.governor["rollbacks"] == 1 and job.governor["snapshot_mode"] == "two_slots"
    assert job.metadata["data"]["ranks"]["rollbacks_per_rank"] == [1, 1]
    for log in (paths.logs / "jobs" / f"{job.id}.log",
                paths.logs / "jobs" / f"{job.id}.rank1.log"):
        (rollback,) = events(log, "governor.rollback")
        assert (rollback["reason"], rollback["step"], rollback["snapshot_step"]) == ("nan", 5, 3)


def test_fsdp_refuses_a_4bit_base_with_the_fix():
    from config.schema import RealmConfig
    from trainer.engine import _fsdp_problem

    cfg = RealmConfig()
    cfg.training.parallelism = "fsdp"
    assert _fsdp_problem(cfg) is None
    cfg.adapter.method = "lora"
    assert _fsdp_problem(cfg) is None
    cfg.adapter.method = "qlora"
    problem = _fsdp_problem(cfg)
    assert "adapter.method qlora" in problem and "training.parallelism ddp" in problem


@pytest.mark.slow(seconds=30)
def test_a_lora_job_under_fsdp_matches_one_process_saves_the_adapter_and_continues(tmp_path):
    """The frozen base and the adapter sharded together: the loss curve of one process, a PEFT
    adapter folder (gathered, named as peft names it), and the campaign's next fsdp job
    continuing from it with the optimizer shards."""
    import json

    from safetensors.torch import load_file

    from trainer.data.synthetic import write_dataset

    runs = {}
    for name, devices, training in (("one", SINGLE, {"micro_batch_size": 4}),
                                    ("fsdp", GROUP, {"micro_batch_size": 2, **FSDP})):
        paths = realm(tmp_path / name, n=60, max_steps=6, epochs=1,
                      **{"precision": "fp32", **training})
        campaign = paths.campaigns / "tiny-qwen3" / "c1" / "campaign.json"
        data = json.loads(campaign.read_text())
        # no dropout: its masks are drawn per rank, so they differ from one process's
        data["overrides"]["adapter"] = {"method": "lora", "r": 4, "dropout": 0.0}
        campaign.write_text(json.dumps(data))
        out = realm_cmd(paths.base, "daemon", "--once", "--devices", devices)
        assert out.returncode == 0, out.stdout + out.stderr[-3000:]
        runs[name] = (paths, only_job(paths))
    (one, a), (sharded, b) = runs["one"], runs["fsdp"]
    assert b.metadata["data"]["ranks"]["parallelism"] == "fsdp"
    la, lb = step_losses(one, a), step_losses(sharded, b)
    assert len(la) == len(lb) == 6
    assert max(abs(x - y) for x, y in zip(la, lb)) <= 1e-5, (la, lb)
    head = Path(b.metadata["checkpoint"])
    assert (head / "adapter_model.safetensors").is_file()
    assert not (head / "model.safetensors").exists(), "the frozen base is not saved again"
    assert (head / "optimizer_shards" / ".metadata").is_file()
    want = load_file(Path(a.metadata["checkpoint"]) / "adapter_model.safetensors")
    got = load_file(head / "adapter_model.safetensors")
    assert got.keys() == want.keys() and all("lora_" in k for k in got)
    assert all(torch.allclose(got[k], want[k], atol=1e-5) for k in want)
    # the campaign's next job, sharded again, continues from the adapter and its moments
    write_dataset(sharded.state_dir("normal") / "next.jsonl", 60, seed=1)
    out = realm_cmd(sharded.base, "daemon", "--once", "--devices", GROUP)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    done = sorted(TrainingQueue(sharded.base).jobs_in("completed"), key=lambda j: j.final_step)
    assert [j.final_step for j in done] == [6, 12]
    log = sharded.logs / "jobs" / f"{done[1].id}.log"
    assert events(log, "optimizer.moments_carried"), events(log, "optimizer.moments_not_carried")


def test_the_plan_and_the_status_line_show_the_parallelism(tmp_path):
    from cli.status import _progress_line

    paths = realm(tmp_path / "r", micro_batch_size=2, max_steps=3)
    out = realm_cmd(paths.base, "daemon", "--plan", "--devices", "cpu:2", "--set",
                    "training.parallelism=fsdp")
    assert out.returncode == 0, out.stderr
    assert "2 process(es) per job" in out.stdout
    assert "training.parallelism = fsdp (cli)" in out.stdout, out.stdout
    row = {"id": "j", "dataset": "d.jsonl", "priority": "normal", "started_at": None,
           "worker": {}, "progress": {"job_step": 3, "total_steps": 9, "eta_seconds": 4.0,
                                     "world_size": 2, "parallelism": "fsdp",
                                     "metrics": {"loss": 1.0, "tokens_per_sec": 10.0}}}
    assert "fsdp x2" in _progress_line(row)


@pytest.mark.slow(seconds=20)
def test_snapshots_that_do_not_fit_roll_an_fsdp_job_back_from_disk(tmp_path):
    """Snapshots too big for governor.snapshot_memory_gb: the governor rolls back from disk,
    every rank to the same state: first to the job's start (its initial weights, gathered whole
    by the ranks before the first step), then to a committed checkpoint (whole weights cut into
    each rank's shard, AdamW moments from the shards)."""
    paths = realm(tmp_path / "r", micro_batch_size=2, max_steps=9,
                  governor={"snapshot_memory_gb": 1e-6}, **FSDP)
    out = realm_cmd(paths.base, "daemon", "--once", "--devices", GROUP,
                    extra_env={"REALM_TEST_NAN_AT": "1:2,0:8"})
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    job = only_job(paths)
    assert job.governor["snapshot_mode"] == "disk" and job.governor["rollbacks"] == 2
    assert job.metadata["data"]["ranks"]["rollbacks_per_rank"] == [2, 2]
    for log in (paths.logs / "jobs" / f"{job.id}.log",
                paths.logs / "jobs" / f"{job.id}.rank1.log"):
        restored = events(log, "governor.restored_from_disk")
        assert [r.get("start", False) for r in restored] == [True, False], restored
        assert "step-" in restored[1]["path"], restored
    assert not list(ckpt_root(paths).glob(".initial-*")), "the initial weights are removed"
    folder = Path(job.metadata["checkpoint"])
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(folder / "model.safetensors").values())


def test_an_fsdp_adapter_job_whose_snapshots_do_not_fit_fails_with_the_fix():
    from types import SimpleNamespace

    from core.errors import ConfigError
    from trainer.engine import Trainer

    fake = SimpleNamespace(sharded=True, cfg=SimpleNamespace(adapter=SimpleNamespace(
        method="lora")))
    with pytest.raises(ConfigError, match="governor.snapshot_memory_gb"):
        Trainer.prepare_disk_rollback(fake)


@pytest.mark.slow(seconds=75)
def test_moments_carry_from_one_process_into_fsdp_and_from_fsdp_into_ddp(tmp_path):
    """A campaign whose jobs change parallelism: each job takes the AdamW moments of the one
    before (one process -> fsdp: index-keyed state cut into shards; fsdp on 2 ranks -> fsdp on
    3: the DCP shards resharded; fsdp -> ddp: the shards read whole), and the fsdp job
    evaluates its validation split on the way."""
    import json

    from core.training_queue import TrainingQueue
    from trainer.data.synthetic import write_dataset

    paths = realm(tmp_path / "r", micro_batch_size=2, max_steps=4, max_grad_norm=0.0,
                  precision="fp32")
    campaign = paths.campaigns / "tiny-qwen3" / "c1" / "campaign.json"
    data = json.loads(campaign.read_text())
    data["overrides"]["data"]["val_fraction"] = 0.1
    data["overrides"]["eval"] = {"every_steps": 2, "sample_prompts": "prompts.txt",
                                 "sample_max_new_tokens": 6}
    campaign.write_text(json.dumps(data))
    (paths.base / "prompts.txt").write_text("hello\nthe answer is\n")
    three = "cpu:3" if GROUP.startswith("cpu") else GROUP  # shards resharded to 3 ranks
    runs = [(SINGLE, "ddp"), (GROUP, "fsdp"), (three, "fsdp"), (GROUP, "ddp")]
    for i, (devices, parallelism) in enumerate(runs):
        if i:
            write_dataset(paths.state_dir("normal") / f"job{i}.jsonl", 150, seed=i)
        out = realm_cmd(paths.base, "daemon", "--once", "--devices", devices, "--set",
                        f"training.parallelism={parallelism}")
        assert out.returncode == 0, out.stdout + out.stderr
    jobs = sorted(TrainingQueue(paths.base).jobs_in("completed"), key=lambda j: j.final_step)
    assert [j.final_step for j in jobs] == [4, 8, 12, 16]
    assert [j.metadata["data"]["ranks"]["world"] for j in jobs[1:]] == \
        [2, 3 if three == "cpu:3" else 2, 2]
    assert jobs[1].metadata["data"]["ranks"]["parallelism"] == "fsdp"
    for job in jobs[1:]:
        log = paths.logs / "jobs" / f"{job.id}.log"
        assert events(log, "optimizer.moments_carried"), \
            events(log, "optimizer.moments_not_carried")
    fsdp = jobs[1]
    for log in (paths.logs / "jobs" / f"{fsdp.id}.log",
                paths.logs / "jobs" / f"{fsdp.id}.rank1.log"):
        assert [e["step"] for e in events(log, "eval.loss")] == [6, 8]
    # the sample prompts under fsdp: every rank decodes them in step, to the same text
    samples = [[(e["step"], e["prompt"], e["completion"]) for e in events(log, "eval.sample")]
               for log in (paths.logs / "jobs" / f"{fsdp.id}.log",
                           paths.logs / "jobs" / f"{fsdp.id}.rank1.log")]
    assert [s[:2] for s in samples[0]] == [(6, "hello"), (6, "the answer is"), (8, "hello"),
                                           (8, "the answer is")]
    assert samples[0] == samples[1]
    assert fsdp.metadata["data"]["eval"]["last"]["step"] == 8
