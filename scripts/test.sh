#!/usr/bin/env bash
# The test command of README.md: set up the virtualenv if needed, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${REALM_VENV:-.venv}/bin/python" -m pytest -q "$@"
