"""``--set a.b=c`` parsing shared by every command that takes overrides.

Values are read as JSON when they parse (``3``, ``1e-4``, ``true``, ``[1,2]``) and kept as strings
otherwise; the config resolver checks them against the schema later.
"""

from __future__ import annotations

import json
from typing import Any

from core.errors import UsageError


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """``["training.learning_rate=1e-4"]`` -> ``{"training": {"learning_rate": 0.0001}}``."""
    nested: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise UsageError(f"--set {item!r}: expected KEY=VALUE with a dotted key, for example "
                             "--set training.learning_rate=1e-4.")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UsageError(f"--set {item!r}: {part!r} was already given a value.")
        if isinstance(node.get(parts[-1]), dict):
            raise UsageError(f"--set {item!r}: {key!r} is a section, not a value.")
        node[parts[-1]] = parse_value(raw)
    return nested
