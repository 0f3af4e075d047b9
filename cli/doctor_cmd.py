"""``realm doctor [--json]``: is this machine and this realm fit to train? One line per check,
``ok``, ``warn`` or ``FAIL`` with the fix, then a summary; exit 1 when a check failed (warnings
do not fail).

Checks: the realm's layout and config, torch and transformers, CUDA and bf16 against the config,
every hero's model config and tokenizer (loaded without weights, through ``trainer.doctor``),
free disk and memory against the daemon's floors, the realm file system's no-replace rename and
flock (tried in a temporary folder inside the realm, removed afterwards), inotify limits, and
the daemons registered in ``status/``. Each check is guarded: an exception in one is that
check's FAIL line, never a traceback.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import psutil

from cli.common import print_json, realm_paths
from core.errors import RealmError
from core.fsutil import host_name, process_alive, rename_noreplace
from core.paths import PRIORITIES, STATE_FOLDERS, RealmPaths, layout_problems
from guild.heroes import list_heroes
from guild.selection import resolve_for

DOCTOR_SCHEMA = 1
MIN_INOTIFY_WATCHES = 8192
MIN_INOTIFY_INSTANCES = 128
GB = 2**30


@dataclass
class Row:
    name: str
    status: str
    """ok, warn or fail."""
    detail: str
    fix: str | None = None

    def line(self) -> str:
        label = {"ok": "ok  ", "warn": "warn", "fail": "FAIL"}[self.status]
        fix = f"; fix: {self.fix}" if self.fix else ""
        detail = self.detail.rstrip(".") if self.fix else self.detail
        return f"{label} {self.name}: {detail}{fix}"


class Blocked(Exception):
    """A check that cannot run because of what an earlier one found (the config, torch)."""

    def __init__(self, problem: str, fix: str):
        super().__init__(problem)
        self.fix = fix


@dataclass
class Context:
    paths: RealmPaths
    debug: bool = False
    """Print the traceback of a check that crashed (``--debug``) beside its FAIL line."""
    resolved: object = None
    """The realm's resolved config (``guild.selection.resolve_for``), or the exception."""
    runtime: object = None
    """``trainer.doctor.runtime()``, or the exception importing torch raised."""

    def config(self):
        if isinstance(self.resolved, Exception):
            raise Blocked("the realm's config does not resolve (see the config line)",
                          "fix the config first")
        return self.resolved.config


def _guarded(name: str, check: Callable[[Context], Iterable[Row]], ctx: Context) -> list[Row]:
    rows: list[Row] = []
    try:
        rows.extend(check(ctx))  # rows made before a crash are kept
    except Blocked as exc:
        rows.append(Row(name, "fail", str(exc), exc.fix))
    except Exception as exc:  # one check's crash is its FAIL line, never a traceback
        if ctx.debug:
            traceback.print_exc()
        rows.append(Row(name, "fail", _text(exc), "see the message (rerun with --debug for "
                        "the traceback)"))
    return rows


def _text(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, RealmError) else f"{type(exc).__name__}: {exc}"


# --- the realm ---------------------------------------------------------------------------------

def check_layout(ctx: Context) -> Iterable[Row]:
    p = ctx.paths
    wanted = [p.state_dir(f) for f in PRIORITIES + STATE_FOLDERS]
    wanted += [p.campaigns, p.heroes, p.logs, p.status]
    missing = [p.relative(f) for f in wanted if not f.is_dir()]
    problems = layout_problems(p)
    if missing:
        yield Row("layout", "fail", f"missing {', '.join(missing)}",
                  f"`realm init --base-dir {p.base}` (it never touches existing files)")
    elif problems:
        yield Row("layout", "fail", " ".join(problems), "replace each folder named with a real "
                  "folder on queue/'s file system, then `realm init`")
    else:
        yield Row("layout", "ok", f"{p.base}: queue/, campaigns/, configs/heroes/, logs/, status/")


def check_config(ctx: Context) -> Iterable[Row]:
    try:
        ctx.resolved = resolve_for(ctx.paths)
    except (RealmError, OSError) as exc:
        ctx.resolved = exc
        yield Row("config", "fail", str(exc), "fix the file the message names "
                  "(`realm config show --explain` shows where each value comes from)")
        return
    yield Row("config", "ok", f"resolves (hero {ctx.resolved.hero_id}"
              f"{', campaign ' + ctx.resolved.campaign if ctx.resolved.campaign else ''})")


