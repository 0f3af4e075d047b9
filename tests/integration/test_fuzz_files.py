"""Fuzz: random bytes and random JSON as datasets and sidecars, under the queue and a live daemon.

Whatever lands in an inbox, the queue never raises and never hangs, every file ends claimed,
in a terminal folder, waiting, or as a listed problem, and nothing outside the realm changes.
"""

from __future__ import annotations

import pytest

import json
import os
import signal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.paths import PRIORITIES, STATE_FOLDERS, RealmPaths, init_layout
from cli.status import build_list, build_status
from core.training_queue import TrainingQueue
from tests.conftest import tree
from tests.integration.test_daemon import FAST_DAEMON, realm_cmd, start_daemon, wait_for
from tests.trainer.test_training import make_realm

NAME_BYTES = st.binary(min_size=1, max_size=24).map(
    lambda b: b.replace(b"/", b"_").replace(b"\0", b"_").lstrip(b"."))
NAMES = st.one_of(
    st.sampled_from([b"a.jsonl", b"caf\xe9.jsonl", b"x" * 236 + b".jsonl", b"tab\t.jsonl",
                     "snow\u2603.jsonl".encode()]),
    NAME_BYTES.filter(bool).map(lambda b: b + b".jsonl"))
JSON_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8)
SIDECAR_KEYS = st.sampled_from(["hero_id", "campaign_id", "overrides", "metadata", "schema", "id",
                                "dataset_path", "status", "dataset_sha256", "seal", "priority"])


def _deep(n: int) -> bytes:
    return b'{"overrides":' * n + b"1" + b"}" * n


SIDECARS = st.one_of(
    st.binary(max_size=64),
    st.dictionaries(SIDECAR_KEYS, JSON_VALUES, max_size=4).map(
        lambda d: json.dumps(d, allow_nan=True).encode()),
    st.integers(1, 200_000).map(_deep),
    st.just(b'{"id": "x", "dataset_path": "/etc/passwd", "dataset_name": "p.jsonl"}'),
    st.just(b'{"id": "x", "dataset_path": "../../outside.jsonl", "dataset_name": "o.jsonl"}'),
)
DATASETS = st.one_of(st.binary(max_size=256),
                     st.lists(JSON_VALUES, max_size=4).map(
                         lambda rows: b"".join(json.dumps(r).encode() + b"\n" for r in rows)))
FILES = st.lists(st.tuples(st.sampled_from(PRIORITIES), NAMES, DATASETS,
                           st.one_of(st.none(), SIDECARS)), min_size=1, max_size=6)


def drop_raw(paths: RealmPaths, folder: str, name: bytes, data: bytes,
             sidecar: bytes | None) -> None:
    base = os.path.join(os.fsencode(paths.state_dir(folder)), name)
    if sidecar is not None:
        with open(base + b".job.json", "wb") as fh:
            fh.write(sidecar)
    with open(base, "wb") as fh:
        fh.write(data)


def accounted(paths: RealmPaths, queue: TrainingQueue) -> tuple[set, set]:
    """(every dataset file name in the queue, the names status/list account for)."""
    names, seen = set(), set()
    for folder in PRIORITIES + STATE_FOLDERS:
        for entry in os.scandir(paths.state_dir(folder)):
            if not entry.name.startswith(".") and not entry.name.endswith(".job.json"):
                names.add(f"queue/{folder}/{entry.name}")
    from core.queue_scan import shown

    names = {shown(n) for n in names}
    status = build_status(queue)
    listing = build_list(queue, "all")
    seen |= {p["path"] for p in status["problems"] + listing["problems"]}
    seen |= {row["path"] for row in listing["jobs"]}
    json.dumps([status, listing], ensure_ascii=False).encode("utf-8")
    return names, seen


