"""The queue on real files in tmp_path: order, ignore rules, sidecars, collisions, moves."""

from __future__ import annotations

import json
import os
import time

import pytest

from core.errors import IllegalTransition, UsageError
from core.fsutil import rename_noreplace
from core.job import JobState
from core.training_queue import TrainingQueue
from tests.conftest import drop, tree, write_dataset


def drain(queue: TrainingQueue) -> list:
    claimed = []
    while (job := queue.claim_next()) is not None:
        claimed.append(job)
    return claimed


def test_priorities_come_out_high_normal_low(realm, queue):
    drop(realm, "low", "c.jsonl")
    drop(realm, "normal", "b.jsonl")
    drop(realm, "high", "a_high.jsonl")
    drop(realm, "low", "a_low.jsonl")
    order = [(j.priority, j.dataset_name) for j in drain(queue)]
    assert order == [("high", "a_high.jsonl"), ("normal", "b.jsonl"),
                     ("low", "a_low.jsonl"), ("low", "c.jsonl")]


def test_within_a_tier_first_discovered_first_not_by_name(realm, queue):
    drop(realm, "normal", "zzz.jsonl")
    assert [j.dataset_name for j in queue.adopt_new()] == ["zzz.jsonl"]
    time.sleep(0.01)
    drop(realm, "normal", "aaa.jsonl")
    drop(realm, "normal", "mmm.jsonl")
    queue.adopt_new()  # found in one scan: same discovery stamp, so ties go by name
    assert [j.dataset_name for j in drain(queue)] == ["zzz.jsonl", "aaa.jsonl", "mmm.jsonl"]


def test_claim_moves_pair_and_records_worker_and_ledger(realm, queue):
    drop(realm, "high", "a.jsonl", n=5)
    job = queue.claim_next()
    assert job.status is JobState.PROCESSING and job.dataset_path == "queue/processing/a.jsonl"
    assert (realm.base / job.dataset_path).is_file()
    sidecar = json.loads((realm.state_dir("processing") / "a.jsonl.job.json").read_text())
    assert sidecar["status"] == "processing" and sidecar["num_examples"] == 5
    assert sidecar["worker"]["pid"] == os.getpid()
    assert not list(realm.state_dir("high").glob("a.jsonl*"))
    ledger = [json.loads(l) for l in realm.ledger.read_text().splitlines()]
    assert [(e["from"], e["to"]) for e in ledger] == [(None, "queued"), ("queued", "processing")]


def test_ignored_names_and_symlinks_are_never_claimed(realm, queue, tmp_path):
    drop(realm, "normal", "x.jsonl.part")
    drop(realm, "normal", ".hidden.jsonl")
    drop(realm, "normal", "y.jsonl.tmp")
    target = write_dataset(tmp_path / "outside.jsonl")
    (realm.state_dir("high") / "link.jsonl").symlink_to(target)
    assert drain(queue) == []
    assert (realm.state_dir("high") / "link.jsonl").is_symlink(), "refused, not moved or deleted"
    from cli.status import build_status

    problems = build_status(queue)["problems"]
    assert [p["path"] for p in problems] == ["queue/high/link.jsonl"]
    assert "symlink refused" in problems[0]["problem"]
    assert "copy the file in" in problems[0]["problem"]


@pytest.mark.parametrize("content,match", [
    ('{"id": "x", "oops"', r"a\.jsonl\.job\.json:1:\d+: invalid JSON"),
    ('{"hero_idd": "tiny-qwen3"}', r"unknown field 'hero_idd' \(did you mean 'hero_id'\?\)"),
    ('{"overrides": [1, 2]}', r"field 'overrides' must be an object"),
    ('{"status": "completed"}', r"status are set by realm"),
])
def test_malformed_sidecar_is_reported_and_dataset_untouched(realm, queue, content, match):
    data = drop(realm, "normal", "a.jsonl")
    sidecar = realm.state_dir("normal") / "a.jsonl.job.json"
    sidecar.write_text(content)
    before = tree(realm.queue)
    assert drain(queue) == []
    after = tree(realm.queue)
    assert {k: v for k, v in after.items() if k != ".queue.lock"} == before
    assert data.exists() and sidecar.read_text() == content
    from cli.status import build_status

    problems = build_status(queue)["problems"]
    assert len(problems) == 1 and problems[0]["path"] == "queue/normal/a.jsonl.job.json"
    assert __import__("re").search(match, problems[0]["problem"])


