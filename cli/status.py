"""What ``realm queue status`` and ``realm queue list`` report, as data and as text.

Read-only by construction: these functions only list folders and read sidecars. The JSON shapes
are versioned (``"schema": 1``) and documented in README.md.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import Any

from core.fsutil import host_name, process_alive
from core.job import Job
from core.paths import PRIORITIES, STATE_FOLDERS, layout_problems
from core.training_queue import TrainingQueue, claim_order
from daemon.nodes import read_small_json
from daemon.pause import describe, paused
from daemon.supervisor import JobFiles

STATUS_SCHEMA = 1
LIST_STATES = ("queued", *STATE_FOLDERS, "all")


def _recent(queue: TrainingQueue, folder: str, limit: int, problems: list) -> list[dict]:
    """The ``limit`` newest jobs of a folder, by sidecar mtime (no need to read them all)."""
    listing = queue.listing(folder)
    stamped = []
    for entry in listing.sidecars.values():  # a record whose dataset vanished counts too
        try:
            stamped.append((entry.stat(follow_symlinks=False).st_mtime_ns, entry))
        except FileNotFoundError:
            continue  # moved on since the listing
    newest = [e for _, e in sorted(stamped, key=lambda x: x[0], reverse=True)[:limit]]
    jobs = [j for e in newest if isinstance(j := queue._load(e, problems), Job)]
    return [finished_row(j) for j in sorted(jobs, key=lambda j: j.finished_at or "",
                                            reverse=True)]


_CAMPAIGN_IN_PATH = re.compile(r"(?:^|/)campaigns/([^/]+)/([^/]+)/checkpoints/")


def finished_row(job: Job) -> dict[str, Any]:
    """A finished job's summary with what it trained: steps, final loss, campaign."""
    return {**job.summary(), "start_step": job.start_step, "final_step": job.final_step,
            "final_loss": job.final_loss, "campaign": job_campaign(job)}


def job_campaign(job: Job) -> str | None:
    """``hero/name`` of the campaign a job trains (or trained) in, where one is known: named in
    its sidecar, recorded with the config it resolved, or read off its checkpoint's path."""
    recorded = (job.resolved_config or {}).get("campaign")
    if job.campaign_id or recorded:
        return job.campaign_id or recorded
    checkpoint = (job.metadata or {}).get("checkpoint") or (job.resume or {}).get("checkpoint")
    found = _CAMPAIGN_IN_PATH.search(str(checkpoint or ""))
    return f"{found[1]}/{found[2]}" if found else None


def _counts(queue: TrainingQueue, problems: list) -> tuple[dict, dict, int, int]:
    counts, by_priority, waiting, held = {}, {}, 0, 0
    for priority in PRIORITIES:
        listing = queue.listing(priority)
        problems.extend(listing.problems)
        by_priority[priority] = len(listing.datasets)
        waiting += sum(1 for n in listing.datasets if n not in listing.sidecars)
        for name, entry in listing.sidecars.items():
            loaded = queue._load(entry, problems)  # surfaces malformed sidecars as problems
            held += isinstance(loaded, Job) and bool(loaded.held)
    counts["queued"] = sum(by_priority.values())
    for folder in STATE_FOLDERS:
        listing = queue.listing(folder)
        problems.extend(listing.problems)
        counts[folder] = len(listing.sidecars)
    return counts, by_priority, waiting, held


def build_status(queue: TrainingQueue, recent: int = 5) -> dict[str, Any]:
    problems: list[dict] = [{"path": p.split(" ", 1)[0], "problem": p}
                            for p in layout_problems(queue.paths)]
    counts, by_priority, waiting, held = _counts(queue, problems)
    in_progress = []
    for job in queue.jobs_in("processing", problems):
        row = job.summary()
        training = _training_status(queue, job.id)
        row.update(heartbeat_at=job.heartbeat_at, resume=job.resume,
                   progress=training if training.get("job_id") == job.id else None)
        in_progress.append(row)
    return {
        "schema": STATUS_SCHEMA,
        "realm": str(queue.paths.base),
        "daemons": _daemons(queue),
        "counts": counts,
        "queued_by_priority": by_priority,
        "waiting_for_adoption": waiting,
        "held": held,
        "paused": paused(queue.paths),
        "in_progress": in_progress,
        "recent_completed": _recent(queue, "completed", recent, problems),
        "recent_failed": _recent(queue, "failed", recent, problems),
        "problems": _dedupe(problems),
    }


def _training_status(queue: TrainingQueue, job_id: str) -> dict:
    """``status/jobs/<job>.progress.json``, written by the training child (throttled)."""
    try:
        return json.loads(JobFiles.of(queue.paths.status, job_id).progress.read_text())
    except (OSError, ValueError):
        return {}


