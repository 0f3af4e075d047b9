"""Big files are encoded by forked workers: the cache is byte-identical to a serial build, bad
lines keep their file:line and their order, and a bad line under fail stops the build."""

from __future__ import annotations

import json

import numpy as np
import pytest

import trainer.data.cache as cache
from config.schema import DataConfig
from trainer.data.reader import DataError


def lines(n: int) -> str:
    out = []
    for i in range(n):
        if i % 97 == 13:
            out.append("{not json")
        elif i % 3 == 0:
            out.append(json.dumps({"text": f"text number {i} " * (1 + i % 7)}))
        elif i % 3 == 1:
            out.append(json.dumps({"prompt": f"q{i}? ", "completion": f"a{i}."}))
        else:
            out.append(json.dumps({"messages": [{"role": "user", "content": f"hi {i}"},
                                                {"role": "assistant", "content": f"yo {i}"}]}))
    return "\n".join(out) + "\n"


def build(path, tokenizer, root, **cfg):
    store, _ = cache.load_or_build(path, cache.hash_file(path), tokenizer, DataConfig(**cfg),
                                   root)
    return store


def test_parallel_build_equals_serial(tmp_path, tokenizer, monkeypatch):
    path = tmp_path / "d.jsonl"
    path.write_text(lines(3000))
    monkeypatch.setattr(cache, "_BATCH_EXAMPLES", 64)  # many batches, several in flight
    monkeypatch.setattr(cache, "PARALLEL_MIN_BYTES", 1 << 40)
    serial = build(path, tokenizer, tmp_path / "s", on_bad_line="skip", max_bad_fraction=0.1)
    monkeypatch.setattr(cache, "PARALLEL_MIN_BYTES", 0)
    assert cache._workers(path) >= 1
    parallel = build(path, tokenizer, tmp_path / "p", on_bad_line="skip", max_bad_fraction=0.1)
    assert np.array_equal(serial.ids, parallel.ids)
    assert np.array_equal(serial.trained, parallel.trained)
    assert np.array_equal(serial.starts, parallel.starts)
    keys = ("num_examples", "num_tokens", "trained_tokens", "bad_lines", "bad_line_samples")
    assert {k: serial.meta[k] for k in keys} == {k: parallel.meta[k] for k in keys}
    assert parallel.meta["bad_lines"] == 31 and ":14: invalid JSON" in \
        parallel.meta["bad_line_samples"][0]


def test_parallel_build_fails_at_the_first_bad_line(tmp_path, tokenizer, monkeypatch):
    path = tmp_path / "d.jsonl"
    path.write_text(lines(3000))
    monkeypatch.setattr(cache, "_BATCH_EXAMPLES", 64)
    monkeypatch.setattr(cache, "PARALLEL_MIN_BYTES", 0)
    with pytest.raises(DataError, match=r"d\.jsonl:14: invalid JSON"):
        build(path, tokenizer, tmp_path / "c")
    assert not any((tmp_path / "c").glob("*/COMPLETE"))


def test_encoder_workers_die_with_a_killed_training_child(tmp_path):
    """SIGKILL the process building a cache: its forked encoders must not outlive it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    path = tmp_path / "d.jsonl"
    path.write_text(lines(4000) * 40)  # long enough to be caught mid-build
    script = (
        "import sys, trainer.data.cache as c\n"
        "from config.schema import DataConfig\n"
        "from trainer.model import build_byte_tokenizer\n"
        "c.PARALLEL_MIN_BYTES = 0; c._BATCH_EXAMPLES = 16\n"
        "p = __import__('pathlib').Path(sys.argv[1])\n"
        "c.load_or_build(p, c.hash_file(p), build_byte_tokenizer(), "
        "DataConfig(on_bad_line='skip', max_bad_fraction=0.5), p.parent / 'cache')\n")
    child = subprocess.Popen([sys.executable, "-c", script, str(path)],
                             cwd=os.getcwd(), start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        workers = []
        while time.monotonic() < deadline and len(workers) < 1:
            workers = psutil.Process(child.pid).children()
            time.sleep(0.05)
        assert workers, "the build never forked its encoders"
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        gone, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"encoder workers outlived the killed child: {alive}"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
