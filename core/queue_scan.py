"""Reading queue folders: which entries are datasets, sidecars, ignored or refused.

Pure reads: nothing here writes a file or moves one, so ``realm queue status`` and ``queue list``
can use it freely. A folder listing costs one ``scandir`` (no ``stat`` per file on Linux); sidecar
JSON is parsed through a cache keyed by path and inode, and every sidecar write in realm is an
atomic rename (a new inode), so a cached parse is never stale for a file realm wrote.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import SidecarError
from core.job import Job, JobState, check_user_sidecar
from core.paths import DATASET_SUFFIX, PRIORITIES, SIDECAR_SUFFIX, RealmPaths

IGNORED_SUFFIXES = (".tmp", ".part", ".partial", ".swp")
SYMLINK_REFUSAL = (
    "symlink refused: realm moves datasets between folders and must own the bytes it trains on; "
    "copy the file in instead (realm queue add FILE)"
)


def is_ignored(name: str) -> bool:
    """Hidden files and in-progress names that writers use before renaming into place."""
    return name.startswith(".") or name.endswith(IGNORED_SUFFIXES)


def folder_state(folder: str) -> JobState:
    return JobState.QUEUED if folder in PRIORITIES else JobState(folder)


@dataclass
class Listing:
    """One queue folder, classified."""

    folder: str
    datasets: dict[str, os.DirEntry] = field(default_factory=dict)
    sidecars: dict[str, os.DirEntry] = field(default_factory=dict)
    """Keyed by the dataset name the sidecar belongs to."""
    problems: list[dict[str, str]] = field(default_factory=list)


def scan_folder(paths: RealmPaths, folder: str) -> Listing:
    """One pass over a folder; DirEntry type checks use d_type, so no stat per file."""
    listing = Listing(folder)
    try:
        entries = list(os.scandir(paths.state_dir(folder)))
    except FileNotFoundError:
        return listing
    sidecars, datasets, cut = listing.sidecars, listing.datasets, -len(SIDECAR_SUFFIX)
    for entry in entries:
        name = entry.name
        if name[0] == "." or name.endswith(IGNORED_SUFFIXES):
            continue
        if entry.is_file(follow_symlinks=False):
            if name.endswith(SIDECAR_SUFFIX):
                sidecars[name[:cut]] = entry
                continue
            if name.endswith(DATASET_SUFFIX):
                datasets[name] = entry
                continue
        rel = f"queue/{folder}/{name}"
        problem = SYMLINK_REFUSAL if entry.is_symlink() else \
            "not a .jsonl dataset or .job.json sidecar; ignored"
        listing.problems.append({"path": rel, "problem": problem})
    return listing


def read_sidecar_json(path: Path) -> Any:
    """Parse a sidecar; bad JSON becomes a SidecarError naming file, line and column."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SidecarError(f"{path}: not UTF-8 text ({exc.reason}); rewrite it as JSON.") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SidecarError(
            f"{path}:{exc.lineno}:{exc.colno}: invalid JSON ({exc.msg}); fix the file or delete it "
            "to let realm write a fresh sidecar."
        ) from None


class SidecarCache:
    """Parsed sidecars keyed by (path, inode); parse errors are cached too."""

    def __init__(self) -> None:
        self._parsed: dict[tuple[str, int], Job | dict | SidecarError] = {}

    def load(self, entry: os.DirEntry) -> Job | dict | None:
        """A Job for an adopted sidecar, a dict for one a person wrote before adoption, None if
        it has been moved away since the folder was listed."""
        key = (entry.path, entry.inode())
        hit = self._parsed.get(key)
        if hit is None:
            try:
                hit = self._parse(Path(entry.path))
            except FileNotFoundError:  # moved by another process since the listing
                return None
            self._parsed[key] = hit
        if isinstance(hit, SidecarError):
            raise hit
        return hit

    @staticmethod
    def _parse(path: Path) -> Job | dict | SidecarError:
        try:
            data = read_sidecar_json(path)
            if isinstance(data, dict) and "id" not in data:
                return check_user_sidecar(data, str(path))
            return Job.from_dict(data, source=str(path))
        except SidecarError as exc:
            return exc

    def forget(self, path: str) -> None:
        for key in [k for k in self._parsed if k[0] == path]:
            del self._parsed[key]


@dataclass
class Digest:
    sha256: str
    num_bytes: int
    num_examples: int


def digest_file(path: Path) -> Digest:
    """sha256, size and non-blank line count in one streaming pass (memory: one line)."""
    sha = hashlib.sha256()
    size = lines = 0
    with open(path, "rb") as fh:
        for line in fh:
            sha.update(line)
            size += len(line)
            lines += bool(line.strip())
    return Digest(sha.hexdigest(), size, lines)
