"""Turn one example into token ids and a per-token "trained" mask.

Masks come from the tokenizer itself, never from searching rendered text for template strings:
- text: every token is trained, plus the end-of-sequence token;
- prompt/completion: character offsets of the tokens of ``prompt + completion``; tokens that
  start inside the completion are trained, plus end-of-sequence;
- messages: the chat template's ``{% generation %}`` marks (``return_assistant_tokens_mask``);
  for templates without them, the assistant spans found by rendering growing prefixes of the
  conversation, mapped to tokens through character offsets.
With ``train_on_inputs`` every token is trained.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.data.reader import BadLine, Example


@dataclass
class Tokenized:
    ids: list[int]
    trained: list[bool]
    truncated: bool = False
    empty: bool = False
    """Truncation to max_length cut away every trained token: the example is dropped."""


def tokenize(tokenizer, example: Example, *, max_length: int, train_on_inputs: bool) -> Tokenized:
    if example.kind == "text":
        ids, trained = _text(tokenizer, example.data["text"])
    elif example.kind == "prompt_completion":
        ids, trained = _prompt_completion(tokenizer, example.data["prompt"],
                                          example.data["completion"])
    else:
        ids, trained = _messages(tokenizer, example.data["messages"])
    if train_on_inputs:
        trained = [True] * len(ids)
    if not any(trained[1:]):  # the first token of a row is never a prediction target
        raise BadLine("no trainable tokens (nothing to learn after masking)")
    truncated = len(ids) > max_length
    ids, trained = ids[:max_length], trained[:max_length]
    return Tokenized(ids, trained, truncated, empty=not any(trained[1:]))


def _text(tokenizer, text: str) -> tuple[list[int], list[bool]]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids, [True] * len(ids)


def _prompt_completion(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[bool]]:
    enc = tokenizer(prompt + completion, add_special_tokens=False, return_offsets_mapping=True)
    boundary = len(prompt)
    trained = [start >= boundary for start, _ in enc["offset_mapping"]]
    return enc["input_ids"] + [tokenizer.eos_token_id], trained + [True]


def _messages(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    if not any(m["role"] == "assistant" for m in messages):
        raise BadLine("'messages' has no assistant turn to learn from (set "
                      "data.train_on_inputs: true to train on every token)")
    if "{% generation %}" in (tokenizer.chat_template or ""):
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        return list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]
    return _messages_by_prefix(tokenizer, messages)


def _messages_by_prefix(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    render = lambda msgs, gen=False: tokenizer.apply_chat_template(  # noqa: E731
        msgs, tokenize=False, add_generation_prompt=gen)
    full = render(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, after = render(messages[:i], True), render(messages[:i + 1])
        if not (full.startswith(after) and after.startswith(before)):
            raise BadLine("the tokenizer's chat template renders turns inconsistently, so "
                          "assistant tokens cannot be located; set data.train_on_inputs: true")
        spans.append((len(before), len(after)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    trained = [any(a <= start < b for a, b in spans) for start, _ in enc["offset_mapping"]]
    return enc["input_ids"], trained


def tokenizer_fingerprint(tokenizer) -> str:
    """Identifies a tokenizer (vocabulary, normalisation, chat template) for the data cache."""
    import hashlib

    blob = tokenizer.backend_tokenizer.to_str() + (tokenizer.chat_template or "") + \
        str(tokenizer.eos_token_id)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
