#!/usr/bin/env bash
# The test command of README.md: set up the virtualenv if needed, then run the whole suite on
# REALM_TEST_WORKERS processes (pytest-xdist; default 2, the cores of the reference machine;
# 0 runs in one process) and print the suite's wall time.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
workers="${REALM_TEST_WORKERS:-2}"
start=$(date +%s)
set +e
"${REALM_VENV:-.venv}/bin/python" -m pytest -q -n "$workers" "$@"
rc=$?
set -e
elapsed=$(( $(date +%s) - start ))
printf 'suite time: %d:%02d (%d s, %s workers)\n' $((elapsed / 60)) $((elapsed % 60)) "$elapsed" "$workers"
exit $rc