def _daemons(queue: TrainingQueue) -> list[dict]:
    """The daemons' own status files (state, reason for waiting, running job). A daemon on this
    host whose process is gone (killed, machine rebooted) shows as ``gone``."""
    out = []
    for path in sorted(queue.paths.status.glob("daemon-*.json")):
        try:  # bounded, regular files only: a FIFO or a device never hangs the status
            d = read_small_json(path, "daemon status file")
        except (OSError, ValueError):
            continue
        if not isinstance(d, dict):
            continue
        for key in ("node", "nodes"):  # a damaged file must not break the listing
            if key in d and (not isinstance(d[key], int) or isinstance(d[key], bool)):
                d[key] = None
        if d.get("state") != "stopped" and d.get("host") == host_name() and \
                not process_alive(d.get("pid"), d.get("started")):
            d.update(last_state=d.get("state"), state="gone")
        out.append(d)
    return out


def _dedupe(problems: list[dict]) -> list[dict]:
    seen, out = set(), []
    for p in problems:
        key = (p["path"], p["problem"])
        if key not in seen:
            seen.add(key)
            out.append(p)
    return sorted(out, key=lambda p: p["path"])


def build_list(queue: TrainingQueue, state: str = "queued") -> dict[str, Any]:
    """Jobs in one state; queued ones in claim order, datasets not adopted yet after each tier."""
    rows: list[dict] = []
    problems: list[dict] = []
    if state in ("queued", "all"):
        for priority in PRIORITIES:
            rows += [j.summary() for j in claim_order(queue.jobs_in(priority, problems))]
            rows += [{"id": None, "dataset": name, "path": f"queue/{priority}/{name}",
                      "priority": priority, "status": why, "attempts": 0}
                     for name, why in queue.waiting(priority)]
    for folder in STATE_FOLDERS:
        if state in (folder, "all"):
            jobs = sorted(queue.jobs_in(folder, problems), key=lambda j: j.finished_at or "")
            rows += [j.summary() for j in jobs]
    for position, row in enumerate(rows, 1):
        row["position"] = position
    return {"schema": STATUS_SCHEMA, "state": state, "jobs": rows,
            "problems": _dedupe(problems)}


# --- text rendering -------------------------------------------------------------------------

def _ago(stamp: str | None, now: datetime | None = None) -> str:
    if not stamp:
        return "-"
    now = now or datetime.now(timezone.utc)
    try:
        seconds = max(0, int((now - datetime.fromisoformat(stamp)).total_seconds()))
    except (TypeError, ValueError):  # not a stamp realm wrote
        return "?"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def render_status(status: dict) -> str:
    c, q = status["counts"], status["queued_by_priority"]
    lines = [f"realm queue  {status['realm']}", ""]
    tiers = " · ".join(f"{p} {q[p]}" for p in PRIORITIES)
    waiting = status["waiting_for_adoption"]
    lines.append(f"  queued      {c['queued']:>6}   ({tiers})"
                 + (f"   {waiting} waiting for adoption" if waiting else "")
                 + (f"   {status['held']} held (`realm queue release JOB`)"
                    if status.get("held") else ""))
    for folder in STATE_FOLDERS:
        lines.append(f"  {folder:<11} {c[folder]:>6}")
    if status.get("paused"):
        lines += ["", f"PAUSED: {describe(status['paused'])}; `realm daemon resume` claims again"]
    lines += _section("Daemons", status["daemons"], _daemon_line)
    lines += _section("In progress", status["in_progress"], _progress_line)
    lines += _section("Recently completed", status["recent_completed"], _finished_line)
    lines += _section("Recently failed", status["recent_failed"], _failed_line)
    if status["problems"]:
        lines += ["", "Problems"]
        lines += [f"  {problem_line(p)}" for p in status["problems"]]
    return "\n".join(lines)


def problem_line(p: dict) -> str:
    """A queue problem as one line: its message, which names the file (prefixed when not)."""
    return p["problem"] if p["problem"].startswith(p["path"]) else f"{p['path']}: {p['problem']}"


def _section(title: str, rows: list[dict], fmt) -> list[str]:
    return ["", title, *(fmt(r) for r in rows)] if rows else []


def _daemon_line(d: dict) -> str:
    extra = d.get("reason") or (f"job {d['job_id']}" if d.get("job_id") else "")
    if d.get("role") == "member":
        extra = (f"member node {d['node'] + 1} of {extra}" if d.get("node") is not None
                 else f"member, {extra}" if extra else "member (joins jobs spanning hosts)")
    elif (d.get("nodes") or 1) > 1:
        extra = f"jobs span {d['nodes']} nodes{'; ' + extra if extra else ''}"
    return (f"  {d.get('host')}:{d.get('pid')} [{d.get('devices')}] {d.get('state')}"
            f"{': ' + extra if extra else ''}  (updated {_ago(d.get('updated_at'))})")


