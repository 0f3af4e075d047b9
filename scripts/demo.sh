#!/usr/bin/env bash
# The README's first command: set up the virtualenv if needed, then run `realm demo`:
# the tiny-qwen3 hero, two generated datasets, the queue drained by child training processes,
# and the resulting status and checkpoint printed. Usage: bash scripts/demo.sh [--dir DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${REALM_VENV:-.venv}/bin/realm" demo "$@"