def _source(ctx: Context, key: str) -> str:
    """``daemon.min_free_disk_gb from config.json``: where a value the user may change is set."""
    layer, source = ctx.resolved.provenance.get(key, ("schema", ""))
    return f"{key}, the default" if layer == "schema" else f"{key} from {source}"


# --- the training stack ------------------------------------------------------------------------

def _runtime(ctx: Context) -> dict:
    if ctx.runtime is None:
        try:
            from trainer.doctor import runtime  # torch: only this command pays for it

            ctx.runtime = runtime()
        except Exception as exc:  # a broken install is what doctor is for
            ctx.runtime = exc
    if isinstance(ctx.runtime, Exception):
        raise Blocked(f"torch or transformers do not import ({_text(ctx.runtime)})",
                      "reinstall realm's environment (scripts/setup.sh, or pip install -e .)")
    return ctx.runtime


def check_versions(ctx: Context) -> Iterable[Row]:
    facts = _runtime(ctx)
    yield Row("versions", "ok", f"torch {facts['torch']}, transformers {facts['transformers']}")


def check_cuda(ctx: Context) -> Iterable[Row]:
    facts = _runtime(ctx)
    devices = ctx.config().daemon.devices
    ids = [int(i) for i in devices.split(",")] if devices.replace(",", "").isdigit() else []
    have = facts["devices"]
    what = f"CUDA {facts['cuda']}, {len(have)} device(s): {', '.join(have)}" if have else \
        "no CUDA device (training runs on CPU)"
    beyond = [i for i in ids if i >= len(have)]
    if beyond:
        yield Row("cuda", "fail", f"{_source(ctx, 'daemon.devices')} is '{devices}' but this "
                  f"machine has {what}", "set daemon.devices to cpu or to ids that exist "
                  f"(0..{len(have) - 1})" if have else "set daemon.devices to cpu")
    else:
        yield Row("cuda", "ok", f"{what}; daemon.devices {devices}")


def check_bf16(ctx: Context) -> Iterable[Row]:
    facts = _runtime(ctx)
    training = ctx.config().training
    if facts["bf16"]:
        yield Row("bf16", "ok", "supported by the CUDA device")
    elif training.precision == "bf16":
        yield Row("bf16", "warn", f"{_source(ctx, 'training.precision')} is bf16 but "
                  f"{'this CUDA device has no bf16' if facts['cuda'] else 'there is no CUDA'}: "
                  "training runs in fp32", "set training.precision to auto or fp32")
    else:
        yield Row("bf16", "ok", "no CUDA bf16 here; autocast stays fp32 (training.precision "
                  f"{training.precision}, param_dtype {training.param_dtype})")


def check_heroes(ctx: Context) -> Iterable[Row]:
    heroes, broken = list_heroes(ctx.paths)
    for problem in broken:
        yield Row(f"hero {problem.id}", "fail", problem.reason,
                  f"fix {problem.source} or remove it")
    for hero in heroes:
        yield from _guarded(f"hero {hero.id}", lambda c, h=hero: [_hero_row(c, h)], ctx)


def _hero_row(ctx: Context, hero) -> Row:
    _runtime(ctx)
    from trainer.doctor import ModelNotCached, check_hero

    name = f"hero {hero.id}"
    try:
        return Row(name, "ok", check_hero(hero))
    except ModelNotCached as exc:
        fix = (f"put the model folder on this machine and set model.path in {hero.source} "
               "(or fill the Hugging Face cache)")
        in_use = (ctx.paths.campaigns / hero.id).is_dir() and \
            any((ctx.paths.campaigns / hero.id).iterdir())
        return Row(name, "fail" if in_use else "warn",
                   f"{exc}{'; its campaigns cannot train' if in_use else ''}", fix)
    except Exception as exc:  # the failure training would meet, with where it comes from
        return Row(name, "fail", f"does not load: {_text(exc)}",
                   f"fix model.path / tokenizer in {hero.source} (or the model folder's files); "
                   "remove the profile if the hero is retired")


# --- the machine -------------------------------------------------------------------------------

def _gb(value: float) -> str:
    """1.0 -> '1', 0.25 -> '0.25', 1e9 -> '1000000000' (never an exponent)."""
    return f"{value:.2f}".rstrip("0").rstrip(".")


def check_disk(ctx: Context) -> Iterable[Row]:
    floor = ctx.config().daemon.min_free_disk_gb
    free = psutil.disk_usage(str(ctx.paths.base)).free / GB
    detail = f"{free:.1f} GB free on the realm's file system; floor {_gb(floor)} GB " \
             f"({_source(ctx, 'daemon.min_free_disk_gb')})"
    if free < floor:
        yield Row("disk", "fail", f"{free:.1f} GB free < {_gb(floor)} GB "
                  f"({_source(ctx, 'daemon.min_free_disk_gb')}): the daemon claims no job",
                  "free space there (old checkpoints: campaigns/*/*/checkpoints) or lower "
                  "daemon.min_free_disk_gb")
    else:
        yield Row("disk", "ok", detail)


