"""Peak memory while tokenizing a large JSONL: streaming keeps RSS flat as the file grows.

    python scripts/bench_memory.py [--gigabytes 1.0]

Generates a prompt/completion JSONL of the given size in a temp dir, builds the token cache
with the tiny-qwen3 byte tokenizer, and prints file size, tokens, wall time and the peak RSS
growth over the process's starting RSS, sampled every 20 ms (target, printed not asserted:
under 500 MB for 1 GB).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402

from trainer.config.schema import DataConfig  # noqa: E402
from trainer.data.cache import hash_file, load_or_build  # noqa: E402
from trainer.model import build_byte_tokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gigabytes", type=float, default=1.0)
    args = parser.parse_args()
    tokenizer = build_byte_tokenizer()
    with tempfile.TemporaryDirectory(prefix="realm-mem-") as name:
        path = Path(name) / "big.jsonl"
        line = json.dumps({"prompt": "Question: " + "lorem ipsum " * 30,
                           "completion": "dolor sit amet " * 15}) + "\n"
        with open(path, "w") as fh:
            fh.write(line * int(args.gigabytes * 2**30 // len(line)))
        proc, peak, done = psutil.Process(), [0], threading.Event()
        base = proc.memory_info().rss

        def watch() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                time.sleep(0.02)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        start = time.perf_counter()
        store, _ = load_or_build(path, hash_file(path), tokenizer, DataConfig(max_length=2048),
                                 Path(name) / "cache")
        seconds = time.perf_counter() - start
        done.set()
        watcher.join()
        size = path.stat().st_size
    growth = (peak[0] - base) / 2**20
    print(f"tokenized {size / 2**30:.2f} GiB ({store.meta['num_examples']:,} examples, "
          f"{store.meta['num_tokens']:,} tokens) in {seconds:.0f} s "
          f"({size / 2**20 / seconds:.1f} MiB/s)")
    print(f"peak RSS growth {growth:.0f} MiB (target < 500 MiB: "
          f"{'met' if growth < 500 else 'MISSED'})")


if __name__ == "__main__":
    main()
