"""Streaming JSONL reader: one example per line, bad lines named by file:line and reason.

Formats, detected per line unless ``data.format`` forces one: ``{"text"}``,
``{"prompt", "completion"}``, ``{"messages": [{"role", "content"}, ...]}``. Memory holds one line
at a time. Under ``on_bad_line: fail`` the first bad line raises ``DataError``; under ``skip`` bad
lines are counted (``BadLineCounter``) and the job fails when more than ``max_bad_fraction`` of
the lines are bad.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from core.errors import InputError

ROLES = ("system", "user", "assistant", "tool")


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


@dataclass
class BadLineCounter:
    total: int = 0
    bad: int = 0
    samples: list[str] = field(default_factory=list)

    def add(self, where: str, reason: str) -> None:
        self.bad += 1
        if len(self.samples) < 5:
            self.samples.append(f"{where}: {reason}")


def _kind(obj: dict, forced: str) -> str:
    present = [k for k, keys in (("text", ("text",)), ("prompt_completion", ("prompt", "completion")),
                                 ("messages", ("messages",))) if all(x in obj for x in keys)]
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


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise BadLine("'messages' must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise BadLine(f"messages[{i}] must be an object with a string 'content'")
        if m.get("role") not in ROLES:
            raise BadLine(f"messages[{i}].role is {m.get('role')!r}; use one of {', '.join(ROLES)}")


def parse_line(raw: bytes, forced: str = "auto") -> tuple[str, dict]:
    """(kind, object) for one raw line, or BadLine."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadLine(f"not UTF-8 (byte {exc.start}: {exc.reason})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadLine(f"invalid JSON at column {exc.colno}: {exc.msg}") from None
    if not isinstance(obj, dict):
        raise BadLine(f"a line must be a JSON object, got {type(obj).__name__}")
    kind = _kind(obj, forced)
    if kind == "messages":
        _check_messages(obj["messages"])
    else:
        keys = ("text",) if kind == "text" else ("prompt", "completion")
        for key in keys:
            if not isinstance(obj[key], str):
                raise BadLine(f"'{key}' must be a string, got {type(obj[key]).__name__}")
        if kind == "text" and not obj["text"]:
            raise BadLine("'text' is empty")
    return kind, obj


def iter_examples(path: Path, *, forced: str = "auto", on_bad_line: str = "fail",
                  counter: BadLineCounter | None = None) -> Iterator[Example]:
    """Yield examples one line at a time; blank lines are ignored."""
    counter = counter if counter is not None else BadLineCounter()
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            counter.total += 1
            try:
                kind, obj = parse_line(raw, forced)
            except BadLine as bad:
                reject(path, number, str(bad), on_bad_line, counter)
                continue
            yield Example(number, kind, obj)


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
