"""Helpers shared by the ``realm`` subcommand modules."""

from __future__ import annotations

import argparse
import json
import math

from core.errors import UsageError
from core.paths import RealmPaths, is_initialised, resolve_base


def print_json(data) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def realm_paths(args, *, must_exist: bool = True) -> RealmPaths:
    paths = RealmPaths(resolve_base(args.base_dir))
    if must_exist and not is_initialised(paths):
        raise UsageError(f"{paths.base} is not a realm (no queue/ folders); run `realm init` there "
                         "or point --base-dir / REALM_HOME at one.")
    return paths


def add_common_flags(parser) -> None:
    """SPEC section 3's training flags. No defaults: a flag not given overrides nothing."""
    from trainer.config.loader import FLAG_KEYS  # light: no torch

    group = parser.add_argument_group("training flags (cli layer; --set wins over them)")
    for name, key in FLAG_KEYS.items():
        group.add_argument("--" + name.replace("_", "-"), dest=name, default=None, metavar="V",
                           help=key)
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", default=None,
                        help="override any config key, e.g. training.learning_rate=1e-4")


MAX_SET_CHARS = 10_000
"""Longest ``--set KEY=VALUE`` item accepted (a value is a number, a word or a short list)."""


def parse_sets_checked(items: list[str] | None) -> dict:
    """``core.overrides.parse_sets`` after bounding each item's length and nesting, so a hostile
    ``--set k=[[[[...`` is a usage error, not a RecursionError."""
    from core.overrides import parse_sets
    from core.validate import MAX_DEPTH, nesting_depth

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
    from trainer.config.loader import FLAG_KEYS, cli_layer

    flags = {name: getattr(args, name, None) for name in FLAG_KEYS}
    return cli_layer(flags, parse_sets_checked(args.set), args.set or [])


def positive_seconds(flag: str, minimum: float = 0.05, maximum: float = 7 * 24 * 3600.0):
    """An argparse ``type`` for a duration flag: a finite number of seconds in
    [minimum, maximum] (by default ``daemon.poll_interval``'s bounds in
    ``trainer.config.schema.BOUNDS``); anything else, 0, negatives, NaN and Infinity included, is
    refused at parse time (exit 2) naming the flag."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} {text!r} is not a number of seconds; "
                                             f"give one such as {flag} 5") from None
        if not math.isfinite(value) or not (value > 0 and minimum <= value <= maximum):
            raise argparse.ArgumentTypeError(f"{flag} {text}: must be between {minimum:g} and "
                                             f"{maximum:g} seconds; give one such as {flag} 5")
        return value

    return parse
