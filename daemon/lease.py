"""Whether another daemon's claim on something is still held, judged by this daemon's clock.

Same host: the owning process exists. Other host: a timestamp it rewrites (a lease's
``heartbeat_at``, a member's status ``updated_at``) *changed* within the last ``lease_seconds``
of this daemon's monotonic clock. The timestamp is only compared with its previous value, never
with this host's wall clock, so clock skew between hosts never makes a live owner look dead (or
a dead one alive); the price is that a daemon watches a foreign stamp for ``lease_seconds``
before it judges it dead, even when the stamp is hours old.
"""

from __future__ import annotations

import time

from core.fsutil import host_name, process_alive


class LeaseWatch:
    def __init__(self, lease_seconds: float, clock=time.monotonic):
        self.lease_seconds, self.clock = lease_seconds, clock
        self._seen: dict[str, tuple[object, float]] = {}

    def judge(self, key: str, owner: dict, stamp) -> bool:
        """Is ``owner`` (host, pid, started) alive, given the stamp it last wrote for ``key``?"""
        if owner.get("host") == host_name():
            return process_alive(owner.get("pid"), owner.get("started"))
        now = self.clock()
        seen = self._seen.get(key)
        if seen is None or seen[0] != stamp:
            self._seen[key] = (stamp, now)
            return True
        return now - seen[1] < self.lease_seconds

    def alive(self, job) -> bool:
        """A job's lease: its worker and ``heartbeat_at`` (``started_at`` before the first)."""
        return self.judge(job.id, job.worker or {}, job.heartbeat_at or job.started_at)

    def silent_for(self, job) -> float:
        seen = self._seen.get(job.id)
        return 0.0 if seen is None else self.clock() - seen[1]

    def forget(self, keep: set[str]) -> None:
        self._seen = {k: v for k, v in self._seen.items() if k in keep}
