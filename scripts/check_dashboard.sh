#!/usr/bin/env bash
# Render the `realm serve` dashboard of a live realm in headless Chromium and save a screenshot.
# Usage: bash scripts/check_dashboard.sh [OUT.png]        (default: docs/dashboard.png)
#
# A temporary realm: campaign tiny-qwen3/demo, three generated datasets queued (a short high one,
# a longer normal one, a low one held), a daemon whose child's loss is NaN once at global step 6
# (REALM_TEST_NAN_AT=0:6: a governor rollback inside the second job), and `realm serve`. Once the
# first job completed and the second trains past the rollback, the page is rendered twice: its
# DOM is checked (running job, rollback, recent job, no page error) and a screenshot is saved.
# Every process it starts is stopped on exit. About a minute on two slow cores.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-docs/dashboard.png}")
VENV=${REALM_VENV:-.venv}
REALM=$VENV/bin/realm
PY=$VENV/bin/python
CHROMIUM=${CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}
if [ -z "$CHROMIUM" ]; then
    echo "chromium is missing: apt-get install chromium" >&2
    exit 2
fi
[ -x "$REALM" ] || { echo "no $REALM: run bash scripts/setup.sh (or set REALM_VENV)" >&2; exit 2; }

WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
export REALM_HOME=$WORK/realm

# status_is EXPR: true when the Python expression holds for s = `realm queue status --json`.
status_is() {
    "$REALM" queue status --json | "$PY" -c "import json, sys; s = json.load(sys.stdin); \
p = (s['in_progress'] or [{}])[0].get('progress') or {}; sys.exit(0 if ($1) else 1)"
}

wait_for() {  # wait_for SECONDS WHAT EXPR
    local deadline=$((SECONDS + $1))
    until status_is "$3"; do
        if [ $SECONDS -ge $deadline ]; then
            echo "timed out after $1 s waiting for $2; daemon log:" >&2
            tail -20 "$WORK/daemon.log" >&2
            exit 1
        fi
        sleep 1
    done
}

echo "realm at $REALM_HOME"
"$REALM" init "$REALM_HOME" >/dev/null
"$REALM" campaign create demo --hero tiny-qwen3 --description "check_dashboard.sh" >/dev/null
mkdir -p "$WORK/data"
"$PY" scripts/gen_data.py "$WORK/data/warmup.jsonl" --examples 200 --seed 1 >/dev/null
"$PY" scripts/gen_data.py "$WORK/data/main.jsonl" --examples 800 --seed 2 >/dev/null
"$PY" scripts/gen_data.py "$WORK/data/later.jsonl" --examples 200 --seed 3 >/dev/null
"$REALM" queue add "$WORK/data/warmup.jsonl" --priority high --set training.max_steps=4 >/dev/null
"$REALM" queue add "$WORK/data/main.jsonl" --set training.max_steps=50 >/dev/null
"$REALM" queue add "$WORK/data/later.jsonl" --priority low --set training.max_steps=4 >/dev/null
LATER=$("$REALM" queue list --json | "$PY" -c \
    "import json, sys; print(json.load(sys.stdin)['jobs'][-1]['id'])")
"$REALM" queue hold "$LATER" --reason "kept for the screenshot" >/dev/null

PORT=$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
REALM_TEST_NAN_AT=0:6 "$REALM" daemon >"$WORK/daemon.log" 2>&1 &
PIDS+=($!)
"$REALM" serve --port "$PORT" >"$WORK/serve.log" 2>&1 &
PIDS+=($!)

echo "waiting for the first job to complete and the second to train past its rollback"
wait_for 150 "the first job to complete and the second to train past step 12" \
    "s['counts']['completed'] >= 1 and p.get('step', 0) >= 12"
"$PY" - "$PORT" <<'EOF' || { echo "realm serve's log:" >&2; cat "$WORK/serve.log" >&2; exit 1; }
import sys, time, urllib.error, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}"
for _ in range(30):
    try:
        urllib.request.urlopen(base + "/api/status", timeout=2).read()
        break
    except OSError:
        time.sleep(0.5)
else:
    sys.exit("realm serve did not answer")
try:
    urllib.request.urlopen(base + "/", timeout=2).read()
except urllib.error.HTTPError as exc:
    sys.exit(f"realm serve answers / with {exc.code}: is the page in the folder it serves?")
EOF

# ?poll: the page polls instead of holding an event stream open, which would stop the virtual
# clock that --virtual-time-budget runs on (Chromium waits for open requests).
URL="http://127.0.0.1:$PORT/?poll"
chrome() {
    timeout 60 "$CHROMIUM" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
        --disable-background-networking --disable-component-update --disable-sync \
        --user-data-dir="$(mktemp -d -p "$WORK")" --window-size=1400,1150 \
        --virtual-time-budget=8000 "$@" "$URL" 2>>"$WORK/chromium.log"
}
echo "rendering $URL"
chrome --dump-dom >"$WORK/dom.html"
MAIN=$("$REALM" queue list --state processing --json | "$PY" -c \
    "import json, sys; print((json.load(sys.stdin)['jobs'] or [{'id': '?'}])[0]['id'])")
problems=()
grep -q "$MAIN" "$WORK/dom.html" || problems+=("the running job $MAIN is not on the page")
grep -q 'class="rollback"' "$WORK/dom.html" || problems+=("no rollback marker on the live loss curve")
grep -q "warmup.jsonl" "$WORK/dom.html" || problems+=("the completed job is not on the page")
grep -q 'class="conn conn-polling"' "$WORK/dom.html" || problems+=("the page never got a status")

mkdir -p "$(dirname "$OUT")"
chrome --screenshot="$OUT" >/dev/null
[ -s "$OUT" ] || problems+=("no screenshot written")
if [ ${#problems[@]} -gt 0 ]; then
    printf 'FAIL: %s\n' "${problems[@]}" >&2
    exit 1
fi
echo "ok: dashboard rendered; screenshot at $OUT"
