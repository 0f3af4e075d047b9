"""Soak: many tiny jobs, two daemons, random kills; then prove nothing was lost or doubled.

    python scripts/soak.py [--jobs 24] [--kills 16] [--seed 0] [--ranks 1] [--dir DIR] [--json]

Two daemons stand in for two hosts (``REALM_HOST=host-a`` / ``host-b``) on one realm in
``--poll`` mode. Datasets are dropped the way a person would (a sidecar naming one of two
campaigns, then the dataset renamed into ``queue/normal/``), a few at a time while the chaos runs.
At random moments the chaos kills a daemon (SIGKILL or SIGTERM, restarted a moment later) or a
training child (SIGKILL or SIGTERM: a crash, or a warm stop of the child alone). After the last
kill both daemons run until the queue is drained. Then it checks and prints:

- jobs lost: a dropped dataset that no queue folder holds, or that never completed (must be 0)
- jobs completed more than once: two ledger transitions to completed, or two finished
  checkpoints for one job (must be 0)
- completed jobs whose final checkpoint does not load with ``from_pretrained`` (must be 0)
- checkpoints holding a NaN or Inf (must be 0)
- total wall time (and the kills, by kind)

Exit status 0 only when all four counts are 0. ``--ranks 2`` makes the second daemon run each
job as a 2-process gloo group (kills then also hit single ranks).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.paths import PRIORITIES, STATE_FOLDERS, RealmPaths, init_layout  # noqa: E402
from core.training_queue import TrainingQueue  # noqa: E402

TRAINING = {"training": {"micro_batch_size": 4, "max_steps": 10, "warmup_steps": 2,
                         "learning_rate": 1e-3},
            "data": {"max_length": 64}, "checkpoint": {"save_steps": 2, "keep_last": 1000},
            "logging": {"status_every_seconds": 0.5}}
DAEMON = {"settle_seconds": 0.2, "poll_interval": 0.3, "heartbeat_seconds": 0.3,
          "lease_seconds": 3, "job_timeout": 120, "stop_grace_seconds": 30, "max_attempts": 50}
CAMPAIGNS = ("c1", "c2")


def build_realm(base: Path) -> RealmPaths:
    from guild.campaigns import create_campaign
    from guild.heroes import install_shipped

    paths = RealmPaths(base)
    base.mkdir(parents=True, exist_ok=True)
    init_layout(paths)
    install_shipped(paths)
    for i, name in enumerate(CAMPAIGNS):
        create_campaign(paths, name, "tiny-qwen3", overrides=json.loads(json.dumps(TRAINING)),
                        activate_it=i == 0)
    (base / "config.json").write_text(json.dumps({"daemon": DAEMON}))
    return paths


def drop(paths: RealmPaths, i: int, rng: random.Random, staging: Path) -> str:
    """Sidecar first, then the dataset renamed in whole: never a half-copied file."""
    from trainer.data.synthetic import write_dataset

    name = f"soak-{i:03d}.jsonl"
    inbox = paths.state_dir("normal")
    (inbox / f"{name}.job.json").write_text(json.dumps({"campaign_id": CAMPAIGNS[i % 2]}))
    tmp = write_dataset(staging / name, rng.randint(40, 90), seed=i)
    os.replace(tmp, inbox / name)
    return name


class Host:
    """One daemon process standing in for one host; restartable."""

    def __init__(self, base: Path, name: str, devices: str, log: Path):
        self.base, self.name, self.devices, self.log = base, name, devices, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "REALM_HOST": self.name}
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "core.cli", "--base-dir", str(self.base), "daemon",
                 "--poll", "0.3", "--devices", self.devices], stdout=out, stderr=out, env=env)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def children(self) -> list:
        import psutil

        if not self.running:
            return []
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        out = []
        for k in kids:
            try:
                if "trainer.run_job" in " ".join(k.cmdline()):
                    out.append(k)
            except psutil.NoSuchProcess:
                pass
        return out

    def stop(self, sig: int, wait: float = 60) -> None:
        if not self.running:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def chaos(hosts: list[Host], rng: random.Random, kills: int, drops, say) -> Counter:
    """Kill something at random moments until ``kills`` kills are done; drop datasets between."""
    done: Counter = Counter()
    kinds = ["daemon-kill", "daemon-term", "child-kill", "child-term"]
    plan = [kinds[i % 4] for i in range(kills)]  # every kind, in a random order
    rng.shuffle(plan)
    for action in plan:
        drops()
        time.sleep(rng.uniform(0.5, 3.0))
        for h in hosts:
            if not h.running:
                h.start()
        host = rng.choice(hosts)
        kids = host.children()
        deadline = time.monotonic() + 10
        while action.startswith("child") and not kids and time.monotonic() < deadline:
            time.sleep(0.2)  # wait for a child to hit (the queue may be between jobs)
            host = rng.choice(hosts)
            kids = host.children()
        if action.startswith("child") and not kids:
            action = action.replace("child", "daemon")
        if action.startswith("daemon"):
            sig = signal.SIGKILL if action == "daemon-kill" else signal.SIGTERM
            host.stop(sig)
            time.sleep(rng.uniform(0.0, 1.5))  # the other host may reap before the restart
        else:
            victim = rng.choice(kids)
            try:
                victim.send_signal(signal.SIGKILL if action == "child-kill" else signal.SIGTERM)
            except Exception:  # it ended on its own just now
                continue
        done[action] += 1
        say(f"  chaos: {action} on {host.name}")
    drops(all_left=True)
    return done


def wait_drained(paths: RealmPaths, hosts: list[Host], expected: int, timeout: float) -> bool:
    q = TrainingQueue(paths.base)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for h in hosts:
            if not h.running:
                h.start()
        ended = len(q.jobs_in("completed")) + len(q.jobs_in("failed"))
        if ended >= expected:
            return True
        time.sleep(0.5)
    return False


def check(paths: RealmPaths, dropped: list[str]) -> dict:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import transformers

    transformers.utils.logging.disable_progress_bar()
    q = TrainingQueue(paths.base)
    where = {}
    for folder in PRIORITIES + STATE_FOLDERS:
        for job in q.jobs_in(folder):
            where.setdefault(job.dataset_name, []).append((folder, job))
    lost = [n for n in dropped if n not in where]
    not_completed = [n for n in dropped if n in where and
                     not any(f == "completed" for f, _ in where[n])]
    adopted_twice = [n for n, found in where.items() if len(found) > 1]

    ledger = [json.loads(line) for line in paths.ledger.read_text().splitlines()]
    completions = Counter(e["job_id"] for e in ledger if e["to"] == "completed")
    finished = Counter()
    non_finite, checkpoints = [], 0
    for ckpt in sorted(paths.campaigns.glob("*/*/checkpoints/step-*")):
        if not (ckpt / "COMPLETE").exists():
            continue
        checkpoints += 1
        state = json.loads((ckpt / "trainer_state.json").read_text())
        if state.get("job_finished"):
            finished[state["job_id"]] += 1
        weights = load_file(ckpt / "model.safetensors")
        if not all(bool(torch.isfinite(t).all()) for t in weights.values()):
            non_finite.append(str(ckpt))
    twice = sorted({j for j, n in completions.items() if n > 1} |
                   {j for j, n in finished.items() if n > 1})

    unloadable = []
    completed = [job for found in where.values() for f, job in found if f == "completed"]
    for job in completed:
        path = (job.metadata or {}).get("checkpoint")
        try:
            model = AutoModelForCausalLM.from_pretrained(path)
            if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
                raise ValueError("non-finite weights")
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            unloadable.append(f"{job.id}: {path}: {type(exc).__name__}: {exc}")
    return {"dropped": len(dropped), "completed": len(completed),
            "lost": len(lost) + len(not_completed), "lost_jobs": lost + not_completed,
            "duplicated": len(twice) + len(adopted_twice), "duplicated_jobs": twice + adopted_twice,
            "unloadable": len(unloadable), "unloadable_jobs": unloadable,
            "non_finite": len(non_finite), "non_finite_checkpoints": non_finite,
            "checkpoints_checked": checkpoints,
            "retries": sum(1 for e in ledger if e["from"] == "processing" and e["to"] == "queued")}


def orphans(base: Path, grace: float = 10.0) -> list[str]:
    """Processes still running for this realm after both daemons stopped (must be none)."""
    import psutil

    deadline = time.monotonic() + grace
    while True:
        left = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if str(base) in " ".join(p.info["cmdline"] or []) and p.pid != os.getpid():
                    left.append(f"{p.pid}: {' '.join(p.info['cmdline'])[:120]}")
            except psutil.NoSuchProcess:
                pass
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--kills", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ranks", type=int, default=1, choices=(1, 2),
                        help="processes per job on the second daemon (2: a gloo group)")
    parser.add_argument("--drain-timeout", type=float, default=900)
    parser.add_argument("--dir", type=Path, default=None, help="keep the realm here")
    parser.add_argument("--json", action="store_true", help="print the result as JSON only")
    args = parser.parse_args(argv)
    say = (lambda *_: None) if args.json else print
    rng = random.Random(args.seed)
    start = time.monotonic()
    base = args.dir or Path(tempfile.mkdtemp(prefix="realm-soak-"))
    paths = build_realm(base / "realm")
    staging = base / "staging"
    staging.mkdir(exist_ok=True)
    dropped: list[str] = []

    def drops(all_left: bool = False) -> None:
        n = args.jobs - len(dropped) if all_left else min(args.jobs - len(dropped),
                                                          rng.randint(0, 3))
        for _ in range(n):
            dropped.append(drop(paths, len(dropped), rng, staging))

    for _ in range(min(4, args.jobs)):
        dropped.append(drop(paths, len(dropped), rng, staging))
    hosts = [Host(paths.base, "host-a", "cpu", base / "host-a.log"),
             Host(paths.base, "host-b", "cpu" if args.ranks == 1 else "cpu:2",
                  base / "host-b.log")]
    say(f"soak: {args.jobs} jobs, {args.kills} kills, seed {args.seed}, realm {paths.base}")
    try:
        for h in hosts:
            h.start()
        kills = chaos(hosts, rng, args.kills, drops, say)
        drained = wait_drained(paths, hosts, args.jobs, args.drain_timeout)
    finally:
        for h in hosts:
            h.stop(signal.SIGTERM)
    result = check(paths, dropped)
    result["orphans"] = orphans(paths.base)
    result.update(wall_seconds=round(time.monotonic() - start, 1), drained=drained,
                  kills=dict(kills), realm=str(paths.base))
    ok = drained and not result["orphans"] and all(
        result[k] == 0 for k in ("lost", "duplicated", "unloadable", "non_finite"))
    result["ok"] = ok
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"\n  jobs dropped                         {result['dropped']}")
        print(f"  jobs completed                       {result['completed']}")
        print(f"  retries (attempts ended by a fault)  {result['retries']}")
        print(f"  kills                                {dict(kills)}")
        print(f"  jobs lost                            {result['lost']}  (must be 0)")
        print(f"  jobs completed more than once        {result['duplicated']}  (must be 0)")
        print(f"  completed jobs, checkpoint unloadable {result['unloadable']}  (must be 0)")
        print(f"  checkpoints with NaN/Inf             {result['non_finite']}  (must be 0; "
              f"{result['checkpoints_checked']} checked)")
        print(f"  processes left behind                {len(result['orphans'])}  (must be 0)")
        print(f"  wall time                            {result['wall_seconds']} s")
        print("  OK" if ok else f"  FAILED: {json.dumps({k: v for k, v in result.items() if k.endswith(('_jobs', '_checkpoints')) and v})}")
    if args.dir is None and ok:
        shutil.rmtree(base, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