def check_memory(ctx: Context) -> Iterable[Row]:
    floor = ctx.config().daemon.min_free_memory_gb
    avail = psutil.virtual_memory().available / GB
    source = _source(ctx, "daemon.min_free_memory_gb")
    if avail < floor:
        yield Row("memory", "fail", f"{avail:.1f} GB available < {_gb(floor)} GB ({source}): the "
                  "daemon claims no job", "stop what holds the memory or lower "
                  "daemon.min_free_memory_gb")
    else:
        yield Row("memory", "ok", f"{avail:.1f} GB available; floor {_gb(floor)} GB ({source})")


def check_filesystem(ctx: Context) -> Iterable[Row]:
    """No-replace rename and flock, tried for real in a temporary folder inside the realm."""
    scratch = Path(tempfile.mkdtemp(prefix=".doctor-", dir=ctx.paths.base))
    try:
        yield from _guarded("rename", lambda c: [_rename_row(scratch)], ctx)
        yield from _guarded("flock", lambda c: [_flock_row(scratch)], ctx)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _rename_row(scratch: Path) -> Row:
    a, b, c = (scratch / n for n in ("a", "b", "c"))
    a.write_text("a")
    c.write_text("c")
    rename_noreplace(a, b)
    try:
        rename_noreplace(c, b)
        replaced = True
    except FileExistsError:
        replaced = False
    if replaced or b.read_text() != "a" or a.exists():
        return Row("rename", "fail", "a no-replace rename overwrote its target: two daemons "
                   "could claim one job", "keep the realm on a local file system (ext4, xfs, "
                   "btrfs) or NFS")
    return Row("rename", "ok", "an atomic rename refuses to replace an existing file")