def test_malformed_sidecar_does_not_block_other_jobs(realm, queue):
    drop(realm, "high", "bad.jsonl")
    (realm.state_dir("high") / "bad.jsonl.job.json").write_text("{nope")
    drop(realm, "low", "good.jsonl")
    assert [j.dataset_name for j in drain(queue)] == ["good.jsonl"]


def test_prewritten_sidecar_is_merged_on_adoption(realm, queue):
    (realm.state_dir("normal") / "a.jsonl.job.json").write_text(json.dumps(
        {"hero_id": "tiny-qwen3", "campaign_id": "c1", "overrides": {"training": {"epochs": 2}}}))
    drop(realm, "normal", "a.jsonl", n=4)
    job = queue.claim_next()
    assert (job.hero_id, job.campaign_id, job.overrides) == ("tiny-qwen3", "c1",
                                                             {"training": {"epochs": 2}})
    assert job.num_examples == 4 and "pre-written sidecar merged" in job.history[0]["reason"]


def test_same_name_again_after_completion_keeps_both(realm, queue):
    drop(realm, "normal", "data.jsonl", tag="first")
    first = queue.complete(queue.claim_next(), final_step=10, final_loss=1.5)
    drop(realm, "normal", "data.jsonl", tag="second")
    second = queue.complete(queue.claim_next(), final_step=20, final_loss=1.2)
    assert first.dataset_path == "queue/completed/data.jsonl"
    assert second.dataset_path == "queue/completed/data.2.jsonl"
    done = realm.state_dir("completed")
    assert "first" in (done / "data.jsonl").read_text()
    assert "second" in (done / "data.2.jsonl").read_text()
    assert json.loads((done / "data.jsonl.job.json").read_text())["id"] == first.id
    assert json.loads((done / "data.2.jsonl.job.json").read_text())["final_loss"] == 1.2


def test_queue_add_collision_in_inbox_gets_suffix(realm, queue, tmp_path):
    src = write_dataset(tmp_path / "d.jsonl")
    a = queue.add(src)
    b = queue.add(src)
    assert (a.dataset_path, b.dataset_path) == ("queue/normal/d.jsonl", "queue/normal/d.2.jsonl")
    assert a.dataset_sha256 == b.dataset_sha256 and a.id != b.id
    assert not [p for p in realm.state_dir("normal").iterdir() if p.name.startswith(".")]


