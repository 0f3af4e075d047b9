"""Hostile, broken and vanishing files in the queue, on real files in tmp_path.

Each class: a file that would escape the realm, train other bytes than the recorded ones, or
stop the queue. The rule every test checks: the bad file becomes a listed problem or a visible
job state, nothing outside the realm changes, and the good jobs beside it are still claimed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from core.job import JobState
from core.paths import layout_problems
from cli.status import build_list, build_status
from core.sidecar import SEAL_FIELD
from core.training_queue import TrainingQueue
from tests.conftest import drop, tree, write_dataset


def drain(queue: TrainingQueue) -> list:
    claimed = []
    while (job := queue.claim_next()) is not None:
        claimed.append(job)
    return claimed


def problems_of(queue: TrainingQueue) -> dict[str, str]:
    return {p["path"]: p["problem"] for p in build_status(queue)["problems"]}


def sealed_record(realm, queue, name="real.jsonl") -> dict:
    drop(realm, "normal", name)
    job = queue.adopt_new()[0]
    return json.loads((realm.base / (job.dataset_path + ".job.json")).read_text())


# --- escape -------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["absolute", "relative", "other-realm-folder"])
@pytest.mark.parametrize("folder", ["normal", "processing", "failed"])
def test_forged_sidecar_never_moves_a_file_outside_the_queue(realm, queue, tmp_path, where,
                                                             folder):
    (tmp_path / "secret").mkdir()
    outside = write_dataset(tmp_path / "secret" / "victim.jsonl", 2)
    (realm.base / "campaigns" / "x.jsonl").write_text("inside the realm, outside the queue\n")
    target = {"absolute": str(outside), "relative": "../secret/victim.jsonl",
              "other-realm-folder": "campaigns/x.jsonl"}[where]
    forged = {"id": "20260101-000000-evil-0000", "dataset_path": target,
              "dataset_name": "evil.jsonl", "status": "queued", "dataset_sha256": "0" * 64}
    (realm.state_dir(folder) / "evil.jsonl.job.json").write_text(json.dumps(forged))
    drop(realm, "low", "good.jsonl")
    before_outside, before_realm_files = tree(outside.parent), tree(realm.base / "campaigns")
    claimed = drain(queue)
    queue.repair_half_moves()
    assert [j.dataset_name for j in claimed] == ["good.jsonl"]
    assert tree(outside.parent) == before_outside
    assert tree(realm.base / "campaigns") == before_realm_files
    assert not (realm.state_dir(folder) / "evil.jsonl").exists()
    problem = problems_of(queue)[f"queue/{folder}/evil.jsonl.job.json"]
    assert "realm did not write it" in problem and "seal" in problem


def test_a_sealed_record_edited_by_hand_loses_its_trust(realm, queue):
    record = sealed_record(realm, queue)
    sidecar = realm.state_dir("normal") / "real.jsonl.job.json"
    record["dataset_sha256"] = "f" * 64  # the hash of some other job's bytes
    sidecar.write_text(json.dumps(record))
    assert drain(queue) == []
    assert "realm did not write it" in problems_of(queue)["queue/normal/real.jsonl.job.json"]
    # the same record with its seal removed is refused the same way
    del record[SEAL_FIELD]
    sidecar.write_text(json.dumps(record))
    assert drain(queue) == []
    assert (realm.state_dir("normal") / "real.jsonl").is_file()


def test_realm_written_records_are_sealed_with_a_private_key(realm, queue):
    record = sealed_record(realm, queue)
    assert len(record[SEAL_FIELD]) == 64
    key = realm.status / ".sidecar-key"
    assert key.stat().st_mode & 0o077 == 0, "the key must be readable by its owner only"
    # another process on the same realm (the daemon's child, `queue status`) trusts it
    assert [j.dataset_name for j in drain(TrainingQueue(realm.base, settle_seconds=0))] == \
        ["real.jsonl"]


@pytest.mark.parametrize("folder", ["high", "processing"])
def test_a_symlinked_queue_folder_is_a_layout_problem(realm, tmp_path, folder):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.rmtree(realm.state_dir(folder))
    realm.state_dir(folder).symlink_to(outside)
    problems = layout_problems(realm)
    assert len(problems) == 1 and f"queue/{folder} is a symlink" in problems[0]
    assert f"queue/{folder} is a symlink" in problems_of(TrainingQueue(realm.base))[
        f"queue/{folder}"]


def test_an_inbox_on_another_file_system_is_a_layout_problem(realm, monkeypatch):
    """A real tmpfs mounted on the inbox where this process may mount (root); elsewhere the
    mount point is stood in for by a stat that reports another device for that folder."""
    inbox = realm.state_dir("low")
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(inbox)],
        capture_output=True).returncode == 0
    if not mounted:
        real_stat = os.stat

        def other_device(path, *args, **kwargs):
            st = real_stat(path, *args, **kwargs)
            if Path(path) == inbox:
                return os.stat_result((*st[:2], st.st_dev + 1, *st[3:]))
            return st

        monkeypatch.setattr("core.paths.os.stat", other_device)
    try:
        problems = layout_problems(realm)
        assert len(problems) == 1 and "queue/low is on another file system" in problems[0]
    finally:
        if mounted:
            subprocess.run(["umount", str(inbox)], check=True)


# --- names and special files ----------------------------------------------------------------

BAD_NAMES = {
    "not-utf8": b"caf\xe9-\xff.jsonl",
    "too-long": b"x" * 236 + b".jsonl",
    "control-char": b"line\nbreak.jsonl",
}


@pytest.mark.parametrize("kind", sorted(BAD_NAMES))
def test_unrepresentable_names_are_listed_and_never_stop_the_queue(realm, queue, kind):
    raw = BAD_NAMES[kind]
    path = os.path.join(os.fsencode(realm.state_dir("normal")), raw)
    with open(path, "wb") as fh:
        fh.write(b'{"text": "x"}\n')
    drop(realm, "normal", "good.jsonl")
    assert [j.dataset_name for j in drain(queue)] == ["good.jsonl"]
    assert os.path.exists(path), "the file is left where it was dropped"
    status = build_status(queue)
    json.dumps(status, ensure_ascii=False).encode("utf-8")  # printable and storable
    [problem] = [p for p in status["problems"] if "good" not in p["path"]]
    assert "rename it" in problem["problem"].lower()
    build_list(queue, "all")


def test_a_name_with_room_for_a_sidecar_is_adopted(realm, queue):
    name = "y" * 190 + ".jsonl"  # 196 bytes: under the 200-byte limit
    drop(realm, "normal", name)
    assert [j.dataset_name for j in drain(queue)] == [name]


def _claim_in_thread(queue, timeout=10.0) -> list:
    out: list = []
    t = threading.Thread(target=lambda: out.append(drain(queue)), daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "claim_next hung"
    return out[0]


@pytest.mark.parametrize("kind", ["fifo", "directory", "symlink", "deep", "huge", "long-id"])
def test_a_sidecar_that_is_not_a_small_json_object_blocks_only_its_dataset(realm, queue, tmp_path,
                                                                           kind):
    drop(realm, "normal", "x.jsonl")
    sidecar = realm.state_dir("normal") / "x.jsonl.job.json"
    if kind == "fifo":
        os.mkfifo(sidecar)
    elif kind == "directory":
        sidecar.mkdir()
    elif kind == "symlink":
        (tmp_path / "target.json").write_text('{"hero_id": "tiny-qwen3"}')
        sidecar.symlink_to(tmp_path / "target.json")
    elif kind == "deep":
        sidecar.write_text("[" * 100_000 + "]" * 100_000)
    elif kind == "huge":
        sidecar.write_text(json.dumps({"metadata": {"blob": "z" * (2 << 20)}}))
    else:
        sidecar.write_text(json.dumps({"campaign_id": "c" * 300}))
    drop(realm, "low", "good.jsonl")
    assert [j.dataset_name for j in _claim_in_thread(queue)] == ["good.jsonl"]
    assert (realm.state_dir("normal") / "x.jsonl").is_file()
    problem = problems_of(queue)["queue/normal/x.jsonl.job.json"]
    expected = {"fifo": "a FIFO", "directory": "a directory", "symlink": "symlink",
                "deep": "nested", "huge": "over the limit", "long-id": "at most 64"}[kind]
    assert expected in problem
    assert ("queue/normal/x.jsonl", "blocked") in [
        (r["path"], r["status"]) for r in build_list(queue)["jobs"]]


def test_a_fifo_dataset_is_never_opened(realm, queue):
    os.mkfifo(realm.state_dir("high") / "pipe.jsonl")
    drop(realm, "low", "good.jsonl")
    assert [j.dataset_name for j in _claim_in_thread(queue)] == ["good.jsonl"]
    assert "not a .jsonl dataset" in problems_of(queue)["queue/high/pipe.jsonl"]


def test_queue_status_and_plan_survive_a_deep_sidecar(realm):
    drop(realm, "normal", "x.jsonl")
    (realm.state_dir("normal") / "x.jsonl.job.json").write_text("{\"a\":" * 100_000)
    for cmd in (["queue", "status", "--json"], ["queue", "list", "--state", "all"],
                ["daemon", "--plan"]):
        out = subprocess.run([sys.executable, "-m", "cli", "--base-dir", str(realm.base),
                              *cmd], capture_output=True, text=True, timeout=60)
        assert "RecursionError" not in out.stderr and "Traceback" not in out.stderr, out.stderr
        assert "nested" in out.stdout + out.stderr, (cmd, out.stdout, out.stderr)


def test_a_blocked_sidecar_fixed_in_place_is_adopted_without_a_restart(realm, queue):
    drop(realm, "normal", "x.jsonl")
    sidecar = realm.state_dir("normal") / "x.jsonl.job.json"
    sidecar.write_text('{"hero_idd": "tiny-qwen3"}')
    assert drain(queue) == []
    with open(sidecar, "r+") as fh:  # same inode: an editor saving in place
        fh.seek(0)
        fh.write('{"hero_id":  "tiny-qwen3"}')
        fh.truncate()
    assert [(j.dataset_name, j.hero_id) for j in drain(queue)] == [("x.jsonl", "tiny-qwen3")]


# --- the bytes trained are the bytes recorded ----------------------------------------------

@pytest.mark.parametrize("change", ["appended", "replaced-same-size"])
def test_a_dataset_changed_after_adoption_is_hashed_again_before_it_is_claimed(realm, queue,
                                                                             change):
    path = drop(realm, "normal", "x.jsonl", n=3)
    job = queue.adopt_new()[0]
    if change == "appended":
        with open(path, "a") as fh:
            fh.write('{"text": "one more"}\n')
    else:
        path.write_text(path.read_text().replace("example", "EXAMPLE"))
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    slow = TrainingQueue(realm.base, settle_seconds=3600)  # the file never settles again
    assert drain(slow) == [], "claimed under the hash of other bytes"
    [claimed] = drain(queue)
    assert claimed.id == job.id
    assert claimed.dataset_sha256 != job.dataset_sha256
    import hashlib

    assert claimed.dataset_sha256 == hashlib.sha256(
        (realm.base / claimed.dataset_path).read_bytes()).hexdigest()
    assert claimed.num_examples == (4 if change == "appended" else 3)
    assert "re-adopted" in claimed.history[-2]["reason"]


# --- faults in the middle of a job ----------------------------------------------------------

def test_a_dataset_deleted_while_processing_ends_visible_with_its_reason(realm, queue):
    drop(realm, "normal", "x.jsonl")
    job = queue.claim_next()
    (realm.base / job.dataset_path).unlink()
    assert [j.id for j in queue.jobs_in("processing")] == [job.id], "record became invisible"
    moved = queue.fail(job, "crashed: FileNotFoundError", retryable=True)
    assert moved.status is JobState.FAILED and "vanished" in moved.last_error
    rows = {r["id"]: r for r in build_list(queue, "all")["jobs"]}
    assert rows[job.id]["status"] == "failed"
    assert build_status(queue)["counts"]["failed"] == 1


def test_a_queued_dataset_deleted_leaves_a_failed_record(realm, queue):
    path = drop(realm, "normal", "x.jsonl")
    job = queue.adopt_new()[0]
    path.unlink()
    drop(realm, "low", "good.jsonl")
    assert [j.dataset_name for j in drain(queue)] == ["good.jsonl"]
    [failed] = queue.jobs_in("failed")
    assert failed.id == job.id and "vanished while it was queued" in failed.last_error


def test_garbage_written_into_a_processing_sidecar_is_restored_by_its_owner(realm, queue):
    drop(realm, "normal", "x.jsonl")
    job = queue.claim_next()
    sidecar = realm.base / (job.dataset_path + ".job.json")
    sidecar.write_text("{garbage")
    assert "Do not delete it" in problems_of(queue)["queue/processing/x.jsonl.job.json"]
    renewed = queue.rewrite(job, lambda j: setattr(j, "heartbeat_at", "now"))
    assert renewed.id == job.id and json.loads(sidecar.read_text())["heartbeat_at"] == "now"
    assert queue.complete(renewed, final_step=3).status is JobState.COMPLETED


def test_a_removed_processing_folder_is_made_again_at_the_next_claim(realm, queue):
    drop(realm, "normal", "x.jsonl")
    shutil.rmtree(realm.state_dir("processing"))
    [job] = drain(queue)
    assert job.dataset_path == "queue/processing/x.jsonl"
    assert (realm.base / job.dataset_path).is_file()


def test_a_claim_cut_between_its_renames_returns_to_its_inbox(realm, queue):
    from core.fsutil import rename_noreplace

    drop(realm, "high", "x.jsonl")
    job = queue.adopt_new()[0]
    rename_noreplace(realm.state_dir("high") / "x.jsonl.job.json",
                     realm.state_dir("processing") / "x.jsonl.job.json")
    [claimed] = drain(queue)  # repaired, then claimed normally: cancel and retry work again
    assert claimed.id == job.id and claimed.status is JobState.PROCESSING
    assert queue.complete(claimed).status is JobState.COMPLETED


def test_retrying_a_job_whose_dataset_vanished_says_to_add_it_again(realm, queue):
    from core.errors import UsageError

    path = drop(realm, "normal", "x.jsonl")
    queue.adopt_new()
    path.unlink()
    assert drain(queue) == []
    [failed] = queue.jobs_in("failed")
    with pytest.raises(UsageError, match="realm queue add FILE"):
        queue.retry(failed)
    assert queue.jobs_in("failed")[0].id == failed.id
