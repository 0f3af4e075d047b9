"""``python -m cli``: the same as ``realm``."""

import sys

from cli.main import main

sys.exit(main())
