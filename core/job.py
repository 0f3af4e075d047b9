"""The Job record, its states, and the one function allowed to change a job's state.

A job is one dataset file plus its sidecar ``<file>.job.json``, which holds this record. The state
of a job is where its files are (``queue/<priority>/``, ``queue/processing/``...); ``status`` in
the record mirrors it. ``transition()`` is the only writer of ``status``: it checks the move
against ``ALLOWED``, stamps the timestamps and appends to ``history``.
"""

from __future__ import annotations

import dataclasses
import re
import secrets
import typing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from typing import Any, Optional

from core.errors import IllegalTransition, SidecarError, UsageError
from core.paths import check_name
from core.validate import did_you_mean

SCHEMA_VERSION = 1


class JobState(str, Enum):
    QUEUED = "queued"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


# The only table of legal moves. processing -> queued is a warm stop or crash recovery and keeps
# priority and resume point; failed/skipped/cancelled -> queued is `realm queue retry`;
# queued -> failed is a queued record whose dataset vanished (it can never train).
ALLOWED: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.PROCESSING, JobState.SKIPPED, JobState.CANCELLED,
                                JobState.FAILED}),
    JobState.PROCESSING: frozenset(
        {JobState.COMPLETED, JobState.FAILED, JobState.SKIPPED, JobState.QUEUED, JobState.CANCELLED}
    ),
    JobState.COMPLETED: frozenset(),
    JobState.FAILED: frozenset({JobState.QUEUED}),
    JobState.SKIPPED: frozenset({JobState.QUEUED}),
    JobState.CANCELLED: frozenset({JobState.QUEUED}),
}

TERMINAL = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.SKIPPED, JobState.CANCELLED})

# Fields a person may put in a sidecar written before the dataset is adopted.
USER_FIELDS = frozenset({"schema", "hero_id", "campaign_id", "overrides", "metadata"})


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def new_job_id(dataset_name: str, now: datetime | None = None) -> str:
    """``20261124-082501-mydata-3fa2``: sortable, readable, unique."""
    now = now or datetime.now(timezone.utc)
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", dataset_name.removesuffix(".jsonl")).strip("-")[:40]
    return f"{now:%Y%m%d-%H%M%S}-{stem or 'job'}-{secrets.token_hex(2)}"


@dataclass
class Job:
    """Everything realm knows about one job; serialised as the sidecar (schema 1)."""

    id: str
    dataset_path: str
    """Where the dataset was when this record was last written, relative to the realm."""
    dataset_name: str
    """The file name the dataset was dropped or added under."""
    priority: str = "normal"
    status: JobState = JobState.QUEUED
    dataset_sha256: Optional[str] = None
    num_bytes: Optional[int] = None
    dataset_mtime_ns: Optional[int] = None
    """The dataset's mtime when it was hashed: a change after adoption is noticed at claim."""
    num_examples: Optional[int] = None
    estimated_tokens: Optional[int] = None
    hero_id: Optional[str] = None
    campaign_id: Optional[str] = None
    overrides: dict = field(default_factory=dict)
    attempts: int = 0
    """Attempts that ended in a retryable failure (crash, OOM, timeout, dead owner)."""
    created_at: str = field(default_factory=utc_now)
    """When the job was discovered or added: the queue's first-come order within a tier."""
    started_at: Optional[str] = None
    finished_at: Optional[str] = None
    start_step: Optional[int] = None
    final_step: Optional[int] = None
    final_loss: Optional[float] = None
    final_val_loss: Optional[float] = None
    tokens_per_sec_avg: Optional[float] = None
    """Processed (non-pad input) tokens per second of step time."""
    trained_tokens_per_sec_avg: Optional[float] = None
    """Loss-bearing tokens per second of step time (None: recorded before realm counted them)."""
    last_error: Optional[str] = None
    config_hash: Optional[str] = None
    git_commit: Optional[str] = None
    resolved_config: Optional[dict] = None
    """The config the last attempt trained with, as its child reported it
    (``config.resolver.Resolved.record``: hero, campaign, config_hash, values, locked block and
    every key's layer and source). None until the job has trained (or in an older sidecar)."""
    worker: Optional[dict] = None
    heartbeat_at: Optional[str] = None
    resume: Optional[dict] = None
    held: Optional[str] = None
    """Why a person held this queued job (``realm queue hold``): it stays in its queue folder
    and is never claimed until ``realm queue release``; cleared when the job leaves the queue."""
    governor: Optional[dict] = None
    history: list = field(default_factory=list)
    metadata: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = {"schema": SCHEMA_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            data[f.name] = value.value if isinstance(value, JobState) else value
        return data

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "<sidecar>") -> "Job":
        """Build a Job from sidecar JSON; every problem is reported at once, naming the field.

        The ``seal`` realm adds to the records it writes is dropped here, unchecked: whether a
        record may be trusted is decided where realm acts on it (``core.sidecar.RealmKey``)."""
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k != "seal"}
        values = _validated(data, source)
        missing = [n for n in ("id", "dataset_path", "dataset_name") if n not in values]
        if missing:
            raise SidecarError(f"{source}: missing field(s) {', '.join(missing)}.")
        values["status"] = JobState(values.get("status", "queued"))
        return cls(**values)

    def summary(self) -> dict[str, Any]:
        """The few fields status displays print for a job."""
        return {
            "id": self.id,
            "dataset": self.dataset_name,
            "path": self.dataset_path,
            "priority": self.priority,
            "status": self.status.value,
            "attempts": self.attempts,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "last_error": self.last_error,
            "worker": self.worker,
            "held": self.held,
        }


