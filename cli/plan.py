"""``realm daemon --plan``: what the daemon would train, in order, and every problem it can see
without training. Read-only: it lists folders, reads sidecars and the first lines of datasets,
and resolves config; it writes nothing and moves nothing.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from pathlib import Path
from typing import Any

from cli.status import problem_line
from config.flags import cli_layer_from
from config.locked import verify_locked
from core.errors import RealmError
from core.job import Job
from core.paths import PRIORITIES, RealmPaths, complete_step_folders
from core.queue_scan import estimate_tokens, unadopted_job
from core.training_queue import TrainingQueue, claim_order
from core.validate import open_regular
from daemon.lock import DeviceSet
from daemon.pause import describe, paused
from guild.heroes import load_hero
from guild.selection import resolve_for

PLAN_SCHEMA = 1
CHECK_LINES = 50
KEY_SETTINGS = ("training.learning_rate", "training.micro_batch_size", "training.grad_accum",
                "training.epochs", "training.max_steps", "data.max_length", "adapter.method",
                "training.parallelism")


_REPORTED = (RealmError, OSError, ValueError, RecursionError)
"""What the plan reports as a problem instead of failing: it never trains, so every refusal is
information (a config error, an unreadable file)."""


def _entries(queue: TrainingQueue, problems: list) -> list[tuple[str, Path, Job | None]]:
    """(priority, dataset path, adopted job or None) in claim order."""
    out = []
    for priority in PRIORITIES:
        for job in claim_order(queue.jobs_in(priority, problems)):
            out.append((priority, queue.paths.base / job.dataset_path, job))
        for name, why in queue.waiting(priority):
            out.append((priority, queue.paths.state_dir(priority) / name, None))
    return out


def _first_line_problems(path: Path) -> list[str]:
    """Problems of the first ``CHECK_LINES`` lines, one line per distinct reason: the first
    line it occurs on, how often, and the first few line numbers."""
    from trainer.data.reader import BadLine, iter_lines, parse_line

    seen: dict[str, list[int]] = {}
    with open_regular(path, "the dataset") as fh:
        numbered = ((n, raw) for n, raw in enumerate(iter_lines(fh), 1)
                    if not isinstance(raw, bytes) or raw.strip())
        for number, raw in itertools.islice(numbered, CHECK_LINES):
            try:
                if not isinstance(raw, bytes):
                    raise BadLine(f"the line is {raw.size:,} bytes, over the line limit")
                parse_line(raw)
            except BadLine as bad:
                seen.setdefault(str(bad), []).append(number)
    return [_grouped(path, reason, numbers) for reason, numbers in seen.items()]


def _grouped(path: Path, reason: str, numbers: list[int]) -> str:
    if len(numbers) == 1:
        return f"{path}:{numbers[0]}: {reason}"
    shown = ", ".join(map(str, numbers[:5])) + (", ..." if len(numbers) > 5 else "")
    return f"{path}:{numbers[0]}: {reason} (x {len(numbers)} of the first {CHECK_LINES} " \
           f"lines: {shown})"


def _sampled_tokens(paths: RealmPaths, hero_id: str, path: Path, num_bytes: int,
                    counters: dict) -> tuple[int, str] | None:
    """(tokens, how) counted with the hero's tokenizer on a sample of the file, or None (the
    caller keeps bytes/4). Imports ``tokenizers`` only, never torch. ``counters`` keeps each
    hero's tokenizer for the whole plan: a queue of many jobs loads it once."""
    from trainer.data.token_estimate import SAMPLE_BYTES, estimate_tokens_sampled, \
        tokenizer_counter

    if hero_id not in counters:
        counters[hero_id] = tokenizer_counter(load_hero(paths, hero_id))
    count = counters[hero_id]
    found = estimate_tokens_sampled(path, num_bytes, count) if count else None
    if found is None:
        return None
    tokens, lines = found
    return tokens, f"{hero_id} tokenizer on {lines} lines (first {SAMPLE_BYTES >> 10} KiB)"


def _throughput(queue: TrainingQueue) -> float | None:
    rates = [j.tokens_per_sec_avg for j in queue.jobs_in("completed") if j.tokens_per_sec_avg]
    return statistics.median(rates[-10:]) if rates else None


def _plan_row(paths: RealmPaths, priority: str, path: Path, job: Job | None, cli,
              throughput: float | None, ranks: int = 1,
              counters: dict | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"priority": priority, "file": paths.relative(path),
                           "job_id": job.id if job else None, "examples": None,
                           "estimated_tokens": None, "problems": []}
    try:  # a file replaced by a FIFO or removed since the listing is a problem, not a crash
        record = job or unadopted_job(paths, path)
        tokens = record.estimated_tokens or estimate_tokens(record.num_bytes or 0)
        row.update(job_id=record.id, examples=record.num_examples, estimated_tokens=tokens,
                   token_estimate="bytes/4", problems=_first_line_problems(path))
        resolved = resolve_for(paths, job=record, cli=cli)
        sampled = _sampled_tokens(paths, resolved.hero_id, path, record.num_bytes or 0,
                                  {} if counters is None else counters)
        if sampled:
            tokens = sampled[0]
            row.update(estimated_tokens=tokens, token_estimate=sampled[1])
    except _REPORTED as exc:
        row["problems"].append(str(exc))
        return row
    t, d = resolved.config.training, resolved.config.data
    global_batch = t.micro_batch_size * t.grad_accum * ranks  # rows per optimizer step
    steps = math.ceil(tokens / (d.max_length * global_batch)) * t.epochs
    row.update(hero=resolved.hero_id, campaign=resolved.campaign, global_batch=global_batch,
               estimated_steps=min(steps, t.max_steps or steps),
               eta_seconds=round(tokens * t.epochs / throughput) if throughput else None,
               settings={k: {"value": resolved.get(k), "layer": resolved.provenance[k][0]}
                         for k in KEY_SETTINGS})
    if resolved.campaign is None:
        row["problems"].append("no campaign: `realm campaign create NAME --hero HERO` first")
    else:
        row["problems"] += _locked_problems(paths, resolved)
    return row


