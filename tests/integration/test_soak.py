"""The reduced soak: scripts/soak.py itself, run small (real daemons, real kills, real files)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow(seconds=30)
def test_reduced_soak_loses_nothing_duplicates_nothing_and_saves_only_loadable_finite_weights(
        tmp_path):
    """4 jobs, 3 kills (daemon SIGKILL, daemon SIGTERM = warm stop, child SIGKILL = retry) and
    one of each file fault: a dataset deleted, a queued dataset replaced, a processing sidecar
    overwritten with garbage, and (as root, on a tmpfs of its own) the disk filled."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "soak.py"), "--jobs", "4",
                          "--kills", "3", "--file-faults", "4", "--max-steps", "4",
                          "--pause", "1", "--seed", "1", "--json", "--drain-timeout", "300",
                          "--dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=540)
    assert out.stdout.strip(), out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["drained"], result
    assert (result["lost"], result["duplicated"], result["unloadable"], result["non_finite"],
            result["file_faults_wrong"]) == (0, 0, 0, 0, 0), result
    assert result["completed"] + result["failed"] == result["dropped"] == 4, result
    assert result["checkpoints_checked"] >= result["completed"] and result["retries"] >= 1, result
    # a child kill finding no child within 10 s hits its daemon instead; the warm stop stays
    assert sum(result["kills"].values()) == 3 and result["kills"].get("daemon-term") == 1, result
    faults = result["file_faults"]
    assert faults["delete"] == faults["replace"] == faults["corrupt"] == 1, result
    outcomes = result["file_fault_outcomes"]
    assert sum(outcomes["delete"].values()) == sum(outcomes["replace"].values()) == 1, result
    assert outcomes["corrupt"] == {"restored by its owner, completed": 1}, result
    if result["fill_skipped"] is None:  # root and a tmpfs: the disk was filled while one trained
        assert faults["fill"] == 1, result
        # On a loaded machine the job may write its last checkpoint before the disk is full:
        # the fault then misses its moment (reported, never judged wrong). ENOSPC handling itself
        # is checked deterministically in test_child_protocol (REALM_TEST_ENOSPC).
        assert sum(outcomes["fill"].values()) == 1 and set(outcomes["fill"]) <= {
            "ENOSPC met, job requeued", "no job met ENOSPC while full"}, result
    else:
        print(f"fill fault skipped: {result['fill_skipped']}")
    assert result["unexpected_daemon_exits"] == [] and result["queue_problems"] == [], result
    outside = result["outside"]
    assert outside["outside_writes"] == [] and outside["children_audited"] >= 4, outside
    assert result["orphans"] == [], result
    assert out.returncode == 0 and result["ok"], out.stderr[-3000:]
