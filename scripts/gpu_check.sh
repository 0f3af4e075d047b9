python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
# GPU machine check, one script, under 7 minutes. Run from the repository root:
#
#     OUT=/some/dir [GPU_TESTS="tests/trainer/test_x.py -k cuda"] bash scripts/gpu_check.sh
#
# The machine brings python3 with torch (CUDA), transformers 5.x, peft, tokenizers, safetensors,
# psutil and pyyaml; watchdog, structlog, shtab and bitsandbytes come as wheels in .whl/
# (ignored by git: carry them), installed above into /tmp/site. Then, each under its own time
# limit, with its output in $OUT: (1) scripts/check_cuda.py, the engine's CUDA path;
# (2) scripts/bench_train_memory.py --device cuda, the 0.6B model's peak memory per parameter
# for full-bf16, lora-bf16 and qlora (table in bench_gpu.log, rows in bench_gpu.json);
# (3) pytest on $GPU_TESTS when set, in the time left. Ends with a summary (also summary.txt)
# and exits non-zero when a step failed.
pip_rc=$?
set -uo pipefail
: "${OUT:?set OUT to an existing directory for the logs}"
BUDGET=450  # seconds for everything below: the whole script stays under 7 minutes
start=$(date +%s)
summary=()

left() { echo $(( BUDGET - ($(date +%s) - start) )); }

# step NAME LIMIT CMD...: run CMD under min(LIMIT, time left), output to $OUT/NAME.log
step() {
    local name=$1 limit=$2 t0 rc
    shift 2
    (( limit > $(left) )) && limit=$(left)
    if (( limit < 20 )); then
        summary+=("$name: skipped (only $(left) s of the budget left)")
        return
    fi
    echo "== $name (limit ${limit} s)"
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    local verdict="ok"
    (( rc == 124 || rc == 137 )) && verdict="TIMED OUT after ${limit} s"
    (( rc != 0 && rc != 124 && rc != 137 )) && verdict="FAILED (exit $rc)"
    summary+=("$name: $verdict in $(( $(date +%s) - t0 )) s (log: $OUT/$name.log)")
    [[ $verdict == ok ]] || failed=1
}

failed=0
{
    nvidia-smi -L 2>&1
    python3 -c "import sys, torch, transformers, peft; print('python', sys.version.split()[0], \
'torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), \
'transformers', transformers.__version__, 'peft', peft.__version__)" 2>&1
    python3 -c "import bitsandbytes, structlog, watchdog, shtab; \
print('bitsandbytes', bitsandbytes.__version__, 'structlog', structlog.__version__)" 2>&1
} >"$OUT/env.txt"
if (( pip_rc != 0 )); then
    summary+=("wheels: pip install of .whl/*.whl FAILED (exit $pip_rc); imports may fail below")
    failed=1
fi

step check_cuda 80 python3 scripts/check_cuda.py
step bench_gpu 200 python3 scripts/bench_train_memory.py --device cuda --timeout 110 \
    --json "$OUT/bench_gpu.json"
if [[ -n "${GPU_TESTS:-}" ]]; then
    if python3 -c "import pytest" 2>/dev/null; then
        # shellcheck disable=SC2086  # GPU_TESTS is a list of pytest arguments
        step gpu_tests 170 python3 -m pytest -q -p no:cacheprovider $GPU_TESTS
    else
        summary+=("gpu_tests: skipped: pytest is not installed here (add its wheels to .whl/)")
        failed=1
    fi
fi

{
    echo "== summary ($(( $(date +%s) - start )) s)"
    head -3 "$OUT/env.txt"
    printf '%s\n' "${summary[@]}"
    echo "-- check_cuda:"
    grep -E "\[(ok|FAIL)\]|^device|nothing to check" "$OUT/check_cuda.log" 2>/dev/null | head -30
    echo "-- bench_gpu:"
    sed -n '/^baseline /,$p' "$OUT/bench_gpu.log" 2>/dev/null | head -30
    grep -E "^[a-z0-9-]+: [a-z_]+ in " "$OUT/bench_gpu.log" 2>/dev/null | head -10
    if [[ -f "$OUT/gpu_tests.log" ]]; then
        echo "-- gpu_tests:"
        tail -15 "$OUT/gpu_tests.log"
    fi
} | tee "$OUT/summary.txt"
exit $failed
