"""Helpers shared by the ``realm`` subcommand modules."""

from __future__ import annotations

import json

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


def cli_layer_from(args):
    from core.overrides import parse_sets
    from trainer.config.loader import FLAG_KEYS, cli_layer

    flags = {name: getattr(args, name, None) for name in FLAG_KEYS}
    return cli_layer(flags, parse_sets(args.set), args.set or [])
