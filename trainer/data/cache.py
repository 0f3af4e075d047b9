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
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from core.fsutil import fsync_dir, rename_noreplace, write_json_atomic
from trainer.data.reader import (READ_CHUNK, BadLine, BadLineCounter, DataError,
                                 check_bad_fraction, iter_examples, reject)
from trainer.data.tokenize import ExampleEncoder, Settings, tokenizer_fingerprint

CACHE_VERSION = 2
_FLUSH_TOKENS = 1 << 22
_BATCH_EXAMPLES = 512
_BATCH_BYTES = 4 << 20
"""Examples are encoded in batches of at most this many examples or characters."""


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

    def add(self, ids: np.ndarray, trained: np.ndarray) -> None:
        self.ids.append(ids)
        self.trained.append(trained)
        self.pending += len(ids)
        self.starts.append(self.starts[-1] + len(ids))
        if self.pending >= _FLUSH_TOKENS:
            self.flush()

    def flush(self) -> None:
        if self.ids:
            np.concatenate(self.ids).astype(np.int32, copy=False).tofile(self.ids_fh)
            np.concatenate(self.trained).astype(np.uint8).tofile(self.trained_fh)
        self.ids, self.trained, self.pending = [], [], 0

    def close(self) -> None:
        self.flush()
        for fh in (self.ids_fh, self.trained_fh):
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()


def _build(dataset: Path, tokenizer, data_cfg, root: Path, recorded_sha256: str,
           tick: Callable[[], None] | None = None) -> None:
    counter = BadLineCounter()
    writer = _Writer(root)
    stats = {"truncated": 0, "trained_tokens": 0, "dropped": 0, "turns_dropped": 0}
    hasher = hashlib.sha256()
    encoder = ExampleEncoder(tokenizer, Settings.of(data_cfg))

    def flush(batch: list) -> None:
        for example, tok in zip(batch, encoder.encode(batch)):
            if isinstance(tok, BadLine):
                reject(dataset, example.line, str(tok), data_cfg.on_bad_line, counter)
                continue
            stats["truncated"] += tok.truncated
            stats["turns_dropped"] += tok.turns_dropped
            if tok.empty:
                stats["dropped"] += 1
                continue
            stats["trained_tokens"] += tok.trained_count
            writer.add(tok.ids, tok.trained)
        batch.clear()

    try:
        batch, size = [], 0
        for example in iter_examples(dataset, forced=data_cfg.format,
                                     on_bad_line=data_cfg.on_bad_line, counter=counter,
                                     hasher=hasher, tick=tick):
            batch.append(example)
            size += example.size
            if len(batch) >= _BATCH_EXAMPLES or size >= _BATCH_BYTES:
                flush(batch)
                size = 0
                if tick is not None:
                    tick()
        flush(batch)
    finally:
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
