"""A dataset's token count estimated with the hero's own tokenizer on a sample (``--plan``).

Light on purpose: it imports ``tokenizers`` (a Rust extension) and never torch or transformers,
so ``realm daemon --plan`` stays a fast, torch-free command. The first ``SAMPLE_BYTES`` of the
file are read line by line; the text of each example (text, prompt and completion, message
contents) is tokenized, plus a few tokens per example and per message for the EOS and the chat
template's turn markers; the count is scaled by the file's bytes over the sample's bytes. When
the tokenizer cannot be loaded without transformers (no ``tokenizer.json``, an ``hf_name`` only)
the caller keeps the queue's bytes/4 estimate.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

from core.validate import open_regular
from trainer.data.reader import BadLine, iter_lines, parse_line

SAMPLE_BYTES = 64 << 10
PER_EXAMPLE = 1
"""Tokens added per example: the EOS (or the last end of turn)."""
PER_MESSAGE = 5
"""Tokens a ChatML-like template adds around each message (start, role, newlines, end)."""


def tokenizer_counter(hero) -> Callable[[str], int] | None:
    """A function counting the tokens of a text with the hero's tokenizer, or None when it
    cannot be loaded here (the caller falls back to bytes/4)."""
    if hero.tokenizer.get("kind") == "byte":
        return lambda text: len(text.encode("utf-8"))  # the byte tokenizer: a token per byte
    folder = hero.tokenizer.get("path") or hero.model.path
    if not folder or not (Path(folder) / "tokenizer.json").is_file():
        return None
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    except Exception:  # a damaged or newer-format file: the estimate falls back, training reports
        return None
    return lambda text: len(tok.encode(text, add_special_tokens=False).ids)


def _example_texts(obj: dict) -> tuple[list[str], int]:
    """(texts to count, template tokens) of one parsed example."""
    if "messages" in obj:
        texts = [m.get("content") or "" for m in obj["messages"]]
        texts += [m["reasoning_content"] for m in obj["messages"] if m.get("reasoning_content")]
        return texts, PER_EXAMPLE + PER_MESSAGE * len(obj["messages"])
    if "text" in obj:
        return [obj["text"]], PER_EXAMPLE
    return [obj["prompt"], obj["completion"]], PER_EXAMPLE


def estimate_tokens_sampled(path: Path, num_bytes: int, count: Callable[[str], int]
                            ) -> tuple[int, int] | None:
    """(estimated tokens of the whole file, lines sampled), or None when the sample holds no
    good line."""
    sampled_bytes, tokens, lines = 0, 0, 0
    with open_regular(path, "the dataset") as fh:
        for raw in iter_lines(fh):
            if sampled_bytes >= SAMPLE_BYTES:
                break
            if not isinstance(raw, bytes):
                break  # an over-long line: the sample ends before it
            sampled_bytes += len(raw) + 1
            try:
                _, obj = parse_line(raw) if raw.strip() else (None, None)
            except BadLine:
                continue
            if obj is None:
                continue
            texts, extra = _example_texts(obj)
            tokens += sum(count(t) for t in texts) + extra
            lines += 1
    if not lines or not sampled_bytes:
        return None
    scale = max(num_bytes, sampled_bytes) / sampled_bytes
    return math.ceil(tokens * scale), lines
