"""Streaming JSONL reader: one example per line, bad lines named by file:line and reason.

Formats, detected per line unless ``data.format`` forces one: ``{"text"}``,
``{"prompt", "completion"}``, ``{"messages": [{"role", "content"}, ...]}``. Two common formats of
other trainers are mapped to messages first (``to_messages``): alpaca (``instruction``, optional
``input`` and ``system``, ``output``) and ShareGPT (``conversations`` of ``{from, value}``). Memory holds one line
at a time, and never more than ``MAX_LINE_BYTES`` of it: a longer line is a bad line (it is
skipped through without being held). A line nested deeper than ``MAX_DEPTH`` is a bad line too
(never a RecursionError). Under ``on_bad_line: fail`` the first bad line raises ``DataError``;
under ``skip`` bad lines are counted (``BadLineCounter``) and the job fails when more than
``max_bad_fraction`` of the lines are bad. ``hasher`` (a hashlib object) sees every byte read,
so one pass both trains and proves which bytes were trained.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from config.schema import ROLES
from core.errors import InputError
from core.validate import MAX_DEPTH, nesting_depth, open_regular

MAX_LINE_BYTES = 16 << 20
"""Longest dataset line accepted (16 MiB); memory never holds more of one line than this."""
READ_CHUNK = 1 << 20


class DataError(InputError):
    """The dataset cannot be trained on as configured (a permanent, not a retryable, failure)."""


class BadLine(Exception):
    """One line that cannot be used; ``reason`` says why."""


@dataclass
class Example:
    line: int
    kind: str
    """text | prompt_completion | messages"""
    data: dict
    size: int = 0
    """Bytes of the line (batches are sized by it)."""


@dataclass
class BadLineCounter:
    total: int = 0
    bad: int = 0
    samples: list[str] = field(default_factory=list)

    def add(self, where: str, reason: str) -> None:
        self.bad += 1
        if len(self.samples) < 5:
            self.samples.append(f"{where}: {reason}")


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "function_call": "assistant", "tool": "tool",
                  "observation": "tool", "function_response": "tool"}
"""ShareGPT's ``from`` values (FastChat, Axolotl, LLaMA-Factory) and the role each one is."""


def _alpaca(obj: dict) -> list[dict]:
    for key in ("instruction", "input", "output", "system"):
        if key in obj and not isinstance(obj[key], str):
            raise BadLine(f"alpaca '{key}' must be a string, got {type(obj[key]).__name__}")
    if not obj["output"]:
        raise BadLine("alpaca 'output' is empty: there is nothing to learn from")
    user = obj["instruction"] + (f"\n\n{obj['input']}" if obj.get("input") else "")
    head = [{"role": "system", "content": obj["system"]}] if obj.get("system") else []
    return head + [{"role": "user", "content": user},
                   {"role": "assistant", "content": obj["output"]}]


def _sharegpt(obj: dict) -> list[dict]:
    turns = obj["conversations"]
    if not isinstance(turns, list) or not turns:
        raise BadLine("'conversations' must be a non-empty list of {from, value} objects")
    system = obj.get("system")
    if system is not None and not isinstance(system, str):
        raise BadLine(f"'system' must be a string, got {type(system).__name__}")
    messages = [{"role": "system", "content": system}] if system else []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise BadLine(f"conversations[{i}] must be an object with a string 'value'")
        role = SHAREGPT_ROLES.get(turn.get("from"))
        if role is None:
            raise BadLine(f"conversations[{i}].from is {turn.get('from')!r}; use one of "
                          f"{', '.join(SHAREGPT_ROLES)} (ShareGPT roles)")
        messages.append({"role": role, "content": turn["value"]})
    return messages