def _progress_line(r: dict) -> str:
    worker = r.get("worker") or {}
    line = (f"  {r['id']}  {r['dataset']}  [{r['priority']}]  started {_ago(r['started_at'])}"
            f"  on {worker.get('host')}:{worker.get('pid')}"
            f"  heartbeat {_ago(r.get('heartbeat_at'))}")
    p = r.get("progress") or {}
    if p.get("metrics"):
        m = p["metrics"]
        ranks = f"  {p['parallelism']} x{p['world_size']}" if p.get("world_size", 1) > 1 else ""
        if isinstance(p.get("nodes"), int) and p["nodes"] > 1:
            ranks += f" on {p['nodes']} nodes"
        line += (f"\n    step {p['job_step']}/{p['total_steps']}  loss {m['loss']:.4f}  "
                 f"{m['tokens_per_sec']:,.0f} tokens/s  eta {p['eta_seconds']:.0f}s{ranks}")
    return line


def _trained(r: dict) -> str:
    """``steps 0->20  loss 1.2345  hero/name`` for what a finished job recorded."""
    parts = []
    if r.get("final_step") is not None:
        parts.append(f"steps {r.get('start_step') if r.get('start_step') is not None else '?'}"
                     f"->{r['final_step']}")
    if isinstance(r.get("final_loss"), (int, float)):
        parts.append(f"loss {r['final_loss']:.4f}")
    if r.get("campaign"):
        parts.append(r["campaign"])
    return "".join(f"  {p}" for p in parts)


def _finished_line(r: dict) -> str:
    return f"  {r['id']}  {r['dataset']}{_trained(r)}  finished {_ago(r['finished_at'])}"


def _failed_line(r: dict) -> str:
    return (f"  {r['id']}  {r['dataset']}{_trained(r)}  failed {_ago(r['finished_at'])}: "
            f"{r['last_error']}")


def watch_header(interval: float) -> str:
    now = datetime.now().astimezone().strftime("%H:%M:%S")
    return f"refreshing every {interval:g} s (--interval) · Ctrl-C to quit · {now}"


def fit_width(text: str, columns: int) -> str:
    """Each line cut to ``columns`` characters (an ellipsis marks the cut): a watched screen
    never wraps a line mid-word."""
    columns = max(columns, 20)
    return "\n".join(line if len(line) <= columns else line[:columns - 1] + "…"
                     for line in text.split("\n"))


def render_list(listing: dict) -> str:
    if not listing["jobs"]:
        return f"no {listing['state']} jobs"
    lines = [f"{'#':>4}  {'state':<10} {'priority':<8} {'job id':<40} dataset"]
    for r in listing["jobs"]:
        state = "held" if r.get("held") else r["status"]
        lines.append(f"{r['position']:>4}  {state:<10} {r['priority']:<8} "
                     f"{r['id'] or '(no sidecar yet)':<40} {r['path']}")
    lines += [f"problem: {problem_line(p)}" for p in listing["problems"]]
    return "\n".join(lines)


def render_job(job: Job) -> str:
    data = job.to_dict()
    history = data.pop("history")
    recorded = data.pop("resolved_config")
    width = max(len(k) for k in data)
    lines = [f"{k:<{width}}  {_fmt(v)}" for k, v in data.items() if k != "schema"]
    lines += ["", *_render_recorded(job.id, recorded)]
    lines += ["", "history"]
    lines += [f"  {h['at']}  {h['from'] or '-'} -> {h['to']}  {h['reason']}" for h in history]
    return "\n".join(lines)


def _render_recorded(job_id: str, recorded: dict | None) -> list[str]:
    """The config the job trained with: every key a layer above the schema set (value, layer,
    source); the defaults are counted, ``config show --job --explain`` lists them all."""
    if not recorded:
        return ["config  - (not trained yet: `realm config show --job "
                f"{job_id}` shows today's resolution of its layers)"]
    rows = [r for r in recorded.get("explain", []) if r.get("layer") not in ("schema", "locked")]
    defaults = len(recorded.get("explain", [])) - len(rows)
    lines = [f"config  as it trained: hero {recorded.get('hero')}, campaign "
             f"{recorded.get('campaign') or '-'}, {recorded.get('config_hash')}"]
    if rows:
        widths = [max(len(_fmt(r[k])) for r in rows) for k in ("key", "value", "layer")]
        lines += [f"  {r['key']:<{widths[0]}}  {_fmt(r['value']):<{widths[1]}}  "
                  f"{r['layer']:<{widths[2]}}  {r['source']}" for r in rows]
    lines.append(f"  ({defaults} more at schema defaults or locked: `realm config show --job "
                 f"{job_id} --explain` lists every key)")
    return lines


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "{}"
    return str(value)

