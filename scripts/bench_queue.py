"""Queue benchmark: a realm with 10,000 queued jobs; status and claim latency.

    python scripts/bench_queue.py [--jobs 10000] [--repeat 5] [--claims 50]

Prints medians (targets, printed, not asserted: `queue status --json` under 1 s, claiming the
next job under 50 ms). The realm is built in a temp dir and removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.paths import PRIORITIES, RealmPaths, init_layout  # noqa: E402
from core.queue_status import build_status  # noqa: E402
from core.training_queue import TrainingQueue  # noqa: E402


def build_realm(base: Path, jobs: int) -> float:
    paths = RealmPaths(base)
    init_layout(paths)
    line = json.dumps({"prompt": "What is 2+2?", "completion": "4"}) + "\n"
    for i in range(jobs):
        (paths.state_dir(PRIORITIES[i % 3]) / f"job{i:05d}.jsonl").write_text(line * 8)
    start = time.perf_counter()
    adopted = TrainingQueue(base, settle_seconds=0).adopt_new()
    assert len(adopted) == jobs
    return time.perf_counter() - start


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def cli_status(base: Path) -> None:
    subprocess.run([sys.executable, "-m", "core.cli", "--base-dir", str(base), "queue", "status",
                    "--json"], check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--claims", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="realm-bench-") as tmp:
        base = Path(tmp)
        adopt_s = build_realm(base, args.jobs)
        status_cli = timed(lambda: cli_status(base), args.repeat)
        status_fn = timed(lambda: build_status(TrainingQueue(base)), args.repeat)
        cold_claim = timed(lambda: TrainingQueue(base, settle_seconds=0).claim_next(), 3)
        daemon_queue = TrainingQueue(base, settle_seconds=0)
        daemon_queue.claim_next()  # the daemon's first scan fills its sidecar cache
        warm_claim = timed(daemon_queue.claim_next, args.claims)
    rows = [
        ("adopt all jobs (one scan, fsync per sidecar)", adopt_s, None),
        ("`realm queue status --json` (new process)", statistics.median(status_cli), 1.0),
        ("status build in-process, fresh queue object", statistics.median(status_fn), 1.0),
        ("claim next, fresh process state (cold cache)", statistics.median(cold_claim), None),
        ("claim next, running daemon (warm cache)", statistics.median(warm_claim), 0.050),
    ]
    print(f"realm queue benchmark: {args.jobs} queued jobs, cpu count {os.cpu_count()}")
    for label, seconds, target in rows:
        verdict = "" if target is None else (
            f"  target < {target * 1000:.0f} ms: {'met' if seconds < target else 'MISSED'}"
            f" (x{target / seconds:.1f} headroom)")
        print(f"  {label:<48} {seconds * 1000:9.1f} ms{verdict}")


if __name__ == "__main__":
    main()
