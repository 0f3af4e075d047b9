"""``realm daemon`` (and ``--once``, ``--plan``) and ``realm demo``."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

from cli.common import positive_seconds, realm_paths
from config.flags import FLAG_KEYS, add_common_flags, cli_layer_from
from config.schema import BOUNDS
from core.errors import UsageError
from core.logsetup import configure
from core.paths import RealmPaths, init_layout
from core.training_queue import TrainingQueue
from daemon.pause import describe, pause, resume
from guild.campaigns import activate, active_ref, create_campaign
from guild.heroes import install_shipped
from guild.selection import resolve_for


def _flag_args(args) -> list[str]:
    """Pass the cli layer (flags given, --set) on to every training child, as ``--flag=value``
    so that a value starting with '-' is never read as an option by the child's parser."""
    out = []
    for flag in FLAG_KEYS:
        value = getattr(args, flag, None)
        if value is not None:
            out.append(f"--{flag.replace('_', '-')}={value}")
    out += [f"--set={item}" for item in args.set or []]
    return out


def _node_count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    low, high = BOUNDS["daemon.nodes"]
    if not low <= n <= high:
        raise argparse.ArgumentTypeError(f"{text!r} is not a node count from {low} to {high}")
    return n


def _open_daemon_log(paths, level: str):
    paths.logs.mkdir(parents=True, exist_ok=True)
    stream = open(paths.logs / "daemon.jsonl", "a", buffering=1)
    configure(level, stream)
    return stream


def cmd_daemon(args) -> int:
    # The daemon's modules (watchdog, psutil) load only for the commands that run it.
    from daemon.lock import DeviceSet
    from daemon.training_daemon import Daemon

    paths = realm_paths(args)
    if args.plan:
        from cli.plan import build_plan, render_plan

        plan = build_plan(paths, cli_args=args)
        print(json.dumps(plan, indent=2) if args.json else render_plan(plan))
        return 0
    # The daemon's own settings come from the same layers `config show --set` reports, command
    # line included; resolving them also validates the training layers every child will resolve
    # (a typo or a NaN in --set), so a bad command line exits 2 before any job is claimed.
    config = resolve_for(paths, cli=cli_layer_from(args)).config
    DeviceSet.parse(args.devices or config.daemon.devices)  # a bad set is refused before anything
    join = "--join" if args.join else "daemon.join" if config.daemon.join else None
    if join and args.once:
        raise UsageError(f"{join} with --once: a member daemon waits for jobs spanning hosts to "
                         "join; run it without --once and stop it with SIGTERM.")
    if join and args.nodes:
        raise UsageError(f"{join} with --nodes: a member joins the jobs other daemons claim; "
                         "give --nodes to the claiming daemon.")
    stream = _open_daemon_log(paths, config.logging.level)
    try:
        summary = Daemon(paths, config.daemon, devices=args.devices, poll=args.poll,
                         once=args.once, extra_args=_flag_args(args),
                         keep_last=config.checkpoint.keep_last, nodes=args.nodes,
                         join=args.join or None).run()
    finally:
        stream.close()
    left = f"; {summary.left_queued} job(s) left queued: not claiming: {summary.guard}" \
        if summary.guard and summary.left_queued else ""
    cancelled = f", {len(summary.cancelled)} cancelled" if summary.cancelled else ""
    print(f"daemon stopped: {len(summary.completed)} completed, {len(summary.failed)} failed, "
          f"{len(summary.requeued)} requeued{cancelled}{left}")
    return 3 if left else 1 if args.once and summary.failed else 0  # 3: exitcodes.ONCE_LEFT_QUEUED


def cmd_daemon_pause(args) -> int:
    paths = realm_paths(args)
    already = pause(paths, args.reason)
    if already is not None:
        print(f"already paused: {describe(already)}")
        return 0
    print(f"claiming paused for every daemon of {paths.base}; the running job (if any) goes on. "
          "`realm daemon resume` claims again.")
    return 0


def cmd_daemon_resume(args) -> int:
    was = resume(realm_paths(args))
    print(f"claiming resumed (was {describe(was)})" if was else
          "not paused: daemons are claiming already")
    return 0


DEMO_OVERRIDES = {"training": {"epochs": 12, "learning_rate": 3e-3, "warmup_steps": 10},
                  "data": {"max_length": 128}, "checkpoint": {"save_steps": 100}}
DEMO_LORA_OVERRIDES = {
    **DEMO_OVERRIDES,
    # an adapter learns the toy skill more slowly than full fine-tuning: 20 epochs (12 end near
    # 6% held-out, 20 near 15%)
    "training": {**DEMO_OVERRIDES["training"], "epochs": 20},
    # tiny-qwen3's weights are random: its frozen embeddings carry no notion of digits and its
    # frozen norms cap the logits' scale, so both train in full beside the adapter (with a
    # pretrained base an adapter alone is the usual choice)
    "adapter": {"method": "lora", "r": 16, "alpha": 32, "modules_to_save": "embed_tokens,norm"}}
SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(SPARK[min(7, int((v - lo) / span * 8))] for v in values)


