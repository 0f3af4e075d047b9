#!/usr/bin/env bash
# Create (or refresh) the project virtualenv: torch from the local CPU wheel first, then realm
# with its dev extras. Idempotent: reinstalls only when pyproject.toml changed.
# Usage: bash scripts/setup.sh            (venv at $REALM_VENV, default ./.venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${REALM_VENV:-.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating virtualenv $VENV" >&2
    "$PY" -m venv "$VENV"
fi
stamp="$VENV/.realm-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # Exactly this spelling takes the CPU wheel on disk; any other may pull a multi-GB CUDA build.
    "$VENV/bin/python" -m pip install --quiet torch==2.13.0
    "$VENV/bin/python" -m pip install --quiet -e ".[dev]"
    echo "$want" > "$stamp"
fi
