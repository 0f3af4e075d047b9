"""Soak: many tiny jobs, two daemons, random kills and file faults; then prove nothing was lost.

    python scripts/soak.py [--jobs 24] [--kills 16] [--file-faults 4] [--seed 0] [--ranks 1]
                           [--max-steps 10] [--no-tmpfs] [--dir DIR] [--json]

Two daemons stand in for two hosts (``REALM_HOST=host-a`` / ``host-b``) on one realm in
``--poll`` mode. Datasets are dropped the way a person would (a sidecar naming one of two
campaigns, then the dataset renamed into ``queue/normal/``), a few at a time while the chaos runs.
At random moments the chaos does one of:

- kill a daemon (SIGKILL or SIGTERM, restarted a moment later) or a training child (SIGKILL or
  SIGTERM: a crash, or a warm stop of the child alone);
- a file fault, on a real file of the realm, each to a job no other file fault touched:
  ``delete``   the dataset of an adopted queued or processing job (the job must end visible:
               failed with a reason saying its dataset vanished, or completed when its child had
               read it already; never lost);
  ``replace``  an adopted queued dataset by different bytes (the job must train the new bytes:
               re-adopted, hashed again before its claim, or refused for good with "dataset
               changed after adoption"; never the old hash on the new bytes);
  ``corrupt``  the processing sidecar of a job a live daemon holds, overwritten with
               ``{garbage`` (the daemon restores it from its own copy, logs
               ``sidecar.restored``, and the job completes);
  ``fill``     the disk: the realm runs on a small tmpfs of its own (root, ``mount -t tmpfs``),
               and a filler file leaves a few MB free while a job trains, then goes (the child
               meeting ENOSPC is requeued, not lost and not failed; the daemon waits for space;
               no daemon exits). Without root or tmpfs this fault is skipped with the reason.

After the last action both daemons run until the queue is drained. Then it checks and prints:

- jobs lost: a dropped dataset that no queue folder holds, or that never completed, apart from
  the jobs a file fault was allowed to fail (deleted, or refused as changed) (must be 0)
- jobs completed more than once: two ledger transitions to completed, two finished checkpoints
  for one job, or one dataset in two folders (must be 0)
- completed jobs whose final checkpoint does not load with ``from_pretrained`` (must be 0)
- checkpoints holding a NaN or Inf (must be 0)
- file faults judged wrong (see above), daemons that exited without being told to, problems the
  queue lists at the end, processes left behind (all must be 0)
- writes outside ``--dir``: every Python process of the run (daemons, children, ranks) carries
  an audit hook (``sitecustomize`` on ``PYTHONPATH``) that records each file it creates, writes,
  renames or removes outside ``--dir``; python's own temporary files in the temp folder and
  bytecode caches are listed apart; anything else must be none
- total wall time, the kills by kind and the file faults by kind (with how each one ended)

Exit status 0 only when all of that holds. ``--ranks 2`` makes the second daemon run each job as
a 2-process gloo group (kills then also hit single ranks). On tmpfs the realm lives in
``DIR/disk`` while it runs; with ``--dir`` its records (queue, logs, status: not the weights) are
copied to ``DIR/realm`` before the tmpfs is unmounted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.fsutil import locked  # noqa: E402
from core.paths import PRIORITIES, STATE_FOLDERS, RealmPaths, init_layout  # noqa: E402
from core.training_queue import TrainingQueue  # noqa: E402

KILLS = ("daemon-kill", "daemon-term", "child-kill", "child-term")
FILE_FAULTS = ("delete", "replace", "corrupt", "fill")
DAEMON = {"settle_seconds": 0.2, "poll_interval": 0.3, "heartbeat_seconds": 0.3,
          "lease_seconds": 3, "job_timeout": 120, "stop_grace_seconds": 30, "max_attempts": 50}
CAMPAIGNS = ("c1", "c2")
CHECKPOINT_MB = 11  # tiny-qwen3: weights 3.4 MB + optimizer state 6.9 MB
FILL_LEAVES_MB = 2  # what the filler leaves free: less than one checkpoint


def training(max_steps: int, keep_last: int) -> dict:
    return {"training": {"micro_batch_size": 4, "max_steps": max_steps, "warmup_steps": 2,
                         "learning_rate": 1e-3},
            "data": {"max_length": 64},
            "checkpoint": {"save_steps": 2, "keep_last": keep_last},
            "logging": {"status_every_seconds": 0.5}}


def keep_all(jobs: int, max_steps: int) -> int:
    """checkpoint.keep_last large enough that no checkpoint of the run is ever removed (so every
    one is checked), and no larger: the daemon's disk floor is the newest checkpoint's size x
    (keep_last + 1), which a tmpfs of the realm's own must hold free."""
    return jobs * math.ceil(max_steps / 2) + 8


