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
from core.validate import MAX_NAME_LEN

PRIORITIES = ("high", "normal", "low")
SIDECAR_SUFFIX = ".job.json"


def sidecar_of(dataset: Path) -> Path:
    """The sidecar of a dataset file: ``<dataset>.job.json`` beside it."""
    return dataset.with_name(dataset.name + SIDECAR_SUFFIX)
DATASET_SUFFIX = ".jsonl"

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_name(value: str, what: str) -> str:
    """Refuse a hero, campaign or job name that could escape its folder (``..``, ``/``, spaces)
    or is too long to be a folder name with realm's suffixes."""
    if not isinstance(value, str) or not _SAFE_NAME.fullmatch(value) or ".." in value:
        raise UsageError(
            f"{what} {value!r} is not a safe name: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit (no '/', '..' or spaces)."
        )
    if len(value) > MAX_NAME_LEN:
        raise UsageError(f"{what} {value[:20]}... is {len(value)} characters long; at most "
                         f"{MAX_NAME_LEN} are accepted. Choose a shorter name.")
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

    def queue_entry(self, rel: str) -> Path:
        """The dataset a record names (``queue/<folder>/<name>.jsonl``), refused unless it lies
        directly in one of the queue's folders: realm renames only its own files."""
        parts = Path(str(rel)).parts
        if len(parts) != 3 or parts[0] != "queue" or parts[1] not in PRIORITIES + STATE_FOLDERS \
                or not parts[2].endswith(DATASET_SUFFIX) or parts[2].startswith("."):
            raise UsageError(f"dataset_path {str(rel)[:200]!r} is not a dataset in this realm's "
                             "queue (queue/<folder>/<name>.jsonl); realm moves only its own files.")
        return self.base.joinpath(*parts)

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


def layout_problems(paths: RealmPaths) -> list[str]:
    """Reasons the queue cannot be served safely: an inbox or state folder that is a symlink
    (it would pull outside files in, or push jobs out) or lies on another file system than
    ``queue/`` (renames across file systems are copies, not atomic moves)."""
    problems = []
    try:
        queue_dev = os.stat(paths.queue).st_dev
    except FileNotFoundError:
        return problems
    for folder in PRIORITIES + STATE_FOLDERS:
        path = paths.state_dir(folder)
        if path.is_symlink():
            problems.append(f"queue/{folder} is a symlink to {os.readlink(path)}; realm serves "
                            "only folders inside the realm. Replace it with a real folder "
                            f"(`rm queue/{folder} && realm init`).")
            continue
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        if st.st_dev != queue_dev:
            problems.append(f"queue/{folder} is on another file system than queue/ (a mount "
                            "point); realm moves jobs by atomic rename, which cannot cross file "
                            "systems. Unmount it and use a plain folder.")
    return problems


def is_initialised(paths: RealmPaths) -> bool:
    return all(paths.state_dir(p).is_dir() for p in PRIORITIES + STATE_FOLDERS)


CHECKPOINT_MARKER = "COMPLETE"
"""Written last into a checkpoint folder: only folders holding it count."""
STEP_DIR = re.compile(r"step-(\d+)")
"""A checkpoint folder's name (complete only once it holds ``CHECKPOINT_MARKER``)."""


def complete_step_folders(root: Path) -> list[tuple[int, Path]]:
    """A campaign's complete checkpoints as (step, folder), oldest first (numeric order:
    step-100 after step-99). Torch-free: the plan and the dashboard read it too."""
    found = []
    if root.is_dir():
        for child in root.iterdir():
            m = STEP_DIR.fullmatch(child.name)
            if m and (child / CHECKPOINT_MARKER).is_file():
                found.append((int(m.group(1)), child))
    return sorted(found)