def to_messages(obj: dict) -> dict:
    """An alpaca or ShareGPT line as a messages line (the others as they are): alpaca's
    instruction (and input) is the user turn, its output the trained assistant turn; ShareGPT's
    turns map by ``SHAREGPT_ROLES``. A line that mixes formats is a bad line."""
    alpaca = "instruction" in obj and "output" in obj
    sharegpt = "conversations" in obj
    if not (alpaca or sharegpt):
        half = [k for k in ("instruction", "output") if k in obj]
        if half and not any(k in obj for k in ("text", "prompt", "messages")):
            raise BadLine(f"an alpaca line needs both 'instruction' and 'output'; this one has "
                          f"only '{half[0]}' (keys: {', '.join(obj)})")
        return obj
    found = [name for name, here in (("alpaca 'instruction'+'output'", alpaca),
                                     ("ShareGPT 'conversations'", sharegpt),
                                     ("'text'", "text" in obj), ("'prompt'", "prompt" in obj),
                                     ("'messages'", "messages" in obj)) if here]
    if len(found) > 1:
        raise BadLine(f"the line mixes formats ({', '.join(found)}); keep one per line")
    messages = _alpaca(obj) if alpaca else _sharegpt(obj)
    out = {"messages": messages}
    tools = obj.get("tools")
    if isinstance(tools, str):  # LLaMA-Factory writes the tool list as a JSON string
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as exc:
            raise BadLine(f"'tools' is a string but not JSON ({exc.msg}); write a list of "
                          "function schemas") from None
    if tools is not None:
        out["tools"] = tools
    return out


def _kind(obj: dict, forced: str) -> str:
    present = [k for k, here in (("text", "text" in obj),
                                 ("prompt_completion", "prompt" in obj and "completion" in obj),
                                 ("messages", "messages" in obj)) if here]
    if forced != "auto":
        if forced not in present:
            want = {"text": "'text'", "prompt_completion": "'prompt' and 'completion'",
                    "messages": "'messages'"}[forced]
            raise BadLine(f"data.format is {forced} but the line has no {want} "
                          f"(keys: {', '.join(obj) or 'none'})")
        return forced
    if len(present) != 1:
        found = ", ".join(obj) or "none"
        what = "more than one of" if present else "none of"
        raise BadLine(f"{what} 'text', 'prompt'+'completion', 'messages' (keys: {found})")
    return present[0]


