"""The process group of one job: which rank this process is and how the ranks agree.

A job on several devices runs as one process per device, started by torch's own elastic
launcher (``python -m torch.distributed.run``), which sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` (and, for a job spanning hosts, ``GROUP_WORLD_SIZE``: the node count). ``Group.from_env`` joins the process group (gloo on CPU, NCCL on CUDA); without
those variables it is a group of one and every method is a no-op, so the single-process path
never touches ``torch.distributed``.

Agreement is by tiny all-reduces: the global token count of a step (so the loss is normalised by
every rank's targets), the global loss sum, and the decisions (stop, panic) as a MAX, so one
rank's NaN or one rank's stop request is everyone's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

TIMEOUT = timedelta(hours=2)
"""Collective timeout. A dead peer is noticed at once (its sockets close); a hung one is the
daemon's business (``daemon.job_timeout`` on rank 0's heartbeat), so this only bounds long
one-sided work such as rank 0 tokenizing a large file while the others wait."""


@dataclass
class Group:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    local_world: int = 1
    """Ranks of this job on this host (they share its memory)."""
    nodes: int = 1
    """Hosts the job spans (torchrun's node count: ``GROUP_WORLD_SIZE``)."""

    @property
    def main(self) -> bool:
        """Rank 0: the one rank that writes checkpoints, status and the job record."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @classmethod
    def from_env(cls) -> "Group":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, timeout=TIMEOUT)
        return cls(rank, world, local, backend,
                   int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
                   int(os.environ.get("GROUP_WORLD_SIZE", "1")))

    def device(self) -> torch.device | None:
        """This rank's device when it is a CUDA rank (None: pick as a single process does)."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else None

    def _tensor(self, values: list[float]) -> torch.Tensor:
        device = self.device() or torch.device("cpu")
        return torch.tensor(values, dtype=torch.float64, device=device)

    def sum(self, values: list[float]) -> list[float]:
        return self._all_reduce(values, "SUM")

    def max(self, values: list[float]) -> list[float]:
        return self._all_reduce(values, "MAX")

    def _all_reduce(self, values: list[float], op: str) -> list[float]:
        if not self.active:
            return list(values)
        import torch.distributed as dist

        t = self._tensor(values)
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
        return t.tolist()

    def gather(self, values: list[float]) -> list[list[float]]:
        """Every rank's ``values``, in rank order, on every rank."""
        if not self.active:
            return [list(values)]
        import torch.distributed as dist

        t = self._tensor(values)
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t)
        return [o.tolist() for o in out]

    def broadcast(self, value):
        """Rank 0's ``value`` (any picklable object), on every rank."""
        if not self.active:
            return value
        import torch.distributed as dist

        box = [value if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_object(self, value) -> list:
        """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
        if not self.active:
            return [value]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def weights_digest(model) -> list[float]:
    """Two float64 sums over every parameter: equal on all ranks when the replicas agree."""
    with torch.no_grad():
        total = torch.zeros(2, dtype=torch.float64)
        for p in model.parameters():
            d = p.detach().double()
            total += torch.stack([d.sum(), (d * d).sum()]).cpu()
    return total.tolist()
