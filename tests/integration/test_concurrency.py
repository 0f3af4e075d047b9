"""Real processes racing on one realm: exclusive claims, and files still being written."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from core.training_queue import TrainingQueue
from tests.conftest import drop

CLAIMER = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from core.training_queue import TrainingQueue
    base, go = sys.argv[1], Path(sys.argv[2])
    q = TrainingQueue(base, settle_seconds=0)
    while not go.exists():
        time.sleep(0.001)
    ids = []
    while (job := q.claim_next()) is not None:
        ids.append(job.id)
    print(json.dumps(ids))
""")

WRITER = textwrap.dedent("""
    import json, sys, time
    with open(sys.argv[1], "a") as fh:
        for i in range(15):  # a line every 200 ms for 3 s, file held open throughout
            fh.write(json.dumps({"text": f"line {i}"}) + "\\n")
            fh.flush()
            time.sleep(0.2)
""")


@pytest.mark.slow
def test_eight_processes_claim_400_jobs_each_exactly_once(realm, tmp_path):
    for i in range(400):
        drop(realm, ("high", "normal", "low")[i % 3], f"job{i:03d}.jsonl", n=1)
    queued = TrainingQueue(realm.base, settle_seconds=0).adopt_new()
    assert len(queued) == 400
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, str(realm.base), str(go)],
                              stdout=subprocess.PIPE, text=True) for _ in range(8)]
    time.sleep(1.0)  # let every interpreter start and wait at the barrier
    go.touch()
    results = [json.loads(p.communicate(timeout=240)[0]) for p in procs]
    claimed = [job_id for ids in results for job_id in ids]
    assert len(claimed) == 400 and set(claimed) == {j.id for j in queued}
    assert sum(1 for ids in results if ids) >= 2, "the race was real: several processes won jobs"
    processing = realm.state_dir("processing")
    assert len(list(processing.glob("*.jsonl"))) == 400
    assert len(list(processing.glob("*.jsonl.job.json"))) == 400
    for sidecar in processing.glob("*.job.json"):
        assert (processing / sidecar.name.removesuffix(".job.json")).is_file()
    ledger = [json.loads(l) for l in realm.ledger.read_text().splitlines()]
    claims = [e["job_id"] for e in ledger if e["to"] == "processing"]
    assert sorted(claims) == sorted(claimed), "one ledger line per claim, none torn"


@pytest.mark.slow
def test_file_being_written_is_not_claimed_until_closed_and_settled(realm):
    target = realm.state_dir("normal") / "growing.jsonl"
    queue = TrainingQueue(realm.base, settle_seconds=1.0)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(target)])
    try:
        while writer.poll() is None:
            assert queue.claim_next() is None, "claimed a file its writer still holds open"
            time.sleep(0.1)
        closed_at = time.monotonic()
        job = None
        while job is None and time.monotonic() - closed_at < 10:
            job = queue.claim_next()
            claimed_at = time.time()
            time.sleep(0.05)
    finally:
        writer.kill()
        writer.wait()
    assert job is not None, "a closed and settled file must become claimable"
    last_write = (realm.base / job.dataset_path).stat().st_mtime
    assert claimed_at - last_write >= 1.0, "claimed before it held still for settle_seconds"
    assert job.num_examples == 15, "the sidecar describes the whole file"
    assert Path(realm.base / job.dataset_path).read_text().count("\n") == 15