def transition(job: Job, to: JobState, *, reason: str, now: str | None = None) -> dict:
    """Move ``job`` to state ``to``; the only writer of ``job.status``.

    Raises IllegalTransition for a move the table forbids. Returns the history entry appended.
    """
    to = JobState(to)
    if to not in ALLOWED[job.status]:
        allowed = ", ".join(sorted(s.value for s in ALLOWED[job.status])) or "none (terminal)"
        raise IllegalTransition(
            f"job {job.id}: cannot move from {job.status.value} to {to.value} "
            f"(allowed from {job.status.value}: {allowed})."
        )
    now = now or utc_now()
    entry = {"from": job.status.value, "to": to.value, "at": now, "reason": reason}
    job.history.append(entry)
    job.status = to
    if to is JobState.PROCESSING:
        job.started_at = now
        job.finished_at = None
    elif to in TERMINAL:
        job.finished_at = now
    elif to is JobState.QUEUED:
        job.worker = None
        job.heartbeat_at = None
    return entry


# --- sidecar validation -------------------------------------------------------------------

_JSON_TYPES = {str: "a string", int: "an integer", float: "a number", dict: "an object",
               list: "a list", bool: "true or false", JobState: "a job state"}


def _field_types() -> dict[str, tuple[type, bool]]:
    hints = typing.get_type_hints(Job)
    out = {}
    for name, hint in hints.items():
        args = typing.get_args(hint)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        out[name] = (typing.get_origin(base) or base, optional)
    return out


_FIELD_TYPES = _field_types()


def _type_ok(value: Any, expected: type) -> bool:
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is JobState:
        return value in {s.value for s in JobState}
    return isinstance(value, expected)


def _check_field(name: str, value: Any) -> str | None:
    if name == "schema":
        if value != SCHEMA_VERSION:
            return f"field 'schema' is {value!r}; this realm reads sidecar schema {SCHEMA_VERSION}"
        return None
    if name not in _FIELD_TYPES:
        return f"unknown field {name!r}{did_you_mean(name, list(_FIELD_TYPES))}"
    expected, optional = _FIELD_TYPES[name]
    if value is None and optional:
        return None
    if not _type_ok(value, expected):
        return f"field {name!r} must be {_JSON_TYPES.get(expected, expected.__name__)}, got {value!r}"
    if name == "priority" and value not in ("high", "normal", "low"):
        return f"field 'priority' must be high, normal or low, got {value!r}"
    return None


def _validated(data: Any, source: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise SidecarError(f"{source}: a sidecar must be a JSON object, got {type(data).__name__}.")
    problems = [p for p in (_check_field(k, v) for k, v in data.items()) if p]
    if problems:
        raise SidecarError(f"{source}: " + "; ".join(problems) + ". Fix or remove the sidecar.")
    return {k: v for k, v in data.items() if k != "schema"}


def check_user_sidecar(data: Any, source: str) -> dict[str, Any]:
    """Validate a sidecar a person wrote before adoption: only user fields are allowed."""
    values = _validated(data, source)
    system = sorted(set(values) - USER_FIELDS)
    if system:
        raise SidecarError(
            f"{source}: field(s) {', '.join(system)} are set by realm, not by hand; a sidecar "
            f"written before adoption may hold only {', '.join(sorted(USER_FIELDS - {'schema'}))}."
        )
    for name in ("hero_id", "campaign_id"):
        if (problem := name_problem(name, values.get(name), f"field {name!r}")):
            raise SidecarError(f"{source}: {problem}")
    return values


def name_problem(field_name: str, value: Any, what: str | None = None) -> str | None:
    """Why a record's ``hero_id`` / ``campaign_id`` cannot become a path (None when it can):
    each part of a ``HERO/NAME`` campaign ref must be a safe name of at most 64 characters."""
    if value is None:
        return None
    parts = value.split("/", 1) if isinstance(value, str) and field_name == "campaign_id" \
        else [value]
    try:
        for part in parts:
            check_name(part, what or field_name)
    except UsageError as exc:
        return str(exc)
    return None
