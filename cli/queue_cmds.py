"""``realm queue ...``: status, list, show, add, retry, cancel, skip."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from cli.common import print_json, realm_paths
from cli.status import (LIST_STATES, build_list, build_status, fit_width, render_job, render_list,
                        render_status, watch_header)
from config.flags import parse_sets_checked
from config.resolver import Layer, check_values
from core.errors import ConfigError
from core.paths import PRIORITIES, check_name
from core.training_queue import TrainingQueue


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


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds "
                                         "(for example --interval 5)")
    return value


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
    for value, what in ((args.hero, "--hero"), (args.campaign, "--campaign")):
        if value is not None:
            for part in value.split("/", 1) if what == "--campaign" else [value]:
                check_name(part, what)
    overrides = parse_sets_checked(args.set)
    _check_overrides(overrides)
    job = _queue(args).add(Path(args.file), priority=args.priority, hero_id=args.hero,
                           campaign_id=args.campaign, overrides=overrides)
    print(f"queued {job.id} as {job.dataset_path} ({job.num_examples} examples, "
          f"{job.num_bytes} bytes)")
    return 0


def cmd_queue_retry(args) -> int:
    queue = _queue(args)
    job = queue.retry(queue.find(args.job), reason=args.reason)
    print(f"{job.id}: requeued as {job.dataset_path}")
    return 0


def cmd_queue_cancel(args) -> int:
    queue = _queue(args)
    job = queue.cancel(queue.find(args.job), reason=args.reason)
    print(f"{job.id}: cancelled, now {job.dataset_path}")
    return 0


def cmd_queue_skip(args) -> int:
    queue = _queue(args)
    job = queue.skip(queue.find(args.job), reason=args.reason)
    print(f"{job.id}: skipped, now {job.dataset_path} (`realm queue retry {job.id}` queues it "
          "again)")
    return 0


def add_parsers(sub) -> None:
    queue = sub.add_parser("queue", help="inspect and change the job queue")
    qsub = queue.add_subparsers(dest="queue_command", required=True, metavar="COMMAND")

    p = qsub.add_parser("status", help="counts, the running job, recent results, problems")
    p.add_argument("--json", action="store_true", help="machine-readable output (schema 1)")
    p.add_argument("--watch", action="store_true",
                   help="redraw every --interval seconds until Ctrl-C")
    p.add_argument("--interval", type=_interval, default=2.0, metavar="SECONDS",
                   help="seconds between refreshes under --watch (default: 2)")
    p.set_defaults(handler=cmd_queue_status)

    p = qsub.add_parser("list", help="jobs in one state; queued ones in claim order")
    p.add_argument("--state", choices=LIST_STATES, default="queued")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_queue_list)

    p = qsub.add_parser("show", help="one job's full record and history")
    p.add_argument("job", help="job id, unique id prefix, or dataset file name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_queue_show)

    p = qsub.add_parser("add", help="copy a dataset into the queue atomically")
    p.add_argument("file")
    p.add_argument("--priority", choices=PRIORITIES, default="normal")
    p.add_argument("--hero")
    p.add_argument("--campaign")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="config override stored on the job (repeatable)")
    p.set_defaults(handler=cmd_queue_add)

    for name, handler, default, help_ in (
        ("retry", cmd_queue_retry, "retry requested by user", "failed/skipped/cancelled -> queued"),
        ("cancel", cmd_queue_cancel, "cancelled by user", "queued -> cancelled (withdrawn)"),
        ("skip", cmd_queue_skip, "skipped by user",
         "queued -> skipped (set aside, kept; retry queues it again)"),
    ):
        p = qsub.add_parser(name, help=help_)
        p.add_argument("job", help="job id, unique id prefix, or dataset file name")
        p.add_argument("--reason", default=default, help="recorded in history and the ledger")
        p.set_defaults(handler=handler)


