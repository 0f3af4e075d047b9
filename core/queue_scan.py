"""Reading queue folders: which entries are datasets, sidecars, ignored or refused.

Pure reads: nothing here writes a file or moves one, so ``realm queue status`` and ``queue list``
can use it freely. A folder listing costs one ``scandir`` (no ``stat`` per file on Linux); sidecar
JSON is parsed through a cache keyed by path and inode, and every sidecar write in realm is an
atomic rename (a new inode), so a cached parse is never stale for a file realm wrote.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import SidecarError
from core.job import USER_FIELDS, Job, JobState, check_user_sidecar
from core.paths import DATASET_SUFFIX, PRIORITIES, SIDECAR_SUFFIX, RealmPaths, sidecar_of
from core.sidecar import SEAL_FIELD, RealmKey, read_sidecar_json
from core.validate import check_file_name, open_regular

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
    """One pass over a folder; DirEntry type checks use d_type, so no stat per file.

    Anything named like a sidecar is listed as one whatever it is (a directory, a FIFO, a
    symlink): reading it then refuses it, so its dataset is blocked rather than adopted over it.
    A dataset must be a regular file with a name realm can record.
    """
    listing = Listing(folder)
    try:
        entries = list(os.scandir(paths.state_dir(folder)))
    except (FileNotFoundError, NotADirectoryError):
        return listing
    sidecars, datasets, cut = listing.sidecars, listing.datasets, -len(SIDECAR_SUFFIX)
    for entry in entries:
        name = entry.name
        if is_ignored(name):
            continue
        rel = f"queue/{folder}/{shown(name)}"
        if (bad_name := check_file_name(name.removesuffix(SIDECAR_SUFFIX), f"queue/{folder}")):
            listing.problems.append({"path": rel, "problem": bad_name})
            continue
        if name.endswith(SIDECAR_SUFFIX):
            sidecars[name[:cut]] = entry
            continue
        if entry.is_file(follow_symlinks=False) and name.endswith(DATASET_SUFFIX):
            datasets[name] = entry
            continue
        problem = SYMLINK_REFUSAL if entry.is_symlink() else \
            "not a .jsonl dataset or .job.json sidecar; ignored"
        listing.problems.append({"path": rel, "problem": problem})
    return listing


def shown(name: str) -> str:
    """A file name as text that can always be printed and stored (undecodable bytes become
    U+FFFD)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


class SidecarCache:
    """Parsed sidecars keyed by (path, inode, mtime, size). Only sealed records are cached: realm
    writes every sidecar by atomic rename (a new inode). The inode alone is not enough: a file
    system reuses a freed inode number, so a new record at the path of an old one (the same
    dataset name queued again) could get the old one's number and its stale parse; mtime and
    size tell them apart. A person's sidecar or a refused one is read again on every scan, so a
    fix made in place is seen at once."""

    def __init__(self, key: RealmKey) -> None:
        self.key = key
        self._parsed: dict[tuple[str, int, int, int], Job] = {}

    def load(self, entry: os.DirEntry) -> Job | dict | None:
        """A Job for an adopted sidecar, a dict for one a person wrote before adoption, None if
        it has been moved away since the folder was listed. SidecarError when refused."""
        try:
            st = entry.stat(follow_symlinks=False)
            key = (entry.path, st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            return None
        hit = self._parsed.get(key)
        if hit is not None:
            return hit
        try:
            parsed = parse_sidecar(Path(entry.path), self.key)
        except FileNotFoundError:  # moved by another process since the listing
            return None
        if isinstance(parsed, Job):
            self._parsed[key] = parsed
        return parsed

    def forget(self, path: str) -> None:
        for key in [k for k in self._parsed if k[0] == path]:
            del self._parsed[key]


def parse_sidecar(path: Path, key: RealmKey) -> Job | dict:
    """A sealed realm record as a Job, or a person's pre-adoption fields as a dict."""
    data = read_sidecar_json(path)
    if isinstance(data, dict) and "id" not in data and SEAL_FIELD not in data:
        return check_user_sidecar(data, str(path))
    if not isinstance(data, dict):
        raise SidecarError(f"{path}: a sidecar must be a JSON object, got "
                           f"{type(data).__name__}.")
    return Job.from_dict(key.verify(data, str(path)), source=str(path))


@dataclass
class Digest:
    sha256: str
    num_bytes: int
    num_examples: int


BYTES_PER_TOKEN_ESTIMATE = 4
"""The queue's rough rate before a tokenizer has seen the file (the child counts real tokens)."""


def estimate_tokens(num_bytes: int) -> int:
    return math.ceil(num_bytes / BYTES_PER_TOKEN_ESTIMATE)


def digest_file(path: Path) -> Digest:
    """sha256, size and line count in one streaming pass over 1 MiB blocks (memory: one block,
    whatever the line lengths). Never follows a symlink or blocks on a FIFO: InputError for
    anything that is not a regular file."""
    sha = hashlib.sha256()
    size = lines = 0
    open_line_has_text = False  # the line that runs on past the current block
    with open_regular(path, "the dataset") as fh:
        while block := fh.read(1 << 20):
            sha.update(block)
            size += len(block)
            *ended, rest = block.split(b"\n")
            for i, part in enumerate(ended):
                lines += bool(part.strip()) or (i == 0 and open_line_has_text)
            open_line_has_text = bool(rest.strip()) or (not ended and open_line_has_text)
    return Digest(sha.hexdigest(), size, lines + open_line_has_text)


def unadopted_job(paths: RealmPaths, dataset: Path, *, measure: bool = True) -> Job:
    """The record a dataset not adopted yet would get: the user fields of its hand-written
    sidecar (types checked; names are checked where they become paths) and, with ``measure``,
    its size and line count read block by block (no FIFO wait, no 200 MB line in memory). For
    ``--plan`` and ``config show``."""
    sidecar = sidecar_of(dataset)
    user = read_sidecar_json(sidecar) if os.path.lexists(sidecar) else {}
    user = {k: v for k, v in user.items() if k in USER_FIELDS} if isinstance(user, dict) else {}
    digest = digest_file(dataset) if measure else None
    return Job.from_dict({**user, "id": "(not adopted yet)", "dataset_path": paths.relative(dataset),
                          "dataset_name": dataset.name,
                          "num_bytes": digest.num_bytes if digest else None,
                          "num_examples": digest.num_examples if digest else None,
                          "estimated_tokens": estimate_tokens(digest.num_bytes) if digest else None},
                         source=paths.relative(sidecar))
