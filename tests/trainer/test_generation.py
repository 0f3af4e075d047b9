"""A checkpoint realm writes stops at the end of its turn in generate() and in
pipeline("text-generation"): generation_config.json carries EOS and the end-of-turn id."""

from __future__ import annotations

import json

import pytest

from core import exitcodes
from core.training_queue import TrainingQueue
from tests.trainer.test_training import ckpt_root, make_realm
from trainer.checkpoint import lineage_head
from trainer.run_job import run

CHAT = {"training": {"micro_batch_size": 8, "max_steps": 40, "warmup_steps": 2,
                     "learning_rate": 3e-3},
        "data": {"max_length": 64}, "checkpoint": {"save_steps": 100},
        "logging": {"status_every_seconds": 0}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    paths = make_realm(tmp_path_factory.mktemp("gen") / "r", CHAT)
    data = paths.base / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Say hi, number {i}."},
        {"role": "assistant", "content": "hi"}]}) + "\n" for i in range(64)))
    q = TrainingQueue(paths.base)
    q.add(data)
    job = q.claim_next()
    assert run(paths, paths.base / (job.dataset_path + ".job.json")) == exitcodes.COMPLETED
    return lineage_head(ckpt_root(paths)).path


def test_generation_config_names_eos_and_end_of_turn(checkpoint):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    gen = json.loads((checkpoint / "generation_config.json").read_text())
    assert set(gen["eos_token_id"]) == {tokenizer.convert_tokens_to_ids("<|im_end|>"),
                                        tokenizer.eos_token_id}
    assert gen["pad_token_id"] == tokenizer.pad_token_id
    assert json.loads((checkpoint / "config.json").read_text())["eos_token_id"] is not None


def test_generate_and_pipeline_stop_at_the_end_of_the_turn(checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Say hi, number 3."}],
                                           add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    out = model.generate(**prompt, max_new_tokens=40, do_sample=False)
    new = out[0, prompt["input_ids"].shape[1]:].tolist()
    assert len(new) < 40 and new[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode(new) == "hi<|im_end|>"

    pipe = pipeline("text-generation", model=str(checkpoint))
    result = pipe([{"role": "user", "content": "Say hi, number 5."}], max_new_tokens=40,
                  do_sample=False)
    assert result[0]["generated_text"][-1] == {"role": "assistant", "content": "hi"}