def test_queue_add_refuses_bad_sources(queue, tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        queue.add(tmp_path / "missing.jsonl")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(UsageError, match="must be visible .jsonl files"):
        queue.add(tmp_path / "d.csv")


def test_requeue_keeps_priority_and_resume_point(realm, queue):
    drop(realm, "low", "a.jsonl")
    drop(realm, "low", "b.jsonl")
    job = queue.claim_next()
    back = queue.requeue(job, "warm stop", resume={"checkpoint": "step-40", "step": 40})
    assert back.dataset_path == "queue/low/a.jsonl" and back.priority == "low"
    again = queue.claim_next()
    assert again.id == job.id, "a requeued job was discovered first, so it goes first"
    assert again.resume == {"checkpoint": "step-40", "step": 40}


def test_retryable_failures_requeue_until_max_attempts(realm, queue):
    drop(realm, "high", "a.jsonl")
    job = queue.fail(queue.claim_next(), "child crashed (SIGKILL)", retryable=True, max_attempts=2)
    assert job.status is JobState.QUEUED and job.attempts == 1
    job = queue.fail(queue.claim_next(), "child crashed again", retryable=True, max_attempts=2)
    assert job.status is JobState.FAILED and job.attempts == 2
    assert job.last_error == "gave up after 2 attempts: child crashed again"
    assert "gave up after 2 attempts" in job.history[-1]["reason"]


def test_deterministic_failure_goes_straight_to_failed(realm, queue):
    drop(realm, "high", "a.jsonl")
    job = queue.fail(queue.claim_next(), "bad data at a.jsonl:3")
    assert job.status is JobState.FAILED and job.attempts == 0
    assert (realm.state_dir("failed") / "a.jsonl").is_file()


def test_illegal_move_changes_nothing_on_disk(realm, queue):
    drop(realm, "normal", "a.jsonl")
    job = queue.adopt_new()[0]
    before = tree(realm.queue)
    with pytest.raises(IllegalTransition):
        queue.complete(job)
    assert tree(realm.queue) == before


def test_cancel_refuses_a_running_job(realm, queue):
    """The queue moves queued jobs only; a running one is cancelled through its daemon (a
    cancel request, tests/integration/test_provenance_and_cancel.py)."""
    drop(realm, "normal", "a.jsonl")
    job = queue.claim_next()
    with pytest.raises(UsageError, match="asks its daemon to stop it at the next step boundary"):
        queue.cancel(job)


def test_crash_between_the_two_renames_is_repaired(realm, queue):
    drop(realm, "normal", "a.jsonl")
    job = queue.adopt_new()[0]
    # Simulate a claimer killed after moving the sidecar and before moving the dataset.
    rename_noreplace(realm.state_dir("normal") / "a.jsonl.job.json",
                     realm.state_dir("processing") / "a.jsonl.job.json")
    drop(realm, "low", "trigger.jsonl")
    assert [j.dataset_name for j in queue.adopt_new()] == ["trigger.jsonl"]  # lock -> repair
    # the claim never finished (its record still says queued): undone, the pair is back
    assert (realm.state_dir("normal") / "a.jsonl").is_file()
    assert (realm.state_dir("normal") / "a.jsonl.job.json").is_file()
    assert list(realm.state_dir("processing").iterdir()) == []
    assert [j.id for j in queue.jobs_in("normal")] == [job.id]
    claimed = drain(queue)
    assert [j.dataset_name for j in claimed] == ["a.jsonl", "trigger.jsonl"]
    assert claimed[0].id == job.id, "the half-moved dataset was adopted a second time"


def test_deferred_jobs_are_claimed_only_when_nothing_else_is_queued(realm, queue):
    drop(realm, "high", "busy.jsonl")
    drop(realm, "low", "free.jsonl")
    busy = lambda job: job.dataset_name == "busy.jsonl"  # noqa: E731
    assert queue.claim_next(defer=busy).dataset_name == "free.jsonl"  # passed over high
    assert queue.claim_next(defer=busy).dataset_name == "busy.jsonl"  # nothing else left
    assert queue.claim_next(defer=busy) is None


def test_skip_sets_a_queued_job_aside_and_retry_brings_it_back(realm, queue):
    """``skipped`` has a real path: a person defers a queued job (``realm queue skip``); it is
    never claimed while skipped, keeps its record, and ``queue retry`` queues it again. A job
    that is running is refused with the fix, like cancel."""
    import subprocess
    import sys

    drop(realm, "high", "later.jsonl")
    drop(realm, "normal", "now.jsonl")
    queue.adopt_new()
    out = subprocess.run([sys.executable, "-m", "cli", "--base-dir", str(realm.base), "queue",
                          "skip", "later.jsonl", "--reason", "train after the eval"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "skipped, now queue/skipped/later.jsonl" in out.stdout, \
        out.stderr
    skipped = queue.find("later.jsonl")
    assert skipped.status is JobState.SKIPPED
    assert skipped.history[-1]["reason"] == "train after the eval"
    claimed = queue.claim_next()
    assert claimed.dataset_name == "now.jsonl" and queue.claim_next() is None
    with pytest.raises(UsageError, match="`queue skip` moves queued jobs only"):
        queue.skip(claimed)
    again = queue.retry(skipped)
    assert again.status is JobState.QUEUED and again.dataset_path == "queue/high/later.jsonl"
    assert queue.claim_next().id == skipped.id


@pytest.mark.parametrize("stale_first", [True, False])
def test_find_meets_a_job_twice_mid_move_and_names_it_once(realm, queue, monkeypatch,
                                                            stale_first):
    """A scan lists folders one after another: a daemon claiming a job between two listings
    makes it appear in both. find() returns the copy whose sidecar is where it was read (a
    dashboard polling `queue show` answered 404 'matches 2 jobs' here)."""
    drop(realm, "normal", "a.jsonl")
    stale = queue.adopt_new()[0]
    claimed = queue.claim_next()
    copies = [stale, claimed] if stale_first else [claimed, stale]
    monkeypatch.setattr(queue, "all_jobs", lambda problems=None: iter(copies))
    found = queue.find(claimed.id)
    assert found.status is JobState.PROCESSING and found.dataset_path == claimed.dataset_path
    assert queue.find("a").id == claimed.id


def test_a_record_read_mid_move_is_read_again_until_the_move_has_written_it(realm, queue,
                                                                            monkeypatch):
    """Between a move's rename and its rewrite, queue/completed/ holds the record as it was in
    processing: a reader then saw a completed job with no steps or loss (the dashboard did)."""
    import core.training_queue as tq

    drop(realm, "normal", "a.jsonl")
    queue.adopt_new()
    claimed = queue.claim_next()
    processing = (realm.base / (claimed.dataset_path + ".job.json")).read_bytes()
    done = queue.complete(claimed, final_step=3, final_loss=1.5)
    sidecar = realm.base / (done.dataset_path + ".job.json")
    written = sidecar.read_bytes()
    sidecar.write_bytes(processing)  # the moment after the rename, before the rewrite
    pauses = []

    def the_mover_finishes(seconds):
        pauses.append(seconds)
        if len(pauses) == 2:
            tmp = sidecar.with_suffix(".tmp")
            tmp.write_bytes(written)
            os.replace(tmp, sidecar)

    monkeypatch.setattr(tq.time, "sleep", the_mover_finishes)
    (job,) = TrainingQueue(realm.base).jobs_in("completed")
    assert (job.status, job.final_step, job.final_loss) == (JobState.COMPLETED, 3, 1.5)
    assert len(pauses) == 2


def test_a_new_record_on_an_old_records_inode_is_read_afresh(realm, queue):
    """A file system reuses freed inode numbers: the same dataset name queued again after the
    first job completed can get a sidecar whose (path, inode) equals the first one's, and a
    cache keyed by them alone handed back the first job (claim_next then found nothing; seen
    once in CI). Here the same inode is kept by rewriting a sealed record in place."""
    drop(realm, "normal", "a.jsonl")
    drop(realm, "normal", "b.jsonl")
    first, other = queue.adopt_new()
    assert sorted(j.id for j in queue.jobs_in("normal")) == sorted([first.id, other.id])
    sidecar = realm.state_dir("normal") / "a.jsonl.job.json"
    inode = sidecar.stat().st_ino
    replacement = (realm.state_dir("normal") / "b.jsonl.job.json").read_bytes()
    with open(sidecar, "r+b") as fh:  # same inode, another sealed record
        fh.write(replacement)
        fh.truncate()
    os.utime(sidecar, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    assert sidecar.stat().st_ino == inode
    ids = [j.id for j in queue.jobs_in("normal")]
    assert ids == [other.id, other.id], "the rewritten record is parsed again, not the cached one"
    assert first.id not in ids