def build_realm(base: Path, max_steps: int, keep_last: int, daemon: dict) -> RealmPaths:
    from guild.campaigns import create_campaign
    from guild.heroes import install_shipped

    paths = RealmPaths(base)
    base.mkdir(parents=True, exist_ok=True)
    init_layout(paths)
    install_shipped(paths)
    for i, name in enumerate(CAMPAIGNS):
        create_campaign(paths, name, "tiny-qwen3", overrides=training(max_steps, keep_last),
                        activate_it=i == 0)
    (base / "config.json").write_text(json.dumps({"daemon": daemon}))
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


# --- the realm's own small disk --------------------------------------------------------------


class Disk:
    """A tmpfs mounted for the realm alone, so that filling it hurts nothing else."""

    def __init__(self, mount: Path, size_mb: int):
        self.mount, self.size_mb = mount, size_mb

    @classmethod
    def try_mount(cls, mount: Path, size_mb: int) -> tuple["Disk | None", str | None]:
        """(disk, None), or (None, why the fill fault is skipped)."""
        if os.geteuid() != 0:
            return None, "not running as root: cannot mount a tmpfs to fill"
        if not shutil.which("mount") or not shutil.which("umount"):
            return None, "no mount/umount command"
        mount.mkdir(parents=True, exist_ok=True)
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755",
                              "tmpfs", str(mount)], capture_output=True, text=True)
        if out.returncode != 0:
            return None, f"mount -t tmpfs failed: {(out.stderr or out.stdout).strip()[:200]}"
        return cls(mount, size_mb), None

    def free(self) -> int:
        st = os.statvfs(self.mount)
        return st.f_bavail * st.f_frsize

    def unmount(self) -> None:
        for _ in range(20):
            if subprocess.run(["umount", str(self.mount)], capture_output=True).returncode == 0:
                return
            time.sleep(0.5)  # a process may still hold a file open there
        subprocess.run(["umount", "-l", str(self.mount)], capture_output=True)


# --- writes outside --dir, seen from inside every Python process of the run --------------------

AUDIT_HOOK = r'''
"""Soak audit hook: record every file created, written, renamed or removed outside ALLOWED."""
import os, sys, json, threading
_ALLOWED = {allowed!r}
_LOG = os.open(os.path.join({folder!r}, "events-%d.jsonl" % os.getpid()),
               os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_WATCH = {{"open", "os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.symlink", "os.link",
           "os.truncate", "os.chmod", "os.chown", "os.utime", "shutil.copyfile",
           "shutil.rmtree", "tempfile.mkstemp", "tempfile.mkdtemp"}}
_busy = threading.local()

def _emit(rec):
    try:
        os.write(_LOG, (json.dumps(rec) + "\n").encode())
    except Exception:
        pass

def _cmdline():
    try:
        with open("/proc/self/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")[:300]
    except OSError:
        return ""

def _path(p, dir_fd=None):
    if isinstance(p, int) or p is None:
        return None
    p = os.fsdecode(p)
    if not os.path.isabs(p):
        base = os.getcwd()
        if dir_fd is not None and dir_fd >= 0:
            try:
                base = os.readlink("/proc/self/fd/%d" % dir_fd)
            except OSError:
                return None
        p = os.path.join(base, p)
    return os.path.normpath(p)

def _outside(p):
    return p is not None and not any(p == a or p.startswith(a + os.sep) for a in _ALLOWED)

def _hook(event, args):
    if event not in _WATCH or getattr(_busy, "on", False):
        return
    _busy.on = True
    try:
        paths = []
        if event == "open":
            path, mode, flags = args
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                (isinstance(flags, int) and flags & _WRITE)
            if writes:
                paths = [_path(path)]
        elif event == "os.rename":
            paths = [_path(args[0], args[2]), _path(args[1], args[3])]
        elif event in ("shutil.copyfile",):
            paths = [_path(args[1])]
        elif event in ("os.remove", "os.rmdir", "shutil.rmtree"):
            paths = [_path(args[0], args[1] if len(args) > 1 else None)]
        elif event == "os.mkdir":
            paths = [_path(args[0], args[2])]
        elif event in ("os.symlink", "os.link"):
            paths = [_path(args[1])]
        else:
            paths = [_path(args[0])]
        for p in paths:
            if _outside(p):
                _emit({{"event": event, "path": p, "pid": os.getpid()}})
    except Exception:
        pass
    finally:
        _busy.on = False

_emit({{"hello": _cmdline(), "pid": os.getpid()}})
sys.addaudithook(_hook)
'''


