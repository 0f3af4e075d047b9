"""The job ledger: one JSON line per job transition in ``logs/jobs.jsonl``.

Several processes (daemons, ``realm queue retry`` from a shell) append to the same file. Each line
is one ``write()`` on an ``O_APPEND`` descriptor under an exclusive ``fcntl`` lock, so lines never
interleave or tear. The ledger is an audit trail; the sidecars remain the source of truth.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any, Iterator

from core.fsutil import host_name
from core.job import Job, utc_now

LEDGER_SCHEMA = 1


def ledger_entry(job: Job, history_entry: dict[str, Any]) -> dict[str, Any]:
    return {
        "schema": LEDGER_SCHEMA,
        "at": history_entry.get("at") or utc_now(),
        "job_id": job.id,
        "from": history_entry["from"],
        "to": history_entry["to"],
        "reason": history_entry["reason"],
        "dataset": job.dataset_path,
        "priority": job.priority,
        "attempts": job.attempts,
        "host": host_name(),
        "pid": os.getpid(),
    }


class JobLedger:
    """Append-only JSON lines, safe across processes."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def append(self, job: Job, history_entry: dict[str, Any]) -> None:
        line = (json.dumps(ledger_entry(job, history_entry), ensure_ascii=False) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, line)
        finally:
            os.close(fd)

    def entries(self, job_id: str | None = None) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        with self.path.open(encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    entry = json.loads(line)
                    if job_id is None or entry.get("job_id") == job_id:
                        yield entry
