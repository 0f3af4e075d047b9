#!/usr/bin/env bash
# The FSDP2 scenarios of tests/integration/test_fsdp.py on NCCL: two CUDA ranks (devices 0,1)
# instead of two gloo ranks on the CPU. Needs a machine with at least two GPUs (one GPU cannot
# hold two NCCL ranks). Each job runs in fp32 (training.precision) so the two-rank loss curve
# can equal the one-GPU curve within 1e-5; the per-rank memory benchmark runs beside them.
# The 2-host scenario of tests/integration/test_multinode.py runs with one GPU per host.
# Usage: bash scripts/check_fsdp_nccl.sh [DEVICES]   (default 0,1)
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICES=${1:-0,1}
PY=${REALM_VENV:-.venv}/bin/python
gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -lt 2 ]; then
    echo "check_fsdp_nccl: $gpus CUDA device(s) here; NCCL ranks need two GPUs" >&2
    exit 2
fi
REALM_FSDP_DEVICES=$DEVICES "$PY" -m pytest -q -p no:xdist tests/integration/test_fsdp.py
# one job on two "hosts" (daemons with their own REALM_HOST on this machine), one GPU each
REALM_MULTINODE_DEVICES=${DEVICES/,//} "$PY" -m pytest -q -p no:xdist \
    tests/integration/test_multinode.py -k two_hosts
"$PY" scripts/bench_fsdp_memory.py --ranks 2
