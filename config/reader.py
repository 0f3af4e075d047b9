"""Reading config files people write: YAML (safe loader only) and JSON, with file:line errors.

Every file goes through the validation kit (``core.validate``): bounded size, no symlink
followed, no FIFO blocked on, bounded nesting. YAML is composed into its node graph first and
refused when, with its aliases expanded, it would build more than ``MAX_YAML_NODES`` values (a
"billion laughs" anchor bomb is a few hundred bytes and would otherwise exhaust memory); composing
is cheap because an alias shares its anchor's node. ``load_yaml`` also returns the line of every
key path, so validation errors can point at the line a person has to edit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from core.errors import ConfigError, InputError
from core.validate import (MAX_DEPTH, MAX_INT, MAX_SIDECAR_BYTES, finite_number, read_json_file,
                           read_regular)

MAX_YAML_BYTES = 1 << 20
"""A hero profile larger than this is refused (the shipped ones are under 2 KiB)."""
MAX_YAML_NODES = 100_000
"""Most values a YAML file may build once its aliases are expanded."""


def _key_lines(node: yaml.Node, prefix: str = "", out: dict[str, int] | None = None) -> dict:
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            out[key] = key_node.start_mark.line + 1
            if len(key.split(".")) <= MAX_DEPTH:
                _key_lines(value_node, key + ".", out)
    return out


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def expanded_size(root: yaml.Node, path: Path | str) -> tuple[int, int]:
    """(values, depth) of a composed YAML graph with its aliases expanded; iterative and memoised
    by node, so it costs one visit per distinct node. Refuses an alias that contains itself and
    a graph past ``MAX_YAML_NODES`` values or ``MAX_DEPTH`` levels, naming the line."""
    memo: dict[int, tuple[int, int]] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if done:
            open_nodes.discard(id(node))
            kids = [memo[id(k)] for k in _children(node)]
            size = (1 + sum(k[0] for k in kids), 1 + max((k[1] for k in kids), default=0))
            memo[id(node)] = size
            if size[0] > MAX_YAML_NODES or size[1] > MAX_DEPTH + 1:
                line = node.start_mark.line + 1
                what = (f"nests {size[1] - 1} levels deep (at most {MAX_DEPTH})"
                        if size[1] > MAX_DEPTH + 1 else
                        f"expands to more than {MAX_YAML_NODES:,} values once its aliases (*name) "
                        "are expanded")
                raise ConfigError(f"{path}:{line}: this YAML {what}; a hero profile holds a few "
                                  "settings: write them out without nested anchors.")
            continue
        if id(node) in memo:
            continue
        if id(node) in open_nodes:
            raise ConfigError(f"{path}:{node.start_mark.line + 1}: a YAML alias refers to a value "
                              "that contains it (a recursive anchor); write the value out.")
        open_nodes.add(id(node))
        stack.append((node, True))
        stack.extend((kid, False) for kid in _children(node))
    return memo[id(root)]


def _yaml_error(path: Path, exc: yaml.YAMLError) -> ConfigError:
    mark = getattr(exc, "problem_mark", None)
    where_ = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
    problem = getattr(exc, "problem", None) or str(exc)
    return ConfigError(f"{where_}: YAML syntax error: {problem}; fix the file "
                       "(check indentation and the ':' after each key).")


def load_yaml(path: Path, what: str = "hero profile") -> tuple[Any, dict[str, int]]:
    """Parse with the safe loader after the size, alias and depth checks; a syntax error names
    file, line and column."""
    path = Path(path)
    text = _read_text(path, what, MAX_YAML_BYTES)
    try:
        loader = yaml.SafeLoader(text)  # its reader refuses control characters: a YAMLError
    except yaml.YAMLError as exc:
        raise _yaml_error(path, exc) from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        expanded_size(node, path)
        data = loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise _yaml_error(path, exc) from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deep to read (at most {MAX_DEPTH} levels); "
                          "flatten it.") from None
    except (ValueError, OverflowError) as exc:  # e.g. an integer of more than 4300 digits
        raise ConfigError(f"{path}: a YAML value cannot be read ({exc}); write a smaller "
                          "number.") from None
    finally:
        loader.dispose()
    return data, _key_lines(node) if data else {}


def _read_text(path: Path, what: str, max_bytes: int) -> str:
    try:
        raw = read_regular(path, max_bytes, what)
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} does not exist.") from None
    except InputError as exc:
        raise ConfigError(str(exc)) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: {what} is not UTF-8 text (byte {exc.start}: {exc.reason}); "
                          "save it as UTF-8.") from None


def load_json(path: Path, what: str = "config file") -> Any:
    """Parse a user-written JSON file (bounded size and depth, finite numbers); errors name the
    file, and for syntax errors its line and column."""
    path = Path(path)
    try:
        return read_json_file(path, what, max_bytes=MAX_SIDECAR_BYTES)
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} does not exist.") from None
    except InputError as exc:
        raise ConfigError(str(exc)) from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise ConfigError(f"{path}: {what} holds a value that cannot be read ({exc}); write a "
                          "smaller number.") from None


def load_json_object(path: Path, what: str, example: str) -> dict:
    """``load_json`` that also requires a JSON object, saying what it got instead."""
    data = load_json(path, what)
    if not isinstance(data, dict):
        got = "null" if data is None else {list: "a list", str: "a string", bool: "true/false"}.get(
            type(data), "a number")
        raise ConfigError(f"{path}: {what} must be a JSON object such as {example}, got {got}; "
                          "rewrite it as an object.")
    return data


def number_problems(data: Any, path: Path | str, lines: dict[str, int],
                    key: str = "") -> list[str]:
    """NaN, Infinity and integers past ``MAX_INT`` anywhere in a parsed file, by key path (the
    depth is already bounded by the reader)."""
    if isinstance(data, dict):
        return [p for k, v in data.items()
                for p in number_problems(v, path, lines, f"{key}.{k}" if key else str(k))]
    if isinstance(data, list):
        return [p for i, v in enumerate(data)
                for p in number_problems(v, path, lines, f"{key}[{i}]")]
    message = number_problem(data, key or "value")
    return [f"{where(path, lines, key)}: {message}."] if message else []


def number_problem(value: Any, key: str) -> str | None:
    """``core.validate.finite_number``'s message, an integer of many digits described rather
    than printed."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 1000:
        digits = int(value.bit_length() * 0.30103) + 1
        return (f"{key} is an integer of about {digits} digits, larger than {MAX_INT:,}; "
                "write a smaller number")
    return finite_number(value, key)


def where(path: Path | str, lines: dict[str, int], key: str) -> str:
    """``file:line`` for a key path when its line is known, else just the file."""
    line = lines.get(key)
    return f"{path}:{line}" if line else str(path)
