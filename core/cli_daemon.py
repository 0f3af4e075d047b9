"""``realm daemon --once`` and ``realm demo``."""

from __future__ import annotations

from pathlib import Path

from core.cli_common import add_common_flags, realm_paths
from core.errors import UsageError


def _flag_args(args) -> list[str]:
    """Pass the cli layer (flags given, --set) on to every training child."""
    out = []
    for flag in ("batch_size", "grad_accum", "learning_rate", "max_steps", "epochs",
                 "max_length", "seed"):
        value = getattr(args, flag, None)
        if value is not None:
            out += ["--" + flag.replace("_", "-"), str(value)]
    for item in args.set or []:
        out += ["--set", item]
    return out


def cmd_daemon(args) -> int:
    from core.training_daemon import drain
    from trainer.config.realm_config import resolve_for

    if not args.once:
        raise UsageError("only `realm daemon --once` (drain the queue, then exit) exists so far; "
                         "the long-running daemon is issue 6.")
    paths = realm_paths(args)
    daemon = resolve_for(paths).config.daemon
    summary = drain(paths, settle_seconds=daemon.settle_seconds,
                    max_attempts=daemon.max_attempts, extra_args=_flag_args(args))
    print(f"queue drained: {len(summary.completed)} completed, {len(summary.failed)} failed, "
          f"{len(summary.requeued)} requeued")
    return 1 if summary.failed else 0


def cmd_demo(args) -> int:
    from core.paths import RealmPaths, init_layout
    from core.queue_status import build_status, render_status
    from core.training_daemon import drain
    from core.training_queue import TrainingQueue
    from guild.campaigns import active_ref, create_campaign
    from guild.heroes import install_shipped
    from trainer.data.synthetic import write_dataset

    paths = RealmPaths(Path(args.dir).expanduser().resolve())
    paths.base.mkdir(parents=True, exist_ok=True)
    init_layout(paths)
    install_shipped(paths)
    if active_ref(paths) is None:
        create_campaign(paths, "demo", "tiny-qwen3", description="realm demo")
    print(f"realm demo in {paths.base}: hero tiny-qwen3, campaign {active_ref(paths)}")
    queue = TrainingQueue(paths.base)
    scratch = paths.base / "demo-data"
    scratch.mkdir(exist_ok=True)
    for name, n, seed, priority in (("arithmetic.jsonl", 400, 1, "high"),
                                    ("mixed.jsonl", 600, 2, "normal")):
        job = queue.add(write_dataset(scratch / name, n, seed), priority=priority)
        print(f"queued {job.dataset_path} ({job.num_examples} examples, {priority})")
    summary = drain(paths, settle_seconds=0.0, max_attempts=3)
    print()
    print(render_status(build_status(queue)))
    if summary.completed:
        ckpt = summary.completed[-1].metadata.get("checkpoint")
        print(f"\nlatest checkpoint: {ckpt}\nload it with: "
              f"AutoModelForCausalLM.from_pretrained('{ckpt}')")
    return 1 if summary.failed else 0


def add_parsers(sub) -> None:
    p = sub.add_parser("daemon", help="train queued jobs (--once: drain the queue, then exit)")
    p.add_argument("--once", action="store_true", help="drain the queue, then exit")
    add_common_flags(p)
    p.set_defaults(handler=cmd_daemon)
    p = sub.add_parser("demo", help="the embedded default end to end: tiny-qwen3, generated "
                                    "data, the queue drained")
    p.add_argument("--dir", default="realm-demo", help="realm to create or reuse")
    p.set_defaults(handler=cmd_demo)
