"""Alpaca and ShareGPT lines: mapped to messages, masked to exactly the output / assistant text,
bad lines named; a real daemon job trains on each."""

from __future__ import annotations

import json

import pytest

from core.training_queue import TrainingQueue
from tests.integration.test_daemon_once import realm_cmd
from tests.trainer.test_training import make_realm
from trainer.data.reader import BadLine, parse_line, read_line
from trainer.data.tokenize import tokenize

ALPACA = {"instruction": "Add the numbers.", "input": "2 + 3", "output": "2 + 3 = 5, ünï."}
SHAREGPT = {"conversations": [
    {"from": "system", "value": "You add numbers."},
    {"from": "human", "value": "What is 2 + 2?"},
    {"from": "gpt", "value": "2 + 2 = 4."},
    {"from": "human", "value": "And 3 + 5?"},
    {"from": "gpt", "value": "3 + 5 = 8."}]}


def example(obj: dict):
    item = read_line(1, json.dumps(obj, ensure_ascii=False).encode())
    assert not isinstance(item, BadLine), item
    return item


def trained_text(tokenizer, obj: dict) -> str:
    tok = tokenize(tokenizer, example(obj), max_length=1024, train_on_inputs=False)
    assert not all(tok.trained), "the prompt side must be masked"
    return tokenizer.decode([i for i, t in zip(tok.ids, tok.trained) if t])


def test_alpaca_maps_to_user_and_assistant_turns():
    kind, obj = parse_line(json.dumps({**ALPACA, "system": "Be brief."}).encode())
    assert kind == "messages"
    assert obj["messages"] == [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "Add the numbers.\n\n2 + 3"},
                               {"role": "assistant", "content": "2 + 3 = 5, ünï."}]
    _, plain = parse_line(json.dumps({"instruction": "Hi", "input": "", "output": "Hello"}).encode())
    assert plain["messages"][0] == {"role": "user", "content": "Hi"}


def test_alpaca_mask_decodes_to_the_output(tokenizer):
    assert trained_text(tokenizer, ALPACA) == "2 + 3 = 5, ünï.<|im_end|>"


def test_sharegpt_mask_decodes_to_the_gpt_turns(tokenizer):
    assert trained_text(tokenizer, SHAREGPT) == "2 + 2 = 4.<|im_end|>3 + 5 = 8.<|im_end|>"


def test_sharegpt_tool_variants_map_to_roles():
    turns = [{"from": "human", "value": "weather?"},
             {"from": "function_call", "value": '{"name": "w"}'},
             {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "Sunny."}]
    _, obj = parse_line(json.dumps({"conversations": turns, "system": "S",
                                    "tools": '[{"name": "w"}]'}).encode())
    assert [m["role"] for m in obj["messages"]] == ["system", "user", "assistant", "tool",
                                                    "assistant"]
    assert obj["tools"] == [{"name": "w"}]


@pytest.mark.parametrize("line, message", [
    ({"conversations": [{"from": "robot", "value": "x"}]},
     r"conversations\[0\]\.from is 'robot'; use one of human, user, gpt"),
    ({"conversations": [{"from": "human"}]}, r"conversations\[0\] must be an object with a "
                                             "string 'value'"),
    ({"conversations": []}, "'conversations' must be a non-empty list"),
    ({**ALPACA, "text": "x"}, r"the line mixes formats \(alpaca 'instruction'\+'output', 'text'\)"),
    ({**SHAREGPT, "messages": []}, "mixes formats .ShareGPT 'conversations', 'messages'"),
    ({"instruction": "x", "output": 3}, "alpaca 'output' must be a string, got int"),
    ({"instruction": "x", "output": ""}, "alpaca 'output' is empty"),
    ({"instruction": "x", "input": "y"}, "an alpaca line needs both 'instruction' and 'output'; "
                                         r"this one has only 'instruction' \(keys: instruction, "
                                         "input\\)"),
])
def test_bad_lines_name_the_problem_and_the_fix(line, message):
    with pytest.raises(BadLine, match=message):
        parse_line(json.dumps(line).encode())


@pytest.mark.slow(seconds=25)
def test_a_daemon_trains_an_alpaca_and_a_sharegpt_file(tmp_path):
    paths = make_realm(tmp_path / "r")
    alpaca = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": f"{2 * i + 1}"}
              for i in range(12)]
    sharegpt = [{"conversations": [{"from": "human", "value": f"Double {i}?"},
                                   {"from": "gpt", "value": f"{2 * i}"}]} for i in range(12)]
    for name, rows in (("alpaca.jsonl", alpaca), ("sharegpt.jsonl", sharegpt)):
        (paths.state_dir("normal") / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    bad = [{"conversations": [{"from": "robot", "value": "x"}]}] + sharegpt
    (paths.state_dir("low") / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    (paths.base / "config.json").write_text(json.dumps({"daemon": {"settle_seconds": 0.2}}))
    out = realm_cmd(paths.base, "daemon", "--once", "--max-steps", "2")
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-3000:]  # bad.jsonl failed
    queue = TrainingQueue(paths.base)
    [failed] = queue.jobs_in("failed")
    # the reason names the file where it lies now, not queue/processing/ where the child read it
    assert "queue/failed/bad.jsonl:1: conversations[0].from is 'robot'" in failed.last_error
    assert "processing" not in failed.last_error
    assert "queue/failed/bad.jsonl:1" in failed.history[-1]["reason"]
    done = queue.jobs_in("completed")
    assert sorted(j.dataset_name for j in done) == ["alpaca.jsonl", "sharegpt.jsonl"]
    steps = sorted(j.final_step for j in done)
    assert steps[0] >= 1 and steps[1] > steps[0], "each trained, the second from the first"
