"""Module form of ``realm daemon`` from the design card: ``python -m core.training_daemon``.

An entry alias, not part of the foundation: it only hands the command line to ``cli`` (the
daemon itself lives in ``daemon/training_daemon.py``). Nothing in the project imports it; the
import-graph test checks that.
"""

import sys


def main(argv: list[str] | None = None) -> int:
    from cli.main import main as realm_main

    return realm_main(["daemon", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
