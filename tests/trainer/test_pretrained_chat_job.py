"""The qwen3-0.6b hero's path end to end, on a model saved with save_pretrained: Qwen3's real
chat template (not prefix-stable across turns) trains multi-turn reasoning conversations with
no bad line, and the checkpoint stops generation at <|im_end|>."""

from __future__ import annotations

import json

from core import exitcodes
from core.paths import RealmPaths, init_layout
from core.training_queue import TrainingQueue
from guild.campaigns import create_campaign
from guild.heroes import install_shipped, shipped_dir
from tests.chat_fixtures import CONVERSATIONS, make_tokenizer
from tests.trainer.test_training import record
from trainer.checkpoint import lineage_head
from trainer.run_job import run


def pretrained_folder(path):
    from transformers import AutoModelForCausalLM, Qwen3Config
    from transformers.utils import logging

    logging.disable_progress_bar()  # tqdm's monitor thread would outlive the test
    tokenizer = make_tokenizer("qwen3")
    config = Qwen3Config(vocab_size=1024, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=32, max_position_embeddings=1024, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_qwen3_hero_trains_multi_turn_reasoning_chats(tmp_path):
    paths = RealmPaths(tmp_path / "r")
    paths.base.mkdir()
    init_layout(paths)
    install_shipped(paths)
    folder = pretrained_folder(tmp_path / "qwen3-mini")
    hero = (shipped_dir() / "qwen3-0.6b.yaml").read_text()
    hero = hero.replace("vocab_size: 151936", "vocab_size: 1024").replace(
        "context_length: 40960", "context_length: 1024").replace(
        "path: null", f"path: {folder}").replace("max_length: 2048", "max_length: 256")
    (paths.heroes / "qwen3-0.6b.yaml").write_text(hero)
    create_campaign(paths, "c1", "qwen3-0.6b", overrides={
        "training": {"max_steps": 3, "micro_batch_size": 4, "grad_accum": 1},
        "data": {"on_bad_line": "skip"}, "logging": {"status_every_seconds": 0}})
    data = paths.base / "chats.jsonl"
    rows = [CONVERSATIONS[name] for name in ("multi_turn", "reasoning", "system")] * 14
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    q = TrainingQueue(paths.base)
    q.add(data)
    job = q.claim_next()
    sidecar = paths.base / (job.dataset_path + ".job.json")
    assert run(paths, sidecar) == exitcodes.COMPLETED
    stats = record(paths, sidecar)["metadata"]["data"]
    assert stats["bad_lines"] == 0 and stats["num_examples"] == 42
    assert stats["truncation"] == "auto" and stats["turns_dropped"] == 0
    assert 0.2 < stats["masked_fraction"] < 0.9
    head = lineage_head(paths.campaigns / "qwen3-0.6b" / "c1" / "checkpoints")
    gen = json.loads((head.path / "generation_config.json").read_text())
    assert make_tokenizer("qwen3").convert_tokens_to_ids("<|im_end|>") in gen["eos_token_id"]