@given(files=FILES)
@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_random_files_never_break_the_queue(tmp_path_factory, files):
    root = tmp_path_factory.mktemp("fuzz")
    paths = RealmPaths(root / "realm")
    paths.base.mkdir()
    init_layout(paths)
    (root / "outside.jsonl").write_text('{"text": "not yours"}\n')
    outside_before = (root / "outside.jsonl").stat()
    for folder, name, data, sidecar in files:
        drop_raw(paths, folder, name, data, sidecar)
    queue = TrainingQueue(paths.base, settle_seconds=0)
    claimed = []
    for _ in range(len(files) + 2):
        job = queue.claim_next()
        if job is None:
            break
        claimed.append(job)
        queue.fail(job, "fuzz: done", retryable=False)
    names, seen = accounted(paths, queue)
    assert names <= seen, f"files neither jobs nor listed problems: {names - seen}"
    assert (root / "outside.jsonl").stat().st_mtime_ns == outside_before.st_mtime_ns
    assert (root / "outside.jsonl").read_text() == '{"text": "not yours"}\n'
    assert not os.path.exists("/etc/passwd.job.json")


@pytest.mark.slow
def test_a_live_daemon_survives_random_files_and_changes_nothing_outside(tmp_path):
    import random

    rng = random.Random(12)
    paths = make_realm(tmp_path / "r", {"training": {"max_steps": 2, "micro_batch_size": 2},
                                        "data": {"max_length": 32}})
    (paths.base / "config.json").write_text(json.dumps(FAST_DAEMON))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.jsonl").write_text('{"text": "mine"}\n')
    before = tree(outside)
    daemon = start_daemon(paths.base, "--poll", "0.2")
    try:
        hostile = [
            (b"deep.jsonl", b'{"text": "a"}\n', _deep(100_000)),
            (b"forged.jsonl", b'{"text": "a"}\n', json.dumps(
                {"id": "forged", "dataset_path": str(outside / "victim.jsonl"),
                 "dataset_name": "victim.jsonl"}).encode()),
            (b"\xff\xfe.jsonl", b'{"text": "a"}\n', None),
            (b"n" * 240 + b".jsonl", b'{"text": "a"}\n', None),
            (b"nan.jsonl", b'{"text": "a"}\n', b'{"overrides": {"training": {"seed": 1e400}}}'),
            (b"bytes.jsonl", bytes(rng.randrange(256) for _ in range(300)), None),
            (b"nested-line.jsonl", b'{"text": ' + b"[" * 50_000 + b"]" * 50_000 + b"}\n", None),
        ]
        for i, (name, data, sidecar) in enumerate(hostile):
            drop_raw(paths, PRIORITIES[i % 3], name, data, sidecar)
        os.mkfifo(paths.state_dir("high") / "fifo.jsonl.job.json")
        (paths.state_dir("high") / "fifo.jsonl").write_text('{"text": "a"}\n')
        queue = TrainingQueue(paths.base)

        def settled():
            assert daemon.poll() is None, daemon.communicate()[1][-3000:]
            names, seen = accounted(paths, queue)
            busy = any(os.scandir(paths.state_dir("processing")))
            waiting = [r for r in build_list(queue)["jobs"] if r["status"] == "waiting"]
            # a failed record is final once its sidecar is rewritten (the pair moves first, then
            # the record is rewritten under the queue lock; readers take no lock)
            final = all(j.last_error for j in queue.jobs_in("failed"))
            return names <= seen and not busy and not queue.queued() and not waiting and final

        wait_for(settled, timeout=240, what="every hostile file accounted for")
        assert daemon.poll() is None, "the daemon exited"
        failed = {j.dataset_name: j.last_error for j in queue.jobs_in("failed")}
        assert set(failed) >= {"bytes.jsonl", "nested-line.jsonl"}, failed
        assert all(why and "gave up" not in why for why in failed.values()), failed  # permanent, at once
        status = realm_cmd(paths.base, "queue", "status", "--json")
        assert status.returncode == 0, status.stderr
        problems = {p["path"] for p in json.loads(status.stdout)["problems"]}
        assert {"queue/normal/forged.jsonl.job.json", "queue/high/deep.jsonl.job.json",
                "queue/high/fifo.jsonl.job.json"} <= problems, problems
    finally:
        daemon.send_signal(signal.SIGTERM)
        out, err = daemon.communicate(timeout=60)
    assert daemon.returncode == 0, err[-3000:]
    assert tree(outside) == before
