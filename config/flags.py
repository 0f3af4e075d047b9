"""The cli layer: SPEC section 3's training flags and ``--set a.b=c``, shared by every command
that takes them (the daemon, ``--plan``, ``config show``) and by the training child.

Values are read as JSON when they parse (``3``, ``1e-4``, ``true``, ``[1,2]``) and kept as strings
otherwise; the config resolver checks them against the schema later.
"""

from __future__ import annotations

import json
from typing import Any

from config.resolver import Layer, flatten
from core.errors import UsageError
from core.validate import MAX_DEPTH, nesting_depth

# Command-line flags -> config keys (SPEC section 3's common flags).
FLAG_KEYS = {
    "batch_size": "training.micro_batch_size", "grad_accum": "training.grad_accum",
    "learning_rate": "training.learning_rate", "max_steps": "training.max_steps",
    "epochs": "training.epochs", "max_length": "data.max_length", "seed": "training.seed",
}


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


def cli_layer(flags: dict[str, Any], sets: dict[str, Any], set_items: list[str]) -> Layer:
    """The cli layer: flags that were given (None = not given), then --set (which wins)."""
    values: dict[str, Any] = {}
    key_sources: dict[str, str] = {}
    for flag, value in flags.items():
        if value is not None:
            values[FLAG_KEYS[flag]] = value
            key_sources[FLAG_KEYS[flag]] = "--" + flag.replace("_", "-")
    for key, value in flatten(sets):
        values[key] = value
        key_sources[key] = "--set"
    return Layer("cli", "--set", values, key_sources)


def add_common_flags(parser) -> None:
    """SPEC section 3's training flags. No defaults: a flag not given overrides nothing."""
    group = parser.add_argument_group("training flags (cli layer; --set wins over them)")
    for name, key in FLAG_KEYS.items():
        group.add_argument("--" + name.replace("_", "-"), dest=name, default=None, metavar="V",
                           help=key)
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", default=None,
                        help="override any config key, e.g. training.learning_rate=1e-4")


MAX_SET_CHARS = 10_000
"""Longest ``--set KEY=VALUE`` item accepted (a value is a number, a word or a short list)."""


def parse_sets_checked(items: list[str] | None) -> dict:
    """``parse_sets`` after bounding each item's length and nesting, so a hostile
    ``--set k=[[[[...`` is a usage error, not a RecursionError."""
    for item in items or []:
        if len(item) > MAX_SET_CHARS:
            raise UsageError(f"--set {item[:40]}...: {len(item):,} characters, at most "
                             f"{MAX_SET_CHARS:,} are accepted; give a shorter value.")
        key, _, value = item.partition("=")
        if nesting_depth(value) > MAX_DEPTH or key.count(".") > MAX_DEPTH:
            raise UsageError(f"--set {item[:40]}...: nested more than {MAX_DEPTH} levels; config "
                             "values are numbers, words or short lists.")
    return parse_sets(items)


def cli_layer_from(args):
    flags = {name: getattr(args, name, None) for name in FLAG_KEYS}
    return cli_layer(flags, parse_sets_checked(args.set), args.set or [])
