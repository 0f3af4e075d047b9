"""Reading config files people write: YAML (safe_load only) and JSON, with file:line errors.

``load_yaml`` also returns the line of every key path, so validation errors can point at the
line a person has to edit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from core.errors import ConfigError


def _key_lines(node: yaml.Node, prefix: str = "", out: dict[str, int] | None = None) -> dict:
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            out[key] = key_node.start_mark.line + 1
            _key_lines(value_node, key + ".", out)
    return out


def load_yaml(path: Path) -> tuple[Any, dict[str, int]]:
    """Parse with ``yaml.safe_load``; a syntax error names file, line and column."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror}).") from None
    try:
        data = yaml.safe_load(text)
        lines = _key_lines(yaml.compose(text, Loader=yaml.SafeLoader)) if data else {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: YAML syntax error: {problem}; fix the file "
                          "(check indentation and the ':' after each key).") from None
    return data, lines


def load_json(path: Path) -> Any:
    """Parse JSON; a syntax error names file, line and column."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON ({exc.msg}).") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror}).") from None


def where(path: Path | str, lines: dict[str, int], key: str) -> str:
    """``file:line`` for a key path when its line is known, else just the file."""
    line = lines.get(key)
    return f"{path}:{line}" if line else str(path)
