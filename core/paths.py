"""Where things live in a realm, and the rule for names that become paths.

A realm is a base directory (``--base-dir``, else ``$REALM_HOME``, else the current directory)
holding ``queue/``, ``campaigns/``, ``configs/``, ``logs/`` and ``status/``. ``realm init`` creates
the layout; it is idempotent and never touches existing files.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from core.errors import UsageError

PRIORITIES = ("high", "normal", "low")
SIDECAR_SUFFIX = ".job.json"
DATASET_SUFFIX = ".jsonl"

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_name(value: str, what: str) -> str:
    """Refuse a hero, campaign or job name that could escape its folder (``..``, ``/``, spaces)."""
    if not _SAFE_NAME.fullmatch(value or "") or ".." in value:
        raise UsageError(
            f"{what} {value!r} is not a safe name: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit (no '/', '..' or spaces)."
        )
    return value


def resolve_base(base_dir: str | os.PathLike | None = None) -> Path:
    """The realm directory: explicit argument, then ``$REALM_HOME``, then the cwd."""
    chosen = base_dir or os.environ.get("REALM_HOME") or os.getcwd()
    return Path(chosen).expanduser().resolve()


@dataclass(frozen=True)
class RealmPaths:
    """Every well-known path of one realm."""

    base: Path

    @property
    def queue(self) -> Path:
        return self.base / "queue"

    def state_dir(self, folder: str) -> Path:
        """``queue/<folder>``: a priority inbox or one of the state folders."""
        return self.queue / folder

    @property
    def queue_lock(self) -> Path:
        return self.queue / ".queue.lock"

    @property
    def logs(self) -> Path:
        return self.base / "logs"

    @property
    def ledger(self) -> Path:
        return self.logs / "jobs.jsonl"

    @property
    def status(self) -> Path:
        return self.base / "status"

    @property
    def campaigns(self) -> Path:
        return self.base / "campaigns"

    @property
    def heroes(self) -> Path:
        return self.base / "configs" / "heroes"

    def relative(self, path: Path) -> str:
        """``path`` relative to the realm when inside it (how sidecars store paths)."""
        try:
            return str(Path(path).relative_to(self.base))
        except ValueError:
            return str(path)


STATE_FOLDERS = ("processing", "completed", "failed", "skipped", "cancelled")


def init_layout(paths: RealmPaths) -> list[Path]:
    """Create the realm folders that are missing; return the ones created."""
    wanted = [paths.state_dir(p) for p in PRIORITIES + STATE_FOLDERS]
    wanted += [paths.campaigns, paths.heroes, paths.logs, paths.status]
    created = []
    for folder in wanted:
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            created.append(folder)
    return created


def is_initialised(paths: RealmPaths) -> bool:
    return all(paths.state_dir(p).is_dir() for p in PRIORITIES + STATE_FOLDERS)
