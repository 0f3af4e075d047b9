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
from importlib import metadata

from cli import daemon_cmds, doctor_cmd, export_cmd, guild_cmds, queue_cmds, serve_cmd
from cli.common import realm_paths
from core.errors import RealmError
from core.errors import UsageError
from core.paths import init_layout, resolve_base
from guild.heroes import install_shipped


def _debug_wanted(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("REALM_DEBUG", "") not in ("", "0")


def cmd_init(args) -> int:
    if args.dir is not None:
        if args.base_dir is not None and resolve_base(args.base_dir) != resolve_base(args.dir):
            raise UsageError(f"realm init {args.dir} --base-dir {args.base_dir}: two different "
                             "realms named; give the directory once (either form).")
        args.base_dir = args.dir
    paths = realm_paths(args, must_exist=False)
    paths.base.mkdir(parents=True, exist_ok=True)
    created = init_layout(paths)
    heroes = install_shipped(paths)
    done = [f"{len(created)} folders created"] if created else []
    done += [f"hero profiles installed: {', '.join(h.stem for h in heroes)}"] if heroes else []
    print(f"realm ready at {paths.base} ({'; '.join(done) or 'nothing to do'})")
    return 0


def version_text() -> str:
    """realm's version and, when installed, torch's and transformers': read from the installed
    packages' metadata, so ``--version`` never imports torch (it answers in milliseconds)."""
    parts = []
    for dist, label in (("realm-trainer", "realm"), ("torch", "torch"),
                        ("transformers", "transformers")):
        try:
            parts.append(f"{label} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{label} (not installed)")
    return ", ".join(parts)


def cmd_completion(args) -> int:
    """The shell completion script for ``realm``, generated from this parser by shtab."""
    import shtab  # only this command needs it

    print(shtab.complete(build_parser(), shell=args.shell))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="realm", description="realm: a training daemon with a file-backed job queue.")
    parser.add_argument("--base-dir", help="the realm directory (default: $REALM_HOME or cwd)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action=_VersionAction,
                        help="print realm's version (and torch's, transformers') and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("init", help="create or repair a realm layout (idempotent)")
    p.add_argument("dir", nargs="?", default=None, metavar="DIR",
                   help="the realm directory to create (same as --base-dir; default: "
                        "$REALM_HOME or cwd)")
    p.set_defaults(handler=cmd_init)
    queue_cmds.add_parsers(sub)
    guild_cmds.add_parsers(sub)
    daemon_cmds.add_parsers(sub)
    export_cmd.add_parsers(sub)
    doctor_cmd.add_parsers(sub)
    serve_cmd.add_parsers(sub)
    p = sub.add_parser("completion", help="print a shell completion script (bash or zsh)",
                       description="Print the completion script; for bash: "
                                   "realm completion bash > ~/.local/share/bash-completion/"
                                   "completions/realm (zsh: a file _realm on $fpath).")
    p.add_argument("shell", choices=("bash", "zsh"), help="the shell to complete for")
    p.set_defaults(handler=cmd_completion)
    _global_options_everywhere(sub)
    return parser


class _VersionAction(argparse.Action):
    """argparse's ``version`` action, but the text is read only when ``--version`` is given
    (reading three packages' metadata costs ~90 ms that no other command should pay)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


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
