"""Loss masks come from the tokenizer: trained tokens decode to exactly what should be learned."""

from __future__ import annotations

import pytest

from trainer.data.reader import BadLine, Example
from trainer.data.tokenize import tokenize

CHAT = [{"role": "system", "content": "You add numbers."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "2 + 2 = 4."},
        {"role": "user", "content": "And 3 + 5? ünïcode"},
        {"role": "assistant", "content": "3 + 5 = 8 — ünïcode."}]


def trained_text(tokenizer, tok) -> str:
    return tokenizer.decode([i for i, t in zip(tok.ids, tok.trained) if t])


def test_text_trains_every_token_plus_eos(tokenizer):
    tok = tokenize(tokenizer, Example(1, "text", {"text": "héllo world"}), max_length=512,
                   train_on_inputs=False)
    assert trained_text(tokenizer, tok) == "héllo world<|endoftext|>"


def test_prompt_completion_trains_completion_only(tokenizer):
    ex = Example(1, "prompt_completion", {"prompt": "Q: 2+2? ü A: ", "completion": "4, ünï"})
    tok = tokenize(tokenizer, ex, max_length=512, train_on_inputs=False)
    assert trained_text(tokenizer, tok) == "4, ünï<|endoftext|>"
    everything = tokenize(tokenizer, ex, max_length=512, train_on_inputs=True)
    assert all(everything.trained) and everything.ids.tolist() == tok.ids.tolist()


def test_multi_turn_messages_train_assistant_turns_only(tokenizer):
    tok = tokenize(tokenizer, Example(1, "messages", {"messages": CHAT}), max_length=1024,
                   train_on_inputs=False)
    assert trained_text(tokenizer, tok) == "2 + 2 = 4.<|im_end|>3 + 5 = 8 — ünïcode.<|im_end|>"
    assert 0.3 < 1 - sum(tok.trained) / len(tok.trained) < 0.9  # a real masked fraction


def test_template_without_generation_marks_locates_turns_by_header(tokenizer):
    plain = tokenizer.chat_template.replace("{% generation %}", "").replace(
        "{% endgeneration %}", "")
    other = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer,
                                eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token)
    other.chat_template = plain
    tok = tokenize(other, Example(1, "messages", {"messages": CHAT}), max_length=1024,
                   train_on_inputs=False)
    # a turn runs from the end of its assistant header through its end-of-turn token
    assert trained_text(other, tok) == "2 + 2 = 4.<|im_end|>3 + 5 = 8 — ünïcode.<|im_end|>"


def test_truncation_is_flagged(tokenizer):
    tok = tokenize(tokenizer, Example(1, "text", {"text": "x" * 100}), max_length=16,
                   train_on_inputs=False)
    assert tok.truncated and len(tok.ids) == 16


def test_no_assistant_turn_is_a_bad_line(tokenizer):
    with pytest.raises(BadLine, match="no assistant turn"):
        tokenize(tokenizer, Example(1, "messages", {"messages": CHAT[:2]}), max_length=512,
                 train_on_inputs=False)
