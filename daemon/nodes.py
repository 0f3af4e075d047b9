"""Jobs across hosts: torchrun's c10d rendezvous among the daemons that share a realm.

A daemon with ``daemon.nodes: N`` (N > 1) claims a job as any daemon does and trains it on N
hosts: its own devices and those of N - 1 *member* daemons (``realm daemon --join``) on other
hosts that mount the same realm. It claims only while enough members are idle (their status
files say so), and for the claim it publishes a rendezvous, ``status/jobs/<job>.rdzv.json``: the
c10d endpoint (its address and a free port; its launcher hosts the store), a run id unique to
the claim, the node count, the processes per node, the device kind, the job's sidecar and the
claiming daemon's training flags (every rank must resolve the same config). A member takes a
node slot by creating ``<job>.rdzv.node-<i>`` exclusively, so a job never gets more nodes than
it asked for (a surplus agent would wait in torch's redundancy list for ever), and starts the
same launcher against the endpoint; torchrun's rendezvous numbers the ranks.

Wherever rank 0 lands, it writes through the shared realm: the job log, the liveness counter,
the outcome file and the checkpoints. The claiming daemon supervises the job as a one-host job
(lease, liveness, warm stop by the stop file every rank reads, cancel) and records its outcome;
a member supervises only its own launcher: it stops it when the claim it joined has ended, and a
SIGTERM to a member is a warm stop of the whole job (a node is leaving: checkpoint, requeue).
A node that dies takes the group down (its peers' collectives fail), and the job is retried as
a one-host crash is. Never imports torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from core.errors import InputError
from config.flags import FLAG_KEYS
from config.schema import MAX_SECONDS
from core.fsutil import host_name, write_json_atomic
from core.job import Job, JobState, utc_now
from core.queue_scan import read_sidecar_json
from core.validate import parse_json, read_regular
from daemon.lease import LeaseWatch
from daemon.lock import device_label

SCHEMA = 1
MAX_BYTES = 1 << 16
"""A rendezvous, node slot or daemon status file larger than this is damaged (realm writes
well under 4 KiB)."""


def read_small_json(path: Path, what: str):
    """A small JSON file another daemon wrote to the shared realm: never follows a symlink, never
    blocks on a FIFO or reads a device, bounded in size and depth. ValueError says why not
    (FileNotFoundError passes through: the file went away)."""
    try:
        return parse_json(read_regular(path, MAX_BYTES, what), str(path))
    except InputError as exc:
        raise ValueError(str(exc)) from None
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ValueError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None


_TYPES = {"job_id": str, "claim": str, "run_id": str, "endpoint": str, "nodes": int,
          "nproc": int, "kind": str, "sidecar": str, "flags": list, "leader": dict,
          "timeout": (int, float), "created_at": str}


_TRAINING_FLAG = re.compile("--(?:%s)=.*" % "|".join(
    [f.replace("_", "-") for f in FLAG_KEYS] + ["set"]), re.S)
"""The flags a claiming daemon passes to its ranks (``cli.daemon_cmds._flag_args``)."""
_ENDPOINT = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9.-]*|\[[0-9A-Fa-f:.]+\]):\d{1,5}")
_RUN_ID = re.compile(r"realm-[0-9a-f]{16}")


def this_address(configured: str | None) -> str:
    """The address other hosts reach this one at: daemon.address, else the FQDN."""
    return configured or socket.getfqdn()


def free_port() -> int:
    """A port free on this host now (the launcher binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@dataclass
class Rendezvous:
    """One claim's rendezvous, as the claiming daemon publishes it."""

    job_id: str
    claim: str
    """The claim's ``started_at``: a member joins only while the job is still this claim."""
    run_id: str
    endpoint: str
    nodes: int
    nproc: int
    """Processes per node (the claiming daemon's device set)."""
    kind: str
    """``cpu`` or ``cuda``: a member joins only with devices of the same kind."""
    sidecar: str
    """The job's sidecar in processing/, relative to the realm (mount points differ by host)."""
    flags: list[str]
    """The claiming daemon's training flags, passed to every node's ranks."""
    leader: dict
    timeout: float
    created_at: str

    @staticmethod
    def path(status_dir: Path, job_id: str) -> Path:
        return status_dir / "jobs" / f"{job_id}.rdzv.json"

    @classmethod
    def for_claim(cls, job: Job, sidecar: str, *, nodes: int, nproc: int, kind: str,
                  address: str, flags: list[str], leader: dict, timeout: float
                  ) -> "Rendezvous":
        digest = hashlib.sha256(f"{job.id}|{job.started_at}|{leader}".encode()).hexdigest()
        return cls(job.id, job.started_at or "", f"realm-{digest[:16]}",
                   f"{f'[{address}]' if ':' in address else address}:{free_port()}", nodes,
                   nproc, kind, sidecar, list(flags),
                   dict(leader), timeout, utc_now())

    def publish(self, status_dir: Path) -> None:
        """Clear what an earlier claim of the job left (a daemon killed mid-job), then write."""
        withdraw(status_dir, self.job_id)
        (status_dir / "jobs").mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path(status_dir, self.job_id),
                          {"schema": SCHEMA, **asdict(self)}, fsync=False)

    @classmethod
    def load(cls, path: Path) -> "Rendezvous":
        """The rendezvous in ``path``; ValueError names what is wrong with a damaged or forged
        file (not JSON, not an object, fields missing, unknown or of the wrong type, a job id
        that is not the file's)."""
        data = read_small_json(path, "rendezvous file")
        if not isinstance(data, dict):
            raise ValueError(f"{path}: not a JSON object")
        data = dict(data)
        data.pop("schema", None)
        missing, unknown = sorted(_TYPES.keys() - data.keys()), sorted(data.keys() - _TYPES.keys())
        if missing or unknown:
            raise ValueError(f"{path}: missing field(s) {missing}, unknown field(s) {unknown}")
        wrong = [k for k, t in _TYPES.items()
                 if not isinstance(data[k], t) or isinstance(data[k], bool)]
        if not wrong and not all(isinstance(f, str) for f in data["flags"]):
            wrong = ["flags"]
        if wrong:
            raise ValueError(f"{path}: field(s) {wrong} of the wrong type")
        if path.name != f"{data['job_id']}.rdzv.json":
            raise ValueError(f"{path}: job id {data['job_id']!r} is not the file's")
        return cls(**data)

    @classmethod
    def read(cls, path: Path) -> "Rendezvous | None":
        try:
            return cls.load(path)
        except (OSError, ValueError):
            return None

    @classmethod
    def published(cls, status_dir: Path, damaged: dict | None = None) -> list["Rendezvous"]:
        """The rendezvous published now; ``damaged`` (when given) gets each file that is not one
        (path -> why). One bad file never hides the others."""
        out = []
        for p in sorted((status_dir / "jobs").glob("*.rdzv.json")):
            try:
                out.append(cls.load(p))
            except FileNotFoundError:
                continue  # withdrawn while listed
            except (OSError, ValueError) as exc:
                if damaged is not None:
                    damaged[p] = str(exc)
        return out

    def problem(self, paths) -> str | None:
        """Why this rendezvous is not one a claiming daemon wrote (its sidecar outside
        processing/, flags that are not training flags, a malformed endpoint or run id, a node
        count or timeout out of range): a member never runs it. ``load`` checked the types."""
        try:
            sidecar = (paths.base / self.sidecar).resolve()
        except (OSError, ValueError, RuntimeError) as exc:  # a NUL byte, a symlink loop
            return f"sidecar {self.sidecar!r}: {exc}"
        if sidecar.parent != paths.state_dir("processing").resolve():
            return f"sidecar {self.sidecar!r} is not in processing/"
        bad = [f for f in self.flags if not _TRAINING_FLAG.fullmatch(f)]
        if bad:
            return f"flags {bad} are not training flags"
        if not 1 < self.nodes <= 1024:
            return f"node count {self.nodes!r}"
        if not _ENDPOINT.fullmatch(self.endpoint) or not _RUN_ID.fullmatch(self.run_id):
            return f"endpoint {self.endpoint!r} or run id {self.run_id!r} is malformed"
        if not 0 < self.timeout <= MAX_SECONDS:
            return f"timeout {self.timeout!r}"
        return None

    def _slot(self, status_dir: Path, node: int) -> Path:
        return status_dir / "jobs" / f"{self.job_id}.rdzv.node-{node}"

    def take_slot(self, status_dir: Path, member: dict) -> int | None:
        """Node slot 1..nodes-1 for ``member`` (slot 0 is the claiming daemon's), created
        exclusively; None when every slot is taken."""
        for node in range(1, self.nodes):
            try:
                fd = os.open(self._slot(status_dir, node), os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                             0o644)
            except FileExistsError:
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"run_id": self.run_id, "node": node, "at": utc_now(), **member}, f)
            if self._current(status_dir):
                return node
            # the claim was withdrawn (and perhaps claimed again) since it was read: the slot
            # would block the new claim's member, and a launcher would meet nobody
            self._slot(status_dir, node).unlink(missing_ok=True)
            return None
        return None

    def _current(self, status_dir: Path) -> bool:
        """This claim's rendezvous is still the one published for the job."""
        now = self.read(self.path(status_dir, self.job_id))
        return now is not None and now.run_id == self.run_id

    def joined(self, status_dir: Path) -> list[dict]:
        """The members that took a slot of this claim (a damaged slot file counts as none)."""
        out = []
        for node in range(1, self.nodes):
            with contextlib.suppress(OSError, ValueError):
                taken = read_small_json(self._slot(status_dir, node), "node slot")
                if isinstance(taken, dict) and taken.get("run_id") == self.run_id:
                    out.append(taken)
        return out

    def still_claimed(self, base: Path) -> bool:
        """The job is still in processing under this claim (its sidecar says so)."""
        try:
            job = Job.from_dict(read_sidecar_json(base / self.sidecar))
        except Exception:  # noqa: BLE001 - gone, moved or unreadable: not a claim to join
            return False
        return job.id == self.job_id and job.status is JobState.PROCESSING and \
            job.started_at == self.claim

    def launcher(self, base: Path, *, hosts_store: bool, address: str) -> list[str]:
        """torchrun for one node of this job (the claiming daemon's launcher hosts the c10d
        store; members connect to it)."""
        return [sys.executable, "-m", "torch.distributed.run",
                "--nnodes", str(self.nodes), "--nproc-per-node", str(self.nproc),
                "--rdzv-backend", "c10d", "--rdzv-endpoint", self.endpoint,
                "--rdzv-id", self.run_id,
                "--rdzv-conf", f"is_host={str(hosts_store).lower()},"
                               f"join_timeout={max(1, int(self.timeout))}",
                "--local-addr", address,
                "--max-restarts", "0", "--monitor-interval", "0.2", "--shutdown-timeout", "10",
                "-m", "trainer.run_job", "--base-dir", str(base),
                "--job", str(base / self.sidecar), *self.flags]


