"""``realm`` (``python -m cli``): the one command-line entry point.

Errors print one ``error: ...`` paragraph and exit 2 (bad usage, config or input) or 1 (runtime
failure); ``--debug`` or ``REALM_DEBUG=1`` shows the traceback. A flag that is not given never
overrides anything. ``--json`` output carries ``"schema": 1``.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from cli import daemon_cmds, guild_cmds, queue_cmds
from cli.common import realm_paths
from core.errors import RealmError
from core.paths import init_layout
from guild.heroes import install_shipped


def _debug_wanted(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("REALM_DEBUG", "") not in ("", "0")


def cmd_init(args) -> int:
    paths = realm_paths(args, must_exist=False)
    paths.base.mkdir(parents=True, exist_ok=True)
    created = init_layout(paths)
    heroes = install_shipped(paths)
    done = [f"{len(created)} folders created"] if created else []
    done += [f"hero profiles installed: {', '.join(h.stem for h in heroes)}"] if heroes else []
    print(f"realm ready at {paths.base} ({'; '.join(done) or 'nothing to do'})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="realm", description="realm: a training daemon with a file-backed job queue.")
    parser.add_argument("--base-dir", help="the realm directory (default: $REALM_HOME or cwd)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("init", help="create or repair a realm layout (idempotent)")
    p.set_defaults(handler=cmd_init)
    queue_cmds.add_parsers(sub)
    guild_cmds.add_parsers(sub)
    daemon_cmds.add_parsers(sub)
    _global_options_everywhere(sub)
    return parser


def _global_options_everywhere(sub) -> None:
    """--base-dir and --debug after the subcommand too (``realm queue status --base-dir X``):
    each subcommand takes them again with a suppressed default, so one given there wins and one
    not given leaves the value from before the subcommand alone."""
    for parser in set(sub.choices.values()):
        parser.add_argument("--base-dir", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                            help=argparse.SUPPRESS)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                _global_options_everywhere(action)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except RealmError as exc:
        if _debug_wanted(argv):
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug or an OS failure: say so plainly, keep the trace on request
        if _debug_wanted(argv):
            traceback.print_exc()
        print(f"error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
