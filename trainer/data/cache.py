"""The on-disk tokenized dataset: built once, streamed, reused by retries and resumes.

``<realm>/cache/tokens/<key>/`` holds ``ids.bin`` (int32), ``trained.bin`` (uint8), ``starts.npy``
(int64 example boundaries) and ``meta.json``; ``COMPLETE`` is written last. The key is a hash of
the dataset's sha256, the tokenizer fingerprint and the data settings that change tokens, so a
changed dataset, tokenizer or setting never reuses stale tokens. A build writes into a temp folder
and renames it into place; memory does not grow with the file (one line and one chunk at a time).

The bytes trained are the bytes recorded: a build hashes the file in the same pass that
tokenizes it and is kept only when that hash is the sha256 recorded at adoption, so the key
always names the bytes actually read (a file replaced after adoption never lands in the cache
under the genuine file's key). A cache hit still reads the file once to hash it. A mismatch is a
``DataError`` (permanent).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import signal
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from core.fsutil import fsync_dir, rename_noreplace, write_json_atomic
from core.validate import open_regular
from trainer.data.reader import (READ_CHUNK, BadLine, BadLineCounter, DataError, _TooLong,
                                 check_bad_fraction, iter_lines, read_line, reject)
from trainer.data.tokenize import ExampleEncoder, Settings, tokenizer_fingerprint

CACHE_VERSION = 2
_FLUSH_TOKENS = 1 << 22
_BATCH_EXAMPLES = 512
_BATCH_BYTES = 4 << 20
"""Examples are encoded in batches of at most this many examples or characters."""
PARALLEL_MIN_BYTES = 16 << 20
"""Files at least this big are encoded by forked worker processes (one per core)."""


@dataclass
class TokenStore:
    """Read-only view of a built cache (memory-mapped)."""

    root: Path
    ids: np.ndarray
    trained: np.ndarray
    starts: np.ndarray
    meta: dict

    def __len__(self) -> int:
        return len(self.starts) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.starts)

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.starts[i], self.starts[i + 1]
        return self.ids[a:b], self.trained[a:b]


def cache_key(dataset_sha256: str, tokenizer, data_cfg) -> str:
    parts = {"v": CACHE_VERSION, "sha": dataset_sha256, "tok": tokenizer_fingerprint(tokenizer),
             "format": data_cfg.format, "max_length": data_cfg.max_length,
             "train_on_inputs": data_cfg.train_on_inputs, "on_bad_line": data_cfg.on_bad_line,
             "train_on": data_cfg.train_on, "truncation": data_cfg.truncation}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def open_store(root: Path) -> TokenStore:
    meta = json.loads((root / "meta.json").read_text())
    ids = np.memmap(root / "ids.bin", dtype=np.int32, mode="r") if meta["num_tokens"] else \
        np.zeros(0, np.int32)
    trained = np.memmap(root / "trained.bin", dtype=np.uint8, mode="r") if meta["num_tokens"] \
        else np.zeros(0, np.uint8)
    return TokenStore(root, ids, trained, np.load(root / "starts.npy"), meta)


def check_read(dataset: Path, recorded: str, read: str) -> None:
    """DataError unless the bytes read hash to the sha256 recorded at adoption."""
    if read != recorded:
        raise DataError(f"{dataset}: dataset changed after adoption: recorded sha256 "
                        f"{recorded[:16]}..., read {read[:16]}...; nothing was trained on it. "
                        "Add it again with `realm queue add` (a new job records the new bytes).")


def hash_file(dataset: Path, tick: Callable[[], None] | None = None) -> str:
    hasher = hashlib.sha256()
    with open(dataset, "rb") as fh:
        while chunk := fh.read(READ_CHUNK):
            hasher.update(chunk)
            if tick is not None:
                tick()
    return hasher.hexdigest()


def load_or_build(dataset: Path, dataset_sha256: str, tokenizer, data_cfg,
                  cache_root: Path, tick: Callable[[], None] | None = None
                  ) -> tuple[TokenStore, bool]:
    """(store, reused): the cached tokens for this dataset and settings, building them if needed.
    ``tick`` is called per line or chunk read (a sign of life for the daemon)."""
    if not dataset_sha256:
        raise DataError(f"{dataset}: no recorded sha256 for this dataset; add it again with "
                        "`realm queue add`.")
    root = cache_root / cache_key(dataset_sha256, tokenizer, data_cfg)
    if (root / "COMPLETE").exists():
        check_read(dataset, dataset_sha256, hash_file(dataset, tick))
        return open_store(root), True
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = cache_root / f".{root.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _build(dataset, tokenizer, data_cfg, tmp, dataset_sha256, tick)
        try:
            rename_noreplace(tmp, root)
        except FileExistsError:
            pass  # another process built the same cache first: use theirs
        fsync_dir(cache_root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return open_store(root), False


class _Writer:
    """Appends examples to the cache files, flushing every ~4 M tokens."""

    def __init__(self, root: Path):
        self.ids_fh = open(root / "ids.bin", "wb")
        self.trained_fh = open(root / "trained.bin", "wb")
        self.ids: list[np.ndarray] = []
        self.trained: list[np.ndarray] = []
        self.pending = 0
        self.starts = [0]

    def add_many(self, ids: np.ndarray, trained: np.ndarray, lengths: list[int]) -> None:
        """Examples back to back in ``ids``/``trained``, ``lengths`` tokens each."""
        self.ids.append(ids)
        self.trained.append(trained)
        self.pending += len(ids)
        self.starts.extend((self.starts[-1] + np.cumsum(lengths, dtype=np.int64)).tolist())
        if self.pending >= _FLUSH_TOKENS:
            self.flush()

    def flush(self) -> None:
        if self.ids:
            np.concatenate(self.ids).astype(np.int32, copy=False).tofile(self.ids_fh)
            np.concatenate(self.trained).astype(np.uint8, copy=False).tofile(self.trained_fh)
        self.ids, self.trained, self.pending = [], [], 0

    def close(self) -> None:
        self.flush()
        for fh in (self.ids_fh, self.trained_fh):
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()


@dataclass
class _Batch:
    """What encoding one batch of lines gave, in line order."""

    lines: list[tuple[int, str | None, bool, int, bool, int]]
    """Per non-blank line: (number, bad-line reason or None, truncated, turns dropped, dropped,
    trained tokens)."""
    ids: np.ndarray
    trained: np.ndarray
    lengths: list[int]
    """Token count of each kept example (the arrays hold them back to back)."""


_ENCODER: tuple[ExampleEncoder, str] | None = None
"""The encoder and line format of the build in progress (inherited by forked workers)."""


def _encode_lines(lines: list[tuple[int, Any]]) -> _Batch:
    encoder, forced = _ENCODER
    items = [(number, read_line(number, raw, forced)) for number, raw in lines]
    items = [(number, item) for number, item in items if item is not None]
    examples = [item for _, item in items if not isinstance(item, BadLine)]
    results = iter(encoder.encode(examples))
    out, ids, trained, lengths = [], [], [], []
    for number, item in items:
        tok = item if isinstance(item, BadLine) else next(results)
        if isinstance(tok, BadLine):
            out.append((number, str(tok), False, 0, False, 0))
            continue
        out.append((number, None, tok.truncated, tok.turns_dropped, tok.empty,
                    0 if tok.empty else tok.trained_count))
        if not tok.empty:
            ids.append(tok.ids)
            trained.append(tok.trained)
            lengths.append(len(tok.ids))
    join = lambda parts, kind: np.concatenate(parts).astype(kind, copy=False) if parts \
        else np.zeros(0, kind)  # noqa: E731
    joined = join(ids, np.int32)
    if len(joined) and 0 <= joined.min() and joined.max() < 1 << 16:
        joined = joined.astype(np.uint16)  # half the bytes back from a worker; int32 on disk
    return _Batch(out, joined, join(trained, np.uint8), lengths)


def _line_batches(fh, hasher, tick) -> Iterator[list[tuple[int, Any]]]:
    batch, size = [], 0
    for number, raw in enumerate(iter_lines(fh, hasher=hasher, tick=tick), 1):
        batch.append((number, raw))
        size += raw.size if isinstance(raw, _TooLong) else len(raw)
        if len(batch) >= _BATCH_EXAMPLES or size >= _BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encoded(batches: Iterator[list], workers: int) -> Iterator[_Batch]:
    """Encoded batches in file order: in this process, or in ``workers`` forked processes with
    a bounded number of batches in flight (memory stays flat)."""
    if workers <= 1:
        yield from map(_encode_lines, batches)
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                               initializer=_die_with, initargs=(os.getpid(),))
    try:
        window: deque = deque()
        for batch in batches:
            window.append(pool.submit(_encode_lines, batch))
            if len(window) >= 2 * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _die_with(parent: int) -> None:
    """Worker start: die when the process that forked it dies (a SIGKILLed training child
    must not leave its encoders blocked on their queue forever). Linux prctl; elsewhere the
    worker lives until its queue closes."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _workers(dataset: Path) -> int:
    """Forked encoder processes for a build: one per core (at most 4) for big files."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        big = dataset.stat().st_size >= PARALLEL_MIN_BYTES
    except OSError:
        big = False
    return min(4, cores or 1) if big else 1


def _build(dataset: Path, tokenizer, data_cfg, root: Path, recorded_sha256: str,
           tick: Callable[[], None] | None = None) -> None:
    global _ENCODER
    counter = BadLineCounter()
    writer = _Writer(root)
    stats = {"truncated": 0, "trained_tokens": 0, "dropped": 0, "turns_dropped": 0}
    hasher = hashlib.sha256()
    _ENCODER = (ExampleEncoder(tokenizer, Settings.of(data_cfg)), data_cfg.format)
    try:
        with open_regular(dataset, "the dataset") as fh:  # no FIFO wait, no symlink followed
            for batch in _encoded(_line_batches(fh, hasher, tick), _workers(dataset)):
                for number, reason, truncated, turns, dropped, trained in batch.lines:
                    counter.total += 1
                    if reason is not None:
                        reject(dataset, number, reason, data_cfg.on_bad_line, counter)
                        continue
                    stats["truncated"] += truncated
                    stats["turns_dropped"] += turns
                    stats["dropped"] += dropped
                    stats["trained_tokens"] += trained
                writer.add_many(batch.ids, batch.trained, batch.lengths)
                if tick is not None:
                    tick()
    finally:
        _ENCODER = None
        writer.close()
    check_read(dataset, recorded_sha256, hasher.hexdigest())
    check_bad_fraction(dataset, counter, data_cfg.max_bad_fraction)
    if len(writer.starts) == 1:
        raise DataError(f"{dataset}: every example lost all its trained tokens to truncation at "
                        f"data.max_length {data_cfg.max_length}; raise data.max_length.")
    np.save(root / "starts.npy", np.asarray(writer.starts, dtype=np.int64))
    num_tokens = writer.starts[-1]
    write_json_atomic(root / "meta.json", {
        "version": CACHE_VERSION, "dataset": str(dataset), "num_examples": len(writer.starts) - 1,
        "num_tokens": num_tokens, "trained_tokens": stats["trained_tokens"],
        "masked_fraction": 1 - stats["trained_tokens"] / max(1, num_tokens),
        "truncated_examples": stats["truncated"], "turns_dropped": stats["turns_dropped"],
        "truncation": data_cfg.truncation,
        "dropped_examples": stats["dropped"], "lines": counter.total,
        "bad_lines": counter.bad, "bad_line_samples": counter.samples})
    (root / "COMPLETE").write_text("ok\n")
