"""Module form ``python -m core.cli`` (and ``core.cli.main``), kept for scripts written before the
command line moved to its own package: ``realm`` / ``python -m cli`` are the same thing.

An entry alias, not part of the foundation: it only hands over to ``cli.main``. Nothing in the
project imports it; the import-graph test checks that.
"""

import sys


def main(argv: list[str] | None = None) -> int:
    from cli.main import main as realm_main

    return realm_main(argv)


if __name__ == "__main__":
    sys.exit(main())
