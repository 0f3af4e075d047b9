"""Checkpoints: loadable by from_pretrained with the same logits, complete-or-ignored, numeric."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from trainer.checkpoint import (NonFiniteWeights, apply_retention, clean_incomplete,
                                complete_checkpoints, latest_checkpoint, save_checkpoint)

LOCKED = {"base_model": "random-init:tiny-qwen3", "model_architecture": "Qwen3ForCausalLM",
          "max_context_length": 1024, "vocab_size": 512, "model_version": "tiny-qwen3/c1"}


def save(root, step, model, tokenizer):
    return save_checkpoint(root, step, model, tokenizer, state={"job_id": "j"},
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


def test_existing_complete_step_is_not_replaced(tmp_path, tiny_model, tokenizer):
    first = save(tmp_path, 3, tiny_model, tokenizer)
    marker = json.loads((first.path / "COMPLETE").read_text())
    save(tmp_path, 3, tiny_model, tokenizer)
    assert json.loads((first.path / "COMPLETE").read_text()) == marker
