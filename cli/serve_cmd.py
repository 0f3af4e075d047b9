"""``realm serve [--host 127.0.0.1] [--port 8765] [--token-file FILE]``: the web dashboard
(``cli.dashboard``), in its own process. starlette and uvicorn are imported by this command alone."""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path

from cli.common import positive_seconds, realm_paths
from core.errors import UsageError
from core.validate import read_regular

TOKEN_ENV = "REALM_SERVE_TOKEN"
MIN_TOKEN = 16
MAX_TOKEN_BYTES = 4096


def read_token(args) -> tuple[str | None, str]:
    """(token, where it came from): ``--token-file`` first, else ``$REALM_SERVE_TOKEN``. A
    token is never taken on the command line, where ``ps`` shows it to every user."""
    if args.token_file:
        try:
            raw = read_regular(Path(args.token_file), MAX_TOKEN_BYTES, what="--token-file")
        except FileNotFoundError:
            raise UsageError(f"realm serve: --token-file {args.token_file} does not exist; write "
                             "the token there (for example `python -c \"import secrets; "
                             "print(secrets.token_urlsafe(24))\" > FILE`).") from None
        token, source = raw.decode("utf-8", "replace").strip(), f"--token-file {args.token_file}"
    else:
        token, source = os.environ.get(TOKEN_ENV, "").strip() or None, f"${TOKEN_ENV}"
        if token is None:
            return None, ""
    if len(token) < MIN_TOKEN or any(c.isspace() for c in token):
        raise UsageError(f"realm serve: the token from {source} must be at least {MIN_TOKEN} "
                         "characters without spaces; make one with `python -c \"import secrets; "
                         "print(secrets.token_urlsafe(24))\"`.")
    return token, source


def cmd_serve(args) -> int:
    paths = realm_paths(args)
    from cli.dashboard.app import create_app, is_loopback, serve  # starlette: only here

    token, source = read_token(args)
    loopback = is_loopback(args.host)
    if not loopback and token is None:
        raise UsageError(f"realm serve: --host {args.host} is not loopback, so anyone who can "
                         "reach it would see the realm: give a token with --token-file FILE "
                         f"(or ${TOKEN_ENV}); every request must then carry it. Or serve on "
                         "127.0.0.1 and reach it through an SSH tunnel.")
    sock = _bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    actions = f"cancel/retry on (token from {source})" if token else \
        "read-only (no token: cancel/retry off)"
    print(f"realm serve: http://{shown}:{port}/  {paths.base}  {actions}", flush=True)
    app = create_app(paths.base, token=token, loopback=loopback, interval=args.interval,
                     host=host)
    serve(app, sock)
    return 0


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"realm serve: cannot listen on {host}:{port}: {exc.strerror}. Pick "
                         "another --port (0 takes a free one) or stop what holds it.") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def port_number(text: str) -> int:
    """An argparse ``type``: a TCP port, 0 (any free one) to 65535."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"--port {text}: give a port from 1 to 65535 (or 0 for "
                                         "a free one)")
    return port


def add_parsers(sub) -> None:
    p = sub.add_parser("serve", help="the web dashboard: queue, running job, governor, campaigns",
                       description="Serve a live dashboard of this realm (read-only unless a "
                                   "token is given: then cancel and retry work from the page).")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; any other needs a token)")
    p.add_argument("--port", type=port_number, default=8765, help="port (default 8765; 0: a free one)")
    p.add_argument("--token-file", metavar="FILE",
                   help=f"a file holding the token (else ${TOKEN_ENV}): enables cancel/retry, "
                        "and is required off loopback")
    p.add_argument("--interval", type=positive_seconds("--interval"), default=1.0,
                   metavar="SECONDS", help="seconds between live updates (default: 1)")
    p.set_defaults(handler=cmd_serve)
