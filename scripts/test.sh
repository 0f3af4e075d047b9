#!/usr/bin/env bash
# The test command of README.md: set up the virtualenv if needed, then run the whole suite on
# REALM_TEST_WORKERS processes (pytest-xdist; default 3: on the 2-core reference machine a third
# worker fills the time the others spend waiting on daemons and children;
# 0 runs in one process) and print the 15 slowest tests and the suite's wall time.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
workers="${REALM_TEST_WORKERS:-3}"
start=$(date +%s)
set +e
"${REALM_VENV:-.venv}/bin/python" -m pytest -q -n "$workers" --dist worksteal --durations=15 "$@"
rc=$?
set -e
elapsed=$(( $(date +%s) - start ))
printf 'suite time: %d:%02d (%d s, %s workers)\n' $((elapsed / 60)) $((elapsed % 60)) "$elapsed" "$workers"
exit $rc
