"""``realm queue ...``: status, list, show, add, retry, hold, release, cancel, skip."""

from __future__ import annotations

import getpass
import json
import os
import shutil
import sys
import time
from pathlib import Path

from cli.common import positive_seconds, print_json, realm_paths
from cli.status import (LIST_STATES, build_list, build_status, fit_width, render_job, render_list,
                        render_status, watch_header)
from config.flags import parse_sets_checked
from config.resolver import Layer, check_values
from core.errors import ConfigError, JobRunning, UsageError
from core.fsutil import host_name, process_alive
from core.job import Job, JobState, utc_now
from core.paths import PRIORITIES, check_name
from core.training_queue import TrainingQueue
from daemon.protocol import CancelRequest, JobFiles
from guild.campaigns import find_campaign


def _queue(args):
    return TrainingQueue(realm_paths(args).base)


def cmd_queue_status(args) -> int:
    queue = _queue(args)
    tty = sys.stdout.isatty()
    try:
        while True:
            status = build_status(queue)
            if args.json:
                print(json.dumps(status, ensure_ascii=False), flush=True)  # one line per refresh
            else:
                text = render_status(status)
                if args.watch:
                    text = f"{watch_header(args.interval)}\n{text}"
                if args.watch and tty:  # a screen, not a log: clear it, never wrap a line
                    text = "\033[2J\033[H" + fit_width(text, shutil.get_terminal_size().columns)
                print(text, flush=True)
            if not args.watch:
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0  # Ctrl-C is how a person ends --watch


def cmd_queue_list(args) -> int:
    listing = build_list(_queue(args), args.state)
    print(json.dumps(listing, indent=2) if args.json else render_list(listing))
    return 0


def cmd_queue_show(args) -> int:
    job = _queue(args).find(args.job)
    if args.json:
        print_json(job.to_dict())
    else:
        print(render_job(job))
    return 0


def _check_overrides(overrides: dict) -> None:
    """Refuse bad ``--set`` overrides before anything is copied: unknown keys, types, NaN and
    Infinity, bounds. Rules that need the hero (data.max_length) are checked when it trains."""
    problems = check_values(Layer("job", "--set", overrides))
    if problems:
        raise ConfigError(problems[:-1] + [problems[-1] + " Nothing was queued."])


def cmd_queue_add(args) -> int:
    paths = realm_paths(args)
    if args.hero is not None:
        check_name(args.hero, "--hero")
    campaign = None
    if args.campaign is not None:  # the same reader as campaign activate / config show
        campaign = find_campaign(paths, args.campaign, hero_id=args.hero,
                                 what="--campaign").ref
    overrides = parse_sets_checked(args.set)
    _check_overrides(overrides)
    job = TrainingQueue(paths.base).add(Path(args.file), priority=args.priority,
                                        hero_id=args.hero, campaign_id=campaign,
                                        overrides=overrides)
    print(f"queued {job.id} as {job.dataset_path} ({job.num_examples} examples, "
          f"{job.num_bytes} bytes)")
    return 0


def cmd_queue_retry(args) -> int:
    if (args.job is None) == (not args.all_failed):
        raise UsageError("queue retry: give one JOB or --all-failed (not both, not neither).")
    queue = _queue(args)
    if not args.all_failed:
        job = queue.retry(queue.find(args.job), reason=args.reason)
        print(f"{job.id}: requeued as {job.dataset_path}")
        return 0
    failed = queue.jobs_in("failed")
    if not failed:
        print("no failed jobs: nothing to retry")
        return 0
    for job in sorted(failed, key=lambda j: j.finished_at or ""):
        moved = queue.retry(job, reason=args.reason)
        print(f"{moved.id}: requeued as {moved.dataset_path} (failed: {job.last_error})")
    print(f"requeued {len(failed)} failed job(s)")
    return 0


def cmd_queue_hold(args) -> int:
    queue = _queue(args)
    job = queue.hold(queue.find(args.job), reason=args.reason)
    print(f"{job.id}: held in {job.dataset_path}; never claimed until "
          f"`realm queue release {job.id}`")
    return 0


def cmd_queue_release(args) -> int:
    queue = _queue(args)
    job = queue.release(queue.find(args.job), reason=args.reason)
    print(f"{job.id}: released; claimable again in its place in queue/{job.priority}/")
    return 0


def cmd_queue_cancel(args) -> int:
    queue = _queue(args)
    _, said = cancel_job(queue, queue.find(args.job), args.reason)
    print(said)
    return 0


