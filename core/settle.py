"""The settle rule: a dataset is never claimed while someone may still be writing it.

A file becomes eligible only when its size and mtime have been observed unchanged for
``settle_seconds`` (measured on this process's monotonic clock, so a skewed NFS server clock does
not matter) and no writer is known to hold it open. The daemon feeds inotify hints through
``note_written`` / ``note_closed`` (watchdog's modified and closed events); the polling path uses
the observation rule alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    since: float


class Settler:
    """Remembers what each candidate file looked like and since when."""

    def __init__(self, settle_seconds: float, clock: Callable[[], float] = time.monotonic):
        self.settle_seconds = settle_seconds
        self.clock = clock
        self._seen: dict[str, _Seen] = {}
        self._open: set[str] = set()

    def note_written(self, path: str) -> None:
        """inotify says a writer touched ``path``: treat it as open until it is closed."""
        self._open.add(str(path))

    def note_closed(self, path: str) -> None:
        self._open.discard(str(path))
        self._seen.pop(str(path), None)  # the settle window starts again at close

    def is_settled(self, path: str, size: int, mtime_ns: int) -> bool:
        """Record this observation; True once it has held still for ``settle_seconds``."""
        key = str(path)
        now = self.clock()
        seen = self._seen.get(key)
        if seen is None or (seen.size, seen.mtime_ns) != (size, mtime_ns):
            self._seen[key] = _Seen(size, mtime_ns, now)
            return self.settle_seconds <= 0 and key not in self._open
        return key not in self._open and now - seen.since >= self.settle_seconds

    def forget(self, path: str) -> None:
        self._seen.pop(str(path), None)
        self._open.discard(str(path))
