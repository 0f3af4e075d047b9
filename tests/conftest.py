"""Shared fixtures: a real realm in tmp_path, dataset droppers, and leak checks."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import psutil
import pytest

from core.paths import RealmPaths, init_layout
from core.training_queue import TrainingQueue

# One thread per test process and per child it starts (inherited): the tiny models gain nothing
# from a second thread, and the test workers (scripts/test.sh: pytest -n 3) share the cores
# instead of each asking for all of them.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    """Longest first: tests marked ``slow`` (heaviest first, by their ``seconds=``) run before
    the rest, so under ``pytest -n 2`` the long ones overlap hundreds of short ones instead of
    finishing alone at the end (longest-processing-time-first scheduling)."""
    def weight(item):
        marker = item.get_closest_marker("slow")
        return 0 if marker is None else 1 + marker.kwargs.get("seconds", 0)

    items.sort(key=weight, reverse=True)  # stable: collection order within equal weights


@pytest.fixture(autouse=True)
def no_leaks():
    """Fail a test that leaves threads or child processes behind."""
    threads_before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        extra_threads = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
        children = [c for c in psutil.Process().children(recursive=True) if c.is_running()
                    and c.status() != psutil.STATUS_ZOMBIE]
        if not extra_threads and not children:
            return
        time.sleep(0.05)
    pytest.fail(f"leaked threads {extra_threads} or child processes {children}")


@pytest.fixture
def realm(tmp_path: Path) -> RealmPaths:
    paths = RealmPaths(tmp_path / "realm")
    paths.base.mkdir()
    init_layout(paths)
    return paths


@pytest.fixture
def queue(realm: RealmPaths) -> TrainingQueue:
    """A queue with settle_seconds=0, so dropped files are adopted on the next scan."""
    return TrainingQueue(realm.base, settle_seconds=0)


def write_dataset(path: Path, n: int = 3, tag: str = "x") -> Path:
    path.write_text("".join(json.dumps({"text": f"{tag} example {i}"}) + "\n" for i in range(n)))
    return path


def drop(realm: RealmPaths, folder: str, name: str, n: int = 3, tag: str | None = None) -> Path:
    """Drop a dataset into a queue folder the way a person would (write, close)."""
    return write_dataset(realm.state_dir(folder) / name, n, tag or name)


def tree(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under ``root`` with inode, mtime and content: equal trees mean nothing changed."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_ino, st.st_mtime_ns,
                                             b"" if p.is_symlink() else p.read_bytes())
    return out
