"""Hostile datasets: a 200 MB line, a line nested 100,000 deep, a file replaced after adoption,
a sidecar without a recorded hash. Each is a DataError/InputError (permanent) naming the file,
never a crash, and never tokens of other bytes in the cache."""

from __future__ import annotations

import hashlib
import json
import tracemalloc

import pytest

from core.errors import InputError
from core.job import Job
from core.paths import RealmPaths
from trainer.data.cache import hash_file, load_or_build
from trainer.data.reader import MAX_LINE_BYTES, DataError, iter_examples
from tests.trainer.conftest import data_cfg

GOOD = json.dumps({"text": "a fine line"}) + "\n"


def test_a_200_mb_line_is_a_data_error_naming_file_line_without_holding_it(tmp_path):
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as fh:
        fh.write(GOOD.encode() + b'{"text": "')
        block = b"x" * (1 << 20)
        for _ in range(200):
            fh.write(block)
        fh.write(b'"}\n' + GOOD.encode())
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as info:
            list(iter_examples(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert f"{path}:2: the line is" in str(info.value) and f"{MAX_LINE_BYTES:,}" in str(info.value)
    assert peak < 3 * MAX_LINE_BYTES, f"peak {peak >> 20} MiB for a 200 MiB line"


def test_an_overlong_line_is_skipped_through_under_skip(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes((GOOD * 3).encode() + b"y" * (MAX_LINE_BYTES + 10) + b"\n" +
                     (GOOD * 2).encode() + b"z" * (MAX_LINE_BYTES + 1))  # last: no newline
    from trainer.data.reader import BadLineCounter

    counter = BadLineCounter()
    hasher = hashlib.sha256()
    lines = [e.line for e in iter_examples(path, on_bad_line="skip", counter=counter,
                                           hasher=hasher)]
    assert lines == [1, 2, 3, 5, 6] and counter.bad == 2 and counter.total == 7
    assert f"{path}:4: the line is" in counter.samples[0]
    assert hasher.hexdigest() == hash_file(path), "every byte read is hashed"


def test_a_deeply_nested_line_is_a_data_error_not_a_recursion_error(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text(GOOD + '{"text": "x", "m": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(DataError, match=r"deep.jsonl:2: JSON nested 100001 deep; at most 32"):
        list(iter_examples(path))


def test_a_dataset_replaced_after_adoption_is_refused_and_never_poisons_the_cache(tmp_path,
                                                                                  tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text(GOOD * 20)
    genuine = hash_file(path)
    genuine_bytes = path.read_bytes()
    path.write_text(json.dumps({"text": "replaced bytes"}) + "\n" * 1 + GOOD * 19)
    with pytest.raises(DataError, match=rf"dataset changed after adoption: recorded sha256 "
                                        rf"{genuine[:16]}\.\.\., read {hash_file(path)[:16]}"):
        load_or_build(path, genuine, tokenizer, data_cfg(), tmp_path / "c")
    assert not list((tmp_path / "c").glob("*/COMPLETE")), "nothing cached from other bytes"
    path.write_bytes(genuine_bytes)
    store, reused = load_or_build(path, genuine, tokenizer, data_cfg(), tmp_path / "c")
    assert not reused and store.meta["num_examples"] == 20
    path.write_text(GOOD * 21)  # replaced after its tokens were cached: a hit still checks
    with pytest.raises(DataError, match="dataset changed after adoption"):
        load_or_build(path, genuine, tokenizer, data_cfg(), tmp_path / "c")


def test_a_sidecar_without_a_recorded_hash_is_refused(tmp_path):
    from trainer.run_job import build_spec

    job = Job(id="20260101-000000-d-abcd", dataset_path="queue/processing/d.jsonl",
              dataset_name="d.jsonl", dataset_sha256=None)
    with pytest.raises(InputError, match="records no dataset_sha256.*realm queue add"):
        build_spec(RealmPaths(tmp_path), job)


@pytest.mark.parametrize("line", [
    '{"text": "broken \\ud800 surrogate"}',
    '{"prompt": "q", "completion": "\\udfff"}',
    '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\\ud83d"}]}',
    '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 7}]}',
    '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": null}]}',
    '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", '
    '"tool_calls": "get_weather"}]}',
    '{"messages": [{"role": "assistant", "content": "x", "reasoning_content": ["no"]}]}',
    '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], '
    '"tools": "all of them"}',
    '{"text": "x", "id": ' + "9" * 4301 + '}',  # more digits than Python converts
])
def test_odd_lines_are_counted_bad_lines_never_a_crash(tmp_path, tokenizer, line):
    path = tmp_path / "d.jsonl"
    good = json.dumps({"text": "ok \ud83d\ude00 fine"}) + "\n"  # a valid surrogate pair
    path.write_text(good * 9 + line + "\n")
    store, _ = load_or_build(path, hash_file(path), tokenizer,
                             data_cfg(on_bad_line="skip", max_bad_fraction=0.5), tmp_path / "c")
    assert (store.meta["num_examples"], store.meta["bad_lines"]) == (9, 1)
    with pytest.raises(DataError, match=r"d\.jsonl:10: "):
        load_or_build(path, hash_file(path), tokenizer, data_cfg(max_length=64),
                      tmp_path / "c2")