class Audit:
    """Install the hook for the run's processes (through ``PYTHONPATH``) and read what it saw."""

    def __init__(self, folder: Path, allowed: list[Path]):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        allowed_paths = sorted({os.path.normpath(str(p)) for p in allowed} |
                               {os.path.normpath(os.path.realpath(p)) for p in allowed})
        (folder / "sitecustomize.py").write_text(
            AUDIT_HOOK.format(allowed=allowed_paths, folder=str(folder)))

    def install_here(self) -> None:
        """The soak's own process is audited too (from now on)."""
        import runpy

        runpy.run_path(str(self.folder / "sitecustomize.py"))

    def env(self) -> dict:
        extra = [str(self.folder), str(ROOT)]
        old = os.environ.get("PYTHONPATH")
        return {"PYTHONPATH": os.pathsep.join(extra + ([old] if old else []))}

    def report(self) -> dict:
        temp = os.path.normpath(tempfile.gettempdir())
        processes, outside, temp_files, bytecode, devices = [], [], set(), set(), set()
        for log in sorted(self.folder.glob("events-*.jsonl")):
            for line in log.read_text(errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if "hello" in rec:
                    processes.append(rec["hello"])
                    continue
                path = rec["path"]
                if path.startswith(("/dev/", "/proc/")):
                    devices.add(path)
                elif "__pycache__" in path.split(os.sep):
                    bytecode.add(path)
                elif path.startswith(temp + os.sep):
                    temp_files.add(path)
                else:
                    outside.append(f"{rec['event']} {path} (pid {rec['pid']})")
        return {"processes_audited": len(processes),
                "children_audited": sum("trainer.run_job" in p for p in processes),
                "outside_writes": sorted(set(outside)),
                "temp_files": len(temp_files),
                "temp_files_left": sorted(p for p in temp_files if os.path.lexists(p)),
                "bytecode_caches": sorted(bytecode), "devices": sorted(devices)}


# --- daemons ---------------------------------------------------------------------------------


class Host:
    """One daemon process standing in for one host; restartable. An exit the soak did not cause
    is recorded (a fault must never stop a daemon)."""

    def __init__(self, base: Path, name: str, devices: str, log: Path, cwd: Path, env: dict):
        self.base, self.name, self.devices, self.log = base, name, devices, log
        self.cwd, self.env = cwd, env
        self.proc: subprocess.Popen | None = None
        self.stopping = False
        self.unexpected_exits: list[str] = []

    def start(self) -> None:
        env = {**os.environ, **self.env, "REALM_HOST": self.name}
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cli", "--base-dir", str(self.base), "daemon",
                 "--poll", "0.3", "--devices", self.devices], stdout=out, stderr=out, env=env,
                cwd=self.cwd)
        self.stopping = False

    def ensure_running(self) -> None:
        if self.running:
            return
        if self.proc is not None and not self.stopping:
            self.unexpected_exits.append(f"{self.name} pid {self.proc.pid} exited with "
                                         f"{self.proc.returncode} (see {self.log})")
        self.start()

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
        self.stopping = True
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --- file faults -----------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class FileFaults:
    """Applies file faults to real files of the realm and remembers each, to judge it after the
    drain. Each fault takes a job no other file fault took."""

    def __init__(self, paths: RealmPaths, hosts: list[Host], rng: random.Random, staging: Path,
                 disk: Disk | None, say, target_wait: float, max_steps: int):
        self.paths, self.hosts, self.rng, self.staging = paths, hosts, rng, staging
        self.disk, self.say, self.target_wait = disk, say, target_wait
        self.max_steps = max_steps
        self.touched: set[str] = set()
        self.deleted: dict[str, dict] = {}
        self.replaced: dict[str, dict] = {}
        self.corrupted: dict[str, dict] = {}
        self.fills: list[dict] = []
        self.skipped: list[str] = []

    def _adopted(self, folder: str) -> list[tuple[str, dict]]:
        """(dataset name, record) of the adopted jobs in a queue folder, not yet touched."""
        out = []
        d = self.paths.state_dir(folder)
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            return out
        for name in names:
            if not name.endswith(".jsonl") or name in self.touched:
                continue
            try:
                record = json.loads((d / f"{name}.job.json").read_text())
            except (OSError, ValueError):
                continue
            if isinstance(record, dict) and record.get("id") and (d / name).is_file():
                out.append((name, record))
        return sorted(out)

    def _until(self, find):
        """Wait (up to target_wait) for ``find()`` to return a target."""
        deadline = time.monotonic() + self.target_wait
        while True:
            found = find()
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.2)

    def apply(self, kind: str, drop_one) -> str | None:
        """Apply one fault; a description, or None when it found no target (recorded)."""
        return getattr(self, f"_{kind}")(drop_one)

    def _delete(self, _drop_one) -> str | None:
        def find():
            cands = [(f, n, r) for f in ("normal", "processing") for n, r in self._adopted(f)]
            return self.rng.choice(cands) if cands else None

        for _ in range(20):
            target = self._until(find)
            if not target:
                break
            folder, name, record = target
            try:
                os.unlink(self.paths.state_dir(folder) / name)
            except FileNotFoundError:
                continue  # it moved on just now: pick again
            self.touched.add(name)
            self.deleted[name] = {"job_id": record["id"], "folder": folder}
            return f"deleted {folder}/{name}"
        self.skipped.append("delete: no adopted queued or processing dataset")
        return None

    def _replace(self, drop_one) -> str | None:
        from trainer.data.synthetic import write_dataset

        deadline = time.monotonic() + self.target_wait
        while time.monotonic() < deadline:
            # under the queue lock: the dataset is queued (not being claimed) when it changes
            with locked(self.paths.queue_lock):
                cands = self._adopted("normal")
                if cands:
                    name, record = self.rng.choice(cands)
                    n = int(record.get("num_examples") or 60) + self.rng.randint(5, 30)
                    new = write_dataset(self.staging / f"replacement-{name}", n,
                                        seed=10_000 + len(self.replaced))
                    sha = _sha256(new)
                    os.replace(new, self.paths.state_dir("normal") / name)
                    self.touched.add(name)
                    self.replaced[name] = {"job_id": record["id"], "sha256": sha,
                                           "examples": n, "old_sha256":
                                           record.get("dataset_sha256")}
                    return f"replaced normal/{name} ({record.get('num_examples')} -> {n} examples)"
            if not drop_one():  # nothing queued: make some backlog while the daemons train
                time.sleep(0.2)
            else:
                time.sleep(0.5)
        self.skipped.append("replace: no adopted queued dataset")
        return None

    def _owned_by_live_daemon(self, record: dict) -> bool:
        pid = (record.get("worker") or {}).get("pid")
        return any(h.running and h.proc.pid == pid for h in self.hosts)

    def _corrupt(self, _drop_one) -> str | None:
        deadline = time.monotonic() + self.target_wait
        while time.monotonic() < deadline:
            with locked(self.paths.queue_lock):  # nothing moves or renews it while it is hit
                cands = [(n, r) for n, r in self._adopted("processing")
                         if self._owned_by_live_daemon(r)]
                if cands:
                    name, record = self.rng.choice(cands)
                    sidecar = self.paths.state_dir("processing") / f"{name}.job.json"
                    fd = os.open(sidecar, os.O_WRONLY | os.O_TRUNC)  # never creates one
                    try:
                        os.write(fd, b"{garbage")
                    finally:
                        os.close(fd)
                    hit = time.monotonic()
                    self.touched.add(name)
                    break
            time.sleep(0.2)
        else:
            self.skipped.append("corrupt: no processing job held by a live daemon")
            return None
        # the owner restores it at its next lease renewal (or when it moves the job): wait for
        # that before anything else happens to the owner
        restored = None
        while time.monotonic() - hit < 20:
            if self._readable(name):
                restored = round(time.monotonic() - hit, 2)
                break
            time.sleep(0.1)
        self.corrupted[name] = {"job_id": record["id"], "restored_after_s": restored,
                                "owner": (record.get("worker") or {}).get("host")}
        return f"corrupted processing/{name}.job.json (restored after {restored} s)"

    def _readable(self, name: str) -> bool:
        for folder in PRIORITIES + STATE_FOLDERS:
            try:
                record = json.loads((self.paths.state_dir(folder) / f"{name}.job.json")
                                    .read_text())
            except (OSError, ValueError):
                continue
            if isinstance(record, dict) and record.get("id"):
                return True
        return False

    def _fill(self, _drop_one) -> str | None:
        if self.disk is None:
            self.skipped.append("fill: no tmpfs of its own for the realm")
            return None

        def stepping():
            """A job past its setup with a checkpoint still to write: it will meet the full
            disk within a step or two."""
            for _, record in self._adopted("processing"):
                if not self._owned_by_live_daemon(record):
                    continue
                try:
                    phase = (self.paths.status / "jobs" / f"{record['id']}.alive").read_text()
                    step = int(phase.split()[1].removeprefix("step:"))
                except (OSError, IndexError, ValueError):
                    continue
                if step < self.max_steps - 1:
                    return True
            return False

        if not self._until(stepping):
            self.skipped.append("fill: no job training past its setup")
            return None
        ledger_before = self._ledger_len()
        filler = self.disk.mount / "filler"
        started = time.monotonic()
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for _ in range(10):  # the jobs write too: aim again if the aim was too high
                size = self.disk.free() - FILL_LEAVES_MB * 2**20
                if size <= 0:
                    break
                try:
                    os.posix_fallocate(fd, 0, size)
                    break
                except OSError:
                    continue
            left = self.disk.free()
            # hold until a job met ENOSPC and was requeued (or 30 s passed: on loaded shared cores
            # a step of the tiny model can take seconds)
            no_space = []
            while time.monotonic() - started < 30:
                no_space = self._no_space_since(ledger_before)
                if no_space and time.monotonic() - started > 2:
                    break
                time.sleep(0.2)
        finally:
            os.close(fd)
            os.unlink(filler)
        held = round(time.monotonic() - started, 2)
        self.fills.append({"left_mb": round(left / 2**20, 1), "held_s": held,
                           "no_space_requeues": no_space})
        return (f"filled the disk ({left / 2**20:.1f} MB left for {held} s; "
                f"{len(no_space)} ENOSPC requeue(s))")

    def _ledger_len(self) -> int:
        try:
            return len(self.paths.ledger.read_bytes().splitlines())
        except FileNotFoundError:
            return 0

    def _no_space_since(self, start: int) -> list[str]:
        try:
            lines = self.paths.ledger.read_bytes().splitlines()[start:]
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if e.get("to") != "completed" and "no space left" in str(e.get("reason", "")).lower():
                out.append(e.get("job_id"))
        return out

    def counts(self) -> dict:
        return {"delete": len(self.deleted), "replace": len(self.replaced),
                "corrupt": len(self.corrupted), "fill": len(self.fills)}


