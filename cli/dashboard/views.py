"""What the dashboard shows, as JSON: read-only views of a realm (no torch, no writes).

``/api/status`` and ``/api/queue`` are ``realm queue status --json`` and ``realm queue list
--json`` themselves (``cli.status``); the job and campaign views add what a page needs beside
them: a job's resolved config with each value's layer and source, its log tail, and a campaign's
jobs in training order with one loss curve across them. Every shape carries ``"schema": 1``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cli.status import STATUS_SCHEMA, _training_status, finished_row, job_campaign
from core.errors import ConfigError, RealmError
from core.job import Job
from core.paths import RealmPaths, complete_step_folders
from core.training_queue import TrainingQueue
from guild.campaigns import Campaign, active_ref, find_campaign, survey_with_active

LOG_TAIL_LINES = 80
LOG_TAIL_BYTES = 64 * 1024
FINISHED_STATES = ("completed", "failed", "cancelled", "skipped")


def job_view(queue: TrainingQueue, ref: str) -> dict[str, Any]:
    """One job: its record, live progress while it trains, the config it trained with (or would
    train with today), and the end of its log."""
    job = queue.find(ref)
    progress = _training_status(queue, job.id) if job.status.value == "processing" else {}
    log = queue.paths.logs / "jobs" / f"{job.id}.log"
    return {"schema": STATUS_SCHEMA, "job": job.to_dict(),
            "progress": progress if progress.get("job_id") == job.id else None,
            "campaign": job_campaign(job), "config": _config_of(queue.paths, job),
            "log_path": queue.paths.relative(log), "log_tail": _tail(log)}


def _config_of(paths: RealmPaths, job: Job) -> dict[str, Any]:
    """Each key's value, layer and source: as the job recorded them when it trained, else as
    its layers resolve today (``realm config show --job JOB --explain``)."""
    record, recorded, error = job.resolved_config, True, None
    if not record:
        recorded = False
        try:
            from guild.selection import resolve_for
            record = resolve_for(paths, job=job).record()
        except (ConfigError, RealmError, OSError) as exc:
            record, error = {}, str(exc)
    return {"recorded": recorded, "hero": record.get("hero"), "campaign": record.get("campaign"),
            "config_hash": record.get("config_hash"), "rows": record.get("explain", []),
            "error": error}


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - LOG_TAIL_BYTES))
            data = fh.read()
    except OSError:
        return []
    text = data.decode("utf-8", "replace").splitlines()
    if size > LOG_TAIL_BYTES:
        text = text[1:]  # the first line was cut by the seek
    return text[-lines:]


def campaigns_view(paths: RealmPaths, queue: TrainingQueue) -> dict[str, Any]:
    campaigns, active, problems = survey_with_active(paths)
    jobs = _jobs_by_campaign(queue, problems)
    rows = []
    for c in campaigns:
        steps = complete_step_folders(_checkpoint_root(c))
        rows.append({**c.to_dict(), "ref": c.ref, "active": c.ref == active,
                     "jobs": len(jobs.get(c.ref, [])), "checkpoints": len(steps),
                     "head_step": steps[-1][0] if steps else None})
    return {"schema": STATUS_SCHEMA, "active": active, "campaigns": rows, "problems": problems}


def campaign_view(paths: RealmPaths, queue: TrainingQueue, hero: str, name: str
                  ) -> dict[str, Any]:
    """A campaign's lineage: its jobs in training order, the checkpoint chain, and one loss
    curve on the campaign's global step axis, with each job's first step and every rollback."""
    campaign = find_campaign(paths, name, hero_id=hero)
    problems: list[dict] = []
    jobs = sorted(_jobs_by_campaign(queue, problems).get(campaign.ref, []), key=_training_order)
    rows, curve, boundaries, rollbacks = [], [], [], []
    for job in jobs:
        governor = job.governor or {}
        rows.append({**finished_row(job), "rollbacks": governor.get("rollbacks", 0)})
        rollbacks += [{"job_id": job.id, "step": e.get("step"), "reason": e.get("reason"),
                       "new_lr": e.get("new_lr")} for e in governor.get("events", [])]
        points = _job_curve(job)
        if points:
            boundaries.append(job.start_step)
            curve += points
    checkpoints = []
    for step, folder in complete_step_folders(_checkpoint_root(campaign)):
        try:
            state = json.loads((folder / "trainer_state.json").read_text())
        except (OSError, ValueError):
            state = {}
        checkpoints.append({"step": step, "job_id": state.get("job_id"),
                            "finished": bool(state.get("job_finished")),
                            "loss": state.get("last_loss")})
    return {"schema": STATUS_SCHEMA,
            "campaign": {**campaign.to_dict(), "ref": campaign.ref, "path": str(campaign.path),
                         "active": campaign.ref == _active(paths)},
            "jobs": rows, "checkpoints": checkpoints, "curve": curve, "boundaries": boundaries,
            "rollbacks": rollbacks, "problems": problems}


def _active(paths: RealmPaths) -> str | None:
    try:
        return active_ref(paths)
    except ConfigError:  # the campaigns list names the broken active.json
        return None


def _checkpoint_root(campaign: Campaign) -> Path:
    return Path(campaign.path).parent / "checkpoints"


def _jobs_by_campaign(queue: TrainingQueue, problems: list) -> dict[str, list[Job]]:
    by: dict[str, list[Job]] = {}
    for folder in ("processing", *FINISHED_STATES):
        for job in queue.jobs_in(folder, problems):
            ref = job_campaign(job)
            if ref:
                by.setdefault(ref, []).append(job)
    return by


def _training_order(job: Job) -> tuple:
    started = job.start_step if job.start_step is not None else float("inf")
    return (started, job.started_at or job.created_at or "")


def _job_curve(job: Job) -> list[list[float]]:
    """The job's recorded loss curve (evenly thinned over its steps) on the campaign's axis."""
    losses = ((job.metadata or {}).get("data") or {}).get("loss_curve") or []
    if job.start_step is None or job.final_step is None:
        return []  # it never trained to the end
    span = job.final_step - job.start_step
    if not losses or span <= 0:
        return []
    every = span / len(losses)
    return [[round(job.start_step + every * (i + 1), 2), loss] for i, loss in enumerate(losses)
            if isinstance(loss, (int, float))]