def _locked_problems(paths: RealmPaths, resolved) -> list[str]:
    """The refusal the job would meet continuing the campaign: its locked block (the adapter's
    shape, which a job's or the realm's settings can change) against the newest finished
    checkpoint's (every checkpoint of a campaign has the same block)."""
    root = paths.campaigns / resolved.campaign / "checkpoints"
    done = complete_step_folders(root)
    if not done:
        return []
    newest = done[-1][1]
    try:
        stored = json.loads((newest / "locked.json").read_text())
    except (OSError, ValueError) as exc:
        return [f"{newest / 'locked.json'}: unreadable ({exc})"]
    diff = verify_locked(stored, resolved.locked)
    if not diff:
        return []
    diff = diff.replace(":\n  ", ": ", 1).replace("\n  ", "; ")
    return [f"the job would be refused continuing from {newest}: {diff} (set those keys back, "
            "or train a new campaign)"]


def build_plan(paths: RealmPaths, cli_args=None) -> dict[str, Any]:
    queue = TrainingQueue(paths.base)
    problems: list[dict] = []
    cli = cli_layer_from(cli_args) if cli_args is not None else None
    throughput = _throughput(queue)
    devices = getattr(cli_args, "devices", None)
    nodes = getattr(cli_args, "nodes", None)
    try:
        daemon_cfg = resolve_for(paths, cli=cli).config.daemon
        device_set = DeviceSet.parse(devices or daemon_cfg.devices)
        nodes = nodes or daemon_cfg.nodes
    except _REPORTED as exc:
        where = "--devices" if devices else "config"
        problems.append({"path": where, "problem": str(exc)})
        device_set, nodes = DeviceSet("cpu", 1, ""), nodes or 1
    entries = _entries(queue, problems)
    counters: dict = {}  # hero id -> its token counter, loaded once per plan
    rows = [_plan_row(paths, p, path, job, cli, throughput, device_set.ranks * nodes, counters)
            for p, path, job in entries if not (job and job.held)]
    held = [{"job_id": job.id, "file": job.dataset_path, "reason": job.held}
            for _, _, job in entries if job and job.held]
    return {"schema": PLAN_SCHEMA, "realm": str(paths.base), "tokens_per_sec": throughput,
            "devices": device_set.spec, "nodes": nodes,
            "ranks_per_job": device_set.ranks * nodes,
            "jobs": rows, "held": held, "paused": paused(paths), "problems": problems}


def _shown_value(key: str, value: Any) -> Any:
    if key == "training.max_steps" and value is None:
        return "none (all epochs)"
    return value


def render_plan(plan: dict[str, Any]) -> str:
    nodes = plan.get("nodes") or 1
    on = f" on each of {nodes} nodes" if nodes > 1 else ""
    lines = [f"plan for {plan['realm']} ({len(plan['jobs'])} jobs; devices {plan['devices']}"
             f"{on}, {plan['ranks_per_job']} process(es) per job; throughput "
             f"{plan['tokens_per_sec'] or 'unknown until a job completes'} tokens/s)"]
    for i, r in enumerate(plan["jobs"], 1):
        eta = f", eta {r['eta_seconds']} s" if r.get("eta_seconds") else ""
        lines.append(f"{i:>3}. [{r['priority']}] {r['file']}: {r['examples'] or '?'} examples, "
                     f"~{r['estimated_tokens'] or 0:,} tokens, ~{r.get('estimated_steps', '?')} steps"
                     f" of {r.get('global_batch', '?')} rows"
                     f"{eta}; {r.get('hero', '?')} / {r.get('campaign') or '(no campaign)'}")
        if r.get("token_estimate"):
            lines.append(f"       tokens estimated by {r['token_estimate']}")
        for key, s in (r.get("settings") or {}).items():
            lines.append(f"       {key} = {_shown_value(key, s['value'])} ({s['layer']})")
        lines += [f"       problem: {p}" for p in r["problems"]]
    lines += [f"held, not claimed until `realm queue release {h['job_id']}`: {h['file']} "
              f"({h['reason']})" for h in plan.get("held", [])]
    if plan.get("paused"):
        lines.append(f"nothing is claimed now: {describe(plan['paused'])}; "
                     "`realm daemon resume` claims again")
    lines += [f"problem: {problem_line(p)}" for p in plan["problems"]]
    return "\n".join(lines)
