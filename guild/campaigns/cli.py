"""Module form ``python -m guild.campaigns.cli create NAME --hero HERO``: ``realm campaign ...``.

An entry alias: it only hands the command line to ``cli``; nothing in the project imports it.
"""

import sys


def main(argv: list[str] | None = None) -> int:
    from cli.main import main as realm_main

    return realm_main(["campaign", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