# --- the chaos -------------------------------------------------------------------------------


def chaos(hosts: list[Host], rng: random.Random, plan: list[str], faults: FileFaults, drops,
          say, pause: float) -> Counter:
    """Do each action of ``plan`` at a random moment; drop datasets between."""
    done: Counter = Counter()
    for action in plan:
        drops()
        time.sleep(rng.uniform(min(0.5, pause), pause))
        for h in hosts:
            h.ensure_running()
        if action in FILE_FAULTS:
            what = faults.apply(action, lambda: drops(one=True))
            if what:
                done[action] += 1
                say(f"  chaos: {what}")
            else:
                say(f"  chaos: {action} skipped ({faults.skipped[-1]})")
            continue
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
            time.sleep(rng.uniform(0.0, min(1.5, pause)))  # the other may reap before restart
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
            h.ensure_running()
        ended = len(q.jobs_in("completed")) + len(q.jobs_in("failed"))
        if ended >= expected:
            return True
        time.sleep(0.5)
    return False


# --- the checks ------------------------------------------------------------------------------


def _says(job, text: str) -> bool:
    return text in (job.last_error or "") or any(text in str(h.get("reason", ""))
                                                 for h in job.history)


def judge_faults(faults: FileFaults, where: dict, paths: RealmPaths) -> tuple[dict, list, set]:
    """(outcome counts per fault kind, faults judged wrong, names allowed to end failed)."""
    outcomes = {k: Counter() for k in FILE_FAULTS}
    wrong, may_fail = [], set()
    for name, info in faults.deleted.items():
        found = where.get(name, [])
        if len(found) == 1 and found[0][0] == "failed" and _says(found[0][1], "vanished"):
            outcomes["delete"]["failed, dataset vanished"] += 1
            may_fail.add(name)
        elif len(found) == 1 and found[0][0] == "completed":
            outcomes["delete"]["completed (read before it vanished)"] += 1
        else:
            wrong.append(f"delete {name} ({info['folder']}): ended as "
                         f"{[(f, j.last_error) for f, j in found] or 'nowhere'}")
    for name, info in faults.replaced.items():
        found = where.get(name, [])
        job = found[0][1] if len(found) == 1 else None
        data = ((job.metadata or {}).get("data") or {}) if job else {}
        read = (data.get("num_examples") or 0) + (data.get("dropped_examples") or 0)
        if job and found[0][0] == "completed" and job.dataset_sha256 == info["sha256"] and \
                _says(job, "re-adopted") and read == info["examples"]:
            outcomes["replace"]["re-adopted, trained the new bytes"] += 1
        elif job and found[0][0] == "failed" and \
                "dataset changed after adoption" in (job.last_error or ""):
            outcomes["replace"]["refused: changed after adoption"] += 1
            may_fail.add(name)
        else:
            wrong.append(f"replace {name}: ended as "
                         f"{[(f, j.dataset_sha256, j.last_error) for f, j in found] or 'nowhere'}"
                         f" (new sha {info['sha256'][:12]}, {info['examples']} examples; the job read "
                         f"{read})")
    restored_ids = set()
    log = paths.logs / "daemon.jsonl"
    if log.exists():
        for line in log.read_text(errors="replace").splitlines():
            if "sidecar.restored" in line:
                try:
                    restored_ids.add(json.loads(line).get("job_id"))
                except ValueError:
                    pass
    for name, info in faults.corrupted.items():
        found = where.get(name, [])
        if info["restored_after_s"] is not None and info["job_id"] in restored_ids and \
                len(found) == 1 and found[0][0] == "completed":
            outcomes["corrupt"]["restored by its owner, completed"] += 1
        else:
            wrong.append(f"corrupt {name}: restored after {info['restored_after_s']} s, "
                         f"sidecar.restored logged: {info['job_id'] in restored_ids}, ended as "
                         f"{[f for f, _ in found] or 'nowhere'}")
    for fill in faults.fills:
        if fill["no_space_requeues"]:
            outcomes["fill"]["ENOSPC met, job requeued"] += 1
        else:
            outcomes["fill"]["no job met ENOSPC while full"] += 1
    return {k: dict(v) for k, v in outcomes.items() if v}, wrong, may_fail


