"""Queue benchmark: a realm with 10,000 queued jobs; status and claim latency.

    python scripts/bench_queue.py [--jobs 10000] [--repeat 5] [--claims 50]

Prints medians (targets, printed, not asserted: `queue status --json` under 1 s, claiming the
next job under 50 ms, drop-to-claim within settle_seconds + 1 s on inotify, daemon idle CPU
under 1 % of a core over 30 s). The realm is built in a temp dir and removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.paths import PRIORITIES, RealmPaths, init_layout  # noqa: E402
from cli.status import build_status  # noqa: E402
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
    subprocess.run([sys.executable, "-m", "cli", "--base-dir", str(base), "queue", "status",
                    "--json"], check=True, capture_output=True)


def _daemon(base: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cli", "--base-dir", str(base), "daemon"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def daemon_latency_and_idle(idle_seconds: float, drops: int) -> tuple[list[float], float, float]:
    """(drop-to-claim seconds per drop, settle_seconds, idle CPU % of one core)."""
    import psutil

    with tempfile.TemporaryDirectory(prefix="realm-bench-daemon-") as tmp:
        base = Path(tmp)
        init_layout(RealmPaths(base))
        settle = 0.5
        (base / "config.json").write_text(json.dumps({"daemon": {
            "settle_seconds": settle, "poll_interval": 5.0, "heartbeat_seconds": 0.2}}))
        proc = _daemon(base)
        try:
            time.sleep(3.0)  # imports and the first scan
            cpu = psutil.Process(proc.pid)
            cpu.cpu_percent(None)
            time.sleep(idle_seconds)
            idle = cpu.cpu_percent(None)
            latencies = []
            ledger = base / "logs" / "jobs.jsonl"
            for i in range(drops):
                path = base / "queue" / "normal" / f"drop{i}.jsonl"
                with open(path, "w") as fh:
                    fh.write(json.dumps({"text": "hello"}) + "\n")
                dropped = time.time()
                claimed = None
                while claimed is None and time.time() - dropped < 30:
                    time.sleep(0.01)
                    for line in ledger.read_text().splitlines() if ledger.exists() else []:
                        entry = json.loads(line)
                        if entry["to"] == "processing" and entry["dataset"].endswith(
                                f"drop{i}.jsonl"):
                            claimed = datetime.fromisoformat(entry["at"]).timestamp()
                latencies.append((claimed or float("nan")) - dropped)
                time.sleep(9.0)  # the child fails (no campaign); the daemon settles back to idle
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    return latencies, settle, idle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--claims", type=int, default=50)
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument("--drops", type=int, default=5)
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
    latencies, settle, idle = daemon_latency_and_idle(args.idle_seconds, args.drops)
    drop_to_claim = statistics.median(latencies)
    rows += [
        (f"drop-to-claim, inotify (settle_seconds {settle})", drop_to_claim, settle + 1.0),
        (f"daemon idle CPU over {args.idle_seconds:.0f} s (% of one core, as ms/s)",
         idle * 10 / 1000, 0.010),
    ]
    print(f"realm queue benchmark: {args.jobs} queued jobs, cpu count {os.cpu_count()}")
    for label, seconds, target in rows:
        verdict = "" if target is None else (
            f"  target < {target * 1000:.0f} ms: {'met' if seconds < target else 'MISSED'}"
            f" (x{target / max(seconds, 1e-9):.1f} headroom)")
        print(f"  {label:<48} {seconds * 1000:9.1f} ms{verdict}")


if __name__ == "__main__":
    main()
