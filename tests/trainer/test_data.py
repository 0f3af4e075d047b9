"""Bad data under fail and skip, the token cache, and memory that does not grow with the file."""

from __future__ import annotations

import json
import os
import threading
import time

import psutil
import pytest

from trainer.data.cache import hash_file, load_or_build
from trainer.data.reader import DataError
from trainer.data.synthetic import write_dataset
from tests.trainer.conftest import data_cfg

GOOD = json.dumps({"text": "a fine line"})
BAD_CASES = {
    "invalid_json": (b'{"text": "unterminated\n', "invalid JSON at column"),
    "wrong_keys": (b'{"txt": "hello"}\n', "none of 'text', 'prompt'+'completion', 'messages' "
                                          "(keys: txt)"),
    "empty_messages": (b'{"messages": []}\n', "'messages' must be a non-empty list"),
    "not_utf8": (b'{"text": "caf\xe9"}\n', "not UTF-8"),
    "not_object": (b'[1, 2]\n', "a line must be a JSON object, got list"),
    "bad_role": (b'{"messages": [{"role": "bot", "content": "x"}]}\n', "messages[0].role"),
}


def _file(tmp_path, bad: bytes, good_lines: int = 3):
    path = tmp_path / "d.jsonl"
    path.write_bytes((GOOD + "\n").encode() + bad + ((GOOD + "\n") * good_lines).encode())
    return path


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_fail_names_file_line_and_reason(tmp_path, tokenizer, case):
    bad, reason = BAD_CASES[case]
    path = _file(tmp_path, bad)
    with pytest.raises(DataError) as info:
        load_or_build(path, hash_file(path), tokenizer, data_cfg(), tmp_path / "cache")
    assert f"{path}:2: " in str(info.value) and reason in str(info.value)
    assert "data.on_bad_line: skip" in str(info.value)
    assert not list((tmp_path / "cache").glob("*/COMPLETE")), "nothing cached from a failed build"


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_skip_counts_bad_lines(tmp_path, tokenizer, case):
    path = _file(tmp_path, BAD_CASES[case][0], good_lines=199)
    store, _ = load_or_build(path, hash_file(path), tokenizer,
                             data_cfg(on_bad_line="skip", max_bad_fraction=0.05), tmp_path / "c")
    assert store.meta["bad_lines"] == 1 and len(store) == 200
    assert f"{path}:2" in store.meta["bad_line_samples"][0]


def test_skip_fails_above_max_bad_fraction(tmp_path, tokenizer):
    path = _file(tmp_path, BAD_CASES["wrong_keys"][0] * 5, good_lines=5)
    with pytest.raises(DataError, match=r"5 of 11 lines are bad \(45.5%, above data.max_bad_"):
        load_or_build(path, hash_file(path), tokenizer, data_cfg(on_bad_line="skip"), tmp_path / "c")


def test_empty_file(tmp_path, tokenizer):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match="no examples"):
        load_or_build(path, hash_file(path), tokenizer, data_cfg(), tmp_path / "c")


def test_cache_is_reused_and_keyed_by_settings(tmp_path, tokenizer):
    path = write_dataset(tmp_path / "d.jsonl", 60)
    other = write_dataset(tmp_path / "e.jsonl", 60, 1)
    sha = hash_file(path)
    a, reused_a = load_or_build(path, sha, tokenizer, data_cfg(), tmp_path / "c")
    b, reused_b = load_or_build(path, sha, tokenizer, data_cfg(), tmp_path / "c")
    c, reused_c = load_or_build(path, sha, tokenizer, data_cfg(max_length=64), tmp_path / "c")
    d, reused_d = load_or_build(other, hash_file(other), tokenizer, data_cfg(), tmp_path / "c")
    assert (reused_a, reused_b, reused_c, reused_d) == (False, True, False, False)
    assert a.root == b.root and len({a.root, c.root, d.root}) == 3
    assert (a.ids == b.ids).all() and c.meta["truncated_examples"] > 0
    assert 0.2 < a.meta["masked_fraction"] < 0.8


@pytest.mark.slow
def test_memory_does_not_grow_with_the_dataset(tmp_path, tokenizer):
    """About 25 MB of JSONL tokenized with peak RSS growth far below the file size.

    The 1 GB figure is printed by scripts/bench_memory.py (not asserted: machines are noisy)."""
    path = tmp_path / "big.jsonl"
    line = json.dumps({"prompt": "Q: " + "word " * 40, "completion": "answer " * 20}) + "\n"
    with open(path, "w") as fh:
        fh.write(line * (25_000_000 // len(line)))
    proc, peak = psutil.Process(), [0]
    base = proc.memory_info().rss
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        store, _ = load_or_build(path, hash_file(path), tokenizer, data_cfg(), tmp_path / "c")
    finally:
        done.set()
        watcher.join()
    growth_mb = (peak[0] - base) / 2**20
    assert store.meta["num_tokens"] > 20_000_000
    assert growth_mb < 120, f"RSS grew {growth_mb:.0f} MB for a {os.path.getsize(path) >> 20} MB file"