def _preload() -> None:
    try:
        import safetensors.torch  # noqa: F401
        import transformers  # noqa: F401
        from transformers import AutoModelForCausalLM  # noqa: F401
    except Exception:  # noqa: BLE001 - check() imports them again and says what failed
        pass


def check(paths: RealmPaths, dropped: list[str], faults: FileFaults) -> dict:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import transformers

    transformers.utils.logging.disable_progress_bar()
    q = TrainingQueue(paths.base)
    where, problems = {}, []
    for folder in PRIORITIES + STATE_FOLDERS:
        for job in q.jobs_in(folder, problems):
            where.setdefault(job.dataset_name, []).append((folder, job))
    fault_outcomes, fault_wrong, may_fail = judge_faults(faults, where, paths)
    lost = [n for n in dropped if n not in where]
    not_completed = [n for n in dropped if n in where and n not in may_fail and
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
    failed = [job for found in where.values() for f, job in found if f == "failed"]
    return {"dropped": len(dropped), "completed": len(completed), "failed": len(failed),
            "lost": len(lost) + len(not_completed), "lost_jobs": lost + not_completed,
            "duplicated": len(twice) + len(adopted_twice), "duplicated_jobs": twice + adopted_twice,
            "unloadable": len(unloadable), "unloadable_jobs": unloadable,
            "non_finite": len(non_finite), "non_finite_checkpoints": non_finite,
            "checkpoints_checked": checkpoints,
            "retries": sum(1 for e in ledger if e["from"] == "processing" and e["to"] == "queued"),
            "file_fault_outcomes": fault_outcomes, "file_faults_wrong": len(fault_wrong),
            "file_faults_wrong_jobs": fault_wrong,
            "queue_problems": [f"{p['path']}: {p['problem']}" if isinstance(p, dict) else str(p)
                               for p in problems]}


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


def make_plan(rng: random.Random, kills: int, file_faults: int, kinds) -> list[str]:
    """Every kill kind and every file fault kind, in a random order; the first ``replace``
    comes first (it needs an adopted job still queued: in a small run only the first drops
    wait in the queue while both daemons train)."""
    plan = [KILLS[i % len(KILLS)] for i in range(kills)] + \
        [kinds[i % len(kinds)] for i in range(file_faults)]
    rng.shuffle(plan)
    if "replace" in plan:
        plan.remove("replace")
        plan.insert(0, "replace")
    return plan


def keep_records(realm: Path, dest: Path) -> None:
    """Copy what tells the story (queue, logs, status, configs; not weights nor token caches)."""
    shutil.copytree(realm, dest, symlinks=True, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.safetensors", "*.pt", "tokens"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--kills", type=int, default=16)
    parser.add_argument("--file-faults", type=int, default=4,
                        help="file faults among the kills (delete, replace, corrupt, fill, in "
                             "turn; 0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ranks", type=int, default=1, choices=(1, 2),
                        help="processes per job on the second daemon (2: a gloo group)")
    parser.add_argument("--max-steps", type=int, default=10, help="optimizer steps per job")
    parser.add_argument("--pause", type=float, default=3.0,
                        help="at most this many seconds between two chaos actions")
    parser.add_argument("--no-tmpfs", action="store_true",
                        help="run the realm on --dir's disk (the fill fault is then skipped)")
    parser.add_argument("--tmpfs-mb", type=int, default=None,
                        help="size of the realm's tmpfs (default: from jobs and max steps)")
    parser.add_argument("--drain-timeout", type=float, default=900)
    parser.add_argument("--dir", type=Path, default=None, help="keep the realm here")
    parser.add_argument("--json", action="store_true", help="print the result as JSON only")
    args = parser.parse_args(argv)
    start = time.monotonic()
    say = (lambda *_: None) if args.json else \
        (lambda msg: print(f"{time.monotonic() - start:6.1f} {msg}", flush=True))
    rng = random.Random(args.seed)
    base = (args.dir or Path(tempfile.mkdtemp(prefix="realm-soak-"))).resolve()
    base.mkdir(parents=True, exist_ok=True)

    keep_last = keep_all(args.jobs, args.max_steps)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the daemons, unmount
    disk, no_fill = None, None
    if args.no_tmpfs:
        no_fill = "--no-tmpfs"
    elif args.file_faults:
        # room for every checkpoint kept, the daemon's disk floor (as much again: see keep_all)
        # and the token cache and logs
        size = args.tmpfs_mb or (2 * keep_last + 1) * CHECKPOINT_MB + 150
        disk, no_fill = Disk.try_mount(base / "disk", size)
    if no_fill:
        say(f"soak: the fill fault is skipped: {no_fill}")
    fs = disk.mount if disk else base
    daemon = dict(DAEMON)
    if disk:
        daemon["min_free_disk_gb"] = 0.01  # a small disk of its own: the checkpoint floor rules
    result: dict = {}
    try:
        paths = build_realm(fs / "realm", args.max_steps, keep_last, daemon)
        staging = fs / "staging"
        staging.mkdir(exist_ok=True)
        cwd = base / "cwd"  # the daemons' working folder: nothing should land there
        cwd.mkdir(exist_ok=True)
        audit = Audit(base / "audit", allowed=[base])
        audit.install_here()
        dropped: list[str] = []

        def drops(all_left: bool = False, one: bool = False) -> bool:
            left = args.jobs - len(dropped)
            n = left if all_left else min(left, 1 if one else rng.randint(0, 3))
            for _ in range(n):
                dropped.append(drop(paths, len(dropped), rng, staging))
            return n > 0

        for _ in range(min(4, args.jobs)):
            dropped.append(drop(paths, len(dropped), rng, staging))
        hosts = [Host(paths.base, "host-a", "cpu", base / "host-a.log", cwd, audit.env()),
                 Host(paths.base, "host-b", "cpu" if args.ranks == 1 else "cpu:2",
                      base / "host-b.log", cwd, audit.env())]
        kinds = FILE_FAULTS if disk else tuple(k for k in FILE_FAULTS if k != "fill")
        plan = make_plan(rng, args.kills, args.file_faults, kinds)
        faults = FileFaults(paths, hosts, rng, staging, disk, say,
                            target_wait=max(20.0, 4 * args.pause), max_steps=args.max_steps)
        say(f"soak: {args.jobs} jobs, {args.kills} kills, {args.file_faults} file faults, "
            f"seed {args.seed}, realm {paths.base}" + (f" (tmpfs {disk.size_mb} MB)" if disk
                                                       else ""))
        try:
            for h in hosts:
                h.start()
            actions = chaos(hosts, rng, plan, faults, drops, say, args.pause)
            say("  chaos done: draining")
            # the checks need torch and transformers: import them while the queue drains
            threading.Thread(target=_preload, daemon=True).start()
            drained = wait_drained(paths, hosts, args.jobs, args.drain_timeout)
            say("  drained" if drained else "  NOT drained")
        finally:
            for h in hosts:
                h.stop(signal.SIGTERM)
        result = check(paths, dropped, faults)
        result["orphans"] = orphans(paths.base)
        result["unexpected_daemon_exits"] = [e for h in hosts for e in h.unexpected_exits]
        result["outside"] = audit.report()
        result.update(
            wall_seconds=round(time.monotonic() - start, 1), drained=drained,
            kills={k: v for k, v in actions.items() if k in KILLS},
            file_faults=faults.counts(), file_faults_skipped=faults.skipped,
            fill_skipped=no_fill, fills=faults.fills,
            replaced={n: {k: v for k, v in i.items() if k != "old_sha256"}
                      for n, i in faults.replaced.items()},
            deleted=faults.deleted, corrupted=faults.corrupted,
            realm=str(paths.base), tmpfs_mb=disk.size_mb if disk else None)
        if disk and args.dir is not None:
            keep_records(paths.base, base / "realm")
    finally:
        if disk:
            disk.unmount()
    ok = result["drained"] and not result["orphans"] and all(
        result[k] == 0 for k in ("lost", "duplicated", "unloadable", "non_finite",
                                 "file_faults_wrong")) and \
        not result["unexpected_daemon_exits"] and not result["queue_problems"] and \
        not result["outside"]["outside_writes"]
    result["ok"] = ok
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        outside = result["outside"]
        print(f"\n  jobs dropped                         {result['dropped']}")
        print(f"  jobs completed                       {result['completed']}")
        print(f"  jobs failed (allowed: file faults)   {result['failed']}")
        print(f"  retries (attempts ended by a fault)  {result['retries']}")
        print(f"  kills                                {result['kills']}")
        print(f"  file faults                          {result['file_faults']}"
              + (f"  skipped: {result['file_faults_skipped']}" if faults.skipped else ""))
        for kind, ends in result["file_fault_outcomes"].items():
            print(f"    {kind:<35}{ends}")
        print(f"  jobs lost                            {result['lost']}  (must be 0)")
        print(f"  jobs completed more than once        {result['duplicated']}  (must be 0)")
        print(f"  completed jobs, checkpoint unloadable {result['unloadable']}  (must be 0)")
        print(f"  checkpoints with NaN/Inf             {result['non_finite']}  (must be 0; "
              f"{result['checkpoints_checked']} checked)")
        print(f"  file faults judged wrong             {result['file_faults_wrong']}  (must be 0)")
        print(f"  daemons that exited on their own     "
              f"{len(result['unexpected_daemon_exits'])}  (must be 0)")
        print(f"  problems listed by the queue         {len(result['queue_problems'])}  "
              "(must be 0)")
        print(f"  writes outside --dir                 {len(outside['outside_writes'])}  (must "
              f"be 0; {outside['processes_audited']} processes audited, "
              f"{outside['temp_files']} python temp files, "
              f"{len(outside['bytecode_caches'])} bytecode caches)")
        print(f"  processes left behind                {len(result['orphans'])}  (must be 0)")
        print(f"  wall time                            {result['wall_seconds']} s")
        failures = {k: v for k, v in result.items() if v and k.endswith(
            ("_jobs", "_checkpoints", "problems", "exits"))}
        if outside["outside_writes"]:
            failures["outside_writes"] = outside["outside_writes"]
        print("  OK" if ok else f"  FAILED: {json.dumps(failures)}")
    if args.dir is None and ok:
        shutil.rmtree(base, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
