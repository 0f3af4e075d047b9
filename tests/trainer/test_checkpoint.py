"""Checkpoints: loadable by from_pretrained with the same logits, complete-or-ignored, numeric."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from trainer.checkpoint import (CheckpointExists, NonFiniteWeights, apply_retention,
                                clean_incomplete, complete_checkpoints, latest_checkpoint,
                                lineage_head, save_checkpoint, stage_checkpoint)

LOCKED = {"base_model": "random-init:tiny-qwen3", "model_architecture": "Qwen3ForCausalLM",
          "max_context_length": 1024, "vocab_size": 512, "model_version": "tiny-qwen3/c1"}


def save(root, step, model, tokenizer, job="j", finished=False, stage=False):
    writer = stage_checkpoint if stage else save_checkpoint
    return writer(root, step, model, tokenizer, state={"job_id": job, "job_finished": finished},
                  torch_state={"rng_cpu": torch.get_rng_state()}, locked=LOCKED)


def test_checkpoint_loads_with_from_pretrained_and_same_logits(tmp_path, tiny_model, tokenizer):
    ckpt = save(tmp_path, 7, tiny_model, tokenizer)
    assert {"COMPLETE", "config.json", "model.safetensors", "tokenizer.json", "locked.json",
            "trainer_state.json", "trainer_state.pt"} <= {p.name for p in ckpt.path.iterdir()}
    loaded = AutoModelForCausalLM.from_pretrained(ckpt.path).eval()
    ids = torch.tensor([tokenizer("checkpoint round trip")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, tiny_model(ids).logits)
    assert ckpt.locked() == LOCKED and ckpt.state()["step"] == 7
    assert torch.equal(ckpt.torch_state()["rng_cpu"], torch.get_rng_state())


def test_latest_is_numeric_and_requires_the_marker(tmp_path, tiny_model, tokenizer):
    for step in (9, 10, 100):
        save(tmp_path, step, tiny_model, tokenizer)
    assert latest_checkpoint(tmp_path).step == 100
    (tmp_path / "step-100" / "COMPLETE").unlink()  # e.g. a copy that never finished
    (tmp_path / "step-200").mkdir()
    assert latest_checkpoint(tmp_path).step == 10
    assert [c.step for c in complete_checkpoints(tmp_path)] == [9, 10]
    removed = {p.name for p in clean_incomplete(tmp_path)}
    assert removed == {"step-100", "step-200"}


def test_stale_temp_folder_of_a_dead_writer_is_cleaned(tmp_path):
    import socket

    stale = tmp_path / f".step-5.tmp-{socket.gethostname()}-999999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    assert clean_incomplete(tmp_path) == [stale] and not stale.exists()


def test_retention_keeps_the_newest(tmp_path, tiny_model, tokenizer):
    for step in (1, 2, 3, 4):
        save(tmp_path, step, tiny_model, tokenizer)
    apply_retention(tmp_path, keep_last=2)
    assert [c.step for c in complete_checkpoints(tmp_path)] == [3, 4]


def test_non_finite_weights_are_never_written(tmp_path, tiny_model, tokenizer):
    with torch.no_grad():
        next(tiny_model.parameters())[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeights, match="NaN/Inf"):
        save(tmp_path, 1, tiny_model, tokenizer)
    assert list(tmp_path.iterdir()) == []


def test_a_step_folder_is_never_reused_and_a_collision_is_an_error(tmp_path, tiny_model,
                                                                   tokenizer):
    first = save(tmp_path, 3, tiny_model, tokenizer)
    marker = json.loads((first.path / "COMPLETE").read_text())
    with pytest.raises(CheckpointExists, match="never reused"):
        save(tmp_path, 3, tiny_model, tokenizer)
    staged = save(tmp_path, 4, tiny_model, tokenizer, stage=True)
    shutil.copytree(first.path, tmp_path / "step-4")  # another writer got there first
    with pytest.raises(CheckpointExists, match="nothing was overwritten"):
        staged.commit()
    assert json.loads((first.path / "COMPLETE").read_text()) == marker
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "temp removed"


def test_a_staged_checkpoint_counts_only_once_committed(tmp_path, tiny_model, tokenizer):
    staged = save(tmp_path, 5, tiny_model, tokenizer, stage=True)
    assert complete_checkpoints(tmp_path) == []
    staged.discard()
    assert list(tmp_path.iterdir()) == []
    assert save(tmp_path, 5, tiny_model, tokenizer, stage=True).commit().step == 5


def test_the_head_is_the_newest_finished_checkpoint(tmp_path, tiny_model, tokenizer):
    save(tmp_path, 4, tiny_model, tokenizer, job="a", finished=True)
    save(tmp_path, 6, tiny_model, tokenizer, job="b")  # b's resume point: not the lineage
    assert lineage_head(tmp_path).step == 4 and latest_checkpoint(tmp_path).step == 6
    (tmp_path / "step-8").mkdir()
    (tmp_path / "step-8" / "COMPLETE").write_text("{}")  # no trainer_state.json: unreadable
    assert lineage_head(tmp_path).step == 4


def test_retention_during_a_job_touches_only_that_jobs_resume_points(tmp_path, tiny_model,
                                                                     tokenizer):
    save(tmp_path, 1, tiny_model, tokenizer, job="a", finished=True)
    for step in (2, 3, 4):
        save(tmp_path, step, tiny_model, tokenizer, job="b")
    apply_retention(tmp_path, keep_last=1, job_id="b")
    assert [c.step for c in complete_checkpoints(tmp_path)] == [1, 4]


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


def test_a_malicious_pickle_is_a_permanent_refusal_naming_the_folder(tmp_path, tiny_model,
                                                                     tokenizer, monkeypatch):
    import pickle

    from core.errors import InputError
    from trainer.checkpoint import UnsafeCheckpoint

    monkeypatch.chdir(tmp_path)
    root = tmp_path / "campaigns" / "h" / "c" / "checkpoints"
    ckpt = save(root, 3, tiny_model, tokenizer)
    (ckpt.path / "trainer_state.pt").write_bytes(pickle.dumps({"optimizer": _Evil()}))
    with pytest.raises(UnsafeCheckpoint) as info:
        ckpt.torch_state()
    message = str(info.value)
    assert isinstance(info.value, InputError), "permanent: never retried as a crash"
    assert f"move the folder step-3 out of {root}" in message
    assert "weights_only" not in message
    assert not (tmp_path / "PWNED").exists()