def cancel_job(queue: TrainingQueue, job: Job, reason: str, who: str | None = None
               ) -> tuple[Job, str]:
    """Cancel a job and say what happened. A queued job is cancelled at once. A processing one
    gets a cancel request its daemon acts on within a heartbeat (the child stops at the next
    step boundary and removes its own checkpoints); when its daemon is gone (same host, process
    not running) it is cancelled here, and on another host the daemon that reaps its lease
    cancels it instead of requeueing it."""
    who = who or _person()
    if job.status is not JobState.PROCESSING:
        try:
            moved = queue.cancel(job, reason=reason)
            return moved, f"{moved.id}: cancelled, now {moved.dataset_path}"
        except JobRunning:
            job = queue.find(job.id)  # claimed since it was listed: ask its daemon
    files = JobFiles.of(queue.paths.status, job.id)
    worker = job.worker or {}
    owner = f"{worker.get('host')}:{worker.get('pid')}"
    if worker.get("host") == host_name() and not process_alive(worker.get("pid"),
                                                               worker.get("started")):
        moved = queue.cancel(job, f"cancelled by {who} while processing: {reason}; its daemon "
                             f"{owner} is no longer running (the campaign's next job discards "
                             "its checkpoints)", running=True, same_lease=True)
        files.remove()
        return moved, (f"{moved.id}: its daemon {owner} is no longer running; cancelled, now "
                       f"{moved.dataset_path}")
    CancelRequest(who, reason, utc_now(), job.started_at).write(files)
    gone = "" if worker.get("host") == host_name() else (
        f"; if {owner} is gone, the daemon that reaps its lease cancels it")
    return job, (f"{job.id}: cancel requested; its daemon {owner} stops it at the next step "
                 f"boundary and moves it to cancelled (its partial checkpoints are removed)"
                 f"{gone}. `realm queue show {job.id}` shows when it has.")


def _person() -> str:
    """``user@host`` of whoever runs the command (recorded as who cancelled)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no LOGNAME/USER (a bare container)
        user = f"uid{os.getuid()}"
    return f"{user}@{host_name()}"


def cmd_queue_skip(args) -> int:
    queue = _queue(args)
    job = queue.skip(queue.find(args.job), reason=args.reason)
    print(f"{job.id}: skipped, now {job.dataset_path} (`realm queue retry {job.id}` queues it "
          "again)")
    return 0


JOB_HELP = "job id, unique id prefix, dataset file name, or dataset stem (addition-a)"


def add_parsers(sub) -> None:
    queue = sub.add_parser("queue", help="inspect and change the job queue")
    qsub = queue.add_subparsers(dest="queue_command", required=True, metavar="COMMAND")

    p = qsub.add_parser("status", help="counts, the running job, recent results, problems")
    p.add_argument("--json", action="store_true", help="machine-readable output (schema 1)")
    p.add_argument("--watch", action="store_true",
                   help="redraw every --interval seconds until Ctrl-C")
    p.add_argument("--interval", type=positive_seconds("--interval"), default=2.0,
                   metavar="SECONDS", help="seconds between refreshes under --watch (default: 2)")
    p.set_defaults(handler=cmd_queue_status)

    p = qsub.add_parser("list", help="jobs in one state; queued ones in claim order")
    p.add_argument("--state", choices=LIST_STATES, default="queued",
                   help="which jobs: one state, or all (default: queued, in claim order)")
    p.add_argument("--json", action="store_true", help="machine-readable output (schema 1)")
    p.set_defaults(handler=cmd_queue_list)

    p = qsub.add_parser("show", help="one job's full record and history")
    p.add_argument("job", help=JOB_HELP)
    p.add_argument("--json", action="store_true", help="machine-readable output (schema 1)")
    p.set_defaults(handler=cmd_queue_show)

    p = qsub.add_parser("add", help="copy a dataset into the queue atomically")
    p.add_argument("file", help="the .jsonl dataset to queue (copied; the source is kept)")
    p.add_argument("--priority", choices=PRIORITIES, default="normal",
                   help="queue tier: high jobs are claimed before normal, normal before low")
    p.add_argument("--hero", help="the hero (model profile) to train; default: the campaign's "
                                  "hero, else the active campaign's")
    p.add_argument("--campaign", metavar="HERO/NAME",
                   help="the campaign to train in (HERO/NAME, or NAME when one hero has it); "
                        "default: the active campaign")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="config override stored on the job (repeatable)")
    p.set_defaults(handler=cmd_queue_add)

    p = qsub.add_parser("retry", help="failed/skipped/cancelled -> queued (one job, or every "
                                      "failed one)")
    p.add_argument("job", nargs="?", help=JOB_HELP)
    p.add_argument("--all-failed", action="store_true",
                   help="requeue every job in queue/failed/ (instead of one JOB)")
    p.add_argument("--reason", default="retry requested by user",
                   help="recorded in history and the ledger")
    p.set_defaults(handler=cmd_queue_retry)

    for name, handler, default, help_ in (
        ("hold", cmd_queue_hold, "held by user",
         "keep a queued job in place but never claim it until released"),
        ("release", cmd_queue_release, "released by user", "make a held job claimable again"),
        ("cancel", cmd_queue_cancel, "cancelled by user",
         "queued -> cancelled (withdrawn); a running job stops at its next step boundary"),
        ("skip", cmd_queue_skip, "skipped by user",
         "queued -> skipped (set aside, kept; retry queues it again)"),
    ):
        p = qsub.add_parser(name, help=help_)
        p.add_argument("job", help=JOB_HELP)
        p.add_argument("--reason", default=default, help="recorded in history and the ledger")
        p.set_defaults(handler=handler)


