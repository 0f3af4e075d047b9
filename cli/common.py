"""Helpers shared by the ``realm`` subcommand modules."""

from __future__ import annotations

import argparse
import json
import math

from core.errors import ConfigError, UsageError
from core.paths import RealmPaths, is_initialised, resolve_base


def print_json(data) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def realm_paths(args, *, must_exist: bool = True) -> RealmPaths:
    paths = RealmPaths(resolve_base(args.base_dir))
    if must_exist and not is_initialised(paths):
        raise UsageError(f"{paths.base} is not a realm (no queue/ folders); run `realm init` there "
                         "or point --base-dir / REALM_HOME at one.")
    return paths


def positive_seconds(flag: str, minimum: float = 0.05, maximum: float = 7 * 24 * 3600.0):
    """An argparse ``type`` for a duration flag: a finite number of seconds in
    [minimum, maximum] (by default ``daemon.poll_interval``'s bounds in
    ``config.schema.BOUNDS``); anything else, 0, negatives, NaN and Infinity included, is
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


def refuse_unrunnable(config) -> None:
    """A ConfigError (exit 2) for settings this machine cannot train: QLoRA without CUDA or
    bitsandbytes. Imports torch only when such a setting is asked for."""
    if config.adapter.method != "qlora":
        return
    from trainer.adapters import qlora_problem

    problem = qlora_problem()
    if problem:
        raise ConfigError(problem)
