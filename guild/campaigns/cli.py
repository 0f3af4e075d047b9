"""``python -m guild.campaigns.cli create NAME --hero HERO``: the same as ``realm campaign``."""

import sys

from core.cli import module_main

if __name__ == "__main__":
    sys.exit(module_main("campaign"))