def _flock_row(scratch: Path) -> Row:
    path = scratch / "lock"
    first = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    second = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(first, fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            fcntl.flock(second, fcntl.LOCK_EX | fcntl.LOCK_NB)
            excluded = False
        except BlockingIOError:
            excluded = True
    except OSError as exc:
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            raise
        excluded = False
    finally:
        os.close(second)
        os.close(first)
    if not excluded:
        return Row("flock", "fail", "flock does not exclude a second holder on this file "
                   "system: the queue lock and the one-daemon lock would not hold",
                   "keep the realm on a local file system or NFS with locking (not a FUSE "
                   "mount without locks)")
    return Row("flock", "ok", "an exclusive flock excludes a second holder")


def check_inotify(ctx: Context) -> Iterable[Row]:
    limits = {}
    for key in ("max_user_watches", "max_user_instances"):
        try:
            limits[key] = int(Path(f"/proc/sys/fs/inotify/{key}").read_text())
        except (OSError, ValueError):
            yield Row("inotify", "warn", f"cannot read /proc/sys/fs/inotify/{key}: no inotify "
                      "here, new files are found by the rescan only", "run the daemon with "
                      "--poll SECONDS to say so")
            return
    low = [f"fs.inotify.{k} {v} < {want}" for (k, v), want in
           zip(limits.items(), (MIN_INOTIFY_WATCHES, MIN_INOTIFY_INSTANCES)) if v < want]
    shown = ", ".join(f"{k} {v}" for k, v in limits.items())
    if low:
        yield Row("inotify", "warn", f"{'; '.join(low)}: the daemon may miss new files until "
                  "its rescan", "raise them: sudo sysctl fs.inotify.max_user_watches=524288 "
                  "fs.inotify.max_user_instances=512 (and in /etc/sysctl.d/ to keep them)")
    else:
        yield Row("inotify", "ok", shown)


def check_daemons(ctx: Context) -> Iterable[Row]:
    found = False
    for path in sorted(ctx.paths.status.glob("daemon-*.json")):
        found = True
        yield from _guarded(f"daemon {path.stem}", lambda c, p=path: [_daemon_row(p)], ctx)
    if not found:
        yield Row("daemons", "ok", "none registered (start one with `realm daemon`)")


def _daemon_row(path: Path) -> Row:
    d = json.loads(path.read_text())
    name = f"daemon {d.get('host')}/{d.get('devices')}"
    who = f"pid {d.get('pid')}, {d.get('state')} since {d.get('updated_at')}"
    if d.get("state") == "stopped":
        return Row(name, "ok", f"stopped cleanly ({who})")
    if d.get("host") != host_name():
        return Row(name, "ok", f"{who} on another host (not checked from here)")
    if process_alive(d.get("pid"), d.get("started")):
        return Row(name, "ok", f"alive ({who})")
    return Row(name, "fail", f"gone: {who} but the process is dead (killed, or the machine "
               "restarted)", f"start it again: realm daemon --devices {d.get('devices')} (it "
               f"takes over its jobs); or delete status/{path.name} if it is retired")


def check_nodes(ctx: Context) -> Iterable[Row]:
    """daemon.nodes above 1: the address other hosts reach this one at, and the members."""
    import ipaddress
    import socket

    from daemon.lock import DeviceSet
    from daemon.nodes import MemberWatch, this_address

    cfg = ctx.config().daemon
    if cfg.nodes <= 1:
        yield Row("nodes", "ok", f"each job runs on one host (daemon.nodes 1, "
                  f"{_source(ctx, 'daemon.nodes')})")
        return
    address = this_address(cfg.address)
    try:
        found = sorted({info[4][0] for info in socket.getaddrinfo(address, None)})
    except OSError as exc:
        yield Row("nodes", "fail", f"daemon.address {address!r} does not resolve here ({exc})",
                  "set daemon.address to the address other hosts reach this one at")
        return
    loopback = all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in found)
    if loopback:
        yield Row("nodes", "warn", f"jobs span {cfg.nodes} hosts, but {address} is a loopback "
                  f"address here ({', '.join(found)}): other hosts cannot reach the rendezvous",
                  "set daemon.address to this host's address on the network the hosts share")
    else:
        yield Row("nodes", "ok", f"jobs span {cfg.nodes} hosts; the rendezvous is reached at "
                  f"{address} ({', '.join(found)})")
    devices = DeviceSet.parse(cfg.devices)
    kind = devices.kind
    idle = MemberWatch(cfg.lease_seconds, time.monotonic).idle(ctx.paths.status, devices.ranks,
                                                                kind)
    need = cfg.nodes - 1
    if len(idle) < need:
        yield Row("members", "warn", f"{len(idle)} of {need} member daemon(s) idle with "
                  f"{devices.ranks} {kind} process(es): the daemon claims no job until they "
                  "are", f"start `realm daemon --join --devices {devices.spec}` on "
                  f"{need - len(idle)} other host(s) sharing this realm")
    else:
        yield Row("members", "ok", f"{len(idle)} member daemon(s) idle: "
                  f"{', '.join(str(m.get('host')) for m in idle)}")


CHECKS: list[tuple[str, Callable[[Context], Iterable[Row]]]] = [
    ("layout", check_layout), ("config", check_config), ("versions", check_versions),
    ("cuda", check_cuda), ("bf16", check_bf16), ("heroes", check_heroes),
    ("disk", check_disk), ("memory", check_memory), ("filesystem", check_filesystem),
    ("inotify", check_inotify), ("daemons", check_daemons), ("nodes", check_nodes)]


def cmd_doctor(args) -> int:
    debug = getattr(args, "debug", False) or os.environ.get("REALM_DEBUG", "") not in ("", "0")
    ctx = Context(realm_paths(args), debug=debug)
    rows: list[Row] = []
    for name, check in CHECKS:
        found = _guarded(name, check, ctx)
        rows += found
        for row in found if not args.json else ():
            print(row.line(), flush=True)  # as they come: loading the heroes takes seconds
    failed = sum(r.status == "fail" for r in rows)
    warned = sum(r.status == "warn" for r in rows)
    if args.json:
        print_json({"schema": DOCTOR_SCHEMA, "realm": str(ctx.paths.base), "ok": not failed,
                    "failed": failed, "warnings": warned, "checks": [asdict(r) for r in rows]})
    else:
        print(f"{len(rows)} checks: {len(rows) - failed - warned} ok, {warned} "
              f"warning{'s' * (warned != 1)}, {failed} failed")
    return 1 if failed else 0


def add_parsers(sub) -> None:
    p = sub.add_parser("doctor", help="check this machine and realm: versions, CUDA, heroes, "
                       "disk, file system, daemons",
                       description="One line per check (ok, warn, FAIL with the fix), then a "
                                   "summary; exit 1 when a check failed. Loads every hero's "
                                   "config and tokenizer, never its weights.")
    p.add_argument("--json", action="store_true", help="the same rows as JSON (schema 1)")
    p.set_defaults(handler=cmd_doctor)