def _prepare_demo(paths, say, adapter: bool = False) -> Path:
    """Realm, campaign and the skill: two training files queued, a held-out file kept aside."""
    from trainer.data.synthetic import addition_split, write_addition

    paths.base.mkdir(parents=True, exist_ok=True)
    init_layout(paths)
    install_shipped(paths)
    if adapter:
        if not (paths.campaigns / "tiny-qwen3" / "demo-lora").is_dir():
            create_campaign(paths, "demo-lora", "tiny-qwen3", overrides=DEMO_LORA_OVERRIDES,
                            description="realm demo: two-digit addition with a LoRA adapter")
        activate(paths, "tiny-qwen3/demo-lora")
    elif active_ref(paths) is None:
        create_campaign(paths, "demo", "tiny-qwen3", overrides=DEMO_OVERRIDES,
                        description="realm demo: two-digit addition")
    say(f"realm demo in {paths.base}: hero tiny-qwen3, campaign {active_ref(paths)}")
    say("skill: a + b for a, b < 50 (prompt '23+19=', completion '42'); 200 pairs held out")
    scratch = paths.base / "demo-data"
    scratch.mkdir(exist_ok=True)
    train, held = addition_split()
    half = len(train) // 2
    queue = TrainingQueue(paths.base)
    for name, part, priority in (("addition-a.jsonl", train[:half], "high"),
                                 ("addition-b.jsonl", train[half:], "normal")):
        job = queue.add(write_addition(scratch / name, part), priority=priority)
        say(f"queued {job.dataset_path} ({job.num_examples} examples, {priority})")
    return write_addition(scratch / "held-out.jsonl", held)


def _report(summary, held_out: Path, say, paths: RealmPaths) -> None:
    curve = [v for job in summary.completed
             for v in (job.metadata.get("data") or {}).get("loss_curve", [])]
    guess = math.log(512)  # tiny-qwen3's output vocabulary
    if curve:
        say(f"loss: {curve[0]:.3f} at the start -> {curve[-1]:.3f} at the end "
            f"(random guess over the vocabulary: ln 512 = {guess:.3f})")
        say(f"loss curve ({len(summary.completed)} jobs): {sparkline(curve)}")
    ckpt = summary.completed[-1].metadata.get("checkpoint") if summary.completed else None
    if ckpt:
        out = subprocess.run([sys.executable, "-m", "trainer.evaluate", ckpt, str(held_out)],
                             capture_output=True, text=True)
        result = json.loads(out.stdout) if out.returncode == 0 else None
        if result:
            say(f"held-out exact match (greedy): {result['accuracy']:.1%} of {result['n']} "
                f"unseen sums (chance: about 1%, one of 99 possible answers)")
        say(f"latest checkpoint: {ckpt}\nload it with: "
            f"AutoModelForCausalLM.from_pretrained('{ckpt}')")
    say(f"watch it in a browser: realm serve --base-dir {paths.base}   (curves per campaign: "
        f"tensorboard --logdir {paths.logs / 'tensorboard'})")


def cmd_demo(args) -> int:
    from cli.status import build_status, render_status
    from daemon.training_daemon import drain

    paths = RealmPaths(Path(args.dir).expanduser().resolve())
    held_out = _prepare_demo(paths, print, adapter=args.adapter == "lora")
    config = resolve_for(paths).config
    stream = _open_daemon_log(paths, config.logging.level)
    try:
        summary = drain(paths, config.daemon)
    finally:
        stream.close()
    print()
    print(render_status(build_status(TrainingQueue(paths.base))))
    print()
    _report(summary, held_out, print, paths)
    return 1 if summary.failed else 0


def add_parsers(sub) -> None:
    p = sub.add_parser("daemon", help="train queued jobs, one child process per job")
    p.add_argument("--once", action="store_true", help="drain the queue, then exit")
    p.add_argument("--poll", type=positive_seconds("--poll", *BOUNDS["daemon.poll_interval"]),
                   metavar="SECONDS", default=None,
                   help="rescan every SECONDS instead of watching (network file systems)")
    p.add_argument("--devices", default=None,
                   help="device set this daemon serves: cpu, cpu:N (N processes per job on CPU, "
                        "gloo), or CUDA ids such as 0 or 0,1 (one process per id, NCCL); "
                        "default: daemon.devices (cpu)")
    p.add_argument("--nodes", type=_node_count, default=None, metavar="N",
                   help="each job spans N hosts sharing this realm: this one and N-1 running "
                        "`realm daemon --join` with the same number of processes (default: "
                        "daemon.nodes, 1)")
    p.add_argument("--join", action="store_true",
                   help="member: claim nothing, lend this host's devices to jobs other daemons "
                        "claim with --nodes above 1")
    p.add_argument("--plan", action="store_true", help="print the ordered plan; change nothing")
    p.add_argument("--json", action="store_true", help="with --plan: machine-readable")
    add_common_flags(p)
    p.set_defaults(handler=cmd_daemon)
    dsub = p.add_subparsers(dest="daemon_command", metavar="[pause|resume]",
                            help="without one: run the daemon")
    q = dsub.add_parser("pause", help="every daemon of this realm stops claiming (the running "
                                      "job goes on); no restart")
    q.add_argument("--reason", default="paused by user",
                   help="shown in `realm queue status` and the daemon's output")
    q.set_defaults(handler=cmd_daemon_pause)
    q = dsub.add_parser("resume", help="claiming starts again (within daemon.poll_interval)")
    q.set_defaults(handler=cmd_daemon_resume)
    p = sub.add_parser("demo", help="the embedded default end to end: tiny-qwen3, generated "
                                    "data, the queue drained")
    p.add_argument("--dir", default="realm-demo", help="realm to create or reuse")
    p.add_argument("--adapter", choices=("none", "lora"), default="none",
                   help="lora: train a LoRA adapter on the frozen base (campaign demo-lora) "
                        "instead of every weight")
    p.set_defaults(handler=cmd_demo)
