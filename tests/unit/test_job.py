"""The Job record, its transition table and sidecar validation."""

from __future__ import annotations

import itertools
import json

import pytest

from core.errors import IllegalTransition, SidecarError
from core.job import ALLOWED, TERMINAL, Job, JobState, check_user_sidecar, transition

EXPECTED_ALLOWED = {
    ("queued", "processing"), ("queued", "skipped"), ("queued", "cancelled"), ("queued", "failed"),
    ("processing", "completed"), ("processing", "failed"), ("processing", "skipped"),
    ("processing", "queued"), ("processing", "cancelled"),
    ("failed", "queued"), ("skipped", "queued"), ("cancelled", "queued"),
}
ALL_PAIRS = list(itertools.product([s.value for s in JobState], repeat=2))


def make_job(status: str = "queued") -> Job:
    job = Job(id="20261124-000000-data-abcd", dataset_path="queue/normal/data.jsonl",
              dataset_name="data.jsonl")
    job.status = JobState(status)
    return job


def test_table_is_exactly_the_documented_one():
    table = {(a.value, b.value) for a, targets in ALLOWED.items() for b in targets}
    assert table == EXPECTED_ALLOWED


@pytest.mark.parametrize("src,dst", sorted(EXPECTED_ALLOWED))
def test_every_allowed_transition(src, dst):
    job = make_job(src)
    entry = transition(job, JobState(dst), reason=f"testing {src}->{dst}", now="2026-01-01T00:00:00+00:00")
    assert job.status is JobState(dst)
    assert job.history[-1] == entry == {"from": src, "to": dst,
                                        "at": "2026-01-01T00:00:00+00:00",
                                        "reason": f"testing {src}->{dst}"}


@pytest.mark.parametrize("src,dst", sorted(set(ALL_PAIRS) - EXPECTED_ALLOWED))
def test_every_forbidden_transition_raises_and_changes_nothing(src, dst):
    job = make_job(src)
    before = job.to_dict()
    with pytest.raises(IllegalTransition, match=f"cannot move from {src} to {dst}"):
        transition(job, JobState(dst), reason="should not happen")
    assert job.to_dict() == before


def test_completed_is_terminal_and_says_so():
    with pytest.raises(IllegalTransition, match=r"none \(terminal\)"):
        transition(make_job("completed"), JobState.QUEUED, reason="x")


def test_timestamps_follow_the_state():
    job = make_job()
    transition(job, JobState.PROCESSING, reason="claim", now="t1")
    assert (job.started_at, job.finished_at) == ("t1", None)
    transition(job, JobState.FAILED, reason="boom", now="t2")
    assert job.finished_at == "t2" and JobState.FAILED in TERMINAL
    transition(job, JobState.QUEUED, reason="retry", now="t3")
    transition(job, JobState.PROCESSING, reason="claim again", now="t4")
    assert (job.started_at, job.finished_at) == ("t4", None)
    assert [h["to"] for h in job.history] == ["processing", "failed", "queued", "processing"]


def test_requeue_clears_the_lease_but_keeps_priority_and_resume():
    job = make_job()
    job.priority = "high"
    transition(job, JobState.PROCESSING, reason="claim")
    job.worker, job.heartbeat_at, job.resume = {"host": "h", "pid": 1}, "t", {"step": 40}
    transition(job, JobState.QUEUED, reason="warm stop")
    assert (job.worker, job.heartbeat_at) == (None, None)
    assert job.priority == "high" and job.resume == {"step": 40}


def test_round_trip_through_json():
    job = make_job()
    job.overrides = {"training": {"learning_rate": 1e-4}}
    transition(job, JobState.PROCESSING, reason="claim")
    data = json.loads(json.dumps(job.to_dict()))
    assert data["schema"] == 1 and data["status"] == "processing"
    assert Job.from_dict(data) == job


def test_unknown_field_is_named_with_a_suggestion():
    data = make_job().to_dict() | {"hero": "tiny-qwen3"}
    with pytest.raises(SidecarError, match=r"x\.job\.json: unknown field 'hero' \(did you mean 'hero_id'\?\)"):
        Job.from_dict(data, source="x.job.json")


def test_all_problems_are_reported_together():
    data = make_job().to_dict() | {"attempts": "two", "num_bytes": 1.5, "colour": "red"}
    with pytest.raises(SidecarError) as info:
        Job.from_dict(data, source="s")
    message = str(info.value)
    assert "field 'attempts' must be an integer, got 'two'" in message
    assert "field 'num_bytes' must be an integer, got 1.5" in message
    assert "unknown field 'colour'" in message


@pytest.mark.parametrize("field,value,match", [
    ("status", "running", "field 'status' must be a job state"),
    ("priority", "urgent", "field 'priority' must be high, normal or low"),
    ("overrides", [1], "field 'overrides' must be an object"),
    ("attempts", True, "field 'attempts' must be an integer"),
    ("schema", 2, "this realm reads sidecar schema 1"),
])
def test_wrong_types_are_named(field, value, match):
    with pytest.raises(SidecarError, match=match):
        Job.from_dict(make_job().to_dict() | {field: value})


def test_sidecar_must_be_an_object_with_identity():
    with pytest.raises(SidecarError, match="must be a JSON object, got list"):
        Job.from_dict([1, 2])
    with pytest.raises(SidecarError, match="missing field"):
        Job.from_dict({"id": "x"})


def test_user_sidecar_allows_only_user_fields():
    assert check_user_sidecar({"hero_id": "tiny-qwen3", "overrides": {"a": 1}}, "s") == {
        "hero_id": "tiny-qwen3", "overrides": {"a": 1}}
    with pytest.raises(SidecarError, match="status are set by realm"):
        check_user_sidecar({"status": "completed"}, "s")
