"""File-system primitives the queue is built on: atomic writes, no-replace renames, locks.

Everything realm stores is valid only when complete: a file is written under a temporary name in
its final directory, fsynced, then renamed over (and the directory fsynced), so a reader sees the
old content or the new, never half. A move never overwrites: ``rename_noreplace`` uses Linux
``renameat2(RENAME_NOREPLACE)`` and falls back to ``link`` + ``unlink`` (atomic on NFS too) where
the file system does not support it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import json
import os
import secrets
import socket
from pathlib import Path
from typing import Any, Iterator

import psutil

from core.paths import SIDECAR_SUFFIX

_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _load_renameat2():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


def fsync_dir(path: Path) -> None:
    """Make a rename or create inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_then_unlink(src: Path, dst: Path) -> None:
    os.link(src, dst)  # raises FileExistsError when dst exists: never replaces
    try:
        os.unlink(src)
    except FileNotFoundError:
        # Someone else moved src between our link and unlink: they won, undo our link.
        os.unlink(dst)
        raise


def rename_noreplace(src: Path, dst: Path) -> None:
    """Atomically rename ``src`` to ``dst``; FileExistsError if ``dst`` exists.

    FileNotFoundError if ``src`` is gone (another process moved it first).
    """
    if _renameat2 is not None:
        rc = _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    _link_then_unlink(src, dst)


def write_atomic(path: Path, data: bytes, *, fsync: bool = True, replace: bool = True) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory and a rename.

    With ``replace=False`` an existing ``path`` is never overwritten (FileExistsError).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            rename_noreplace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if fsync:
        fsync_dir(path.parent)


def dump_json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n").encode("utf-8")


def write_json_atomic(path: Path, obj: Any, *, fsync: bool = True, replace: bool = True) -> None:
    write_atomic(path, dump_json(obj), fsync=fsync, replace=replace)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block.

    flock belongs to the open file description, so it excludes other threads as well as other
    processes; the kernel drops it when the process dies, so there is nothing stale to clean up.
    Linux emulates flock with POSIX locks on NFS, so it also holds across hosts there.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def split_suffix(name: str) -> tuple[str, str]:
    """``data.jsonl`` -> (``data``, ``.jsonl``); names without a dot keep an empty suffix."""
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        return name, ""
    return stem, "." + ext


def unique_name(directory: Path, name: str, taken: set[str] | None = None) -> str:
    """``name`` if free in ``directory`` (with its sidecar), else ``stem.2.ext``, ``stem.3.ext``...

    A name counts as taken when the dataset or its ``.job.json`` sidecar exists.
    """
    taken = taken if taken is not None else set()
    stem, ext = split_suffix(name)
    candidate, n = name, 1
    while (
        candidate in taken
        or os.path.lexists(directory / candidate)
        or os.path.lexists(directory / (candidate + SIDECAR_SUFFIX))
    ):
        n += 1
        candidate = f"{stem}.{n}{ext}"
    return candidate


def process_alive(pid: Any, started: float | None = None) -> bool:
    """A process with this pid exists on this host and, given ``started`` (its create time, as a
    lease or lock records it), is that process and not a later one that reused the pid."""
    try:
        proc = psutil.Process(int(pid))
        return started is None or abs(proc.create_time() - float(started)) < 1.0
    except (psutil.NoSuchProcess, ValueError, TypeError):
        return False
    except psutil.AccessDenied:
        return True  # it exists; another user's process


def host_name() -> str:
    """This host's name in leases and lock files (``REALM_HOST`` overrides it where hostnames
    collide, e.g. containers, and lets one machine stand in for several hosts in tests)."""
    return os.environ.get("REALM_HOST") or socket.gethostname()
