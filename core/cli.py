"""``realm``: the one command-line entry point.

Errors print one ``error: ...`` paragraph and exit 2 (bad usage, config or input) or 1 (runtime
failure); ``--debug`` or ``REALM_DEBUG=1`` shows the traceback. A flag that is not given never
overrides anything. ``--json`` output carries ``"schema": 1``.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from core import cli_daemon, cli_guild, cli_queue
from core.cli_common import realm_paths
from core.errors import RealmError
from core.paths import init_layout


def _debug_wanted(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("REALM_DEBUG", "") not in ("", "0")


def cmd_init(args) -> int:
    from guild.heroes import install_shipped

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
    cli_queue.add_parsers(sub)
    cli_guild.add_parsers(sub)
    cli_daemon.add_parsers(sub)
    return parser


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


def module_main(command: str, argv: list[str] | None = None) -> int:
    """The module forms (``python -m core.training_queue status``): ``realm COMMAND ...``, with
    the global options (--base-dir, --debug) accepted anywhere on the line."""
    rest = list(sys.argv[1:] if argv is None else argv)
    head: list[str] = []
    while rest and rest[0] in ("--base-dir", "--debug") or any(
            a.startswith("--base-dir=") for a in rest[:1]):
        arg = rest.pop(0)
        head += [arg] + ([rest.pop(0)] if arg == "--base-dir" and rest else [])
    for flag in ("--debug",):
        if flag in rest:
            rest.remove(flag)
            head.append(flag)
    if "--base-dir" in rest:
        i = rest.index("--base-dir")
        head += rest[i:i + 2]
        del rest[i:i + 2]
    return main([*head, command, *rest])


if __name__ == "__main__":
    sys.exit(main())