def _check_messages(messages: Any, tools: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise BadLine("'messages' must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadLine(f"messages[{i}] must be an object with a string 'content'")
        if m.get("role") not in ROLES:
            raise BadLine(f"messages[{i}].role is {m.get('role')!r}; use one of {', '.join(ROLES)}")
        calls = m.get("tool_calls")
        if calls is not None and (m["role"] != "assistant" or not isinstance(calls, list)
                                  or not all(isinstance(c, dict) for c in calls)):
            raise BadLine(f"messages[{i}].tool_calls must be a list of objects on an assistant "
                          "message")
        content = m.get("content")
        if not isinstance(content, str) and not (content is None and calls):
            raise BadLine(f"messages[{i}] must be an object with a string 'content' (null only "
                          "on an assistant message with tool_calls)")
        reasoning = m.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise BadLine(f"messages[{i}].reasoning_content must be a string")
    if tools is not None and (not isinstance(tools, list)
                              or not all(isinstance(t, dict) for t in tools)):
        raise BadLine("'tools' must be a list of tool (function schema) objects")


_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")
"""A JSON escape of a UTF-16 surrogate: a lone one decodes to a str no encoder accepts."""


def _check_encodable(value: Any, where: str) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise BadLine(f"{where} holds a lone UTF-16 surrogate \\u{ord(value[exc.start]):04x}"
                          " (invalid Unicode): fix the escape or drop the character") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_encodable(key, where)
            _check_encodable(item, f"{where}: '{key}'" if where == "the line" else where)
    elif isinstance(value, list):
        for item in value:
            _check_encodable(item, where)


def parse_line(raw: bytes, forced: str = "auto") -> tuple[str, dict]:
    """(kind, object) for one raw line, or BadLine."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadLine(f"not UTF-8 (byte {exc.start}: {exc.reason})") from None
    # counting brackets is C-fast; the exact (Python) depth scan runs only on bracket-rich lines
    if text.count("[") + text.count("{") > MAX_DEPTH and nesting_depth(text) > MAX_DEPTH:
        raise BadLine(f"JSON nested {nesting_depth(text)} deep; at most {MAX_DEPTH} levels are "
                      "accepted")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadLine(f"invalid JSON at column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise BadLine("JSON nested too deep to parse") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise BadLine(f"invalid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise BadLine(f"a line must be a JSON object, got {type(obj).__name__}")
    if _SURROGATE.search(raw):
        _check_encodable(obj, "the line")
    obj = to_messages(obj)
    kind = _kind(obj, forced)
    if kind == "messages":
        _check_messages(obj["messages"], obj.get("tools"))
    else:
        keys = ("text",) if kind == "text" else ("prompt", "completion")
        for key in keys:
            if not isinstance(obj[key], str):
                raise BadLine(f"'{key}' must be a string, got {type(obj[key]).__name__}")
        if kind == "text" and not obj["text"]:
            raise BadLine("'text' is empty")
    return kind, obj


class _TooLong:
    """Stands for a line over ``MAX_LINE_BYTES`` (its bytes were hashed, not kept)."""

    def __init__(self, size: int):
        self.size = size


def iter_lines(fh, *, hasher=None, max_bytes: int = MAX_LINE_BYTES,
               tick: Callable[[], None] | None = None) -> Iterator[bytes | _TooLong]:
    """Lines of a binary file (without the newline), each at most ``max_bytes``: a longer one
    comes out as ``_TooLong`` after it has been read through. Every byte goes to ``hasher``."""
    part, dropped = bytearray(), 0
    while True:
        chunk = fh.read(READ_CHUNK)
        if tick is not None:
            tick()
        if not chunk:
            break
        if hasher is not None:
            hasher.update(chunk)
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            piece = chunk[start:] if end < 0 else chunk[start:end]
            if dropped or len(part) + len(piece) > max_bytes:
                dropped += len(part) + len(piece)
                part.clear()
            else:
                part += piece
            if end < 0:
                break
            yield _TooLong(dropped) if dropped else bytes(part)
            part.clear()
            dropped, start = 0, end + 1
    if dropped:
        yield _TooLong(dropped)
    elif part:
        yield bytes(part)


def read_line(number: int, raw: "bytes | _TooLong", forced: str = "auto"
              ) -> "Example | BadLine | None":
    """One raw line as an Example, the BadLine that rejects it, or None for a blank line."""
    if isinstance(raw, _TooLong):
        return BadLine(f"the line is {raw.size:,} bytes, over the limit of {MAX_LINE_BYTES:,} "
                       "(MAX_LINE_BYTES); split it into smaller examples")
    if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a UTF-8 byte order mark some editors write
    if not raw.strip():
        return None
    try:
        kind, obj = parse_line(raw, forced)
    except BadLine as bad:
        return bad
    return Example(number, kind, obj, len(raw))


def iter_examples(path: Path, *, forced: str = "auto", on_bad_line: str = "fail",
                  counter: BadLineCounter | None = None, hasher=None,
                  tick: Callable[[], None] | None = None) -> Iterator[Example]:
    """Yield examples one line at a time; blank lines are ignored. With ``hasher``, the whole
    file is read (and hashed) even past the last example."""
    counter = counter if counter is not None else BadLineCounter()
    with open_regular(path, "the dataset") as fh:  # no FIFO wait, no symlink followed
        for number, raw in enumerate(iter_lines(fh, hasher=hasher, tick=tick), 1):
            item = read_line(number, raw, forced)
            if item is None:
                continue
            counter.total += 1
            if isinstance(item, BadLine):
                reject(path, number, str(item), on_bad_line, counter)
                continue
            yield item


def reject(path: Path, line: int, reason: str, on_bad_line: str, counter: BadLineCounter) -> None:
    """Apply ``on_bad_line`` to one bad example (raise under fail, count under skip)."""
    where = f"{path}:{line}"
    if on_bad_line == "fail":
        raise DataError(f"{where}: {reason}. Fix the line, or set data.on_bad_line: skip to "
                        "count and skip bad lines.")
    counter.add(where, reason)


def check_bad_fraction(path: Path, counter: BadLineCounter, max_fraction: float) -> None:
    if counter.total == 0:
        raise DataError(f"{path}: no examples (the file is empty or has only blank lines).")
    fraction = counter.bad / counter.total
    if counter.bad == counter.total or fraction > max_fraction:
        raise DataError(
            f"{path}: {counter.bad} of {counter.total} lines are bad ({fraction:.1%}, above "
            f"data.max_bad_fraction {max_fraction:.1%}); first: {'; '.join(counter.samples)}.")
