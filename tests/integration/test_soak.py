"""The reduced soak: scripts/soak.py itself, run small (real daemons, real kills)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_reduced_soak_loses_nothing_duplicates_nothing_and_saves_only_loadable_finite_weights(
        tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "soak.py"), "--jobs", "6",
                          "--kills", "8", "--seed", "3", "--ranks", "2", "--json",
                          "--drain-timeout", "400", "--dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    result = json.loads(out.stdout)
    assert result["drained"] and result["completed"] == result["dropped"] == 6, result
    assert (result["lost"], result["duplicated"], result["unloadable"], result["non_finite"]) == \
        (0, 0, 0, 0), result
    assert result["checkpoints_checked"] >= 6 and result["retries"] >= 1, result
    assert sum(result["kills"].values()) == 8 and result["orphans"] == [], result
    assert out.returncode == 0, out.stderr[-3000:]