def withdraw(status_dir: Path, job_id: str) -> None:
    """Remove a job's rendezvous and its node slots."""
    for p in (status_dir / "jobs").glob(f"{job_id}.rdzv.*"):
        p.unlink(missing_ok=True)


def node_log(logs_dir: Path, job_id: str, devices: str) -> Path:
    """One node's launcher output for a job spanning hosts, named by host and device set (two
    daemons of one host may both serve the job); rank 0's log is ``<job>.log``, written by rank
    0 itself wherever it runs."""
    return logs_dir / "jobs" / f"{job_id}.node-{host_name()}-{device_label(devices)}.log"


class MemberWatch:
    """Which member daemons are idle now, judged as leases are (``daemon.lease``): on this host
    the process exists; on another its status file's ``updated_at`` keeps changing."""

    def __init__(self, lease_seconds: float, clock):
        self.watch = LeaseWatch(lease_seconds, clock)

    def idle(self, status_dir: Path, nproc: int, kind: str) -> list[dict]:
        """Idle members whose device sets match (as many processes, the same kind)."""
        out = []
        for path in sorted(status_dir.glob("daemon-*.json")):
            try:
                status = read_small_json(path, "daemon status file")
            except (OSError, ValueError):
                continue
            if not isinstance(status, dict) or status.get("role") != "member":
                continue
            if status.get("state") != "idle" or status.get("ranks") != nproc or \
                    status.get("kind") != kind:
                continue
            if self.watch.judge(str(path), status, status.get("updated_at")):
                out.append(status)
        return out
